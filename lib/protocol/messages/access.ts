/**
 * Data accesses: `REGION_READ` (9), `REGION_WRITE` (10), `DMA_READ` (11), `DMA_WRITE` (12) and
 * `REGION_WRITE_MULTI` (15) (reference 3.9-3.12, 3.15).
 *
 * ```
 * REGION_READ/WRITE (16 + data)          DMA_READ/WRITE, spec (16 + data)   QEMU client (12 + data)
 *  0 8 offset  within the region          0 8 address                        0 8 address
 *  8 4 region  index                      8 8 count                          8 4 count
 * 12 4 count                             16 n data                          12 n data
 * 16 n data  (WRITE request, READ reply)
 * ```
 *
 * The hot messages have allocation-free forms: {@link readRegionAccess} / {@link readDmaAccess}
 * fill a caller's reusable object from a `DataView`, returning data as a zero-copy `Buffer` view of
 * the input; {@link writeRegionAccess} / {@link writeDmaAccess} write into a caller's `Buffer`.
 * The `encode*`/`decode*` pairs are convenience wrappers over them.
 *
 * Real-peer leniency (reference 3.9, 3.11, 3.12, 8.2, 8.3, 8.20):
 * - a header-only reply to a region read or write is accepted as `count` 0 (libvfio-user answers
 *   `count` 0 that way);
 * - DMA payloads are accepted in the spec layout and in the QEMU client's (u32 `count`, data at
 *   12); the layouts never collide, so the decoder tells them apart by length;
 * - a `DMA_WRITE` reply may be 16 (spec, LVU), 12 (spec table) or 0 bytes (QEMU client).
 *
 * `count` is a JS number: it is bounded by the message (or, in a read request, range-checked).
 *
 * @packageDocumentation
 */
import { PayloadSize } from '../constants';
import { EMPTY, Reader, Writer, checkBytes, checkU64, checkUint } from '../codec';
import { ProtocolError } from '../errors';

/** Which message of a read/write pair a payload is. */
export const AccessKind = {
  /** `REGION_READ` / `DMA_READ` request: the struct only. */
  READ_REQUEST: 0,
  /** `REGION_WRITE` / `DMA_WRITE` request: the struct and `count` data bytes. */
  WRITE_REQUEST: 1,
  /** `REGION_READ` / `DMA_READ` reply: the struct and `count` data bytes, or nothing (count 0). */
  READ_REPLY: 2,
  /** `REGION_WRITE` / `DMA_WRITE` reply: the struct, or nothing. */
  WRITE_REPLY: 3,
} as const;
/** A value of {@link AccessKind}. */
export type AccessKind = (typeof AccessKind)[keyof typeof AccessKind];

const hasData = (kind: AccessKind): boolean => kind === AccessKind.WRITE_REQUEST || kind === AccessKind.READ_REPLY;
const isReplyKind = (kind: AccessKind): boolean => kind === AccessKind.READ_REPLY || kind === AccessKind.WRITE_REPLY;

const REGION_WHAT = ['REGION_READ request', 'REGION_WRITE request', 'REGION_READ reply', 'REGION_WRITE reply'] as const;
const DMA_WHAT = ['DMA_READ request', 'DMA_WRITE request', 'DMA_READ reply', 'DMA_WRITE reply'] as const;

function checkRange(view: DataView, offset: number, length: number): void {
  if (!(offset >= 0 && length >= 0 && offset + length <= view.byteLength)) {
    throw new RangeError(`Expected payload [${String(offset)}, +${String(length)}) to lie inside the ${String(view.byteLength)}-byte view`);
  }
}

function bad(what: string, field: string, problem: string): never {
  throw new ProtocolError(`${what}: ${field} ${problem}`, { field });
}

// ---------------------------------------------------------------------------------------------
// REGION_READ / REGION_WRITE

/** A region access (reusable with {@link readRegionAccess}). */
export interface RegionAccess {
  /** `offset` within the region. */
  offset: bigint;
  /** `region` index. */
  region: number;
  /** `count` of bytes. */
  count: number;
  /** The data (zero-copy view) for WRITE requests and READ replies; null otherwise. */
  data: Buffer | null;
}

