/**
 * Decoders for the Identify data structures a host driver needs (NVM Express Base 1.4, 5.15.2):
 * Identify Controller (CNS 01h), Identify Namespace (CNS 00h) and the Active Namespace ID list
 * (CNS 02h). Field offsets are the specification's (`lib/nvme/structs.ts`); what the
 * controller sends is untrusted, so every count is bounded and strings are trimmed ASCII.
 *
 * @packageDocumentation
 */
import { IDENTIFY_SIZE, IdCtrl, IdNs } from '../../nvme/structs';

/** The parts of Identify Controller a driver and a user look at. */
export interface IdentifyController {
  /** PCI vendor and subsystem vendor IDs. */
  readonly vid: number;
  readonly ssvid: number;
  /** Serial number, model number and firmware revision (trailing spaces removed). */
  readonly serial: string;
  readonly model: string;
  readonly firmware: string;
  /** Recommended arbitration burst (log2). */
  readonly rab: number;
  /** IEEE OUI (24 bits). */
  readonly ieee: number;
  readonly cmic: number;
  /** Maximum Data Transfer Size: log2 in units of CAP.MPSMIN pages; 0 = no limit. */
  readonly mdts: number;
  readonly cntlid: number;
  /** VER (0 if the controller does not report it). */
  readonly ver: number;
  readonly oaes: number;
  readonly ctratt: number;
  /** Controller type (1 I/O, 2 discovery, 3 administrative; 0 not reported). */
  readonly cntrltype: number;
  readonly oacs: number;
  readonly acl: number;
  readonly aerl: number;
  readonly frmw: number;
  readonly lpa: number;
  readonly elpe: number;
  readonly npss: number;
  /** Warning and critical composite temperature thresholds (kelvin). */
  readonly wctemp: number;
  readonly cctemp: number;
  /** Total and unallocated NVM capacity in bytes (exact below 2^53). */
  readonly tnvmcap: number;
  readonly unvmcap: number;
  /** Required (bits 3:0) and maximum (7:4) SQ/CQ entry sizes, log2. */
  readonly sqes: number;
  readonly cqes: number;
  readonly maxcmd: number;
  /** Number of namespaces (highest NSID). */
  readonly nn: number;
  /** Optional NVM Command Support (ONCS) bits. */
  readonly oncs: number;
  readonly fuses: number;
  readonly fna: number;
  /** Volatile write cache: bit 0 present. */
  readonly vwc: number;
  readonly awun: number;
  readonly awupf: number;
  readonly sgls: number;
  /** NVM subsystem NQN. */
  readonly subnqn: string;
}

/** One LBA format of a namespace. */
export interface LbaFormat {
  /** Metadata bytes per block. */
  readonly metadataSize: number;
  /** Block size in bytes (2 ^ LBADS). */
  readonly blockSize: number;
  /** Relative performance (0 best .. 3 degraded). */
  readonly relativePerformance: number;
}

/** Identify Namespace, decoded, plus what follows from it. */
export interface NamespaceInfo {
  readonly nsid: number;
  /** Namespace size, capacity and utilization in blocks (exact below 2^53). */
  readonly nsze: number;
  readonly ncap: number;
  readonly nuse: number;
  readonly nsfeat: number;
  readonly nlbaf: number;
  readonly flbas: number;
  readonly dlfeat: number;
  readonly lbaFormats: readonly LbaFormat[];
  /** The format in use (FLBAS bits 3:0 and 6:5). */
  readonly format: number;
  /** Block size and metadata size of the format in use. */
  readonly blockSize: number;
  readonly metadataSize: number;
  /** Capacity in bytes (nsze x blockSize). */
  readonly capacity: number;
  /** Namespace GUID and IEEE EUI-64 as hex (all zeroes if not reported). */
  readonly nguid: string;
  readonly eui64: string;
  /** Preferred write granularity and alignment in blocks (NPWG + 1; 0 if not reported). */
  readonly npwg: number;
}

function ascii(buf: Buffer, at: number, length: number): string {
  let end = at + length;
  while (end > at && (buf[end - 1] === 0x20 || buf[end - 1] === 0)) end--;
  let s = '';
  for (let i = at; i < end; i++) {
    const c = buf[i]!;
    s += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : '?';
  }
  return s;
}

function cstring(buf: Buffer, at: number, length: number): string {
  const nul = buf.indexOf(0, at);
  const end = nul < 0 || nul > at + length ? at + length : nul;
  return ascii(buf, at, end - at);
}

/** Little-endian u64 as a Number (saturating at MAX_SAFE_INTEGER). */
function u64(buf: Buffer, at: number): number {
  const v = buf.readBigUInt64LE(at);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
}

/** Little-endian u128 as a Number (saturating). */
function u128(buf: Buffer, at: number): number {
  if (buf.readBigUInt64LE(at + 8) !== 0n) return Number.MAX_SAFE_INTEGER;
  return u64(buf, at);
}

function checkSize(data: Buffer): void {
  if (data.length < IDENTIFY_SIZE) throw new RangeError(`Expected a ${String(IDENTIFY_SIZE)}-byte Identify structure, got ${String(data.length)} bytes`);
}

