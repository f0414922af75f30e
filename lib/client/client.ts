/**
 * `VfioUserClient`: the VMM side of vfio-user, in the spirit of QEMU's `vfio-user-pci`, typed and
 * promise-based (reference §1, §3, §6.1, §6.9).
 *
 * {@link VfioUserClient.connect} performs QEMU's bring-up: `VERSION` (capabilities checked against
 * QEMU's defensive ceilings), `DEVICE_GET_INFO` (a PCI device is required), region info for every
 * index with the two-step `argsz` exchange, IRQ info for every index, and a look at the BAR
 * registers so that posted writes go to memory BARs only. After that the client offers region
 * reads and writes (split to the negotiated `max_data_xfer_size`), mmap of mappable areas, guest
 * memory for DMA (memfd-backed or message-only, with the server's `DMA_READ`/`DMA_WRITE` served
 * here), interrupts as eventfds turned into events, and reset.
 *
 * Errors: a call the server refuses rejects with {@link VfioUserError} carrying its errno; no reply
 * within the timeout is ETIMEDOUT; a connection that ended is ECONNRESET. A reply that breaks the
 * protocol (lying sizes, unexpected fds, wrong echoes) rejects that call with
 * {@link ProtocolError} and leaves the connection up; a stream that can no longer be trusted (a
 * reply to no request, a malformed header) closes the connection, failing every pending call.
 * Caller mistakes (a region or vector that does not exist, an access past the end) throw
 * RangeError/TypeError synchronously. Nothing the server sends can throw out of the event loop.
 *
 * @packageDocumentation
 */
import { EventEmitter } from 'node:events';
import { debuglog } from 'node:util';
import { binding } from '../native/binding';
import { Fd } from '../native/fd';
import { Command, DeviceFlags, Errno, IrqInfoFlags, Limits, PciRegion, ProtocolVersion, commandName } from '../protocol/constants';
import { ProtocolError, VfioUserError } from '../protocol/errors';
import { negotiate, withDefaults, type Capabilities, type CapabilitiesInput, type Negotiated } from '../protocol/capabilities';
import { decodeVersionReply, encodeVersionRequest, type VersionMessage } from '../protocol/messages/version';
import { decodeDeviceInfoReply, encodeDeviceInfoRequest } from '../protocol/messages/device';
import { decodeRegionInfoReply, decodeRegionIoFdsReply, encodeRegionInfoRequest, encodeRegionIoFdsRequest } from '../protocol/messages/region';
import { decodeIrqInfoReply, encodeIrqInfoRequest } from '../protocol/messages/irq';
import {
  AccessKind,
  WRITE_MULTI_MAX_DATA,
  createRegionAccess,
  encodeRegionWriteMultiRequest,
  readRegionAccess,
  writeRegionAccess,
} from '../protocol/messages/access';
import { decodeDeviceResetReply } from '../protocol/messages/reset';
import { Connection, type Body, type IncomingMessage } from '../transport/connection';
import { DmaMemory, DmaTable, type DmaFdOptions, type DmaMapOptions } from './dma';
import { IrqChannels, MAX_IRQ_VECTORS, irqIndexInfo, type IrqEvent, type IrqIndexInfo, type IrqSelection } from './irqs';
import { RegionIoFds, buildRegionIoFds } from './iofds';
import { MappedRegion, buildRegionRecord, mapRegionAreas, releaseRegionRecord, type RegionInfo, type RegionRecord } from './regions';
import {
  DirtyBitmap,
  dirtyReport,
  getMigrationState,
  probeMigration,
  readMigrationData,
  setMigrationState,
  startDirtyLogging,
  stopDirtyLogging,
  writeMigrationData,
  type DirtyRange,
  type MigrationCore,
  type MigrationSupport,
} from './migration';

const debug = debuglog('vfio-user:client');

/** QEMU's defences against a hostile server (reference §1.12, §6.9; hw/vfio-user). */
export const ClientLimits = {
  /** Most region indexes accepted in DEVICE_GET_INFO (QEMU: VFIO_USER_MAX_REGIONS). */
  MAX_REGIONS: 100,
  /** Most IRQ indexes accepted in DEVICE_GET_INFO (QEMU: VFIO_USER_MAX_IRQS). */
  MAX_IRQS: 50,
  /** Largest server `max_msg_fds` accepted. */
  MAX_SERVER_MSG_FDS: Limits.QEMU_MAX_MSG_FDS,
  /** Largest server `max_data_xfer_size` accepted (64 MiB). */
  MAX_SERVER_DATA_XFER_SIZE: Limits.QEMU_MAX_DATA_XFER_SIZE,
  /** Largest server `max_dma_maps` accepted. */
  MAX_SERVER_DMA_MAPS: 65535,
  /** Largest region-info `argsz` we ask for (libvfio-user refuses above 1 MiB; real chains are tiny). */
  MAX_REGION_INFO_ARGSZ: 64 * 1024,
  /** Most writes per REGION_WRITE_MULTI (QEMU: VFIO_USER_MULTI_MAX). */
  MAX_WRITE_MULTI: 200,
} as const;

/** Options of {@link VfioUserClient.connect}. */
export interface ClientOptions {
  /**
   * Version to propose. Default 0.2; `{ major: 0, minor: 0 }` proposes what QEMU does. Any reply
   * with the same major and a minor not above the proposed one is accepted.
   */
  version?: { major: number; minor: number };
  /** Most fds we accept per message, announced as `max_msg_fds` (default 16, QEMU's value). */
  maxMsgFds?: number;
  /** Largest DMA_READ/DMA_WRITE we accept, announced as `max_data_xfer_size` (default 1 MiB). */
  maxDataXferSize?: number;
  /** Reply timeout of every request in ms (default 5000, QEMU's `x-msg-timeout`). */
  timeoutMs?: number;
  /** Offer a twin socket for the server's commands (reference §1.9). Default true. */
  twinSocket?: boolean;
  /** Post writes to memory BARs (No_reply), as QEMU does unless `x-no-posted-writes`. Default true. */
  postedWrites?: boolean;
  /** Coalesce small posted writes into REGION_WRITE_MULTI while congested, if the server allows. Default true. */
  writeMultiple?: boolean;
  /** Bytes queued for the socket above which the connection counts as congested (default 64 KiB). */
  congestionThreshold?: number;
  /**
   * Largest data chunk of one REGION_WRITE (default 64 KiB, and never above the negotiated
   * `max_data_xfer_size`): libvfio-user refuses a message that does not arrive whole (§1.5).
   */
  writeChunkSize?: number;
  /** A label for debug output (`NODE_DEBUG=vfio-user:*`). */
  name?: string;
  /**
   * Survive the connection ending (a server restarted, or one keeping its device for the next
   * client): instead of releasing everything, the client emits `'disconnect'` and keeps its DMA
   * memory, eventfds and state until {@link VfioUserClient.reconnect} or
   * {@link VfioUserClient.close}. Default false: the end of the connection closes the client.
   */
  reconnect?: boolean;
}

/** What `DEVICE_GET_INFO` reported. */
export interface DeviceSummary {
  /** {@link DeviceFlags} (PCI, RESET). */
  readonly flags: number;
  /** Number of region indexes. */
  readonly numRegions: number;
  /** Number of IRQ indexes. */
  readonly numIrqs: number;
  /** The device supports DEVICE_RESET. */
  readonly resettable: boolean;
}

/** Options of a write. */
export interface WriteOptions {
  /**
   * Allow posting (No_reply) when the region qualifies: a memory BAR, posted writes enabled, and
   * no region of the device mappable (reference §1.8). Default true; false always waits for the
   * reply. A posted write resolves once queued; the server's errors for it are never seen.
   */
  posted?: boolean;
}

