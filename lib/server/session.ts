/**
 * One client's session with the server: version negotiation, then every command dispatched through
 * one table, strictly in arrival order (reference §1.8, §6.2), with replies built in one place
 * ({@link Session.finish}). Handlers return a result or an errno and never throw into the loop.
 */
import { debuglog } from 'node:util';
import type { EventEmitter } from 'node:events';
import { Command, DeviceFeature, DeviceFlags, DmaUnmapFlags, Errno, MigState, ProtocolVersion, RegionInfoFlags } from '../protocol/constants';
import { ProtocolError, VfioUserError } from '../protocol/errors';
import { binding } from '../native/binding';
import { Fd } from '../native/fd';
import { defaultCapabilities, negotiate, serverReplyCapabilities, type Negotiated } from '../protocol/capabilities';
import { decodeVersionRequest, encodeVersionReply, type VersionInit } from '../protocol/messages/version';
import { decodeDmaMapRequest, decodeDmaUnmapRequest, encodeDmaUnmapReply } from '../protocol/messages/dma';
import { decodeDeviceInfoRequest, encodeDeviceInfoReply } from '../protocol/messages/device';
import {
  decodeRegionInfoRequest,
  decodeRegionIoFdsRequest,
  encodeRegionInfoReply,
  sparseMmapCap,
  typeCap,
  type RegionCapability,
} from '../protocol/messages/region';
import { decodeIrqInfoRequest, decodeSetIrqsRequest, encodeIrqInfoReply } from '../protocol/messages/irq';
import {
  decodeDmaReadReply,
  decodeDmaWriteReply,
  decodeRegionWriteMultiRequest,
  encodeDmaReadRequest,
  encodeDmaWriteRequest,
  encodeRegionWriteMultiReply,
} from '../protocol/messages/access';
import { decodeDeviceResetRequest } from '../protocol/messages/reset';
import {
  decodeDeviceFeatureRequest,
  decodeDmaLoggingControl,
  decodeDmaLoggingReportRequest,
  decodeMigDeviceState,
  encodeDeviceFeatureReply,
  encodeDmaLoggingControl,
  encodeMigDeviceState,
  encodeMigrationFeatureData,
  featureIndex,
} from '../protocol/messages/feature';
import { decodeMigDataReadRequest, decodeMigDataWriteRequest, encodeMigDataReadReply } from '../protocol/messages/migration';
import { Connection, type Body, type IncomingMessage } from '../transport/connection';
import { DmaError, type DmaSpace, type DmaTransport } from './dma';
import { regionIoFdsReply } from './ioeventfd';
import type { AccessResult, DeviceRegion, ResetReason, VfioUserDevice } from './device';
import type { IrqTable } from './irq';
import type { Migration } from './migration';
import type { Quiescer } from './quiesce';
import type { CapabilitiesInput } from '../protocol/capabilities';

/** What a session needs of the server that owns it. */
export interface ServerCore extends EventEmitter {
  readonly device: VfioUserDevice;
  readonly dma: DmaSpace;
  readonly irqs: IrqTable;
  readonly migration: Migration | null;
  readonly writeMultiple: boolean;
  /** The capabilities this server announces in VERSION. */
  capabilities(): CapabilitiesInput;
  /** Quiesces the device around the commands that need it. */
  readonly quiescer: Quiescer;
  /** Reset (quiesced first); resolves 0 or the errno the device failed to quiesce with. */
  resetDevice(reason: ResetReason): Promise<number>;
}

const debug = debuglog('vfio-user:server');

/** What a handler produces: an errno (0 = empty success), a body, or a body with fds. */
export type HandlerResult = number | Body | { body: Body; fds: readonly number[] };
type Handler = (s: Session, msg: IncomingMessage) => HandlerResult | Promise<HandlerResult>;

const REGION_ACCESS = 16;

/**
 * An async region callback's result: its errno, or `body` on success. Kept out of the handlers:
 * a closure inside a hot function makes V8 allocate a context object on every call.
 */
function settleWith(result: Promise<AccessResult>, body: HandlerResult): Promise<HandlerResult> {
  return result.then((errno) => errno || body);
}

