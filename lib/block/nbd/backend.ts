/**
 * {@link NbdBackend}: a disk on an NBD export (qemu-nbd, qemu-storage-daemon, nbdkit, nbd-server),
 * so a namespace can live on any storage those reach: qcow2 images, Ceph RBD, iSCSI, S3...
 *
 * @packageDocumentation
 */
import { EventEmitter } from 'node:events';
import { checkRange, type BlockBackend } from '../backend';
import { NbdConnection, newOp, type NbdConnectOptions, type NbdOp } from './connection';
import { Cmd, CmdFlags, NbdError, TransmissionFlags as F } from './protocol';
import { formatNbdTarget, parseNbdUri, type NbdTarget } from './uri';

/** Options of {@link NbdBackend.open}. */
export interface NbdBackendOptions {
  /** Connections to open when the server allows several (NBD_FLAG_CAN_MULTI_CONN). Default 4. */
  connections?: number;
  /** Refuse writes even if the export takes them. Default: the export's own read-only flag. */
  readOnly?: boolean;
  /** How long a command waits for a connection (after a loss, or while the server is down) before it fails, ms. Default 30000. */
  reconnectTimeoutMs?: number;
  /** First and longest wait between reconnection attempts, ms (doubling). Default 50 and 2000. */
  backoffMs?: number;
  maxBackoffMs?: number;
  /** Deadline of one connection attempt and its handshake, ms. Default 10000. */
  connectTimeoutMs?: number;
  /** A command without a reply for this long drops its connection (and is retried), ms. Default 60000; 0: never. */
  requestTimeoutMs?: number;
  /** Commands in flight per connection before more wait in the backend. Default 64. */
  maxInFlight?: number;
  /** Connections that may be lost under one command before it fails. Default 8. */
  maxAttempts?: number;
  /** Ask for structured replies. Default true. */
  structuredReplies?: boolean;
  /**
   * After every connection was lost while writes the server acknowledged were not yet flushed, the
   * next flush fails (EIO): the server may have restarted and lost them from its volatile cache.
   * false trusts the server to have kept them (a network blip, a server without a cache).
   * Default true.
   */
  strictFlush?: boolean;
}

/** Options of {@link NbdBackend.zeroes}. */
export interface NbdZeroOptions {
  fua?: boolean;
  /** The server must allocate the range, not leave a hole (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
  /** Fail with ENOTSUP unless the server can zero faster than by writing (NBD_CMD_FLAG_FAST_ZERO). */
  fast?: boolean;
}

/** Counters, for tests and monitoring. */
export interface NbdBackendStats {
  /** Connections open now. */
  connections: number;
  /** Commands in flight on them, and commands waiting in the backend. */
  inFlight: number;
  queued: number;
  /** Connections opened after the first ones (reconnections), and commands sent again after a loss. */
  reconnects: number;
  retries: number;
  /** Read data received straight into the callers' buffers (zero-copy), and copied from the socket's buffer. */
  bytesDirect: number;
  bytesCopied: number;
}

/** Feature flags a reconnection must still offer, since the backend was built on them. */
const KEPT_FEATURES = F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES | F.SEND_FAST_ZERO;
/** Largest TRIM / WRITE_ZEROES length per command (the length field has 32 bits). */
const MAX_EFFECT = 2 ** 30;
/** How long open() waits for the connections after the first. */
const EXTRA_WAIT_MS = 2000;
/** Failed attempts at an extra connection (while others work) before the backend makes do without. */
const MAX_EXTRA_FAILURES = 3;
/** Zero buffer for servers without NBD_CMD_WRITE_ZEROES. */
let zeroBuf: Buffer | null = null;

