/**
 * One NBD connection: the fixed newstyle handshake (NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_GO with
 * the export name and NBD_INFO_BLOCK_SIZE, or NBD_OPT_EXPORT_NAME for servers without it), then the
 * transmission phase with many commands in flight, their replies matched by handle.
 *
 * Reads land in the caller's buffers (zero-copy views of guest memory) without a copy when the
 * data is large: the socket is given the destination itself as its next read buffer (the public
 * `onread` option of `net.connect`, whose buffer function is asked for a buffer before every
 * read), sized to exactly the bytes of data still due in that buffer, so the kernel copies the
 * payload straight into guest memory. Headers, small payloads and destination pieces under 16 KiB
 * (one read call per guest page would cost more than the copy) go through one 64 KiB scratch
 * buffer; while big reads are in flight, replies are read header first so that their data is not
 * swallowed by a scratch read.
 *
 * Everything the server sends is checked: magics, handles (a reply for a handle not in flight),
 * chunk types and lengths (a chunk larger than its request or than an error chunk can be),
 * bounds and overlap of data and hole chunks, and that a read's chunks cover all of it (a short
 * read). A violation is an {@link NbdProtocolError}: the connection is dropped at once and the
 * commands in flight on it fail with it. A connection that ends without a violation (the server
 * went away, ESHUTDOWN, a command with no reply within `requestTimeoutMs`) hands its commands in
 * flight back through `onClose` for the owner to retry elsewhere: their outcome is unknown, and
 * none of them was acknowledged.
 *
 * @packageDocumentation
 */
import * as net from 'node:net';
import {
  Chunk,
  ChunkFlags,
  ClientFlags,
  Cmd,
  DEFAULT_MAX_PAYLOAD,
  HandshakeFlags,
  Info,
  MAX_STRING,
  NbdErrno,
  NbdError,
  NbdProtocolError,
  NbdReplyError,
  Option,
  Reply,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  Size,
  decodeErrorChunk,
  decodeExportNameReply,
  decodeGreeting,
  decodeInfo,
  decodeOptionReplyHeader,
  encodeClientFlags,
  encodeGoData,
  encodeOption,
  encodeRequest,
  errnoName,
  optionErrorText,
  type ExportInfo,
} from './protocol';
import { formatNbdTarget, type NbdTarget } from './uri';

/** One command, from submission to its final reply. The owner creates it; connections run it. */
export interface NbdOp {
  type: number;
  flags: number;
  /** Byte offset and length in the export. */
  offset: number;
  length: number;
  /** READ: destinations, WRITE: sources, back to back, `length` bytes in all; otherwise null. */
  bufs: readonly Buffer[] | null;
  /** Called once: null on success, else the error. */
  done: (err: Error | null) => void;
  // Per attempt (set by the connection running it).
  seq: number;
  slot: number;
  sentAt: number;
  /** READ: bytes the reply has covered so far, and the covered ranges when chunks come out of order. */
  covered: number;
  ranges: number[] | null;
  /** The first error chunk of the reply. */
  error: Error | null;
  // Owner's bookkeeping.
  /** Connections lost while this command was in flight on them. */
  attempts: number;
  /** While waiting for a connection: when to give up (ms, performance.now()). */
  deadline: number;
}

/** A new command record. */
export function newOp(type: number, flags: number, offset: number, length: number, bufs: readonly Buffer[] | null, done: (err: Error | null) => void): NbdOp {
  return { type, flags, offset, length, bufs, done, seq: 0, slot: 0, sentAt: 0, covered: 0, ranges: null, error: null, attempts: 0, deadline: 0 };
}

/** Options of {@link NbdConnection.connect}. */
export interface NbdConnectOptions {
  /** Ask for structured replies (default true; servers without them get simple replies). */
  structuredReplies?: boolean;
  /** Deadline for connecting and the whole handshake, ms (default 10000). */
  timeoutMs?: number;
  /** A command without its final reply for this long drops the connection (ms; default 60000; 0: never). */
  requestTimeoutMs?: number;
}

/** What a connection negotiated. */
export interface NbdConnectionInfo extends ExportInfo {
  /** Structured replies were negotiated. */
  structured: boolean;
  /** The server could not take NBD_OPT_GO (so no block size constraints were stated). */
  legacyExportName: boolean;
}

