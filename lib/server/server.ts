/**
 * `VfioUserServer`: serves one device on a UNIX socket path, one client at a time
 * (reference §1.2, §6.1, §6.3).
 *
 * The socket file is created with mode 0600 unless told otherwise (atomically: it never exists
 * with a wider mode), is never taken over from a live server, and is removed on close. A second
 * client while one is connected gets an EBUSY error reply to its VERSION and is disconnected; the
 * first is unaffected. When a client goes away its DMA maps and IRQ eventfds are dropped, the
 * device is told ('lost-connection' reset), and the next client is served.
 *
 * Availability: a client that does not send VERSION within `versionTimeoutMs`, or starts a message
 * and does not finish it within `messageTimeoutMs`, is disconnected ('disconnect' with an
 * ETIMEDOUT error). A connection costs a few KiB until it negotiates. When accept() fails (at the
 * fd limit, EMFILE/ENFILE) the listener is not watched for a while (50 ms, doubling to 1 s), so
 * the server does not spin; queued clients are served once fds are free again.
 */
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as os from 'node:os';
import { debuglog } from 'node:util';
import { binding } from '../native/binding';
import { Fd } from '../native/fd';
import { Command, Defaults, Errno } from '../protocol/constants';
import { VfioUserError } from '../protocol/errors';
import type { CapabilitiesInput } from '../protocol/capabilities';
import { Connection, MAX_BUSY_POLL_US, type IncomingMessage } from '../transport/connection';
import type { ResetReason, VfioUserDevice } from './device';
import { DmaSpace } from './dma';
import { IrqTable } from './irq';
import { Migration } from './migration';
import { Quiescer } from './quiesce';
import { listeningSocket } from './listen-fd';
import { Session, type ServerCore } from './session';

const debug = debuglog('vfio-user:server');

export interface ServerOptions {
  /** Mode of the socket file (default 0o600: only this user may connect). */
  mode?: number;
  /** Most fds accepted per message, announced as max_msg_fds (default 16, QEMU's ceiling). */
  maxMsgFds?: number;
  /** Largest data transfer accepted, announced as max_data_xfer_size (default 1 MiB). */
  maxDataXferSize?: number;
  /** Most simultaneous DMA maps, announced as max_dma_maps (default 65535). */
  maxDmaMaps?: number;
  /** Accept REGION_WRITE_MULTI (announced as write_multiple; default true). */
  writeMultiple?: boolean;
  /** Reply timeout for our own DMA_READ/DMA_WRITE requests to the client (default 5000 ms). */
  requestTimeoutMs?: number;
  /** A client must send VERSION within this many ms of being served, or is disconnected (default 10000; 0: no limit). */
  versionTimeoutMs?: number;
  /**
   * Once a message has begun to arrive, the rest must follow within this many ms, or the client is
   * disconnected (default 5000; 0: no limit). It fires between one and two times this value.
   */
  messageTimeoutMs?: number;
  /**
   * Keep the device's state when its client goes away, for the next client (a VMM restarting)
   * instead of resetting it: the device is suspended (`VfioUserDevice.suspend`: its I/O in flight
   * finishes, nothing more runs), the client's maps and eventfds are dropped, and the device
   * carries on once the next client, having mapped its memory again, uses it. Default false.
   */
  keepState?: boolean;
  /**
   * Busy-poll the client's socket for this many microseconds after each burst of its messages
   * (0..10000; default 0, off): a client that sends its next message within the window is served
   * without an epoll round trip, at the cost of CPU while it is active. See
   * the transport's `ConnectionOptions.busyPollUs`.
   */
  busyPollUs?: number;
}

/** Listen backlog: a burst of connects queues (and gets a clean EBUSY), not EAGAIN. */
const LISTEN_BACKLOG = 511;
/** After accept() fails (EMFILE, ENFILE, ENOMEM...), wait this long, doubling up to the maximum. */
const ACCEPT_RETRY_MS = 50;
const ACCEPT_RETRY_MAX_MS = 1000;
/** A client that connects while another is served must speak within this (or versionTimeoutMs). */
const NEWCOMER_TIMEOUT_MS = 2000;

