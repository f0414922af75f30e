/**
 * `Connection`: one vfio-user socket, used by both sides (reference §1).
 *
 * It frames the stream into messages with their fds, numbers our requests and matches replies to
 * them, hands the peer's commands to a handler while our own requests are in flight, times out
 * requests, sends each message with exactly one sendmsg (queueing, with backpressure, when the
 * socket is full), and fails every pending request when the connection ends.
 *
 * The steady state allocates nothing per message: one reusable {@link IncomingMessage} is filled
 * for each message received, headers are encoded into one preallocated buffer, pending requests
 * live in a table with pooled records, and one re-armable timer sweeps timeouts.
 *
 * A connection that has not said anything costs a few hundred bytes of its own: the receive buffer
 * is allocated on the first read (4 KiB, growing once to 64 KiB when the peer sends in bulk) and
 * the request table on the first request (16 slots, doubling while more than half are in use, up
 * to one per msg_id). Both then stay, so the hot path allocates nothing.
 * The promise-returning {@link Connection.request} is the convenient path; {@link Connection.send}
 * with a long-lived callback is the allocation-free one.
 */
import { EventEmitter } from 'node:events';
import { debuglog } from 'node:util';
import { binding, RECV_NONE, RecvState, systemError, WOULD_BLOCK } from '../native/binding';
import { Fd } from '../native/fd';
import { Errno, HeaderFlags } from '../protocol/constants';
import { VfioUserError } from '../protocol/errors';
import { emptyFramedMessage, FramedMessage, Framer, FramingError, HEADER_SIZE } from './framer';

const debug = debuglog('vfio-user:transport');
/** Shared by every message that has no bytes yet (it has none to overwrite). */
const NO_BYTES = Buffer.alloc(0);

/** Payload of a message: one buffer, or several sent back to back (header + struct + data...). */
export type Body = Uint8Array | readonly Uint8Array[] | null | undefined;

export interface ConnectionOptions {
  /** Largest message we buffer whole; larger ones get an error reply (default 1 MiB + 4 KiB). */
  maxMessageSize?: number;
  /** Most fds we accept with one message (what we advertise as max_msg_fds; default 16). */
  maxRecvFds?: number;
  /** Most fds the peer accepts with one message (its max_msg_fds; default 1 until negotiated). */
  maxSendFds?: number;
  /** Default reply timeout for our requests, in ms (default 5000, as QEMU's x-msg-timeout). */
  requestTimeoutMs?: number;
  /** Queued bytes above which {@link Connection.writableNeedDrain} is true (default 1 MiB). */
  highWaterMark?: number;
  /** First msg_id our requests use (QEMU's client starts at 0, libvfio-user's server at 1). */
  firstMsgId?: number;
  /**
   * Once the first bytes of a message arrived, the rest must follow within this many ms, or the
   * connection closes with ETIMEDOUT (it fires between one and two times this after the message
   * began). 0 (the default): no deadline.
   */
  messageTimeoutMs?: number;
  /**
   * Busy polling: after a wake-up that handled traffic, keep checking the socket for this many
   * microseconds (yielding the CPU between checks) before going back to the event loop, so a peer
   * that answers quickly is served without an epoll round trip per message. Costs CPU while the
   * peer is active (at most one window after its last message); 0 (the default) turns it off.
   * See {@link Connection.busyPollUs}.
   */
  busyPollUs?: number;
  /** A label for debug output. */
  name?: string;
}

export type ConnectionState = 'open' | 'closing' | 'closed';

/**
 * A received message. The instance is reused: its fields and payload view are valid only until the
 * handler or callback returns. Use {@link IncomingMessage.detach} to keep it for later (async)
 * work. Fds not taken with {@link IncomingMessage.takeFd} by then are closed by the connection.
 */
export class IncomingMessage {
  msgId = 0;
  command = 0;
  flags = 0;
  error = 0;
  /** The buffer holding the payload at [payloadOffset, payloadOffset + payloadLength). */
  data: Buffer = NO_BYTES;
  payloadOffset = 0;
  payloadLength = 0;
  /** True if the message was larger than the connection's limit and its payload was dropped. */
  oversized = false;
  /** Set (to an errno) on a command the connection refused; see {@link Connection.orderedRejects}. */
  rejected = 0;
  /** True once a reply was sent (or suppressed for a No_reply command). */
  replied = false;
  /** @internal raw fds not yet taken; entries become -1 when taken. */
  rawFds: number[] | null = null;

  /** A zero-copy view of the payload (allocates a view object; hot paths read `data` directly). */
  get payload(): Buffer {
    return this.data.subarray(this.payloadOffset, this.payloadOffset + this.payloadLength);
  }

