/**
 * The 16-byte message header (reference 1.4) and the receiver's header checks (1.5).
 *
 * ```
 * abs  size  field
 *  0    2    msg_id     chosen by the command's sender, echoed in the reply
 *  2    2    command    command number; a reply carries its command's number
 *  4    4    msg_size   size of the whole message, header included (>= 16)
 *  8    4    flags      bits 0-3 type (0 command, 1 reply), 0x10 NO_REPLY, 0x20 ERROR
 * 12    4    error      errno in an error reply, else 0
 * ```
 *
 * {@link encodeHeader} and {@link readHeader} neither allocate nor create a `DataView`; they are
 * meant for the transport's hot path.
 *
 * @packageDocumentation
 */
import { Command, Defaults, Errno, HEADER_SIZE, HeaderFlags, PayloadSize, commandSender, isKnownCommand } from './constants';
import { checkUint, U32_MAX } from './codec';
import { ProtocolError, normalizeErrno } from './errors';

/** A decoded message header. Field names follow the spec (`msg_id` -> `msgId`, ...). */
export interface Header {
  /** `msg_id` (u16). */
  msgId: number;
  /** `command` (u16). */
  command: number;
  /** `msg_size` (u32): the whole message, header included. */
  msgSize: number;
  /** `flags` (u32), see {@link HeaderFlags}. */
  flags: number;
  /** `error` (u32): errno of an error reply. */
  error: number;
}

/** Fields of a header to encode; `flags` and `error` default to 0 (a command). */
export interface HeaderInit {
  msgId: number;
  command: number;
  msgSize: number;
  flags?: number;
  error?: number;
}

/** A header object to reuse with {@link readHeader}. */
export function createHeader(): Header {
  return { msgId: 0, command: 0, msgSize: 0, flags: 0, error: 0 };
}

function putU16(buf: Uint8Array, o: number, v: number): void {
  buf[o] = v & 0xff;
  buf[o + 1] = v >>> 8;
}

function putU32(buf: Uint8Array, o: number, v: number): void {
  buf[o] = v & 0xff;
  buf[o + 1] = (v >>> 8) & 0xff;
  buf[o + 2] = (v >>> 16) & 0xff;
  buf[o + 3] = v >>> 24;
}

function getU16(buf: Uint8Array, o: number): number {
  return buf[o]! | (buf[o + 1]! << 8);
}

function getU32(buf: Uint8Array, o: number): number {
  return (buf[o]! | (buf[o + 1]! << 8) | (buf[o + 2]! << 16)) + buf[o + 3]! * 0x1000000;
}

/**
 * Writes a header into `buf` at `offset` without allocating.
 *
 * @throws {RangeError} if a field does not fit its width, `msgSize` < 16, or `buf` has no room.
 */
export function encodeHeader(buf: Uint8Array, offset: number, header: HeaderInit): void {
  const flags = header.flags ?? 0;
  const error = header.error ?? 0;
  checkUint(header.msgId, 0xffff, 'msgId');
  checkUint(header.command, 0xffff, 'command');
  checkUint(header.msgSize, U32_MAX, 'msgSize');
  checkUint(flags, U32_MAX, 'flags');
  checkUint(error, U32_MAX, 'error');
  if (header.msgSize < HEADER_SIZE) {
    throw new RangeError(`Expected msgSize to be at least ${String(HEADER_SIZE)}, got ${String(header.msgSize)}`);
  }
  if (!Number.isInteger(offset) || offset < 0 || offset + HEADER_SIZE > buf.byteLength) {
    throw new RangeError(`Expected room for a ${String(HEADER_SIZE)}-byte header at offset ${String(offset)}`);
  }
  putU16(buf, offset, header.msgId);
  putU16(buf, offset + 2, header.command);
  putU32(buf, offset + 4, header.msgSize);
  putU32(buf, offset + 8, flags);
  putU32(buf, offset + 12, error);
}

/**
 * Reads the header at `offset` into `out` (no allocation) and returns `out`.
 *
 * @throws {ProtocolError} if fewer than 16 bytes are available.
 */
export function readHeader(buf: Uint8Array, offset: number, out: Header): Header {
  if (!Number.isInteger(offset) || offset < 0 || offset + HEADER_SIZE > buf.byteLength) {
    throw new ProtocolError(`header: truncated: needs ${String(HEADER_SIZE)} bytes at offset ${String(offset)} of ${String(buf.byteLength)}`, { field: 'header' });
  }
  out.msgId = getU16(buf, offset);
  out.command = getU16(buf, offset + 2);
  out.msgSize = getU32(buf, offset + 4);
  out.flags = getU32(buf, offset + 8);
  out.error = getU32(buf, offset + 12);
  return out;
}

/** Decodes the header at `offset` (default 0) into a new object. */
export function decodeHeader(buf: Uint8Array, offset = 0): Header {
  return readHeader(buf, offset, createHeader());
}

