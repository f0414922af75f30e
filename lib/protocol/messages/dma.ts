/**
 * `DMA_MAP` (2) and `DMA_UNMAP` (3), requests and replies (reference 3.2, 3.3).
 *
 * ```
 * DMA_MAP request (32)            DMA_UNMAP request (24, or 40 with GET_DIRTY_BITMAP)
 *  0  4 argsz   = 32               0  4 argsz          largest reply payload accepted
 *  4  4 flags   READ|WRITE         4  4 flags          GET_DIRTY_BITMAP (legacy) | ALL
 *  8  8 offset  into the fd        8  8 address
 * 16  8 address                   16  8 size
 * 24  8 size                      24  8 bitmap.pgsize  (legacy)
 *                                 32  8 bitmap.size    (legacy)
 * ```
 *
 * `DMA_MAP` replies are header-only. A `DMA_UNMAP` reply echoes the 24-byte request (libvfio-user
 * copies it verbatim, `argsz` included: do not interpret the echoed `argsz`), followed with
 * `GET_DIRTY_BITMAP` by the bitmap header and `bitmap.size` bytes of bitmap.
 *
 * @packageDocumentation
 */
import { DmaMapFlags, DmaUnmapFlags, PayloadSize } from '../constants';
import { EMPTY, Reader, Writer, checkBytes, checkU64, decodeEmpty } from '../codec';

/** `DMA_MAP` request. */
export interface DmaMapRequest {
  /** `argsz`: size of the request structure, 32. */
  argsz: number;
  /** `flags`: {@link DmaMapFlags}. */
  flags: number;
  /** `offset` into the fd sent with the request (0 without fd). */
  offset: bigint;
  /** `address`: start of the range in DMA address space. */
  address: bigint;
  /** `size` of the range. */
  size: bigint;
}

/** Fields of a `DMA_MAP` request to encode (`argsz` defaults to 32, `offset` to 0). */
export type DmaMapRequestInit = Omit<DmaMapRequest, 'argsz' | 'offset'> & { argsz?: number; offset?: bigint };

const DMA_MAP_KNOWN = DmaMapFlags.READ | DmaMapFlags.WRITE | DmaMapFlags.MMAP | DmaMapFlags.FILE_IO;

/** Encodes a `DMA_MAP` request payload (32 bytes; B.6). */
export function encodeDmaMapRequest(m: DmaMapRequestInit): Buffer {
  return Writer.alloc(PayloadSize.DMA_MAP)
    .u32(m.argsz ?? PayloadSize.DMA_MAP, 'argsz')
    .u32(m.flags, 'flags')
    .u64(m.offset ?? 0n, 'offset')
    .u64(m.address, 'address')
    .u64(m.size, 'size')
    .finish();
}

/**
 * Decodes a `DMA_MAP` request.
 *
 * @throws {ProtocolError} unless the payload and `argsz` are exactly 32 bytes and `flags` only has
 * READ, WRITE and libvfio-user's MMAP/FILE_IO bits.
 */
export function decodeDmaMapRequest(payload: Uint8Array): DmaMapRequest {
  const r = new Reader(payload, 'DMA_MAP request');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const offset = r.u64('offset');
  const address = r.u64('address');
  const size = r.u64('size');
  r.end();
  if (argsz !== PayloadSize.DMA_MAP) r.fail('argsz', `${String(argsz)} is not ${String(PayloadSize.DMA_MAP)}`);
  if ((flags & ~DMA_MAP_KNOWN) !== 0) r.fail('flags', `0x${flags.toString(16)} has unknown bits`);
  return { argsz, flags, offset, address, size };
}

/** Encodes a `DMA_MAP` reply (header only). */
export function encodeDmaMapReply(): Buffer {
  return EMPTY;
}

/** Decodes a `DMA_MAP` reply (must be empty). */
export function decodeDmaMapReply(payload: Uint8Array): null {
  return decodeEmpty(payload, 'DMA_MAP reply');
}

/** Legacy dirty-bitmap header: `bitmap.pgsize` and `bitmap.size` (reference 3.3). */
export interface BitmapHeader {
  /** Bytes represented by one bit. */
  pgsize: bigint;
  /** Size of the bitmap in bytes. */
  size: bigint;
}

/** `DMA_UNMAP` request. */
export interface DmaUnmapRequest {
  /** `argsz`: largest reply payload accepted. */
  argsz: number;
  /** `flags`: {@link DmaUnmapFlags}. */
  flags: number;
  address: bigint;
  size: bigint;
  /** Present exactly when `flags` has `GET_DIRTY_BITMAP` (legacy). */
  bitmap?: BitmapHeader | undefined;
}

/** Fields of a `DMA_UNMAP` request to encode; `argsz` defaults to the size the reply needs. */
export type DmaUnmapRequestInit = Omit<DmaUnmapRequest, 'argsz'> & { argsz?: number };

const UNMAP_FIXED = PayloadSize.DMA_UNMAP;
const UNMAP_BITMAP = PayloadSize.DMA_UNMAP + PayloadSize.BITMAP_HEADER;