/** A fresh {@link RegionAccess} to reuse as `out`. */
export function createRegionAccess(): RegionAccess {
  return { offset: 0n, region: 0, count: 0, data: null };
}

/** Payload size of a region access of `kind` with `count` bytes. */
export function regionAccessSize(kind: AccessKind, count: number): number {
  return PayloadSize.REGION_ACCESS_FIXED + (hasData(kind) ? count : 0);
}

/**
 * Decodes a region access payload of `length` bytes at `offset` of `view` into `out`, without
 * allocating anything but the data view.
 *
 * @param kind which message this is ({@link AccessKind})
 * @throws {ProtocolError} if the payload is shorter than 16 bytes, or is not exactly 16 + `count`
 * (with data) / 16 (without) bytes; replies may also be empty (then `count` = 0).
 * @throws {RangeError} if `[offset, offset + length)` is outside `view` (a caller bug).
 */
export function readRegionAccess(view: DataView, offset: number, length: number, kind: AccessKind, out: RegionAccess): RegionAccess {
  checkRange(view, offset, length);
  if (length === 0 && isReplyKind(kind)) {
    out.offset = 0n;
    out.region = 0;
    out.count = 0;
    out.data = kind === AccessKind.READ_REPLY ? EMPTY : null;
    return out;
  }
  const what = REGION_WHAT[kind];
  if (length < PayloadSize.REGION_ACCESS_FIXED) bad(what, 'payload', `is truncated: ${String(length)} of ${String(PayloadSize.REGION_ACCESS_FIXED)} bytes`);
  const count = view.getUint32(offset + 12, true);
  if (hasData(kind)) {
    if (count !== length - PayloadSize.REGION_ACCESS_FIXED) {
      bad(what, 'count', `${String(count)} disagrees with the ${String(length - PayloadSize.REGION_ACCESS_FIXED)} data bytes`);
    }
    out.data = Buffer.from(view.buffer, view.byteOffset + offset + PayloadSize.REGION_ACCESS_FIXED, count);
  } else {
    if (length !== PayloadSize.REGION_ACCESS_FIXED) bad(what, 'payload', `has ${String(length - PayloadSize.REGION_ACCESS_FIXED)} unexpected trailing bytes`);
    out.data = null;
  }
  out.offset = view.getBigUint64(offset, true);
  out.region = view.getUint32(offset + 8, true);
  out.count = count;
  return out;
}

/** Fields of a region access to write. */
export interface RegionAccessFields {
  offset: bigint;
  region: number;
  count: number;
}

/**
 * Writes a region access (the 16-byte struct, then `data` if given) into `buf` at `offset`
 * without allocating. To avoid the copy, leave `data` out and send it as a separate iovec.
 *
 * @returns bytes written (16, or 16 + `data.length`)
 * @throws {RangeError} if a field does not fit, `data.length` differs from `count`, or `buf` has
 * no room.
 */
export function writeRegionAccess(buf: Buffer, offset: number, access: RegionAccessFields, data?: Uint8Array): number {
  checkU64(access.offset, 'offset');
  checkUint(access.region, 0xffff_ffff, 'region');
  checkUint(access.count, 0xffff_ffff, 'count');
  const n = data === undefined ? 0 : data.byteLength;
  if (data !== undefined && n !== access.count) {
    throw new RangeError(`Expected data to hold count (${String(access.count)}) bytes, got ${String(n)}`);
  }
  const size = PayloadSize.REGION_ACCESS_FIXED + n;
  if (!Number.isInteger(offset) || offset < 0 || offset + size > buf.byteLength) {
    throw new RangeError(`Expected room for ${String(size)} bytes at offset ${String(offset)}`);
  }
  buf.writeBigUInt64LE(access.offset, offset);
  buf.writeUInt32LE(access.region, offset + 8);
  buf.writeUInt32LE(access.count, offset + 12);
  if (data !== undefined) buf.set(data, offset + PayloadSize.REGION_ACCESS_FIXED);
  return size;
}

function encodeRegion(kind: AccessKind, fields: RegionAccessFields, data?: Uint8Array): Buffer {
  const out = Buffer.alloc(regionAccessSize(kind, fields.count));
  writeRegionAccess(out, 0, fields, data);
  return out;
}

