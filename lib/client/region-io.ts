/** Region reads and writes: bounds, chunking, ioeventfd and posted shortcuts, checked REGION_READ/WRITE replies. */
import { debuglog } from 'node:util';
import { Command, PciRegion } from '../protocol/constants';
import type { Negotiated } from '../protocol/capabilities';
import { AccessKind, createRegionAccess, readRegionAccess, writeRegionAccess } from '../protocol/messages/access';
import { checkIndex, protocolError, settleAll } from './errors';
import type { RegionIoFds } from './iofds';
import type { ClientLink } from './link';
import type { ClientSettings, WriteOptions } from './options';
import { releaseRegionRecord, type RegionRecord } from './regions';

const debug = debuglog('vfio-user:client');

/**
 * @internal The device's regions as the client reaches them: the records fetched at bring-up, the
 * ioeventfds writes go through, and which BARs take posted writes. A write goes, in order of
 * preference, through an ioeventfd, posted (memory BARs, when no region is mappable), or as a
 * REGION_WRITE awaiting its reply; reads are REGION_READs, pipelined in pieces of at most the
 * negotiated `max_data_xfer_size`.
 */
export class RegionIo {
  #regions: RegionRecord[] = [];
  /** Per region: the ioeventfds writes go through ({@link VfioUserClient.useIoEventfds}). */
  #ioFds: (RegionIoFds | undefined)[] = [];
  /** Per BAR 0-5: the BAR register says memory space (posted writes allowed). */
  readonly #barIsMemory: boolean[] = [false, false, false, false, false, false];
  #postingAllowed = false;
  /** The 16-byte region-access struct of the message being sent (sent or copied synchronously). */
  readonly #scratch = Buffer.alloc(16);
  readonly #access = createRegionAccess();
  #viewBuffer: ArrayBufferLike | null = null;
  #view: DataView | null = null;
  readonly #link: ClientLink;
  readonly #negotiated: () => Readonly<Negotiated>;
  readonly #settings: ClientSettings;

  /** `negotiated` returns the limits of the current connection (and throws before VERSION). */
  constructor(link: ClientLink, negotiated: () => Readonly<Negotiated>, settings: ClientSettings) {
    this.#link = link;
    this.#negotiated = negotiated;
    this.#settings = settings;
  }

  /** Every region, by index. */
  get records(): readonly RegionRecord[] {
    return this.#regions;
  }

  /** True if writes to memory BARs are posted (enabled, and no region is mappable). */
  get postingAllowed(): boolean {
    return this.#postingAllowed;
  }

  /** Region `index`. @throws {RangeError} for an unknown index. */
  record(index: number): RegionRecord {
    checkIndex(index, this.#regions.length, 'region');
    return this.#regions[index]!;
  }

  /** Takes `records` (a new bring-up's), releasing those held so far. */
  replaceRegions(records: RegionRecord[]): void {
    for (const r of this.#regions) releaseRegionRecord(r);
    this.#regions = records;
  }

  /** Reads the six BAR registers once, so posted writes go to memory BARs only (as QEMU), and decides on posting. */
  async decidePosting(): Promise<void> {
    await this.#learnBarKinds();
    const anyMmap = this.#regions.some((r) => r.info.mmapFlag);
    this.#postingAllowed = this.#settings.postedWrites && !anyMmap;
  }

  async #learnBarKinds(): Promise<void> {
    const cfg = this.#regions[PciRegion.CONFIG]!.info;
    const first = 0x10;
    if (cfg.size < first + 24) return;
    const bars = Buffer.alloc(24);
    try {
      await this.readInto(PciRegion.CONFIG, first, bars, undefined);
    } catch (err) {
      if (this.#link.state === 'closed') throw err;
      debug('%s: cannot read the BAR registers (%s): no posted writes', this.#settings.name, (err as Error).message);
      return;
    }
    for (let i = 0; i < 6; i++) {
      const region = this.#regions[i];
      this.#barIsMemory[i] = region !== undefined && region.info.size > 0 && (bars.readUInt32LE(4 * i) & 0x1) === 0;
    }
  }

  /** Reads `dst.length` bytes of region `index` at `offset` into `dst` (see {@link VfioUserClient.readInto}). */
  async readInto(index: number, offset: number | bigint, dst: Uint8Array, timeoutMs: number | undefined): Promise<void> {
    if (!(dst instanceof Uint8Array)) throw new TypeError('Expected third argument to be a Uint8Array');
    const start = this.#checkAccess(index, offset, dst.length);
    const chunk = this.#negotiated().maxDataXferSize;
    const calls: Promise<void>[] = [];
    let pos = 0;
    do {
      const n = Math.min(chunk, dst.length - pos);
      calls.push(this.#readChunk(index, start + BigInt(pos), dst.subarray(pos, pos + n), timeoutMs));
      pos += n;
    } while (pos < dst.length);
    await settleAll(calls);
  }

  /** Writes `data` to region `index` at `offset` (see {@link VfioUserClient.write}). */
  async write(index: number, offset: number | bigint, data: Uint8Array, options: WriteOptions & { timeoutMs?: number }): Promise<void> {
    if (!(data instanceof Uint8Array)) throw new TypeError('Expected third argument to be a Uint8Array');
    const start = this.#checkAccess(index, offset, data.length);
    const io = this.#ioFds[index];
    if (io !== undefined && io.tryWrite(start, data)) return;
    const posted = (options.posted ?? true) && this.#canPost(index) && data.length > 0;
    const chunk = Math.min(this.#settings.writeChunkSize, this.#negotiated().maxDataXferSize);
    if (posted) {
      for (let pos = 0; pos < data.length; pos += chunk) {
        this.#link.postWrite(index, start + BigInt(pos), data.subarray(pos, Math.min(data.length, pos + chunk)));
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

  /** Routes writes of region `index` through `set` from now on, closing the set it replaces. */
  useIoFds(index: number, set: RegionIoFds): void {
    this.#ioFds[index]?.close();
    this.#ioFds[index] = set;
  }

  /** Stops routing writes of region `index` through ioeventfds and closes them. */
  stopIoFds(index: number): void {
    this.#ioFds[index]?.close();
    this.#ioFds[index] = undefined;
  }

  /** Closes every ioeventfd set (a new connection's server knows none of them). */
  dropIoFds(): void {
    for (const io of this.#ioFds) io?.close();
    this.#ioFds = [];
  }

  /** Closes the ioeventfds and unmaps and closes every region's mappings and fds; the infos stay readable. */
  release(): void {
    this.dropIoFds();
    for (const r of this.#regions) releaseRegionRecord(r);
  }

  #readChunk(index: number, offset: bigint, dst: Uint8Array, timeoutMs: number | undefined): Promise<void> {
    writeRegionAccess(this.#scratch, 0, { offset, region: index, count: dst.length });
    return this.#link.call(
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
    return this.#link.call(
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

  /** Validates a region access; returns the offset as a bigint. */
  #checkAccess(index: number, offset: number | bigint, length: number): bigint {
    const { info } = this.record(index);
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
}
