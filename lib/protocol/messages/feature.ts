/**
 * `DEVICE_FEATURE` (16), requests and replies, and the data of the features vfio-user uses
 * (reference 3.16, 5).
 *
 * ```
 * request / reply                     features (data layouts below)
 *  0 4 argsz  largest reply accepted   1 MIGRATION           GET: reply u64 flags
 *  4 4 flags  bits 0-15 feature,       2 MIG_DEVICE_STATE    u32 device_state, u32 data_fd
 *             0x10000 GET,             6 DMA_LOGGING_START   u64 page_size, u32 num_ranges,
 *             0x20000 SET,                                   u32 reserved, num_ranges x
 *             0x40000 PROBE                                  (u64 iova, u64 length)
 *  8 n data   feature-specific         7 DMA_LOGGING_STOP    no data
 *                                      8 DMA_LOGGING_REPORT  u64 iova, u64 length, u64 page_size;
 *                                                            reply: + u64[] bitmap
 * ```
 *
 * A SET or PROBE reply echoes the request; a GET reply carries `argsz` = 8 + data length.
 * The envelope codecs ({@link decodeDeviceFeatureRequest}, ...) check the operation bits; the
 * feature-data codecs check each feature's layout.
 *
 * @packageDocumentation
 */
import { DeviceFeature, PayloadSize } from '../constants';
import { Reader, Writer, checkBytes, checkU64 } from '../codec';

// ---------------------------------------------------------------------------------------------
// Envelope

/** A `DEVICE_FEATURE` request or reply. */
export interface DeviceFeatureMessage {
  /** Largest reply payload accepted (request) / echoed or 8 + data (reply). */
  argsz: number;
  /** Feature index | GET/SET/PROBE bits ({@link DeviceFeature}). */
  flags: number;
  /** Feature data (zero-copy view; empty when absent). */
  data: Buffer;
}

/** Fields to encode; `argsz` defaults to 8 + data length, `data` to none. */
export interface DeviceFeatureInit {
  argsz?: number;
  flags: number;
  data?: Uint8Array;
}

/** Feature index (bits 0-15) of a `flags` word. */
export function featureIndex(flags: number): number {
  return flags & DeviceFeature.INDEX_MASK;
}

const OPS = DeviceFeature.GET | DeviceFeature.SET | DeviceFeature.PROBE;
const KNOWN = DeviceFeature.INDEX_MASK | OPS;

function encodeEnvelope(m: DeviceFeatureInit): Buffer {
  const data = m.data ?? new Uint8Array(0);
  checkBytes(data, 'data');
  const size = PayloadSize.FEATURE_FIXED + data.byteLength;
  return Writer.alloc(size).u32(m.argsz ?? size, 'argsz').u32(m.flags, 'flags').bytes(data, 'data').finish();
}

function decodeEnvelope(payload: Uint8Array, what: string): DeviceFeatureMessage {
  const r = new Reader(payload, what);
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const data = r.rest('data');
  if ((flags & ~KNOWN) !== 0) r.fail('flags', `0x${flags.toString(16)} has unknown bits`);
  const ops = flags & OPS;
  if (ops === 0) r.fail('flags', `0x${flags.toString(16)} names no operation (GET, SET or PROBE)`);
  if ((ops & DeviceFeature.PROBE) === 0 && (ops & DeviceFeature.GET) !== 0 && (ops & DeviceFeature.SET) !== 0) {
    r.fail('flags', `0x${flags.toString(16)} combines GET and SET without PROBE`);
  }
  if (argsz < PayloadSize.FEATURE_FIXED) r.fail('argsz', `${String(argsz)} is below ${String(PayloadSize.FEATURE_FIXED)}`);
  return { argsz, flags, data };
}

/** Encodes a `DEVICE_FEATURE` request (B.7). For GET, pass an `argsz` with room for the reply. */
export function encodeDeviceFeatureRequest(m: DeviceFeatureInit): Buffer {
  return encodeEnvelope(m);
}

/**
 * Decodes a `DEVICE_FEATURE` request.
 *
 * @throws {ProtocolError} if shorter than 8 bytes, `argsz` < 8, `flags` has bits beyond the index
 * and GET/SET/PROBE, names no operation, or combines GET and SET without PROBE.
 */
export function decodeDeviceFeatureRequest(payload: Uint8Array): DeviceFeatureMessage {
  return decodeEnvelope(payload, 'DEVICE_FEATURE request');
}

