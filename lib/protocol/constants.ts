/**
 * Wire constants of the vfio-user protocol.
 *
 * Values follow the project's protocol reference (`shared/vfio-user-protocol.md`, Appendix A and
 * sections 1-5), which takes them from the spec, libvfio-user's `vfio-user.h` and Linux's
 * `linux/vfio.h`. Every table is a plain `as const` object (never a `const enum`: vitest and
 * esbuild transpile file by file). C names are given in comments so they can be grepped across
 * implementations.
 *
 * @packageDocumentation
 */

/** Size of the message header that starts every message (reference 1.4). */
export const HEADER_SIZE = 16;

/** Protocol version this implementation speaks (reference 3.1: major is always 0; we propose 0.2). */
export const ProtocolVersion = {
  MAJOR: 0,
  MINOR: 2,
} as const;

/** Command numbers, `enum vfio_user_command` (reference 2). 0 is unused; >= 19 are undefined. */
export const Command = {
  /** `VFIO_USER_VERSION`: first message, negotiates version and capabilities (3.1). */
  VERSION: 1,
  /** `VFIO_USER_DMA_MAP` (3.2). */
  DMA_MAP: 2,
  /** `VFIO_USER_DMA_UNMAP` (3.3). */
  DMA_UNMAP: 3,
  /** `VFIO_USER_DEVICE_GET_INFO` (3.4). */
  DEVICE_GET_INFO: 4,
  /** `VFIO_USER_DEVICE_GET_REGION_INFO` (3.5). */
  DEVICE_GET_REGION_INFO: 5,
  /** `VFIO_USER_DEVICE_GET_REGION_IO_FDS` (3.6). */
  DEVICE_GET_REGION_IO_FDS: 6,
  /** `VFIO_USER_DEVICE_GET_IRQ_INFO` (3.7). */
  DEVICE_GET_IRQ_INFO: 7,
  /** `VFIO_USER_DEVICE_SET_IRQS` (3.8). */
  DEVICE_SET_IRQS: 8,
  /** `VFIO_USER_REGION_READ` (3.9). */
  REGION_READ: 9,
  /** `VFIO_USER_REGION_WRITE` (3.10). */
  REGION_WRITE: 10,
  /** `VFIO_USER_DMA_READ`, server -> client (3.11). */
  DMA_READ: 11,
  /** `VFIO_USER_DMA_WRITE`, server -> client (3.12). */
  DMA_WRITE: 12,
  /** `VFIO_USER_DEVICE_RESET` (3.13). */
  DEVICE_RESET: 13,
  /** `VFIO_USER_DIRTY_PAGES`, legacy: spec 0.9.1 / libvfio-user 2022 only (3.14). */
  DIRTY_PAGES: 14,
  /** `VFIO_USER_REGION_WRITE_MULTI` (3.15). */
  REGION_WRITE_MULTI: 15,
  /** `VFIO_USER_DEVICE_FEATURE` (3.16). */
  DEVICE_FEATURE: 16,
  /** `VFIO_USER_MIG_DATA_READ` (3.17). */
  MIG_DATA_READ: 17,
  /** `VFIO_USER_MIG_DATA_WRITE` (3.18). */
  MIG_DATA_WRITE: 18,
} as const;

/** Name of a command, e.g. `'DMA_MAP'`. */
export type CommandName = keyof typeof Command;
/** Number of a defined command (1-18). */
export type CommandNumber = (typeof Command)[CommandName];

/** Largest defined command number. */
export const MAX_COMMAND = 18;

const COMMAND_NAMES: readonly (CommandName | undefined)[] = (() => {
  const names: (CommandName | undefined)[] = [];
  for (const name of Object.keys(Command) as CommandName[]) names[Command[name]] = name;
  return names;
})();

/**
 * Name of a command number, for logs and errors: `commandName(2) === 'DMA_MAP'`.
 * Undefined numbers give `'UNKNOWN(n)'`.
 */
export function commandName(command: number): string {
  const name = Number.isInteger(command) ? COMMAND_NAMES[command] : undefined;
  return name ?? `UNKNOWN(${String(command)})`;
}

/** True for the defined command numbers 1-18. */
export function isKnownCommand(command: number): command is CommandNumber {
  return Number.isInteger(command) && COMMAND_NAMES[command] !== undefined;
}

