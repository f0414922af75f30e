/**
 * The virtio 1.2 specification as data: device IDs, status bits, feature bits, the PCI transport's
 * capabilities and common configuration layout, the split virtqueue's structures, and the block
 * device's configuration, request and status layouts. Pure: no imports, no I/O, no state. Device
 * models (lib/virtio, lib/devices/virtio-*) and any future host-side virtio driver import it.
 *
 * Names follow the specification and Linux's `include/uapi/linux/virtio_*.h` without the
 * `VIRTIO_`/`VIRTQ_` prefixes (grep for `VIRTQ_DESC_F_INDIRECT` to find {@link DescFlags}.INDIRECT).
 * Offsets are in bytes; every multi-byte field is little-endian. Section numbers are those of
 * "Virtual I/O Device (VIRTIO) Version 1.2" (OASIS, 2022).
 *
 * @packageDocumentation
 */

// ---- 2.1 Device status field ---------------------------------------------------------------------

/** `device_status` bits (2.1). Written by the driver in this order; 0 resets the device. */
export const DeviceStatus = {
  /** The guest OS has found the device and recognised it as a valid virtio device. */
  ACKNOWLEDGE: 0x01,
  /** The guest OS knows how to drive the device. */
  DRIVER: 0x02,
  /** The driver is set up and ready to drive the device. */
  DRIVER_OK: 0x04,
  /** The driver has acknowledged the features it understands; negotiation is complete. */
  FEATURES_OK: 0x08,
  /** Set by the device: it hit an error it cannot recover from without a reset. */
  DEVICE_NEEDS_RESET: 0x40,
  /** Set by the driver: something went wrong and it gave up on the device. */
  FAILED: 0x80,
} as const;

// ---- 5 Device types --------------------------------------------------------------------------------

/** Virtio device IDs (5). */
export const VirtioDeviceId = {
  NET: 1,
  BLOCK: 2,
  CONSOLE: 3,
  ENTROPY: 4,
  BALLOON: 5,
  SCSI: 8,
  GPU: 16,
  INPUT: 18,
  VSOCK: 19,
  CRYPTO: 20,
  FS: 26,
} as const;

// ---- 6 Reserved feature bits -----------------------------------------------------------------------

/** Device-independent feature bit numbers (6). Device-specific bits are 0..23 (and 50..127). */
export const Feature = {
  /** Legacy: interrupt when the available ring runs empty. */
  NOTIFY_ON_EMPTY: 24,
  /** Legacy: any descriptor layout (implied by VERSION_1). */
  ANY_LAYOUT: 27,
  /** Descriptors may point to indirect descriptor tables (2.7.5.3). */
  INDIRECT_DESC: 28,
  /** `used_event` and `avail_event` suppress notifications (2.7.7, 2.7.10). */
  EVENT_IDX: 29,
  /** Compliance with this specification (not the legacy interface). */
  VERSION_1: 32,
  /** The device sits behind an IOMMU / platform address translation. */
  ACCESS_PLATFORM: 33,
  /** Packed virtqueue layout (2.8). */
  RING_PACKED: 34,
  /** Buffers are used in the order they were made available. */
  IN_ORDER: 35,
  /** Memory accesses need platform ordering (hardware devices). */
  ORDER_PLATFORM: 36,
  /** Single-root I/O virtualisation. */
  SR_IOV: 37,
  /** The driver passes extra data (the available index) in its notifications. */
  NOTIFICATION_DATA: 38,
  /** The driver uses `queue_notify_data` in its notifications. */
  NOTIF_CONFIG_DATA: 39,
  /** Individual virtqueues can be reset (`queue_reset`). */
  RING_RESET: 40,
} as const;

/** The feature bit `bit` as a 64-bit mask. */
export function featureBit(bit: number): bigint {
  return 1n << BigInt(bit);
}

/** True if `features` has bit `bit` set. */
export function hasFeature(features: bigint, bit: number): boolean {
  return (features & featureBit(bit)) !== 0n;
}

// ---- 4.1 Virtio over PCI bus -------------------------------------------------------------------

