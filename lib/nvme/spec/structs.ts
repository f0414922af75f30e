/**
 * NVMe data structures as byte layouts: the submission and completion queue entries, the Identify
 * data structures (controller, namespace, active namespace list, namespace identification
 * descriptors, the NVM command set specific and command set independent ones) and the log pages
 * this controller serves (Error Information, SMART / Health Information, Firmware Slot).
 *
 * Offsets follow NVM Express Base Specification 1.4 (and 2.0 for CNS 06h/08h), little-endian,
 * named after the fields in Linux's `struct nvme_id_ctrl`, `struct nvme_id_ns`, ... Builders fill
 * a caller-provided, zeroed buffer and never allocate on the I/O path.
 *
 * @packageDocumentation
 */
import { Csi } from './constants';
import { CQES, SQES } from './registers';

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

// ---- writers ----

/** Writes `text` as an NVMe ASCII string field: left-justified, padded with spaces, truncated. */
export function putAscii(dst: Buffer, offset: number, length: number, text: string): void {
  dst.fill(0x20, offset, offset + length);
  const bytes = Buffer.from(text, 'latin1');
  bytes.copy(dst, offset, 0, Math.min(length, bytes.length));
}

/** Writes a u128 counter (kept as a Number, exact below 2^53) little-endian. */
export function putU128(dst: Buffer, offset: number, value: number): void {
  const v = BigInt(Math.max(0, Math.floor(value)));
  dst.writeBigUInt64LE(v & 0xffff_ffff_ffff_ffffn, offset);
  dst.writeBigUInt64LE(v >> 64n, offset + 8);
}

/** What the Identify Controller structure says about this controller. */
export interface ControllerIdentity {
  vendorId: number;
  subsystemVendorId: number;
  serial: string;
  model: string;
  firmware: string;
  /** MDTS as reported: log2 of the largest transfer in units of the minimum page size; 0 = no limit. */
  mdts: number;
  cntlid: number;
  /** Asynchronous Event Request Limit, 0's based. */
  aerl: number;
  /** Abort Command Limit, 0's based. */
  acl: number;
  /** Error Log Page Entries, 0's based. */
  elpe: number;
  /** Warning and critical composite temperature thresholds (kelvin). */
  wctemp: number;
  cctemp: number;
  /** Total NVM capacity in bytes. */
  capacity: number;
  subnqn: string;
  oncs: number;
  oacs: number;
  vwc: number;
  version: number;
}

/** Fills the Identify Controller data structure (CNS 01h) into a zeroed 4 KiB `dst`. */
export function writeIdentifyController(dst: Buffer, id: ControllerIdentity): void {
  dst.writeUInt16LE(id.vendorId, IdCtrl.VID);
  dst.writeUInt16LE(id.subsystemVendorId, IdCtrl.SSVID);
  putAscii(dst, IdCtrl.SN, 20, id.serial);
  putAscii(dst, IdCtrl.MN, 40, id.model);
  putAscii(dst, IdCtrl.FR, 8, id.firmware);
  dst[IdCtrl.RAB] = 6; // recommended arbitration burst: 64 commands
  dst[IdCtrl.MDTS] = id.mdts;
  dst.writeUInt16LE(id.cntlid, IdCtrl.CNTLID);
  dst.writeUInt32LE(id.version, IdCtrl.VER);
  dst[IdCtrl.CNTRLTYPE] = 1; // I/O controller
  dst.writeUInt16LE(id.oacs, IdCtrl.OACS);
  dst[IdCtrl.ACL] = id.acl;
  dst[IdCtrl.AERL] = id.aerl;
  dst[IdCtrl.FRMW] = 0x01 | (1 << 1); // slot 1 read-only, one slot, no activation without reset
  dst[IdCtrl.LPA] = Lpa.EXTENDED;
  dst[IdCtrl.ELPE] = id.elpe;
  dst[IdCtrl.NPSS] = 0; // one power state (PS0)
  dst.writeUInt16LE(id.wctemp, IdCtrl.WCTEMP);
  dst.writeUInt16LE(id.cctemp, IdCtrl.CCTEMP);
  putU128(dst, IdCtrl.TNVMCAP, id.capacity);
  putU128(dst, IdCtrl.UNVMCAP, 0);
  dst[IdCtrl.SQES] = (SQES << 4) | SQES; // maximum and required: 64 bytes
  dst[IdCtrl.CQES] = (CQES << 4) | CQES; // maximum and required: 16 bytes
  dst.writeUInt32LE(1, IdCtrl.NN);
  dst.writeUInt16LE(id.oncs, IdCtrl.ONCS);
  dst[IdCtrl.VWC] = id.vwc;
  dst.writeUInt32LE(0, IdCtrl.SGLS); // PRPs only
  const nqn = Buffer.from(id.subnqn, 'latin1');
  nqn.copy(dst, IdCtrl.SUBNQN, 0, Math.min(255, nqn.length)); // NUL-terminated
  // PS0: 25 W maximum, operational, no entry/exit latency worth reporting.
  dst.writeUInt16LE(2500, IdCtrl.PSD0 + Psd.MP);
}

