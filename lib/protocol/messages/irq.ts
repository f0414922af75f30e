/**
 * `DEVICE_GET_IRQ_INFO` (7) and `DEVICE_SET_IRQS` (8), requests and replies (reference 3.7, 3.8).
 *
 * ```
 * IRQ_INFO request/reply (16)        SET_IRQS request (20 + data)
 *  0 4 argsz                           0 4 argsz   20 + data length (request size, not a reply size)
 *  4 4 flags  reply: IrqInfoFlags      4 4 flags   one DATA_* bit | one ACTION_* bit
 *  8 4 index                           8 4 index
 * 12 4 count  reply: vectors           12 4 start
 *                                      16 4 count
 *                                      20 n data   DATA_BOOL only: one byte per vector
 * ```
 *
 * With `DATA_EVENTFD` the eventfds travel out of band (`SCM_RIGHTS`): exactly `count` of them, or
 * none to de-assign. The codec only reports how many are expected ({@link setIrqsFdCount},
 * {@link setIrqsFdsValid}). The `DEVICE_SET_IRQS` reply is header-only.
 *
 * @packageDocumentation
 */
import { IrqSetFlags, PayloadSize } from '../constants';
import { EMPTY, Reader, Writer, checkBytes, decodeEmpty } from '../codec';

/** `DEVICE_GET_IRQ_INFO` request and reply (same layout). */
export interface IrqInfo {
  argsz: number;
  /** Reply: {@link IrqInfoFlags}; request: 0. */
  flags: number;
  /** IRQ index ({@link PciIrq}). */
  index: number;
  /** Reply: number of vectors (0 = unsupported); request: 0. */
  count: number;
}

function encodeIrqInfo(m: Partial<IrqInfo> & { index: number }): Buffer {
  return Writer.alloc(PayloadSize.IRQ_INFO)
    .u32(m.argsz ?? PayloadSize.IRQ_INFO, 'argsz')
    .u32(m.flags ?? 0, 'flags')
    .u32(m.index, 'index')
    .u32(m.count ?? 0, 'count')
    .finish();
}

function decodeIrqInfo(payload: Uint8Array, what: string): IrqInfo {
  const r = new Reader(payload, what);
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const index = r.u32('index');
  const count = r.u32('count');
  r.end();
  if (argsz < PayloadSize.IRQ_INFO) r.fail('argsz', `${String(argsz)} is below ${String(PayloadSize.IRQ_INFO)}`);
  return { argsz, flags, index, count };
}

/** Encodes a `DEVICE_GET_IRQ_INFO` request (`argsz` default 16). */
export function encodeIrqInfoRequest(m: { index: number; argsz?: number }): Buffer {
  return encodeIrqInfo(m);
}

/**
 * Decodes a `DEVICE_GET_IRQ_INFO` request.
 *
 * @throws {ProtocolError} unless exactly 16 bytes with `argsz` >= 16.
 */
export function decodeIrqInfoRequest(payload: Uint8Array): IrqInfo {
  return decodeIrqInfo(payload, 'DEVICE_GET_IRQ_INFO request');
}

/** Encodes a `DEVICE_GET_IRQ_INFO` reply (`argsz` default 16). */
export function encodeIrqInfoReply(m: Omit<IrqInfo, 'argsz'> & { argsz?: number }): Buffer {
  return encodeIrqInfo(m);
}

/**
 * Decodes a `DEVICE_GET_IRQ_INFO` reply.
 *
 * @throws {ProtocolError} unless exactly 16 bytes with `argsz` >= 16.
 */
export function decodeIrqInfoReply(payload: Uint8Array): IrqInfo {
  return decodeIrqInfo(payload, 'DEVICE_GET_IRQ_INFO reply');
}

/** `DEVICE_SET_IRQS` request. */
export interface SetIrqsRequest {
  /** 20 + data length. */
  argsz: number;
  /** One `DATA_*` and one `ACTION_*` bit of {@link IrqSetFlags}. */
  flags: number;
  /** IRQ index. */
  index: number;
  /** First vector affected. */
  start: number;
  /** Number of vectors affected. */
  count: number;
  /** `DATA_BOOL` only: `count` bytes (zero-copy view); otherwise null. */
  data: Buffer | null;
}

/** Fields of a `DEVICE_SET_IRQS` request to encode (`argsz` is computed). */
export interface SetIrqsInit {
  flags: number;
  index: number;
  start: number;
  count: number;
  /** Required with `DATA_BOOL` (exactly `count` bytes), forbidden otherwise. */
  data?: Uint8Array | null;
}