/** PCI vendor ID of every virtio device (4.1.2). */
export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
/** Non-transitional (modern) devices have PCI device ID 0x1040 + virtio device ID (4.1.2). */
export const VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040;
/** Non-transitional devices SHOULD have a PCI revision ID of 1 or higher (4.1.2.1). */
export const VIRTIO_PCI_MODERN_REVISION = 1;
/** ...and a PCI subsystem device ID of 0x40 or higher (4.1.2.1). */
export const VIRTIO_PCI_MODERN_SUBSYSTEM_ID_MIN = 0x40;

/** The PCI device ID of a non-transitional device of type `deviceType` ({@link VirtioDeviceId}). */
export function modernPciDeviceId(deviceType: number): number {
  return VIRTIO_PCI_MODERN_DEVICE_ID_BASE + deviceType;
}

/** `cfg_type` of a virtio PCI capability (4.1.4). */
export const PciCapType = {
  /** Common configuration: {@link CommonCfg}. */
  COMMON_CFG: 1,
  /** Notifications: queue notify addresses. */
  NOTIFY_CFG: 2,
  /** ISR status byte. */
  ISR_CFG: 3,
  /** Device-specific configuration. */
  DEVICE_CFG: 4,
  /** A window in config space through which any BAR can be accessed. */
  PCI_CFG: 5,
  /** A shared memory region. */
  SHARED_MEMORY_CFG: 8,
  /** Vendor-specific data. */
  VENDOR_CFG: 9,
} as const;

/**
 * `struct virtio_pci_cap` (4.1.4), a vendor-specific PCI capability (ID 0x09). Offsets are
 * relative to the capability.
 */
export const PciCap = {
  /** u8: 0x09 (vendor-specific). */
  CAP_VNDR: 0,
  /** u8: next capability pointer. */
  CAP_NEXT: 1,
  /** u8: length of this capability in bytes. */
  CAP_LEN: 2,
  /** u8: {@link PciCapType}. */
  CFG_TYPE: 3,
  /** u8: BAR index (0..5) holding the structure. */
  BAR: 4,
  /** u8: identifies multiple capabilities of one type. */
  ID: 5,
  /** le32: offset of the structure within the BAR. */
  OFFSET: 8,
  /** le32: length of the structure in bytes. */
  LENGTH: 12,
  /** Size of `struct virtio_pci_cap`. */
  SIZE: 16,
} as const;

/** `struct virtio_pci_notify_cap` (4.1.4.4): the common capability plus a multiplier. */
export const PciNotifyCap = {
  /** le32: queue notify address = cap.offset + queue_notify_off * notify_off_multiplier. */
  NOTIFY_OFF_MULTIPLIER: 16,
  SIZE: 20,
} as const;

/** `struct virtio_pci_cfg_cap` (4.1.4.9): an access window into the BARs through config space. */
export const PciCfgCap = {
  /** u8[4]: data read from / written to BAR `cap.bar` at `cap.offset`, `cap.length` (1, 2, 4) bytes. */
  PCI_CFG_DATA: 16,
  SIZE: 20,
} as const;

