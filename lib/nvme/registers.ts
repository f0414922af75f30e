/**
 * The controller registers in BAR0 (NVM Express Base Specification 1.4, section 3.1): offsets, bit
 * fields and the doorbell formula, as both a controller model and a host driver read them. What a
 * particular controller chooses (its CAP values, doorbell stride, BAR size) is not here.
 *
 * 64-bit registers (CAP, ASQ, ACQ, ...) are given as the offset of their low dword; the high dword
 * follows at + 4.
 *
 * @packageDocumentation
 */

/** Register offsets in BAR0 (`NVME_REG_*`). */
export const Reg = {
  /** u64: Controller Capabilities (read-only). */
  CAP: 0x00,
  /** u32: Version (read-only). */
  VS: 0x08,
  /** u32: Interrupt Mask Set (write 1 to mask; pin-based and single-MSI only). */
  INTMS: 0x0c,
  /** u32: Interrupt Mask Clear (write 1 to unmask). */
  INTMC: 0x10,
  /** u32: Controller Configuration. */
  CC: 0x14,
  /** u32: Controller Status (read-only). */
  CSTS: 0x1c,
  /** u32: NVM Subsystem Reset (not supported: CAP.NSSRS = 0, reads 0). */
  NSSR: 0x20,
  /** u32: Admin Queue Attributes. */
  AQA: 0x24,
  /** u64: Admin Submission Queue base address. */
  ASQ: 0x28,
  /** u64: Admin Completion Queue base address. */
  ACQ: 0x30,
  /** u32: Controller Memory Buffer Location (no CMB: 0). */
  CMBLOC: 0x38,
  /** u32: Controller Memory Buffer Size (no CMB: 0). */
  CMBSZ: 0x3c,
  /** u32: Boot Partition Information (none: 0). */
  BPINFO: 0x40,
  /** u32: Boot Partition Read Select. */
  BPRSEL: 0x44,
  /** u64: Boot Partition Memory Buffer Location. */
  BPMBL: 0x48,
  /** u64: Controller Memory Buffer Memory Space Control. */
  CMBMSC: 0x50,
  /** u32: Controller Memory Buffer Status. */
  CMBSTS: 0x58,
  /** u32: Persistent Memory Region Capabilities (no PMR: 0). */
  PMRCAP: 0xe00,
} as const;

/** Start of the doorbell registers in BAR0. */
export const DOORBELL_OFFSET = 0x1000;
/** Doorbell stride of CAP.DSTRD = 0, the smallest: doorbells `4 << DSTRD` bytes apart. */
export const MIN_DOORBELL_STRIDE = 4;

/** Offset in BAR0 of the Submission Queue `qid` Tail Doorbell, for a doorbell stride in bytes. */
export function sqTailDoorbell(qid: number, stride = MIN_DOORBELL_STRIDE): number {
  return DOORBELL_OFFSET + 2 * qid * stride;
}

/** Offset in BAR0 of the Completion Queue `qid` Head Doorbell, for a doorbell stride in bytes. */
export function cqHeadDoorbell(qid: number, stride = MIN_DOORBELL_STRIDE): number {
  return DOORBELL_OFFSET + (2 * qid + 1) * stride;
}

/**
 * CAP, low dword (bits 31:0). MQES is 0's based; TO is in 500 ms units.
 */
export const CapLo = {
  /** Maximum Queue Entries Supported, 0's based (bits 15:0). */
  MQES_MASK: 0xffff,
  /** Contiguous Queues Required (bit 16). */
  CQR: 1 << 16,
  /** Arbitration Mechanism Supported (bits 18:17): weighted round robin, vendor specific. */
  AMS_WRR: 1 << 17,
  /** Timeout, in 500 ms units (bits 31:24): worst case time to set CSTS.RDY after CC.EN changes. */
  TO_SHIFT: 24,
} as const;

