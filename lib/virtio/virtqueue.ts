/**
 * Split virtqueues, device side (virtio 1.2, 2.7): the descriptor table, the available ring the
 * driver fills and the used ring the device fills, all in the client's memory.
 *
 * {@link SplitVirtqueue.pop} takes the next available chain and walks it into a pooled
 * {@link VirtqElement}: the list of its buffers (guest address and length), device-readable ones
 * first. Indirect tables (VIRTIO_F_INDIRECT_DESC) are followed. Nothing is copied and nothing is
 * allocated: descriptors are read from cached views of the rings (see memory.ts), elements come
 * from a pool of `size` objects per queue. Device code turns the buffers into zero-copy views
 * ({@link ElementData}) and completes the element with {@link SplitVirtqueue.push}.
 *
 * Guest errors in the ring structure are values, not exceptions: `pop` returns null and sets
 * {@link SplitVirtqueue.fault} (the transport then sets DEVICE_NEEDS_RESET). Caught are: rings or
 * indirect tables outside the maps; an available index that moved by more than the queue size; a
 * head or `next` index out of range; a chain that loops or is longer than the queue size; an
 * indirect descriptor without the feature, inside an indirect table, with NEXT, or whose length
 * is not a multiple of 16; a device-readable buffer after a device-writable one. Buffers whose
 * addresses lie outside every map are not a ring error: the device fails that request.
 *
 * EVENT_IDX (2.7.7, 2.7.10): the device publishes `avail_event` when it has drained the ring, so
 * the driver notifies only for buffers added after that, and interrupts only when the used index
 * passes the driver's `used_event`. Without it, the NO_NOTIFY / NO_INTERRUPT flags serve as hints.
 * Index accesses use `Atomics` on 16-bit views: sequentially consistent, which gives the ordering
 * the protocol needs (read the available index before the entries; write used entries before the
 * used index; publish `avail_event` before re-reading the available index).
 *
 * @packageDocumentation
 */
import { DmaSpace } from '../server/dma';
import { GuestMemory, RingView } from './memory';
import {
  Avail,
  AvailFlags,
  Desc,
  DescFlags,
  RingAlign,
  Used,
  UsedFlags,
  VIRTIO_MSI_NO_VECTOR,
  availEventOffset,
  availRingSize,
  descTableSize,
  usedEventOffset,
  usedRingSize,
  vringNeedEvent,
} from './spec';

const TWO_32 = 0x1_0000_0000;
/** Highest u32 "high half" that keeps a u64 exact in a Number. */
const MAX_SAFE_HI = 0x1f_ffff;

/** Reads a little-endian u64 as a Number; -1 above 2^53 (no such address is ever mapped). */
export function readU64(buf: Buffer, offset: number): number {
  const lo = buf.readUInt32LE(offset);
  const hi = buf.readUInt32LE(offset + 4);
  return hi > MAX_SAFE_HI ? -1 : hi * TWO_32 + lo;
}

/** A u64 from two u32 halves as a Number; -1 above 2^53. */
export function u64(lo: number, hi: number): number {
  return hi >>> 0 > MAX_SAFE_HI ? -1 : (hi >>> 0) * TWO_32 + (lo >>> 0);
}

/**
 * One available descriptor chain: its head (the ID returned in the used ring) and its buffers,
 * the device-readable ones first. Pooled per queue and reused, so devices may extend it with
 * per-request fields (and callbacks made once per object).
 */
export class VirtqElement {
  /** Index of the chain's head descriptor: the ID the used ring returns. */
  head = 0;
  /** Transport generation it was popped in; a completion from an older one is dropped. */
  epoch = 0;
  /** Buffers: `count` of them, `[0, readableCount)` device-readable, the rest device-writable. */
  count = 0;
  readableCount = 0;
  /** Guest addresses (-1 for one above 2^53, which no map can contain) and lengths. */
  readonly addr: number[] = [];
  readonly len: number[] = [];
  /** Total bytes of the device-readable and of the device-writable buffers. */
  readable = 0;
  writable = 0;
  /** The longest single buffer. */
  maxLen = 0;
  /** Bytes the device wrote into device-writable buffers: the `len` of the used element. */
  written = 0;
  /** Set by {@link seek}: offset inside the buffer found. */
  segOff = 0;

  constructor(readonly queue: SplitVirtqueue) {}

