/** Block backends shared by every storage device: where a disk's blocks live. */
export { type BlockBackend, zeroRange } from './backend';
export { RamBackend, type RamBackendOptions } from './ram';
export { FileBackend, MEMORY_FILE_INLINE_MAX, type FileBackendOptions, type FileEngine } from './file';
export { NbdBackend, NbdConnection, NbdError, NbdProtocolError, NbdReplyError, NbdFlags, parseNbdUri, formatNbdTarget, nbdProtocol } from './nbd';
export type { NbdBackendOptions, NbdBackendStats, NbdZeroOptions, NbdConnectOptions, NbdConnectionInfo, NbdTarget } from './nbd';
