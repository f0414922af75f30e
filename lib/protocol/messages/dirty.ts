/**
 * `DIRTY_PAGES` (14), legacy: spec 0.9.1 / libvfio-user 2022 only (reference 3.14, 8.15).
 * Layout as libvfio-user 2022 actually sends it (the spec 0.9.1 table is off by 8 bytes):
 *
 * ```
 * request                                  GET_BITMAP reply
 *  0 4 argsz  START/STOP: 8                 0 4 argsz   40 + bitmap size
 *             GET_BITMAP: largest reply     4 4 flags   GET_BITMAP
 *  4 4 flags  exactly one of START, STOP,   8 32 range  echoed
 *             GET_BITMAP                   40 n bitmap
 *  8 8 iova           \
 * 16 8 size            | GET_BITMAP only
 * 24 8 bitmap.pgsize   |
 * 32 8 bitmap.size    /
 * ```
 *
 * START/STOP replies are header-only.
 *
 * @packageDocumentation
 */
import { DirtyPagesFlags, PayloadSize } from '../constants';
import { EMPTY, Reader, Writer, checkBytes, checkU64 } from '../codec';
import type { BitmapHeader } from './dma';

/** The range of a `GET_BITMAP` request or reply. */
export interface DirtyPagesRange {
  iova: bigint;
  size: bigint;
  bitmap: BitmapHeader;
}

/** `DIRTY_PAGES` request. */
export interface DirtyPagesRequest {
  /** START/STOP: request size (8); GET_BITMAP: largest reply accepted. */
  argsz: number;
  /** Exactly one of {@link DirtyPagesFlags}. */
  flags: number;
  /** GET_BITMAP only. */
  range?: DirtyPagesRange | undefined;
}

/** `DIRTY_PAGES` `GET_BITMAP` reply. */
export interface DirtyPagesReply {
  /** 40 + bitmap size. */
  argsz: number;
  flags: number;
  /** The request's range, echoed. */
  range: DirtyPagesRange;
  /** The dirty bitmap (zero-copy view of `range.bitmap.size` bytes). */
  bitmap: Buffer;
}

const FIXED = PayloadSize.DIRTY_PAGES_FIXED;
const WITH_RANGE = PayloadSize.DIRTY_PAGES_FIXED + PayloadSize.BITMAP_RANGE;
const ALL_FLAGS = DirtyPagesFlags.START | DirtyPagesFlags.STOP | DirtyPagesFlags.GET_BITMAP;
const isOneFlag = (f: number): boolean =>
  f === DirtyPagesFlags.START || f === DirtyPagesFlags.STOP || f === DirtyPagesFlags.GET_BITMAP;

/**
 * Encodes a `DIRTY_PAGES` request. `range` is required with GET_BITMAP and forbidden otherwise;
 * `argsz` defaults to 8 (START/STOP) or 40 + `range.bitmap.size` (GET_BITMAP).
 */
export function encodeDirtyPagesRequest(m: { flags: number; argsz?: number; range?: DirtyPagesRange }): Buffer {
  const get = m.flags === DirtyPagesFlags.GET_BITMAP;
  if (get !== (m.range !== undefined)) throw new TypeError('Expected range to be given exactly with GET_BITMAP');
  const w = Writer.alloc(get ? WITH_RANGE : FIXED);
  let argsz = m.argsz;
  if (argsz === undefined) {
    if (m.range === undefined) argsz = FIXED;
    else {
      checkU64(m.range.bitmap.size, 'range.bitmap.size');
      argsz = WITH_RANGE + Number(m.range.bitmap.size);
    }
  }
  w.u32(argsz, 'argsz').u32(m.flags, 'flags');
  if (m.range !== undefined) {
    w.u64(m.range.iova, 'range.iova').u64(m.range.size, 'range.size');
    w.u64(m.range.bitmap.pgsize, 'range.bitmap.pgsize').u64(m.range.bitmap.size, 'range.bitmap.size');
  }
  return w.finish();
}