  /** Starts a new chain at `head` (arrays keep their capacity). */
  reset(head: number): void {
    this.head = head;
    this.count = 0;
    this.readableCount = 0;
    this.readable = 0;
    this.writable = 0;
    this.maxLen = 0;
    this.written = 0;
  }

  /** Appends a buffer (readable ones must all come first). */
  add(addr: number, len: number, writable: boolean): void {
    const n = this.count;
    this.addr[n] = addr;
    this.len[n] = len;
    this.count = n + 1;
    if (writable) this.writable += len;
    else {
      this.readable += len;
      this.readableCount = n + 1;
    }
    if (len > this.maxLen) this.maxLen = len;
  }

  get writableCount(): number {
    return this.count - this.readableCount;
  }

  /**
   * Index of the buffer holding byte `at` of the device-readable (`writable` false) or
   * device-writable part, with {@link segOff} set to the offset inside it; -1 past the end.
   */
  seek(writable: boolean, at: number): number {
    let rest = at;
    const end = writable ? this.count : this.readableCount;
    for (let i = writable ? this.readableCount : 0; i < end; i++) {
      const n = this.len[i]!;
      if (rest < n) {
        this.segOff = rest;
        return i;
      }
      rest -= n;
    }
    return -1;
  }

  /**
   * Copies bytes `[from, from + dst.length)` of the device-readable part into `dst`. False if the
   * part is shorter or a buffer is unreachable.
   */
  readInto(mem: GuestMemory, from: number, dst: Uint8Array): boolean {
    let i = this.seek(false, from);
    if (i < 0) return dst.length === 0;
    let off = this.segOff;
    let done = 0;
    while (done < dst.length) {
      if (i >= this.readableCount) return false;
      const n = Math.min(this.len[i]! - off, dst.length - done);
      const addr = this.addr[i]!;
      if (addr < 0 || !mem.locate(addr + off, n, false)) return false;
      const buf = mem.buf;
      const at = mem.off;
      for (let k = 0; k < n; k++) dst[done + k] = buf[at + k]!;
      done += n;
      off = 0;
      i++;
    }
    return true;
  }

  /**
   * Copies `src` into the device-writable part from byte `from`. False if the part is shorter or a
   * buffer is unreachable (bytes before it may have been written).
   */
  writeFrom(mem: GuestMemory, from: number, src: Uint8Array): boolean {
    let i = this.seek(true, from);
    if (i < 0) return src.length === 0;
    let off = this.segOff;
    let done = 0;
    while (done < src.length) {
      if (i >= this.count) return false;
      const n = Math.min(this.len[i]! - off, src.length - done);
      const addr = this.addr[i]!;
      if (addr < 0 || !mem.locate(addr + off, n, true)) return false;
      const buf = mem.buf;
      const at = mem.off;
      for (let k = 0; k < n; k++) buf[at + k] = src[done + k]!;
      done += n;
      off = 0;
      i++;
    }
    return true;
  }

  /** Writes one byte at offset `at` of the device-writable part; false if unreachable. */
  writeByte(mem: GuestMemory, at: number, value: number): boolean {
    const i = this.seek(true, at);
    if (i < 0) return false;
    const addr = this.addr[i]!;
    if (addr < 0 || !mem.locate(addr + this.segOff, 1, true)) return false;
    mem.buf[mem.off] = value;
    return true;
  }
}

/** Creates the pooled elements of a queue (a device passes a factory for its subclass). */
export type ElementFactory<E extends VirtqElement> = (queue: SplitVirtqueue<E>) => E;

/** One split virtqueue: the driver's configuration (through common cfg) and the device's state. */
export class SplitVirtqueue<E extends VirtqElement = VirtqElement> {
  // ---- configuration, as the driver writes it through common cfg (4.1.4.3) ----
  /** `queue_size`: entries; reads the maximum until the driver writes a smaller one. */
  size: number;
  /** `queue_msix_vector`. */
  msixVector = VIRTIO_MSI_NO_VECTOR;
  /** `queue_enable`. */
  enabled = false;
  /** `queue_desc`, `queue_driver`, `queue_device` as u32 halves (lo, hi). */
  readonly descAddr = [0, 0];
  readonly driverAddr = [0, 0];
  readonly deviceAddr = [0, 0];