function decodeRegion(kind: AccessKind, payload: Uint8Array): RegionAccess {
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  return readRegionAccess(view, 0, payload.byteLength, kind, createRegionAccess());
}

/** Encodes a `REGION_READ` request (16 bytes; B.2). */
export function encodeRegionReadRequest(m: RegionAccessFields): Buffer {
  return encodeRegion(AccessKind.READ_REQUEST, m);
}
/** Decodes a `REGION_READ` request (exactly 16 bytes). */
export function decodeRegionReadRequest(payload: Uint8Array): RegionAccess {
  return decodeRegion(AccessKind.READ_REQUEST, payload);
}
/** Encodes a `REGION_READ` reply: the echo with `count` = `data.length`, then the data. */
export function encodeRegionReadReply(m: { offset: bigint; region: number; data: Uint8Array }): Buffer {
  checkBytes(m.data, 'data');
  return encodeRegion(AccessKind.READ_REPLY, { offset: m.offset, region: m.region, count: m.data.byteLength }, m.data);
}
/** Decodes a `REGION_READ` reply (16 + `count` bytes, or empty = `count` 0). */
export function decodeRegionReadReply(payload: Uint8Array): RegionAccess {
  return decodeRegion(AccessKind.READ_REPLY, payload);
}
/** Encodes a `REGION_WRITE` request: the struct with `count` = `data.length`, then the data. */
export function encodeRegionWriteRequest(m: { offset: bigint; region: number; data: Uint8Array }): Buffer {
  checkBytes(m.data, 'data');
  return encodeRegion(AccessKind.WRITE_REQUEST, { offset: m.offset, region: m.region, count: m.data.byteLength }, m.data);
}
/** Decodes a `REGION_WRITE` request (exactly 16 + `count` bytes). */
export function decodeRegionWriteRequest(payload: Uint8Array): RegionAccess {
  return decodeRegion(AccessKind.WRITE_REQUEST, payload);
}
/** Encodes a `REGION_WRITE` reply (16 bytes: the echo with the bytes written). */
export function encodeRegionWriteReply(m: RegionAccessFields): Buffer {
  return encodeRegion(AccessKind.WRITE_REPLY, m);
}
/** Decodes a `REGION_WRITE` reply (16 bytes, or empty = `count` 0). */
export function decodeRegionWriteReply(payload: Uint8Array): RegionAccess {
  return decodeRegion(AccessKind.WRITE_REPLY, payload);
}

// ---------------------------------------------------------------------------------------------
// DMA_READ / DMA_WRITE

/** Layout of a DMA access payload. */
export const DmaLayout = {
  /** Spec and libvfio-user: u64 `count`, data at 16. */
  SPEC: 0,
  /** QEMU client (10.1+): u32 `count`, data at 12. */
  QEMU: 1,
  /** Header-only reply (QEMU's `DMA_WRITE` reply; an empty read reply): nothing echoed. */
  NONE: 2,
} as const;
/** A value of {@link DmaLayout}. */
export type DmaLayout = (typeof DmaLayout)[keyof typeof DmaLayout];

/** A DMA access (reusable with {@link readDmaAccess}). */
export interface DmaAccess {
  /** `address` in DMA space. */
  address: bigint;
  /** `count` of bytes (u64 on the wire in the spec layout; range-checked). */
  count: number;
  /** The data (zero-copy view) for WRITE requests and READ replies; null otherwise. */
  data: Buffer | null;
  /** Layout the payload used. */
  layout: DmaLayout;
}

/** A fresh {@link DmaAccess} to reuse as `out`. */
export function createDmaAccess(): DmaAccess {
  return { address: 0n, count: 0, data: null, layout: DmaLayout.SPEC };
}

const TWO32 = 0x1_0000_0000;

/** Payload size of a DMA access of `kind` with `count` bytes in `layout`. */
export function dmaAccessSize(kind: AccessKind, count: number, layout: DmaLayout = DmaLayout.SPEC): number {
  if (layout === DmaLayout.NONE) return 0;
  const fixed = layout === DmaLayout.QEMU ? PayloadSize.DMA_ACCESS_FIXED_QEMU : PayloadSize.DMA_ACCESS_FIXED;
  return fixed + (hasData(kind) ? count : 0);
}