/** Encodes a `DEVICE_FEATURE` reply (`argsz` defaults to 8 + data length, as for GET). */
export function encodeDeviceFeatureReply(m: DeviceFeatureInit): Buffer {
  return encodeEnvelope(m);
}

/** Decodes a `DEVICE_FEATURE` reply (same checks as the request). */
export function decodeDeviceFeatureReply(payload: Uint8Array): DeviceFeatureMessage {
  return decodeEnvelope(payload, 'DEVICE_FEATURE reply');
}

// ---------------------------------------------------------------------------------------------
// Feature 1: MIGRATION

/** Encodes the `MIGRATION` GET reply data: `u64 flags` ({@link MigrationFlags}). */
export function encodeMigrationFeatureData(flags: bigint): Buffer {
  return Writer.alloc(8).u64(flags, 'flags').finish();
}

/** Decodes the `MIGRATION` GET reply data (exactly 8 bytes). */
export function decodeMigrationFeatureData(data: Uint8Array): bigint {
  const r = new Reader(data, 'DEVICE_FEATURE MIGRATION data');
  const flags = r.u64('flags');
  r.end();
  return flags;
}

// ---------------------------------------------------------------------------------------------
// Feature 2: MIG_DEVICE_STATE

/** `MIG_DEVICE_STATE` data. */
export interface MigDeviceState {
  /** {@link MigState}. */
  deviceState: number;
  /** Unused by vfio-user: send 0 or 0xFFFFFFFF, ignore on receipt. */
  dataFd: number;
}

/** Encodes `MIG_DEVICE_STATE` data (8 bytes; `dataFd` defaults to 0xFFFFFFFF, i.e. -1). */
export function encodeMigDeviceState(m: { deviceState: number; dataFd?: number }): Buffer {
  return Writer.alloc(8).u32(m.deviceState, 'deviceState').u32(m.dataFd ?? 0xffff_ffff, 'dataFd').finish();
}

/** Decodes `MIG_DEVICE_STATE` data (exactly 8 bytes). */
export function decodeMigDeviceState(data: Uint8Array): MigDeviceState {
  const r = new Reader(data, 'DEVICE_FEATURE MIG_DEVICE_STATE data');
  const deviceState = r.u32('device_state');
  const dataFd = r.u32('data_fd');
  r.end();
  return { deviceState, dataFd };
}

// ---------------------------------------------------------------------------------------------
// Features 6/7/8: DMA logging

/** One range of `DMA_LOGGING_START`. */
export interface DmaLoggingRange {
  iova: bigint;
  length: bigint;
}

/** `DMA_LOGGING_START` data (also its reply, with the page size the server chose). */
export interface DmaLoggingControl {
  /** Tracking granularity. */
  pageSize: bigint;
  /** Ranges to log; empty = everything. */
  ranges: DmaLoggingRange[];
}

/** Encodes `DMA_LOGGING_START` data (16 + 16 x ranges bytes). */
export function encodeDmaLoggingControl(m: DmaLoggingControl): Buffer {
  const w = Writer.alloc(PayloadSize.DMA_LOGGING_CONTROL_FIXED + PayloadSize.DMA_LOGGING_RANGE * m.ranges.length);
  w.u64(m.pageSize, 'pageSize').u32(m.ranges.length, 'num_ranges').u32(0, 'reserved');
  for (const range of m.ranges) w.u64(range.iova, 'ranges[].iova').u64(range.length, 'ranges[].length');
  return w.finish();
}

/**
 * Decodes `DMA_LOGGING_START` data.
 *
 * @throws {ProtocolError} unless exactly 16 + 16 x `num_ranges` bytes.
 */
export function decodeDmaLoggingControl(data: Uint8Array): DmaLoggingControl {
  const r = new Reader(data, 'DEVICE_FEATURE DMA_LOGGING_START data');
  const pageSize = r.u64('page_size');
  const n = r.u32('num_ranges');
  r.skip(4, 'reserved');
  if (n * PayloadSize.DMA_LOGGING_RANGE !== r.remaining) {
    r.fail('num_ranges', `${String(n)} disagrees with the ${String(r.remaining)} bytes of ranges`);
  }
  const ranges: DmaLoggingRange[] = [];
  for (let i = 0; i < n; i++) ranges.push({ iova: r.u64('ranges[].iova'), length: r.u64('ranges[].length') });
  r.end();
  return { pageSize, ranges };
}