  // ---- device state ----
  /** True between {@link start} and {@link stop}: the rings are in use. */
  running = false;
  /** Next available index to take (free-running u16). */
  lastAvail = 0;
  /** Next used index to fill (free-running u16). */
  usedIdx = 0;
  /** Elements handed out by {@link pop} and not yet recycled. */
  inflight = 0;
  /** Why the queue stopped on a guest error (the transport sets DEVICE_NEEDS_RESET), or null. */
  fault: string | null = null;
  /** Used index when the driver was last interrupted (EVENT_IDX), and whether that is known. */
  private signalledUsed = 0;
  private signalledValid = false;
  private eventIdx = false;
  private indirect = false;
  private desc = 0;
  private driver = 0;
  private device = 0;
  private descRing: RingView | null = null;
  private availRing: RingView | null = null;
  private usedRing: RingView | null = null;
  /** Cursor for everything not cached (indirect tables, fallbacks); devices may use it too. */
  mem: GuestMemory = new GuestMemory(new DmaSpace());
  private readonly pool: E[] = [];

  constructor(
    /** The queue's index (`queue_select`). */
    readonly index: number,
    /** Largest size the device offers (a power of two). */
    readonly maxSize: number,
    private readonly create: ElementFactory<E>,
  ) {
    this.size = maxSize;
  }

  /** The client's memory, once the device is attached to a server. */
  attach(dma: DmaSpace): void {
    this.stop();
    this.mem = new GuestMemory(dma);
  }

  /** Back to power-on configuration (device reset). Elements in flight stay counted. */
  reset(): void {
    this.stop();
    this.size = this.maxSize;
    this.msixVector = VIRTIO_MSI_NO_VECTOR;
    this.enabled = false;
    this.descAddr[0] = this.descAddr[1] = 0;
    this.driverAddr[0] = this.driverAddr[1] = 0;
    this.deviceAddr[0] = this.deviceAddr[1] = 0;
    this.fault = null;
  }

  /**
   * Starts using the rings with the negotiated features (DRIVER_OK). Returns null, or what is
   * wrong with the configuration: a size that is not a power of two up to the maximum, a
   * misaligned area, an address above 2^53. Unreachable rings are found on first use.
   */
  start(eventIdx: boolean, indirect: boolean): string | null {
    const size = this.size;
    const desc = u64(this.descAddr[0]!, this.descAddr[1]!);
    const driver = u64(this.driverAddr[0]!, this.driverAddr[1]!);
    const device = u64(this.deviceAddr[0]!, this.deviceAddr[1]!);
    if (size < 1 || size > this.maxSize || (size & (size - 1)) !== 0) return `queue ${this.index}: size ${size} is not a power of two from 1 to ${this.maxSize}`;
    if (desc < 0 || driver < 0 || device < 0) return `queue ${this.index}: a ring address is above 2^53`;
    if (desc % RingAlign.DESC !== 0 || driver % RingAlign.AVAIL !== 0 || device % RingAlign.USED !== 0) {
      return `queue ${this.index}: misaligned rings (desc 0x${desc.toString(16)}, driver 0x${driver.toString(16)}, device 0x${device.toString(16)})`;
    }
    const dma = this.mem.dma;
    this.desc = desc;
    this.driver = driver;
    this.device = device;
    this.descRing = new RingView(dma, desc, descTableSize(size), false);
    this.availRing = new RingView(dma, driver, availRingSize(size), false);
    this.usedRing = new RingView(dma, device, usedRingSize(size), true);
    this.eventIdx = eventIdx;
    this.indirect = indirect;
    this.lastAvail = 0;
    this.usedIdx = 0;
    this.signalledUsed = 0;
    this.signalledValid = false;
    this.fault = null;
    this.running = true;
    return null;
  }

  /** Stops using the rings (reset, or a fault). */
  stop(): void {
    this.running = false;
    this.descRing = this.availRing = this.usedRing = null;
  }

  /** Stops the queue on a guest error; always returns null (for `return this.failed(...)`). */
  private failed(why: string): null {
    this.fault = why;
    this.stop();
    return null;
  }

  // ---- available ring ----

  /** The driver's available index, or -1 if the ring is unreachable. */
  availIdx(): number {
    const ring = this.availRing;
    if (ring === null) return -1;
    if (ring.get() !== null && ring.u16 !== null) return Atomics.load(ring.u16, Avail.IDX >> 1);
    const mem = this.mem;
    if (!mem.locate(this.driver + Avail.IDX, 2, false)) return -1;
    return mem.buf.readUInt16LE(mem.off);
  }

