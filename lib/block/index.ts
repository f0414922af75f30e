/** Block backends shared by every storage device: where a disk's blocks live. */
export { type BlockBackend } from './backend';
export { RamBackend } from './ram';
export { FileBackend, type FileBackendOptions } from './file';
