/**
 * NVMe data structures as byte layouts: the submission and completion queue entries, the Identify
 * data structures (controller, namespace, active namespace list, namespace identification
 * descriptors, the NVM command set specific and command set independent ones) and the log pages
 * Error Information, SMART / Health Information and Firmware Slot.
 *
 * Offsets follow NVM Express Base Specification 1.4 (and 2.0 for CNS 06h/08h), little-endian,
 * named after the fields in Linux's `struct nvme_id_ctrl`, `struct nvme_id_ns`, ...
 *
 * @packageDocumentation
 */

/** Queue entry sizes (log2) of the NVM command set, as CC.IOSQES/IOCQES and Identify SQES/CQES give them: 64 and 16 bytes. */
export const SQES = 6;
export const CQES = 4;

/** Submission Queue Entry (64 bytes) field offsets. */
export const Sqe = {
  /** u8 opcode; bits 9:8 FUSE and 15:14 PSDT in the byte above; CID in bytes 3:2. */
  OPC: 0,
  /** u8: FUSE (bits 1:0) and PSDT (bits 7:6). */
  FLAGS: 1,
  /** u16 command identifier. */
  CID: 2,
  /** u32 namespace identifier. */
  NSID: 4,
  /** u32 command dword 2 and 3 (command specific). */
  CDW2: 8,
  CDW3: 12,
  /** u64 metadata pointer. */
  MPTR: 16,
  /** u64 PRP entry 1 (or SGL first 8 bytes). */
  PRP1: 24,
  /** u64 PRP entry 2. */
  PRP2: 32,
  CDW10: 40,
  CDW11: 44,
  CDW12: 48,
  CDW13: 52,
  CDW14: 56,
  CDW15: 60,
  SIZE: 1 << SQES,
} as const;

/** FUSE bits in Sqe.FLAGS. */
export const SQE_FUSE_MASK = 0x03;
/** PSDT bits in Sqe.FLAGS (00b = PRPs). */
export const SQE_PSDT_MASK = 0xc0;

/** Completion Queue Entry (16 bytes) field offsets. */
export const Cqe = {
  /** u32 command specific result. */
  DW0: 0,
  /** u32 reserved / command specific. */
  DW1: 4,
  /** u16 SQ head pointer. */
  SQHD: 8,
  /** u16 SQ identifier. */
  SQID: 10,
  /** u16 command identifier. */
  CID: 12,
  /** u16 phase tag (bit 0) and status field (bits 15:1). */
  STATUS: 14,
  SIZE: 1 << CQES,
} as const;

/** Size of every Identify data structure. */
export const IDENTIFY_SIZE = 4096;

/** Identify Controller (CNS 01h) field offsets. */
export const IdCtrl = {
  VID: 0,
  SSVID: 2,
  SN: 4, // char[20]
  MN: 24, // char[40]
  FR: 64, // char[8]
  RAB: 72,
  IEEE: 73, // u8[3]
  CMIC: 76,
  MDTS: 77,
  CNTLID: 78,
  VER: 80,
  RTD3R: 84,
  RTD3E: 88,
  OAES: 92,
  CTRATT: 96,
  RRLS: 100,
  CNTRLTYPE: 111,
  FGUID: 112, // u8[16]
  CRDT1: 128,
  OACS: 256,
  ACL: 258,
  AERL: 259,
  FRMW: 260,
  LPA: 261,
  ELPE: 262,
  NPSS: 263,
  AVSCC: 264,
  APSTA: 265,
  WCTEMP: 266,
  CCTEMP: 268,
  MTFA: 270,
  HMPRE: 272,
  HMMIN: 276,
  TNVMCAP: 280, // u128
  UNVMCAP: 296, // u128
  RPMBS: 312,
  EDSTT: 316,
  DSTO: 318,
  FWUG: 319,
  KAS: 320,
  HCTMA: 322,
  MNTMT: 324,
  MXTMT: 326,
  SANICAP: 328,
  SQES: 512,
  CQES: 513,
  MAXCMD: 514,
  NN: 516,
  ONCS: 520,
  FUSES: 522,
  FNA: 524,
  VWC: 525,
  AWUN: 526,
  AWUPF: 528,
  NVSCC: 530,
  NWPC: 531,
  ACWU: 532,
  SGLS: 536,
  MNAN: 540,
  SUBNQN: 768, // char[256]
  PSD0: 2048, // 32 bytes per power state descriptor
} as const;

/** Power State Descriptor field offsets (inside a 32-byte descriptor). */
export const Psd = {
  /** u16 maximum power, in centiwatts (or 0.0001 W with MXPS). */
  MP: 0,
  /** u8: MXPS (bit 0), NOPS (bit 1). */
  FLAGS: 3,
  ENLAT: 4,
  EXLAT: 8,
  RRT: 12,
  RRL: 13,
  RWT: 14,
  RWL: 15,
} as const;

/** Optional Admin Command Support (OACS) bits. */
export const Oacs = {
  SECURITY: 1 << 0,
  FORMAT: 1 << 1,
  FW_DOWNLOAD: 1 << 2,
  NS_MGMT: 1 << 3,
  SELF_TEST: 1 << 4,
  DIRECTIVES: 1 << 5,
  NVME_MI: 1 << 6,
  VIRT_MGMT: 1 << 7,
  DBBUF: 1 << 8,
} as const;