  /** Chains available and not taken yet; -1 if the ring is unreachable (or the queue stopped). */
  pending(): number {
    if (!this.running) return 0;
    const idx = this.availIdx();
    return idx < 0 ? -1 : (idx - this.lastAvail) & 0xffff;
  }

  /** A u16 of the available ring at byte `offset`, or -1. */
  private availU16(offset: number): number {
    const ring = this.availRing!;
    const bytes = ring.get();
    if (bytes !== null) return ring.u16 !== null ? ring.u16[offset >> 1]! : bytes.readUInt16LE(offset);
    const mem = this.mem;
    if (!mem.locate(this.driver + offset, 2, false)) return -1;
    return mem.buf.readUInt16LE(mem.off);
  }

  /**
   * Takes the next available chain: an element describing it, or null when there is none (or
   * the queue cannot take more: every element is in flight). Null with {@link fault} set: the
   * ring is broken and the queue has stopped.
   */
  pop(): E | null {
    if (!this.running || this.inflight >= this.size) return null;
    const avail = this.availIdx();
    if (avail < 0) return this.failed(`queue ${this.index}: available ring at 0x${this.driver.toString(16)} is unreachable`);
    const pending = (avail - this.lastAvail) & 0xffff;
    if (pending === 0) return null;
    if (pending > this.size) return this.failed(`queue ${this.index}: available index moved from ${this.lastAvail} to ${avail} (size ${this.size})`);
    const head = this.availU16(Avail.RING + 2 * (this.lastAvail & (this.size - 1)));
    if (head < 0) return this.failed(`queue ${this.index}: available ring at 0x${this.driver.toString(16)} is unreachable`);
    if (head >= this.size) return this.failed(`queue ${this.index}: chain head ${head} is out of range (size ${this.size})`);
    const e = this.pool.pop() ?? this.create(this);
    const why = this.walk(e, head);
    if (why !== null) {
      this.pool.push(e);
      return this.failed(`queue ${this.index}: ${why}`);
    }
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    this.inflight++;
    return e;
  }

  /** Walks the chain at `head` into `e`; null, or what is wrong with it. */
  private walk(e: E, head: number): string | null {
    e.reset(head);
    const size = this.size;
    const mem = this.mem;
    const direct = this.descRing!.get();
    let table: Buffer | null = direct;
    let base = 0;
    let entries = size;
    let inIndirect = false;
    let steps = 0;
    let i = head;
    for (;;) {
      let buf: Buffer;
      let off: number;
      if (table !== null) {
        buf = table;
        off = base + i * Desc.SIZE;
      } else {
        if (!mem.locate(this.desc + i * Desc.SIZE, Desc.SIZE, false)) return `descriptor table at 0x${this.desc.toString(16)} is unreachable`;
        buf = mem.buf;
        off = mem.off;
      }
      const addr = readU64(buf, off + Desc.ADDR);
      const len = buf.readUInt32LE(off + Desc.LEN);
      const flags = buf.readUInt16LE(off + Desc.FLAGS);
      const next = buf.readUInt16LE(off + Desc.NEXT);
      if ((flags & DescFlags.INDIRECT) !== 0) {
        if (!this.indirect) return 'indirect descriptor without VIRTIO_F_INDIRECT_DESC';
        if (inIndirect) return 'indirect descriptor inside an indirect table';
        if ((flags & DescFlags.NEXT) !== 0) return 'indirect descriptor with NEXT';
        if (len === 0 || len % Desc.SIZE !== 0) return `indirect table of ${len} bytes`;
        if (e.count + len / Desc.SIZE > size) return `indirect table of ${len / Desc.SIZE} descriptors makes the chain longer than the queue (${size})`;
        if (addr < 0 || !mem.locate(addr, len, false)) return `indirect table at 0x${addr.toString(16)}+${len} is unreachable`;
        table = mem.buf;
        base = mem.off;
        entries = len / Desc.SIZE;
        inIndirect = true;
        i = 0;
        continue;
      }
      if (++steps > size) return `descriptor chain loops or is longer than the queue (${size})`;
      const writable = (flags & DescFlags.WRITE) !== 0;
      if (!writable && e.count > e.readableCount) return 'device-readable descriptor after a device-writable one';
      e.add(addr, len, writable);
      if ((flags & DescFlags.NEXT) === 0) return null;
      if (next >= entries) return `next index ${next} is out of range (${entries} descriptors)`;
      i = next;
    }
  }

