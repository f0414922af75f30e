export { Idio16Device, IDIO16_VENDOR_ID, IDIO16_DEVICE_ID, IDIO16_BAR, type Idio16Events } from './gpio/idio16';
export { NvmeController, type NvmeBackend, type NvmeControllerOptions } from './nvme';
export { BlkRequest, VirtioBlkDevice, type VirtioBlkOptions, type VirtioBlkStats } from './virtio-blk';