/** `struct virtio_pci_common_cfg` (4.1.4.3) with the 1.2 additions; offsets in the structure. */
export const CommonCfg = {
  /** le32, RW: which 32 feature bits `device_feature` shows (0: 0..31, 1: 32..63, ...). */
  DEVICE_FEATURE_SELECT: 0x00,
  /** le32, RO: the device's feature bits selected above. */
  DEVICE_FEATURE: 0x04,
  /** le32, RW: which 32 feature bits `driver_feature` sets. */
  DRIVER_FEATURE_SELECT: 0x08,
  /** le32, RW: the feature bits the driver accepts, selected above. */
  DRIVER_FEATURE: 0x0c,
  /** le16, RW: MSI-X vector for configuration changes ({@link VIRTIO_MSI_NO_VECTOR}: none). */
  CONFIG_MSIX_VECTOR: 0x10,
  /** le16, RO: number of virtqueues. */
  NUM_QUEUES: 0x12,
  /** u8, RW: {@link DeviceStatus}. */
  DEVICE_STATUS: 0x14,
  /** u8, RO: changes whenever the device configuration changes. */
  CONFIG_GENERATION: 0x15,
  /** le16, RW: the virtqueue the queue_* fields below refer to. */
  QUEUE_SELECT: 0x16,
  /** le16, RW: the queue's size; reads the maximum first (0: no such queue). */
  QUEUE_SIZE: 0x18,
  /** le16, RW: MSI-X vector of the queue. */
  QUEUE_MSIX_VECTOR: 0x1a,
  /** le16, RW: 1 once the driver has configured the queue. */
  QUEUE_ENABLE: 0x1c,
  /** le16, RO: where the queue's notify address is, in units of the notify multiplier. */
  QUEUE_NOTIFY_OFF: 0x1e,
  /** le64, RW: descriptor area (table) address. */
  QUEUE_DESC: 0x20,
  /** le64, RW: driver area (available ring) address. */
  QUEUE_DRIVER: 0x28,
  /** le64, RW: device area (used ring) address. */
  QUEUE_DEVICE: 0x30,
  /** le16, RO: data the driver writes with notifications (VIRTIO_F_NOTIF_CONFIG_DATA). */
  QUEUE_NOTIFY_DATA: 0x38,
  /** le16, RW: 1 resets the queue (VIRTIO_F_RING_RESET). */
  QUEUE_RESET: 0x3a,
  /** Size of the structure in 1.2. */
  SIZE: 0x3c,
} as const;

/** "No vector" for `config_msix_vector` / `queue_msix_vector` (4.1.5.1.2). */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** ISR status bits (4.1.4.5): read-to-clear. */
export const Isr = {
  /** A virtqueue has used buffers. */
  QUEUE: 0x1,
  /** The device configuration changed. */
  CONFIG: 0x2,
} as const;

// ---- 2.7 Split virtqueues ----------------------------------------------------------------------------

/** Largest queue size (2.7). */
export const MAX_QUEUE_SIZE = 32768;

/** `struct virtq_desc` (2.7.5): one 16-byte descriptor. */
export const Desc = {
  /** le64: guest-physical address of the buffer. */
  ADDR: 0,
  /** le32: length of the buffer. */
  LEN: 8,
  /** le16: {@link DescFlags}. */
  FLAGS: 12,
  /** le16: next descriptor's index, if flags & NEXT. */
  NEXT: 14,
  SIZE: 16,
} as const;

/** `virtq_desc.flags` (2.7.5). */
export const DescFlags = {
  /** The chain continues at `next`. */
  NEXT: 1,
  /** The buffer is device-writable (otherwise device-readable). */
  WRITE: 2,
  /** The buffer holds a table of descriptors (VIRTIO_F_INDIRECT_DESC). */
  INDIRECT: 4,
} as const;

/** `struct virtq_avail` (2.7.6): the driver area. */
export const Avail = {
  /** le16: {@link AvailFlags}. */
  FLAGS: 0,
  /** le16: where the driver puts the next entry (free-running, wraps at 2^16). */
  IDX: 2,
  /** le16[queue size]: heads of available descriptor chains. */
  RING: 4,
} as const;

/** `virtq_avail.flags` (2.7.6). */
export const AvailFlags = {
  /** Without EVENT_IDX: the driver does not want interrupts (a hint). */
  NO_INTERRUPT: 1,
} as const;

/** `struct virtq_used` (2.7.8): the device area. */
export const Used = {
  /** le16: {@link UsedFlags}. */
  FLAGS: 0,
  /** le16: where the device puts the next entry (free-running). */
  IDX: 2,
  /** `struct virtq_used_elem`[queue size]. */
  RING: 4,
  /** Size of `struct virtq_used_elem`: le32 id (chain head), le32 len (bytes written). */
  ELEM_SIZE: 8,
  ELEM_ID: 0,
  ELEM_LEN: 4,
} as const;