  get fdCount(): number {
    return this.rawFds === null ? 0 : this.rawFds.length;
  }

  get noReply(): boolean {
    return (this.flags & HeaderFlags.NO_REPLY) !== 0;
  }

  /** Take ownership of fd `index`; throws if absent or already taken. */
  takeFd(index: number): Fd {
    const raw = this.rawFds?.[index];
    if (raw === undefined || raw < 0) throw new RangeError(`no fd at index ${index} of this message`);
    this.rawFds![index] = -1;
    return new Fd(raw);
  }

  /** Take every fd not yet taken, in order. */
  takeAllFds(): Fd[] {
    const out: Fd[] = [];
    if (this.rawFds !== null) for (let i = 0; i < this.rawFds.length; i++) if (this.rawFds[i]! >= 0) out.push(this.takeFd(i));
    return out;
  }

  /**
   * An owned copy for asynchronous handling: the payload is copied, the untaken fds move to the
   * copy (close them with {@link IncomingMessage.closeFds} when done).
   */
  detach(): IncomingMessage {
    const copy = new IncomingMessage();
    copy.msgId = this.msgId;
    copy.command = this.command;
    copy.flags = this.flags;
    copy.error = this.error;
    copy.data = Buffer.from(this.payload);
    copy.payloadOffset = 0;
    copy.payloadLength = this.payloadLength;
    copy.oversized = this.oversized;
    copy.rejected = this.rejected;
    copy.rawFds = this.rawFds;
    this.rawFds = null;
    // The original is answered through the copy from now on.
    this.replied = true;
    return copy;
  }

  /** Close every fd not taken. Idempotent. */
  closeFds(): void {
    const fds = this.rawFds;
    if (fds === null) return;
    this.rawFds = null;
    for (const fd of fds) if (fd >= 0) closeRaw(fd);
  }
}

/** Called with the reply (valid only during the call) or an error. */
export type ReplyCallback = (err: VfioUserError | null, reply: IncomingMessage | null) => void;

/** An owned reply, as the promise API returns it. */
export interface Reply {
  payload: Buffer;
  fds: Fd[];
}

export interface RequestOptions {
  fds?: readonly number[] | null;
  timeoutMs?: number;
}

interface Pending {
  msgId: number;
  command: number;
  /** Sweep tick at which the request times out (ticks avoid a clock read per request). */
  deadline: number;
  /** Null once the request timed out: the record then only reserves its msg_id for the late reply. */
  callback: ReplyCallback | null;
  prev: Pending | null;
  next: Pending | null;
}

interface Queued {
  bytes: Buffer;
  sent: number;
  fds: readonly number[] | null;
}

/** The longest busy-polling window (the addon's limit). */
export const MAX_BUSY_POLL_US = 10000;
const MSG_ID_SLOTS = 0x10000;
/** Request-table size at the first request; it doubles while more than half is in use. */
const FIRST_SLOTS = 16;
/** Timeouts are checked every requestTimeoutMs / 8, within these bounds. */
const MIN_SWEEP_MS = 5;
const MAX_SWEEP_MS = 500;
const MAX_READS_PER_WAKEUP = 64;
const MAX_IOV = 8;
/**
 * recvmsg's fd output, shared by every connection: room for every fd one sendmsg can carry (so an
 * over-limit message is refused cleanly instead of truncated by the kernel). The fds are copied
 * out right after each (synchronous) recvmsg.
 */
let fdsOutShared: Int32Array | null = null;
const sharedHeader = Buffer.alloc(HEADER_SIZE);

function checkBusyPoll(us: number): void {
  if (!Number.isInteger(us) || us < 0 || us > MAX_BUSY_POLL_US) throw new RangeError(`busyPollUs must be an integer from 0 to ${MAX_BUSY_POLL_US} (got ${us})`);
}

function closeRaw(fd: number): void {
  try {
    new Fd(fd).close();
  } catch (err) {
    debug('close(%d) failed: %s', fd, (err as Error).message);
  }
}

export class Connection extends EventEmitter {
  state: ConnectionState = 'open';
  /** Handler for commands from the peer. Unset: every command gets ENOSYS. */
  onRequest: ((msg: IncomingMessage, conn: Connection) => void) | null = null;
  /**
   * Hand commands the connection refuses (too large, too many fds) to {@link onRequest} with
   * `msg.rejected` set, instead of answering them at once, so a handler that runs commands in
   * order can answer them in their turn (reference §1.8). Their fds are closed as usual.
   */
  orderedRejects = false;
  /**
   * Set by an owner with asynchronous work in flight that needs the event loop (I/O, timers):
   * while it returns true, busy polling stops and hands control back to the loop at once.
   */
  awaitingLoop: (() => boolean) | null = null;

