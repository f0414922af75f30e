/**
 * An NVMe controller device model: {@link NvmeController} (a PCIe NVM Express 1.4 I/O controller
 * with one namespace) on any block backend (lib/block: RamBackend, FileBackend, or your own).
 * The specification's opcodes, registers and structures are lib/nvme.
 *
 * @packageDocumentation
 */
export { NvmeController, type NvmeControllerOptions } from './controller';
/** The storage behind a namespace: any {@link BlockBackend} (the name this package used first). */
export type { BlockBackend as NvmeBackend } from '../../block';
export { type DoorbellMode } from './doorbells';
/** The NVMe controller's doorbell poller (its name before virtio shared it). */
export { AdaptivePoller as DoorbellPoller, DEFAULT_POLL_POLICY, type PollPolicy, type PollPhase } from '../../pci/poller';
