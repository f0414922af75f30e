/**
 * Little-endian register helpers and {@link RegisterLayout}, the power-on image of a block of
 * registers (a capability, the configuration header) with its write masks.
 *
 * Every PCI register is little-endian. The helpers take sizes 1, 2 and 4 only: config space and
 * capability registers are at most 32 bits wide, and wider fields are built from dwords.
 *
 * @packageDocumentation
 */

/** Width of a register in bytes. */
export type RegisterSize = 1 | 2 | 4;

/** Reads an unsigned little-endian integer of `size` bytes (no bounds check beyond the array's). */
export function getLE(bytes: Uint8Array, offset: number, size: RegisterSize): number {
  let value = 0;
  for (let i = size - 1; i >= 0; i--) value = value * 256 + (bytes[offset + i] ?? 0);
  return value;
}

/** Writes the low `size` bytes of `value` little-endian. */
export function putLE(bytes: Uint8Array, offset: number, size: RegisterSize, value: number): void {
  let rest = value >>> 0;
  for (let i = 0; i < size; i++) {
    bytes[offset + i] = rest & 0xff;
    rest >>>= 8;
  }
}

/**
 * Throws RangeError unless `[offset, offset + length)` lies within `[0, limit)`.
 * Shared by every bounds check so the wording is the same everywhere.
 */
export function checkRange(what: string, offset: number, length: number, limit: number): void {
  if (!Number.isInteger(offset) || offset < 0 || !Number.isInteger(length) || length < 0) {
    throw new RangeError(`Expected ${what} offset and length to be non-negative integers, got ${offset}+${length}`);
  }
  if (offset + length > limit) {
    throw new RangeError(`${what} access ${hex(offset)}+${length} is outside the ${limit}-byte space`);
  }
}

/** `0x1f`-style formatting for messages. */
export function hex(value: number | bigint): string {
  return `0x${value.toString(16)}`;
}

/** Per-register masks of {@link RegisterLayout.define}. */
export interface RegisterMasks {
  /** Bits the guest may change. Default 0: read-only. */
  writable?: number;
  /** Bits the guest clears by writing 1 (write-1-to-clear). Default 0. */
  w1c?: number;
}

/**
 * Power-on values plus write masks of a block of registers, all `length` bytes long.
 *
 * A guest write of byte `b` at `i` yields `((old & ~writable) | (b & writable)) & ~(b & w1c)`.
 * Bytes not defined stay zero and read-only, which is what reserved fields must read as.
 */
export class RegisterLayout {
  /** Power-on values. */
  readonly values: Uint8Array;
  /** Bits the guest may change. */
  readonly writable: Uint8Array;
  /** Bits the guest clears by writing 1. */
  readonly w1c: Uint8Array;

  constructor(readonly length: number) {
    this.values = new Uint8Array(length);
    this.writable = new Uint8Array(length);
    this.w1c = new Uint8Array(length);
  }

  /** Defines one register: its power-on value and masks. Returns `this` for chaining. */
  define(offset: number, size: RegisterSize, value: number, masks: RegisterMasks = {}): this {
    checkRange('register layout', offset, size, this.length);
    putLE(this.values, offset, size, value);
    putLE(this.writable, offset, size, masks.writable ?? 0);
    putLE(this.w1c, offset, size, masks.w1c ?? 0);
    return this;
  }

  /** Copies `bytes` in as power-on values, optionally with a per-byte writable mask. */
  defineBytes(offset: number, bytes: Uint8Array, writable?: Uint8Array): this {
    checkRange('register layout', offset, bytes.length, this.length);
    if (writable !== undefined && writable.length !== bytes.length) {
      throw new RangeError(`Expected writable mask of ${bytes.length} bytes, got ${writable.length}`);
    }
    this.values.set(bytes, offset);
    if (writable !== undefined) this.writable.set(writable, offset);
    return this;
  }
}
