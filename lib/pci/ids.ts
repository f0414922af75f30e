/**
 * Named PCI constants: type-0 configuration header offsets, COMMAND and STATUS bits, BAR bits,
 * capability IDs, class codes and a few vendor IDs.
 *
 * Names follow Linux's `include/uapi/linux/pci_regs.h` without the `PCI_` prefix (grep for
 * `PCI_COMMAND_MASTER` to find {@link Command}.MASTER); values are those of the PCI Local Bus
 * 3.0 and PCI Express Base specifications. Tables are `as const` objects, never `const enum`s,
 * because vitest and esbuild compile file by file.
 *
 * Registers inside a capability (PMCSR, MSI control, ...) are named in that capability's module.
 *
 * @packageDocumentation
 */

/** Size of conventional PCI configuration space. */
export const CONFIG_SPACE_SIZE = 256;
/** Size of PCI Express (extended) configuration space. */
export const EXPRESS_CONFIG_SPACE_SIZE = 4096;
/** First byte after the type-0 header: where capabilities may start. */
export const CAPABILITY_AREA_START = 0x40;
/** Where the first extended capability header must be (PCIe only). */
export const EXTENDED_CAPABILITY_START = 0x100;

/** Offsets of the type-0 configuration header (`PCI_VENDOR_ID` ...). */
export const Cfg = {
  /** u16: vendor ID, read-only. */
  VENDOR_ID: 0x00,
  /** u16: device ID, read-only. */
  DEVICE_ID: 0x02,
  /** u16: COMMAND register, see {@link Command}. */
  COMMAND: 0x04,
  /** u16: STATUS register, see {@link Status}. */
  STATUS: 0x06,
  /** u8: revision ID. */
  REVISION_ID: 0x08,
  /** u8: programming interface, the low byte of the 24-bit class code. */
  CLASS_PROG: 0x09,
  /** u16: sub-class (low byte) and base class (high byte). */
  CLASS_DEVICE: 0x0a,
  /** u8: cache line size in dwords; writable, no effect on PCIe. */
  CACHE_LINE_SIZE: 0x0c,
  /** u8: latency timer; hardwired to 0 on PCIe. */
  LATENCY_TIMER: 0x0d,
  /** u8: header layout (bits 6:0) and multi-function flag (bit 7), see {@link HeaderType}. */
  HEADER_TYPE: 0x0e,
  /** u8: built-in self test; 0 = not supported. */
  BIST: 0x0f,
  /** u32: BAR 0. */
  BASE_ADDRESS_0: 0x10,
  /** u32: BAR 1. */
  BASE_ADDRESS_1: 0x14,
  /** u32: BAR 2. */
  BASE_ADDRESS_2: 0x18,
  /** u32: BAR 3. */
  BASE_ADDRESS_3: 0x1c,
  /** u32: BAR 4. */
  BASE_ADDRESS_4: 0x20,
  /** u32: BAR 5. */
  BASE_ADDRESS_5: 0x24,
  /** u32: CardBus CIS pointer; unused, reads 0. */
  CARDBUS_CIS: 0x28,
  /** u16: subsystem vendor ID. */
  SUBSYSTEM_VENDOR_ID: 0x2c,
  /** u16: subsystem ID. */
  SUBSYSTEM_ID: 0x2e,
  /** u32: expansion ROM BAR, see {@link Rom}. */
  ROM_ADDRESS: 0x30,
  /** u8: offset of the first capability (valid when STATUS.CAP_LIST is set). */
  CAPABILITY_LIST: 0x34,
  /** u8: interrupt line; scratch register written by firmware. */
  INTERRUPT_LINE: 0x3c,
  /** u8: interrupt pin, 0 = none, 1..4 = INTA#..INTD#. */
  INTERRUPT_PIN: 0x3d,
  /** u8: minimum grant; hardwired to 0 on PCIe. */
  MIN_GNT: 0x3e,
  /** u8: maximum latency; hardwired to 0 on PCIe. */
  MAX_LAT: 0x3f,
} as const;

/** Offset of BAR `index` (0..5). */
export function barOffset(index: number): number {
  return Cfg.BASE_ADDRESS_0 + 4 * index;
}

