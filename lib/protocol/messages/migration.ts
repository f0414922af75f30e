/**
 * `MIG_DATA_READ` (17) and `MIG_DATA_WRITE` (18), migration v2 data transfer (reference 3.17,
 * 3.18, 8.12, 8.13).
 *
 * ```
 * MIG_DATA_READ request (8)      reply (8 + size, maybe padded)   MIG_DATA_WRITE request (8 + size)
 *  0 4 argsz  >= 8 + size         0 4 argsz  8 + size              0 4 argsz  8 + size
 *  4 4 size   bytes wanted        4 4 size   bytes returned        4 4 size
 *                                 8 n data                         8 n data
 * ```
 *
 * libvfio-user pads its read reply to the *requested* size, so the reply's data is `size` bytes
 * whatever `msg_size` says. The `MIG_DATA_WRITE` reply is header-only.
 *
 * @packageDocumentation
 */
import { PayloadSize } from '../constants';
import { EMPTY, Reader, Writer, checkBytes, decodeEmpty } from '../codec';

/** `MIG_DATA_READ` request. */
export interface MigDataReadRequest {
  /** Largest reply payload accepted (>= 8 + size). */
  argsz: number;
  /** Bytes wanted. */
  size: number;
}

/** `MIG_DATA_READ` reply, or `MIG_DATA_WRITE` request. */
export interface MigData {
  argsz: number;
  /** Bytes of data. */
  size: number;
  /** The data (zero-copy view of `size` bytes). */
  data: Buffer;
}

const FIXED = PayloadSize.MIG_DATA_FIXED;

/** Encodes a `MIG_DATA_READ` request (`argsz` default 8 + `size`). */
export function encodeMigDataReadRequest(m: { size: number; argsz?: number }): Buffer {
  return Writer.alloc(FIXED).u32(m.argsz ?? FIXED + m.size, 'argsz').u32(m.size, 'size').finish();
}

/**
 * Decodes a `MIG_DATA_READ` request.
 *
 * @throws {ProtocolError} unless exactly 8 bytes with `argsz` >= 8 + `size` (libvfio-user's check).
 */
export function decodeMigDataReadRequest(payload: Uint8Array): MigDataReadRequest {
  const r = new Reader(payload, 'MIG_DATA_READ request');
  const argsz = r.u32('argsz');
  const size = r.u32('size');
  r.end();
  if (argsz < FIXED + size) r.fail('argsz', `${String(argsz)} has no room for ${String(size)} bytes of data`);
  return { argsz, size };
}

function encodeData(m: { data: Uint8Array; argsz?: number }): Buffer {
  checkBytes(m.data, 'data');
  const size = FIXED + m.data.byteLength;
  return Writer.alloc(size).u32(m.argsz ?? size, 'argsz').u32(m.data.byteLength, 'size').bytes(m.data, 'data').finish();
}

/** Encodes a `MIG_DATA_READ` reply (`argsz` = 8 + data length). */
export function encodeMigDataReadReply(m: { data: Uint8Array }): Buffer {
  return encodeData(m);
}

/**
 * Decodes a `MIG_DATA_READ` reply. Trusts `size`, not the payload length: bytes after the `size`
 * bytes of data are padding (libvfio-user quirk) and are ignored.
 *
 * @throws {ProtocolError} if shorter than 8 + `size` bytes.
 */
export function decodeMigDataReadReply(payload: Uint8Array): MigData {
  const r = new Reader(payload, 'MIG_DATA_READ reply');
  const argsz = r.u32('argsz');
  const size = r.u32('size');
  if (size > r.remaining) r.fail('size', `${String(size)} exceeds the ${String(r.remaining)} data bytes present`);
  return { argsz, size, data: r.bytes(size, 'data') };
}

/** Encodes a `MIG_DATA_WRITE` request (`argsz` default 8 + data length, as libvfio-user requires). */
export function encodeMigDataWriteRequest(m: { data: Uint8Array; argsz?: number }): Buffer {
  return encodeData(m);
}

/**
 * Decodes a `MIG_DATA_WRITE` request.
 *
 * @throws {ProtocolError} unless exactly 8 + `size` bytes with `argsz` >= 8.
 */
export function decodeMigDataWriteRequest(payload: Uint8Array): MigData {
  const r = new Reader(payload, 'MIG_DATA_WRITE request');
  const argsz = r.u32('argsz');
  const size = r.u32('size');
  if (size !== r.remaining) r.fail('size', `${String(size)} disagrees with the ${String(r.remaining)} data bytes`);
  const data = r.bytes(size, 'data');
  if (argsz < FIXED) r.fail('argsz', `${String(argsz)} is below ${String(FIXED)}`);
  return { argsz, size, data };
}

/** Encodes a `MIG_DATA_WRITE` reply (header only). */
export function encodeMigDataWriteReply(): Buffer {
  return EMPTY;
}

/** Decodes a `MIG_DATA_WRITE` reply (must be empty). */
export function decodeMigDataWriteReply(payload: Uint8Array): null {
  return decodeEmpty(payload, 'MIG_DATA_WRITE reply');
}
