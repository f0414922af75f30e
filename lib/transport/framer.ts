/**
 * Incremental framer: turns the socket's byte stream (plus the fds that arrive with it) into
 * vfio-user messages (reference §1.5, §1.6, Appendix C).
 *
 * The socket reads straight into {@link Framer.buffer} (no copy): call {@link Framer.prepare},
 * recvmsg into `buffer[writeOffset, writeOffset + writable)`, then {@link Framer.commit}. Complete
 * messages come out of {@link Framer.next}, which fills a caller-owned {@link FramedMessage} so the
 * steady state allocates nothing. A message's bytes are valid only until the next `prepare`.
 *
 * Fd attribution: Linux delivers the fds of one sendmsg with the first recvmsg that returns any
 * of its bytes, and that recvmsg stops at the end of that sendmsg's data. Senders put the header
 * first, so the fds of one recvmsg belong to the *last message whose header began inside the bytes
 * that recvmsg returned*. Fds that arrive with bytes in which no message begins are a protocol
 * violation; they are handed out as `strayFds` for the owner to close.
 */

export const HEADER_SIZE = 16;
const MSG_SIZE_OFFSET = 4;
/**
 * The buffer is allocated when the first bytes arrive, small: a connection that never speaks (or
 * only hangs up) costs nothing here, and one that only negotiates (or is turned away) a few KiB.
 * Until then reads go to one scratch buffer shared by every framer, and {@link Framer.commit}
 * copies what arrived into the framer's own buffer. Once a read fills the buffer (the peer sends in
 * bulk) it grows once to FULL_CAPACITY, and reads ask for MIN_READ.
 */
const FIRST_CAPACITY = 4 * 1024;
const FIRST_READ = 1024;
const FULL_CAPACITY = 64 * 1024;
/** Read at least this much per recvmsg once in bulk, so many small messages arrive in one call. */
const MIN_READ = 16 * 1024;
const EMPTY = Buffer.alloc(0);
let scratch: Buffer | null = null;

export interface FramedMessage {
  msgId: number;
  command: number;
  /** The whole message size from the header (>= 16). */
  size: number;
  flags: number;
  error: number;
  /** The receive buffer; the payload is `data[payloadOffset, payloadOffset + payloadLength)`. */
  data: Buffer;
  payloadOffset: number;
  /** 0 for an oversized message, whose payload was discarded (see `oversized`). */
  payloadLength: number;
  /** The message exceeded the framer's size limit; its payload is skipped, not buffered. */
  oversized: boolean;
  /** Fds that arrived with this message (owned by the receiver), or null. */
  fds: number[] | null;
}

export function emptyFramedMessage(): FramedMessage {
  return {
    msgId: 0,
    command: 0,
    size: 0,
    flags: 0,
    error: 0,
    data: EMPTY,
    payloadOffset: 0,
    payloadLength: 0,
    oversized: false,
    fds: null,
  };
}

/** Thrown by the framer when the stream can no longer be trusted (close the connection). */
export class FramingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FramingError';
  }
}

interface FdBatch {
  /** Absolute stream offset of the message these fds belong to. */
  start: number;
  fds: number[];
}

export class Framer {
  /** Receive buffer; bytes [readOffset, writeOffset) are received and not yet framed. */
  buffer: Buffer = EMPTY;
  writeOffset = 0;
  /** Messages framed so far (an oversized one counts when its header is framed). */
  framed = 0;
  private readOffset = 0;
  /** Absolute stream offset of buffer[0]. */
  private base = 0;
  /** Absolute offset of the first message start not yet examined for fd attribution. */
  private scanPos = 0;
  /** Payload bytes of an oversized message still to discard. */
  private skipping = 0;
  /** Smallest read {@link prepare} makes room for: FIRST_READ, then MIN_READ once in bulk. */
  private minRead = FIRST_READ;
  private readonly fdBatches: FdBatch[] = [];
  /** Fds that no message can own; the owner must close them. */
  strayFds: number[] = [];

  /** @param maxMessageSize largest message buffered whole; larger ones are reported, then skipped. */
  constructor(public maxMessageSize: number) {}

  /** Bytes that may be written at `writeOffset`. */
  get writable(): number {
    return this.buffer.length - this.writeOffset;
  }

  /** Bytes received and not yet framed. */
  get buffered(): number {
    return this.writeOffset - this.readOffset;
  }

  /** True while a message has begun to arrive and is not complete (or not yet fully skipped). */
  get partial(): boolean {
    return this.writeOffset > this.readOffset || this.skipping > 0;
  }

  /** Make room for the next read: at least `minRead`, or the rest of the message being received. */
  prepare(): void {
    if (this.readOffset === this.writeOffset) {
      this.base += this.readOffset;
      this.readOffset = this.writeOffset = 0;
      if (this.buffer.length === 0 || this.buffer === scratch) {
        // Nothing received yet: read into the shared scratch (commit copies out what arrives).
        this.buffer = scratch ??= Buffer.allocUnsafe(FIRST_CAPACITY);
        return;
      }
    }
    let want = this.minRead;
    const pending = this.writeOffset - this.readOffset;
    if (this.skipping === 0 && pending >= HEADER_SIZE) {
      const size = this.buffer.readUInt32LE(this.readOffset + MSG_SIZE_OFFSET);
      if (size <= this.maxMessageSize) want = Math.max(want, size - pending);
    }
    if (this.buffer.length - this.writeOffset >= want) return;
    const needed = pending + want;
    if (this.readOffset > 0 && needed <= this.buffer.length) {
      this.buffer.copyWithin(0, this.readOffset, this.writeOffset);
    } else {
      let capacity = Math.max(this.buffer.length * 2, this.minRead === MIN_READ ? FULL_CAPACITY : FIRST_CAPACITY);
      while (capacity < needed) capacity *= 2;
      const grown = Buffer.allocUnsafe(capacity);
      this.buffer.copy(grown, 0, this.readOffset, this.writeOffset);
      this.buffer = grown;
    }
    this.base += this.readOffset;
    this.writeOffset = pending;
    this.readOffset = 0;
  }