/** `virtq_used.flags` (2.7.8). */
export const UsedFlags = {
  /** Without EVENT_IDX: the device does not need notifications (a hint). */
  NO_NOTIFY: 1,
} as const;

/** Alignment of the three areas (2.7): descriptor table, available ring, used ring. */
export const RingAlign = { DESC: 16, AVAIL: 2, USED: 4 } as const;

/** Bytes of the descriptor table for `size` entries. */
export function descTableSize(size: number): number {
  return Desc.SIZE * size;
}

/** Bytes of the available ring for `size` entries, `used_event` included (2.7). */
export function availRingSize(size: number): number {
  return 6 + 2 * size;
}

/** Bytes of the used ring for `size` entries, `avail_event` included (2.7). */
export function usedRingSize(size: number): number {
  return 6 + Used.ELEM_SIZE * size;
}

/** Offset of `used_event` (le16) in the available ring (EVENT_IDX). */
export function usedEventOffset(size: number): number {
  return Avail.RING + 2 * size;
}

/** Offset of `avail_event` (le16) in the used ring (EVENT_IDX). */
export function availEventOffset(size: number): number {
  return Used.RING + Used.ELEM_SIZE * size;
}

/**
 * `vring_need_event` (2.7.10): with EVENT_IDX, whether moving an index from `oldIdx` to `newIdx`
 * passed the other side's event index `eventIdx` (all u16, free-running), so it must be notified.
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

// ---- 5.2 Block device ---------------------------------------------------------------------------------

/** Block device feature bit numbers (5.2.3). */
export const BlkFeature = {
  /** `size_max`: the largest single segment. */
  SIZE_MAX: 1,
  /** `seg_max`: the most segments in a request. */
  SEG_MAX: 2,
  /** `geometry`: legacy disk geometry. */
  GEOMETRY: 4,
  /** The device is read-only. */
  RO: 5,
  /** `blk_size`: the logical block size. */
  BLK_SIZE: 6,
  /** The FLUSH request is supported (a volatile write cache). */
  FLUSH: 9,
  /** `topology`: physical block and I/O size hints. */
  TOPOLOGY: 10,
  /** `writeback` can be read and set by the driver. */
  CONFIG_WCE: 11,
  /** `num_queues`: several request queues. */
  MQ: 12,
  /** DISCARD requests, limits in config. */
  DISCARD: 13,
  /** WRITE_ZEROES requests, limits in config. */
  WRITE_ZEROES: 14,
  /** GET_LIFETIME requests. */
  LIFETIME: 15,
  /** SECURE_ERASE requests. */
  SECURE_ERASE: 16,
  /** Zoned block device. */
  ZONED: 17,
} as const;