/** `DMA_LOGGING_REPORT` request data. */
export interface DmaLoggingReport {
  iova: bigint;
  length: bigint;
  /** Bitmap granularity: a power of two. */
  pageSize: bigint;
}

/** `DMA_LOGGING_REPORT` reply data: the request and its bitmap. */
export interface DmaLoggingReportReply extends DmaLoggingReport {
  /** u64 words, bit k = page k of the range (zero-copy view). */
  bitmap: Buffer;
}

function bitmapBytes(length: bigint, pageSize: bigint): bigint {
  const pages = (length + pageSize - 1n) / pageSize;
  return ((pages + 63n) / 64n) * 8n;
}

const isPow2 = (v: bigint): boolean => v > 0n && (v & (v - 1n)) === 0n;

/**
 * Size in bytes of a `DMA_LOGGING_REPORT` bitmap: `ceil(ceil(length / pageSize) / 64) * 8`
 * (reference 3.16, 8.16).
 *
 * @throws {RangeError} if `pageSize` is not a power of two or the size is not a safe integer.
 */
export function dmaLoggingBitmapSize(length: bigint, pageSize: bigint): number {
  checkU64(length, 'length');
  checkU64(pageSize, 'pageSize');
  if (!isPow2(pageSize)) throw new RangeError(`Expected pageSize to be a power of two, got ${pageSize.toString()}`);
  const n = bitmapBytes(length, pageSize);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`Expected a bitmap size within the safe integer range, got ${n.toString()}`);
  return Number(n);
}

function writeReport(w: Writer, m: DmaLoggingReport): void {
  w.u64(m.iova, 'iova').u64(m.length, 'length').u64(m.pageSize, 'pageSize');
}

function readReport(r: Reader): DmaLoggingReport {
  const iova = r.u64('iova');
  const length = r.u64('length');
  const pageSize = r.u64('page_size');
  if (!isPow2(pageSize)) r.fail('page_size', `${pageSize.toString()} is not a power of two`);
  return { iova, length, pageSize };
}

/** Encodes `DMA_LOGGING_REPORT` request data (24 bytes). */
export function encodeDmaLoggingReportRequest(m: DmaLoggingReport): Buffer {
  const w = Writer.alloc(PayloadSize.DMA_LOGGING_REPORT_FIXED);
  writeReport(w, m);
  return w.finish();
}

/**
 * Decodes `DMA_LOGGING_REPORT` request data.
 *
 * @throws {ProtocolError} unless exactly 24 bytes with a power-of-two `page_size`.
 */
export function decodeDmaLoggingReportRequest(data: Uint8Array): DmaLoggingReport {
  const r = new Reader(data, 'DEVICE_FEATURE DMA_LOGGING_REPORT data');
  const m = readReport(r);
  r.end();
  return m;
}

/** Encodes `DMA_LOGGING_REPORT` reply data: the 24-byte request, then the bitmap. */
export function encodeDmaLoggingReportReply(m: DmaLoggingReport & { bitmap: Uint8Array }): Buffer {
  checkBytes(m.bitmap, 'bitmap');
  const expected = dmaLoggingBitmapSize(m.length, m.pageSize);
  if (m.bitmap.byteLength !== expected) {
    throw new RangeError(`Expected bitmap to hold ${String(expected)} bytes, got ${String(m.bitmap.byteLength)}`);
  }
  const w = Writer.alloc(PayloadSize.DMA_LOGGING_REPORT_FIXED + expected);
  writeReport(w, m);
  w.bytes(m.bitmap, 'bitmap');
  return w.finish();
}

/**
 * Decodes `DMA_LOGGING_REPORT` reply data.
 *
 * @throws {ProtocolError} unless `page_size` is a power of two and the bitmap is exactly
 * `ceil(ceil(length / page_size) / 64) * 8` bytes.
 */
export function decodeDmaLoggingReportReply(data: Uint8Array): DmaLoggingReportReply {
  const r = new Reader(data, 'DEVICE_FEATURE DMA_LOGGING_REPORT reply data');
  const m = readReport(r);
  const need = bitmapBytes(m.length, m.pageSize);
  if (need !== BigInt(r.remaining)) {
    r.fail('bitmap', `has ${String(r.remaining)} bytes; length and page_size need ${need.toString()}`);
  }
  return { ...m, bitmap: r.rest('bitmap') };
}
