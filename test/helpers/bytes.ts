/**
 * Byte helpers for protocol tests: golden vectors written as hex, little-endian field builders,
 * and small mutations for rejection tests.
 */
import fc from 'fast-check';

/** Bytes from hex text; whitespace, `_` and `,` are ignored (`hex('01 00 ff')`). */
export function hex(text: string): Buffer {
  const clean = text.replace(/[\s_,]/g, '');
  if (!/^(?:[0-9a-fA-F]{2})*$/.test(clean)) throw new Error(`bad hex: ${text}`);
  return Buffer.from(clean, 'hex');
}

/**
 * Bytes from a hex dump in the reference's Appendix B format:
 * `0000: 01 00 01 00 ...   comment`. Each line starts with its offset; up to 16 byte tokens
 * follow; anything after the first token that is not a two-digit hex byte is a comment.
 * Offsets must be consecutive.
 */
export function dump(text: string): Buffer {
  const out: number[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '') continue;
    const m = /^([0-9a-fA-F]{4}):\s+(.*)$/.exec(line);
    if (m === null) throw new Error(`bad dump line: ${line}`);
    if (parseInt(m[1]!, 16) !== out.length) throw new Error(`dump offset ${m[1]!} is not ${out.length.toString(16)}`);
    const tokens = m[2]!.split(/\s+/);
    for (let i = 0; i < tokens.length && i < 16; i++) {
      if (!/^[0-9a-fA-F]{2}$/.test(tokens[i]!)) break;
      out.push(parseInt(tokens[i]!, 16));
    }
  }
  return Buffer.from(out);
}

/** `'01 00 ff'` for bytes. */
export function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex').replace(/(..)(?!$)/g, '$1 ');
}

export function u8(v: number): Buffer {
  return Buffer.from([v]);
}

export function u16le(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(v);
  return b;
}

export function u32le(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v);
  return b;
}

export function u64le(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
}

/** Concatenates byte arrays (plain number arrays allowed). */
export function concat(...parts: (Uint8Array | number[])[]): Buffer {
  return Buffer.concat(parts.map((p) => (p instanceof Uint8Array ? p : Buffer.from(p))));
}

/** The payload of a whole message (bytes after the 16-byte header), as a view. */
export function payloadOf(message: Uint8Array): Buffer {
  return Buffer.from(message.buffer, message.byteOffset + 16, message.byteLength - 16);
}

/** A copy of `bytes` with the u32 at `offset` replaced. */
export function withU32(bytes: Uint8Array, offset: number, value: number): Buffer {
  const b = Buffer.from(bytes);
  b.writeUInt32LE(value, offset);
  return b;
}

/** A copy of `bytes` with the u64 at `offset` replaced. */
export function withU64(bytes: Uint8Array, offset: number, value: bigint): Buffer {
  const b = Buffer.from(bytes);
  b.writeBigUInt64LE(value, offset);
  return b;
}

/** A copy of `bytes` without its last byte. */
export function truncated(bytes: Uint8Array, by = 1): Buffer {
  return Buffer.from(bytes.subarray(0, bytes.byteLength - by));
}

/** A copy of `bytes` with `n` extra zero bytes. */
export function extended(bytes: Uint8Array, n = 1): Buffer {
  return Buffer.concat([bytes, Buffer.alloc(n)]);
}

/** A copy of `bytes` placed at `offset` of a larger pool buffer (exercises byteOffset handling). */
export function atOffset(bytes: Uint8Array, offset = 13): Buffer {
  const pool = Buffer.alloc(offset + bytes.byteLength + 7, 0xee);
  pool.set(bytes, offset);
  return pool.subarray(offset, offset + bytes.byteLength);
}

// fast-check arbitraries for wire fields

export const arbU16 = fc.integer({ min: 0, max: 0xffff });
export const arbU32 = fc.integer({ min: 0, max: 0xffff_ffff });
export const arbU64 = fc.bigInt({ min: 0n, max: 0xffff_ffff_ffff_ffffn });
export const arbBytes = (maxLength = 64): fc.Arbitrary<Buffer> =>
  fc.uint8Array({ maxLength }).map((a) => Buffer.from(a));