/** Which side sends a command (reference 1.9): the client, except `DMA_READ`/`DMA_WRITE`. */
export function commandSender(command: CommandNumber): 'client' | 'server' {
  return command === Command.DMA_READ || command === Command.DMA_WRITE ? 'server' : 'client';
}

/** Bits of the header's `flags` word (reference 1.4). */
export const HeaderFlags = {
  /** Bits 0-3: message type. */
  TYPE_MASK: 0x0f,
  /** Type 0: a command (request). */
  TYPE_COMMAND: 0x0,
  /** Type 1: a reply. */
  TYPE_REPLY: 0x1,
  /** `VFIO_USER_F_NO_REPLY`: in a command, the sender wants no reply at all (1.8). */
  NO_REPLY: 0x10,
  /** `VFIO_USER_F_ERROR`: in a reply, the command failed and `error` holds the errno. */
  ERROR: 0x20,
} as const;

/**
 * Default capability values, applied when a key is absent from `VERSION` (reference 1.12, 3.1).
 * `MAX_BITMAP_SIZE` is the legacy `migration.max_bitmap_size` default (QEMU: 256 MiB).
 */
export const Defaults = {
  MAX_MSG_FDS: 1,
  MAX_DATA_XFER_SIZE: 1048576,
  MAX_DMA_MAPS: 65535,
  PGSIZES: 4096,
  MAX_BITMAP_SIZE: 268435456,
} as const;

/** Limits of real peers and of the OS that the codecs and the negotiation use (reference 1.10-1.12). */
export const Limits = {
  /** An `error` value of 0 or above this in an error reply is read as `EINVAL` (LVU). */
  MAX_ERRNO: 4096,
  /** Linux accepts at most this many fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`). */
  SCM_MAX_FD: 253,
  /** Largest `max_msg_fds` the QEMU client accepts from a server. */
  QEMU_MAX_MSG_FDS: 16,
  /** Largest `max_data_xfer_size` the QEMU client accepts from a server (64 MiB). */
  QEMU_MAX_DATA_XFER_SIZE: 67108864,
  /** Largest client `max_msg_fds` libvfio-user accepts. */
  LVU_MAX_CLIENT_MSG_FDS: 1024,
  /** Smallest DMA page size: `pgsizes` and `migration.pgsize` must not have bits below it. */
  MIN_PGSIZE: 4096,
} as const;

/** `DEVICE_GET_INFO.flags` (reference 4.1). */
export const DeviceFlags = {
  /** `VFIO_DEVICE_FLAGS_RESET`: the device supports `DEVICE_RESET`. */
  RESET: 0x1,
  /** `VFIO_DEVICE_FLAGS_PCI`: a PCI device (the only kind vfio-user defines). */
  PCI: 0x2,
} as const;

/** PCI region indexes (reference 4.2). */
export const PciRegion = {
  BAR0: 0,
  BAR1: 1,
  BAR2: 2,
  BAR3: 3,
  BAR4: 4,
  BAR5: 5,
  /** Expansion ROM (read-only). */
  ROM: 6,
  /** Configuration space (256 or 4096 bytes). */
  CONFIG: 7,
  /** Legacy VGA ranges. */
  VGA: 8,
  /** `VFIO_PCI_NUM_REGIONS`: indexes >= 9 are device-specific and carry a `TYPE` capability. */
  NUM_FIXED: 9,
  /** libvfio-user 2022 only: the legacy v1 migration region (5.8). */
  LEGACY_MIGRATION: 9,
} as const;

/** `DEVICE_GET_REGION_INFO.flags` (reference 3.5, 4.3). */
export const RegionInfoFlags = {
  /** `VFIO_REGION_INFO_FLAG_READ` */
  READ: 0x1,
  /** `VFIO_REGION_INFO_FLAG_WRITE` */
  WRITE: 0x2,
  /** `VFIO_REGION_INFO_FLAG_MMAP`: (parts of) the region may be mapped from the reply's fd. */
  MMAP: 0x4,
  /** `VFIO_REGION_INFO_FLAG_CAPS`: a capability chain starts at `cap_offset`. */
  CAPS: 0x8,
} as const;