export interface VfioUserServerEvents {
  /** A client connected (before VERSION). */
  connect: [];
  /** The client went away and its state was dropped; `error` is null for a clean hang-up. */
  disconnect: [error: Error | null];
  /** A second client was turned away. */
  reject: [];
  /** A device model threw; the client got EINVAL and the server goes on. */
  error: [error: unknown];
  /** A migration stream was refused (the client only sees EINVAL): why. */
  'migration-refused': [error: Error];
}

/** A client that connected while another was served, and what it sent so far. */
interface Newcomer {
  conn: Connection;
  held: IncomingMessage[];
}

export class VfioUserServer extends EventEmitter implements ServerCore {
  readonly dma: DmaSpace;
  readonly irqs: IrqTable;
  readonly migration: Migration | null;
  readonly writeMultiple: boolean;
  /** The device keeps its state across clients (see {@link ServerOptions.keepState}). */
  readonly keepState: boolean;
  /** Asks the device to quiesce around DMA_MAP/UNMAP, resets and migration changes (quiesce.ts). */
  readonly quiescer: Quiescer;
  private listenFd: Fd | null;
  /** The socket file is ours to remove on close (not for an inherited socket). */
  private ownsPath = true;
  private readonly poller: InstanceType<typeof binding.Poller>;
  private session: Session | null = null;
  /** Settles when the last client's state has been dropped. */
  private cleanup: Promise<void> = Promise.resolve();
  /** Clients that connected while the previous one's state was still being dropped. */
  private waiting: (Fd | Newcomer)[] = [];
  /** Clients that connected while another was served and are not yet answered. */
  private readonly newcomers = new Set<Connection>();
  private closing: Promise<void> | null = null;
  /** Set while the listener is not watched after a failed accept(). */
  private acceptRetry: NodeJS.Timeout | null = null;
  private acceptDelay = ACCEPT_RETRY_MS;
  private readonly versionTimeoutMs: number;
  private readonly messageTimeoutMs: number;

  private constructor(
    readonly path: string,
    readonly device: VfioUserDevice,
    listenFd: Fd,
    private readonly options: ServerOptions,
  ) {
    super();
    this.listenFd = listenFd;
    this.writeMultiple = options.writeMultiple ?? true;
    this.versionTimeoutMs = options.versionTimeoutMs ?? 10_000;
    this.messageTimeoutMs = options.messageTimeoutMs ?? 5000;
    this.dma = new DmaSpace(options.maxDmaMaps ?? Defaults.MAX_DMA_MAPS);
    this.irqs = new IrqTable(device.irqs);
    this.irqs.onChange = (index) => device.irqsChanged?.(index);
    this.migration = device.migration ? new Migration(device.migration) : null;
    if (this.migration !== null) this.migration.onRefused = (err) => this.emit('migration-refused', err);
    this.keepState = options.keepState ?? false;
    this.quiescer = new Quiescer(device, (err) => this.deviceError(err));
    if (device.dmaMapped !== undefined || device.dmaUnmapped !== undefined) {
      // The device hears of maps; its mistakes are reported, never the client's failure.
      this.dma.listener = {
        mapped: (region) => {
          try {
            device.dmaMapped?.(region);
          } catch (err) {
            this.deviceError(err);
          }
        },
        unmapped: async (region) => {
          try {
            await device.dmaUnmapped?.(region);
          } catch (err) {
            this.deviceError(err);
          }
        },
      };
    }
    device.attach({ dma: this.dma, irqs: this.irqs, quiesced: (errno) => this.quiescer.done(errno) });
    // A client that truncated memory it shared with us lied about it: the map is poisoned (its
    // DMA fails with EFAULT) and the client is let go; the device is reset as for any hang-up.
    this.dma.onPoison = (region) => {
      const why = `the client truncated the memory of DMA map 0x${region.iova.toString(16)}+0x${region.size.toString(16)}`;
      debug('%s: disconnecting it', why);
      const conn = this.session?.conn;
      // Not from inside the device's DMA path that noticed it: from the event loop.
      setImmediate(() => conn?.close(new VfioUserError(Errno.EFAULT, Command.DMA_MAP, 0, why)));
    };
    this.poller = new binding.Poller(listenFd.value, () => this.acceptAll());
    this.poller.start(binding.pollEvents.READABLE);
  }