/** Optional NVM Command Support (ONCS) bits. */
export const Oncs = {
  COMPARE: 1 << 0,
  WRITE_UNCOR: 1 << 1,
  DSM: 1 << 2,
  WRITE_ZEROES: 1 << 3,
  SAVE_SELECT: 1 << 4,
  RESERVATIONS: 1 << 5,
  TIMESTAMP: 1 << 6,
  VERIFY: 1 << 7,
} as const;

/** Log Page Attributes (LPA) bits. */
export const Lpa = {
  SMART_PER_NS: 1 << 0,
  CMD_EFFECTS: 1 << 1,
  EXTENDED: 1 << 2,
} as const;

/** Volatile Write Cache (VWC) field: present (bit 0), Flush with NSID FFFFFFFFh supported (bits 2:1 = 11b). */
export const VWC_PRESENT = 0x1;
export const VWC_FLUSH_BROADCAST = 0x6;

/** Identify Namespace (CNS 00h) field offsets. */
export const IdNs = {
  NSZE: 0, // u64
  NCAP: 8, // u64
  NUSE: 16, // u64
  NSFEAT: 24,
  NLBAF: 25,
  FLBAS: 26,
  MC: 27,
  DPC: 28,
  DPS: 29,
  NMIC: 30,
  RESCAP: 31,
  FPI: 32,
  DLFEAT: 33,
  NAWUN: 34,
  NAWUPF: 36,
  NACWU: 38,
  NABSN: 40,
  NABO: 42,
  NABSPF: 44,
  NOIOB: 46,
  NVMCAP: 48, // u128
  NPWG: 64,
  NPWA: 66,
  NPDG: 68,
  NPDA: 70,
  NOWS: 72,
  ANAGRPID: 92,
  NSATTR: 99,
  NVMSETID: 100,
  ENDGID: 102,
  NGUID: 104, // u8[16]
  EUI64: 120, // u8[8]
  LBAF0: 128, // 4 bytes each: MS u16, LBADS u8, RP u8
} as const;

/** NSFEAT bits. */
export const Nsfeat = {
  THIN: 1 << 0,
  NAWUN_ETC: 1 << 1,
  DAE: 1 << 2,
  UIDREUSE: 1 << 3,
  OPTPERF: 1 << 4,
} as const;

/** DLFEAT: bits 2:0 say what a deallocated block reads as (001b = zeroes); bit 3: Write Zeroes DEAC supported. */
export const Dlfeat = {
  NOT_REPORTED: 0x0,
  READ_ZEROES: 0x1,
  WZ_DEAC: 1 << 3,
} as const;

/** Namespace Identification Descriptor types (NIDT). */
export const Nidt = {
  EUI64: 1,
  NGUID: 2,
  UUID: 3,
  CSI: 4,
} as const;

/** Identify I/O Command Set independent Namespace (CNS 08h) field offsets. */
export const IdNsIndep = {
  NSFEAT: 0,
  NMIC: 1,
  RESCAP: 2,
  FPI: 3,
  ANAGRPID: 4,
  NSATTR: 8,
  NVMSETID: 10,
  ENDGID: 12,
  /** Namespace Status: bit 0 = namespace ready. */
  NSTAT: 14,
} as const;

/** Identify I/O Command Set specific Controller for the NVM command set (CNS 06h, CSI 00h). */
export const IdCtrlNvm = {
  VSL: 0,
  WZSL: 1,
  WUSL: 2,
  DMRL: 3,
  DMRSL: 4,
  DMSL: 8,
} as const;

/** Error Information log entry (64 bytes) field offsets. */
export const ErrorLogEntry = {
  ERROR_COUNT: 0, // u64
  SQID: 8,
  CID: 10,
  STATUS: 12, // phase (bit 0) and status field (15:1)
  PARAM_ERROR_LOCATION: 14,
  LBA: 16, // u64
  NSID: 24,
  VS: 28,
  TRTYPE: 29,
  CS: 32, // u64 command specific information
  TRTYPE_SPEC: 40,
  SIZE: 64,
} as const;

/** SMART / Health Information log (512 bytes) field offsets. */
export const SmartLog = {
  CRITICAL_WARNING: 0,
  TEMPERATURE: 1, // u16 kelvin (unaligned)
  AVAIL_SPARE: 3,
  SPARE_THRESH: 4,
  PERCENT_USED: 5,
  ENDU_GRP_CRIT_WARN: 6,
  DATA_UNITS_READ: 32, // u128, thousands of 512-byte units, rounded up
  DATA_UNITS_WRITTEN: 48,
  HOST_READS: 64,
  HOST_WRITES: 80,
  CTRL_BUSY_TIME: 96, // minutes
  POWER_CYCLES: 112,
  POWER_ON_HOURS: 128,
  UNSAFE_SHUTDOWNS: 144,
  MEDIA_ERRORS: 160,
  NUM_ERR_LOG_ENTRIES: 176,
  WARNING_TEMP_TIME: 192, // u32 minutes
  CRITICAL_COMP_TIME: 196,
  TEMP_SENSOR: 200, // u16[8]
  SIZE: 512,
} as const;

/** Firmware Slot Information log (512 bytes) field offsets. */
export const FwSlotLog = {
  /** Active Firmware Info: bits 2:0 active slot, bits 6:4 slot activated at next reset. */
  AFI: 0,
  /** Firmware Revision for slot 1..7: char[8] each. */
  FRS1: 8,
  SIZE: 512,
} as const;
