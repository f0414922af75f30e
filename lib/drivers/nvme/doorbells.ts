/**
 * Doorbell registers, written the cheapest way the device allows (design.md, "Rules that keep it
 * fast"):
 *
 * - {@link MappedDoorbells}: the server offered the doorbell page of BAR0 as a sparse mmap area,
 *   so a doorbell is a 32-bit store into shared memory: no message at all. The controller sees it
 *   by polling its doorbell page (as SPDK's vfio-user target does).
 * - {@link IoEventfdDoorbells}: the server offered ioeventfds for the doorbells
 *   (`DEVICE_GET_REGION_IO_FDS`, with shadow memory for the value): a doorbell is a store into the
 *   shadow memory and an eventfd signal (one syscall, no message, no reply), as KVM turns a
 *   guest's doorbell store into an eventfd signal. The controller wakes on the eventfd.
 * - {@link MessageDoorbells}: a `REGION_WRITE` to BAR0. The client posts it (no reply awaited)
 *   when the device maps nothing; otherwise it is still sent without waiting here: the connection
 *   keeps commands in order, and a failure is reported through `onError`.
 *
 * @packageDocumentation
 */
import type { VfioUserClient } from '../../client/client';
import type { RegionIoFds } from '../../client/iofds';
import type { MappedRegion } from '../../client/regions';

/** How doorbells reach the device. */
export type DoorbellKind = 'mmap' | 'ioeventfd' | 'message';

/** Writes the doorbell registers of one controller. */
export interface DoorbellWriter {
  /** How doorbells reach the device. */
  readonly kind: DoorbellKind;
  /** Writes `value` to the 32-bit doorbell at `offset` in BAR0. Never throws. */
  write(offset: number, value: number): void;
  /**
   * Writes the real doorbell whatever the writer would skip (a shadow doorbell's EventIdx): after
   * a reconnect or a move, so the controller sees the value even if an earlier write was lost.
   */
  ring(offset: number, value: number): void;
  /** Releases what the writer holds (the mapping). Idempotent. */
  close(): void;
}

/** Doorbells as REGION_WRITE messages to BAR0. */
export class MessageDoorbells implements DoorbellWriter {
  readonly kind = 'message';
  readonly #client: VfioUserClient;
  readonly #bar: number;
  readonly #scratch = Buffer.alloc(4);
  readonly #onError: (err: Error) => void;
  readonly #failed: (err: unknown) => void;
  #closed = false;

  constructor(client: VfioUserClient, bar: number, onError: (err: Error) => void) {
    this.#client = client;
    this.#bar = bar;
    this.#onError = onError;
    this.#failed = (err: unknown) => {
      if (!this.#closed) this.#onError(err as Error);
    };
  }

  write(offset: number, value: number): void {
    if (this.#closed) return;
    // The client encodes (and copies, if the socket is congested) synchronously: one scratch buffer suffices.
    this.#scratch.writeUInt32LE(value >>> 0, 0);
    try {
      this.#client.write(this.#bar, offset, this.#scratch).catch(this.#failed);
    } catch (err) {
      this.#failed(err);
    }
  }

  ring(offset: number, value: number): void {
    this.write(offset, value);
  }

  close(): void {
    this.#closed = true;
  }
}

/**
 * Doorbells as stores into the mmap'd doorbell page; doorbells outside the mapped area (a queue
 * beyond what the area covers) go to `fallback`.
 */
export class MappedDoorbells implements DoorbellWriter {
  readonly kind = 'mmap';
  readonly #start: number;
  readonly #end: number;
  readonly #words: Uint32Array;
  readonly #region: MappedRegion;
  readonly #fallback: DoorbellWriter;
  #closed = false;

  private constructor(region: MappedRegion, start: number, words: Uint32Array, fallback: DoorbellWriter) {
    this.#region = region;
    this.#start = start;
    this.#end = start + words.length * 4;
    this.#words = words;
    this.#fallback = fallback;
  }

  /**
   * A writer over the mapped area of `region` that contains BAR0 offset `first` (the admin SQ
   * tail doorbell) and as much after it as the area holds, or null if no area contains
   * `[first, first + 8)`.
   */
  static from(region: MappedRegion, first: number, fallback: DoorbellWriter): MappedDoorbells | null {
    const area = region.areas.find((a) => a.offset <= first && first + 8 <= a.offset + a.size);
    if (area === undefined || first % 4 !== 0) return null;
    const bytes = area.mapping.bytes;
    const start = bytes.byteOffset + (first - area.offset);
    if (start % 4 !== 0) return null;
    const words = new Uint32Array(bytes.buffer, start, Math.floor((area.offset + area.size - first) / 4));
    return new MappedDoorbells(region, first, words, fallback);
  }

