/** NBD: a client for exports of qemu-nbd, qemu-storage-daemon, nbdkit and nbd-server, and the backend on it. */
export { NbdBackend, type NbdBackendOptions, type NbdBackendStats, type NbdZeroOptions } from './backend';
export { NbdConnection, type NbdConnectOptions, type NbdConnectionInfo } from './connection';
export { parseNbdUri, formatNbdTarget, type NbdTarget } from './uri';
export { NbdError, NbdProtocolError, NbdReplyError, TransmissionFlags as NbdFlags } from './protocol';
export * as nbdProtocol from './protocol';
