/**
 * Virtio over vfio-user: the specification's constants and structures (`spec`, importable by any
 * driver), split virtqueues, and the modern PCI transport that virtio device models extend.
 *
 * @packageDocumentation
 */
export * from './spec';
export { GuestMemory, RingView } from './memory';
export { SplitVirtqueue, VirtqElement, readU64, u64, type ElementFactory } from './virtqueue';
export { ElementData } from './data';
export { AdaptivePoller, DEFAULT_POLL_POLICY, type PollPhase, type PollPolicy, type PollTarget } from '../pci/poller';
export { MAX_VIRTQUEUES, VirtioPciDevice, VirtioPciLayout, type NotifyMode, type VirtioCounters, type VirtioPciOptions } from './pci';