/** The namespace as the Identify structures describe it. */
export interface NamespaceIdentity {
  /** Size in logical blocks. */
  blocks: number;
  /** log2 of the logical block size (9 or 12). */
  lbads: number;
  /** DLFEAT byte. */
  dlfeat: number;
  nguid: Buffer; // 16 bytes
  eui64: Buffer; // 8 bytes
  uuid: Buffer; // 16 bytes
  /** Optimal I/O boundary and preferred write granularity, in blocks (0 = not reported). */
  npwg: number;
  /** The namespace is write-protected (NSATTR bit 0): the backend is read-only. */
  writeProtected?: boolean;
}

/** Fills Identify Namespace (CNS 00h) into a zeroed 4 KiB `dst`. */
export function writeIdentifyNamespace(dst: Buffer, ns: NamespaceIdentity): void {
  const blocks = BigInt(ns.blocks);
  dst.writeBigUInt64LE(blocks, IdNs.NSZE);
  dst.writeBigUInt64LE(blocks, IdNs.NCAP);
  dst.writeBigUInt64LE(blocks, IdNs.NUSE);
  dst[IdNs.NSFEAT] = ns.npwg > 0 ? Nsfeat.OPTPERF : 0;
  dst[IdNs.NLBAF] = 0; // one LBA format
  dst[IdNs.FLBAS] = 0; // format 0, no metadata
  dst[IdNs.DLFEAT] = ns.dlfeat;
  dst[IdNs.NSATTR] = ns.writeProtected === true ? 1 : 0;
  putU128(dst, IdNs.NVMCAP, ns.blocks * 2 ** ns.lbads);
  if (ns.npwg > 0) {
    dst.writeUInt16LE(ns.npwg - 1, IdNs.NPWG);
    dst.writeUInt16LE(ns.npwg - 1, IdNs.NPWA);
    dst.writeUInt16LE(ns.npwg - 1, IdNs.NPDG);
    dst.writeUInt16LE(ns.npwg - 1, IdNs.NPDA);
    dst.writeUInt16LE(ns.npwg - 1, IdNs.NOWS);
  }
  ns.nguid.copy(dst, IdNs.NGUID, 0, 16);
  ns.eui64.copy(dst, IdNs.EUI64, 0, 8);
  dst.writeUInt16LE(0, IdNs.LBAF0); // MS: no metadata
  dst[IdNs.LBAF0 + 2] = ns.lbads;
  dst[IdNs.LBAF0 + 3] = 0; // relative performance: best
}

/** Fills the Namespace Identification Descriptor list (CNS 03h) into a zeroed 4 KiB `dst`. */
export function writeNamespaceDescriptors(dst: Buffer, ns: NamespaceIdentity): void {
  let at = 0;
  const put = (type: number, id: Buffer) => {
    dst[at] = type;
    dst[at + 1] = id.length;
    id.copy(dst, at + 4);
    at += 4 + id.length;
  };
  put(Nidt.EUI64, ns.eui64);
  put(Nidt.NGUID, ns.nguid);
  put(Nidt.UUID, ns.uuid);
  put(Nidt.CSI, Buffer.of(Csi.NVM));
}