/**
 * A disk on an NBD export, shared by every storage device like the other backends.
 *
 * - **Several connections** when the export has NBD_FLAG_CAN_MULTI_CONN (`connections`, default
 *   4), commands going to the least busy one, up to `maxInFlight` in flight on each; one
 *   connection otherwise.
 * - **Zero-copy reads**: data goes from the socket straight into the caller's buffers (guest
 *   memory) for all but small reads; writes go out of them with writev.
 * - **Export flags honoured**: read-only (writes fail with EROFS, as does everything with
 *   `readOnly`), FUA (emulated by a flush when only SEND_FLUSH is offered), flush, trim (discard is
 *   a no-op without it), write zeroes (zero writes without it), fast zero.
 * - **Connection loss**: the commands in flight on a lost connection, and new ones, wait while the
 *   backend reconnects with backoff; they are sent again once a connection is back and fail (code
 *   ETIMEDOUT) if none comes back within `reconnectTimeoutMs`. A write is acknowledged only
 *   after the server acknowledged it. I/O resumes whenever the server is back: a command that
 *   arrives after a failure starts a new round of attempts. A flush after every connection was
 *   lost with acknowledged writes unflushed fails with EIO (`strictFlush`): a restarted server may
 *   have lost them from its cache, and a flush must not vouch for them.
 * - **Lying servers**: a protocol violation (see {@link NbdConnection}) drops that connection and
 *   fails the commands in flight on it with code EPROTO; an export that comes back smaller, or
 *   without a feature the backend relies on, is refused (code ESTALE) and the waiting commands
 *   fail at once.
 *
 * Events: `'disconnect'` (err) when the last connection is lost, `'reconnect'` when one is back.
 */
export class NbdBackend extends EventEmitter implements BlockBackend {
  /** Capacity in bytes: the export's size when opened. */
  readonly size: number;
  readonly readOnly: boolean;
  /** Trimmed ranges need not read back as zeroes. */
  readonly discardZeroes = false;
  readonly target: NbdTarget;
  /** Transmission flags of the export when opened. */
  readonly flags: number;
  /** Block size constraints the server stated (1, 4096, 32 MiB when it stated none). */
  readonly minBlock: number;
  readonly preferredBlock: number;
  readonly maxPayload: number;

  readonly #options: Required<Omit<NbdBackendOptions, 'readOnly' | 'connections'>>;
  /** Writes the server acknowledged since the last flush began (not FUA). */
  #unflushed = false;
  /** Every connection was lost while #unflushed: the next flush reports it. */
  #mayHaveLost = false;
  /** Times every connection was lost (a flush in flight across one cannot vouch for what it covered). */
  #downs = 0;
  readonly #connectOptions: NbdConnectOptions;
  /** Connections wanted. */
  readonly #want: number;
  #live: NbdConnection[] = [];
  #queue: NbdOp[] = [];
  #reconnecting = false;
  #closing: Promise<void> | null = null;
  #lastError: Error | null = null;
  #deadlineTimer: NodeJS.Timeout | null = null;
  #wake: (() => void) | null = null;
  #reconnects = 0;
  #retries = 0;
  /** Byte counts of connections that are gone. */
  #bytesDirect = 0;
  #bytesCopied = 0;
  /** Every connection was lost (and none is back yet). */
  #down = false;
  /** Failed attempts at extra connections since the last success or total loss. */
  #extraFailures = 0;
  readonly #pump = (): void => this.#dispatch();