/** Read buffer for headers and small payloads. */
const SCRATCH_SIZE = 64 * 1024;
/** Data due for a destination buffer is read straight into it when at least this much is due
 * there: smaller pieces (a list of single guest pages) cost less to copy out of the scratch buffer
 * than one read call each. */
const DIRECT_PIECE = 16 * 1024;
/**
 * While a read at least this large is in flight, or was the last read sent, replies are read
 * header first (a short read of a data chunk's header and offset), so that its data lands in the
 * destination, not the scratch. (The buffer for a read is chosen when the previous read is
 * handled, before anyone knows what comes next: hence the last read sent as a hint.)
 */
const BIG_READ = 32 * 1024;
/** A structured reply header and the offset of a data chunk. */
const HEADER_READ = Size.STRUCTURED_REPLY + 8;
/** Longest option reply accepted during the handshake. */
const MAX_OPTION_REPLY = 64 * 1024;
/** Pieces of one read reply that are neither in order nor reversed (each new chunk is checked against all). */
const MAX_RANGES = 1024;
/** Longest error chunk payload: error, message length, message, offset. */
const MAX_ERROR_CHUNK = 14 + MAX_STRING;

const enum State {
  HEADER,
  PAYLOAD,
  DATA,
}

const enum After {
  /** Payload: an OFFSET_DATA chunk's offset; data: the chunk's data. */
  OFFSET_DATA,
  OFFSET_HOLE,
  ERROR_CHUNK,
  /** Data of a simple reply to a read. */
  SIMPLE_READ,
}

const CMD_NAMES = ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'];
const cmdName = (type: number) => `NBD_CMD_${CMD_NAMES[type] ?? type}`;

export class NbdConnection {
  /** Called once when the connection ends: null for close(), else why; `retry` are the commands
   * that were in flight and whose outcome is unknown (empty after a protocol violation, which
   * fails them). */
  onClose: ((err: Error | null, retry: NbdOp[]) => void) | null = null;

  readonly target: NbdTarget;
  #info: NbdConnectionInfo | null = null;
  readonly #socket: net.Socket;
  readonly #scratch = Buffer.allocUnsafe(SCRATCH_SIZE);
  readonly #headerView = this.#scratch.subarray(0, HEADER_READ);
  /** Reads of at least BIG_READ bytes in flight; whether the last read sent was one. */
  #bigReads = 0;
  #lastReadBig = false;
  /** The buffer the next socket read goes into: the scratch, or a slice of a read's destination. */
  #next: Buffer;
  #direct = false;
  #phase: 'handshake' | 'open' | 'closing' | 'closed' = 'handshake';
  readonly #requestTimeoutMs: number;

  // Handshake: bytes received and not yet consumed, and who waits for them.
  #hsChunks: Buffer[] = [];
  #hsBytes = 0;
  #hsWaiter: { n: number; resolve: (b: Buffer) => void; reject: (err: Error) => void } | null = null;
  #hsError: Error | null = null;

  // Transmission: commands in flight by slot (handle = seq:slot).
  #slots: (NbdOp | null)[] = [];
  #free: number[] = [];
  #inFlight = 0;
  #seq = 0;
  #corked = false;
  #timer: NodeJS.Timeout | null = null;
  #closed: Promise<void>;
  #resolveClosed!: () => void;

  // Reply parser.
  #state = State.HEADER;
  readonly #hdr = Buffer.alloc(Size.STRUCTURED_REPLY);
  #hdrHave = 0;
  #hdrNeed = 4;
  #payload = Buffer.alloc(64);
  #payloadHave = 0;
  #payloadNeed = 0;
  #after = After.OFFSET_DATA;
  #chunkFlags = 0;
  #chunkLength = 0;
  #chunkType = 0;
  #op: NbdOp | null = null;
  #dataPos = 0;
  #dataLeft = 0;