  readonly maxRecvFds: number;
  maxSendFds: number;
  requestTimeoutMs: number;
  readonly highWaterMark: number;
  readonly name: string;

  private readonly socket: Fd;
  private readonly poller: InstanceType<typeof binding.Poller>;
  private readonly framer: Framer;
  private readonly incoming = new IncomingMessage();
  private readonly framed: FramedMessage = emptyFramedMessage();
  /**
   * The header of the message being sent, shared by every connection: it is encoded and handed to
   * sendmsg in one synchronous step, and a message that has to wait is copied into the send queue.
   */
  private readonly header = sharedHeader;
  /** iovs[n] is a reusable array of n + 1 entries: the header and n body parts (made when first used). */
  private readonly iovs: (Uint8Array[] | undefined)[] = [];

  /**
   * Requests by msg_id, direct-mapped: a request sits at `msgId & (slots.length - 1)`, and msg_ids
   * are only handed out for free slots. A request that timed out keeps its slot (callback null)
   * so that its late reply is recognised and dropped quietly. Empty until the first request.
   */
  private slots: (Pending | null)[] = [];
  private pendingHead: Pending | null = null;
  private pendingTail: Pending | null = null;
  private pendingCount = 0;
  /** Timed-out requests still holding their slot. */
  private expiredCount = 0;
  /** Retired request records, linked through `next` (an array's pop/push would reallocate). */
  private freePending: Pending | null = null;
  private nextMsgId: number;

  private readonly sendQueue: Queued[] = [];
  private queuedBytes = 0;
  private watching = 0;
  private sweepTimer: NodeJS.Timeout | null = null;
  /** Sweeps run so far: the timeout clock (it only needs to advance while requests are pending). */
  private ticks = 0;
  /** Sweep period; coarse on purpose: a timer firing often costs the hot path (measured). */
  private readonly sweepMs: number;
  private closeError: Error | null = null;
  /** See {@link ConnectionOptions.messageTimeoutMs}. */
  readonly messageTimeoutMs: number;
  /** The message-deadline timer (made on the first partial message), and whether it is armed. */
  private stallTimer: NodeJS.Timeout | null = null;
  private stallArmed = false;
  /** `framer.framed` when the timer was armed: unchanged at expiry means no message completed. */
  private stallMark = 0;

  /** Takes ownership of `socket` (a connected, non-blocking unix stream socket). */
  constructor(socket: Fd, options: ConnectionOptions = {}) {
    super();
    // Checked before anything is made, so a bad option leaves the socket to its caller.
    if (options.busyPollUs !== undefined) checkBusyPoll(options.busyPollUs);
    this.socket = socket;
    this.framer = new Framer(options.maxMessageSize ?? 1024 * 1024 + 4096);
    this.maxRecvFds = options.maxRecvFds ?? 16;
    this.maxSendFds = options.maxSendFds ?? 1;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 5000;
    this.sweepMs = Math.min(MAX_SWEEP_MS, Math.max(MIN_SWEEP_MS, Math.floor(this.requestTimeoutMs / 8)));
    this.highWaterMark = options.highWaterMark ?? 1024 * 1024;
    this.nextMsgId = (options.firstMsgId ?? 0) & 0xffff;
    this.name = options.name ?? `fd${socket.value}`;
    this.messageTimeoutMs = options.messageTimeoutMs ?? 0;
    this.poller = new binding.Poller(socket.value, (status, events) => this.onPoll(status, events));
    if (options.busyPollUs !== undefined) this.busyPollUs = options.busyPollUs;
    this.watch();
  }

  private busyPollWindow = 0;
  /** The fused receive's state array and the buffer it was armed with (see armFused). */
  private rxState: Int32Array | null = null;
  private rxBuffer: Buffer | null = null;

  /** The busy-polling window in microseconds (0: off); see {@link ConnectionOptions.busyPollUs}. */
  get busyPollUs(): number {
    return this.busyPollWindow;
  }
  set busyPollUs(us: number) {
    checkBusyPoll(us);
    this.busyPollWindow = us;
    if (this.state !== 'closed') this.poller.busyPoll(us);
  }

  /** Largest message buffered whole; can be changed after negotiation. */
  get maxMessageSize(): number {
    return this.framer.maxMessageSize;
  }
  set maxMessageSize(size: number) {
    this.framer.maxMessageSize = size;
  }