const isPowerOfTwo = (v: number): boolean => v !== 0 && (v & (v - 1)) === 0;

/** Payload size of a `DEVICE_SET_IRQS` request: 20, plus `count` with `DATA_BOOL`. */
export function setIrqsPayloadSize(flags: number, count: number): number {
  return PayloadSize.IRQ_SET_FIXED + ((flags & IrqSetFlags.DATA_BOOL) !== 0 ? count : 0);
}

/** Encodes a `DEVICE_SET_IRQS` request (B.4). */
export function encodeSetIrqsRequest(m: SetIrqsInit): Buffer {
  const isBool = (m.flags & IrqSetFlags.DATA_BOOL) !== 0;
  const data = m.data ?? null;
  if (isBool) {
    checkBytes(data, 'data');
    if (data.byteLength !== m.count) {
      throw new RangeError(`Expected data to hold count (${String(m.count)}) bytes, got ${String(data.byteLength)}`);
    }
  } else if (data !== null) {
    throw new TypeError('Expected no data without DATA_BOOL');
  }
  const size = setIrqsPayloadSize(m.flags, m.count);
  const w = Writer.alloc(size);
  w.u32(size, 'argsz').u32(m.flags, 'flags').u32(m.index, 'index').u32(m.start, 'start').u32(m.count, 'count');
  if (data !== null) w.bytes(data, 'data');
  return w.finish();
}

/**
 * Decodes a `DEVICE_SET_IRQS` request.
 *
 * @throws {ProtocolError} if shorter than 20 bytes; if `flags` does not hold exactly one DATA and one
 * ACTION bit (or holds other bits); if the payload is not exactly 20 (+ `count` with `DATA_BOOL`)
 * bytes; if `argsz` differs from the payload length.
 */
export function decodeSetIrqsRequest(payload: Uint8Array): SetIrqsRequest {
  const r = new Reader(payload, 'DEVICE_SET_IRQS request');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const index = r.u32('index');
  const start = r.u32('start');
  const count = r.u32('count');
  const dataType = flags & IrqSetFlags.DATA_TYPE_MASK;
  const action = flags & IrqSetFlags.ACTION_TYPE_MASK;
  if ((flags & ~(IrqSetFlags.DATA_TYPE_MASK | IrqSetFlags.ACTION_TYPE_MASK)) !== 0) {
    r.fail('flags', `0x${flags.toString(16)} has unknown bits`);
  }
  if (!isPowerOfTwo(dataType)) r.fail('flags', `0x${flags.toString(16)} needs exactly one DATA_* bit`);
  if (!isPowerOfTwo(action)) r.fail('flags', `0x${flags.toString(16)} needs exactly one ACTION_* bit`);
  let data: Buffer | null = null;
  if (dataType === IrqSetFlags.DATA_BOOL) {
    if (count !== r.remaining) r.fail('count', `${String(count)} disagrees with the ${String(r.remaining)} DATA_BOOL bytes`);
    data = r.rest('data');
  }
  r.end();
  if (argsz !== payload.byteLength) r.fail('argsz', `${String(argsz)} is not the ${String(payload.byteLength)}-byte request size`);
  return { argsz, flags, index, start, count, data };
}

/**
 * Number of eventfds a `DEVICE_SET_IRQS` request expects: `count` with `DATA_EVENTFD`, else 0.
 * With `DATA_EVENTFD`, zero fds is also valid (de-assign); see {@link setIrqsFdsValid}.
 */
export function setIrqsFdCount(req: Pick<SetIrqsRequest, 'flags' | 'count'>): number {
  return (req.flags & IrqSetFlags.DATA_EVENTFD) !== 0 ? req.count : 0;
}

/**
 * True if `received` fds are acceptable for `req` (reference 3.8): with `DATA_EVENTFD` exactly
 * `count` or none; otherwise none.
 */
export function setIrqsFdsValid(req: Pick<SetIrqsRequest, 'flags' | 'count'>, received: number): boolean {
  return received === 0 || received === setIrqsFdCount(req);
}

/** Encodes a `DEVICE_SET_IRQS` reply (header only). */
export function encodeSetIrqsReply(): Buffer {
  return EMPTY;
}

/** Decodes a `DEVICE_SET_IRQS` reply (must be empty). */
export function decodeSetIrqsReply(payload: Uint8Array): null {
  return decodeEmpty(payload, 'DEVICE_SET_IRQS reply');
}