/** Bits of the COMMAND register (`PCI_COMMAND_*`). */
export const Command = {
  /** Respond to I/O space accesses. */
  IO: 0x0001,
  /** Respond to memory space accesses. */
  MEMORY: 0x0002,
  /** Bus master: may issue DMA and MSI/MSI-X writes. */
  MASTER: 0x0004,
  /** Special cycles; hardwired to 0 here. */
  SPECIAL: 0x0008,
  /** Memory write and invalidate; hardwired to 0 here. */
  INVALIDATE: 0x0010,
  /** VGA palette snoop; hardwired to 0 here. */
  VGA_PALETTE: 0x0020,
  /** Parity error response. */
  PARITY: 0x0040,
  /** Address/data stepping; hardwired to 0. */
  WAIT: 0x0080,
  /** SERR# enable. */
  SERR: 0x0100,
  /** Fast back-to-back enable; hardwired to 0 here. */
  FAST_BACK: 0x0200,
  /** INTx emulation disable: the function must not assert INTx. */
  INTX_DISABLE: 0x0400,
} as const;

/** Bits of the STATUS register (`PCI_STATUS_*`). The error bits are write-1-to-clear. */
export const Status = {
  /** Immediate readiness (PCIe). */
  IMM_READY: 0x0001,
  /** INTx status: the function's INTx line is asserted (read-only). */
  INTERRUPT: 0x0008,
  /** A capability list is present at CAPABILITY_LIST (read-only). */
  CAP_LIST: 0x0010,
  /** 66 MHz capable (conventional only). */
  MHZ_66: 0x0020,
  /** Fast back-to-back capable (conventional only). */
  FAST_BACK: 0x0080,
  /** Master data parity error (W1C). */
  PARITY: 0x0100,
  /** DEVSEL timing (conventional only). */
  DEVSEL_MASK: 0x0600,
  /** Signaled target abort (W1C). */
  SIG_TARGET_ABORT: 0x0800,
  /** Received target abort (W1C). */
  REC_TARGET_ABORT: 0x1000,
  /** Received master abort (W1C). */
  REC_MASTER_ABORT: 0x2000,
  /** Signaled system error (W1C). */
  SIG_SYSTEM_ERROR: 0x4000,
  /** Detected parity error (W1C). */
  DETECTED_PARITY: 0x8000,
} as const;

/** All write-1-to-clear bits of STATUS. */
export const STATUS_W1C_BITS =
  Status.PARITY |
  Status.SIG_TARGET_ABORT |
  Status.REC_TARGET_ABORT |
  Status.REC_MASTER_ABORT |
  Status.SIG_SYSTEM_ERROR |
  Status.DETECTED_PARITY;

/** HEADER_TYPE values (`PCI_HEADER_TYPE_*`). */
export const HeaderType = {
  /** Type 0: an endpoint function (the only layout this module builds). */
  NORMAL: 0x00,
  /** Type 1: PCI-to-PCI bridge. */
  BRIDGE: 0x01,
  /** Bit 7: the device has more than one function. */
  MULTI_FUNCTION: 0x80,
} as const;

/** Low bits of a BAR register (`PCI_BASE_ADDRESS_*`). */
export const Bar = {
  /** Bit 0: 1 = I/O space BAR, 0 = memory BAR. */
  SPACE_IO: 0x01,
  /** Memory BAR bits 2:1 = 00: 32-bit, anywhere below 4 GiB. */
  MEM_TYPE_32: 0x00,
  /** Memory BAR bits 2:1 = 10: 64-bit, uses this and the next register. */
  MEM_TYPE_64: 0x04,
  /** Memory BAR bit 3: prefetchable. */
  MEM_PREFETCH: 0x08,
  /** Address bits of a memory BAR. */
  MEM_MASK: 0xfffffff0,
  /** Address bits of an I/O BAR. */
  IO_MASK: 0xfffffffc,
} as const;

/** Bits of the expansion ROM BAR (`PCI_ROM_ADDRESS_*`). */
export const Rom = {
  /** Bit 0: decode the ROM (also needs COMMAND.MEMORY). */
  ENABLE: 0x00000001,
  /** Address bits 31:11; a ROM is at least 2 KiB. */
  ADDRESS_MASK: 0xfffff800,
} as const;

/** Capability IDs of the standard list (`PCI_CAP_ID_*`). */
export const CapId = {
  /** Power Management. */
  PM: 0x01,
  /** Accelerated Graphics Port. */
  AGP: 0x02,
  /** Vital Product Data. */
  VPD: 0x03,
  /** Slot identification. */
  SLOTID: 0x04,
  /** Message Signalled Interrupts. */
  MSI: 0x05,
  /** CompactPCI hot swap. */
  CHSWP: 0x06,
  /** PCI-X. */
  PCIX: 0x07,
  /** HyperTransport. */
  HT: 0x08,
  /** Vendor-specific; byte 2 is the capability's length. */
  VNDR: 0x09,
  /** Debug port. */
  DBG: 0x0a,
  /** CompactPCI central resource control. */
  CCRC: 0x0b,
  /** PCI standard hot-plug controller. */
  SHPC: 0x0c,
  /** Bridge subsystem vendor/device ID. */
  SSVID: 0x0d,
  /** AGP target PCI-PCI bridge. */
  AGP3: 0x0e,
  /** Secure device. */
  SECDEV: 0x0f,
  /** PCI Express. */
  EXP: 0x10,
  /** MSI-X. */
  MSIX: 0x11,
  /** SATA data/index configuration. */
  SATA: 0x12,
  /** PCI Advanced Features. */
  AF: 0x13,
  /** Enhanced Allocation. */
  EA: 0x14,
} as const;