function readRange(r: Reader): DirtyPagesRange {
  const iova = r.u64('iova');
  const size = r.u64('size');
  const pgsize = r.u64('bitmap.pgsize');
  const bsize = r.u64('bitmap.size');
  return { iova, size, bitmap: { pgsize, size: bsize } };
}

/**
 * Decodes a `DIRTY_PAGES` request.
 *
 * @throws {ProtocolError} unless `flags` is exactly one of START/STOP/GET_BITMAP; START/STOP: 8
 * bytes with `argsz` >= 8; GET_BITMAP: 40 bytes with `argsz` >= 40 + `bitmap.size`.
 */
export function decodeDirtyPagesRequest(payload: Uint8Array): DirtyPagesRequest {
  const r = new Reader(payload, 'DIRTY_PAGES request');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  if ((flags & ~ALL_FLAGS) !== 0 || !isOneFlag(flags)) r.fail('flags', `0x${flags.toString(16)} is not exactly one of START, STOP, GET_BITMAP`);
  if (flags !== DirtyPagesFlags.GET_BITMAP) {
    r.end();
    if (argsz < FIXED) r.fail('argsz', `${String(argsz)} is below ${String(FIXED)}`);
    return { argsz, flags };
  }
  const range = readRange(r);
  r.end();
  const need = BigInt(WITH_RANGE) + range.bitmap.size;
  if (BigInt(argsz) < need) r.fail('argsz', `${String(argsz)} is smaller than the ${need.toString()}-byte reply`);
  return { argsz, flags, range };
}

/** Payload size of a GET_BITMAP reply with `bitmapBytes` of bitmap. */
export function dirtyPagesReplySize(bitmapBytes: number): number {
  return WITH_RANGE + bitmapBytes;
}

/**
 * Encodes a `DIRTY_PAGES` reply: empty for START/STOP (no argument), else the GET_BITMAP reply
 * whose `bitmap.size` and `argsz` come from `bitmap.length`.
 */
export function encodeDirtyPagesReply(m?: { iova: bigint; size: bigint; pgsize: bigint; bitmap: Uint8Array }): Buffer {
  if (m === undefined) return EMPTY;
  checkBytes(m.bitmap, 'bitmap');
  const size = dirtyPagesReplySize(m.bitmap.byteLength);
  return Writer.alloc(size)
    .u32(size, 'argsz')
    .u32(DirtyPagesFlags.GET_BITMAP, 'flags')
    .u64(m.iova, 'iova')
    .u64(m.size, 'size')
    .u64(m.pgsize, 'pgsize')
    .u64(BigInt(m.bitmap.byteLength), 'bitmap.size')
    .bytes(m.bitmap, 'bitmap')
    .finish();
}

/**
 * Decodes a `DIRTY_PAGES` reply: `null` for the empty START/STOP reply, else a GET_BITMAP reply.
 *
 * @throws {ProtocolError} if `flags` is not GET_BITMAP, or `argsz` and `bitmap.size` disagree with
 * the payload length.
 */
export function decodeDirtyPagesReply(payload: Uint8Array): DirtyPagesReply | null {
  if (payload.byteLength === 0) return null;
  const r = new Reader(payload, 'DIRTY_PAGES reply');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  if (flags !== DirtyPagesFlags.GET_BITMAP) r.fail('flags', `0x${flags.toString(16)} is not GET_BITMAP`);
  const range = readRange(r);
  if (range.bitmap.size !== BigInt(r.remaining)) {
    r.fail('bitmap.size', `${range.bitmap.size.toString()} disagrees with the ${String(r.remaining)} bitmap bytes present`);
  }
  const bitmap = r.rest('bitmap');
  if (argsz !== payload.byteLength) r.fail('argsz', `${String(argsz)} disagrees with the ${String(payload.byteLength)}-byte payload`);
  return { argsz, flags, range, bitmap };
}
