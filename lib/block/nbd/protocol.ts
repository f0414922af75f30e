/**
 * The NBD protocol's constants and one pure encode/decode pair per message (the NetworkBlockDevice
 * project's doc/proto.md). Everything on the wire is big-endian. No I/O and no state here:
 * {@link NbdConnection} drives a socket with these.
 *
 * @packageDocumentation
 */

/** 'NBDMAGIC', the first 8 bytes the server sends. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': the newstyle server magic, and the magic of every option the client sends. */
export const IHAVEOPT = 0x49484156454f5054n;
/** The oldstyle server magic (refused: no export names, no options). */
export const CLISERV_MAGIC = 0x00420281861253n;
/** Magic of every option reply. */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** IANA port for newstyle NBD. */
export const NBD_DEFAULT_PORT = 10809;

/** Handshake flags (server, 16 bits). */
export const HandshakeFlags = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags (32 bits), each only if the server offered the matching handshake flag. */
export const ClientFlags = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Transmission flags (16 bits): what the export is and which commands it takes. */
export const TransmissionFlags = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

/** Options (the "option" field of the haggling phase). */
export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;

/** Option reply types; errors have bit 31 set. */
export const Reply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x8000_0001,
  ERR_POLICY: 0x8000_0002,
  ERR_INVALID: 0x8000_0003,
  ERR_PLATFORM: 0x8000_0004,
  ERR_TLS_REQD: 0x8000_0005,
  ERR_UNKNOWN: 0x8000_0006,
  ERR_SHUTDOWN: 0x8000_0007,
  ERR_BLOCK_SIZE_REQD: 0x8000_0008,
  ERR_TOO_BIG: 0x8000_0009,
} as const;

/** NBD_REP_INFO item types (NBD_OPT_INFO / NBD_OPT_GO). */
export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Commands of the transmission phase. */
export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

/** Command flags (16 bits). */
export const CmdFlags = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

/** Structured reply chunk flags. */
export const ChunkFlags = {
  DONE: 1 << 0,
} as const;

/** Structured reply chunk types; error chunks have bit 15 set. */
export const Chunk = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

/** Error values of replies (the errno most systems use for them). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** Sizes of the fixed parts of messages. */
export const Size = {
  /** NBDMAGIC + IHAVEOPT + handshake flags. */
  GREETING: 18,
  OPTION_HEADER: 16,
  OPTION_REPLY_HEADER: 20,
  /** NBD_OPT_EXPORT_NAME's answer: size, flags (and 124 zero bytes unless NO_ZEROES). */
  EXPORT_NAME_REPLY: 10,
  EXPORT_NAME_ZEROES: 124,
  REQUEST: 28,
  SIMPLE_REPLY: 16,
  STRUCTURED_REPLY: 20,
} as const;

/** Longest string (export name, error message) the protocol allows. */
export const MAX_STRING = 4096;
/** Largest request payload a client may send when the server states no maximum. */
export const DEFAULT_MAX_PAYLOAD = 32 * 2 ** 20;

/** An NBD failure, with an errno-style `code` (`ECONNREFUSED`, `ETIMEDOUT`, `EPROTO`, `EROFS`...). */
export class NbdError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
    this.name = 'NbdError';
  }
}

/** An NBD protocol violation by the peer (a lying or broken server): the connection is dropped. */
export class NbdProtocolError extends NbdError {
  constructor(message: string) {
    super(message, 'EPROTO');
    this.name = 'NbdProtocolError';
  }
}

/** The server's error in a reply, with its errno and message (if it sent one). */
export class NbdReplyError extends NbdError {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message, errnoName(errno));
    this.name = 'NbdReplyError';
  }
}

/** Errno name of an NBD error value. */
export function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(NbdErrno)) if (value === errno) return name;
  return `NBD_ERRNO_${errno}`;
}

