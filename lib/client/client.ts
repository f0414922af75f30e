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
 * This class is the public face only. The work is in `session.ts` (bring-up, loss, reconnect,
 * release), `link.ts` (sockets, requests, posted writes), `negotiate.ts` (VERSION), `device.ts`
 * (device, region and IRQ info), `region-io.ts` (region reads and writes), `options.ts`, and the
 * resources' own modules (`dma.ts`, `irqs.ts`, `regions.ts`, `iofds.ts`, `migration.ts`).
 *
 * @packageDocumentation
 */
import { EventEmitter } from 'node:events';
import { binding } from '../native/binding';
import { Fd } from '../native/fd';
import { Command, DeviceFlags, Errno } from '../protocol/constants';
import { VfioUserError } from '../protocol/errors';
import type { Capabilities, Negotiated } from '../protocol/capabilities';
import { decodeDeviceResetReply } from '../protocol/messages/reset';
import { fetchIrq, fetchRegion, fetchRegionIoFds, getDeviceInfo, type DeviceSummary } from './device';
import type { DmaFdOptions, DmaMapOptions, DmaMemory, DmaTable } from './dma';
import { checkIndex, protocolError } from './errors';
import type { IrqChannels, IrqEvent, IrqIndexInfo, IrqSelection } from './irqs';
import type { RegionIoFds } from './iofds';
import type { ClientLink } from './link';
import {
  dirtyReport,
  getMigrationState,
  probeMigration,
  readMigrationData,
  setMigrationState,
  startDirtyLogging,
  stopDirtyLogging,
  writeMigrationData,
  type DirtyBitmap,
  type DirtyRange,
  type MigrationCore,
  type MigrationSupport,
} from './migration';
import { checkClientOptions, clientSettings, type CallOptions, type ClientOptions, type WriteOptions } from './options';
import type { RegionIo } from './region-io';
import { mapRegionAreas, releaseRegionRecord, type MappedRegion, type RegionInfo } from './regions';
import { ClientSession } from './session';

export { ClientLimits, type CallOptions, type ClientOptions, type WriteOptions } from './options';
export type { DeviceSummary } from './device';

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

/**
 * A connection to one vfio-user device server (a PCI function).
 *
 * Create it with {@link VfioUserClient.connect}; release it with {@link VfioUserClient.close},
 * which closes the socket and every fd, eventfd watcher and mapping the client holds. When the
 * server goes away the client releases everything the same way and emits `'close'` with the
 * reason; its memory views (DMA and mapped regions) then read as length 0.
 */
export class VfioUserClient extends EventEmitter<VfioUserClientEvents> {
  readonly #path: string;
  readonly #session: ClientSession;
  readonly #link: ClientLink;
  readonly #io: RegionIo;
  readonly #dma: DmaTable;