/** Options of single requests. */
export interface CallOptions {
  /** Reply timeout in ms for this request (default: the client's). */
  timeoutMs?: number;
}

/** Events of {@link VfioUserClient}. */
export interface VfioUserClientEvents {
  /** An interrupt arrived on an eventfd given with {@link VfioUserClient.enableIrqs}. */
  irq: [index: number, vector: number, count: number];
  /** The connection ended and every resource was released; `error` is null for {@link VfioUserClient.close}. */
  close: [error: Error | null];
  /** The connection ended, and the client (`reconnect` option) keeps everything for {@link VfioUserClient.reconnect}. */
  disconnect: [error: Error];
  /** {@link VfioUserClient.reconnect} re-established the session: maps, eventfds, regions. */
  reconnect: [];
}

interface CallSpec {
  fds?: readonly number[] | null;
  timeoutMs?: number | undefined;
  /** The reply may carry fds (the parser takes them); otherwise any fd fails the call. */
  allowFds?: boolean;
}

interface PendingMulti {
  offset: bigint;
  region: number;
  data: Uint8Array;
}

type State = 'connecting' | 'open' | 'disconnected' | 'closed';

const DEFAULT_XFER = 1024 * 1024;
const DEFAULT_CHUNK = 64 * 1024;
const DEFAULT_CONGESTION = 64 * 1024;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

function checkInt(value: unknown, name: string, min: number, max: number): void {
  if (value === undefined) return;
  if (typeof value !== 'number') throw new TypeError(`Expected options.${name} to be a number`);
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`Expected options.${name} to be an integer in [${String(min)}, ${String(max)}], got ${String(value)}`);
  }
}

function protocolError(message: string, field: string): ProtocolError {
  return new ProtocolError(message, { field, errno: Errno.EPROTO });
}

/**
 * A connection to one vfio-user device server (a PCI function).
 *
 * Create it with {@link VfioUserClient.connect}; release it with {@link VfioUserClient.close},
 * which closes the socket and every fd, eventfd watcher and mapping the client holds. When the
 * server goes away the client releases everything the same way and emits `'close'` with the
 * reason; its memory views (DMA and mapped regions) then read as length 0.
 */
export class VfioUserClient extends EventEmitter<VfioUserClientEvents> {
  #conn: Connection;
  readonly #path: string;
  readonly #reconnectable: boolean;
  readonly #congestion: number;
  /** Set while {@link VfioUserClient.reconnect} drops the current connection on purpose. */
  #dropping = false;
  #reconnecting: Promise<void> | null = null;
  #twin: Connection | null = null;
  #state: State = 'connecting';
  readonly #name: string;
  readonly #timeoutMs: number;
  readonly #ourMaxFds: number;
  readonly #ourMaxXfer: number;
  readonly #proposed: { major: number; minor: number };
  readonly #offerTwin: boolean;
  readonly #wantPosted: boolean;
  readonly #wantMulti: boolean;
  readonly #chunkOption: number;

  #negotiated: Negotiated | null = null;
  #serverVersion: VersionMessage | null = null;
  #device: DeviceSummary | null = null;
  #regions: RegionRecord[] = [];
  #irqs: IrqChannels | null = null;
  readonly #dma: DmaTable;
  /** Per region: the ioeventfds writes go through ({@link VfioUserClient.useIoEventfds}). */
  #ioFds: (RegionIoFds | undefined)[] = [];
  /** Per BAR 0-5: the BAR register says memory space (posted writes allowed). */
  readonly #barIsMemory: boolean[] = [false, false, false, false, false, false];
  #postingAllowed = false;
  #multi: PendingMulti[] = [];
  /** The 16-byte region-access struct of the message being sent (sent or copied synchronously). */
  readonly #scratch = Buffer.alloc(16);
  readonly #access = createRegionAccess();
  #viewBuffer: ArrayBufferLike | null = null;
  #view: DataView | null = null;