/** Copy a 16-byte region-access struct. (Buffer#copy with offsets allocates a view per call.) */
function copyAccess(src: Buffer, at: number, dst: Buffer): void {
  dst.writeUInt32LE(src.readUInt32LE(at), 0);
  dst.writeUInt32LE(src.readUInt32LE(at + 4), 4);
  dst.writeUInt32LE(src.readUInt32LE(at + 8), 8);
  dst.writeUInt32LE(src.readUInt32LE(at + 12), 12);
}
/** Largest fixed part of any request (a REGION_WRITE's 16 bytes); above data + this: refuse. */
const MAX_FIXED = 64;

export class Session {
  negotiated: Negotiated | null = null;
  /**
   * Twin-socket mode (reference §1.9): our end of the socket pair that carries only our own
   * commands (DMA_READ/DMA_WRITE) and the client's replies to them; null on a single socket.
   */
  twin: Connection | null = null;
  /** The client's end of the twin pair, between VERSION and its reply (then closed once sent). */
  private lent: Fd | null = null;
  /** Commands wait here while an earlier one is still running (in-order execution). */
  private readonly queue: IncomingMessage[] = [];
  private busy = false;
  private closed = false;
  /** Settles when the command running now (if any) has finished, reply or not. */
  private running: Promise<void> = Promise.resolve();
  /** Ends a connection that does not send VERSION in time (null: none running). */
  private versionTimer: NodeJS.Timeout | null = null;
  /** Reused reply parts for region reads: [echo, data view]. */
  private readonly echo = Buffer.alloc(REGION_ACCESS);
  private readonly readBody: Buffer[] = [this.echo, this.echo];
  /** Region-read data; allocated by the first read (a connection that never reads costs nothing). */
  private readBuf = Buffer.alloc(0);
  /** Offset and count of the region access {@link Session.regionFor} validated last. */
  private accessOffset = 0;
  private accessCount = 0;
  /** Cached views of readBuf for small counts (register accesses), so they allocate nothing. */
  private smallViews: Buffer[] = [];

  /** @param versionTimeoutMs close the connection if VERSION has not arrived by then (0: never). */
  constructor(
    readonly conn: Connection,
    readonly core: ServerCore,
    versionTimeoutMs = 0,
  ) {
    conn.onRequest = (msg) => this.onRequest(msg);
    conn.orderedRejects = true;
    // An asynchronous command (DMA over the socket, a file read) completes on the event loop.
    conn.awaitingLoop = () => this.busy;
    if (versionTimeoutMs > 0) {
      this.versionTimer = setTimeout(() => this.versionExpired(versionTimeoutMs), versionTimeoutMs);
      this.versionTimer.unref();
    }
  }

  get device(): VfioUserDevice {
    return this.core.device;
  }

  /** Where our own commands go: the twin socket if there is one, else the main connection. */
  get commandChannel(): Connection {
    return this.twin ?? this.conn;
  }

  /** DMA to message-only maps, through this client's connection (its twin socket, if any). */
  readonly transport: DmaTransport & { maxTransfer: number } = {
    maxTransfer: 1024 * 1024,
    read: async (iova, length) => {
      try {
        const reply = await this.commandChannel.request(Command.DMA_READ, encodeDmaReadRequest({ address: BigInt(iova), count: length }));
        Fd.closeAll(reply.fds); // a DMA_READ reply carries no fds (reference §1.6)
        const r = decodeDmaReadReply(reply.payload);
        if (r.address !== BigInt(iova) || r.data === null || r.data.length !== length) throw new DmaError(Errno.EIO, 'DMA_READ reply does not match the request');
        return Buffer.from(r.data);
      } catch (err) {
        throw asDmaError(err);
      }
    },
    write: async (iova, data) => {
      try {
        const reply = await this.commandChannel.request(Command.DMA_WRITE, encodeDmaWriteRequest({ address: BigInt(iova), data }));
        Fd.closeAll(reply.fds);
        decodeDmaWriteReply(reply.payload);
      } catch (err) {
        throw asDmaError(err);
      }
    },
  };

  /**
   * Settles once the command in progress has finished (at once if none is): after close(), the
   * device is no longer being driven by this client. A REGION_WRITE_MULTI half done when the
   * client hung up completes first, so the device's reset comes after it, never in its middle.
   */
  idle(): Promise<void> {
    return this.running;
  }

  close(): void {
    this.closed = true;
    this.stopVersionTimer();
    for (const m of this.queue.splice(0)) m.closeFds();
    this.lent?.close();
    this.lent = null;
    this.twin?.close();
  }