  /** Returns an element to the pool (after {@link push}, or when dropping it). */
  recycle(e: E): void {
    this.inflight--;
    this.pool.push(e);
  }

  // ---- used ring ----

  /**
   * Puts `e` (its head and `written`) into the used ring and publishes the new used index.
   * False if the used ring is unreachable (the queue then needs a reset).
   */
  push(e: E): boolean {
    const slot = this.usedIdx & (this.size - 1);
    const next = (this.usedIdx + 1) & 0xffff;
    const ring = this.usedRing;
    if (ring === null) return false;
    const bytes = ring.get();
    const elem = Used.RING + Used.ELEM_SIZE * slot;
    if (bytes !== null && ring.u16 !== null) {
      bytes.writeUInt32LE(e.head, elem + Used.ELEM_ID);
      bytes.writeUInt32LE(e.written >>> 0, elem + Used.ELEM_LEN);
      Atomics.store(ring.u16, Used.IDX >> 1, next);
    } else {
      const mem = this.mem;
      if (!mem.locate(this.device + elem, Used.ELEM_SIZE, true)) return false;
      mem.buf.writeUInt32LE(e.head, mem.off + Used.ELEM_ID);
      mem.buf.writeUInt32LE(e.written >>> 0, mem.off + Used.ELEM_LEN);
      if (!mem.locate(this.device + Used.IDX, 2, true)) return false;
      mem.buf.writeUInt16LE(next, mem.off);
    }
    this.usedIdx = next;
    return true;
  }

  /** Writes a u16 of the used ring at byte `offset`; false if unreachable. */
  private setUsedU16(offset: number, value: number): boolean {
    const ring = this.usedRing;
    if (ring === null) return false;
    const bytes = ring.get();
    if (bytes !== null && ring.u16 !== null) {
      Atomics.store(ring.u16, offset >> 1, value);
      return true;
    }
    const mem = this.mem;
    if (!mem.locate(this.device + offset, 2, true)) return false;
    mem.buf.writeUInt16LE(value, mem.off);
    return true;
  }

  /**
   * After draining: ask the driver to notify for buffers it adds from now on (EVENT_IDX:
   * `avail_event` = what we have taken; else clear NO_NOTIFY). The caller must then check
   * {@link pending} again: a buffer added just before this is not notified. False if unreachable.
   */
  enableNotify(): boolean {
    if (this.eventIdx) return this.setUsedU16(availEventOffset(this.size), this.lastAvail);
    return this.setUsedU16(Used.FLAGS, 0);
  }

  /** While processing: tell the driver notifications are not needed (a hint; EVENT_IDX: nothing). */
  disableNotify(): void {
    if (!this.eventIdx) this.setUsedU16(Used.FLAGS, UsedFlags.NO_NOTIFY);
  }

  /**
   * While the device polls the ring: the driver need not notify at all (EVENT_IDX: `avail_event`
   * half the index space ahead, which no submission reaches before {@link enableNotify}; else
   * NO_NOTIFY).
   */
  suppressNotify(): void {
    if (this.eventIdx) this.setUsedU16(availEventOffset(this.size), (this.lastAvail + 0x7fff) & 0xffff);
    else this.setUsedU16(Used.FLAGS, UsedFlags.NO_NOTIFY);
  }

  /**
   * Whether the driver wants an interrupt for the used entries pushed since the last call
   * (EVENT_IDX: the used index passed `used_event`; else NO_INTERRUPT is clear). An unreadable
   * available ring counts as "wants one".
   */
  needsInterrupt(): boolean {
    if (!this.eventIdx) {
      const flags = this.availU16(Avail.FLAGS);
      return flags < 0 || (flags & AvailFlags.NO_INTERRUPT) === 0;
    }
    const old = this.signalledUsed;
    const valid = this.signalledValid;
    const now = this.usedIdx;
    this.signalledUsed = now;
    this.signalledValid = true;
    if (!valid) return true;
    const event = this.availU16(usedEventOffset(this.size));
    return event < 0 || vringNeedEvent(event, now, old);
  }
}
