/** The virtio block device (virtio 1.2, 5.2) on the modern virtio-pci transport. */
export { BlkRequest, VirtioBlkDevice, type VirtioBlkOptions, type VirtioBlkStats } from './device';