  /**
   * Listen on `path` and serve `device`. Refuses (EADDRINUSE) to replace a socket a live server
   * is listening on, or anything that is not a socket; a stale socket file is replaced.
   */
  static async listen(path: string, device: VfioUserDevice, options: ServerOptions = {}): Promise<VfioUserServer> {
    const mode = options.mode ?? 0o600;
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) throw new RangeError(`mode must be a file mode from 0 to 0o777, got ${String(mode)}`);
    checkTimeouts(options);
    removeStaleSocket(path);
    // The socket file is born with `mode` less the umask (never wider than `mode`); the chmod then
    // sets exactly `mode`, adding back what the umask took.
    const fd = new Fd(binding.unixListen(path, LISTEN_BACKLOG, mode));
    try {
      fs.chmodSync(path, mode);
    } catch (err) {
      fd.close();
      throw err;
    }
    return new VfioUserServer(path, device, fd, options);
  }

  /**
   * Serve `device` on a listening UNIX stream socket that already exists (socket activation: an fd
   * inherited from systemd or a supervisor). The server owns the fd from now on (close() closes
   * it) but never removes the socket file, which is not its own; `path` is where the socket is
   * bound ('' if it has no path). The `mode` option does not apply.
   *
   * @throws EBADF, ENOTSOCK or EINVAL (with `code`) for an fd that is not a listening UNIX stream
   * socket; nothing is taken then.
   */
  static fromFd(fd: number | Fd, device: VfioUserDevice, options: ServerOptions = {}): VfioUserServer {
    checkTimeouts(options);
    const raw = typeof fd === 'number' ? fd : fd.value;
    const { path } = listeningSocket(raw);
    const owned = typeof fd === 'number' ? new Fd(fd) : fd;
    // The Poller switches the fd to O_NONBLOCK before the first accept.
    const server = new VfioUserServer(path ?? '', device, owned, options);
    server.ownsPath = false;
    return server;
  }

  /** True while a client is connected. */
  get connected(): boolean {
    return this.session !== null;
  }

  /** The negotiated parameters of the current client, once VERSION is done. */
  get negotiated() {
    return this.session?.negotiated ?? null;
  }

  capabilities(): CapabilitiesInput {
    return {
      maxMsgFds: this.options.maxMsgFds ?? 16,
      maxDataXferSize: this.options.maxDataXferSize ?? Defaults.MAX_DATA_XFER_SIZE,
      pgsizes: BigInt(Defaults.PGSIZES),
      maxDmaMaps: this.dma.maxMaps,
      writeMultiple: this.writeMultiple,
      migration: this.migration ? { pgsize: binding.constants.PAGE_SIZE } : undefined,
    };
  }

  /**
   * Reset the device (quiesced first, if it asks to be). Resolves 0, or the errno it failed to
   * quiesce with (the reset after a hang-up happens anyway).
   */
  async resetDevice(reason: ResetReason): Promise<number> {
    const lost = reason === 'lost-connection';
    const errno = await this.quiescer.run(
      lost ? 'lost-connection' : 'reset',
      async () => {
        await this.device.reset?.(reason);
        this.migration?.onReset();
        return 0;
      },
      lost,
    );
    return lost ? 0 : errno;
  }

  /** A device callback threw: reported as 'error' when anyone listens; the server goes on. */
  private deviceError(err: unknown): void {
    debug('device error: %s', (err as Error)?.message ?? String(err));
    if (this.listenerCount('error') > 0) this.emit('error', err);
  }

  /** Stop listening, disconnect the client, drop its state, remove the socket file. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      if (this.acceptRetry !== null) clearTimeout(this.acceptRetry);
      this.acceptRetry = null;
      this.poller.close();
      this.listenFd?.close();
      this.listenFd = null;
      try {
        if (this.ownsPath) fs.unlinkSync(this.path);
      } catch {
        // already gone
      }
      for (const w of this.waiting.splice(0)) {
        if (w instanceof Fd) w.close();
        else w.conn.close();
      }
      for (const conn of [...this.newcomers]) conn.close();
      this.session?.conn.close();
      await this.cleanup;
      await this.device.close?.();
    })();
    return this.closing;
  }

  private acceptAll(): void {
    while (this.listenFd !== null) {
      let raw: number;
      try {
        raw = binding.unixAccept(this.listenFd.value);
      } catch (err) {
        this.pauseAccept(err as Error);
        return;
      }
      if (raw < 0) return;
      this.acceptDelay = ACCEPT_RETRY_MS;
      const fd = new Fd(raw);
      if (this.session === null && this.waiting.length === 0) this.startSession(fd);
      else if (this.session !== null && this.session.conn.state === 'open') this.newcomer(fd);
      else this.waiting.push(fd); // the previous client's state is still being dropped
    }
  }

  /**
   * accept() failed. At the fd limit (EMFILE, ENFILE) or short of memory the connection stays
   * queued and the listener stays readable, so watching it would spin: stop watching, and look
   * again after a delay that doubles up to ACCEPT_RETRY_MAX_MS. Queued clients wait in the backlog
   * and are served once fds are free.
   */
  private pauseAccept(err: Error): void {
    if (this.acceptRetry !== null || this.listenFd === null) return;
    const delay = this.acceptDelay;
    debug('accept failed (%s): not accepting for %d ms', err.message, delay);
    this.acceptDelay = Math.min(delay * 2, ACCEPT_RETRY_MAX_MS);
    this.poller.stop();
    this.acceptRetry = setTimeout(() => {
      this.acceptRetry = null;
      if (this.listenFd !== null) this.poller.start(binding.pollEvents.READABLE);
    }, delay);
  }

  private connection(fd: Fd, name: string): Connection {
    return new Connection(fd, {
      name,
      maxRecvFds: this.options.maxMsgFds ?? 16,
      requestTimeoutMs: this.options.requestTimeoutMs ?? 5000,
      messageTimeoutMs: this.messageTimeoutMs,
      busyPollUs: this.options.busyPollUs ?? 0,
      firstMsgId: 1,
      // writableNeedDrain then says whether anything is queued: the session needs to know when the
      // VERSION reply lending the twin socket's fd has gone (Session.closeWhenSent).
      highWaterMark: 0,
    });
  }

  private startSession(next: Fd | Newcomer): void {
    const conn = next instanceof Fd ? this.connection(next, 'client') : next.conn;
    const session = new Session(conn, this, this.versionTimeoutMs);
    this.session = session;
    this.dma.transport = session.transport;
    conn.on('close', (err: Error | null) => this.endSession(session, err));
    this.emit('connect');
    if (next instanceof Fd) return;
    // What the newcomer sent while it waited, in order.
    this.newcomers.delete(conn);
    for (const msg of next.held.splice(0)) {
      if (conn.state === 'open') conn.onRequest?.(msg, conn);
      msg.closeFds();
    }
  }

  /**
   * One client at a time. A client that connects while another is served is answered when it
   * speaks, after the event-loop turn in which its message arrived: if the current client is
   * still there it gets EBUSY and is hung up on; if the current client's hang-up was read in the
   * meantime (both can be pending at once), it waits for the cleanup and is served.
   */
  private newcomer(fd: Fd): void {
    const conn = this.connection(fd, 'newcomer');
    const waiter: Newcomer = { conn, held: [] };
    this.newcomers.add(conn);
    const silence = this.versionTimeoutMs > 0 ? Math.min(NEWCOMER_TIMEOUT_MS, this.versionTimeoutMs) : NEWCOMER_TIMEOUT_MS;
    const timer = setTimeout(() => {
      debug('a second client said nothing within %d ms: closing', silence);
      conn.close();
    }, silence);
    timer.unref();
    conn.on('close', () => {
      clearTimeout(timer);
      this.newcomers.delete(conn);
      this.waiting = this.waiting.filter((w) => w !== waiter);
      for (const msg of waiter.held.splice(0)) msg.closeFds();
    });
    conn.onRequest = (msg) => {
      waiter.held.push(msg.detach());
      if (waiter.held.length > 1) return;
      setImmediate(() => {
        if (conn.state !== 'open' || this.closing !== null) return;
        if (this.session !== null && this.session.conn.state === 'open') {
          conn.replyError(waiter.held[0]!, Errno.EBUSY);
          this.emit('reject');
          setImmediate(() => conn.close());
          return;
        }
        clearTimeout(timer);
        if (this.session === null && this.waiting.length === 0) this.startSession(waiter);
        else this.waiting.push(waiter);
      });
    };
  }

  private endSession(session: Session, error: Error | null): void {
    session.close();
    this.cleanup = (async () => {
      // The command that was running finishes before the device is reset under it (bounded: a
      // device callback that never settles must not keep the next client out for ever).
      if (!(await settlesWithin(session.idle(), IDLE_WAIT_MS))) debug('a command still runs %d ms after the client left: resetting anyway', IDLE_WAIT_MS);
      this.irqs.clear();
      this.dma.transport = null;
      try {
        // The device stops its I/O first, so the unmaps below need not wait on it. A connection
        // that never negotiated (e.g. a liveness probe) cannot have changed anything. With
        // keepState the device is suspended instead of reset: the next client continues it.
        if (session.negotiated !== null) {
          if (!this.keepState) await this.resetDevice('lost-connection');
          else await this.device.suspend?.();
        }
        // Then a migration session ends with its client (migration.ts): a device it had stopped
        // runs again, reset or suspended already, so it never runs on the departed client's memory.
        await this.migration?.abortSession();
      } catch (err) {
        // Without a listener, emit('error') would throw and skip the rest of the cleanup.
        if (this.listenerCount('error') > 0) this.emit('error', err);
      }
      await this.dma.removeAll();
      this.dma.stopLogging();
      this.session = null;
      this.emit('disconnect', error);
      const next = this.waiting.shift();
      if (next !== undefined && this.closing === null) this.startSession(next);
    })();
  }
}

