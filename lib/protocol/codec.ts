/**
 * Little-endian cursor reader and writer over `DataView`, the building blocks of every codec.
 *
 * Every multi-byte integer on a vfio-user socket is little-endian and every structure is packed
 * (reference 0, 1.3). u64 fields are `bigint`; {@link toSafeNumber} converts them where a JS
 * number is needed.
 *
 * - {@link Reader} checks every read against the payload bounds and throws {@link ProtocolError}
 *   naming the message and field, so a decoder can never read out of bounds. `bytes()` returns a
 *   zero-copy `Buffer` view of the input.
 * - {@link Writer} checks values against their field width and throws `RangeError`/`TypeError`
 *   for caller bugs (a value that does not fit is never the peer's fault).
 *
 * @packageDocumentation
 */
import { ProtocolError } from './errors';

/** Largest u32. */
export const U32_MAX = 0xffff_ffff;
/** Largest u64. */
export const U64_MAX = 0xffff_ffff_ffff_ffffn;
const SAFE_MAX = BigInt(Number.MAX_SAFE_INTEGER);

/** A zero-copy `Buffer` view of `length` bytes of `bytes` starting at `offset`. */
export function viewOf(bytes: Uint8Array, offset: number, length: number): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset + offset, length);
}

/** An empty payload (header-only messages). Zero-length, so sharing it is safe. */
export const EMPTY: Buffer = Buffer.alloc(0);

/**
 * Converts a decoded u64 to a JS number, refusing values above `Number.MAX_SAFE_INTEGER`
 * (reference 1.3: values must never be rounded silently).
 *
 * @throws {ProtocolError} (`EINVAL`) if the value is negative or not exactly representable.
 */
export function toSafeNumber(value: bigint, field = 'value'): number {
  if (value < 0n || value > SAFE_MAX) {
    throw new ProtocolError(`${field} ${value.toString()} is out of the safe integer range`, { field });
  }
  return Number(value);
}

/**
 * Bounds-checked little-endian reader over one payload.
 *
 * Positions are relative to the start of the payload. Reusable: {@link Reader.reset} points it at
 * another payload without allocating.
 */
export class Reader {
  /** Current position, relative to the payload start. */
  pos = 0;
  private view: DataView;
  private buf: Uint8Array;
  private base = 0;
  private len = 0;
  private what = '';

  /**
   * @param bytes buffer holding the payload
   * @param what message name used in error messages, e.g. `'DMA_MAP request'`
   * @param offset start of the payload in `bytes`
   * @param length payload length (default: to the end of `bytes`)
   */
  constructor(bytes: Uint8Array, what: string, offset = 0, length = bytes.byteLength - offset) {
    this.buf = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.reset(bytes, what, offset, length);
  }

  /** Points the reader at another payload. */
  reset(bytes: Uint8Array, what: string, offset = 0, length = bytes.byteLength - offset): this {
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 ||
      offset + length > bytes.byteLength) {
      throw new RangeError(`Expected payload [${String(offset)}, +${String(length)}) to lie inside the buffer`);
    }
    if (bytes !== this.buf) {
      this.buf = bytes;
      this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    }
    this.base = offset;
    this.len = length;
    this.what = what;
    this.pos = 0;
    return this;
  }

  /** Payload length. */
  get length(): number {
    return this.len;
  }

  /** Bytes left after the current position. */
  get remaining(): number {
    return this.len - this.pos;
  }

  /** Throws a {@link ProtocolError} about `field` of this message. */
  fail(field: string, problem: string, errno?: number): never {
    throw new ProtocolError(`${this.what}: ${field} ${problem}`, errno === undefined ? { field } : { field, errno });
  }

  /** Ensures `n` more bytes are available for `field`. */
  need(n: number, field: string): void {
    if (n > this.len - this.pos) {
      this.fail(field, `is truncated: needs ${String(n)} bytes at offset ${String(this.pos)} of a ${String(this.len)}-byte payload`);
    }
  }

  u8(field: string): number {
    this.need(1, field);
    const v = this.view.getUint8(this.base + this.pos);
    this.pos += 1;
    return v;
  }

  u16(field: string): number {
    this.need(2, field);
    const v = this.view.getUint16(this.base + this.pos, true);
    this.pos += 2;
    return v;
  }

  u32(field: string): number {
    this.need(4, field);
    const v = this.view.getUint32(this.base + this.pos, true);
    this.pos += 4;
    return v;
  }

  u64(field: string): bigint {
    this.need(8, field);
    const v = this.view.getBigUint64(this.base + this.pos, true);
    this.pos += 8;
    return v;
  }

  /** A u64 that must fit in a safe integer (counts bounded by the message itself). */
  u64Number(field: string): number {
    const v = this.u64(field);
    if (v > SAFE_MAX) this.fail(field, `${v.toString()} is out of range`);
    return Number(v);
  }

  /** `n` bytes as a zero-copy `Buffer` view of the input. */
  bytes(n: number, field: string): Buffer {
    this.need(n, field);
    const v = viewOf(this.buf, this.base + this.pos, n);
    this.pos += n;
    return v;
  }

  /** Everything after the current position, as a zero-copy view. */
  rest(field: string): Buffer {
    return this.bytes(this.len - this.pos, field);
  }

  /** Skips `n` bytes (reserved or padding fields). */
  skip(n: number, field: string): void {
    this.need(n, field);
    this.pos += n;
  }

  /** Moves to an absolute payload position (used to follow capability chains). */
  seek(pos: number, field: string): void {
    if (!Number.isInteger(pos) || pos < 0 || pos > this.len) {
      this.fail(field, `offset ${String(pos)} is outside the ${String(this.len)}-byte payload`);
    }
    this.pos = pos;
  }

  /** Requires the payload to end here (fixed-size messages take no extra bytes). */
  end(): void {
    if (this.pos !== this.len) {
      this.fail('payload', `has ${String(this.len - this.pos)} unexpected trailing bytes (expected ${String(this.pos)}, got ${String(this.len)})`);
    }
  }
}