/** Fills Identify I/O Command Set independent Namespace (CNS 08h) into a zeroed 4 KiB `dst`. */
export function writeIdentifyNamespaceIndependent(dst: Buffer, ns: NamespaceIdentity): void {
  dst[IdNsIndep.NSFEAT] = ns.npwg > 0 ? Nsfeat.OPTPERF : 0;
  dst[IdNsIndep.NSATTR] = ns.writeProtected === true ? 1 : 0;
  dst[IdNsIndep.NSTAT] = 0x1; // ready
}

/** Counters behind the SMART / Health Information log page. */
export interface HealthCounters {
  criticalWarning: number;
  /** Composite temperature in kelvin. */
  temperature: number;
  /** 512-byte units read and written (converted to thousands, rounded up, when reported). */
  units512Read: number;
  units512Written: number;
  hostReads: number;
  hostWrites: number;
  busyMinutes: number;
  powerCycles: number;
  powerOnHours: number;
  unsafeShutdowns: number;
  mediaErrors: number;
  errorLogEntries: number;
}

/** Fills the SMART / Health Information log (512 bytes) into a zeroed `dst`. */
export function writeSmartLog(dst: Buffer, c: HealthCounters): void {
  dst[SmartLog.CRITICAL_WARNING] = c.criticalWarning;
  dst.writeUInt16LE(c.temperature, SmartLog.TEMPERATURE);
  dst[SmartLog.AVAIL_SPARE] = 100;
  dst[SmartLog.SPARE_THRESH] = 10;
  dst[SmartLog.PERCENT_USED] = 0;
  putU128(dst, SmartLog.DATA_UNITS_READ, Math.ceil(c.units512Read / 1000));
  putU128(dst, SmartLog.DATA_UNITS_WRITTEN, Math.ceil(c.units512Written / 1000));
  putU128(dst, SmartLog.HOST_READS, c.hostReads);
  putU128(dst, SmartLog.HOST_WRITES, c.hostWrites);
  putU128(dst, SmartLog.CTRL_BUSY_TIME, c.busyMinutes);
  putU128(dst, SmartLog.POWER_CYCLES, c.powerCycles);
  putU128(dst, SmartLog.POWER_ON_HOURS, c.powerOnHours);
  putU128(dst, SmartLog.UNSAFE_SHUTDOWNS, c.unsafeShutdowns);
  putU128(dst, SmartLog.MEDIA_ERRORS, c.mediaErrors);
  putU128(dst, SmartLog.NUM_ERR_LOG_ENTRIES, c.errorLogEntries);
  dst.writeUInt16LE(c.temperature, SmartLog.TEMP_SENSOR); // sensor 1 = composite
}

/** Fills the Firmware Slot Information log (512 bytes) into a zeroed `dst`. */
export function writeFirmwareSlotLog(dst: Buffer, firmware: string): void {
  dst[FwSlotLog.AFI] = 0x1; // slot 1 active
  putAscii(dst, FwSlotLog.FRS1, 8, firmware);
}

/** One Error Information log entry's content. */
export interface ErrorRecord {
  count: number;
  sqid: number;
  cid: number;
  /** Status field (15 bits, no phase). */
  status: number;
  /** Byte (bits 7:0) and bit (10:8) in the command of the parameter in error; 0xffff = n/a. */
  location: number;
  lba: number;
  nsid: number;
}

/** Writes one Error Information log entry at `offset` of `dst`. */
export function writeErrorLogEntry(dst: Buffer, offset: number, e: ErrorRecord): void {
  dst.writeBigUInt64LE(BigInt(e.count), offset + ErrorLogEntry.ERROR_COUNT);
  dst.writeUInt16LE(e.sqid, offset + ErrorLogEntry.SQID);
  dst.writeUInt16LE(e.cid, offset + ErrorLogEntry.CID);
  dst.writeUInt16LE((e.status << 1) & 0xffff, offset + ErrorLogEntry.STATUS);
  dst.writeUInt16LE(e.location, offset + ErrorLogEntry.PARAM_ERROR_LOCATION);
  dst.writeBigUInt64LE(BigInt(e.lba), offset + ErrorLogEntry.LBA);
  dst.writeUInt32LE(e.nsid >>> 0, offset + ErrorLogEntry.NSID);
}