/**
 * Decodes a DMA access payload of `length` bytes at `offset` of `view` into `out`, accepting the
 * spec layout and the QEMU client's (see the module comment).
 *
 * - READ request: 16 bytes (spec) or 12 (QEMU); a spec `count` above 2^53 is refused;
 * - WRITE request and READ reply: 16 + `count` (spec) or 12 + `count` (QEMU); a READ reply may
 *   also be empty (`layout` NONE, `count` 0);
 * - WRITE reply: 16, 12 or 0 bytes.
 *
 * @throws {ProtocolError} for any other length, or a `count` that disagrees with the data.
 * @throws {RangeError} if `[offset, offset + length)` is outside `view` (a caller bug).
 */
export function readDmaAccess(view: DataView, offset: number, length: number, kind: AccessKind, out: DmaAccess): DmaAccess {
  checkRange(view, offset, length);
  const what = DMA_WHAT[kind];
  if (length === 0 && isReplyKind(kind)) {
    out.address = 0n;
    out.count = 0;
    out.data = kind === AccessKind.READ_REPLY ? EMPTY : null;
    out.layout = DmaLayout.NONE;
    return out;
  }
  if (length < PayloadSize.DMA_ACCESS_FIXED_QEMU) {
    bad(what, 'payload', `is truncated: ${String(length)} bytes`);
  }
  const lo = view.getUint32(offset + 8, true);
  let layout: DmaLayout;
  let count: number;
  if (hasData(kind)) {
    const hi = length >= PayloadSize.DMA_ACCESS_FIXED ? view.getUint32(offset + 12, true) : -1;
    if (hi === 0 && lo === length - PayloadSize.DMA_ACCESS_FIXED) {
      layout = DmaLayout.SPEC;
    } else if (lo === length - PayloadSize.DMA_ACCESS_FIXED_QEMU) {
      layout = DmaLayout.QEMU;
    } else {
      bad(what, 'count', `disagrees with the ${String(length)}-byte payload in both the spec and the QEMU layout`);
    }
    count = lo;
    const at = layout === DmaLayout.SPEC ? PayloadSize.DMA_ACCESS_FIXED : PayloadSize.DMA_ACCESS_FIXED_QEMU;
    out.data = Buffer.from(view.buffer, view.byteOffset + offset + at, count);
  } else if (length === PayloadSize.DMA_ACCESS_FIXED) {
    const hi = view.getUint32(offset + 12, true);
    if (hi > 0x1f_ffff) bad(what, 'count', 'is out of the safe integer range');
    layout = DmaLayout.SPEC;
    count = hi * TWO32 + lo;
    out.data = null;
  } else if (length === PayloadSize.DMA_ACCESS_FIXED_QEMU) {
    layout = DmaLayout.QEMU;
    count = lo;
    out.data = null;
  } else {
    bad(what, 'payload', `is ${String(length)} bytes; expected ${String(PayloadSize.DMA_ACCESS_FIXED)} or ${String(PayloadSize.DMA_ACCESS_FIXED_QEMU)}`);
  }
  out.address = view.getBigUint64(offset, true);
  out.count = count;
  out.layout = layout;
  return out;
}

/** Fields of a DMA access to write. */
export interface DmaAccessFields {
  address: bigint;
  count: number;
}

/**
 * Writes a DMA access (struct in `layout`, then `data` if given) into `buf` at `offset` without
 * allocating. Our side always sends {@link DmaLayout.SPEC}; QEMU is for tests and emulation.
 *
 * @returns bytes written
 * @throws {RangeError} if a field does not fit, `data.length` differs from `count`, or `buf` has
 * no room.
 */
