/**
 * PCI device-model pieces, pure and I/O-free: configuration space with masks, BAR sizing and the
 * capability lists; capability builders (PM, MSI, MSI-X, PCIe, vendor, extended); the MSI-X table
 * and PBA with their delivery policy. A vfio-user server serves these through REGION_READ/WRITE on
 * region 7 (config) and the BAR regions.
 *
 * @packageDocumentation
 */
export * from './ids';
export { RegisterLayout, type RegisterMasks, type RegisterSize } from './layout';
export {
  ConfigSpace,
  type BarInfo,
  type BarKind,
  type BarOptions,
  type CommandListener,
  type ConfigSpaceOptions,
} from './config-space';
export { type DeliverFn, type TriggerResult } from './interrupts';
export { MSIX_ENTRY_CTRL_MASKBIT, MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS, MsixEntry, MsixTable, type MsixTableOptions } from './msix';
export {
  PlacedCapability,
  touched,
  valueBefore,
  writtenValue,
  type Capability,
  type CapabilityWrite,
  type ExtendedCapability,
} from './capabilities/common';
export * from './capabilities/pm';
export * from './capabilities/msi';
export * from './capabilities/msix';
export * from './capabilities/pcie';
export * from './capabilities/vendor';
export * from './capabilities/extended';