/** Reply type name, for messages. */
export function replyName(type: number): string {
  for (const [name, value] of Object.entries(Reply)) if (value === type) return `NBD_REP_${name}`;
  return `reply type 0x${type.toString(16)}`;
}

// ---- handshake ----

/** The server's first 18 bytes, newstyle. */
export interface Greeting {
  handshakeFlags: number;
}

/** Decodes the greeting; throws NbdProtocolError for oldstyle or a wrong magic. */
export function decodeGreeting(b: Buffer): Greeting {
  if (b.readBigUInt64BE(0) !== NBDMAGIC) throw new NbdProtocolError('not an NBD server (no NBDMAGIC)');
  const magic = b.readBigUInt64BE(8);
  if (magic === CLISERV_MAGIC) throw new NbdProtocolError('the server speaks oldstyle NBD only (no export names); use a newstyle server');
  if (magic !== IHAVEOPT) throw new NbdProtocolError(`bad NBD handshake magic 0x${magic.toString(16)}`);
  return { handshakeFlags: b.readUInt16BE(16) };
}

/** The 4-byte client flags. */
export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

/** One option: header and data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(Size.OPTION_HEADER + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, Size.OPTION_HEADER);
  return b;
}

/** NBD_OPT_GO / NBD_OPT_INFO data: the export name and the info items asked for. */
export function encodeGoData(name: string, infos: readonly number[]): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  if (nameBytes.length > MAX_STRING) throw new RangeError(`NBD export name is ${nameBytes.length} bytes, more than ${MAX_STRING}`);
  const b = Buffer.alloc(4 + nameBytes.length + 2 + 2 * infos.length);
  b.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + nameBytes.length);
  infos.forEach((info, i) => b.writeUInt16BE(info, 6 + nameBytes.length + 2 * i));
  return b;
}