  private stopVersionTimer(): void {
    if (this.versionTimer !== null) clearTimeout(this.versionTimer);
    this.versionTimer = null;
  }

  private versionExpired(ms: number): void {
    this.versionTimer = null;
    if (this.negotiated !== null || this.conn.state !== 'open') return;
    debug('%s: no VERSION within %d ms: closing', this.conn.name, ms);
    this.conn.close(new VfioUserError(Errno.ETIMEDOUT, Command.VERSION, 0, `no VERSION within ${ms} ms`));
  }

  private onRequest(msg: IncomingMessage): void {
    if (this.busy || this.queue.length > 0) {
      this.queue.push(msg.detach());
      return;
    }
    this.run(msg);
  }

  private run(msg: IncomingMessage): void {
    let result: HandlerResult | Promise<HandlerResult>;
    try {
      result = this.dispatch(msg);
    } catch (err) {
      result = this.errnoOf(err, msg);
    }
    if (!(result instanceof Promise)) {
      this.finish(msg, result);
      return;
    }
    // Later commands wait until this one completes; the reply needs the message's identity only.
    const kept = msg.detach();
    kept.closeFds();
    this.busy = true;
    this.running = result
      .catch((err: unknown) => this.errnoOf(err, kept))
      .then((r) => {
        if (!this.closed) this.finish(kept, r);
        this.busy = false;
        this.drain();
      })
      .catch((err: unknown) => this.conn.close(err as Error));
  }

  private drain(): void {
    while (!this.busy && !this.closed && this.queue.length > 0) {
      const next = this.queue.shift()!;
      this.run(next);
      next.closeFds();
    }
  }

  /** The single place replies are built. */
  private finish(msg: IncomingMessage, result: HandlerResult): void {
    if (this.lent !== null) {
      this.finishTwinVersion(msg, result);
      return;
    }
    if (msg.replied || this.conn.state !== 'open') return;
    if (typeof result === 'number') {
      if (result === 0) this.conn.reply(msg);
      else this.conn.replyError(msg, result);
    } else if (result === null || result === undefined || result instanceof Uint8Array || Array.isArray(result)) {
      this.conn.reply(msg, result as Body);
    } else {
      const r = result as { body: Body; fds: readonly number[] };
      this.conn.reply(msg, r.body, r.fds);
    }
    if (this.negotiated === null && msg.command === Command.VERSION && result !== 0 && typeof result === 'number') {
      this.conn.close(new ProtocolError('VERSION negotiation failed'));
    }
  }

  /** A device model's mistake: reported as 'error' (when anyone listens), the server goes on. */
  deviceError(err: unknown): void {
    debug('device error: %s', (err as Error)?.message ?? String(err));
    if (this.core.listenerCount('error') > 0) this.core.emit('error', err);
  }

  private errnoOf(err: unknown, msg: IncomingMessage): number {
    if (err instanceof ProtocolError) {
      debug('command %d: %s', msg.command, err.message);
      if (err.fatal) this.conn.close(err);
      return err.errno;
    }
    if (err instanceof DmaError) return err.errno;
    // A bug in a device model: the client gets EINVAL and the server goes on.
    debug('command %d failed: %s', msg.command, (err as Error)?.stack ?? String(err));
    if (this.core.listenerCount('error') > 0) this.core.emit('error', err);
    return Errno.EINVAL;
  }

  private dispatch(msg: IncomingMessage): HandlerResult | Promise<HandlerResult> {
    // Refused by the connection (too large, too many fds), answered here in its turn.
    if (msg.rejected !== 0 && this.negotiated !== null) return msg.rejected;
    if (this.negotiated === null) {
      if (msg.command !== Command.VERSION) {
        debug('command %d before VERSION: closing', msg.command);
        this.conn.replyError(msg, Errno.EINVAL);
        this.conn.close(new ProtocolError(`command ${msg.command} before VERSION`));
        return Errno.EINVAL;
      }
      this.stopVersionTimer();
      return this.version(msg);
    }
    const handler = HANDLERS[msg.command];
    if (handler === undefined) return Errno.EINVAL;
    if (msg.payloadLength > this.negotiatedXfer + MAX_FIXED && msg.command !== Command.REGION_WRITE_MULTI && msg.command !== Command.MIG_DATA_WRITE) {
      return Errno.EINVAL;
    }
    return handler(this, msg);
  }

