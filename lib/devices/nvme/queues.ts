/**
 * Submission and completion queues (NVMe Base 1.4, 4.1 and 4.6) as the controller sees them: rings
 * in guest memory with a head, a tail and (for completion queues) a phase tag, modelled after
 * QEMU's `NvmeSQueue`/`NvmeCQueue`; and the shadow doorbell buffer with its EventIdx buffer
 * (Doorbell Buffer Config, NVMe 1.3+).
 *
 * Hot path: a ring is looked up once and then used through a cached zero-copy view of the client's
 * memory (plus an Int32Array over it for the ordered accesses), revalidated on each use with a
 * cheap identity check of its DMA map. No reference is held on the map between uses, so a
 * DMA_UNMAP never waits for an idle queue. A ring the cache cannot hold (split across maps, dirty
 * logging active for migration) is reached entry by entry through {@link DmaSpace.view}.
 *
 * Ordering: a completion entry is written with its phase-carrying dword last, through
 * `Atomics.store` (a sequentially consistent store), so the host never sees a new phase with stale
 * fields. Shadow doorbells and EventIdx are read and written with `Atomics` too, which gives the
 * full barrier the EventIdx protocol needs between "publish EventIdx" and "re-read the tail".
 *
 * @packageDocumentation
 */
import type { DmaRegion, DmaSpace } from '../../server/dma';
import { Request } from './request';
import { Cqe } from '../../nvme/structs';

/** A command fetched from a {@link SubmissionQueue}, which it is posted through and returned to. */
export type QueuedRequest = Request<SubmissionQueue>;

/** A cached view of a ring (or any small structure) in guest memory. */
export class QueueRing {
  private region: DmaRegion | null = null;
  private bytes: Buffer | null = null;
  /** Int32 view over the whole ring while the cache is valid. */
  words: Int32Array | null = null;
  /** Where the last {@link locate} found the entry. */
  buf: Buffer = EMPTY;
  off = 0;

  constructor(
    private readonly dma: DmaSpace,
    readonly iova: number,
    readonly entries: number,
    readonly entrySize: number,
    private readonly write: boolean,
  ) {}

  get byteLength(): number {
    return this.entries * this.entrySize;
  }

  /**
   * Points {@link buf}/{@link off} at entry `index` (and {@link words} at the ring, or null when
   * the entry came from a one-off view). False if the memory cannot be reached: outside the maps,
   * no shared memory, no permission, or bus mastering off.
   */
  locate(index: number): boolean {
    const whole = this.whole();
    if (whole !== null) {
      this.buf = whole;
      this.off = index * this.entrySize;
      return true;
    }
    this.words = null;
    try {
      this.buf = this.dma.view(this.iova + index * this.entrySize, this.entrySize, this.write);
    } catch {
      return false;
    }
    this.off = 0;
    return true;
  }

  /** True if the whole ring lies in one shared map the device may access. */
  reachable(): boolean {
    if (this.whole() !== null) return true;
    for (let i = 0; i < this.entries; i++) if (!this.locate(i)) return false;
    return true;
  }

  private whole(): Buffer | null {
    const dma = this.dma;
    if (!dma.enabled || dma.logging) return null;
    const cached = this.bytes;
    if (cached !== null && cached.length !== 0 && dma.find(this.iova) === this.region) {
      return cached;
    }
    this.bytes = null;
    this.words = null;
    this.region = null;
    const region = dma.find(this.iova);
    const length = this.byteLength;
    if (region === null || region.mapping === null || this.iova + length > region.iova + region.size) return null;
    let view: Buffer;
    try {
      view = dma.view(this.iova, length, this.write);
    } catch {
      return null;
    }
    this.region = region;
    this.bytes = view;
    this.words = view.byteOffset % 4 === 0 && length % 4 === 0 ? new Int32Array(view.buffer, view.byteOffset, length / 4) : null;
    return view;
  }
}

const EMPTY = Buffer.alloc(0);