  private constructor(target: NbdTarget, first: NbdConnection, options: NbdBackendOptions) {
    super();
    const info = first.info;
    this.target = target;
    this.size = info.size;
    this.flags = info.flags;
    this.readOnly = options.readOnly === true || (info.flags & F.READ_ONLY) !== 0;
    this.minBlock = info.minBlock;
    this.preferredBlock = info.preferredBlock;
    this.maxPayload = info.maxPayload;
    this.#options = {
      reconnectTimeoutMs: options.reconnectTimeoutMs ?? 30_000,
      backoffMs: options.backoffMs ?? 50,
      maxBackoffMs: options.maxBackoffMs ?? 2000,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      requestTimeoutMs: options.requestTimeoutMs ?? 60_000,
      maxInFlight: options.maxInFlight ?? 64,
      maxAttempts: options.maxAttempts ?? 8,
      structuredReplies: options.structuredReplies ?? true,
      strictFlush: options.strictFlush ?? true,
    };
    this.#connectOptions = {
      structuredReplies: this.#options.structuredReplies,
      timeoutMs: this.#options.connectTimeoutMs,
      requestTimeoutMs: this.#options.requestTimeoutMs,
    };
    this.#want = (info.flags & F.CAN_MULTI_CONN) !== 0 ? Math.max(1, options.connections ?? 4) : 1;
  }

  /**
   * Connects to `target` (an NBD URI or a parsed target) and negotiates the export; rejects if the
   * first connection fails (refused, no such export, not an NBD server, timeout).
   */
  static async open(target: string | NbdTarget, options: NbdBackendOptions = {}): Promise<NbdBackend> {
    const t = typeof target === 'string' ? parseNbdUri(target) : target;
    const first = await NbdConnection.connect(t, {
      structuredReplies: options.structuredReplies ?? true,
      timeoutMs: options.connectTimeoutMs ?? 10_000,
      requestTimeoutMs: options.requestTimeoutMs ?? 60_000,
    });
    const backend = new NbdBackend(t, first, options);
    backend.#adopt(first);
    if (backend.#want > 1) {
      // The other connections are waited for a moment (a server that accepts and then says nothing
      // must not hold up the open), and taken into service whenever they come.
      const extras = Array.from({ length: backend.#want - 1 }, () =>
        NbdConnection.connect(t, backend.#connectOptions).then(
          (conn) => backend.#adoptExtra(conn),
          (err: Error) => backend.#extraFailed(err),
        ),
      );
      const all = Promise.all(extras).then(() => {
        if (backend.#live.length < backend.#want) void backend.#reconnect();
      });
      await Promise.race([all, new Promise((resolve) => setTimeout(resolve, EXTRA_WAIT_MS).unref())]);
    }
    return backend;
  }

  /** The export's URI. */
  get uri(): string {
    return formatNbdTarget(this.target);
  }

  get stats(): NbdBackendStats {
    return {
      connections: this.#live.length,
      inFlight: this.#live.reduce((n, c) => n + c.inFlight, 0),
      queued: this.#queue.length,
      reconnects: this.#reconnects,
      retries: this.#retries,
      bytesDirect: this.#bytesDirect + this.#live.reduce((n, c) => n + c.bytesDirect, 0),
      bytesCopied: this.#bytesCopied + this.#live.reduce((n, c) => n + c.bytesCopied, 0),
    };
  }

  read(offset: number, dst: Buffer): Promise<void> {
    return this.#io(Cmd.READ, 0, offset, dst.length, [dst]);
  }

  readv(offset: number, dsts: readonly Buffer[]): Promise<void> {
    return this.#io(Cmd.READ, 0, offset, total(dsts), dsts);
  }

  write(offset: number, src: Buffer, fua: boolean): Promise<void> {
    return this.writev(offset, [src], fua);
  }

  writev(offset: number, srcs: readonly Buffer[], fua: boolean): Promise<void> {
    if (this.readOnly) return rejectReadOnly(this);
    const io = this.#io(Cmd.WRITE, this.#fuaFlag(fua), offset, total(srcs), srcs);
    return this.#emulatedFua(io, fua);
  }

  /**
   * NBD_CMD_FLUSH. Fails with EIO (after flushing) if every connection was lost while
   * acknowledged writes were unflushed: the server may have lost them (see `strictFlush`).
   */
  flush(): Promise<void> {
    if (this.readOnly || (this.flags & F.SEND_FLUSH) === 0) return this.#closing === null ? Promise.resolve() : rejectClosed(this);
    return this.#flush(true);
  }

  /** NBD_CMD_TRIM where the export takes it (a hint: otherwise nothing happens). */
  discard(offset: number, length: number): Promise<void> {
    const bad = this.#check(offset, length);
    if (bad !== null) return bad;
    if (this.readOnly || (this.flags & F.SEND_TRIM) === 0 || length === 0) return Promise.resolve();
    return this.#effect(Cmd.TRIM, 0, offset, length);
  }

  writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    return this.zeroes(offset, length, { fua });
  }

  /** Zeroes a range: NBD_CMD_WRITE_ZEROES (with NO_HOLE / FAST_ZERO when asked), else zero writes. */
  zeroes(offset: number, length: number, options: NbdZeroOptions = {}): Promise<void> {
    if (this.readOnly) return rejectReadOnly(this);
    const bad = this.#check(offset, length);
    if (bad !== null) return bad;
    const fua = options.fua === true;
    if (options.fast === true && (this.flags & F.SEND_FAST_ZERO) === 0) {
      return Promise.reject(new NbdError(`${this.uri} cannot zero fast (no NBD_FLAG_SEND_FAST_ZERO)`, 'ENOTSUP'));
    }
    if (length === 0) return Promise.resolve();
    if ((this.flags & F.SEND_WRITE_ZEROES) === 0) return this.#emulatedFua(this.#zeroByWrites(offset, length), fua);
    const flags = this.#fuaFlag(fua) | (options.noHole === true ? CmdFlags.NO_HOLE : 0) | (options.fast === true ? CmdFlags.FAST_ZERO : 0);
    return this.#emulatedFua(this.#effect(Cmd.WRITE_ZEROES, flags, offset, length), fua);
  }

  /** Flushes (when writable), waits for the commands in flight and disconnects. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      let flushError: unknown = null;
      if (!this.readOnly && this.#live.length > 0) {
        try {
          await this.flush();
        } catch (err) {
          flushError = err;
        }
      }
      this.#wake?.();
      this.#failQueue(new NbdError(`${this.uri}: the backend is closed`, 'ECANCELED'));
      if (this.#deadlineTimer !== null) clearTimeout(this.#deadlineTimer);
      const live = this.#live;
      this.#live = [];
      await Promise.all(live.map((c) => c.close()));
      if (flushError !== null) throw flushError;
    })();
    return this.#closing;
  }

  // ---- commands ----

  #fuaFlag(fua: boolean): number {
    return fua && (this.flags & F.SEND_FUA) !== 0 ? CmdFlags.FUA : 0;
  }

  /** FUA on a server with flush but no FUA: the command, then a flush. */
  #emulatedFua(io: Promise<void>, fua: boolean): Promise<void> {
    if (!fua || (this.flags & (F.SEND_FUA | F.SEND_FLUSH)) !== F.SEND_FLUSH) return io;
    return io.then(() => this.#flush(false));
  }

  /** A flush; `report`: this is the guest's flush, which answers for a possible loss. */
  #flush(report: boolean): Promise<void> {
    const unflushed = this.#unflushed;
    const lost = report && this.#mayHaveLost;
    const downs = this.#downs;
    this.#unflushed = false;
    if (lost) this.#mayHaveLost = false;
    return this.#command(Cmd.FLUSH, 0, 0, 0, null).then(
      () => {
        // Lost before, or while this flush was in flight with writes to cover.
        if (lost || (unflushed && this.#downs !== downs && this.#options.strictFlush)) {
          throw new NbdError(`NBD server ${this.uri} went away while it held acknowledged writes it had not flushed: they may be lost`, 'EIO');
        }
      },
      (err: unknown) => {
        this.#unflushed ||= unflushed;
        this.#mayHaveLost ||= lost;
        throw err;
      },
    );
  }

  /** A rejected promise if the range is outside the export or not aligned to the minimum block size. */
  #check(offset: number, length: number): Promise<never> | null {
    try {
      checkRange(this.size, offset, length);
    } catch (err) {
      return Promise.reject(err);
    }
    if (offset % this.minBlock !== 0 || length % this.minBlock !== 0) {
      return Promise.reject(new NbdError(`${this.uri}: ${length} bytes at ${offset} are not aligned to the export's minimum block size ${this.minBlock}`, 'EINVAL'));
    }
    if (this.#closing !== null) return rejectClosed(this);
    return null;
  }

  /** READ or WRITE of `length` bytes from/to `bufs`, split at the server's maximum payload. */
  #io(type: number, flags: number, offset: number, length: number, bufs: readonly Buffer[]): Promise<void> {
    const bad = this.#check(offset, length);
    if (bad !== null) return bad;
    if (length === 0) return Promise.resolve();
    const max = this.maxPayload;
    if (length <= max) return this.#command(type, flags, offset, length, bufs);
    const parts: Promise<void>[] = [];
    for (let at = 0; at < length; at += max) {
      const n = Math.min(max, length - at);
      parts.push(this.#command(type, flags, offset + at, n, sliceBufs(bufs, at, n)));
    }
    return Promise.all(parts).then(() => undefined);
  }

  /** TRIM or WRITE_ZEROES in commands of at most 1 GiB. */
  #effect(type: number, flags: number, offset: number, length: number): Promise<void> {
    if (length <= MAX_EFFECT) return this.#command(type, flags, offset, length, null);
    const step = MAX_EFFECT - (MAX_EFFECT % this.minBlock);
    const parts: Promise<void>[] = [];
    for (let at = 0; at < length; at += step) parts.push(this.#command(type, flags, offset + at, Math.min(step, length - at), null));
    return Promise.all(parts).then(() => undefined);
  }

  async #zeroByWrites(offset: number, length: number): Promise<void> {
    const chunk = Math.min(this.maxPayload, 1 << 20);
    if (zeroBuf === null || zeroBuf.length < chunk) zeroBuf = Buffer.alloc(Math.max(chunk, 1 << 20));
    for (let at = 0; at < length; at += chunk) {
      const n = Math.min(chunk, length - at);
      await this.#command(Cmd.WRITE, 0, offset + at, n, [zeroBuf.subarray(0, n)]);
    }
  }

  #command(type: number, flags: number, offset: number, length: number, bufs: readonly Buffer[] | null): Promise<void> {
    if (this.#closing !== null && type !== Cmd.FLUSH) return rejectClosed(this);
    return new Promise<void>((resolve, reject) => {
      const op = newOp(type, flags, offset, length, bufs, (err) => {
        if (err === null) {
          if (type !== Cmd.READ && type !== Cmd.FLUSH && (flags & CmdFlags.FUA) === 0) this.#unflushed = true;
          resolve();
        } else reject(err);
        if (this.#queue.length > 0) process.nextTick(this.#pump);
      });
      this.#submit(op);
    });
  }

  #submit(op: NbdOp): void {
    const conn = this.#pick();
    if (conn !== null) {
      conn.submit(op);
      return;
    }
    op.deadline = this.#live.length > 0 ? Infinity : performance.now() + this.#options.reconnectTimeoutMs;
    this.#queue.push(op);
    if (this.#live.length === 0) {
      this.#armDeadline();
      void this.#reconnect();
    }
  }

  /** The open connection with the fewest commands in flight and room for more, or null. */
  #pick(): NbdConnection | null {
    let best: NbdConnection | null = null;
    for (const c of this.#live) {
      if (c.inFlight < this.#options.maxInFlight && (best === null || c.inFlight < best.inFlight)) best = c;
    }
    return best;
  }

  /** Sends waiting commands while a connection has room. */
  #dispatch(): void {
    while (this.#queue.length > 0) {
      const conn = this.#pick();
      if (conn === null) return;
      conn.submit(this.#queue.shift()!);
    }
  }

  // ---- connections ----

  /** A connection opened besides the first by open(). */
  #adoptExtra(conn: NbdConnection): void {
    if (this.#closing !== null || this.#live.length >= this.#want) {
      void conn.close();
      return;
    }
    try {
      this.#adopt(conn);
    } catch (err) {
      conn.destroy();
      this.#extraFailed(err as Error);
    }
  }

  #extraFailed(err: Error): void {
    this.#lastError = err;
    this.#extraFailures++;
  }

  /** Takes a new connection into service; throws (code ESTALE) if its export is not the one opened. */
  #adopt(conn: NbdConnection): void {
    const info = conn.info;
    const why =
      info.size < this.size
        ? `shrank from ${this.size} to ${info.size} bytes`
        : !this.readOnly && (info.flags & F.READ_ONLY) !== 0
          ? 'became read-only'
          : (this.flags & KEPT_FEATURES & ~info.flags) !== 0
            ? `lost features (flags 0x${this.flags.toString(16)} before, 0x${info.flags.toString(16)} now)`
            : this.#want > 1 && (info.flags & F.CAN_MULTI_CONN) === 0
              ? 'no longer allows several connections'
              : info.minBlock > this.minBlock || info.maxPayload < this.maxPayload
                ? 'changed its block size constraints'
                : null;
    if (why !== null) throw new NbdError(`NBD export ${this.uri} ${why}`, 'ESTALE');
    this.#live.push(conn);
    conn.onClose = (err, retry) => this.#onConnectionClosed(conn, err, retry);
    if (this.#down) {
      this.#down = false;
      this.emit('reconnect');
    }
    this.#dispatch();
  }

  #onConnectionClosed(conn: NbdConnection, err: Error | null, retry: NbdOp[]): void {
    const i = this.#live.indexOf(conn);
    if (i >= 0) this.#live.splice(i, 1);
    this.#bytesDirect += conn.bytesDirect;
    this.#bytesCopied += conn.bytesCopied;
    if (err === null || this.#closing !== null) {
      for (const op of retry) op.done(err ?? new NbdError(`${this.uri}: the backend is closed`, 'ECANCELED'));
      return;
    }
    this.#lastError = err;
    const down = this.#live.length === 0;
    const deadline = down ? performance.now() + this.#options.reconnectTimeoutMs : Infinity;
    const again: NbdOp[] = [];
    for (const op of retry) {
      if (++op.attempts >= this.#options.maxAttempts) {
        op.done(new NbdError(`${this.uri}: gave up on a command after ${op.attempts} lost connections (${err.message})`, (err as NbdError).code ?? 'EIO'));
        continue;
      }
      op.deadline = deadline;
      again.push(op);
      this.#retries++;
    }
    if (down) {
      for (const op of this.#queue) if (op.deadline === Infinity) op.deadline = deadline;
    }
    this.#queue = again.concat(this.#queue);
    if (down) {
      this.#down = true;
      this.#extraFailures = 0;
      this.#downs++;
      if (this.#unflushed && this.#options.strictFlush) this.#mayHaveLost = true;
      this.emit('disconnect', err);
      this.#armDeadline();
    }
    this.#dispatch();
    void this.#reconnect();
  }

  /** Reconnects with backoff while connections are missing and someone needs them. */
  async #reconnect(): Promise<void> {
    if (this.#reconnecting) return;
    this.#reconnecting = true;
    let delay = this.#options.backoffMs;
    try {
      while (
        this.#closing === null &&
        this.#live.length < this.#want &&
        (this.#queue.length > 0 || this.#live.length > 0) &&
        // Extra connections the server keeps refusing (or never answers) are given up on.
        (this.#live.length === 0 || this.#extraFailures < MAX_EXTRA_FAILURES)
      ) {
        let conn: NbdConnection | null = null;
        try {
          conn = await NbdConnection.connect(this.target, this.#connectOptions);
          if (this.#closing !== null || this.#live.length >= this.#want) {
            void conn.close(); // closing, or open() got its extra connections meanwhile
            continue;
          }
          this.#adopt(conn);
          this.#reconnects++;
          this.#extraFailures = 0;
          delay = this.#options.backoffMs;
          continue;
        } catch (err) {
          conn?.destroy();
          this.#lastError = err as Error;
          if (this.#live.length > 0) this.#extraFailures++;
          // An export that changed under us: the waiting commands fail now, not at their deadline.
          if ((err as NbdError).code === 'ESTALE') this.#failQueue(err as Error);
        }
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, delay);
          this.#wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.#wake = null;
        delay = Math.min(2 * delay, this.#options.maxBackoffMs);
      }
    } finally {
      this.#reconnecting = false;
    }
  }

  /** Fails waiting commands whose deadline passed while no connection was open. */
  #armDeadline(): void {
    if (this.#deadlineTimer !== null || this.#queue.length === 0) return;
    let first = Infinity;
    for (const op of this.#queue) first = Math.min(first, op.deadline);
    if (first === Infinity) return;
    this.#deadlineTimer = setTimeout(
      () => {
        this.#deadlineTimer = null;
        if (this.#live.length > 0) return;
        const now = performance.now();
        const expired = this.#queue.filter((op) => op.deadline <= now);
        this.#queue = this.#queue.filter((op) => op.deadline > now);
        const cause = this.#lastError?.message ?? 'no connection';
        for (const op of expired) op.done(new NbdError(`NBD server ${this.uri} unavailable for ${this.#options.reconnectTimeoutMs} ms (${cause})`, 'ETIMEDOUT'));
        this.#armDeadline();
      },
      Math.max(0, first - performance.now()) + 1,
    );
  }

  #failQueue(err: Error): void {
    const queue = this.#queue;
    this.#queue = [];
    for (const op of queue) op.done(err);
  }
}

function total(bufs: readonly Buffer[]): number {
  let n = 0;
  for (const b of bufs) n += b.length;
  return n;
}

/** The bytes `[at, at + n)` of `bufs` seen as one, as a list of views. */
function sliceBufs(bufs: readonly Buffer[], at: number, n: number): Buffer[] {
  const out: Buffer[] = [];
  let i = 0;
  while (at >= bufs[i]!.length) at -= bufs[i++]!.length;
  while (n > 0) {
    const b = bufs[i++]!;
    const k = Math.min(n, b.length - at);
    out.push(b.subarray(at, at + k));
    n -= k;
    at = 0;
  }
  return out;
}

function rejectReadOnly(b: NbdBackend): Promise<never> {
  return Promise.reject(new NbdError(`${b.uri} is read-only`, 'EROFS'));
}

function rejectClosed(b: NbdBackend): Promise<never> {
  return Promise.reject(new NbdError(`${b.uri}: the backend is closed`, 'ECANCELED'));
}