  /** The BAR0 range the mapping covers. */
  get range(): { start: number; end: number } {
    return { start: this.#start, end: this.#end };
  }

  write(offset: number, value: number): void {
    if (this.#closed) return;
    if (offset >= this.#start && offset + 4 <= this.#end && this.#region.mapped) {
      this.#words[(offset - this.#start) >>> 2] = value;
      return;
    }
    this.#fallback.write(offset, value);
  }

  ring(offset: number, value: number): void {
    this.write(offset, value);
  }

  /** Stops writing and unmaps the doorbell page. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#fallback.close();
    this.#region.unmap();
  }
}

/**
 * Doorbells through the ioeventfds the server offered for BAR0 ({@link VfioUserClient.useIoEventfds}):
 * the sub-region of each doorbell is looked up once; a doorbell without one (or with a datamatch,
 * which depends on the value) goes to `fallback`, and so does every write once the set is closed
 * (a reconnect).
 */
export class IoEventfdDoorbells implements DoorbellWriter {
  readonly kind = 'ioeventfd';
  readonly #set: RegionIoFds;
  readonly #first: number;
  /** Sub-region index per doorbell dword from `first`; -1 = none (fallback). */
  readonly #index: Int32Array;
  readonly #fallback: DoorbellWriter;
  readonly #scratch = Buffer.alloc(4);
  #closed = false;

  private constructor(set: RegionIoFds, first: number, index: Int32Array, fallback: DoorbellWriter) {
    this.#set = set;
    this.#first = first;
    this.#index = index;
    this.#fallback = fallback;
  }

  /**
   * A writer over the ioeventfds of `set` for the 32-bit doorbells from BAR0 offset `first` (the
   * admin SQ tail doorbell) on, `count` of them; null unless the admin queue's two have one.
   */
  static from(set: RegionIoFds, first: number, count: number, fallback: DoorbellWriter): IoEventfdDoorbells | null {
    const index = new Int32Array(count).fill(-1);
    const probe = Buffer.alloc(4);
    for (let d = 0; d < count; d++) {
      const i = set.match(BigInt(first + 4 * d), probe);
      // A datamatch entry stands for one value only: such doorbells go the slow way (tryWrite).
      if (i >= 0 && (set.subRegions[i]!.flags & 0x1) === 0) index[d] = i;
    }
    if (index[0]! < 0 || index[1]! < 0) return null;
    return new IoEventfdDoorbells(set, first, index, fallback);
  }

  /** Doorbells that have an ioeventfd of their own. */
  get covered(): number {
    return this.#index.reduce((n, i) => n + (i >= 0 ? 1 : 0), 0);
  }

  write(offset: number, value: number): void {
    if (this.#closed) return;
    const d = (offset - this.#first) >>> 2;
    const i = offset >= this.#first && d < this.#index.length ? this.#index[d]! : -1;
    if (i >= 0) {
      this.#scratch.writeUInt32LE(value >>> 0, 0);
      if (this.#set.writeAt(i, this.#scratch)) return;
    }
    this.#fallback.write(offset, value);
  }

  ring(offset: number, value: number): void {
    this.write(offset, value);
  }

  /** Stops writing; the ioeventfds belong to the client (closed with it). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#fallback.close();
  }
}

/** Doorbell Buffer Config's event check (NVMe 1.3, 5.8; Linux `nvme_dbbuf_need_event`). */
export function needEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/**
 * Shadow doorbells (Doorbell Buffer Config, admin opcode 7Ch), as Linux uses them with emulated
 * controllers: the new value goes to the shadow doorbell page in DMA memory, and the real
 * doorbell is written only when the controller's EventIdx says it stopped polling. The admin
 * queue (and any doorbell outside the pages) always uses `fallback`.
 */
export class ShadowDoorbells implements DoorbellWriter {
  readonly kind: DoorbellKind;
  readonly #dbs: Int32Array;
  readonly #eis: Int32Array;
  readonly #first: number;
  readonly #adminEnd: number;
  readonly #fallback: DoorbellWriter;
  #closed = false;
  /** Real doorbell writes the EventIdx asked for, and shadow-only updates. */
  readonly counts = { rung: 0, shadowed: 0 };

  /**
   * `dbs` and `eis` are the shadow doorbell and EventIdx pages (same length); `first` is the BAR0
   * offset of the admin SQ tail doorbell, which maps to dword 0 of both pages; `stride` is the
   * doorbell stride in bytes.
   */
  constructor(dbs: Buffer, eis: Buffer, first: number, stride: number, fallback: DoorbellWriter) {
    this.#dbs = new Int32Array(dbs.buffer, dbs.byteOffset, dbs.length >>> 2);
    this.#eis = new Int32Array(eis.buffer, eis.byteOffset, eis.length >>> 2);
    this.#first = first;
    this.#adminEnd = first + 2 * stride;
    this.#fallback = fallback;
    this.kind = fallback.kind;
  }

  write(offset: number, value: number): void {
    if (this.#closed) return;
    const index = (offset - this.#first) >>> 2;
    // The admin queue's two doorbells are never shadowed; nor are offsets beyond the pages.
    if (offset < this.#adminEnd || index >= this.#dbs.length) {
      this.#fallback.write(offset, value);
      return;
    }
    const old = Atomics.exchange(this.#dbs, index, value) >>> 0;
    // Atomics are sequentially consistent: the shadow store is visible before EventIdx is read.
    const event = Atomics.load(this.#eis, index) >>> 0;
    if (needEvent(event, value, old)) {
      this.counts.rung++;
      this.#fallback.write(offset, value);
    } else {
      this.counts.shadowed++;
    }
  }

  ring(offset: number, value: number): void {
    if (this.#closed) return;
    const index = (offset - this.#first) >>> 2;
    if (offset >= this.#adminEnd && index < this.#dbs.length) Atomics.store(this.#dbs, index, value);
    this.#fallback.ring(offset, value);
  }

  /**
   * Zeroes the shadow doorbells and EventIdx values of queue pair `qid` (after its deletion), so
   * a queue created again with that id starts from 0 on both sides, as a fresh one does.
   */
  forgetQueue(qid: number): void {
    const stride = (this.#adminEnd - this.#first) / 2;
    for (const offset of [this.#first + 2 * qid * stride, this.#first + (2 * qid + 1) * stride]) {
      const index = (offset - this.#first) >>> 2;
      if (qid === 0 || index >= this.#dbs.length) continue;
      Atomics.store(this.#dbs, index, 0);
      Atomics.store(this.#eis, index, 0);
    }
  }

  /** Stops shadowing; the fallback writer belongs to the caller. */
  close(): void {
    this.#closed = true;
  }
}