  private constructor(socket: Fd, path: string, options: ClientOptions) {
    super();
    this.#path = path;
    this.#session = new ClientSession(socket, clientSettings(options), {
      irq: (e) => this.emit('irq', e.index, e.vector, e.count),
      close: (error) => this.emit('close', error),
      disconnect: (error) => this.emit('disconnect', error),
      reconnect: () => this.emit('reconnect'),
    });
    this.#link = this.#session.link;
    this.#io = this.#session.io;
    this.#dma = this.#session.dma;
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
    checkClientOptions(options);
    const socket = new Fd(binding.unixConnect(path));
    let client: VfioUserClient;
    try {
      client = new VfioUserClient(socket, path, options);
    } catch (err) {
      socket.close();
      throw err;
    }
    try {
      await client.#session.bringUp();
    } catch (err) {
      client.#session.shutdown(err as Error);
      throw err;
    }
    return client;
  }

  // ---- state ----

  /** True once closed (by {@link VfioUserClient.close} or because the connection ended). */
  get closed(): boolean {
    return this.#link.state === 'closed';
  }

  /** True while the connection is gone and the client waits for {@link VfioUserClient.reconnect} (`reconnect` option). */
  get disconnected(): boolean {
    const state = this.#link.state;
    return state === 'disconnected' || (state === 'connecting' && this.#session.reconnecting);
  }

  /** The socket path this client connects to. */
  get path(): string {
    return this.#path;
  }

  /** The negotiated version and limits. */
  get negotiated(): Readonly<Negotiated> {
    return this.#session.negotiated;
  }

  /** The server's `VERSION` reply: version and capabilities (defaults applied) as it sent them. */
  get serverCapabilities(): Readonly<Capabilities> {
    return this.#session.serverVersion.capabilities;
  }

  /** True if server-to-client commands use a twin socket (reference §1.9). */
  get twinSocket(): boolean {
    return this.#link.twinSocket;
  }

  /** What `DEVICE_GET_INFO` reported. */
  get device(): DeviceSummary {
    return this.#session.device;
  }

  /** Region info of every index, as fetched during connect. */
  get regions(): readonly RegionInfo[] {
    return this.#io.records.map((r) => r.info);
  }

  /** IRQ info of every index and the interrupt channels (events, counters). */
  get irqs(): IrqChannels {
    return this.#session.irqs;
  }

  /** True if writes to memory BARs are posted (enabled, and no region is mappable). */
  get postedWrites(): boolean {
    return this.#io.postingAllowed;
  }

  /** Ranges of guest memory currently granted to the device, in address order. */
  get dmaMaps(): readonly DmaMemory[] {
    return this.#dma.list();
  }

  /** Region info of `index` (as fetched during connect). @throws {RangeError} for an unknown index. */
  region(index: number): RegionInfo {
    return this.#io.record(index).info;
  }

  // ---- information queries ----

  /**
   * Asks the server for region `index` again (two-step `argsz` exchange). The answer's fds are
   * closed; the regions fetched at connect are not replaced.
   *
   * @throws {ProtocolError} for a malformed or inconsistent reply.
   */
  async queryRegionInfo(index: number): Promise<RegionInfo> {
    checkIndex(index, this.device.numRegions, 'region');
    const record = await fetchRegion(this.#link, index);
    releaseRegionRecord(record);
    return record.info;
  }

  /** Asks the server for IRQ index `index` again. */
  async queryIrqInfo(index: number): Promise<IrqIndexInfo> {
    checkIndex(index, this.device.numIrqs, 'IRQ');
    return fetchIrq(this.#link, index, this.#session.settings.name);
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
    await this.#io.readInto(index, offset, dst, options.timeoutMs);
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
    await this.#io.write(index, offset, data, options);
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
    await getDeviceInfo(this.#link, options);
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
    const record = this.#io.record(index);
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
    const region = this.#io.record(index).info;
    return fetchRegionIoFds(this.#link, index, region.size, options.timeoutMs);
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
    if (this.#link.state === 'closed') {
      set.close();
      throw new VfioUserError(Errno.ECONNRESET, Command.DEVICE_GET_REGION_IO_FDS, 0, 'the client closed');
    }
    this.#io.useIoFds(index, set);
    return set;
  }

  /** Stops routing writes of region `index` through ioeventfds and closes them. */
  stopIoEventfds(index: number): void {
    this.#io.stopIoFds(index);
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
    return startDirtyLogging(this.#migrationCore, options.pageSize ?? this.#session.pageSize(), options.ranges ?? [], options.timeoutMs);
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
  dirtyPages(iova: number, length: number, pageSize = this.#session.pageSize(), options: CallOptions = {}): Promise<DirtyBitmap> {
    return dirtyReport(this.#migrationCore, iova, length, pageSize, options.timeoutMs);
  }

  get #migrationCore(): MigrationCore {
    const self = this;
    return {
      call: (command, body, timeoutMs) => this.#link.request(command, body, { timeoutMs }),
      get maxChunk() {
        return Math.min(self.negotiated.maxDataXferSize, self.#session.settings.maxDataXferSize);
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
    await this.#link.call(Command.DEVICE_RESET, null, (msg) => decodeDeviceResetReply(msg.payload), options);
  }

  /**
   * Closes the connection and releases everything: pending calls fail with ECONNRESET, eventfds
   * are unwatched and closed, region and DMA mappings are unmapped, region fds are closed, and
   * `'close'` is emitted with null. Batched small writes are handed to the socket first, but
   * whatever the socket has not accepted yet is dropped: call {@link VfioUserClient.flush} before
   * closing to be sure the server executed every posted write. Idempotent.
   */
  close(): Promise<void> {
    this.#session.close();
    return Promise.resolve();
  }

  // ---- reconnection ----

  /**
   * Drops the connection as a crashed VMM's would end, keeping DMA memory, eventfds and state for
   * {@link VfioUserClient.reconnect} (`'disconnect'` is emitted). Pending calls fail with ECONNRESET.
   */
  disconnect(): void {
    this.#session.disconnect();
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
    return this.#session.reconnect(options.path ?? this.#path);
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

  #assertOpen(): void {
    if (this.#link.state === 'closed') throw new VfioUserError(Errno.ECONNRESET, 0, 0, 'the client is closed');
  }
}

function checkLength(length: number): number {
  if (!Number.isSafeInteger(length) || length < 0) throw new RangeError(`Expected a length (an integer >= 0), got ${String(length)}`);
  return length;
}

function checkSize(size: number): 1 | 2 | 4 {
  if (size !== 1 && size !== 2 && size !== 4) throw new RangeError(`Expected a register size of 1, 2 or 4, got ${String(size)}`);
  return size;
}