function unmapRequestSize(flags: number): number {
  return (flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== 0 ? UNMAP_BITMAP : UNMAP_FIXED;
}

/** Encodes a `DMA_UNMAP` request (24 bytes, 40 with `GET_DIRTY_BITMAP`). */
export function encodeDmaUnmapRequest(m: DmaUnmapRequestInit): Buffer {
  const withBitmap = (m.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== 0;
  if (withBitmap !== (m.bitmap !== undefined)) {
    throw new TypeError('Expected bitmap to be given exactly when flags has GET_DIRTY_BITMAP');
  }
  const size = unmapRequestSize(m.flags);
  const w = Writer.alloc(size);
  let argsz = m.argsz;
  if (argsz === undefined) {
    argsz = size;
    if (m.bitmap !== undefined) {
      checkU64(m.bitmap.size, 'bitmap.size');
      argsz = size + Number(m.bitmap.size);
    }
  }
  w.u32(argsz, 'argsz').u32(m.flags, 'flags').u64(m.address, 'address').u64(m.size, 'size');
  if (m.bitmap !== undefined) w.u64(m.bitmap.pgsize, 'bitmap.pgsize').u64(m.bitmap.size, 'bitmap.size');
  return w.finish();
}

/**
 * Decodes a `DMA_UNMAP` request.
 *
 * @throws {ProtocolError} if the length is not 24 (40 with `GET_DIRTY_BITMAP`), `flags` has unknown
 * bits, `ALL` is combined with `GET_DIRTY_BITMAP` or a non-zero range, or `argsz` is below the
 * reply size (24, or 40 + `bitmap.size`).
 */
export function decodeDmaUnmapRequest(payload: Uint8Array): DmaUnmapRequest {
  const r = new Reader(payload, 'DMA_UNMAP request');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const address = r.u64('address');
  const size = r.u64('size');
  if ((flags & ~(DmaUnmapFlags.GET_DIRTY_BITMAP | DmaUnmapFlags.ALL)) !== 0) {
    r.fail('flags', `0x${flags.toString(16)} has unknown bits`);
  }
  let bitmap: BitmapHeader | undefined;
  if ((flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== 0) {
    if ((flags & DmaUnmapFlags.ALL) !== 0) r.fail('flags', 'combines ALL with GET_DIRTY_BITMAP');
    bitmap = { pgsize: r.u64('bitmap.pgsize'), size: r.u64('bitmap.size') };
  }
  r.end();
  if ((flags & DmaUnmapFlags.ALL) !== 0 && (address !== 0n || size !== 0n)) {
    r.fail('address', 'and size must be 0 with ALL');
  }
  const need = bitmap === undefined ? BigInt(UNMAP_FIXED) : BigInt(UNMAP_BITMAP) + bitmap.size;
  if (BigInt(argsz) < need) r.fail('argsz', `${String(argsz)} is smaller than the ${need.toString()}-byte reply`);
  return { argsz, flags, address, size, bitmap };
}

/** `DMA_UNMAP` reply: the request echoed, plus the dirty bitmap with `GET_DIRTY_BITMAP`. */
export interface DmaUnmapReply {
  /** Echoed `argsz` (not meaningful). */
  argsz: number;
  flags: number;
  address: bigint;
  size: bigint;
  /** Legacy dirty bitmap: header echoed and `data` (a zero-copy view of `size` bytes). */
  bitmap?: (BitmapHeader & { data: Buffer }) | undefined;
}

/** Fields of a `DMA_UNMAP` reply; `bitmap.size` is taken from `bitmap.data`. */
export interface DmaUnmapReplyInit {
  argsz: number;
  flags: number;
  address: bigint;
  size: bigint;
  bitmap?: { pgsize: bigint; data: Uint8Array } | undefined;
}

/** Payload size of a `DMA_UNMAP` reply carrying `bitmapBytes` of bitmap (or none). */
export function dmaUnmapReplySize(bitmapBytes?: number): number {
  return bitmapBytes === undefined ? UNMAP_FIXED : UNMAP_BITMAP + bitmapBytes;
}

/** Encodes a `DMA_UNMAP` reply (echo, plus bitmap header and data with `GET_DIRTY_BITMAP`). */
export function encodeDmaUnmapReply(m: DmaUnmapReplyInit): Buffer {
  const withBitmap = (m.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== 0;
  if (withBitmap !== (m.bitmap !== undefined)) {
    throw new TypeError('Expected bitmap to be given exactly when flags has GET_DIRTY_BITMAP');
  }
  if (m.bitmap !== undefined) checkBytes(m.bitmap.data, 'bitmap.data');
  const w = Writer.alloc(dmaUnmapReplySize(m.bitmap?.data.byteLength));
  w.u32(m.argsz, 'argsz').u32(m.flags, 'flags').u64(m.address, 'address').u64(m.size, 'size');
  if (m.bitmap !== undefined) {
    w.u64(m.bitmap.pgsize, 'bitmap.pgsize').u64(BigInt(m.bitmap.data.byteLength), 'bitmap.size').bytes(m.bitmap.data, 'bitmap');
  }
  return w.finish();
}

/**
 * Decodes a `DMA_UNMAP` reply.
 *
 * @throws {ProtocolError} if the payload is not 24 bytes (or, with `GET_DIRTY_BITMAP`, not exactly
 * 40 + `bitmap.size` bytes).
 */
export function decodeDmaUnmapReply(payload: Uint8Array): DmaUnmapReply {
  const r = new Reader(payload, 'DMA_UNMAP reply');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const address = r.u64('address');
  const size = r.u64('size');
  let bitmap: DmaUnmapReply['bitmap'];
  if ((flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== 0) {
    const pgsize = r.u64('bitmap.pgsize');
    const bsize = r.u64('bitmap.size');
    if (bsize !== BigInt(r.remaining)) {
      r.fail('bitmap.size', `${bsize.toString()} disagrees with the ${String(r.remaining)} bitmap bytes present`);
    }
    bitmap = { pgsize, size: bsize, data: r.rest('bitmap') };
  }
  r.end();
  return { argsz, flags, address, size, bitmap };
}