  get negotiatedXfer(): number {
    return this.negotiated?.maxDataXferSize ?? 1024 * 1024;
  }

  // ---- VERSION ----

  private version(msg: IncomingMessage): HandlerResult {
    if (msg.fdCount !== 0) throw new ProtocolError('VERSION must carry no fds');
    const peer = decodeVersionRequest(msg.payload);
    const caps = this.core.capabilities();
    const local = { major: ProtocolVersion.MAJOR, minor: ProtocolVersion.MINOR, capabilities: { ...defaultsFor(caps) } };
    let n = negotiate({ role: 'server', local, peer: { major: peer.major, minor: peer.minor, capabilities: peer.capabilities } });
    this.conn.maxSendFds = n.maxSendFds;
    this.transport.maxTransfer = n.maxDataXferSize;
    this.conn.maxMessageSize = n.maxDataXferSize + 4096;
    // The reply may not be longer than the request (QEMU sizes its buffer by its request).
    const budget = msg.payloadLength;
    if (n.twinSocket) {
      const reply = fitVersionReply(n.minor, serverReplyCapabilities(caps, n), budget, TWIN_MAY_DROP);
      const lent = reply === null ? null : this.openTwin(n);
      if (reply !== null && lent !== null) {
        this.negotiated = n;
        this.lent = lent;
        debug('negotiated 0.%d with a twin socket: %o', n.minor, n);
        return { body: reply, fds: [lent.value] }; // fd_index 0
      }
      debug('twin socket offered but not enabled: %s', reply === null ? 'the reply would not fit' : 'no socket pair');
      n = { ...n, twinSocket: false, twinSocketFdIndex: undefined };
    }
    this.negotiated = n;
    const own = serverReplyCapabilities(caps, n);
    const reply =
      fitVersionReply(n.minor, own, budget, TRIM_ORDER) ??
      encodeVersionReply({ major: 0, minor: n.minor, document: budget >= 7 ? {} : null });
    debug('negotiated 0.%d: %o', n.minor, n);
    return reply;
  }

  /**
   * Twin-socket mode (reference §1.9): a fresh connected socket pair; our end becomes the channel
   * for our own commands, the client's end is returned, to go with the VERSION reply. Null if the
   * pair cannot be made (the session then goes on with one socket).
   */
  private openTwin(n: Negotiated): Fd | null {
    // The client's end may be closed only once the reply carrying it is on its way (see
    // closeWhenSent), which the connection can tell only with highWaterMark 0.
    if (this.conn.highWaterMark !== 0) return null;
    let pair: [number, number];
    try {
      pair = binding.socketpair();
    } catch (err) {
      debug('socketpair failed: %s', (err as Error).message);
      return null;
    }
    const ours = new Fd(pair[0]);
    const theirs = new Fd(pair[1]);
    let twin: Connection;
    try {
      twin = new Connection(ours, {
        name: `${this.conn.name}-twin`,
        maxRecvFds: this.conn.maxRecvFds,
        maxSendFds: 0,
        maxMessageSize: n.maxDataXferSize + 4096,
        requestTimeoutMs: this.conn.requestTimeoutMs,
        messageTimeoutMs: this.conn.messageTimeoutMs,
        firstMsgId: 1,
      });
    } catch (err) {
      debug('twin socket: %s', (err as Error).message);
      ours.close();
      theirs.close();
      return null;
    }
    // The client sends only replies here: a command is a protocol error.
    twin.onRequest = (msg, conn) => {
      debug('command %d on the twin socket: EINVAL', msg.command);
      conn.replyError(msg, Errno.EINVAL);
    };
    // Either socket closing ends the session (the server's cleanup runs on the main one's close).
    twin.on('close', (err: Error | null) => this.conn.close(err));
    this.twin = twin;
    return theirs;
  }

  /** Send the VERSION reply that carries the client's end of the twin pair, then let go of it. */
  private finishTwinVersion(msg: IncomingMessage, result: HandlerResult): void {
    const lent = this.lent!;
    this.lent = null;
    try {
      const r = result as { body: Body; fds: readonly number[] };
      if (!msg.replied && this.conn.state === 'open') this.conn.reply(msg, r.body, r.fds);
    } finally {
      this.closeWhenSent(lent);
      if (this.conn.state !== 'open') this.twin?.close();
    }
  }

