export { Idio16Device, IDIO16_VENDOR_ID, IDIO16_DEVICE_ID, IDIO16_BAR, type Idio16Events } from './gpio/idio16';
export { NvmeController, RamBackend, FileBackend, type NvmeBackend, type NvmeControllerOptions, type FileBackendOptions } from './nvme';
