/** The client's sockets: main connection and twin, one checked request path, posted writes in order. */
import { binding } from '../native/binding';
import { Fd } from '../native/fd';
import { Command, Errno, commandName } from '../protocol/constants';
import { VfioUserError } from '../protocol/errors';
import type { Negotiated } from '../protocol/capabilities';
import { WRITE_MULTI_MAX_DATA, encodeRegionWriteMultiRequest, writeRegionAccess } from '../protocol/messages/access';
import { Connection, type Body, type IncomingMessage } from '../transport/connection';
import { protocolError } from './errors';
import { ClientLimits, type ClientSettings } from './options';

/** Where the client's connection stands; 'disconnected' only with the `reconnect` option or during reconnect. */
export type LinkState = 'connecting' | 'open' | 'disconnected' | 'closed';

/** @internal How one request is sent and what its reply may carry. */
export interface CallSpec {
  fds?: readonly number[] | null;
  timeoutMs?: number | undefined;
  /** The reply may carry fds (the parser takes them); otherwise any fd fails the call. */
  allowFds?: boolean;
}

/** @internal What the parts of the client that ask the server need. */
export interface Caller {
  /**
   * Sends `command` and resolves with `parse(reply)`; `parse` runs while the reply is valid and may
   * throw (that rejects the call).
   */
  call<T>(command: number, body: Body, parse: (reply: IncomingMessage) => T, spec?: CallSpec): Promise<T>;
}

/** @internal What the link reports to the client. */
export interface LinkHooks {
  /** A command of the server (DMA_READ/DMA_WRITE) on either socket; `msg` is valid only during the call. */
  serve(msg: IncomingMessage, conn: Connection): void;
  /** The current main connection or twin ended by itself (its error, or ECONNRESET for a clean EOF). */
  lost(error: Error): void;
}

interface PendingMulti {
  offset: bigint;
  region: number;
  data: Uint8Array;
}

/**
 * @internal The client's connection to one server, across reconnects. Requests wait for their
 * reply; posted writes go out at once, or while the socket is congested are coalesced into one
 * REGION_WRITE_MULTI that every later message (a request, the next posted write) sends first, so
 * the server sees them in the order they were made.
 */
export class ClientLink implements Caller {
  #state: LinkState = 'connecting';
  #conn: Connection;
  #twin: Connection | null = null;
  #writeMultiple = false;
  #multi: PendingMulti[] = [];
  /** The 16-byte region-access struct of the posted write being sent (copied synchronously). */
  readonly #scratch = Buffer.alloc(16);
  readonly #settings: ClientSettings;
  readonly #hooks: LinkHooks;

  constructor(socket: Fd, settings: ClientSettings, hooks: LinkHooks) {
    this.#settings = settings;
    this.#hooks = hooks;
    this.#conn = this.#open(socket);
  }

  get state(): LinkState {
    return this.#state;
  }

  /** True if server-to-client commands use a twin socket (reference §1.9). */
  get twinSocket(): boolean {
    return this.#twin !== null;
  }

  /** Most fds the server accepts per message. */
  get maxSendFds(): number {
    return this.#conn.maxSendFds;
  }

  /** The main connection on `socket`, with its end reported to {@link LinkHooks.lost}. */
  #open(socket: Fd): Connection {
    const s = this.#settings;
    const conn = new Connection(socket, {
      name: s.name,
      maxRecvFds: s.maxMsgFds,
      requestTimeoutMs: s.timeoutMs,
      // Our own data limit bounds DMA_WRITE commands; region-info chains are bounded separately.
      maxMessageSize: Math.max(s.maxDataXferSize, ClientLimits.MAX_REGION_INFO_ARGSZ) + 4096,
      highWaterMark: s.congestionThreshold,
      firstMsgId: 0,
    });
    // A clean EOF while we are not closing is still the end of the device: report it as ECONNRESET.
    conn.on('close', (err: Error | null) => {
      if (conn === this.#conn) this.#hooks.lost(err ?? new VfioUserError(Errno.ECONNRESET, 0, 0, 'the server closed the connection'));
    });
    conn.on('drain', () => this.flush());
    return conn;
  }

  /** Connects to `path` again (reconnect): 'connecting' on a new main connection, to be negotiated. */
  restart(path: string): void {
    this.#state = 'connecting';
    this.#conn = this.#open(new Fd(binding.unixConnect(path)));
  }