  /**
   * Close our copy of an fd that went with the reply just sent, once the kernel holds it.
   * Connection.reply hands fds to sendmsg at once unless it has to queue the message (socket
   * full); a queued message keeps the fd *numbers* until the queue drains, or drops them when the
   * connection closes. Closing earlier would send a closed (or reused) fd number. With
   * highWaterMark 0 (the server's connections), writableNeedDrain says whether anything is queued.
   */
  private closeWhenSent(fd: Fd): void {
    const conn = this.conn;
    if (conn.state !== 'open' || !conn.writableNeedDrain) {
      fd.close();
      return;
    }
    const done = (): void => {
      conn.off('drain', done);
      conn.off('close', done);
      fd.close();
    };
    conn.on('drain', done);
    conn.on('close', done);
  }

  // ---- region access (the hot path: no decoding objects, fixed-offset reads) ----

  /** Validated region and offset of a REGION_READ/WRITE, or an errno. */
  regionFor(msg: IncomingMessage, write: boolean): DeviceRegion | number {
    if (msg.payloadLength < REGION_ACCESS) return Errno.EINVAL;
    const d = msg.data;
    const p = msg.payloadOffset;
    const hi = d.readUInt32LE(p + 4);
    const offset = d.readUInt32LE(p) + hi * 0x1_0000_0000;
    const index = d.readUInt32LE(p + 8);
    const count = d.readUInt32LE(p + 12);
    const region = this.device.regions[index];
    if (region == null || region.size === 0 || hi >= 0x20_0000) return Errno.EINVAL;
    if (count > this.negotiatedXfer || offset + count > region.size) return Errno.EINVAL;
    if ((region.flags & (write ? RegionInfoFlags.WRITE : RegionInfoFlags.READ)) === 0) return Errno.EINVAL;
    if (this.core.migration?.state === MigState.STOP_COPY) return Errno.EINVAL; // would change the saved state (§5.7)
    if (write ? msg.payloadLength !== REGION_ACCESS + count : msg.payloadLength !== REGION_ACCESS) return Errno.EINVAL;
    this.accessOffset = offset;
    this.accessCount = count;
    return region;
  }


  regionRead(msg: IncomingMessage): HandlerResult | Promise<HandlerResult> {
    const region = this.regionFor(msg, false);
    if (typeof region === 'number') return region;
    const count = this.accessCount;
    copyAccess(msg.data, msg.payloadOffset, this.echo);
    if (region.read === undefined) return Errno.EINVAL;
    if (count > this.readBuf.length) {
      this.readBuf = Buffer.alloc(Math.max(count, this.readBuf.length * 2, 4096));
      this.refreshViews();
    }
    const dst = count < this.smallViews.length ? this.smallViews[count]! : this.readBuf.subarray(0, count);
    const r = region.read(this.accessOffset, dst);
    const body = this.readBody;
    body[1] = dst;
    // While a command is pending no other one runs, so the reused buffers stay ours until then.
    if (r instanceof Promise) return settleWith(r, body);
    return r || body;
  }

  regionWrite(msg: IncomingMessage): HandlerResult | Promise<HandlerResult> {
    const region = this.regionFor(msg, true);
    if (typeof region === 'number') return region;
    if (region.write === undefined) return Errno.EINVAL;
    const start = msg.payloadOffset + REGION_ACCESS;
    const r = region.write(this.accessOffset, msg.data.subarray(start, start + this.accessCount));
    copyAccess(msg.data, msg.payloadOffset, this.echo);
    if (r instanceof Promise) return settleWith(r, this.echo);
    return r || this.echo;
  }

  private refreshViews(): void {
    this.smallViews = [];
    for (let n = 0; n <= 8; n++) this.smallViews.push(this.readBuf.subarray(0, n));
  }

  // ---- the rest, decoded with the protocol codecs ----