export function writeDmaAccess(buf: Buffer, offset: number, access: DmaAccessFields, data?: Uint8Array, layout: DmaLayout = DmaLayout.SPEC): number {
  checkU64(access.address, 'address');
  const qemu = layout === DmaLayout.QEMU;
  if (layout === DmaLayout.NONE) throw new RangeError('Expected layout SPEC or QEMU');
  checkUint(access.count, qemu ? 0xffff_ffff : Number.MAX_SAFE_INTEGER, 'count');
  const n = data === undefined ? 0 : data.byteLength;
  if (data !== undefined && n !== access.count) {
    throw new RangeError(`Expected data to hold count (${String(access.count)}) bytes, got ${String(n)}`);
  }
  const fixed = qemu ? PayloadSize.DMA_ACCESS_FIXED_QEMU : PayloadSize.DMA_ACCESS_FIXED;
  const size = fixed + n;
  if (!Number.isInteger(offset) || offset < 0 || offset + size > buf.byteLength) {
    throw new RangeError(`Expected room for ${String(size)} bytes at offset ${String(offset)}`);
  }
  buf.writeBigUInt64LE(access.address, offset);
  if (qemu) {
    buf.writeUInt32LE(access.count, offset + 8);
  } else {
    buf.writeUInt32LE(access.count % TWO32, offset + 8);
    buf.writeUInt32LE(Math.floor(access.count / TWO32), offset + 12);
  }
  if (data !== undefined) buf.set(data, offset + fixed);
  return size;
}

function encodeDma(kind: AccessKind, fields: DmaAccessFields, data: Uint8Array | undefined, layout: DmaLayout): Buffer {
  const out = Buffer.alloc(dmaAccessSize(kind, fields.count, layout));
  if (layout !== DmaLayout.NONE) writeDmaAccess(out, 0, fields, data, layout);
  return out;
}

function decodeDma(kind: AccessKind, payload: Uint8Array): DmaAccess {
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  return readDmaAccess(view, 0, payload.byteLength, kind, createDmaAccess());
}

/** Encodes a `DMA_READ` request (16 bytes). */
export function encodeDmaReadRequest(m: DmaAccessFields, layout: DmaLayout = DmaLayout.SPEC): Buffer {
  return encodeDma(AccessKind.READ_REQUEST, m, undefined, layout);
}
/** Decodes a `DMA_READ` request (16 bytes, or the QEMU layout's 12). */
export function decodeDmaReadRequest(payload: Uint8Array): DmaAccess {
  return decodeDma(AccessKind.READ_REQUEST, payload);
}
/** Encodes a `DMA_READ` reply: the echo with `count` = `data.length`, then the data. */
export function encodeDmaReadReply(m: { address: bigint; data: Uint8Array }, layout: DmaLayout = DmaLayout.SPEC): Buffer {
  checkBytes(m.data, 'data');
  return encodeDma(AccessKind.READ_REPLY, { address: m.address, count: m.data.byteLength }, m.data, layout);
}
/** Decodes a `DMA_READ` reply (spec or QEMU layout; empty = `count` 0). */
export function decodeDmaReadReply(payload: Uint8Array): DmaAccess {
  return decodeDma(AccessKind.READ_REPLY, payload);
}
/** Encodes a `DMA_WRITE` request: the struct with `count` = `data.length`, then the data. */
export function encodeDmaWriteRequest(m: { address: bigint; data: Uint8Array }, layout: DmaLayout = DmaLayout.SPEC): Buffer {
  checkBytes(m.data, 'data');
  return encodeDma(AccessKind.WRITE_REQUEST, { address: m.address, count: m.data.byteLength }, m.data, layout);
}
/** Decodes a `DMA_WRITE` request (spec or QEMU layout). */
export function decodeDmaWriteRequest(payload: Uint8Array): DmaAccess {
  return decodeDma(AccessKind.WRITE_REQUEST, payload);
}
/** Encodes a `DMA_WRITE` reply: 16 bytes (spec), 12 (QEMU layout) or none ({@link DmaLayout.NONE}). */
export function encodeDmaWriteReply(m: DmaAccessFields, layout: DmaLayout = DmaLayout.SPEC): Buffer {
  return encodeDma(AccessKind.WRITE_REPLY, m, undefined, layout);
}
/** Decodes a `DMA_WRITE` reply (16, 12 or 0 bytes). */
export function decodeDmaWriteReply(payload: Uint8Array): DmaAccess {
  return decodeDma(AccessKind.WRITE_REPLY, payload);
}

// ---------------------------------------------------------------------------------------------
// REGION_WRITE_MULTI