  private constructor(target: NbdTarget, options: NbdConnectOptions) {
    this.target = target;
    this.#requestTimeoutMs = options.requestTimeoutMs ?? 60_000;
    this.#next = this.#scratch;
    this.#closed = new Promise((resolve) => (this.#resolveClosed = resolve));
    const onread = {
      buffer: () => this.#next,
      callback: (n: number, buf: Uint8Array) => {
        this.#onRead(n, buf);
        return true;
      },
    };
    this.#socket = 'socket' in target ? net.connect({ path: target.socket, onread }) : net.connect({ host: target.host, port: target.port, onread });
    this.#socket.on('error', (err) => this.#ended(err));
    this.#socket.on('close', () => this.#ended(new NbdError(`NBD server ${formatNbdTarget(this.target)} closed the connection`, 'ECONNRESET')));
    if (!('socket' in target)) {
      this.#socket.setNoDelay(true);
      this.#socket.setKeepAlive(true, 10_000);
    }
  }

  /** Connects and negotiates; rejects with the reason (refused, unknown export, not NBD, timeout). */
  static async connect(target: NbdTarget, options: NbdConnectOptions = {}): Promise<NbdConnection> {
    const conn = new NbdConnection(target, options);
    const timeoutMs = options.timeoutMs ?? 10_000;
    const timer = setTimeout(() => conn.#socket.destroy(new NbdError(`NBD handshake with ${formatNbdTarget(target)} timed out after ${timeoutMs} ms`, 'ETIMEDOUT')), timeoutMs);
    try {
      await conn.#handshake(options.structuredReplies ?? true);
    } catch (err) {
      conn.#socket.destroy();
      conn.#phase = 'closed';
      conn.#resolveClosed();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    return conn;
  }

  /** The export as this connection negotiated it. */
  get info(): NbdConnectionInfo {
    return this.#info!;
  }

  /** Read data bytes received straight into the destination, and through the scratch buffer. */
  bytesDirect = 0;
  bytesCopied = 0;

  /** Commands in flight. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** True until the connection is closing or closed. */
  get open(): boolean {
    return this.#phase === 'open';
  }

  /** Sends a command; its `done` is called with the outcome (or it comes back through onClose). */
  submit(op: NbdOp): void {
    if (this.#phase !== 'open') throw new Error('NbdConnection is not open');
    let slot = this.#free.pop();
    if (slot === undefined) {
      slot = this.#slots.length;
      this.#slots.push(null);
    }
    this.#seq = (this.#seq + 1) >>> 0;
    op.seq = this.#seq;
    op.slot = slot;
    op.sentAt = performance.now();
    op.covered = 0;
    op.ranges = null;
    op.error = null;
    this.#slots[slot] = op;
    if (op.type === Cmd.READ) {
      this.#lastReadBig = op.length >= BIG_READ;
      if (this.#lastReadBig) this.#bigReads++;
    }
    if (this.#inFlight++ === 0) this.#startTimer();
    const header = Buffer.allocUnsafe(Size.REQUEST);
    encodeRequest(header, 0, op.flags, op.type, op.seq, slot, op.offset, op.length);
    if (!this.#corked) {
      // Everything submitted in this tick leaves in one writev.
      this.#corked = true;
      this.#socket.cork();
      process.nextTick(this.#uncork);
    }
    this.#socket.write(header);
    if (op.type === Cmd.WRITE) for (const b of op.bufs!) if (b.length > 0) this.#socket.write(b);
  }

  /** Waits for the commands in flight, then disconnects cleanly (NBD_CMD_DISC). */
  close(): Promise<void> {
    if (this.#phase === 'open') {
      this.#phase = 'closing';
      if (this.#inFlight === 0) this.#disconnect();
    } else if (this.#phase === 'handshake') {
      this.#socket.destroy();
    }
    return this.#closed;
  }

  /** Drops the connection now; the commands in flight come back through onClose. */
  destroy(err: Error = new NbdError('NBD connection dropped', 'ECONNABORTED')): void {
    this.#lose(err);
  }

  // ---- handshake ----

  async #handshake(structured: boolean): Promise<void> {
    const greeting = decodeGreeting(await this.#read(Size.GREETING));
    const fixed = (greeting.handshakeFlags & HandshakeFlags.FIXED_NEWSTYLE) !== 0;
    const noZeroes = (greeting.handshakeFlags & HandshakeFlags.NO_ZEROES) !== 0;
    this.#socket.write(encodeClientFlags((fixed ? ClientFlags.FIXED_NEWSTYLE : 0) | (noZeroes ? ClientFlags.NO_ZEROES : 0)));
    const name = this.target.exportName;
    let info: NbdConnectionInfo | null = null;
    let useStructured = false;
    if (fixed) {
      if (structured) {
        const reply = await this.#option(Option.STRUCTURED_REPLY, Buffer.alloc(0));
        if (reply.type === Reply.ACK) useStructured = true;
        else if ((reply.type & 0x8000_0000) === 0) throw new NbdProtocolError(`unexpected reply ${reply.type} to NBD_OPT_STRUCTURED_REPLY`);
      }
      info = await this.#go(name, useStructured);
    }
    if (info === null) {
      // No NBD_OPT_GO: NBD_OPT_EXPORT_NAME, whose only failure report is a closed connection.
      this.#socket.write(encodeOption(Option.EXPORT_NAME, Buffer.from(name, 'utf8')));
      let reply: Buffer;
      try {
        reply = await this.#read(Size.EXPORT_NAME_REPLY + (noZeroes ? 0 : Size.EXPORT_NAME_ZEROES));
      } catch (err) {
        if ((err as NbdError).code === 'ECONNRESET') throw new NbdError(`the NBD server refused export '${name}' (it closed the connection)`, 'ENOENT');
        throw err;
      }
      const { size, flags } = decodeExportNameReply(reply);
      info = { size, flags, minBlock: 1, preferredBlock: 4096, maxPayload: DEFAULT_MAX_PAYLOAD, structured: useStructured, legacyExportName: true };
    }
    this.#info = info;
    this.#phase = 'open';
    // Anything the server sent early is transmission data: parse it (it can only be a violation).
    const early = this.#hsBytes > 0 ? this.#take(this.#hsBytes) : null;
    this.#hsChunks = [];
    if (early !== null) this.#parse(early, 0, early.length);
  }

  /** NBD_OPT_GO; null if the server does not know it. */
  async #go(name: string, structured: boolean): Promise<NbdConnectionInfo | null> {
    this.#socket.write(encodeOption(Option.GO, encodeGoData(name, [Info.BLOCK_SIZE])));
    const info: Partial<ExportInfo> = {};
    for (;;) {
      const reply = await this.#optionReply(Option.GO);
      if (reply.type === Reply.INFO) {
        decodeInfo(reply.data, info);
        continue;
      }
      if (reply.type === Reply.ACK) {
        if (info.size === undefined || info.flags === undefined) throw new NbdProtocolError('NBD_OPT_GO succeeded without NBD_INFO_EXPORT');
        return {
          size: info.size,
          flags: info.flags,
          minBlock: info.minBlock ?? 1,
          preferredBlock: info.preferredBlock ?? 4096,
          maxPayload: info.maxPayload === undefined || info.maxPayload === 0xffffffff ? DEFAULT_MAX_PAYLOAD : info.maxPayload,
          structured,
          legacyExportName: false,
        };
      }
      if (reply.type === Reply.ERR_UNSUP) return null;
      if (reply.type === Reply.ERR_UNKNOWN) throw new NbdError(`the NBD server has no export '${name}'${reply.data.length > 0 ? ` (${reply.data.toString('utf8')})` : ''}`, 'ENOENT');
      if (reply.type === Reply.ERR_TLS_REQD) throw new NbdError('the NBD server requires TLS, which this client does not support', 'EACCES');
      if ((reply.type & 0x8000_0000) !== 0) throw new NbdError(`the NBD server refused export '${name}': ${optionErrorText(reply.type, reply.data)}`, 'EIO');
      throw new NbdProtocolError(`unexpected reply ${reply.type} to NBD_OPT_GO`);
    }
  }

  /** Sends an option and reads its single reply. */
  async #option(option: number, data: Buffer): Promise<{ type: number; data: Buffer }> {
    this.#socket.write(encodeOption(option, data));
    return this.#optionReply(option);
  }

  async #optionReply(option: number): Promise<{ type: number; data: Buffer }> {
    const header = decodeOptionReplyHeader(await this.#read(Size.OPTION_REPLY_HEADER));
    if (header.option !== option) throw new NbdProtocolError(`option reply for option ${header.option} while waiting for ${option}`);
    if (header.length > MAX_OPTION_REPLY) throw new NbdProtocolError(`option reply of ${header.length} bytes (at most ${MAX_OPTION_REPLY} accepted)`);
    const data = header.length > 0 ? await this.#read(header.length) : Buffer.alloc(0);
    return { type: header.type, data };
  }

  #read(n: number): Promise<Buffer> {
    if (this.#hsError !== null) return Promise.reject(this.#hsError);
    if (this.#hsBytes >= n) return Promise.resolve(this.#take(n));
    return new Promise((resolve, reject) => (this.#hsWaiter = { n, resolve, reject }));
  }

  #take(n: number): Buffer {
    const all = this.#hsChunks.length === 1 ? this.#hsChunks[0]! : Buffer.concat(this.#hsChunks);
    const out = all.subarray(0, n);
    this.#hsChunks = all.length > n ? [all.subarray(n)] : [];
    this.#hsBytes -= n;
    return out;
  }

  // ---- receiving ----

  #onRead(n: number, buf: Uint8Array): void {
    try {
      if (this.#direct) {
        // The kernel put `n` bytes of data straight into the destination.
        this.#direct = false;
        this.bytesDirect += n;
        this.#dataPos += n;
        this.#dataLeft -= n;
        if (this.#dataLeft === 0) this.#dataDone();
      } else if (this.#phase === 'handshake') {
        this.#hsChunks.push(Buffer.from(buf.subarray(0, n)));
        this.#hsBytes += n;
        // Nothing in the handshake is this long: a server flooding it is not one to wait for.
        if (this.#hsBytes > MAX_OPTION_REPLY + SCRATCH_SIZE) throw new NbdProtocolError(`the NBD server sent ${this.#hsBytes} bytes of handshake unasked`);
        const w = this.#hsWaiter;
        if (w !== null && this.#hsBytes >= w.n) {
          this.#hsWaiter = null;
          w.resolve(this.#take(w.n));
        }
        return;
      } else if (this.#phase !== 'closed') {
        this.#parse(this.#scratch, 0, n);
      }
      this.#planNextRead();
    } catch (err) {
      this.#violation(err instanceof NbdError ? err : new NbdProtocolError(String((err as Error).message)));
    }
  }

  /**
   * Chooses the next read buffer: the rest of the current destination when enough data is due;
   * else the scratch, or only its first bytes while a big read is in flight (one more read call
   * per reply, instead of copying the data of a big read that arrives in the same read).
   */
  #planNextRead(): void {
    if (this.#phase === 'closed') {
      this.#next = this.#scratch;
      return;
    }
    if (this.#state === State.DATA && this.#dataLeft >= DIRECT_PIECE) {
      const bufs = this.#op!.bufs!;
      let pos = this.#dataPos;
      let i = 0;
      while (pos >= bufs[i]!.length) pos -= bufs[i++]!.length;
      // The rest of this destination buffer, if long enough to be worth a read call of its own.
      const b = bufs[i]!;
      const n = Math.min(b.length - pos, this.#dataLeft);
      if (n >= DIRECT_PIECE) {
        this.#next = b.subarray(pos, pos + n);
        this.#direct = true;
        return;
      }
      this.#next = this.#scratch;
      return;
    }
    this.#next = (this.#bigReads > 0 || this.#lastReadBig) && this.#state !== State.DATA ? this.#headerView : this.#scratch;
  }

  #parse(b: Buffer, at: number, end: number): void {
    while (at < end && this.#phase !== 'closed') {
      switch (this.#state) {
        case State.HEADER: {
          const n = Math.min(this.#hdrNeed - this.#hdrHave, end - at);
          b.copy(this.#hdr, this.#hdrHave, at, at + n);
          this.#hdrHave += n;
          at += n;
          if (this.#hdrHave < this.#hdrNeed) break;
          if (this.#hdrNeed === 4) {
            const magic = this.#hdr.readUInt32BE(0);
            if (magic === SIMPLE_REPLY_MAGIC) this.#hdrNeed = Size.SIMPLE_REPLY;
            else if (magic === STRUCTURED_REPLY_MAGIC && this.#info!.structured) this.#hdrNeed = Size.STRUCTURED_REPLY;
            else throw new NbdProtocolError(`bad NBD reply magic 0x${magic.toString(16)}`);
            break;
          }
          this.#hdrHave = 0;
          const structured = this.#hdrNeed === Size.STRUCTURED_REPLY;
          this.#hdrNeed = 4;
          if (structured) this.#onChunkHeader();
          else this.#onSimpleReply();
          break;
        }
        case State.PAYLOAD: {
          const n = Math.min(this.#payloadNeed - this.#payloadHave, end - at);
          b.copy(this.#payload, this.#payloadHave, at, at + n);
          this.#payloadHave += n;
          at += n;
          if (this.#payloadHave === this.#payloadNeed) this.#onPayload();
          break;
        }
        case State.DATA: {
          const n = Math.min(this.#dataLeft, end - at);
          copyIntoBufs(this.#op!.bufs!, this.#dataPos, b, at, n);
          this.bytesCopied += n;
          this.#dataPos += n;
          this.#dataLeft -= n;
          at += n;
          if (this.#dataLeft === 0) this.#dataDone();
          break;
        }
      }
    }
  }

  #lookup(): NbdOp {
    const seq = this.#hdr.readUInt32BE(8);
    const slot = this.#hdr.readUInt32BE(12);
    const op = slot < this.#slots.length ? this.#slots[slot] : null;
    if (op == null || op.seq !== seq) throw new NbdProtocolError(`NBD reply for unknown handle 0x${this.#hdr.toString('hex', 8, 16)}`);
    return op;
  }

  #onSimpleReply(): void {
    const error = this.#hdr.readUInt32BE(4);
    const op = this.#lookup();
    if (op.type === Cmd.READ && this.#info!.structured) throw new NbdProtocolError('simple reply to NBD_CMD_READ after structured replies were negotiated');
    if (error !== 0) {
      this.#finish(op, replyError(op, error, ''));
      return;
    }
    if (op.type === Cmd.READ && op.length > 0) {
      this.#op = op;
      this.#startData(0, op.length, After.SIMPLE_READ);
      return;
    }
    this.#finish(op, null);
  }

  #onChunkHeader(): void {
    const flags = this.#hdr.readUInt16BE(4);
    const type = this.#hdr.readUInt16BE(6);
    const length = this.#hdr.readUInt32BE(16);
    const op = this.#lookup();
    this.#op = op;
    this.#chunkFlags = flags;
    this.#chunkType = type;
    this.#chunkLength = length;
    const read = op.type === Cmd.READ;
    switch (type) {
      case Chunk.NONE:
        if (length !== 0) throw new NbdProtocolError(`NBD_REPLY_TYPE_NONE with a ${length}-byte payload`);
        if ((flags & ChunkFlags.DONE) === 0) throw new NbdProtocolError('NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE');
        this.#chunkDone();
        return;
      case Chunk.OFFSET_DATA:
        if (!read) throw new NbdProtocolError(`data chunk in the reply to ${cmdName(op.type)}`);
        if (length <= 8 || length - 8 > op.length) throw new NbdProtocolError(`data chunk of ${length} bytes for a ${op.length}-byte read`);
        this.#startPayload(8, After.OFFSET_DATA);
        return;
      case Chunk.OFFSET_HOLE:
        if (!read) throw new NbdProtocolError(`hole chunk in the reply to ${cmdName(op.type)}`);
        if (length !== 12) throw new NbdProtocolError(`hole chunk of ${length} bytes (12 expected)`);
        this.#startPayload(12, After.OFFSET_HOLE);
        return;
      default:
        if ((type & 0x8000) === 0) throw new NbdProtocolError(`unexpected NBD reply chunk type ${type} for ${cmdName(op.type)}`);
        // Error chunks (and unknown types with bit 15: errors too, by the specification).
        if (length < 6 || length > MAX_ERROR_CHUNK) throw new NbdProtocolError(`error chunk of ${length} bytes (6 to ${MAX_ERROR_CHUNK} accepted)`);
        this.#startPayload(length, After.ERROR_CHUNK);
    }
  }

  #startPayload(n: number, after: After): void {
    if (this.#payload.length < n) this.#payload = Buffer.alloc(Math.max(n, 2 * this.#payload.length));
    this.#payloadHave = 0;
    this.#payloadNeed = n;
    this.#after = after;
    this.#state = State.PAYLOAD;
  }

  #onPayload(): void {
    const op = this.#op!;
    const p = this.#payload;
    this.#state = State.HEADER;
    switch (this.#after) {
      case After.OFFSET_DATA: {
        const at = Number(p.readBigUInt64BE(0)) - op.offset;
        const n = this.#chunkLength - 8;
        cover(op, at, n);
        this.#startData(at, n, After.OFFSET_DATA);
        return;
      }
      case After.OFFSET_HOLE: {
        const at = Number(p.readBigUInt64BE(0)) - op.offset;
        const n = p.readUInt32BE(8);
        if (n === 0) throw new NbdProtocolError('hole chunk of 0 bytes');
        cover(op, at, n);
        fillBufs(op.bufs!, at, n);
        this.#chunkDone();
        return;
      }
      case After.ERROR_CHUNK: {
        const type = this.#chunkType;
        const known = type === Chunk.ERROR || type === Chunk.ERROR_OFFSET;
        const e = decodeErrorChunk(known ? type : Chunk.ERROR, p.subarray(0, this.#payloadNeed));
        if (e.offset !== undefined && (e.offset < op.offset || e.offset >= op.offset + Math.max(op.length, 1))) {
          throw new NbdProtocolError(`error chunk offset ${e.offset} outside its request`);
        }
        op.error ??= replyError(op, e.errno, e.message);
        this.#chunkDone();
        return;
      }
      default:
        throw new NbdProtocolError('internal: payload without a handler');
    }
  }

  #startData(at: number, n: number, after: After): void {
    this.#dataPos = at;
    this.#dataLeft = n;
    this.#after = after;
    this.#state = State.DATA;
  }

  #dataDone(): void {
    this.#state = State.HEADER;
    if (this.#after === After.SIMPLE_READ) this.#finish(this.#op!, null);
    else this.#chunkDone();
  }

  #chunkDone(): void {
    this.#state = State.HEADER;
    if ((this.#chunkFlags & ChunkFlags.DONE) === 0) return;
    const op = this.#op!;
    if (op.error === null && op.type === Cmd.READ && op.covered !== op.length) {
      throw new NbdProtocolError(`short read: the server finished a ${op.length}-byte read after ${op.covered} bytes`);
    }
    this.#finish(op, op.error);
  }

  /** The final reply of `op` arrived. */
  #finish(op: NbdOp, err: Error | null): void {
    if (err !== null && (err as NbdReplyError).errno === NbdErrno.ESHUTDOWN) {
      // The server is going away: disconnect softly; this command and the others are retried.
      this.#sendDisc();
      this.#lose(new NbdError(`NBD server ${formatNbdTarget(this.target)} is shutting down`, 'ESHUTDOWN'));
      return;
    }
    this.#slots[op.slot] = null;
    this.#free.push(op.slot);
    this.#op = null;
    if (op.type === Cmd.READ && op.length >= BIG_READ) this.#bigReads--;
    if (--this.#inFlight === 0) {
      this.#stopTimer();
      if (this.#phase === 'closing') this.#disconnect();
    }
    op.done(err);
  }

  // ---- endings ----

  /** A protocol violation: drop the connection, fail what was in flight on it. */
  #violation(err: NbdError): void {
    if (this.#phase === 'closed') return;
    if (this.#phase === 'handshake') {
      this.#hsFail(err);
      this.#socket.destroy();
      return;
    }
    const ops = this.#drop();
    for (const op of ops) op.done(err);
    this.#notifyClose(err, []);
  }

  /** The connection ended without a violation: hand the commands in flight back. */
  #lose(err: Error): void {
    if (this.#phase === 'closed') return;
    if (this.#phase === 'handshake') {
      this.#hsFail(err);
      this.#socket.destroy();
      return;
    }
    const ops = this.#drop();
    this.#notifyClose(err, ops);
  }

  #ended(err: Error): void {
    if (this.#phase === 'handshake') {
      this.#hsFail(err);
      return;
    }
    this.#lose(err);
  }

  #hsFail(err: Error): void {
    this.#hsError ??= err;
    const w = this.#hsWaiter;
    this.#hsWaiter = null;
    w?.reject(err);
  }

  /** Destroys the socket (no read or write touches a caller's buffer after this) and takes every command in flight. */
  #drop(): NbdOp[] {
    this.#phase = 'closed';
    this.#direct = false;
    this.#next = this.#scratch;
    this.#socket.destroy();
    this.#stopTimer();
    const ops: NbdOp[] = [];
    for (const op of this.#slots) if (op !== null) ops.push(op);
    this.#slots = [];
    this.#free = [];
    this.#inFlight = 0;
    this.#bigReads = 0;
    this.#op = null;
    return ops;
  }

  #notifyClose(err: Error | null, retry: NbdOp[]): void {
    this.#resolveClosed();
    const cb = this.onClose;
    this.onClose = null;
    cb?.(err, retry);
  }

  #sendDisc(): void {
    const header = Buffer.alloc(Size.REQUEST);
    encodeRequest(header, 0, 0, Cmd.DISC, 0, 0, 0, 0);
    this.#socket.end(header);
  }

  #disconnect(): void {
    this.#sendDisc();
    this.#phase = 'closed';
    this.#stopTimer();
    const timer = setTimeout(() => this.#socket.destroy(), 2000);
    timer.unref();
    this.#socket.once('close', () => clearTimeout(timer));
    this.#notifyClose(null, []);
  }

  #startTimer(): void {
    if (this.#requestTimeoutMs <= 0 || this.#timer !== null) return;
    const period = Math.max(50, Math.min(5000, this.#requestTimeoutMs / 4));
    this.#timer = setInterval(() => this.#checkTimeouts(), period);
    this.#timer.unref();
  }

  #stopTimer(): void {
    if (this.#timer === null) return;
    clearInterval(this.#timer);
    this.#timer = null;
  }

  #checkTimeouts(): void {
    const limit = performance.now() - this.#requestTimeoutMs;
    for (const op of this.#slots) {
      if (op !== null && op.sentAt < limit) {
        this.#lose(new NbdError(`no reply to ${cmdName(op.type)} from ${formatNbdTarget(this.target)} within ${this.#requestTimeoutMs} ms`, 'ETIMEDOUT'));
        return;
      }
    }
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
  };
}

function replyError(op: NbdOp, errno: number, message: string): NbdReplyError {
  return new NbdReplyError(errno, `${cmdName(op.type)} of ${op.length} bytes at ${op.offset} failed: ${errnoName(errno)}${message ? ` (${message})` : ''}`);
}

/** Records that a read reply covered `[at, at + n)` of the request; a violation if outside or overlapping. */
function cover(op: NbdOp, at: number, n: number): void {
  if (at < 0 || at + n > op.length) throw new NbdProtocolError(`reply chunk [${op.offset + at}, +${n}) outside the read [${op.offset}, +${op.length})`);
  const end = at + n;
  let r = op.ranges;
  if (r === null) {
    op.ranges = [at, end];
  } else {
    for (let i = 0; i < r.length; i += 2) {
      if (at < r[i + 1]! && end > r[i]!) throw new NbdProtocolError(`reply chunk [${op.offset + at}, +${n}) overlaps an earlier one`);
    }
    if (r[r.length - 1] === at) r[r.length - 1] = end;
    else if (r[r.length - 2] === end) r[r.length - 2] = at;
    else if (r.length >= 2 * MAX_RANGES) throw new NbdProtocolError(`a read reply in more than ${MAX_RANGES} scattered pieces`);
    else r.push(at, end);
  }
  op.covered += n;
}

/** Copies `n` bytes of `src` at `from` into the buffers `bufs` seen as one, at `pos`. */
function copyIntoBufs(bufs: readonly Buffer[], pos: number, src: Buffer, from: number, n: number): void {
  let i = 0;
  while (pos >= bufs[i]!.length) pos -= bufs[i++]!.length;
  while (n > 0) {
    const b = bufs[i++]!;
    const k = Math.min(n, b.length - pos);
    src.copy(b, pos, from, from + k);
    from += k;
    n -= k;
    pos = 0;
  }
}

/** Zeroes `n` bytes of the buffers `bufs` seen as one, at `pos`. */
function fillBufs(bufs: readonly Buffer[], pos: number, n: number): void {
  let i = 0;
  while (pos >= bufs[i]!.length) pos -= bufs[i++]!.length;
  while (n > 0) {
    const b = bufs[i++]!;
    const k = Math.min(n, b.length - pos);
    b.fill(0, pos, pos + k);
    n -= k;
    pos = 0;
  }
}