/** An option reply header. */
export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(b: Buffer): OptionReplyHeader {
  const magic = b.readBigUInt64BE(0);
  if (magic !== OPTION_REPLY_MAGIC) throw new NbdProtocolError(`bad option reply magic 0x${magic.toString(16)}`);
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

/** What the server tells about an export (NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE). */
export interface ExportInfo {
  /** Size in bytes. */
  size: number;
  /** Transmission flags. */
  flags: number;
  /** Block size constraints: 1, 4096 and {@link DEFAULT_MAX_PAYLOAD} when the server states none. */
  minBlock: number;
  preferredBlock: number;
  maxPayload: number;
}

/** An NBD_REP_INFO item of `info`. Returns the type; updates `info`. Unknown types are skipped. */
export function decodeInfo(b: Buffer, info: Partial<ExportInfo>): number {
  if (b.length < 2) throw new NbdProtocolError('NBD_REP_INFO without a type');
  const type = b.readUInt16BE(0);
  switch (type) {
    case Info.EXPORT:
      if (b.length !== 12) throw new NbdProtocolError(`NBD_INFO_EXPORT of ${b.length} bytes (expected 12)`);
      info.size = checkedSize(b.readBigUInt64BE(2));
      info.flags = b.readUInt16BE(10);
      break;
    case Info.BLOCK_SIZE: {
      if (b.length !== 14) throw new NbdProtocolError(`NBD_INFO_BLOCK_SIZE of ${b.length} bytes (expected 14)`);
      const min = b.readUInt32BE(2);
      const preferred = b.readUInt32BE(6);
      const max = b.readUInt32BE(10);
      if (!isPowerOf2(min) || min > 65536) throw new NbdProtocolError(`NBD minimum block size ${min} is not a power of 2 up to 64 KiB`);
      if (!isPowerOf2(preferred) || preferred < min) throw new NbdProtocolError(`NBD preferred block size ${preferred} is not a power of 2 of at least the minimum (${min})`);
      if (max !== 0xffffffff && (max < min || max % min !== 0)) throw new NbdProtocolError(`NBD maximum payload ${max} is not a multiple of the minimum block size (${min})`);
      info.minBlock = min;
      info.preferredBlock = preferred;
      info.maxPayload = max;
      break;
    }
    default:
      break; // NAME, DESCRIPTION and anything newer: not needed
  }
  return type;
}

/** NBD_OPT_EXPORT_NAME's answer (no block size constraints with it). */
export function decodeExportNameReply(b: Buffer): { size: number; flags: number } {
  return { size: checkedSize(b.readBigUInt64BE(0)), flags: b.readUInt16BE(8) };
}

/** The text of an option error reply's data. */
export function optionErrorText(type: number, data: Buffer): string {
  const text = data.length > 0 ? `: ${data.toString('utf8', 0, Math.min(data.length, MAX_STRING))}` : '';
  return `${replyName(type)}${text}`;
}

// ---- transmission ----

/** Writes a 28-byte request header into `b` at `at`. `handle` is split into two 32-bit halves. */
export function encodeRequest(b: Buffer, at: number, flags: number, type: number, handleHi: number, handleLo: number, offset: number, length: number): void {
  b.writeUInt32BE(REQUEST_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(handleHi >>> 0, at + 8);
  b.writeUInt32BE(handleLo >>> 0, at + 12);
  b.writeUInt32BE(Math.floor(offset / 0x1_0000_0000), at + 16);
  b.writeUInt32BE(offset >>> 0, at + 20);
  b.writeUInt32BE(length >>> 0, at + 24);
}

/** A decoded request (for tests and fake servers). */
export interface Request {
  flags: number;
  type: number;
  handle: bigint;
  offset: number;
  length: number;
}

export function decodeRequest(b: Buffer, at = 0): Request {
  const magic = b.readUInt32BE(at);
  if (magic !== REQUEST_MAGIC) throw new NbdProtocolError(`bad request magic 0x${magic.toString(16)}`);
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    handle: b.readBigUInt64BE(at + 8),
    offset: Number(b.readBigUInt64BE(at + 16)),
    length: b.readUInt32BE(at + 24),
  };
}

/** A simple reply header (for tests and fake servers). */
export function encodeSimpleReply(error: number, handle: bigint): Buffer {
  const b = Buffer.alloc(Size.SIMPLE_REPLY);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(handle, 8);
  return b;
}

/** A structured reply chunk: header and payload (for tests and fake servers). */
export function encodeChunk(flags: number, type: number, handle: bigint, payload: Buffer = Buffer.alloc(0), length = payload.length): Buffer {
  const b = Buffer.alloc(Size.STRUCTURED_REPLY + payload.length);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeUInt32BE(length >>> 0, 16);
  payload.copy(b, Size.STRUCTURED_REPLY);
  return b;
}

/** An error chunk's payload: error, message length, message (and the offset for ERROR_OFFSET). */
export function decodeErrorChunk(type: number, payload: Buffer): { errno: number; message: string; offset?: number } {
  const fixed = type === Chunk.ERROR_OFFSET ? 14 : 6;
  if (payload.length < fixed) throw new NbdProtocolError(`error chunk of ${payload.length} bytes (at least ${fixed} expected)`);
  const errno = payload.readUInt32BE(0);
  const messageLength = payload.readUInt16BE(4);
  if (messageLength > payload.length - fixed) throw new NbdProtocolError(`error chunk message of ${messageLength} bytes does not fit its ${payload.length}-byte chunk`);
  if (errno === 0) throw new NbdProtocolError('error chunk with error 0');
  const message = payload.toString('utf8', 6, 6 + messageLength);
  if (type === Chunk.ERROR_OFFSET) return { errno, message, offset: Number(payload.readBigUInt64BE(6 + messageLength)) };
  return { errno, message };
}

function isPowerOf2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

function checkedSize(size: bigint): number {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdProtocolError(`NBD export size ${size} is beyond 2^53`);
  return Number(size);
}