  /** True while more than `highWaterMark` bytes wait in the send queue ('drain' follows). */
  get writableNeedDrain(): boolean {
    return this.queuedBytes > this.highWaterMark;
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pendingCount;
  }

  /**
   * Send a command and resolve with its reply (payload copied, fds owned by the caller).
   * Rejects with a {@link VfioUserError}: the peer's errno for an error reply, ETIMEDOUT,
   * ECONNRESET when the connection ends first, EPROTO for a malformed reply.
   * Fds in `options.fds` are borrowed until the promise settles.
   */
  request(command: number, body?: Body, options: RequestOptions = {}): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      this.send(
        command,
        body,
        options.fds ?? null,
        (err, reply) => {
          if (err !== null) reject(err);
          else resolve({ payload: Buffer.from(reply!.payload), fds: reply!.takeAllFds() });
        },
        options.timeoutMs,
      );
    });
  }

  /**
   * Send a command; `callback` runs once with the reply (valid only during the call) or an error.
   * Allocation-free when `callback` is a long-lived function. Returns the msg_id used.
   */
  send(command: number, body: Body, fds: readonly number[] | null, callback: ReplyCallback, timeoutMs?: number): number {
    if (this.state !== 'open') {
      callback(this.closedError(command, 0), null);
      return -1;
    }
    if (this.pendingCount >= MSG_ID_SLOTS - 1) {
      callback(new VfioUserError(Errno.EAGAIN, command, 0, 'too many requests in flight'), null);
      return -1;
    }
    if ((this.pendingCount + this.expiredCount) * 2 >= this.slots.length && this.slots.length < MSG_ID_SLOTS) this.growSlots();
    const msgId = this.allocMsgId();
    let p = this.freePending;
    if (p !== null) this.freePending = p.next;
    else p = { msgId: 0, command: 0, deadline: 0, callback: null, prev: null, next: null };
    p.msgId = msgId;
    p.command = command;
    // +1: the current tick is partly over already, so a deadline never comes early.
    p.deadline = this.ticks + 1 + (((timeoutMs ?? this.requestTimeoutMs) + this.sweepMs - 1) / this.sweepMs | 0);
    p.callback = callback;
    this.linkPending(p);
    this.armSweep();
    this.transmit(msgId, command, HeaderFlags.TYPE_COMMAND, 0, body, fds);
    return msgId;
  }

  /** Send a command with No_reply set (a posted write): nothing comes back, not even an error. */
  post(command: number, body?: Body): void {
    if (this.state !== 'open') throw this.closedError(command, 0);
    this.transmit(this.allocMsgId(), command, HeaderFlags.TYPE_COMMAND | HeaderFlags.NO_REPLY, 0, body, null);
  }

  /** Answer the peer's command `msg` with a success reply. A No_reply command gets nothing. */
  reply(msg: IncomingMessage, body?: Body, fds: readonly number[] | null = null): void {
    if (msg.replied) throw new Error(`message ${msg.msgId} was already answered`);
    msg.replied = true;
    if (msg.noReply || this.state !== 'open') return;
    this.transmit(msg.msgId, msg.command, HeaderFlags.TYPE_REPLY, 0, body, fds);
  }

  /** Answer the peer's command `msg` with an error reply (header only, §1.4). */
  replyError(msg: IncomingMessage, errno: number): void {
    if (msg.replied) throw new Error(`message ${msg.msgId} was already answered`);
    msg.replied = true;
    if (msg.noReply) {
      debug('%s: dropped error %d for No_reply command %d', this.name, errno, msg.command);
      return;
    }
    if (this.state !== 'open') return;
    this.transmit(msg.msgId, msg.command, HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, errno || Errno.EINVAL, null, null);
  }

  /**
   * Close the connection: the socket fd is closed, every pending request fails (with `error`, or
   * ECONNRESET), queued messages are dropped, fds received and not handed out are closed, and
   * 'close' is emitted once with the error (null for a local close or a clean EOF).
   */
  close(error: Error | null = null): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.closeError = error;
    if (error) debug('%s: closing: %s', this.name, error.message);
    this.poller.close();
    this.dropFused();
    this.socket.close();
    if (this.sweepTimer !== null) clearInterval(this.sweepTimer);
    this.sweepTimer = null;
    if (this.stallTimer !== null) clearTimeout(this.stallTimer);
    this.stallTimer = null;
    this.sendQueue.length = 0;
    this.queuedBytes = 0;
    for (const fd of this.framer.drainFds()) closeRaw(fd);
    this.framer.release();
    this.incoming.closeFds();
    let p = this.pendingHead;
    this.pendingHead = this.pendingTail = null;
    this.slots = [];
    this.expiredCount = 0;
    while (p !== null) {
      const next = p.next;
      const cb = p.callback!;
      this.pendingCount--;
      cb(this.closedError(p.command, p.msgId), null);
      p = next;
    }
    this.emit('close', error);
  }

  // ---- sending ----

  /** The next msg_id whose slot is free (any id before the first request: posts need no slot). */
  private allocMsgId(): number {
    let id = this.nextMsgId;
    const slots = this.slots;
    if (slots.length !== 0) {
      const mask = slots.length - 1;
      for (let tries = 0; slots[id & mask] !== null; tries++) {
        // Every free id is held by a timed-out request: forget those, their replies are long overdue.
        if (tries === MSG_ID_SLOTS) this.forgetExpired();
        id = (id + 1) & 0xffff;
      }
    }
    this.nextMsgId = (id + 1) & 0xffff;
    return id;
  }

  /** Double the request table (or make it): ids distinct in the old mask stay distinct. */
  private growSlots(): void {
    const old = this.slots;
    const size = old.length === 0 ? FIRST_SLOTS : old.length * 2;
    const slots = new Array<Pending | null>(size).fill(null);
    for (const p of old) if (p !== null) slots[p.msgId & (size - 1)] = p;
    this.slots = slots;
  }

  /** Free the slots of every timed-out request. */
  private forgetExpired(): void {
    const slots = this.slots;
    for (let i = 0; i < slots.length; i++) {
      const p = slots[i]!;
      if (p !== null && p.callback === null) {
        slots[i] = null;
        this.poolPending(p);
      }
    }
    this.expiredCount = 0;
  }

  private transmit(msgId: number, command: number, flags: number, error: number, body: Body, fds: readonly number[] | null): void {
    if (fds !== null && fds.length > this.maxSendFds) {
      throw new RangeError(`message carries ${fds.length} fds but the peer accepts at most ${this.maxSendFds}`);
    }
    let iov: Uint8Array[];
    let size = HEADER_SIZE;
    if (body == null) {
      iov = this.iovs[0] ?? this.makeIov(0);
    } else if (body instanceof Uint8Array) {
      iov = this.iovs[1] ?? this.makeIov(1);
      iov[1] = body;
      size += body.length;
    } else {
      if (body.length > MAX_IOV) throw new RangeError(`at most ${MAX_IOV} body parts per message`);
      iov = this.iovs[body.length] ?? this.makeIov(body.length);
      for (let i = 0; i < body.length; i++) {
        iov[i + 1] = body[i]!;
        size += body[i]!.length;
      }
    }
    const h = this.header;
    h.writeUInt16LE(msgId, 0);
    h.writeUInt16LE(command, 2);
    h.writeUInt32LE(size, 4);
    h.writeUInt32LE(flags, 8);
    h.writeUInt32LE(error, 12);

    let sent = 0;
    if (this.sendQueue.length === 0) {
      try {
        sent = binding.sendmsg(this.socket.value, iov, fds);
      } catch (err) {
        this.clearIov(iov);
        this.fail(err as Error);
        return;
      }
      if (sent === WOULD_BLOCK) sent = 0;
      if (sent === size) {
        this.clearIov(iov);
        return;
      }
    }
    // Queue the unsent part (a copy: the caller's buffers are free again when we return).
    const bytes = Buffer.allocUnsafe(size - sent);
    let at = 0;
    let skip = sent;
    for (const part of iov) {
      if (skip >= part.length) {
        skip -= part.length;
        continue;
      }
      bytes.set(skip > 0 ? part.subarray(skip) : part, at);
      at += part.length - skip;
      skip = 0;
    }
    this.clearIov(iov);
    this.sendQueue.push({ bytes, sent: 0, fds: sent > 0 ? null : fds });
    this.queuedBytes += bytes.length;
    this.watch();
  }

  private makeIov(parts: number): Uint8Array[] {
    const iov = new Array<Uint8Array>(parts + 1).fill(this.header);
    this.iovs[parts] = iov;
    return iov;
  }

  /** Drop references to the caller's buffers so the reusable arrays keep nothing alive. */
  private clearIov(iov: Uint8Array[]): void {
    for (let i = 1; i < iov.length; i++) iov[i] = this.header;
  }

  private flush(): void {
    const one = this.iovs[0] ?? this.makeIov(0);
    while (this.sendQueue.length > 0 && this.state === 'open') {
      const q = this.sendQueue[0]!;
      one[0] = q.sent === 0 ? q.bytes : q.bytes.subarray(q.sent);
      let n: number;
      try {
        n = binding.sendmsg(this.socket.value, one, q.sent === 0 ? q.fds : null);
      } catch (err) {
        one[0] = this.header;
        this.fail(err as Error);
        return;
      }
      one[0] = this.header;
      if (n === WOULD_BLOCK) break;
      q.sent += n;
      this.queuedBytes -= n;
      if (q.sent === q.bytes.length) this.sendQueue.shift();
    }
    this.watch();
    if (this.sendQueue.length === 0 && this.state === 'open') this.emit('drain');
  }

  // ---- receiving ----

  private watch(): void {
    if (this.state !== 'open') return;
    const ev = binding.pollEvents;
    const want = ev.READABLE | ev.DISCONNECT | (this.sendQueue.length > 0 ? ev.WRITABLE : 0);
    if (want !== this.watching) {
      this.poller.start(want);
      this.watching = want;
    }
  }

  /** Returns true when busy polling may go on: traffic was handled and nothing awaits the loop. */
  private onPoll(status: number, events: number): boolean {
    if (this.state !== 'open') {
      this.dropFused();
      return false;
    }
    if (status < 0) {
      this.fail(new VfioUserError(Errno.EIO, 0, 0, `poll error ${status} on the socket`));
      return false;
    }
    if (events & binding.pollEvents.WRITABLE) this.flush();
    if (this.rxState === null || !this.takeFused()) {
      if (events & (binding.pollEvents.READABLE | binding.pollEvents.DISCONNECT)) this.readSome();
    }
    if (this.state !== 'open') return false;
    if (this.framer.framed > 0) this.armFused();
    return this.busyPollWindow > 0 && this.sendQueue.length === 0 && !(this.awaitingLoop?.() ?? false);
  }

  private readSome(): void {
    const framer = this.framer;
    const fdsOut = (fdsOutShared ??= new Int32Array(binding.constants.SCM_MAX_FD + 1));
    for (let i = 0; i < MAX_READS_PER_WAKEUP && this.state === 'open'; i++) {
      framer.prepare();
      let n: number;
      try {
        n = binding.recvmsg(this.socket.value, framer.buffer, framer.writeOffset, framer.writable, fdsOut);
      } catch (err) {
        this.fail(err as Error);
        return;
      }
      if (n === WOULD_BLOCK) return;
      // A short read took everything queued (a stream socket fills the buffer when it can), so
      // skip the recvmsg that would only say EAGAIN; the level-triggered poll calls again if more
      // arrived meanwhile, or if the read stopped early at an fd-carrying message.
      if (!this.consume(n, fdsOut, 0)) return;
    }
  }

  /**
   * Frame and dispatch `n` bytes just received at the framer's write offset, with the fds listed
   * at fds[at] (count) and after. Returns true when the read filled the buffer (more may wait).
   */
  private consume(n: number, fdsOut: Int32Array, at: number): boolean {
    const framer = this.framer;
    let fds: number[] | null = null;
    const count = fdsOut[at]!;
    if (count > 0) {
      fds = [];
      for (let k = 1; k <= count; k++) fds.push(fdsOut[at + k]!);
      fdsOut[at] = 0;
    }
    if (n === 0) {
      if (fds !== null) for (const fd of fds) closeRaw(fd);
      const partial = framer.buffered > 0;
      this.close(partial ? new VfioUserError(Errno.ECONNRESET, 0, 0, 'peer closed the connection mid-message') : null);
      return false;
    }
    const full = n >= framer.writable;
    framer.commit(n, fds);
    this.closeStrayFds();
    this.dispatchAll();
    if (this.messageTimeoutMs > 0 && !this.stallArmed && framer.partial && this.state === 'open') this.armStall();
    return full && this.state === 'open';
  }

  /**
   * Take what the poller's fused receive left in the state array (if anything). Returns false when
   * nothing was there. Afterwards, reads go on as readSome's if that read filled the buffer.
   */
  private takeFused(): boolean {
    const st = this.rxState!;
    const n = st[RecvState.RESULT]!;
    if (n === RECV_NONE) return false;
    st[RecvState.RESULT] = RECV_NONE;
    if (n < 0) {
      st[RecvState.FDS] = 0; // the addon closed them on its error path
      this.fail(systemError(-n, 'recvmsg'));
      return true;
    }
    if (this.consume(n, st, RecvState.FDS)) this.readSome();
    return true;
  }

  /** Close the fds of a fused receive nobody will consume (the connection closed first). */
  private dropFused(): void {
    const st = this.rxState;
    if (st === null) return;
    if (st[RecvState.RESULT]! > 0) for (let k = 1; k <= st[RecvState.FDS]!; k++) closeRaw(st[RecvState.FDS + k]!);
    st[RecvState.RESULT] = RECV_NONE;
    st[RecvState.FDS] = 0;
  }

  /**
   * Point the poller's next fused receive where readSome's next recvmsg would go. Armed after the
   * first read (so a connection that never speaks holds no state array), renewed after each wake-up.
   */
  private armFused(): void {
    const framer = this.framer;
    framer.prepare();
    let st = this.rxState;
    if (st === null) {
      st = this.rxState = new Int32Array(RecvState.FDS + 1 + binding.constants.SCM_MAX_FD);
      st[RecvState.RESULT] = RECV_NONE;
    }
    if (framer.buffer !== this.rxBuffer) {
      this.rxBuffer = framer.buffer;
      this.poller.receiveInto(framer.buffer, st);
    }
    st[RecvState.OFFSET] = framer.writeOffset;
    st[RecvState.LENGTH] = framer.writable;
  }

  /**
   * The message deadline: one timer, armed when a read leaves a message incomplete and none is
   * armed. At expiry, if no message completed since and one is still incomplete, the peer stalled;
   * if messages did complete, a newer one may be incomplete: re-arm for it. So a started message
   * gets between one and two periods, and a busy connection touches the timer once per period.
   */
  private armStall(): void {
    this.stallArmed = true;
    this.stallMark = this.framer.framed;
    if (this.stallTimer === null) {
      this.stallTimer = setTimeout(this.onStall, this.messageTimeoutMs);
      this.stallTimer.unref();
    } else {
      this.stallTimer.refresh();
    }
  }

  private readonly onStall = (): void => {
    this.stallArmed = false;
    if (this.state !== 'open' || !this.framer.partial) return;
    if (this.framer.framed !== this.stallMark) {
      this.armStall();
      return;
    }
    debug('%s: a message was started and not completed within %d ms', this.name, this.messageTimeoutMs);
    this.fail(new VfioUserError(Errno.ETIMEDOUT, 0, 0, `a message was started and not completed within ${this.messageTimeoutMs} ms`));
  };

  private closeStrayFds(): void {
    if (this.framer.strayFds.length === 0) return;
    debug('%s: closing %d fds that arrived without a message header', this.name, this.framer.strayFds.length);
    for (const fd of this.framer.strayFds) closeRaw(fd);
    this.framer.strayFds = [];
  }

  private dispatchAll(): void {
    const framed = this.framed;
    const msg = this.incoming;
    while (this.state === 'open') {
      try {
        if (!this.framer.next(framed)) return;
      } catch (err) {
        this.fail(err instanceof FramingError ? new VfioUserError(Errno.EPROTO, 0, 0, err.message) : (err as Error));
        return;
      }
      msg.msgId = framed.msgId;
      msg.command = framed.command;
      msg.flags = framed.flags;
      msg.error = framed.error;
      msg.data = framed.data;
      msg.payloadOffset = framed.payloadOffset;
      msg.payloadLength = framed.payloadLength;
      msg.oversized = framed.oversized;
      msg.rawFds = framed.fds;
      msg.replied = false;
      msg.rejected = 0;
      const type = framed.flags & HeaderFlags.TYPE_MASK;
      if (type === HeaderFlags.TYPE_REPLY) this.onReply(msg);
      else if (type === HeaderFlags.TYPE_COMMAND) this.onCommand(msg);
      else this.fail(new VfioUserError(Errno.EPROTO, framed.command, framed.msgId, `message type ${type} is neither command nor reply`));
      msg.closeFds();
    }
  }

  private onCommand(msg: IncomingMessage): void {
    if (msg.oversized || msg.fdCount > this.maxRecvFds) {
      if (msg.oversized) debug('%s: command %d of %d bytes exceeds the %d-byte limit', this.name, msg.command, this.framed.size, this.maxMessageSize);
      msg.rejected = Errno.EINVAL;
      // A handler that executes commands in order answers these in their turn (so the error
      // cannot overtake the reply to an earlier command); otherwise answer at once.
      if (!this.orderedRejects || this.onRequest === null) {
        this.replyError(msg, Errno.EINVAL);
        return;
      }
    }
    const handler = this.onRequest;
    if (handler === null) {
      this.replyError(msg, Errno.ENOSYS);
      return;
    }
    try {
      handler(msg, this);
    } catch (err) {
      // A handler bug must not take the event loop down; the peer gets an error reply.
      debug('%s: handler for command %d threw: %s', this.name, msg.command, (err as Error).stack);
      this.emit('handlerError', err, msg.command);
      if (!msg.replied && this.state === 'open') this.replyError(msg, Errno.EINVAL);
    }
  }

  private onReply(msg: IncomingMessage): void {
    const slots = this.slots;
    const slot = slots.length === 0 ? null : slots[msg.msgId & (slots.length - 1)]!;
    let p = slot !== null && slot.msgId === msg.msgId ? slot : null;
    if (p !== null && p.callback === null) {
      // The request timed out; the slot only waited for this late reply.
      if (p.command === msg.command) {
        slots[msg.msgId & (slots.length - 1)] = null;
        this.expiredCount--;
        this.poolPending(p);
        debug('%s: dropped late reply %d to command %d', this.name, msg.msgId, msg.command);
        return;
      }
      p = null;
    }
    if (p === null || p.command !== msg.command) {
      this.fail(new VfioUserError(Errno.EPROTO, msg.command, msg.msgId, p == null ? 'reply to no outstanding request' : `reply carries command ${msg.command}, request was ${p.command}`));
      return;
    }
    const cb = this.retirePending(p);
    if (msg.oversized) {
      cb(new VfioUserError(Errno.E2BIG, msg.command, msg.msgId, `reply exceeds the ${this.maxMessageSize}-byte limit`), null);
    } else if (msg.flags & HeaderFlags.ERROR) {
      cb(new VfioUserError(msg.error > 0 && msg.error < 4096 ? msg.error : Errno.EINVAL, msg.command, msg.msgId), null);
    } else {
      cb(null, msg);
    }
  }

  // ---- pending requests and timeouts ----

  private linkPending(p: Pending): void {
    this.slots[p.msgId & (this.slots.length - 1)] = p;
    this.pendingCount++;
    p.next = null;
    p.prev = this.pendingTail;
    if (this.pendingTail !== null) this.pendingTail.next = p;
    else this.pendingHead = p;
    this.pendingTail = p;
  }

  /** Unlink `p`, free its slot, return it to the pool, and hand back its callback. */
  private retirePending(p: Pending): ReplyCallback {
    const cb = this.unlinkPending(p);
    this.slots[p.msgId & (this.slots.length - 1)] = null;
    this.poolPending(p);
    return cb;
  }

  /** Take `p` off the pending list (it keeps its slot), and hand back its callback. */
  private unlinkPending(p: Pending): ReplyCallback {
    const cb = p.callback!;
    this.pendingCount--;
    if (p.prev !== null) p.prev.next = p.next;
    else this.pendingHead = p.next;
    if (p.next !== null) p.next.prev = p.prev;
    else this.pendingTail = p.prev;
    p.callback = null;
    return cb;
  }

  private poolPending(p: Pending): void {
    p.prev = null;
    p.next = this.freePending;
    this.freePending = p;
  }

  /**
   * Timeouts are swept by one interval timer that runs only while requests are pending. It is
   * started on the first request after an idle spell and stops itself once nothing is pending, so
   * a busy connection never touches the timer machinery per request. A request times out between
   * its timeout and its timeout plus two sweep periods (requestTimeoutMs / 8 each).
   */
  private armSweep(): void {
    if (this.sweepTimer !== null) return;
    this.sweepTimer = setInterval(this.onSweep, this.sweepMs);
    this.sweepTimer.unref();
  }

  /**
   * Made once: a closure written inside armSweep (called per request) would make V8 allocate a
   * context object on every call, even when it returns early (measured: ~40 bytes per request).
   */
  private readonly onSweep = (): void => this.sweep();

  private sweep(): void {
    if (this.state !== 'open') return;
    const now = ++this.ticks;
    // Deadlines are not strictly ordered (per-request timeouts differ), so look at all of them.
    let p = this.pendingHead;
    while (p !== null) {
      const next = p.next;
      if (p.deadline <= now) {
        const { command, msgId } = p;
        // The record keeps its slot (callback null) until the late reply comes or ids run out.
        const cb = this.unlinkPending(p);
        this.expiredCount++;
        cb(new VfioUserError(Errno.ETIMEDOUT, command, msgId, `no reply within the timeout`), null);
      }
      p = next;
    }
    if (this.pendingCount === 0 && this.sweepTimer !== null) {
      clearInterval(this.sweepTimer);
      this.sweepTimer = null;
    }
  }

  private fail(error: Error): void {
    this.close(error);
  }

  private closedError(command: number, msgId: number): VfioUserError {
    const reason = this.closeError ? `: ${this.closeError.message}` : '';
    return new VfioUserError(Errno.ECONNRESET, command, msgId, `connection closed${reason}`);
  }
}