/** Region-info capability IDs (reference 3.5, 4.3). */
export const RegionCap = {
  /** `VFIO_REGION_INFO_CAP_SPARSE_MMAP`: mappable areas of the region. */
  SPARSE_MMAP: 1,
  /** `VFIO_REGION_INFO_CAP_TYPE`: type/subtype of a device-specific region. */
  TYPE: 2,
  /** `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`: kernel only, not used by vfio-user. */
  MSIX_MAPPABLE: 3,
} as const;

/** Region types for the `TYPE` capability (kernel numbering, reference 4.3). */
export const RegionType = {
  /** Bit 31 set: PCI vendor-specific type (low 16 bits = vendor ID). */
  PCI_VENDOR_TYPE: 0x80000000,
  GFX: 1,
  CCW: 2,
  /** Legacy v1 migration region (`..._MIGRATION_DEPRECATED`), subtype 1. */
  MIGRATION_V1: 3,
} as const;

/** Subtype of the legacy v1 migration region. */
export const RegionSubtypeMigrationV1 = 1;

/** Register layout of the legacy v1 migration region (reference 5.8). */
export const MigrationRegionV1 = {
  DEVICE_STATE: 0,
  PENDING_BYTES: 8,
  DATA_OFFSET: 16,
  DATA_SIZE: 24,
  /** Size of the register block. */
  SIZE: 32,
} as const;

/** PCI IRQ indexes (reference 4.4). */
export const PciIrq = {
  INTX: 0,
  MSI: 1,
  MSIX: 2,
  /** Error notification (TRIGGER only). */
  ERR: 3,
  /** Device asks for release (TRIGGER only). */
  REQ: 4,
  /** `VFIO_PCI_NUM_IRQS` */
  NUM: 5,
} as const;

/** `DEVICE_GET_IRQ_INFO.flags` (reference 3.7, 4.5). */
export const IrqInfoFlags = {
  EVENTFD: 0x1,
  MASKABLE: 0x2,
  AUTOMASKED: 0x4,
  NORESIZE: 0x8,
} as const;

/** `DEVICE_SET_IRQS.flags`: exactly one DATA bit and one ACTION bit (reference 3.8, 4.5). */
export const IrqSetFlags = {
  DATA_NONE: 0x01,
  DATA_BOOL: 0x02,
  DATA_EVENTFD: 0x04,
  ACTION_MASK: 0x08,
  ACTION_UNMASK: 0x10,
  ACTION_TRIGGER: 0x20,
  DATA_TYPE_MASK: 0x07,
  ACTION_TYPE_MASK: 0x38,
} as const;

/** `DMA_MAP.flags` (reference 3.2). Bits 2 and 3 are libvfio-user 2026 only; never send them. */
export const DmaMapFlags = {
  /** `VFIO_USER_F_DMA_REGION_READ` */
  READ: 0x1,
  /** `VFIO_USER_F_DMA_REGION_WRITE` */
  WRITE: 0x2,
  /** LVU 2026: the fd must be accessed with mmap. */
  MMAP: 0x4,
  /** LVU 2026: the fd must be accessed with pread/pwrite. */
  FILE_IO: 0x8,
} as const;

/** `DMA_UNMAP.flags` (reference 3.3). */
export const DmaUnmapFlags = {
  /** Legacy (migration v1): return the dirty bitmap of the range. */
  GET_DIRTY_BITMAP: 0x1,
  /** Unmap every mapping; `address` and `size` must be 0. */
  ALL: 0x2,
} as const;

/** `DIRTY_PAGES.flags`, legacy (reference 3.14): exactly one per request. */
export const DirtyPagesFlags = {
  START: 0x1,
  STOP: 0x2,
  GET_BITMAP: 0x4,
} as const;

/** `DEVICE_FEATURE.flags`: feature index in bits 0-15 plus operation bits (reference 3.16). */
export const DeviceFeature = {
  INDEX_MASK: 0xffff,
  GET: 0x10000,
  SET: 0x20000,
  PROBE: 0x40000,
  /** `VFIO_DEVICE_FEATURE_MIGRATION`: GET returns `u64 flags`. */
  MIGRATION: 1,
  /** `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: `u32 device_state`, `u32 data_fd`. */
  MIG_DEVICE_STATE: 2,
  /** `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` */
  DMA_LOGGING_START: 6,
  /** `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` */
  DMA_LOGGING_STOP: 7,
  /** `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` */
  DMA_LOGGING_REPORT: 8,
} as const;

