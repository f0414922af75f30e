/**
 * An NVMe controller device model: {@link NvmeController} (a PCIe NVM Express 1.4 I/O controller
 * with one namespace) and the storage it serves, {@link RamBackend} / {@link FileBackend} or any
 * {@link NvmeBackend}.
 *
 * @packageDocumentation
 */
export { NvmeController, type NvmeControllerOptions } from './controller';
export { RamBackend, FileBackend, type NvmeBackend, type FileBackendOptions } from './backend';
export { DEFAULT_POLL_POLICY, DoorbellPoller, type DoorbellMode, type PollPolicy, type PollPhase } from './doorbells';
export { AdminOpcode, IoOpcode, Status, FeatureId, LogId, Cns, Sct, DNR, status, statusCode } from './constants';
export * as registers from './registers';
export * as structs from './structs';