/** Decodes Identify Controller (CNS 01h). */
export function parseIdentifyController(data: Buffer): IdentifyController {
  checkSize(data);
  return Object.freeze({
    vid: data.readUInt16LE(IdCtrl.VID),
    ssvid: data.readUInt16LE(IdCtrl.SSVID),
    serial: ascii(data, IdCtrl.SN, 20),
    model: ascii(data, IdCtrl.MN, 40),
    firmware: ascii(data, IdCtrl.FR, 8),
    rab: data[IdCtrl.RAB]!,
    ieee: data.readUIntLE(IdCtrl.IEEE, 3),
    cmic: data[IdCtrl.CMIC]!,
    mdts: data[IdCtrl.MDTS]!,
    cntlid: data.readUInt16LE(IdCtrl.CNTLID),
    ver: data.readUInt32LE(IdCtrl.VER),
    oaes: data.readUInt32LE(IdCtrl.OAES),
    ctratt: data.readUInt32LE(IdCtrl.CTRATT),
    cntrltype: data[IdCtrl.CNTRLTYPE]!,
    oacs: data.readUInt16LE(IdCtrl.OACS),
    acl: data[IdCtrl.ACL]!,
    aerl: data[IdCtrl.AERL]!,
    frmw: data[IdCtrl.FRMW]!,
    lpa: data[IdCtrl.LPA]!,
    elpe: data[IdCtrl.ELPE]!,
    npss: data[IdCtrl.NPSS]!,
    wctemp: data.readUInt16LE(IdCtrl.WCTEMP),
    cctemp: data.readUInt16LE(IdCtrl.CCTEMP),
    tnvmcap: u128(data, IdCtrl.TNVMCAP),
    unvmcap: u128(data, IdCtrl.UNVMCAP),
    sqes: data[IdCtrl.SQES]!,
    cqes: data[IdCtrl.CQES]!,
    maxcmd: data.readUInt16LE(IdCtrl.MAXCMD),
    nn: data.readUInt32LE(IdCtrl.NN),
    oncs: data.readUInt16LE(IdCtrl.ONCS),
    fuses: data.readUInt16LE(IdCtrl.FUSES),
    fna: data[IdCtrl.FNA]!,
    vwc: data[IdCtrl.VWC]!,
    awun: data.readUInt16LE(IdCtrl.AWUN),
    awupf: data.readUInt16LE(IdCtrl.AWUPF),
    sgls: data.readUInt32LE(IdCtrl.SGLS),
    subnqn: cstring(data, IdCtrl.SUBNQN, 256),
  });
}

/**
 * Decodes Identify Namespace (CNS 00h) of `nsid`. Returns null for an inactive namespace (an
 * all-zero structure, NSZE 0).
 *
 * @throws {RangeError} for a format whose block size is not 512 B..64 KiB, or a format index
 * beyond NLBAF: such a namespace cannot be used safely.
 */
export function parseIdentifyNamespace(nsid: number, data: Buffer): NamespaceInfo | null {
  checkSize(data);
  const nsze = u64(data, IdNs.NSZE);
  if (nsze === 0) return null;
  const nlbaf = data[IdNs.NLBAF]!;
  const formats: LbaFormat[] = [];
  // NLBAF is 0's based; at most 64 formats fit the structure (16 before NVMe 2.0).
  for (let i = 0; i <= Math.min(nlbaf, 63); i++) {
    const at = IdNs.LBAF0 + 4 * i;
    formats.push(
      Object.freeze({
        metadataSize: data.readUInt16LE(at),
        blockSize: 2 ** data[at + 2]!,
        relativePerformance: data[at + 3]! & 0x3,
      }),
    );
  }
  const flbas = data[IdNs.FLBAS]!;
  const format = (flbas & 0xf) | (((flbas >>> 5) & 0x3) << 4);
  const lbaf = formats[format];
  if (lbaf === undefined) throw new RangeError(`namespace ${String(nsid)}: FLBAS selects format ${String(format)} but NLBAF is ${String(nlbaf)}`);
  if (lbaf.blockSize < 512 || lbaf.blockSize > 65536) {
    throw new RangeError(`namespace ${String(nsid)}: unsupported block size ${String(lbaf.blockSize)}`);
  }
  const nsfeat = data[IdNs.NSFEAT]!;
  return Object.freeze({
    nsid,
    nsze,
    ncap: u64(data, IdNs.NCAP),
    nuse: u64(data, IdNs.NUSE),
    nsfeat,
    nlbaf,
    flbas,
    dlfeat: data[IdNs.DLFEAT]!,
    lbaFormats: Object.freeze(formats),
    format,
    blockSize: lbaf.blockSize,
    metadataSize: lbaf.metadataSize,
    capacity: nsze * lbaf.blockSize,
    nguid: data.subarray(IdNs.NGUID, IdNs.NGUID + 16).toString('hex'),
    eui64: data.subarray(IdNs.EUI64, IdNs.EUI64 + 8).toString('hex'),
    npwg: (nsfeat & 0x10) !== 0 ? data.readUInt16LE(IdNs.NPWG) + 1 : 0,
  });
}

/** Decodes an Active Namespace ID list (CNS 02h): the non-zero NSIDs, ascending, at most 1024. */
export function parseNamespaceList(data: Buffer): number[] {
  checkSize(data);
  const out: number[] = [];
  for (let at = 0; at + 4 <= IDENTIFY_SIZE; at += 4) {
    const nsid = data.readUInt32LE(at);
    if (nsid === 0) break;
    if (out.length > 0 && nsid <= out[out.length - 1]!) break; // the list must ascend
    out.push(nsid);
  }
  return out;
}