/** A completion queue. */
export class CompletionQueue {
  /** Next slot the controller writes. */
  tail = 0;
  /** Last head the host reported (doorbell or shadow). */
  head = 0;
  /** Phase tag written into new entries; starts at 1 and flips on each wrap. */
  phase = 1;
  /** Submission queues that post here (a CQ with SQs cannot be deleted). */
  sqCount = 0;
  /** Completions waiting for room (the CQ was full), in order. */
  readonly waiting: QueuedRequest[] = [];
  /** Entries posted since the last interrupt decision. */
  posted = 0;
  /** Last values seen in the mmap'd doorbell page and in the shadow doorbell. */
  lastDoorbell = 0;
  lastShadow = 0;
  /** The host has moved this queue's shadow doorbell since it was configured (it uses shadows). */
  shadowUsed = false;
  readonly ring: QueueRing;

  constructor(
    dma: DmaSpace,
    readonly id: number,
    readonly size: number,
    readonly iova: number,
    /** Interrupt vector (MSI-X entry; INTMS bit for pin-based). */
    readonly vector: number,
    /** Interrupts enabled. */
    readonly ien: boolean,
  ) {
    this.ring = new QueueRing(dma, iova, size, Cqe.SIZE, true);
  }

  get full(): boolean {
    return (this.tail + 1) % this.size === this.head;
  }

  /** Entries posted that the host has not consumed yet. */
  get outstanding(): number {
    return (this.tail - this.head + this.size) % this.size;
  }

  /**
   * Writes one entry at the tail and advances it. False if the ring cannot be reached (a fatal
   * controller error: the host gave us memory we cannot write).
   */
  post(dw0: number, dw1: number, sqHead: number, sqId: number, cid: number, status: number): boolean {
    const ring = this.ring;
    if (!ring.locate(this.tail)) return false;
    const off = ring.off;
    const dw3 = (cid & 0xffff) | ((((status & 0x7fff) << 1) | this.phase) << 16);
    const words = ring.words;
    if (words !== null) {
      const w = off >> 2;
      words[w + (Cqe.DW0 >> 2)] = dw0;
      words[w + (Cqe.DW1 >> 2)] = dw1;
      words[w + (Cqe.SQHD >> 2)] = sqHead | (sqId << 16);
      Atomics.store(words, w + (Cqe.CID >> 2), dw3);
    } else {
      const buf = ring.buf;
      buf.writeUInt32LE(dw0 >>> 0, off + Cqe.DW0);
      buf.writeUInt32LE(dw1 >>> 0, off + Cqe.DW1);
      buf.writeUInt32LE((sqHead | (sqId << 16)) >>> 0, off + Cqe.SQHD);
      buf.writeInt32LE(dw3 | 0, off + Cqe.CID);
    }
    if (++this.tail === this.size) {
      this.tail = 0;
      this.phase ^= 1;
    }
    return true;
  }

  /**
   * Applies a head doorbell value. Returns false (and changes nothing) for an invalid value: out
   * of range, or moving the head past entries that were never posted.
   */
  setHead(value: number): boolean {
    if (value >= this.size) return false;
    const consumed = (value - this.head + this.size) % this.size;
    if (consumed > this.outstanding) return false;
    this.head = value;
    return true;
  }
}

/** A submission queue. */
export class SubmissionQueue {
  /** Next slot the controller fetches. */
  head = 0;
  /** Last tail the host reported (doorbell or shadow). */
  tail = 0;
  /** Commands fetched and not yet posted (their Requests are out of the pool). */
  inflight = 0;
  /** Set while a Delete I/O SQ waits for the in-flight commands. */
  onDrained: (() => void) | null = null;
  lastDoorbell = 0;
  lastShadow = 0;
  /** The host has moved this queue's shadow doorbell since it was configured (it uses shadows). */
  shadowUsed = false;
  readonly ring: QueueRing;
  private readonly pool: QueuedRequest[] = [];

  constructor(
    dma: DmaSpace,
    readonly id: number,
    readonly size: number,
    readonly iova: number,
    readonly cq: CompletionQueue,
    entrySize: number,
  ) {
    this.ring = new QueueRing(dma, iova, size, entrySize, false);
  }