type FlagsOf = number | { readonly flags: number };
const flagsOf = (h: FlagsOf): number => (typeof h === 'number' ? h : h.flags);

/** Type bits (0-3) of a header or flags word. */
export function messageType(h: FlagsOf): number {
  return flagsOf(h) & HeaderFlags.TYPE_MASK;
}

/** True if the message is a command (Type 0). */
export function isCommand(h: FlagsOf): boolean {
  return messageType(h) === HeaderFlags.TYPE_COMMAND;
}

/** True if the message is a reply (Type 1). */
export function isReply(h: FlagsOf): boolean {
  return messageType(h) === HeaderFlags.TYPE_REPLY;
}

/** True if the message is an error reply (Type 1 with the Error flag). */
export function isError(h: FlagsOf): boolean {
  const f = flagsOf(h);
  return (f & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_REPLY && (f & HeaderFlags.ERROR) !== 0;
}

/** True if the message is a command whose sender wants no reply (No_reply, reference 1.8). */
export function noReply(h: FlagsOf): boolean {
  const f = flagsOf(h);
  return (f & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_COMMAND && (f & HeaderFlags.NO_REPLY) !== 0;
}

/**
 * The errno of an error reply, normalised (0 or > 4096 -> `EINVAL`); 0 if `header` is not an error
 * reply.
 */
export function errorOf(header: Header): number {
  return isError(header) ? normalizeErrno(header.error) : 0;
}

/**
 * Writes a 16-byte error reply (flags `REPLY | ERROR`, reference 1.4 / Appendix B.3) at `offset`.
 */
export function encodeErrorReply(buf: Uint8Array, offset: number, msgId: number, command: number, errno: number): void {
  if (!Number.isInteger(errno) || errno <= 0) {
    throw new RangeError(`Expected errno to be a positive integer, got ${String(errno)}`);
  }
  encodeHeader(buf, offset, {
    msgId,
    command,
    msgSize: HEADER_SIZE,
    flags: HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR,
    error: errno,
  });
}

/**
 * A whole message (header + payload) in a new Buffer, for non-hot paths and tests. `msgSize` is
 * computed from the payload.
 */
export function encodeMessage(header: Omit<HeaderInit, 'msgSize'>, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const out = Buffer.allocUnsafe(HEADER_SIZE + payload.byteLength);
  encodeHeader(out, 0, { ...header, msgSize: out.byteLength });
  out.set(payload, HEADER_SIZE);
  return out;
}

/** Verdict of {@link validateHeader}. All verdicts are shared frozen constants. */
export type HeaderVerdict =
  /** The header is acceptable; read the payload and dispatch. */
  | { readonly action: 'accept' }
  /** Read and discard the payload, then answer with `errno` (unless the command is No_reply). */
  | { readonly action: 'reject'; readonly errno: number; readonly reason: string }
  /** The stream is corrupt or hostile: close the connection without reading further. */
  | { readonly action: 'close'; readonly reason: string };

/** Limits for {@link validateHeader}. */
export interface HeaderLimits {
  /**
   * The `max_data_xfer_size` this side announced: the largest data count it accepts in a
   * data-transfer command (default 1 MiB).
   */
  maxDataXferSize?: number;
  /**
   * Messages larger than this cannot be valid at all and close the stream (reference 1.5 step 3).
   * Default: 16 + 16 + max(maxDataXferSize, 1 MiB), i.e. libvfio-user's 1 MiB + 32.
   */
  maxMsgSize?: number;
  /**
   * The receiving side. When given, commands that this side never receives are refused: a server
   * answers `EINVAL` (libvfio-user), a client `ENOSYS` (QEMU).
   */
  receiver?: 'server' | 'client';
}

const freeze = <T extends HeaderVerdict>(v: T): T => Object.freeze(v);

/** Shared verdicts of {@link validateHeader}. */
export const HeaderVerdicts = {
  ACCEPT: freeze({ action: 'accept' }),
  BAD_TYPE: freeze({ action: 'close', reason: 'message type is neither command nor reply' }),
  TOO_SHORT: freeze({ action: 'close', reason: 'msg_size is smaller than the header' }),
  TOO_BIG: freeze({ action: 'close', reason: 'msg_size exceeds the largest acceptable message' }),
  NO_PAYLOAD: freeze({ action: 'reject', errno: Errno.EINVAL, reason: 'command requires a payload' }),
  PAYLOAD_TOO_BIG: freeze({ action: 'reject', errno: Errno.EINVAL, reason: 'payload is larger than this command allows' }),
  UNKNOWN_COMMAND: freeze({ action: 'reject', errno: Errno.EINVAL, reason: 'unknown command' }),
  WRONG_DIRECTION_SERVER: freeze({ action: 'reject', errno: Errno.EINVAL, reason: 'command is not sent to a server' }),
  WRONG_DIRECTION_CLIENT: freeze({ action: 'reject', errno: Errno.ENOSYS, reason: 'command is not sent to a client' }),
} as const;

/**
 * Largest payload a command may carry (reference 2): the fixed size for fixed-size commands, fixed
 * part + `maxDataXferSize` for data transfers, `Infinity` where only the general message limit
 * applies (VERSION, SET_IRQS, REGION_WRITE_MULTI, DEVICE_FEATURE) or the command is unknown.
 */
export function maxCommandPayload(command: number, maxDataXferSize: number = Defaults.MAX_DATA_XFER_SIZE): number {
  switch (command) {
    case Command.DMA_MAP:
      return PayloadSize.DMA_MAP;
    case Command.DMA_UNMAP:
      return PayloadSize.DMA_UNMAP + PayloadSize.BITMAP_HEADER;
    case Command.DEVICE_GET_INFO:
      return PayloadSize.DEVICE_INFO;
    case Command.DEVICE_GET_REGION_INFO:
      return PayloadSize.REGION_INFO;
    case Command.DEVICE_GET_REGION_IO_FDS:
      return PayloadSize.REGION_IO_FDS_FIXED;
    case Command.DEVICE_GET_IRQ_INFO:
      return PayloadSize.IRQ_INFO;
    case Command.REGION_READ:
      return PayloadSize.REGION_ACCESS_FIXED;
    case Command.REGION_WRITE:
      return PayloadSize.REGION_ACCESS_FIXED + maxDataXferSize;
    case Command.DMA_READ:
      return PayloadSize.DMA_ACCESS_FIXED;
    case Command.DMA_WRITE:
      return PayloadSize.DMA_ACCESS_FIXED + maxDataXferSize;
    case Command.DEVICE_RESET:
      return 0;
    case Command.DIRTY_PAGES:
      return PayloadSize.DIRTY_PAGES_FIXED + PayloadSize.BITMAP_RANGE;
    case Command.MIG_DATA_READ:
      return PayloadSize.MIG_DATA_FIXED;
    case Command.MIG_DATA_WRITE:
      return PayloadSize.MIG_DATA_FIXED + maxDataXferSize;
    default:
      return Infinity;
  }
}

/**
 * Checks a received header before its payload is read, in libvfio-user's order (`is_valid_header`):
 *
 * 1. type: neither command nor reply -> close (reference 1.4 recommendation);
 * 2. minimum size: `msg_size` < 16 -> close;
 * 3. payload required: a command other than `DEVICE_RESET` with no payload -> reject `EINVAL`;
 * 4. maximum size: above `maxMsgSize` -> close; a command above its own maximum
 *    ({@link maxCommandPayload}) -> reject `EINVAL` after draining;
 * 5. commands only: unknown number -> reject `EINVAL`; wrong direction (if `receiver` is given) ->
 *    reject `EINVAL` (server) / `ENOSYS` (client).
 *
 * Replies pass steps 1, 2 and the general size limit; matching them to a command (and the
 * tighter limit that command's `argsz` implies) is the transport's job.
 */
export function validateHeader(header: Header, limits: HeaderLimits = {}): HeaderVerdict {
  const type = header.flags & HeaderFlags.TYPE_MASK;
  if (type !== HeaderFlags.TYPE_COMMAND && type !== HeaderFlags.TYPE_REPLY) return HeaderVerdicts.BAD_TYPE;
  if (header.msgSize < HEADER_SIZE) return HeaderVerdicts.TOO_SHORT;
  const command = type === HeaderFlags.TYPE_COMMAND;
  if (command && header.msgSize === HEADER_SIZE && header.command !== Command.DEVICE_RESET) {
    return HeaderVerdicts.NO_PAYLOAD;
  }
  const maxData = limits.maxDataXferSize ?? Defaults.MAX_DATA_XFER_SIZE;
  const maxMsg = limits.maxMsgSize ??
    HEADER_SIZE + PayloadSize.REGION_ACCESS_FIXED + Math.max(maxData, Defaults.MAX_DATA_XFER_SIZE);
  if (header.msgSize > maxMsg) return HeaderVerdicts.TOO_BIG;
  if (!command) return HeaderVerdicts.ACCEPT;
  if (header.msgSize - HEADER_SIZE > maxCommandPayload(header.command, maxData)) return HeaderVerdicts.PAYLOAD_TOO_BIG;
  if (!isKnownCommand(header.command)) return HeaderVerdicts.UNKNOWN_COMMAND;
  if (limits.receiver !== undefined && commandSender(header.command) === limits.receiver) {
    return limits.receiver === 'server' ? HeaderVerdicts.WRONG_DIRECTION_SERVER : HeaderVerdicts.WRONG_DIRECTION_CLIENT;
  }
  return HeaderVerdicts.ACCEPT;
}