  /** Record `length` bytes written at `writeOffset` by one recvmsg, with the fds it returned. */
  commit(length: number, fds: number[] | null): void {
    if (this.buffer === scratch) {
      const own = Buffer.allocUnsafe(FIRST_CAPACITY);
      scratch.copy(own, 0, 0, length);
      this.buffer = own;
    }
    // A read that filled the room: the peer sends in bulk, so read in bulk from now on (the buffer
    // grows once, at the next prepare that lacks room).
    if (length === this.buffer.length - this.writeOffset && this.minRead !== MIN_READ) this.minRead = MIN_READ;
    const chunkStart = this.base + this.writeOffset;
    this.writeOffset += length;
    const chunkEnd = this.base + this.writeOffset;
    let owner = -1;
    // Walk the message starts that fall inside this chunk (their sizes are known once 8 header
    // bytes are here; a start is known as soon as the previous message's size is).
    while (this.scanPos < chunkEnd) {
      if (this.scanPos >= chunkStart) owner = this.scanPos;
      const at = this.scanPos - this.base;
      if (at + MSG_SIZE_OFFSET + 4 > this.writeOffset) break;
      const size = this.buffer.readUInt32LE(at + MSG_SIZE_OFFSET);
      if (size < HEADER_SIZE) break; // next() reports the corrupt header
      this.scanPos += size;
    }
    if (fds === null || fds.length === 0) return;
    if (owner < 0) {
      for (const fd of fds) this.strayFds.push(fd);
    } else {
      this.fdBatches.push({ start: owner, fds });
    }
  }

  /** Copy bytes in (tests and non-socket sources); the socket path writes into `buffer` directly. */
  push(chunk: Uint8Array, fds: number[] | null = null): void {
    this.prepare();
    let offset = 0;
    // A chunk larger than the room made is fed in pieces; fds travel with the first piece.
    while (offset < chunk.length) {
      if (this.writable === 0) this.prepare();
      const n = Math.min(this.writable, chunk.length - offset);
      this.buffer.set(chunk.subarray(offset, offset + n), this.writeOffset);
      this.commit(n, offset === 0 ? fds : null);
      offset += n;
    }
    if (chunk.length === 0 && fds !== null && fds.length > 0) this.strayFds.push(...fds);
  }

  /**
   * Frame the next complete message into `out`. Returns false when more bytes are needed.
   * Throws {@link FramingError} for a header whose size is below 16 (the stream is corrupt).
   */
  next(out: FramedMessage): boolean {
    if (this.skipping > 0) {
      const n = Math.min(this.skipping, this.writeOffset - this.readOffset);
      this.skipping -= n;
      this.readOffset += n;
      if (this.skipping > 0) return false;
    }
    const available = this.writeOffset - this.readOffset;
    if (available < HEADER_SIZE) return false;
    const buf = this.buffer;
    const at = this.readOffset;
    const size = buf.readUInt32LE(at + MSG_SIZE_OFFSET);
    if (size < HEADER_SIZE) {
      throw new FramingError(`message size ${size} is smaller than the ${HEADER_SIZE}-byte header`);
    }
    const oversized = size > this.maxMessageSize;
    if (!oversized && available < size) return false;

    out.msgId = buf.readUInt16LE(at);
    out.command = buf.readUInt16LE(at + 2);
    out.size = size;
    out.flags = buf.readUInt32LE(at + 8);
    out.error = buf.readUInt32LE(at + 12);
    out.data = buf;
    out.payloadOffset = at + HEADER_SIZE;
    out.oversized = oversized;
    out.fds = this.takeFds(this.base + at);
    if (oversized) {
      // Consume what is here of the payload now and skip the rest as it arrives.
      const here = Math.min(size, available);
      this.readOffset += here;
      this.skipping = size - here;
      out.payloadLength = 0;
    } else {
      this.readOffset += size;
      out.payloadLength = size - HEADER_SIZE;
    }
    this.framed++;
    return true;
  }

  private takeFds(start: number): number[] | null {
    const batches = this.fdBatches;
    // Batches whose message was never framed (cannot happen in order, but be safe) are stray.
    while (batches.length > 0 && batches[0]!.start < start) {
      for (const fd of batches.shift()!.fds) this.strayFds.push(fd);
    }
    if (batches.length > 0 && batches[0]!.start === start) {
      let fds = batches.shift()!.fds;
      // Two recvmsg calls can name the same owner only if the peer split a message's fds; keep all.
      while (batches.length > 0 && batches[0]!.start === start) fds = fds.concat(batches.shift()!.fds);
      return fds;
    }
    return null;
  }

  /** Let go of the receive buffer (the connection closed); bytes not yet framed are dropped. */
  release(): void {
    this.buffer = EMPTY;
    this.base += this.writeOffset;
    this.readOffset = this.writeOffset = 0;
    this.skipping = 0;
  }

  /** Hand over every fd the framer still holds (on close): undelivered batches and stray fds. */
  drainFds(): number[] {
    const all = this.strayFds;
    this.strayFds = [];
    for (const batch of this.fdBatches) for (const fd of batch.fds) all.push(fd);
    this.fdBatches.length = 0;
    return all;
  }
}