/** Extended capability IDs, in the 32-bit headers from 0x100 (`PCI_EXT_CAP_ID_*`). */
export const ExtCapId = {
  /** Advanced Error Reporting. */
  ERR: 0x0001,
  /** Virtual Channel (when MFVC is absent). */
  VC: 0x0002,
  /** Device Serial Number. */
  DSN: 0x0003,
  /** Power budgeting. */
  PWR: 0x0004,
  /** Root complex link declaration. */
  RCLD: 0x0005,
  /** Root complex internal link control. */
  RCILC: 0x0006,
  /** Root complex event collector endpoint association. */
  RCEC: 0x0007,
  /** Multi-function virtual channel. */
  MFVC: 0x0008,
  /** Virtual Channel (when MFVC is present). */
  VC9: 0x0009,
  /** Root complex register block. */
  RCRB: 0x000a,
  /** Vendor-specific extended capability. */
  VNDR: 0x000b,
  /** Access Control Services. */
  ACS: 0x000d,
  /** Alternative Routing-ID Interpretation. */
  ARI: 0x000e,
  /** Address Translation Services. */
  ATS: 0x000f,
  /** Single Root I/O Virtualization. */
  SRIOV: 0x0010,
  /** Multi-Root I/O Virtualization. */
  MRIOV: 0x0011,
  /** Multicast. */
  MCAST: 0x0012,
  /** Page Request Interface. */
  PRI: 0x0013,
  /** Resizable BAR. */
  REBAR: 0x0015,
  /** Dynamic Power Allocation. */
  DPA: 0x0016,
  /** TPH requester. */
  TPH: 0x0017,
  /** Latency Tolerance Reporting. */
  LTR: 0x0018,
  /** Secondary PCI Express (gen3 equalisation). */
  SECPCI: 0x0019,
  /** Process Address Space ID. */
  PASID: 0x001b,
  /** Downstream port containment. */
  DPC: 0x001d,
  /** L1 PM substates. */
  L1SS: 0x001e,
  /** Precision time measurement. */
  PTM: 0x001f,
  /** Designated vendor-specific. */
  DVSEC: 0x0023,
  /** Data link feature. */
  DLF: 0x0025,
  /** Physical layer 16 GT/s. */
  PL_16GT: 0x0026,
} as const;

/** 24-bit class codes: base class << 16 | sub-class << 8 | programming interface. */
export const ClassCode = {
  /** Unclassified, non-VGA device. */
  UNCLASSIFIED: 0x000000,
  /** Mass storage: SCSI. */
  STORAGE_SCSI: 0x010000,
  /** Mass storage: SATA, AHCI 1.0 interface. */
  STORAGE_SATA_AHCI: 0x010601,
  /** Mass storage: non-volatile memory, NVM Express I/O controller. */
  STORAGE_NVME: 0x010802,
  /** Mass storage: other. */
  STORAGE_OTHER: 0x018000,
  /** Network: Ethernet. */
  NETWORK_ETHERNET: 0x020000,
  /** Display: VGA-compatible. */
  DISPLAY_VGA: 0x030000,
  /** Memory controller: RAM. */
  MEMORY_RAM: 0x050000,
  /** Bridge: host bridge. */
  BRIDGE_HOST: 0x060000,
  /** System peripheral: other. */
  SYSTEM_OTHER: 0x088000,
  /** Serial bus: USB xHCI. */
  SERIAL_USB_XHCI: 0x0c0330,
  /** Unassigned class (vendor defined use). */
  OTHER: 0xff0000,
} as const;

/** Some vendor IDs (`PCI_VENDOR_ID_*`). */
export const VendorId = {
  /** Intel. */
  INTEL: 0x8086,
  /** Red Hat: QEMU's emulated devices. */
  REDHAT: 0x1b36,
  /** Red Hat (Qumranet): virtio devices. */
  REDHAT_QUMRANET: 0x1af4,
  /** Nutanix: libvfio-user's samples. */
  NUTANIX: 0x4e58,
  /** What a read of an absent function returns; never a real vendor. */
  INVALID: 0xffff,
} as const;