/** `struct virtio_blk_config` (5.2.4); offsets in the device configuration. */
export const BlkConfig = {
  /** le64: capacity in 512-byte sectors. */
  CAPACITY: 0x00,
  /** le32: largest segment (SIZE_MAX). */
  SIZE_MAX: 0x08,
  /** le32: most segments per request (SEG_MAX). */
  SEG_MAX: 0x0c,
  /** le16 cylinders, u8 heads, u8 sectors (GEOMETRY). */
  GEOMETRY_CYLINDERS: 0x10,
  GEOMETRY_HEADS: 0x12,
  GEOMETRY_SECTORS: 0x13,
  /** le32: logical block size in bytes (BLK_SIZE). */
  BLK_SIZE: 0x14,
  /** u8: log2 of logical blocks per physical block (TOPOLOGY). */
  PHYSICAL_BLOCK_EXP: 0x18,
  /** u8: offset of the first aligned logical block (TOPOLOGY). */
  ALIGNMENT_OFFSET: 0x19,
  /** le16: suggested minimum I/O size in blocks (TOPOLOGY). */
  MIN_IO_SIZE: 0x1a,
  /** le32: optimal sustained I/O size in blocks (TOPOLOGY). */
  OPT_IO_SIZE: 0x1c,
  /** u8: 1 write-back cache, 0 write-through (CONFIG_WCE). */
  WRITEBACK: 0x20,
  /** le16: number of request queues (MQ). */
  NUM_QUEUES: 0x22,
  /** le32: most sectors in one discard segment (DISCARD). */
  MAX_DISCARD_SECTORS: 0x24,
  /** le32: most segments in one discard request (DISCARD). */
  MAX_DISCARD_SEG: 0x28,
  /** le32: discard alignment in sectors (DISCARD). */
  DISCARD_SECTOR_ALIGNMENT: 0x2c,
  /** le32: most sectors in one write-zeroes segment (WRITE_ZEROES). */
  MAX_WRITE_ZEROES_SECTORS: 0x30,
  /** le32: most segments in one write-zeroes request (WRITE_ZEROES). */
  MAX_WRITE_ZEROES_SEG: 0x34,
  /** u8: 1 if write zeroes with UNMAP may deallocate (WRITE_ZEROES). */
  WRITE_ZEROES_MAY_UNMAP: 0x38,
  /** le32: most sectors in one secure-erase segment (SECURE_ERASE). */
  MAX_SECURE_ERASE_SECTORS: 0x3c,
  /** le32: most segments in one secure-erase request (SECURE_ERASE). */
  MAX_SECURE_ERASE_SEG: 0x40,
  /** le32: secure erase alignment in sectors (SECURE_ERASE). */
  SECURE_ERASE_SECTOR_ALIGNMENT: 0x44,
  /** `struct virtio_blk_zoned_characteristics` (ZONED), 24 bytes. */
  ZONED: 0x48,
  /** Size of the structure in 1.2. */
  SIZE: 0x60,
} as const;

/** Request types (5.2.6): `virtio_blk_req.type`. */
export const BlkReqType = {
  /** Read `sector`.. into the device-writable data. */
  IN: 0,
  /** Write the device-readable data at `sector`. */
  OUT: 1,
  /** Make completed writes durable. */
  FLUSH: 4,
  /** Write the device ID string (at most {@link BLK_ID_BYTES}) into the data. */
  GET_ID: 8,
  /** Report `struct virtio_blk_lifetime` (LIFETIME). */
  GET_LIFETIME: 10,
  /** Discard the ranges in the data (DISCARD). */
  DISCARD: 11,
  /** Write zeroes over the ranges in the data (WRITE_ZEROES). */
  WRITE_ZEROES: 13,
  /** Securely erase the ranges in the data (SECURE_ERASE). */
  SECURE_ERASE: 14,
} as const;

/** The device-readable request header, `struct virtio_blk_req` up to the data (5.2.6). */
export const BlkReqHeader = {
  /** le32: {@link BlkReqType}. */
  TYPE: 0,
  /** le32: reserved. */
  RESERVED: 4,
  /** le64: first 512-byte sector (IN, OUT). */
  SECTOR: 8,
  SIZE: 16,
} as const;

/** The status byte, the last device-writable byte of a request (5.2.6). */
export const BlkStatus = {
  OK: 0,
  IOERR: 1,
  UNSUPP: 2,
} as const;

/** Sectors are always 512 bytes in the protocol, whatever `blk_size` says (5.2.6). */
export const BLK_SECTOR_SIZE = 512;
export const BLK_SECTOR_SHIFT = 9;
/** Bytes of the GET_ID answer (5.2.6): an ASCII ID, NUL-padded if shorter. */
export const BLK_ID_BYTES = 20;

/** `struct virtio_blk_discard_write_zeroes` (5.2.6): one range of DISCARD / WRITE_ZEROES. */
export const BlkDiscardWriteZeroes = {
  /** le64: first sector. */
  SECTOR: 0,
  /** le32: number of sectors. */
  NUM_SECTORS: 8,
  /** le32: {@link BlkDwzFlags}. */
  FLAGS: 12,
  SIZE: 16,
} as const;

/** `virtio_blk_discard_write_zeroes.flags` (5.2.6). */
export const BlkDwzFlags = {
  /** WRITE_ZEROES may deallocate; not allowed on DISCARD. */
  UNMAP: 1,
} as const;
