/**
 * How this controller fills the NVMe data structures it returns: Identify Controller, Identify
 * Namespace, the Namespace Identification Descriptor list, the command set independent Identify
 * Namespace, and the SMART / Health, Firmware Slot and Error Information log pages. The layouts
 * are the specification's (lib/nvme/structs.ts); the values are this model's. Builders fill a
 * caller-provided, zeroed buffer and never allocate on the I/O path.
 *
 * @packageDocumentation
 */
import { Csi } from '../../nvme/constants';
import { CQES, ErrorLogEntry, FwSlotLog, IdCtrl, IdNs, IdNsIndep, Lpa, Nidt, Nsfeat, Psd, SQES, SmartLog } from '../../nvme/structs';

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