  regionInfo(msg: IncomingMessage): HandlerResult {
    const req = decodeRegionInfoRequest(msg.payload);
    if (req.argsz < 32 || req.index >= this.device.regions.length) return Errno.EINVAL;
    const region = this.device.regions[req.index];
    const size = region?.size ?? 0;
    const caps: RegionCapability[] = [];
    if (region?.type) caps.push(typeCap(region.type.type, region.type.subtype));
    let flags = size === 0 ? 0 : region!.flags & (RegionInfoFlags.READ | RegionInfoFlags.WRITE);
    // A client that accepts no fds cannot map anything: describe the region as message-only.
    const mappable = region?.mmap !== undefined && size > 0 && this.conn.maxSendFds >= 1;
    if (mappable) {
      flags |= RegionInfoFlags.MMAP;
      caps.push(sparseMmapCap(region.mmap.areas.map((a) => ({ offset: BigInt(a.offset), size: BigInt(a.size) }))));
    }
    const info = { flags, index: req.index, size: BigInt(size), offset: BigInt(region?.mmap?.fileOffset ?? 0), capabilities: caps };
    const body = encodeRegionInfoReply(info, req.argsz);
    // The fd goes with the capability chain only, exactly one (QEMU 11.1 breaks on more).
    const complete = body.readUInt32LE(0) <= req.argsz;
    if (mappable && complete) return { body, fds: [region!.mmap!.fd.value] };
    return body;
  }
}

/**
 * Device DMA fails only with {@link DmaError}: the client's error reply (or a timeout, or the lost
 * connection) keeps its errno; a reply that does not decode is EIO.
 */
function asDmaError(err: unknown): DmaError {
  if (err instanceof DmaError) return err;
  if (err instanceof VfioUserError) return new DmaError(err.errno, err.message);
  return new DmaError(Errno.EIO, (err as Error)?.message ?? String(err));
}

type CapabilityKey = keyof CapabilitiesInput;
/** Capabilities a VERSION reply may leave out to fit, least important first (max_msg_fds stays). */
const TRIM_ORDER: readonly CapabilityKey[] = ['migration', 'maxDmaMaps', 'pgsizes', 'writeMultiple', 'maxDataXferSize'];
/**
 * What may go to make room for twin_socket: optional features the client then simply does not use.
 * Limits the client must respect (a smaller max_data_xfer_size, max_dma_maps or pgsizes than the
 * defaults) are worth more than a twin socket; values equal to the defaults always go freely.
 */
const TWIN_MAY_DROP: readonly CapabilityKey[] = ['migration', 'writeMultiple'];
const PROTOCOL_DEFAULTS = defaultCapabilities();

/**
 * The VERSION reply announcing `caps`, trimmed to at most `budget` payload bytes: first the keys
 * whose value is the protocol default (leaving them out says the same), then the keys of `mayDrop`
 * in order. Null if it still does not fit.
 */
function fitVersionReply(minor: number, caps: CapabilitiesInput, budget: number, mayDrop: readonly CapabilityKey[]): Buffer | null {
  const trimmed: VersionInit['capabilities'] = { ...caps };
  let reply = encodeVersionReply({ major: 0, minor, capabilities: trimmed });
  const lossless = TRIM_ORDER.filter((key) => trimmed[key] !== undefined && trimmed[key] === PROTOCOL_DEFAULTS[key]);
  for (const key of [...lossless, ...mayDrop]) {
    if (reply.length <= budget) return reply;
    if (trimmed[key] === undefined) continue;
    delete trimmed[key];
    reply = encodeVersionReply({ major: 0, minor, capabilities: trimmed });
  }
  return reply.length <= budget ? reply : null;
}

/** Capabilities to advertise, as the VERSION codec wants them. */
function defaultsFor(caps: ReturnType<ServerCore['capabilities']>) {
  return {
    maxMsgFds: caps.maxMsgFds ?? 1,
    maxDataXferSize: caps.maxDataXferSize ?? 1024 * 1024,
    maxDmaMaps: caps.maxDmaMaps ?? 65535,
    pgsizes: caps.pgsizes ?? 4096n,
    writeMultiple: caps.writeMultiple ?? false,
    // Accepted whenever offered (reference §1.9 recommendation); always at fd index 0.
    twinSocket: { supported: caps.twinSocket?.supported ?? true },
    migration: caps.migration,
  };
}