/** One write of a `REGION_WRITE_MULTI` request. */
export interface RegionWriteMultiEntry {
  offset: bigint;
  region: number;
  /** 1..8 */
  count: number;
  /** The first `count` bytes of the 8-byte `data` field (zero-copy view). */
  data: Buffer;
}

/** `REGION_WRITE_MULTI` request. */
export interface RegionWriteMultiRequest {
  /** `wr_cnt`: number of writes. */
  wrCnt: number;
  /** `wrs`: the writes, in execution order. */
  wrs: RegionWriteMultiEntry[];
}

/** `REGION_WRITE_MULTI` reply: `wr_cnt` writes completed. */
export interface RegionWriteMultiReply {
  wrCnt: number;
}

/** Largest `count` of one `REGION_WRITE_MULTI` entry. */
export const WRITE_MULTI_MAX_DATA = 8;

/** Payload size of a `REGION_WRITE_MULTI` request with `n` writes. */
export function regionWriteMultiSize(n: number): number {
  return PayloadSize.WRITE_MULTI_FIXED + n * PayloadSize.WRITE_MULTI_ENTRY;
}

/** Encodes a `REGION_WRITE_MULTI` request; each write's `count` is its data length (1..8). */
export function encodeRegionWriteMultiRequest(wrs: readonly { offset: bigint; region: number; data: Uint8Array }[]): Buffer {
  const w = Writer.alloc(regionWriteMultiSize(wrs.length));
  w.u64(BigInt(wrs.length), 'wrCnt');
  for (const e of wrs) {
    checkBytes(e.data, 'wrs[].data');
    const n = e.data.byteLength;
    if (n < 1 || n > WRITE_MULTI_MAX_DATA) throw new RangeError(`Expected wrs[].data to hold 1..8 bytes, got ${String(n)}`);
    w.u64(e.offset, 'wrs[].offset').u32(e.region, 'wrs[].region').u32(n, 'wrs[].count').bytes(e.data, 'wrs[].data').zeros(8 - n, 'wrs[].data');
  }
  return w.finish();
}

/**
 * Decodes a `REGION_WRITE_MULTI` request.
 *
 * @throws {ProtocolError} if the payload is not exactly 8 + 24 x `wr_cnt` bytes or a `count` is
 * outside 1..8.
 */
export function decodeRegionWriteMultiRequest(payload: Uint8Array): RegionWriteMultiRequest {
  const r = new Reader(payload, 'REGION_WRITE_MULTI request');
  const wrCnt = r.u64('wr_cnt');
  const room = r.remaining;
  if (room % PayloadSize.WRITE_MULTI_ENTRY !== 0 || wrCnt !== BigInt(room / PayloadSize.WRITE_MULTI_ENTRY)) {
    r.fail('wr_cnt', `${wrCnt.toString()} disagrees with the ${String(room)} bytes of writes`);
  }
  const n = Number(wrCnt);
  const wrs: RegionWriteMultiEntry[] = [];
  for (let i = 0; i < n; i++) {
    const offset = r.u64('wrs[].offset');
    const region = r.u32('wrs[].region');
    const count = r.u32('wrs[].count');
    if (count < 1 || count > WRITE_MULTI_MAX_DATA) r.fail('wrs[].count', `${String(count)} is outside 1..8`);
    const field = r.bytes(WRITE_MULTI_MAX_DATA, 'wrs[].data');
    wrs.push({ offset, region, count, data: field.subarray(0, count) });
  }
  r.end();
  return { wrCnt: n, wrs };
}

/** Encodes a `REGION_WRITE_MULTI` reply (8 bytes). */
export function encodeRegionWriteMultiReply(m: RegionWriteMultiReply): Buffer {
  return Writer.alloc(PayloadSize.WRITE_MULTI_FIXED).u64(BigInt(m.wrCnt), 'wrCnt').finish();
}

/**
 * Decodes a `REGION_WRITE_MULTI` reply.
 *
 * @throws {ProtocolError} unless exactly 8 bytes with a safe-integer `wr_cnt`.
 */
export function decodeRegionWriteMultiReply(payload: Uint8Array): RegionWriteMultiReply {
  const r = new Reader(payload, 'REGION_WRITE_MULTI reply');
  const wrCnt = r.u64Number('wr_cnt');
  r.end();
  return { wrCnt };
}