  /** Entries the host submitted that were not fetched yet. */
  get pending(): number {
    return (this.tail - this.head + this.size) % this.size;
  }

  /** Whether a command can be fetched now (work queued, a Request free, not being deleted). */
  get ready(): boolean {
    return this.head !== this.tail && this.inflight < this.size && this.onDrained === null;
  }

  /** Applies a tail doorbell value; false for an out-of-range one. */
  setTail(value: number): boolean {
    if (value >= this.size) return false;
    this.tail = value;
    return true;
  }

  /** Copies the entry at the head into a Request and advances the head; null if unreachable. */
  fetch(): QueuedRequest | null {
    const ring = this.ring;
    if (!ring.locate(this.head)) return null;
    const req = this.pool.pop() ?? new Request<SubmissionQueue>(this);
    req.load(ring.buf, ring.off, ring.words);
    if (++this.head === this.size) this.head = 0;
    this.inflight++;
    return req;
  }

  /**
   * A command that was in flight on the migration source (an outstanding Asynchronous Event
   * Request, a completion waiting for room): taken from the pool as if fetched.
   */
  restoreRequest(cid: number, opcode: number): QueuedRequest {
    const req = this.pool.pop() ?? new Request<SubmissionQueue>(this);
    req.opcode = opcode;
    req.flags = 0;
    req.cid = cid;
    req.status = 0;
    req.dw0 = 0;
    req.dw1 = 0;
    req.lba = 0;
    this.inflight++;
    return req;
  }

  /** Returns a Request to the pool once its completion is posted (or dropped). */
  recycle(req: QueuedRequest): void {
    req.done();
    this.inflight--;
    this.pool.push(req);
    if (this.inflight === 0 && this.onDrained !== null) {
      const done = this.onDrained;
      this.onDrained = null;
      done();
    }
  }
}

/**
 * The shadow doorbell buffer and EventIdx buffer the host registered with Doorbell Buffer Config.
 * Both are one memory page, laid out like the doorbell registers (SQ y tail at dword 2y, CQ y
 * head at dword 2y + 1, for DSTRD = 0).
 */
export class ShadowDoorbells {
  private readonly dbs: QueueRing;
  private readonly eis: QueueRing;

  constructor(
    dma: DmaSpace,
    readonly dbsIova: number,
    readonly eisIova: number,
    pageSize: number,
  ) {
    this.dbs = new QueueRing(dma, dbsIova, pageSize / 4, 4, true);
    this.eis = new QueueRing(dma, eisIova, pageSize / 4, 4, true);
  }

  /** True if both pages are reachable and writable. */
  reachable(): boolean {
    const last = this.dbs.entries - 1;
    return this.dbs.locate(0) && this.dbs.locate(last) && this.eis.locate(0) && this.eis.locate(last);
  }

  /** The shadow doorbell at dword `index`, or -1 if the page cannot be read now. */
  read(index: number): number {
    const ring = this.dbs;
    if (!ring.locate(index)) return -1;
    const words = ring.words;
    return words !== null ? Atomics.load(words, index) >>> 0 : ring.buf.readUInt32LE(ring.off);
  }

  /** Sets the shadow doorbell at dword `index` (initial values when shadowing starts). */
  writeDoorbell(index: number, value: number): void {
    this.store(this.dbs, index, value);
  }

  /** Publishes EventIdx at dword `index`: the host rings the real doorbell when it passes it. */
  writeEventIdx(index: number, value: number): void {
    this.store(this.eis, index, value);
  }

  private store(ring: QueueRing, index: number, value: number): void {
    if (!ring.locate(index)) return;
    const words = ring.words;
    if (words !== null) Atomics.store(words, index, value | 0);
    else ring.buf.writeUInt32LE(value >>> 0, ring.off);
  }
}

/** Dword index of queue `qid`'s SQ tail (and, + 1, CQ head) doorbell for DSTRD = 0. */
export function sqDoorbellIndex(qid: number): number {
  return 2 * qid;
}

export function cqDoorbellIndex(qid: number): number {
  return 2 * qid + 1;
}