  /**
   * VERSION succeeded with `negotiated`: the server's commands are served, the twin socket (its fd
   * from the VERSION reply) opened, and the link is 'open'.
   *
   * @throws {VfioUserError} ECONNRESET if the client closed meanwhile (`twinFd` is closed).
   */
  adopt(negotiated: Readonly<Negotiated>, twinFd: Fd | null): void {
    if (this.#state === 'closed') {
      twinFd?.close();
      throw new VfioUserError(Errno.ECONNRESET, Command.VERSION, 0, 'connection closed during bring-up');
    }
    const s = this.#settings;
    this.#writeMultiple = s.writeMultiple && negotiated.writeMultiple;
    this.#conn.maxSendFds = negotiated.maxSendFds;
    this.#conn.onRequest = (msg, conn) => this.#hooks.serve(msg, conn);
    if (twinFd !== null) {
      const twin = new Connection(twinFd, {
        name: `${s.name}-twin`,
        maxRecvFds: s.maxMsgFds,
        requestTimeoutMs: s.timeoutMs,
        maxMessageSize: s.maxDataXferSize + 4096,
      });
      twin.onRequest = (msg, conn) => this.#hooks.serve(msg, conn);
      twin.on('close', (err: Error | null) => {
        if (twin === this.#twin) this.#hooks.lost(err ?? new VfioUserError(Errno.ECONNRESET, 0, 0, 'the twin socket closed'));
      });
      this.#twin = twin;
    }
    this.#state = 'open';
  }

  /** Ends both sockets, to be reconnected later: 'disconnected', batched writes dropped. */
  drop(error: Error): void {
    this.#state = 'disconnected';
    this.#multi = [];
    this.#conn.close(error);
    const twin = this.#twin;
    this.#twin = null;
    twin?.close(error);
  }

  /** Ends both sockets for good: 'closed', batched writes dropped, pending calls failed with `error`. */
  close(error: Error | null): void {
    this.#state = 'closed';
    this.#multi = [];
    this.#conn.close(error);
    this.#twin?.close(error);
  }

  /** Sends a request (after any batched writes, so they keep their order); see {@link Caller.call}. */
  call<T>(command: number, body: Body, parse: (reply: IncomingMessage) => T, spec: CallSpec = {}): Promise<T> {
    if (this.#state === 'closed' || this.#state === 'disconnected') {
      return Promise.reject(new VfioUserError(Errno.ECONNRESET, command, 0, `${commandName(command)}: the client is ${this.#state}`));
    }
    this.flush();
    return new Promise<T>((resolve, reject) => {
      this.#conn.send(
        command,
        body,
        spec.fds ?? null,
        (err, reply) => {
          if (err !== null) {
            reject(err);
            return;
          }
          const msg = reply!;
          if (spec.allowFds !== true && msg.fdCount > 0) {
            const n = msg.fdCount;
            msg.closeFds();
            reject(protocolError(`${commandName(command)} reply: carries ${String(n)} unexpected fds`, 'fds'));
            return;
          }
          try {
            resolve(parse(msg));
          } catch (e) {
            reject(e as Error);
          }
        },
        spec.timeoutMs ?? this.#settings.timeoutMs,
      );
    });
  }

  /** A request whose reply must carry no fds; resolves with a copy of the payload. */
  request(command: number, body: Body, spec: CallSpec = {}): Promise<Buffer> {
    return this.call(command, body, (msg) => Buffer.from(msg.payload), spec);
  }

  /** A posted REGION_WRITE, or a slot in the REGION_WRITE_MULTI batch while the socket is congested. */
  postWrite(index: number, offset: bigint, data: Uint8Array): void {
    if (this.#state !== 'open') throw new VfioUserError(Errno.ECONNRESET, Command.REGION_WRITE, 0, 'REGION_WRITE: the client is closed');
    const multi = this.#writeMultiple && data.length <= WRITE_MULTI_MAX_DATA;
    if (multi && (this.#multi.length > 0 || this.#conn.writableNeedDrain)) {
      this.#multi.push({ offset, region: index, data: Buffer.from(data) });
      if (this.#multi.length >= ClientLimits.MAX_WRITE_MULTI) this.flush();
      return;
    }
    this.flush();
    writeRegionAccess(this.#scratch, 0, { offset, region: index, count: data.length });
    this.#conn.post(Command.REGION_WRITE, [this.#scratch, data]);
  }

  /** Sends the batched writes as one posted REGION_WRITE_MULTI. */
  flush(): void {
    if (this.#multi.length === 0) return;
    const wrs = this.#multi;
    this.#multi = [];
    if (this.#conn.state !== 'open') return;
    this.#conn.post(Command.REGION_WRITE_MULTI, encodeRegionWriteMultiRequest(wrs));
  }
}