/** CAP, high dword (bits 63:32), field positions relative to bit 32. */
export const CapHi = {
  /** Doorbell Stride (bits 35:32). */
  DSTRD_SHIFT: 0,
  /** NVM Subsystem Reset Supported (bit 36). */
  NSSRS: 1 << 4,
  /** Command Sets Supported (bits 44:37); bit 37 = NVM command set. */
  CSS_NVM: 1 << 5,
  /** CSS bit 43: one or more I/O command sets (Identify CNS 1Ch). Not set here. */
  CSS_IOCS: 1 << 11,
  /** CSS bit 44: no I/O command set (admin only). */
  CSS_ADMIN_ONLY: 1 << 12,
  /** Boot Partition Support (bit 45). */
  BPS: 1 << 13,
  /** Memory Page Size Minimum (bits 51:48): 2 ^ (12 + MPSMIN). */
  MPSMIN_SHIFT: 16,
  /** Memory Page Size Maximum (bits 55:52): 2 ^ (12 + MPSMAX). */
  MPSMAX_SHIFT: 20,
  /** Persistent Memory Region Supported (bit 56). */
  PMRS: 1 << 24,
  /** Controller Memory Buffer Supported (bit 57). */
  CMBS: 1 << 25,
} as const;

/** Controller Configuration (CC) fields. */
export const Cc = {
  /** Enable (bit 0). */
  EN: 1 << 0,
  /** I/O Command Set Selected (bits 6:4): 000b = NVM, 111b = admin only. */
  CSS_SHIFT: 4,
  CSS_MASK: 0x7 << 4,
  /** Memory Page Size (bits 10:7): 2 ^ (12 + MPS). */
  MPS_SHIFT: 7,
  MPS_MASK: 0xf << 7,
  /** Arbitration Mechanism Selected (bits 13:11): 000b = round robin. */
  AMS_SHIFT: 11,
  AMS_MASK: 0x7 << 11,
  /** Shutdown Notification (bits 15:14): 01b normal, 10b abrupt. */
  SHN_SHIFT: 14,
  SHN_MASK: 0x3 << 14,
  /** I/O Submission Queue Entry Size (bits 19:16): 2 ^ n bytes; 6 = 64 bytes. */
  IOSQES_SHIFT: 16,
  IOSQES_MASK: 0xf << 16,
  /** I/O Completion Queue Entry Size (bits 23:20): 2 ^ n bytes; 4 = 16 bytes. */
  IOCQES_SHIFT: 20,
  IOCQES_MASK: 0xf << 20,
} as const;

/** The bits of CC a host may set (bits 31:24 and 3:1 are reserved). */
export const CC_WRITABLE = Cc.EN | Cc.CSS_MASK | Cc.MPS_MASK | Cc.AMS_MASK | Cc.SHN_MASK | Cc.IOSQES_MASK | Cc.IOCQES_MASK;

/** CC.SHN values. */
export const Shn = {
  NONE: 0,
  NORMAL: 1,
  ABRUPT: 2,
} as const;

/** Controller Status (CSTS) fields. */
export const Csts = {
  /** Ready (bit 0). */
  RDY: 1 << 0,
  /** Controller Fatal Status (bit 1). */
  CFS: 1 << 1,
  /** Shutdown Status (bits 3:2). */
  SHST_SHIFT: 2,
  SHST_MASK: 0x3 << 2,
  /** NVM Subsystem Reset Occurred (bit 4). */
  NSSRO: 1 << 4,
  /** Processing Paused (bit 5). */
  PP: 1 << 5,
} as const;

/** CSTS.SHST values. */
export const Shst = {
  NORMAL: 0,
  OCCURRING: 1,
  COMPLETE: 2,
} as const;

/** Admin Queue Attributes (AQA) fields; both sizes are 0's based. */
export const Aqa = {
  /** Admin Submission Queue Size (bits 11:0). */
  ASQS_MASK: 0xfff,
  /** Admin Completion Queue Size (bits 27:16). */
  ACQS_SHIFT: 16,
  ACQS_MASK: 0xfff << 16,
} as const;

/** Writable bits of AQA. */
export const AQA_WRITABLE = Aqa.ASQS_MASK | Aqa.ACQS_MASK;

/** ASQ/ACQ: bits 11:0 are reserved (the queues are 4 KiB aligned). */
export const ADMIN_QUEUE_BASE_MASK_LO = 0xfffff000;

/** Version: major in bits 31:16, minor in 15:8, tertiary in 7:0. */
export function version(major: number, minor: number, tertiary = 0): number {
  return ((major << 16) | (minor << 8) | tertiary) >>> 0;
}

/** Page size selected by a CC value, in bytes. */
export function ccPageSize(cc: number): number {
  return 1 << (12 + ((cc & Cc.MPS_MASK) >>> Cc.MPS_SHIFT));
}

/** CC.SHN of a CC value. */
export function ccShutdown(cc: number): number {
  return (cc & Cc.SHN_MASK) >>> Cc.SHN_SHIFT;
}