/** How long a departed client's last command may run before the device is reset anyway. */
const IDLE_WAIT_MS = 5000;

/** True if `p` settles within `ms`. */
function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    const done = () => {
      clearTimeout(timer);
      resolve(true);
    };
    p.then(done, done);
  });
}

function checkTimeouts(options: ServerOptions): void {
  for (const key of ['versionTimeoutMs', 'messageTimeoutMs'] as const) {
    const ms = options[key];
    if (ms !== undefined && !(Number.isInteger(ms) && ms >= 0 && ms <= 0x7fffffff)) throw new RangeError(`${key} must be an integer number of ms >= 0, got ${String(ms)}`);
  }
  const us = options.busyPollUs;
  if (us !== undefined && !(Number.isInteger(us) && us >= 0 && us <= MAX_BUSY_POLL_US)) throw new RangeError(`busyPollUs must be an integer number of microseconds from 0 to ${MAX_BUSY_POLL_US}, got ${String(us)}`);
}

/** Remove a socket file nobody listens on; refuse to touch a live socket or a non-socket. */
function removeStaleSocket(path: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  const inUse = (why: string) => Object.assign(new Error(`${path}: ${why}`), { code: 'EADDRINUSE', errno: os.constants.errno.EADDRINUSE, syscall: 'bind' });
  if (!st.isSocket()) throw inUse('exists and is not a socket; refusing to replace it');
  let probe: number;
  try {
    probe = binding.unixConnect(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ECONNREFUSED') {
      fs.unlinkSync(path);
      return;
    }
    throw err;
  }
  new Fd(probe).close();
  throw inUse('a live server is listening on it');
}