const HANDLERS: Partial<Record<number, Handler>> = {
  [Command.VERSION]: () => Errno.EINVAL, // only once per connection (reference §3.1)

  [Command.DMA_MAP]: (s, msg) => {
    const req = decodeDmaMapRequest(msg.payload);
    if (msg.fdCount > 1) return Errno.EINVAL;
    const fd = msg.fdCount === 1 ? msg.takeFd(0) : null;
    const map = () => s.core.dma.add({ iova: req.address, size: req.size, offset: req.offset, flags: req.flags }, fd);
    if (!s.core.quiescer.enabled) return map();
    // add() closes the fd; if the device fails to quiesce, add() never runs.
    return s.core.quiescer.run('dma-map', map).finally(() => fd?.close());
  },

  [Command.DMA_UNMAP]: async (s, msg) => {
    const req = decodeDmaUnmapRequest(msg.payload);
    if (msg.fdCount !== 0 || req.argsz < 24) return Errno.EINVAL;
    // Only 0 and ALL: the legacy dirty bitmap (migration v1) is not supported.
    if (req.flags !== 0 && req.flags !== DmaUnmapFlags.ALL) return Errno.EINVAL;
    const echo = encodeDmaUnmapReply({ argsz: req.argsz, flags: req.flags, address: req.address, size: req.size });
    if (req.flags === DmaUnmapFlags.ALL) {
      if (req.address !== 0n || req.size !== 0n) return Errno.EINVAL;
      return s.core.quiescer.run('dma-unmap', async () => {
        await s.core.dma.removeAll();
        return echo;
      });
    }
    return s.core.quiescer.run('dma-unmap', async () => (await s.core.dma.remove(req.address, req.size)) || echo);
  },

  [Command.DEVICE_GET_INFO]: (s, msg) => {
    const req = decodeDeviceInfoRequest(msg.payload);
    if (req.argsz < 16) return Errno.EINVAL;
    const d = s.device;
    return encodeDeviceInfoReply({ flags: d.flags, numRegions: d.regions.length, numIrqs: d.irqs.length });
  },

  [Command.DEVICE_GET_REGION_INFO]: (s, msg) => s.regionInfo(msg),

  [Command.DEVICE_GET_REGION_IO_FDS]: (s, msg) => {
    const req = decodeRegionIoFdsRequest(msg.payload);
    if (msg.fdCount !== 0 || req.argsz < 16 || req.index >= s.device.regions.length) return Errno.EINVAL;
    return regionIoFdsReply(req, s.device.regions[req.index], s.conn.maxSendFds, (why) => s.deviceError(new RangeError(why)));
  },

  [Command.DEVICE_GET_IRQ_INFO]: (s, msg) => {
    const req = decodeIrqInfoRequest(msg.payload);
    const info = s.core.irqs.info(req.index);
    if (req.argsz < 16 || info === null) return Errno.EINVAL;
    return encodeIrqInfoReply({ flags: info.flags, index: req.index, count: info.count });
  },

  [Command.DEVICE_SET_IRQS]: (s, msg) => {
    const req = decodeSetIrqsRequest(msg.payload);
    return s.core.irqs.set(req, msg.takeAllFds());
  },

  [Command.REGION_READ]: (s, msg) => s.regionRead(msg),
  [Command.REGION_WRITE]: (s, msg) => s.regionWrite(msg),

  [Command.REGION_WRITE_MULTI]: async (s, msg) => {
    if (!s.core.writeMultiple || s.core.migration?.state === MigState.STOP_COPY) return Errno.EINVAL;
    const req = decodeRegionWriteMultiRequest(msg.payload);
    // Decode everything first: the message buffer is not ours after the first await.
    const writes = req.wrs.map((w) => ({ offset: w.offset, region: w.region, data: Buffer.from(w.data) }));
    let done = 0;
    for (const w of writes) {
      const region = s.device.regions[w.region];
      if (region == null || region.write === undefined || (region.flags & RegionInfoFlags.WRITE) === 0) return Errno.EINVAL;
      if (w.offset + BigInt(w.data.length) > BigInt(region.size)) return Errno.EINVAL;
      const r = await region.write(Number(w.offset), w.data);
      if (r) return r;
      done++;
    }
    return encodeRegionWriteMultiReply({ wrCnt: done });
  },

  [Command.DEVICE_RESET]: async (s, msg) => {
    decodeDeviceResetRequest(msg.payload);
    if ((s.device.flags & DeviceFlags.RESET) === 0) return Errno.EINVAL;
    return s.core.resetDevice('client');
  },

  [Command.DEVICE_FEATURE]: (s, msg) => deviceFeature(s, msg),

  [Command.MIG_DATA_READ]: (s, msg) => {
    const mig = s.core.migration;
    const req = decodeMigDataReadRequest(msg.payload);
    if (mig === null || req.size > s.negotiatedXfer || req.argsz < 8 + req.size) return Errno.EINVAL;
    const data = mig.read(req.size);
    return typeof data === 'number' ? data : encodeMigDataReadReply({ data });
  },

  [Command.MIG_DATA_WRITE]: (s, msg) => {
    const mig = s.core.migration;
    const req = decodeMigDataWriteRequest(msg.payload);
    if (mig === null || req.data.length > s.negotiatedXfer) return Errno.EINVAL;
    return mig.write(req.data);
  },
};