  private constructor(socket: Fd, path: string, options: ClientOptions) {
    super();
    this.#path = path;
    this.#reconnectable = options.reconnect === true;
    this.#congestion = options.congestionThreshold ?? DEFAULT_CONGESTION;
    this.#name = options.name ?? 'vfio-user-client';
    this.#timeoutMs = options.timeoutMs ?? 5000;
    this.#ourMaxFds = options.maxMsgFds ?? Limits.QEMU_MAX_MSG_FDS;
    this.#ourMaxXfer = options.maxDataXferSize ?? DEFAULT_XFER;
    this.#proposed = options.version ?? { major: ProtocolVersion.MAJOR, minor: ProtocolVersion.MINOR };
    this.#offerTwin = options.twinSocket ?? true;
    this.#wantPosted = options.postedWrites ?? true;
    this.#wantMulti = options.writeMultiple ?? true;
    this.#chunkOption = options.writeChunkSize ?? DEFAULT_CHUNK;
    this.#conn = this.#connection(socket);
    const self = this;
    this.#dma = new DmaTable({
      call: (command, body, fds) => this.#request(command, body, { fds }),
      get pageSize() {
        return self.#pageSize();
      },
      get maxMaps() {
        return self.#negotiated?.maxDmaMaps ?? 0;
      },
      get maxSendFds() {
        return self.#conn.maxSendFds;
      },
      get maxTransfer() {
        return self.#ourMaxXfer;
      },
    });
  }

  /** The main connection on `socket`, with its end routed to {@link VfioUserClient.#lost}. */
  #connection(socket: Fd): Connection {
    const conn = new Connection(socket, {
      name: this.#name,
      maxRecvFds: this.#ourMaxFds,
      requestTimeoutMs: this.#timeoutMs,
      // Our own data limit bounds DMA_WRITE commands; region-info chains are bounded separately.
      maxMessageSize: Math.max(this.#ourMaxXfer, ClientLimits.MAX_REGION_INFO_ARGSZ) + 4096,
      highWaterMark: this.#congestion,
      firstMsgId: 0,
    });
    // A clean EOF while we are not closing is still the end of the device: report it as ECONNRESET.
    conn.on('close', (err: Error | null) => {
      if (conn === this.#conn) this.#lost(err ?? new VfioUserError(Errno.ECONNRESET, 0, 0, 'the server closed the connection'));
    });
    conn.on('drain', () => this.#flushMulti());
    return conn;
  }

  /**
   * Connects to the server listening on `path` and brings the device up (see the module comment).
   *
   * @throws errors of connect(2) (`code` ENOENT, ECONNREFUSED, ...).
   * @throws {VfioUserError} if the server refuses a bring-up command, does not answer within the
   * timeout (ETIMEDOUT) or hangs up (ECONNRESET).
   * @throws {ProtocolError} if its answers are malformed or out of QEMU's accepted ranges: server
   * `max_msg_fds` > 16, `max_data_xfer_size` > 64 MiB, `max_dma_maps` > 65535, `pgsizes` with any
   * of the low 12 bits set, a non-PCI device, more than 100 regions or 50 IRQ indexes.
   * @throws {TypeError}/{RangeError} for bad options.
   */
  static async connect(path: string, options: ClientOptions = {}): Promise<VfioUserClient> {
    if (typeof path !== 'string' || path.length === 0) throw new TypeError('Expected first argument to be a socket path');
    checkInt(options.maxMsgFds, 'maxMsgFds', 0, Limits.SCM_MAX_FD);
    checkInt(options.maxDataXferSize, 'maxDataXferSize', 1, Limits.QEMU_MAX_DATA_XFER_SIZE);
    checkInt(options.timeoutMs, 'timeoutMs', 1, 0x7fffffff);
    checkInt(options.congestionThreshold, 'congestionThreshold', 0, Number.MAX_SAFE_INTEGER);
    checkInt(options.writeChunkSize, 'writeChunkSize', 1, Limits.QEMU_MAX_DATA_XFER_SIZE);
    if (options.version !== undefined) {
      checkInt(options.version.major, 'version.major', 0, 0xffff);
      checkInt(options.version.minor, 'version.minor', 0, 0xffff);
    }
    const socket = new Fd(binding.unixConnect(path));
    let client: VfioUserClient;
    try {
      client = new VfioUserClient(socket, path, options);
    } catch (err) {
      socket.close();
      throw err;
    }
    try {
      await client.#bringUp();
    } catch (err) {
      client.#shutdown(err as Error);
      throw err;
    }
    return client;
  }

  // ---- state ----

  /** True once closed (by {@link VfioUserClient.close} or because the connection ended). */
  get closed(): boolean {
    return this.#state === 'closed';
  }

  /** True while the connection is gone and the client waits for {@link VfioUserClient.reconnect} (`reconnect` option). */
  get disconnected(): boolean {
    return this.#state === 'disconnected' || (this.#state === 'connecting' && this.#reconnecting !== null);
  }

  /** The socket path this client connects to. */
  get path(): string {
    return this.#path;
  }

  /** The negotiated version and limits. */
  get negotiated(): Readonly<Negotiated> {
    return this.#require(this.#negotiated);
  }

  /** The server's `VERSION` reply: version and capabilities (defaults applied) as it sent them. */
  get serverCapabilities(): Readonly<Capabilities> {
    return this.#require(this.#serverVersion).capabilities;
  }

  /** True if server-to-client commands use a twin socket (reference §1.9). */
  get twinSocket(): boolean {
    return this.#twin !== null;
  }

  /** What `DEVICE_GET_INFO` reported. */
  get device(): DeviceSummary {
    return this.#require(this.#device);
  }

  /** Region info of every index, as fetched during connect. */
  get regions(): readonly RegionInfo[] {
    return this.#regions.map((r) => r.info);
  }

  /** IRQ info of every index and the interrupt channels (events, counters). */
  get irqs(): IrqChannels {
    return this.#require(this.#irqs);
  }

  /** True if writes to memory BARs are posted (enabled, and no region is mappable). */
  get postedWrites(): boolean {
    return this.#postingAllowed;
  }

  /** Ranges of guest memory currently granted to the device, in address order. */
  get dmaMaps(): readonly DmaMemory[] {
    return this.#dma.list();
  }

  /** Region info of `index` (as fetched during connect). @throws {RangeError} for an unknown index. */
  region(index: number): RegionInfo {
    return this.#record(index).info;
  }

  // ---- information queries ----

  /**
   * Asks the server for region `index` again (two-step `argsz` exchange). The answer's fds are
   * closed; the regions fetched at connect are not replaced.
   *
   * @throws {ProtocolError} for a malformed or inconsistent reply.
   */
  async queryRegionInfo(index: number): Promise<RegionInfo> {
    this.#checkIndex(index, this.device.numRegions, 'region');
    const record = await this.#fetchRegion(index);
    releaseRegionRecord(record);
    return record.info;
  }

  /** Asks the server for IRQ index `index` again. */
  async queryIrqInfo(index: number): Promise<IrqIndexInfo> {
    this.#checkIndex(index, this.device.numIrqs, 'IRQ');
    return this.#fetchIrq(index);
  }

  // ---- region access ----

  /**
   * Reads `length` bytes of region `index` at `offset`, in pieces of at most the negotiated
   * `max_data_xfer_size` (pipelined). `length` 0 sends one empty read.
   *
   * @throws {RangeError} if the range is outside the region.
   * @throws {VfioUserError}/{ProtocolError} as described in the module comment (e.g. a reply whose
   * count differs from what was asked).
   */
  async read(index: number, offset: number | bigint, length: number, options: CallOptions = {}): Promise<Buffer> {
    const out = Buffer.alloc(checkLength(length));
    await this.readInto(index, offset, out, options);
    return out;
  }

  /** Like {@link VfioUserClient.read}, into `dst` (its whole length). */
  async readInto(index: number, offset: number | bigint, dst: Uint8Array, options: CallOptions = {}): Promise<void> {
    if (!(dst instanceof Uint8Array)) throw new TypeError('Expected third argument to be a Uint8Array');
    const start = this.#checkAccess(index, offset, dst.length);
    const chunk = this.negotiated.maxDataXferSize;
    const calls: Promise<void>[] = [];
    let pos = 0;
    do {
      const n = Math.min(chunk, dst.length - pos);
      calls.push(this.#readChunk(index, start + BigInt(pos), dst.subarray(pos, pos + n), options.timeoutMs));
      pos += n;
    } while (pos < dst.length);
    await settleAll(calls);
  }

  /**
   * Writes `data` to region `index` at `offset`, in pieces of at most `writeChunkSize` bytes.
   * Writes to a memory BAR are posted when allowed (see {@link WriteOptions.posted}); small posted
   * writes are batched into REGION_WRITE_MULTI while the socket is congested, if the server
   * announced `write_multiple`. A later non-posted command is a barrier for earlier posted writes.
   *
   * @throws {RangeError} if the range is outside the region.
   */
  async write(index: number, offset: number | bigint, data: Uint8Array, options: WriteOptions & CallOptions = {}): Promise<void> {
    if (!(data instanceof Uint8Array)) throw new TypeError('Expected third argument to be a Uint8Array');
    const start = this.#checkAccess(index, offset, data.length);
    const io = this.#ioFds[index];
    if (io !== undefined && io.tryWrite(start, data)) return;
    const posted = (options.posted ?? true) && this.#canPost(index) && data.length > 0;
    const chunk = Math.min(this.#chunkOption, this.negotiated.maxDataXferSize);
    if (posted) {
      for (let pos = 0; pos < data.length; pos += chunk) {
        this.#postWrite(index, start + BigInt(pos), data.subarray(pos, Math.min(data.length, pos + chunk)));
      }
      return;
    }
    const calls: Promise<void>[] = [];
    let pos = 0;
    do {
      const n = Math.min(chunk, data.length - pos);
      calls.push(this.#writeChunk(index, start + BigInt(pos), data.subarray(pos, pos + n), options.timeoutMs));
      pos += n;
    } while (pos < data.length);
    await settleAll(calls);
  }

  /** Reads a little-endian register of 1, 2 or 4 bytes. */
  async readUint(index: number, offset: number | bigint, size: 1 | 2 | 4): Promise<number> {
    const b = await this.read(index, offset, checkSize(size));
    return b.readUIntLE(0, size);
  }

  /** Writes a little-endian register of 1, 2 or 4 bytes (posted rules as {@link VfioUserClient.write}). */
  async writeUint(index: number, offset: number | bigint, size: 1 | 2 | 4, value: number, options: WriteOptions = {}): Promise<void> {
    const b = Buffer.alloc(checkSize(size));
    b.writeUIntLE(value, 0, size);
    await this.write(index, offset, b, options);
  }

  /** Reads a little-endian 64-bit register. */
  async readUint64(index: number, offset: number | bigint): Promise<bigint> {
    return (await this.read(index, offset, 8)).readBigUInt64LE(0);
  }

  /** Writes a little-endian 64-bit register. */
  async writeUint64(index: number, offset: number | bigint, value: bigint, options: WriteOptions = {}): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(value);
    await this.write(index, offset, b, options);
  }

  /**
   * Resolves once the server has executed every earlier command, posted writes included: sends
   * any batched writes, then makes one round trip (`DEVICE_GET_INFO`, which has no side effect).
   */
  async flush(options: CallOptions = {}): Promise<void> {
    await this.#call(Command.DEVICE_GET_INFO, encodeDeviceInfoRequest(), (msg) => decodeDeviceInfoReply(msg.payload), options);
  }

  /**
   * Maps the mappable areas of region `index` into this process (once; later calls return the
   * same object until it is unmapped). Posted writes are already off for a device with a
   * mappable region, so stores through the mapping cannot be overtaken by queued writes.
   *
   * @throws {RangeError} if the region has no MMAP flag.
   * @throws {ProtocolError} if it has one but cannot be mapped (no fd, ambiguous fds, areas past
   * the end of the server's file).
   */
  mmapRegion(index: number): MappedRegion {
    this.#assertOpen();
    const record = this.#record(index);
    const { info } = record;
    if (!info.mappable) {
      if (info.mmapUnavailable !== null) throw protocolError(`region ${String(index)} cannot be mapped: ${info.mmapUnavailable}`, 'fds');
      throw new RangeError(`region ${String(index)} is not mappable (no MMAP flag)`);
    }
    return mapRegionAreas(record);
  }

  // ---- ioeventfds ----

  /**
   * `DEVICE_GET_REGION_IO_FDS` for region `index`, with the two-step `argsz` exchange: what the
   * server offers for notifications without messages, checked (see `iofds.ts`). The caller owns
   * the result: close it when done. Most servers offer nothing (an empty set).
   *
   * @throws {VfioUserError} if the server refuses (libvfio-user: EINVAL for a region without).
   * @throws {ProtocolError} for a reply that does not hold together (its fds are closed).
   */
  async queryRegionIoFds(index: number, options: CallOptions = {}): Promise<RegionIoFds> {
    const region = this.#record(index).info;
    let argsz: number = 16;
    for (let attempt = 0; attempt < 2; attempt++) {
      const asked = argsz;
      const { reply, fds } = await this.#call(
        Command.DEVICE_GET_REGION_IO_FDS,
        encodeRegionIoFdsRequest({ index, argsz: asked }),
        (msg) => {
          if (msg.payloadLength > asked) {
            throw protocolError(`DEVICE_GET_REGION_IO_FDS reply: ${String(msg.payloadLength)} bytes exceed the argsz ${String(asked)} asked for`, 'argsz');
          }
          return { reply: decodeRegionIoFdsReply(msg.payload), fds: msg.takeAllFds() };
        },
        { allowFds: true, timeoutMs: options.timeoutMs },
      );
      if (!reply.truncated) return buildRegionIoFds(index, region.size, reply, fds);
      Fd.closeAll(fds);
      if (reply.argsz <= asked || reply.argsz > ClientLimits.MAX_REGION_INFO_ARGSZ) {
        throw protocolError(`DEVICE_GET_REGION_IO_FDS reply: argsz ${String(reply.argsz)} after asking for ${String(asked)}`, 'argsz');
      }
      argsz = reply.argsz;
    }
    throw protocolError(`DEVICE_GET_REGION_IO_FDS: region ${String(index)} still truncated at argsz ${String(argsz)}`, 'argsz');
  }

  /**
   * Queries region `index`'s ioeventfds ({@link VfioUserClient.queryRegionIoFds}) and routes
   * writes they stand for through them from now on: such a write (exact offset and width, the
   * datamatch value if required) signals the eventfd (storing the value into shadow memory first
   * for libvfio-user's shadow ioeventfds) instead of sending `REGION_WRITE`, as KVM turns a guest's
   * doorbell store into an eventfd signal. Like a posted write, it is not ordered against writes
   * still queued for the socket. Returns the set (owned by the client, closed by
   * {@link VfioUserClient.stopIoEventfds} or close); replaces an earlier one.
   */
  async useIoEventfds(index: number, options: CallOptions = {}): Promise<RegionIoFds> {
    const set = await this.queryRegionIoFds(index, options);
    if (this.#state === 'closed') {
      set.close();
      throw new VfioUserError(Errno.ECONNRESET, Command.DEVICE_GET_REGION_IO_FDS, 0, 'the client closed');
    }
    this.#ioFds[index]?.close();
    this.#ioFds[index] = set;
    return set;
  }

  /** Stops routing writes of region `index` through ioeventfds and closes them. */
  stopIoEventfds(index: number): void {
    this.#ioFds[index]?.close();
    this.#ioFds[index] = undefined;
  }

  // ---- DMA ----

  /**
   * Allocates `size` bytes of guest memory (rounded up to the server's page size) as a memfd,
   * maps it here and grants it to the device with `DMA_MAP` and the fd (the server maps the same
   * pages). The memfd is closed once the server answered; the local mapping keeps the memory.
   *
   * @throws {RangeError} for a bad size or iova, an overlap with another range, the server's map
   * limit, or a server that accepts no fds.
   * @throws {VfioUserError} if the server refuses the map.
   */
  allocateDma(size: number, options: DmaMapOptions = {}): Promise<DmaMemory> {
    this.#assertOpen();
    return this.#dma.allocate(size, options);
  }

  /**
   * Grants `buffer` (a multiple of the page size long) to the device without an fd: the server
   * reaches it with `DMA_READ`/`DMA_WRITE` messages, which this client serves with bounds and
   * permission checks. The buffer must stay valid while mapped.
   */
  mapWithoutFd(buffer: Buffer, options: DmaMapOptions = {}): Promise<DmaMemory> {
    this.#assertOpen();
    return this.#dma.mapBuffer(buffer, options);
  }

  /**
   * Grants `size` bytes of the caller's file `fd` from `options.fileOffset` (a memfd, a /dev/shm
   * or hugetlbfs file: any fd the server can mmap) with `DMA_MAP` and the fd, as QEMU grants guest
   * RAM and ROM. The range is mapped here too (read-only when `readOnly`), for `bytes` and to
   * serve the server's `DMA_READ`/`DMA_WRITE`. The fd stays the caller's: the client neither
   * keeps nor closes it. Whoever can truncate the file can make accesses to the mapping fault:
   * seal it (F_SEAL_SHRINK) when that matters.
   *
   * @throws {RangeError} for a size or offset that is not page-aligned, a range past the end of
   * the file, a bad iova or an overlap; the mmap error for an fd that cannot be mapped so.
   * @throws {VfioUserError} if the server refuses the map.
   */
  mapFd(fd: Fd | number, size: number, options: DmaFdOptions = {}): Promise<DmaMemory> {
    this.#assertOpen();
    return this.#dma.mapFd(fd, size, options);
  }

  /**
   * Withdraws every DMA range at once (`DMA_UNMAP` with the ALL flag, as a VMM does on reset).
   * Every range is released here whatever the server answers; its error is then reported.
   */
  unmapAllDma(): Promise<void> {
    this.#assertOpen();
    return this.#dma.unmapAll();
  }

  // ---- interrupts ----

  /**
   * Gives vectors `[start, start + count)` of IRQ index `index` one eventfd each
   * (`DEVICE_SET_IRQS` EVENTFD | TRIGGER, split by the server's `max_msg_fds`). Each interrupt then
   * emits `'irq'` and feeds {@link IrqChannels.events}.
   */
  enableIrqs(index: number, count: number, start = 0): Promise<void> {
    this.#assertOpen();
    return this.irqs.enable(index, count, start);
  }

  /** Disables IRQ index `index` (`count` 0, NONE | TRIGGER) and closes its eventfds. */
  disableIrqs(index: number): Promise<void> {
    this.#assertOpen();
    return this.irqs.disable(index);
  }

  /**
   * Masks vectors of `index` from `start`: `[start, start + count)` (NONE | MASK), or with an
   * array of booleans the vectors whose entry is true (BOOL | MASK).
   */
  maskIrqs(index: number, start = 0, select: IrqSelection = 1): Promise<void> {
    this.#assertOpen();
    return this.irqs.setMasked(index, true, start, select);
  }

  /** Unmasks vectors of `index` from `start`, as {@link VfioUserClient.maskIrqs} masks them. */
  unmaskIrqs(index: number, start = 0, select: IrqSelection = 1): Promise<void> {
    this.#assertOpen();
    return this.irqs.setMasked(index, false, start, select);
  }

  /**
   * Asks the server to fire vectors of `index` itself (a software trigger): `[start, start + count)`
   * (NONE | TRIGGER), or the vectors whose entry is true (BOOL | TRIGGER).
   */
  triggerIrqs(index: number, start = 0, select: IrqSelection = 1): Promise<void> {
    this.#assertOpen();
    return this.irqs.trigger(index, start, select);
  }

  /** Resolves with the next interrupt of `index` (and `vector`); see {@link IrqChannels.wait}. */
  waitForIrq(index: number, vector?: number, timeoutMs?: number): Promise<IrqEvent> {
    return this.irqs.wait(index, vector, timeoutMs);
  }

  // ---- migration (reference §5): the stream is opaque, moved as the device chunks it ----

  /**
   * `DEVICE_FEATURE` GET `MIGRATION`: what the device supports, or null if it cannot migrate (the
   * server refused the feature).
   */
  migrationSupport(options: CallOptions = {}): Promise<MigrationSupport | null> {
    return probeMigration(this.#migrationCore, options.timeoutMs);
  }

  /** `DEVICE_FEATURE` GET `MIG_DEVICE_STATE`: the device's migration state ({@link MigState}). */
  migrationState(options: CallOptions = {}): Promise<number> {
    return getMigrationState(this.#migrationCore, options.timeoutMs);
  }

  /**
   * `DEVICE_FEATURE` SET `MIG_DEVICE_STATE`: the server walks to `state` through intermediate
   * states (reference §5.3) before it replies. On failure (the server's errno) the device is in
   * whichever state the walk reached: ask {@link VfioUserClient.migrationState}.
   */
  setMigrationState(state: number, options: CallOptions = {}): Promise<number> {
    return setMigrationState(this.#migrationCore, state, options.timeoutMs);
  }

  /**
   * One `MIG_DATA_READ` of at most `max` bytes (default and ceiling: the smaller of both sides'
   * `max_data_xfer_size`). Empty: nothing more for now (PRE_COPY) or the end (STOP_COPY).
   */
  readMigrationData(max?: number, options: CallOptions = {}): Promise<Buffer> {
    return readMigrationData(this.#migrationCore, max, options.timeoutMs);
  }

  /** `MIG_DATA_WRITE` of `data` (split into chunks the peers accept), in order. */
  writeMigrationData(data: Uint8Array, options: CallOptions = {}): Promise<void> {
    return writeMigrationData(this.#migrationCore, data, options.timeoutMs);
  }

  /** The largest chunk one MIG_DATA_READ/WRITE carries with this server. */
  get migrationChunkSize(): number {
    return this.#migrationCore.maxChunk;
  }

  /**
   * `DMA_LOGGING_START`: the server logs the pages it writes in `ranges` of our memory (none: all
   * of it) at `pageSize` (a hint). Resolves with the page size the server chose.
   */
  startDirtyLogging(options: { pageSize?: number; ranges?: readonly DirtyRange[] } & CallOptions = {}): Promise<number> {
    return startDirtyLogging(this.#migrationCore, options.pageSize ?? this.#pageSize(), options.ranges ?? [], options.timeoutMs);
  }

  /** `DMA_LOGGING_STOP`. */
  stopDirtyLogging(options: CallOptions = {}): Promise<void> {
    return stopDirtyLogging(this.#migrationCore, options.timeoutMs);
  }

  /**
   * `DMA_LOGGING_REPORT` for `[iova, iova + length)` (one DMA map, as libvfio-user requires) at
   * `pageSize` (default: the server's smallest page): the pages written since the last report,
   * decoded. Reading clears them on the server.
   */
  dirtyPages(iova: number, length: number, pageSize = this.#pageSize(), options: CallOptions = {}): Promise<DirtyBitmap> {
    return dirtyReport(this.#migrationCore, iova, length, pageSize, options.timeoutMs);
  }

  get #migrationCore(): MigrationCore {
    const self = this;
    return {
      call: (command, body, timeoutMs) => this.#request(command, body, { timeoutMs }),
      get maxChunk() {
        return Math.min(self.negotiated.maxDataXferSize, self.#ourMaxXfer);
      },
    };
  }

  // ---- reset and close ----

  /**
   * `DEVICE_RESET` (reference §3.13, §6.8). DMA maps and eventfds stay in place.
   *
   * @throws {VfioUserError} ENOTSUP if the device did not report RESET, else the server's errno.
   */
  async reset(options: CallOptions = {}): Promise<void> {
    if ((this.device.flags & DeviceFlags.RESET) === 0) {
      throw new VfioUserError(Errno.ENOTSUP, Command.DEVICE_RESET, 0, 'DEVICE_RESET: the device does not report RESET support');
    }
    await this.#call(Command.DEVICE_RESET, null, (msg) => decodeDeviceResetReply(msg.payload), options);
  }

  /**
   * Closes the connection and releases everything: pending calls fail with ECONNRESET, eventfds
   * are unwatched and closed, region and DMA mappings are unmapped, region fds are closed, and
   * `'close'` is emitted with null. Batched small writes are handed to the socket first, but
   * whatever the socket has not accepted yet is dropped: call {@link VfioUserClient.flush} before
   * closing to be sure the server executed every posted write. Idempotent.
   */
  close(): Promise<void> {
    if (this.#state !== 'closed') {
      try {
        this.#flushMulti();
      } finally {
        this.#shutdown(null);
      }
    }
    return Promise.resolve();
  }

  // ---- bring-up ----

  async #bringUp(): Promise<void> {
    await this.#version();
    const info = await this.#call(Command.DEVICE_GET_INFO, encodeDeviceInfoRequest(), (msg) => decodeDeviceInfoReply(msg.payload));
    if ((info.flags & DeviceFlags.PCI) === 0) {
      throw protocolError(`DEVICE_GET_INFO reply: flags 0x${info.flags.toString(16)} do not describe a PCI device`, 'flags');
    }
    if (info.numRegions > ClientLimits.MAX_REGIONS) {
      throw protocolError(`DEVICE_GET_INFO reply: ${String(info.numRegions)} regions exceed the limit of ${String(ClientLimits.MAX_REGIONS)}`, 'num_regions');
    }
    if (info.numRegions <= PciRegion.CONFIG) {
      throw protocolError(`DEVICE_GET_INFO reply: ${String(info.numRegions)} regions leave no config space (index 7)`, 'num_regions');
    }
    if (info.numIrqs > ClientLimits.MAX_IRQS) {
      throw protocolError(`DEVICE_GET_INFO reply: ${String(info.numIrqs)} IRQ indexes exceed the limit of ${String(ClientLimits.MAX_IRQS)}`, 'num_irqs');
    }
    this.#device = Object.freeze({
      flags: info.flags,
      numRegions: info.numRegions,
      numIrqs: info.numIrqs,
      resettable: (info.flags & DeviceFlags.RESET) !== 0,
    });

    const regions = await Promise.allSettled(range(info.numRegions).map((i) => this.#fetchRegion(i)));
    const failed = regions.find((r) => r.status === 'rejected');
    if (failed !== undefined) {
      for (const r of regions) if (r.status === 'fulfilled') releaseRegionRecord(r.value);
      throw (failed as PromiseRejectedResult).reason;
    }
    this.#regions = regions.map((r) => (r as PromiseFulfilledResult<RegionRecord>).value);
    if (this.#state === 'closed') {
      // The connection ended while the answers were decoded: nothing will release them later.
      for (const r of this.#regions) releaseRegionRecord(r);
      this.#regions = [];
      throw new VfioUserError(Errno.ECONNRESET, Command.DEVICE_GET_REGION_INFO, 0, 'connection closed during bring-up');
    }

    const irqInfos = await settleAll(range(info.numIrqs).map((i) => this.#fetchIrq(i)));
    const self = this;
    this.#irqs = new IrqChannels(irqInfos, {
      call: (command, body, fds) => this.#request(command, body, { fds }),
      get maxSendFds() {
        return self.#conn.maxSendFds;
      },
      onIrq: (e) => this.emit('irq', e.index, e.vector, e.count),
    });

    await this.#learnBarKinds();
    const anyMmap = this.#regions.some((r) => r.info.mmapFlag);
    this.#postingAllowed = this.#wantPosted && !anyMmap;
    if (this.#state !== 'open') throw new VfioUserError(Errno.ECONNRESET, Command.VERSION, 0, 'connection closed during bring-up');
    debug('%s: up: %d regions, %d IRQ indexes, posted writes %s', this.#name, info.numRegions, info.numIrqs, this.#postingAllowed ? 'on' : 'off');
  }

  async #version(): Promise<void> {
    const announce: CapabilitiesInput = { maxMsgFds: this.#ourMaxFds, maxDataXferSize: this.#ourMaxXfer };
    // Say we can use REGION_WRITE_MULTI, as QEMU does. It also sizes our request: a server may
    // not reply with more than we sent, and its reply names write_multiple and the twin socket.
    if (this.#wantMulti) announce.writeMultiple = true;
    if (this.#offerTwin) announce.twinSocket = { supported: true };
    const { major, minor } = this.#proposed;
    const body = encodeVersionRequest({ major, minor, capabilities: announce });
    const { reply, fds } = await this.#call(
      Command.VERSION,
      body,
      (msg) => {
        const decoded = decodeVersionReply(msg.payload);
        return { reply: decoded, fds: msg.takeAllFds() };
      },
      { allowFds: true },
    );
    let kept: Fd | null = null;
    try {
      const caps = reply.capabilities;
      if (caps.maxMsgFds > ClientLimits.MAX_SERVER_MSG_FDS) {
        throw protocolError(`VERSION reply: max_msg_fds ${String(caps.maxMsgFds)} exceeds ${String(ClientLimits.MAX_SERVER_MSG_FDS)}`, 'capabilities.max_msg_fds');
      }
      if (caps.maxDataXferSize > ClientLimits.MAX_SERVER_DATA_XFER_SIZE) {
        throw protocolError(`VERSION reply: max_data_xfer_size ${String(caps.maxDataXferSize)} exceeds 64 MiB`, 'capabilities.max_data_xfer_size');
      }
      if (caps.maxDmaMaps > ClientLimits.MAX_SERVER_DMA_MAPS) {
        throw protocolError(`VERSION reply: max_dma_maps ${String(caps.maxDmaMaps)} exceeds ${String(ClientLimits.MAX_SERVER_DMA_MAPS)}`, 'capabilities.max_dma_maps');
      }
      const local = {
        major,
        minor,
        capabilities: withDefaults({ ...announce, twinSocket: { supported: this.#offerTwin } }),
      };
      const n = negotiate({ role: 'client', local, peer: { major: reply.major, minor: reply.minor, capabilities: caps }, peerFds: fds.length });
      if (n.twinSocket) {
        kept = fds[n.twinSocketFdIndex!]!;
      } else if (fds.length > 0) {
        throw protocolError(`VERSION reply: carries ${String(fds.length)} fds without enabling twin_socket`, 'fds');
      }
      Fd.closeAll(fds.filter((fd) => fd !== kept));
      this.#negotiated = Object.freeze(n);
      this.#serverVersion = reply;
    } catch (err) {
      Fd.closeAll(fds);
      throw err;
    }
    if (this.#state === 'closed') {
      kept?.close();
      throw new VfioUserError(Errno.ECONNRESET, Command.VERSION, 0, 'connection closed during bring-up');
    }
    const n = this.#negotiated!;
    this.#conn.maxSendFds = n.maxSendFds;
    this.#conn.onRequest = (msg, conn) => this.#dma.serve(msg, conn);
    if (kept !== null) {
      const twin = new Connection(kept, {
        name: `${this.#name}-twin`,
        maxRecvFds: this.#ourMaxFds,
        requestTimeoutMs: this.#timeoutMs,
        maxMessageSize: this.#ourMaxXfer + 4096,
      });
      twin.onRequest = (msg, conn) => this.#dma.serve(msg, conn);
      twin.on('close', (err: Error | null) => {
        if (twin === this.#twin) this.#lost(err ?? new VfioUserError(Errno.ECONNRESET, 0, 0, 'the twin socket closed'));
      });
      this.#twin = twin;
    }
    this.#state = 'open';
    debug('%s: negotiated %d.%d: %o', this.#name, n.major, n.minor, n);
  }

  async #fetchRegion(index: number): Promise<RegionRecord> {
    let argsz: number = 32;
    for (let attempt = 0; attempt < 2; attempt++) {
      const asked = argsz;
      const { reply, fds } = await this.#call(
        Command.DEVICE_GET_REGION_INFO,
        encodeRegionInfoRequest({ index, argsz: asked }),
        (msg) => {
          if (msg.payloadLength > asked) {
            throw protocolError(`DEVICE_GET_REGION_INFO reply: ${String(msg.payloadLength)} bytes exceed the argsz ${String(asked)} asked for`, 'argsz');
          }
          const decoded = decodeRegionInfoReply(msg.payload);
          return { reply: decoded, fds: msg.takeAllFds() };
        },
        { allowFds: true },
      );
      if (reply.index !== index) {
        Fd.closeAll(fds);
        throw protocolError(`DEVICE_GET_REGION_INFO reply: index ${String(reply.index)} answers a query for ${String(index)}`, 'index');
      }
      if (!reply.truncated) return buildRegionRecord(reply, fds);
      // Step one of QEMU's exchange: only the fixed part; ask again with the full argsz.
      Fd.closeAll(fds);
      if (reply.argsz <= asked) {
        throw protocolError(`DEVICE_GET_REGION_INFO reply: argsz ${String(reply.argsz)} fitted the request but only 32 bytes came`, 'argsz');
      }
      if (reply.argsz > ClientLimits.MAX_REGION_INFO_ARGSZ) {
        throw protocolError(`DEVICE_GET_REGION_INFO reply: argsz ${String(reply.argsz)} exceeds ${String(ClientLimits.MAX_REGION_INFO_ARGSZ)}`, 'argsz');
      }
      argsz = reply.argsz;
    }
    throw protocolError(`DEVICE_GET_REGION_INFO: region ${String(index)} still truncated at argsz ${String(argsz)}`, 'argsz');
  }

  async #fetchIrq(index: number): Promise<IrqIndexInfo> {
    const reply = await this.#call(Command.DEVICE_GET_IRQ_INFO, encodeIrqInfoRequest({ index }), (msg) => decodeIrqInfoReply(msg.payload));
    if (reply.index !== index) {
      throw protocolError(`DEVICE_GET_IRQ_INFO reply: index ${String(reply.index)} answers a query for ${String(index)}`, 'index');
    }
    if (reply.count > MAX_IRQ_VECTORS) {
      throw protocolError(`DEVICE_GET_IRQ_INFO reply: ${String(reply.count)} vectors exceed ${String(MAX_IRQ_VECTORS)}`, 'count');
    }
    if (reply.count > 0 && (reply.flags & IrqInfoFlags.EVENTFD) === 0) {
      debug('%s: IRQ index %d does not report EVENTFD', this.#name, index);
    }
    return irqIndexInfo(reply);
  }

  /** Reads the six BAR registers once, so posted writes go to memory BARs only (as QEMU). */
  async #learnBarKinds(): Promise<void> {
    const cfg = this.#regions[PciRegion.CONFIG]!.info;
    const first = 0x10;
    if (cfg.size < first + 24) return;
    let bars: Buffer;
    try {
      bars = await this.read(PciRegion.CONFIG, first, 24);
    } catch (err) {
      if (this.#state === 'closed') throw err;
      debug('%s: cannot read the BAR registers (%s): no posted writes', this.#name, (err as Error).message);
      return;
    }
    for (let i = 0; i < 6; i++) {
      const region = this.#regions[i];
      this.#barIsMemory[i] = region !== undefined && region.info.size > 0 && (bars.readUInt32LE(4 * i) & 0x1) === 0;
    }
  }

  // ---- requests ----

  /**
   * Sends `command` and resolves with `parse(reply)`; `parse` runs while the reply is valid and may
   * throw (that rejects the call). Any batched writes go out first, so they keep their order.
   */
  #call<T>(command: number, body: Body, parse: (reply: IncomingMessage) => T, spec: CallSpec = {}): Promise<T> {
    if (this.#state === 'closed' || this.#state === 'disconnected') {
      return Promise.reject(new VfioUserError(Errno.ECONNRESET, command, 0, `${commandName(command)}: the client is ${this.#state}`));
    }
    this.#flushMulti();
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
        spec.timeoutMs ?? this.#timeoutMs,
      );
    });
  }

  /** A request whose reply must carry no fds; resolves with a copy of the payload. */
  #request(command: number, body: Body, spec: CallSpec = {}): Promise<Buffer> {
    return this.#call(command, body, (msg) => Buffer.from(msg.payload), spec);
  }

  #readChunk(index: number, offset: bigint, dst: Uint8Array, timeoutMs: number | undefined): Promise<void> {
    writeRegionAccess(this.#scratch, 0, { offset, region: index, count: dst.length });
    return this.#call(
      Command.REGION_READ,
      this.#scratch,
      (msg) => {
        const r = readRegionAccess(this.#viewOf(msg.data), msg.payloadOffset, msg.payloadLength, AccessKind.READ_REPLY, this.#access);
        if (r.count !== dst.length) {
          throw protocolError(`REGION_READ reply: count ${String(r.count)} for a read of ${String(dst.length)} bytes`, 'count');
        }
        if (r.count > 0 && (r.offset !== offset || r.region !== index)) {
          throw protocolError(`REGION_READ reply: echoes region ${String(r.region)} offset 0x${r.offset.toString(16)}, not ${String(index)} 0x${offset.toString(16)}`, 'offset');
        }
        if (r.count > 0) dst.set(r.data!);
      },
      { timeoutMs },
    );
  }

  #writeChunk(index: number, offset: bigint, data: Uint8Array, timeoutMs: number | undefined): Promise<void> {
    writeRegionAccess(this.#scratch, 0, { offset, region: index, count: data.length });
    return this.#call(
      Command.REGION_WRITE,
      data.length === 0 ? this.#scratch : [this.#scratch, data],
      (msg) => {
        // A header-only reply (libvfio-user's answer to count 0) is accepted as success.
        if (msg.payloadLength === 0) return;
        const r = readRegionAccess(this.#viewOf(msg.data), msg.payloadOffset, msg.payloadLength, AccessKind.WRITE_REPLY, this.#access);
        if (r.count !== data.length || r.offset !== offset || r.region !== index) {
          throw protocolError(
            `REGION_WRITE reply: echoes region ${String(r.region)} offset 0x${r.offset.toString(16)} count ${String(r.count)}, not ${String(index)} 0x${offset.toString(16)} ${String(data.length)}`,
            'count',
          );
        }
      },
      { timeoutMs },
    );
  }

  /** A posted write, or a slot in the REGION_WRITE_MULTI batch while the socket is congested. */
  #postWrite(index: number, offset: bigint, data: Uint8Array): void {
    if (this.#state !== 'open') throw new VfioUserError(Errno.ECONNRESET, Command.REGION_WRITE, 0, 'REGION_WRITE: the client is closed');
    const multi = this.#wantMulti && this.negotiated.writeMultiple && data.length <= WRITE_MULTI_MAX_DATA;
    if (multi && (this.#multi.length > 0 || this.#conn.writableNeedDrain)) {
      this.#multi.push({ offset, region: index, data: Buffer.from(data) });
      if (this.#multi.length >= ClientLimits.MAX_WRITE_MULTI) this.#flushMulti();
      return;
    }
    this.#flushMulti();
    writeRegionAccess(this.#scratch, 0, { offset, region: index, count: data.length });
    this.#conn.post(Command.REGION_WRITE, [this.#scratch, data]);
  }

  /** Sends the batched writes as one posted REGION_WRITE_MULTI. */
  #flushMulti(): void {
    if (this.#multi.length === 0) return;
    const wrs = this.#multi;
    this.#multi = [];
    if (this.#conn.state !== 'open') return;
    this.#conn.post(Command.REGION_WRITE_MULTI, encodeRegionWriteMultiRequest(wrs));
  }

  #canPost(index: number): boolean {
    return this.#postingAllowed && index >= PciRegion.BAR0 && index <= PciRegion.BAR5 && this.#barIsMemory[index] === true;
  }

  #viewOf(data: Buffer): DataView {
    if (this.#viewBuffer !== data.buffer || this.#view === null || this.#view.byteOffset !== data.byteOffset || this.#view.byteLength !== data.byteLength) {
      this.#view = new DataView(data.buffer, data.byteOffset, data.byteLength);
      this.#viewBuffer = data.buffer;
    }
    return this.#view;
  }

  // ---- checks ----

  #pageSize(): number {
    const pgsizes = this.#negotiated?.pgsizes ?? 4096n;
    const lowest = pgsizes & -pgsizes;
    return lowest > 0n && lowest <= MAX_SAFE ? Number(lowest) : 4096;
  }

  #require<T>(value: T | null): T {
    if (value === null) throw new Error('the client is not connected yet');
    return value;
  }

  #assertOpen(): void {
    if (this.#state === 'closed') throw new VfioUserError(Errno.ECONNRESET, 0, 0, 'the client is closed');
  }

  #checkIndex(index: number, count: number, what: string): void {
    if (!Number.isInteger(index) || index < 0 || index >= count) {
      throw new RangeError(`Expected a ${what} index below ${String(count)}, got ${String(index)}`);
    }
  }

  #record(index: number): RegionRecord {
    this.#checkIndex(index, this.#regions.length, 'region');
    return this.#regions[index]!;
  }

  /** Validates a region access; returns the offset as a bigint. */
  #checkAccess(index: number, offset: number | bigint, length: number): bigint {
    const { info } = this.#record(index);
    if (info.size === 0) throw new RangeError(`region ${String(index)} is not implemented (size 0)`);
    let start: bigint;
    if (typeof offset === 'bigint') start = offset;
    else if (typeof offset === 'number' && Number.isSafeInteger(offset)) start = BigInt(offset);
    else throw new TypeError('Expected the offset to be an integer (number or bigint)');
    if (start < 0n || start + BigInt(length) > BigInt(info.size)) {
      throw new RangeError(`access 0x${start.toString(16)}+${String(length)} is outside region ${String(index)} (${String(info.size)} bytes)`);
    }
    return start;
  }

  // ---- teardown and reconnection ----

  /** The connection ended: close the client, or (reconnectable) wait for reconnect() keeping everything. */
  #lost(error: Error): void {
    if (this.#state === 'closed') return;
    if (!this.#reconnectable && !this.#dropping) {
      this.#shutdown(error);
      return;
    }
    if (this.#state === 'disconnected') return;
    this.#state = 'disconnected';
    this.#multi = [];
    debug('%s: disconnected: %s', this.#name, error.message);
    this.#conn.close(error);
    const twin = this.#twin;
    this.#twin = null;
    twin?.close(error);
    this.emit('disconnect', error);
  }

  /**
   * Drops the connection as a crashed VMM's would end, keeping DMA memory, eventfds and state for
   * {@link VfioUserClient.reconnect} (`'disconnect'` is emitted). Pending calls fail with ECONNRESET.
   */
  disconnect(): void {
    if (this.#state !== 'open') return;
    this.#flushMulti();
    this.#dropping = true;
    try {
      this.#lost(new VfioUserError(Errno.ECONNRESET, 0, 0, 'disconnected by the client'));
    } finally {
      this.#dropping = false;
    }
  }

  /**
   * Connects again (to `path`, default the same socket) and re-establishes the session as a VMM
   * re-attaching to a kept device does: VERSION, DEVICE_GET_INFO (it must be the same device
   * layout), region and IRQ info, DMA_MAP of every range at the same address with the same fds,
   * and SET_IRQS with the same eventfds (and MASK/UNMASK eventfds). Mapped regions of the old
   * connection are unmapped (map them again); ioeventfds are dropped. A connection still open is
   * dropped first, as a crashed VMM's would be. Emits `'reconnect'` when done.
   *
   * @throws the connect(2) error, or the bring-up failure; the client is then disconnected (with
   * the `reconnect` option) and may try again.
   */
  reconnect(options: { path?: string } = {}): Promise<void> {
    if (this.#state === 'closed') return Promise.reject(new VfioUserError(Errno.ECONNRESET, 0, 0, 'the client is closed'));
    this.#reconnecting ??= this.#reattach(options.path ?? this.#path).finally(() => {
      this.#reconnecting = null;
    });
    return this.#reconnecting;
  }

  async #reattach(path: string): Promise<void> {
    if (this.#state === 'open' || this.#state === 'connecting') {
      this.#flushMulti();
      this.#dropping = true;
      try {
        this.#lost(new VfioUserError(Errno.ECONNRESET, 0, 0, 'dropped to reconnect'));
      } finally {
        this.#dropping = false;
      }
    }
    // A client made without the `reconnect` option still reconnects when asked to.
    this.#state = 'connecting';
    const before = this.#device!;
    try {
      this.#conn = this.#connection(new Fd(binding.unixConnect(path)));
      this.#negotiated = null;
      await this.#version();
      const info = await this.#call(Command.DEVICE_GET_INFO, encodeDeviceInfoRequest(), (msg) => decodeDeviceInfoReply(msg.payload));
      if (info.flags !== before.flags || info.numRegions !== before.numRegions || info.numIrqs !== before.numIrqs) {
        throw protocolError(
          `reconnect: the device has ${String(info.numRegions)} regions and ${String(info.numIrqs)} IRQ indexes (flags 0x${info.flags.toString(16)}), not ${String(before.numRegions)} and ${String(before.numIrqs)} (0x${before.flags.toString(16)})`,
          'num_regions',
        );
      }
      const regions = await Promise.allSettled(range(info.numRegions).map((i) => this.#fetchRegion(i)));
      const failed = regions.find((r) => r.status === 'rejected');
      if (failed !== undefined) {
        for (const r of regions) if (r.status === 'fulfilled') releaseRegionRecord(r.value);
        throw (failed as PromiseRejectedResult).reason;
      }
      for (const r of this.#regions) releaseRegionRecord(r);
      this.#regions = regions.map((r) => (r as PromiseFulfilledResult<RegionRecord>).value);
      const irqInfos = await settleAll(range(info.numIrqs).map((i) => this.#fetchIrq(i)));
      irqInfos.forEach((i, k) => {
        if (i.count !== this.irqs.info[k]!.count) throw protocolError(`reconnect: IRQ index ${String(k)} has ${String(i.count)} vectors, not ${String(this.irqs.info[k]!.count)}`, 'count');
      });
      for (const io of this.#ioFds) io?.close();
      this.#ioFds = [];
      await this.#learnBarKinds();
      this.#postingAllowed = this.#wantPosted && !this.#regions.some((r) => r.info.mmapFlag);
      await this.#dma.regrantAll();
      await this.irqs.resendAll();
    } catch (err) {
      if ((this.#state as State) !== 'closed') {
        this.#dropping = true;
        try {
          this.#lost(err as Error);
        } finally {
          this.#dropping = false;
        }
        if (!this.#reconnectable) this.#shutdown(err as Error);
      }
      throw err;
    }
    debug('%s: reconnected', this.#name);
    this.emit('reconnect');
  }

  // ---- sharing memory with another client ----

  /**
   * Grants `mem` (a range of another client) to this client's device too, at the same address
   * with the same permissions: DMA_MAP with the range's own fd, as a VMM maps guest memory on a
   * migration destination. The memory is the same pages; it stays mapped while any client grants
   * it, and `mem.unmap()` withdraws it from every client.
   *
   * @throws {RangeError} for a range without an fd of its own, or one overlapping a map here.
   * @throws {VfioUserError} if the server refuses the map.
   */
  shareDma(mem: DmaMemory): Promise<void> {
    this.#assertOpen();
    return this.#dma.share(mem);
  }

  #shutdown(error: Error | null): void {
    if (this.#state === 'closed') return;
    this.#reconnecting = null;
    this.#state = 'closed';
    this.#multi = [];
    if (error !== null) debug('%s: closing: %s', this.#name, error.message);
    this.#conn.close(error);
    this.#twin?.close(error);
    this.#irqs?.closeAll();
    for (const io of this.#ioFds) io?.close();
    this.#ioFds = [];
    for (const r of this.#regions) releaseRegionRecord(r);
    this.#dma.releaseAll();
    this.emit('close', error);
  }
}

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}

function checkLength(length: number): number {
  if (!Number.isSafeInteger(length) || length < 0) throw new RangeError(`Expected a length (an integer >= 0), got ${String(length)}`);
  return length;
}

function checkSize(size: number): 1 | 2 | 4 {
  if (size !== 1 && size !== 2 && size !== 4) throw new RangeError(`Expected a register size of 1, 2 or 4, got ${String(size)}`);
  return size;
}

/** Waits for every promise; rejects with the first failure in order. Never leaves one unhandled. */
async function settleAll<T>(calls: Promise<T>[]): Promise<T[]> {
  const results = await Promise.allSettled(calls);
  const out: T[] = [];
  for (const r of results) {
    if (r.status === 'rejected') throw r.reason;
    out.push(r.value);
  }
  return out;
}
