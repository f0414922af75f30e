/**
 * The client side of vfio-user (the VMM): {@link VfioUserClient} and what it hands out.
 *
 * @packageDocumentation
 */
export {
  VfioUserClient,
  ClientLimits,
  type ClientOptions,
  type CallOptions,
  type DeviceSummary,
  type VfioUserClientEvents,
  type WriteOptions,
} from './client';
export { DmaMemory, type DmaFdOptions, type DmaMapOptions, type DmaMemoryState } from './dma';
export { IrqChannels, MAX_IRQ_VECTORS, type IrqAction, type IrqEvent, type IrqEventsOptions, type IrqIndexInfo, type IrqSelection } from './irqs';
export { MappedRegion, type MappedArea, type RegionArea, type RegionInfo } from './regions';
export { RegionIoFds, type RegionIoFd } from './iofds';
export { DirtyBitmap, MIG_STATE_NAMES, migStateName, type DirtyRange, type MigrationSupport } from './migration';
export { migrate, Migrator, MigrationError, type MigrateOptions, type MigrationProgress, type MigrationResult, type MigratorEvents } from './migrate';
export { PciFunction, type BarInfo, type EnableOptions, type MsixEntry } from './pci';
export {
  MsixRegs,
  parseConfigHeader,
  parseMsixCapability,
  walkCapabilities,
  walkExtendedCapabilities,
  type MsixInfo,
  type PciCapability,
  type PciExtendedCapability,
  type PciHeader,
} from './pci-config';
export { DEFAULT_BAR_WINDOWS, type AddressWindow, type BarWindows } from './bar-windows';