/** Flags returned by the `MIGRATION` feature (reference 3.16). */
export const MigrationFlags = {
  STOP_COPY: 0x1,
  P2P: 0x2,
  PRE_COPY: 0x4,
} as const;

/** Migration v2 device states (reference 5.2). */
export const MigState = {
  ERROR: 0,
  STOP: 1,
  RUNNING: 2,
  STOP_COPY: 3,
  RESUMING: 4,
  RUNNING_P2P: 5,
  PRE_COPY: 6,
  PRE_COPY_P2P: 7,
} as const;

/** Legacy v1 `device_state` register bits (reference 5.8). */
export const MigStateV1Bits = {
  RUNNING: 0x1,
  SAVING: 0x2,
  RESUMING: 0x4,
} as const;

/** Sub-region types of `DEVICE_GET_REGION_IO_FDS` (reference 3.6). */
export const IoFdType = {
  IOEVENTFD: 0,
  IOREGIONFD: 1,
  /** libvfio-user only (48-byte entries). */
  IOEVENTFD_SHADOW: 2,
} as const;

/** KVM ioeventfd flags carried in ioeventfd sub-regions (reference 3.6). */
export const KvmIoeventfdFlags = {
  DATAMATCH: 0x1,
  PIO: 0x2,
  VIRTIO_CCW_NOTIFY: 0x8,
} as const;

/** Proposed KVM ioregionfd flags (never merged; reference 3.6). */
export const KvmIoregionFlags = {
  PIO: 0x1,
  POSTED_WRITES: 0x2,
} as const;

/** Linux errno values used by vfio-user (reference 1.10). */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  E2BIG: 7,
  EAGAIN: 11,
  ENOMEM: 12,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EINVAL: 22,
  ENOTTY: 25,
  ENOSPC: 28,
  ENOSYS: 38,
  ENOMSG: 42,
  EPROTO: 71,
  ENOTSUP: 95,
  ECONNRESET: 104,
  ENOTCONN: 107,
  ETIMEDOUT: 110,
} as const;

/** Name of an errno value in {@link Errno}. */
export type ErrnoName = keyof typeof Errno;

const ERRNO_NAMES = new Map<number, ErrnoName>(
  (Object.keys(Errno) as ErrnoName[]).map((name) => [Errno[name], name]),
);

/** Name of an errno value, e.g. `errnoName(22) === 'EINVAL'`; unknown values give `'E<n>'`. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES.get(errno) ?? `E${String(errno)}`;
}

/** Fixed payload sizes, bytes after the header (reference Appendix A). */
export const PayloadSize = {
  VERSION_FIXED: 4,
  DMA_MAP: 32,
  DMA_UNMAP: 24,
  /** `bitmap.pgsize` u64 + `bitmap.size` u64. */
  BITMAP_HEADER: 16,
  DEVICE_INFO: 16,
  REGION_INFO: 32,
  CAP_HEADER: 8,
  /** Header + `nr_areas` + `reserved`. */
  CAP_SPARSE_FIXED: 16,
  SPARSE_AREA: 16,
  CAP_TYPE: 16,
  REGION_IO_FDS_FIXED: 16,
  IO_FD_ENTRY_SPEC: 40,
  IO_FD_ENTRY_LVU: 48,
  IRQ_INFO: 16,
  IRQ_SET_FIXED: 20,
  REGION_ACCESS_FIXED: 16,
  DMA_ACCESS_FIXED: 16,
  /** The QEMU client's DMA_READ/DMA_WRITE layout: `u64 address`, `u32 count` (reference 3.11). */
  DMA_ACCESS_FIXED_QEMU: 12,
  WRITE_MULTI_FIXED: 8,
  WRITE_MULTI_ENTRY: 24,
  FEATURE_FIXED: 8,
  MIG_DATA_FIXED: 8,
  /** Legacy `DIRTY_PAGES`: `argsz` + `flags`. */
  DIRTY_PAGES_FIXED: 8,
  /** Legacy `DIRTY_PAGES`: `iova`, `size`, `bitmap.pgsize`, `bitmap.size` (LVU-2022 layout). */
  BITMAP_RANGE: 32,
  DMA_LOGGING_CONTROL_FIXED: 16,
  DMA_LOGGING_RANGE: 16,
  DMA_LOGGING_REPORT_FIXED: 24,
} as const;
