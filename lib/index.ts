/**
 * vfio-user for Node.js: both sides of the vfio-user protocol and device models on top of it.
 *
 * - `VfioUserServer` + `VfioUserDevice`: serve a device on a UNIX socket (lib/server).
 * - `PciDevice`: a PCI function (config space, BARs, MSI/MSI-X, INTx) to build devices on (lib/pci).
 * - `VfioUserClient` + `PciFunction`: drive any vfio-user device from Node (lib/client).
 * - Devices: `Idio16Device` (ACCES PCI-IDIO-16 GPIO card), `NvmeController`, `VirtioBlkDevice`.
 * - `virtio`: the virtio 1.2 spec constants, split virtqueues and the `VirtioPciDevice` transport (lib/virtio).
 * - Block backends every storage device shares: `RamBackend`, `FileBackend`, `BlockBackend` (lib/block).
 * - `Connection`: the framed, fd-passing message transport both sides use (lib/transport).
 * - `protocol`: every message's encode/decode pair, constants and errors (lib/protocol).
 * - `native`: the addon's typed face — owned fds, mmap'd memory, eventfds, memfds (lib/native).
 *
 * @packageDocumentation
 */
export * from './server';
export {
  VfioUserClient,
  ClientLimits,
  DmaMemory,
  IrqChannels,
  MappedRegion,
  PciFunction,
  DirtyBitmap,
  migrate,
  Migrator,
  MigrationError,
  migStateName,
  type MigrateOptions,
  type MigrationProgress,
  type MigrationResult,
  type MigrationSupport,
  type DirtyRange,
  type ClientOptions,
  type CallOptions,
  type DeviceSummary,
  type VfioUserClientEvents,
  type WriteOptions,
  type DmaMapOptions,
  type IrqEvent,
  type IrqEventsOptions,
  type IrqIndexInfo as ClientIrqInfo,
  type RegionInfo,
  type RegionArea,
  type MappedArea,
  type BarInfo as ClientBarInfo,
  type MsixInfo,
  type PciCapability,
} from './client';
export { PciDevice, StopReason, type PciDeviceOptions, type PciBar } from './pci/device';
export * as pci from './pci';
export { VirtioPciDevice, type VirtioPciOptions, type NotifyMode } from './virtio/pci';
export * as virtio from './virtio';
export * from './block';
export * from './devices';
export {
  NvmeDriver,
  NvmeError,
  NvmeTimeoutError,
  NvmeAbortedError,
  type NvmeDriverOptions,
  type IoQueuePairOptions,
} from './drivers/nvme';
export * as nvmeDriver from './drivers/nvme';
/** The NVMe specification as data (opcodes, statuses, registers, command fields, structures). */
export * as nvme from './nvme';
export { Connection, IncomingMessage, type ConnectionOptions, type Reply, type ReplyCallback, type RequestOptions, type Body } from './transport/connection';
export { VfioUserError, ProtocolError } from './protocol/errors';
export * as protocol from './protocol';
export * as native from './native';