async function deviceFeature(s: Session, msg: IncomingMessage): Promise<HandlerResult> {
  const req = decodeDeviceFeatureRequest(msg.payload);
  const mig = s.core.migration;
  if (mig === null) return Errno.EINVAL;
  const index = featureIndex(req.flags);
  const op = req.flags & (DeviceFeature.GET | DeviceFeature.SET | DeviceFeature.PROBE);
  const supported: Record<number, number> = {
    [DeviceFeature.MIGRATION]: DeviceFeature.GET,
    [DeviceFeature.MIG_DEVICE_STATE]: DeviceFeature.GET | DeviceFeature.SET,
    [DeviceFeature.DMA_LOGGING_START]: DeviceFeature.SET,
    [DeviceFeature.DMA_LOGGING_STOP]: DeviceFeature.SET,
    [DeviceFeature.DMA_LOGGING_REPORT]: DeviceFeature.GET,
  };
  const ops = supported[index];
  if (ops === undefined || (op & ~DeviceFeature.PROBE & ~ops) !== 0) return Errno.EINVAL;
  const echo = () => encodeDeviceFeatureReply({ argsz: req.argsz, flags: req.flags, data: req.data });
  if (op & DeviceFeature.PROBE) return echo();
  const get = (data: Uint8Array): HandlerResult => (req.argsz < 8 + data.length ? Errno.EINVAL : encodeDeviceFeatureReply({ flags: req.flags, data }));

  switch (index) {
    case DeviceFeature.MIGRATION:
      return get(encodeMigrationFeatureData(mig.flags));
    case DeviceFeature.MIG_DEVICE_STATE: {
      if (op === DeviceFeature.GET) return get(encodeMigDeviceState({ deviceState: mig.state, dataFd: 0xffffffff }));
      const { deviceState } = decodeMigDeviceState(req.data);
      const errno = deviceState === mig.state ? 0 : await s.core.quiescer.run('migration', () => mig.setState(deviceState));
      return errno || get(encodeMigDeviceState({ deviceState: mig.state, dataFd: 0xffffffff }));
    }
    case DeviceFeature.DMA_LOGGING_START: {
      const ctl = decodeDmaLoggingControl(req.data);
      if (ctl.pageSize === 0n || s.core.dma.logging) return Errno.EINVAL;
      const ranges = ctl.ranges.map((r) => ({ iova: Number(r.iova), length: Number(r.length) }));
      const pageSize = s.core.dma.startLogging(Number(ctl.pageSize), ranges);
      return encodeDeviceFeatureReply({ argsz: req.argsz, flags: req.flags, data: encodeDmaLoggingControl({ ...ctl, pageSize: BigInt(pageSize) }) });
    }
    case DeviceFeature.DMA_LOGGING_STOP:
      if (!s.core.dma.logging) return Errno.EINVAL;
      s.core.dma.stopLogging();
      return echo();
    case DeviceFeature.DMA_LOGGING_REPORT: {
      const r = decodeDmaLoggingReportRequest(req.data);
      // Check the reply fits before reading: a report clears the bits it returns.
      const bitmapBytes = (((r.length + r.pageSize - 1n) / r.pageSize + 63n) / 64n) * 8n;
      if (BigInt(req.argsz) < 8n + 24n + bitmapBytes) return Errno.EINVAL;
      const bitmap = s.core.dma.report(Number(r.iova), Number(r.length), Number(r.pageSize));
      if (typeof bitmap === 'number') return bitmap;
      return get(Buffer.concat([req.data.subarray(0, 24), bitmap]));
    }
  }
  return Errno.EINVAL;
}