/**
 * Little-endian writer into a caller's buffer. Values are checked against the field width; a bad
 * value or a too-small buffer is a caller bug and throws `RangeError`/`TypeError`.
 */
export class Writer {
  /** Current absolute position in the buffer. */
  pos: number;
  readonly buffer: Uint8Array;
  private readonly view: DataView;
  private readonly limit: number;

  /**
   * @param buffer destination
   * @param offset first byte to write
   * @param end one past the last byte that may be written (default: end of `buffer`)
   */
  constructor(buffer: Uint8Array, offset = 0, end = buffer.byteLength) {
    if (!Number.isInteger(offset) || !Number.isInteger(end) || offset < 0 || end > buffer.byteLength || offset > end) {
      throw new RangeError(`Expected writer range [${String(offset)}, ${String(end)}) to lie inside the buffer`);
    }
    this.buffer = buffer;
    this.view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
    this.pos = offset;
    this.limit = end;
  }

  /** A writer over a new zero-filled `Buffer` of `size` bytes. */
  static alloc(size: number): Writer {
    return new Writer(Buffer.alloc(size));
  }

  private room(n: number, field: string): void {
    if (n > this.limit - this.pos) {
      throw new RangeError(`Expected room for ${field} (${String(n)} bytes) at offset ${String(this.pos)}; the buffer ends at ${String(this.limit)}`);
    }
  }

  u8(value: number, field: string): this {
    checkUint(value, 0xff, field);
    this.room(1, field);
    this.view.setUint8(this.pos, value);
    this.pos += 1;
    return this;
  }

  u16(value: number, field: string): this {
    checkUint(value, 0xffff, field);
    this.room(2, field);
    this.view.setUint16(this.pos, value, true);
    this.pos += 2;
    return this;
  }

  u32(value: number, field: string): this {
    checkUint(value, U32_MAX, field);
    this.room(4, field);
    this.view.setUint32(this.pos, value, true);
    this.pos += 4;
    return this;
  }

  u64(value: bigint, field: string): this {
    checkU64(value, field);
    this.room(8, field);
    this.view.setBigUint64(this.pos, value, true);
    this.pos += 8;
    return this;
  }

  /** Copies `src` (the only copying write; hot paths use iovecs instead). */
  bytes(src: Uint8Array, field: string): this {
    this.room(src.byteLength, field);
    this.buffer.set(src, this.pos);
    this.pos += src.byteLength;
    return this;
  }

  /** Writes `n` zero bytes (reserved and padding fields). */
  zeros(n: number, field: string): this {
    this.room(n, field);
    this.buffer.fill(0, this.pos, this.pos + n);
    this.pos += n;
    return this;
  }

  /** The written buffer, after checking that it was filled exactly (encoder self-check). */
  finish(): Buffer {
    if (this.pos !== this.limit) {
      throw new Error(`internal: encoder wrote ${String(this.pos)} of ${String(this.limit)} bytes`);
    }
    const b = this.buffer;
    return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  }
}

/** Throws unless `value` is an integer in `[0, max]`. */
export function checkUint(value: number, max: number, field: string): void {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > max) {
    throw new RangeError(`Expected ${field} to be an integer in [0, ${String(max)}], got ${String(value)}`);
  }
}

/** Throws unless `value` is a bigint in `[0, 2^64 - 1]`. */
export function checkU64(value: bigint, field: string): void {
  if (typeof value !== 'bigint') {
    throw new TypeError(`Expected ${field} to be a bigint, got ${typeof value}`);
  }
  if (value < 0n || value > U64_MAX) {
    throw new RangeError(`Expected ${field} to be a u64, got ${value.toString()}`);
  }
}

/** Throws unless `data` is a `Uint8Array` (Buffer included). */
export function checkBytes(data: unknown, field: string): asserts data is Uint8Array {
  if (!(data instanceof Uint8Array)) {
    throw new TypeError(`Expected ${field} to be a Uint8Array or Buffer`);
  }
}

/**
 * Decodes a header-only payload (replies of `DMA_MAP`, `DEVICE_SET_IRQS`, `DEVICE_RESET`, ...).
 *
 * @returns null
 * @throws {ProtocolError} if the payload is not empty.
 */
export function decodeEmpty(payload: Uint8Array, what: string): null {
  if (payload.byteLength !== 0) {
    throw new ProtocolError(`${what}: expected no payload, got ${String(payload.byteLength)} bytes`, { field: 'payload' });
  }
  return null;
}
