/**
 * A submission/completion queue pair in client DMA memory, as SPDK's `nvme_pcie_qpair` and Linux's
 * `nvme_queue` keep one: the rings, the SQ tail and CQ head with the phase tag, one tracker
 * ("slot") per command identifier, and per-slot PRP list pages.
 *
 * Memory: one {@link DmaMemory} range per pair, page aligned: the SQ ring (64-byte entries), the
 * CQ ring (16-byte entries), then `listPages` pages per slot for PRP lists (also used to carry a
 * command's small data, such as Identify structures or Dataset Management ranges).
 *
 * Flow control: a pair of `entries` slots admits `entries - 1` commands at a time (CIDs
 * `0..entries-2`), so the SQ can never overflow; further submissions wait in a FIFO. Doorbells
 * are batched: submissions in the same turn of the event loop ring the SQ tail doorbell once
 * (from a microtask), and each pass over the CQ writes the head doorbell once.
 *
 * Completions are found by the phase tag. The pair is driven either by MSI-X (its owner calls
 * {@link QueuePair.poll} when the vector fires) or by polling (a `setImmediate` loop that runs
 * while commands are outstanding, as an SPDK poller would).
 *
 * Two ways to submit:
 * - {@link QueuePair.submit}: a command object in, a `Promise<Completion>` out; an error status
 *   rejects with {@link NvmeError}.
 * - {@link QueuePair.submitRequest}: a caller-owned, reusable {@link NvmeRequest} with a callback:
 *   nothing is allocated per command (the perf engine's path).
 *
 * @packageDocumentation
 */
import { performance } from 'node:perf_hooks';
import { debuglog } from 'node:util';
import type { DmaMemory } from '../../client/dma';
import type { DoorbellWriter } from './doorbells';
import { NvmeAbortedError, NvmeError, NvmeTimeoutError } from './errors';
import { buildPrps, prpListPages, type DataRef, type PrpPair } from './prp';
import { cqHeadDoorbell, sqTailDoorbell } from './registers';

const debug = debuglog('vfio-user:nvme');

/** Bytes per submission and completion queue entry (CC.IOSQES 6, CC.IOCQES 4). */
export const SQE_BYTES = 64;
export const CQE_BYTES = 16;

/** The fields of a command (a submission queue entry without CID and data pointers). */
export interface NvmeCommand {
  opcode: number;
  /** Namespace identifier (0 if unused). */
  nsid?: number;
  /** Byte 1 of the SQE: FUSE (bits 1:0), PSDT (7:6, must be 0: PRPs). */
  flags?: number;
  cdw2?: number;
  cdw3?: number;
  /** Metadata pointer. */
  mptr?: number;
  cdw10?: number;
  cdw11?: number;
  cdw12?: number;
  cdw13?: number;
  cdw14?: number;
  cdw15?: number;
  /** Explicit PRP entries, for commands whose pointers are not data buffers (queue creation). */
  prp1?: number;
  prp2?: number;
}

/** Options of {@link QueuePair.submit}. */
export interface SubmitOptions {
  /** Data buffer in client DMA memory (PRPs are built for it). */
  data?: DataRef;
  /** Bytes to send to the controller through the slot's own page (at most {@link QueuePair.inlineCapacity}). */
  send?: Uint8Array;
  /** Bytes to receive from the controller through the slot's own page; returned as `Completion.data`. */
  receive?: number;
  /** Timeout in ms for this command (default: the queue's; 0 = none). */
  timeoutMs?: number;
}

/** A successful completion. */
export interface Completion {
  /** Command identifier. */
  readonly cid: number;
  /** Completion dwords 0 and 1 (command specific results). */
  readonly dw0: number;
  readonly dw1: number;
  /** What the controller sent back through the slot page (`SubmitOptions.receive`). */
  readonly data?: Buffer;
}

/**
 * A reusable command for {@link QueuePair.submitRequest}. Fill the command fields, `dataIova` and
 * `dataLength`, and `onComplete`; after completion `status` (15-bit Status Field, 0 = success),
 * `dw0`, `dw1` and `error` (a timeout or abort; then `status` is -1) hold the result. The request
 * may be submitted again from inside `onComplete`.
 */
export class NvmeRequest {
  opcode = 0;
  flags = 0;
  nsid = 0;
  cdw2 = 0;
  cdw3 = 0;
  mptr = 0;
  cdw10 = 0;
  cdw11 = 0;
  cdw12 = 0;
  cdw13 = 0;
  cdw14 = 0;
  cdw15 = 0;
  /** Data buffer (dataLength 0: none; then prp1/prp2 are used as given). */
  dataIova = 0;
  dataLength = 0;
  prp1 = 0;
  prp2 = 0;
  /** Bytes to copy into the slot page before submission (PRP1 then points at it). */
  send: Uint8Array | null = null;
  /** Bytes the controller returns in the slot page (PRP1 points at it); copied to `received`. */
  receive = 0;
  received: Buffer | null = null;
  /** Per-command timeout in ms; -1 = the queue's. */
  timeoutMs = -1;
  /** Set at completion. */
  status = 0;
  dw0 = 0;
  dw1 = 0;
  error: Error | null = null;
  /** Command identifier while outstanding, else -1. */
  cid = -1;
  /** `performance.now()` when it was written to the SQ. */
  submittedAt = 0;
  /** Free for the owner (e.g. an index into its own tables). */
  tag = 0;
  onComplete: ((req: NvmeRequest) => void) | null = null;

  /** Sets the command fields from `cmd` (others to 0). */
  set(cmd: NvmeCommand): this {
    this.opcode = cmd.opcode;
    this.flags = cmd.flags ?? 0;
    this.nsid = cmd.nsid ?? 0;
    this.cdw2 = cmd.cdw2 ?? 0;
    this.cdw3 = cmd.cdw3 ?? 0;
    this.mptr = cmd.mptr ?? 0;
    this.cdw10 = cmd.cdw10 ?? 0;
    this.cdw11 = cmd.cdw11 ?? 0;
    this.cdw12 = cmd.cdw12 ?? 0;
    this.cdw13 = cmd.cdw13 ?? 0;
    this.cdw14 = cmd.cdw14 ?? 0;
    this.cdw15 = cmd.cdw15 ?? 0;
    this.prp1 = cmd.prp1 ?? 0;
    this.prp2 = cmd.prp2 ?? 0;
    this.dataIova = 0;
    this.dataLength = 0;
    this.send = null;
    this.receive = 0;
    this.received = null;
    return this;
  }
}

/** How a queue pair learns about completions. */
export type CompletionMode = 'msix' | 'poll';

/** Where the parts of a queue pair live in its DMA range. */
export interface QueueLayout {
  readonly entries: number;
  readonly sqOffset: number;
  readonly cqOffset: number;
  readonly listOffset: number;
  /** Bytes of PRP list (and inline data) space per slot: whole pages. */
  readonly slotBytes: number;
  /** Total size of the range. */
  readonly size: number;
}

/** What a queue pair needs from its controller. */
export interface QueuePairInit {
  qid: number;
  /** Ring size in entries (2..MQES + 1); the pair admits `entries - 1` commands at once. */
  entries: number;
  /** The range laid out by {@link QueuePair.layout}. */
  memory: DmaMemory;
  layout: QueueLayout;
  /** CC.MPS page size in bytes. */
  pageSize: number;
  /** Largest data transfer per command (MDTS), in bytes. */
  maxTransfer: number;
  /** Doorbell stride in bytes (CAP.DSTRD). */
  doorbellStride: number;
  doorbells: DoorbellWriter;
  mode: CompletionMode;
  /** MSI-X vector of the CQ (mode 'msix'). */
  vector: number;
  /** Default command timeout in ms (0: none). */
  timeoutMs: number;
}

const EMPTY: Uint8Array = new Uint8Array(0);

/** One queue pair (the admin queue is qid 0). */
export class QueuePair {
  readonly qid: number;
  /** Ring size in entries. */
  readonly entries: number;
  /** Most commands outstanding at once (`entries - 1`). */
  readonly depth: number;
  readonly mode: CompletionMode;
  /** MSI-X vector (meaningful in 'msix' mode). */
  readonly vector: number;
  /** The queue's DMA range (rings and slot pages). */
  readonly memory: DmaMemory;
  readonly pageSize: number;
  readonly maxTransfer: number;
  /** Largest `send`/`receive` a command can carry in its slot page(s). */
  readonly inlineCapacity: number;

  /** DMA addresses of the rings (for Create I/O SQ/CQ and ASQ/ACQ). */
  readonly sqIova: number;
  readonly cqIova: number;

  readonly #sq: Uint32Array;
  readonly #cq: Uint32Array;
  readonly #lists: Buffer;
  readonly #listIova: number;
  readonly #slotBytes: number;
  #doorbells: DoorbellWriter;
  readonly #sqDoorbell: number;
  readonly #cqDoorbell: number;
  readonly #timeoutMs: number;

  #sqTail = 0;
  #sqHead = 0;
  #cqHead = 0;
  #phase = 1;
  #sqDirty = false;
  #flushQueued = false;
  readonly #flush = (): void => this.#flushSq();

  /** Outstanding request per CID, or null. */
  readonly #slots: (NvmeRequest | null)[];
  /** CIDs whose request timed out: reserved until the controller completes them. */
  readonly #abandoned: Uint8Array;
  readonly #free: Uint16Array;
  #freeCount: number;
  #waiting: NvmeRequest[] = [];
  #outstanding = 0;
  #polling = false;
  #pollScheduled = false;
  readonly #pollLoop = (): void => this.#pollTick();
  #sweepTimer: NodeJS.Timeout | null = null;
  #closed: Error | null = null;
  #idleWaiters: (() => void)[] = [];
  readonly #prp: PrpPair = { prp1: 0, prp2: 0 };

  /** Completions with a CID that was not outstanding (a controller bug); they are dropped. */
  spuriousCompletions = 0;
  /** Commands completed since creation. */
  completed = 0;

  /** The layout of a pair of `entries` entries whose commands move up to `maxTransfer` bytes. */
  static layout(entries: number, pageSize: number, maxTransfer: number, minSlotBytes = 0): QueueLayout {
    const roundUp = (n: number) => Math.ceil(n / pageSize) * pageSize;
    const sqOffset = 0;
    const cqOffset = roundUp(entries * SQE_BYTES);
    const listOffset = cqOffset + roundUp(entries * CQE_BYTES);
    const slotBytes = Math.max(1, prpListPages(maxTransfer, pageSize)) * pageSize;
    const slot = Math.max(slotBytes, roundUp(minSlotBytes));
    return { entries, sqOffset, cqOffset, listOffset, slotBytes: slot, size: listOffset + slot * (entries - 1) };
  }

  /** @internal Created by the controller ({@link NvmeDriver.createIoQueuePair}). */
  constructor(init: QueuePairInit) {
    const { memory, layout, entries } = init;
    this.qid = init.qid;
    this.entries = entries;
    this.depth = entries - 1;
    this.mode = init.mode;
    this.vector = init.vector;
    this.memory = memory;
    this.pageSize = init.pageSize;
    this.maxTransfer = init.maxTransfer;
    this.#doorbells = init.doorbells;
    this.#sqDoorbell = sqTailDoorbell(init.qid, init.doorbellStride);
    this.#cqDoorbell = cqHeadDoorbell(init.qid, init.doorbellStride);
    this.#timeoutMs = init.timeoutMs;
    const bytes = memory.bytes;
    this.#sq = new Uint32Array(bytes.buffer, bytes.byteOffset + layout.sqOffset, (entries * SQE_BYTES) / 4);
    this.#cq = new Uint32Array(bytes.buffer, bytes.byteOffset + layout.cqOffset, (entries * CQE_BYTES) / 4);
    this.#lists = bytes.subarray(layout.listOffset, layout.listOffset + layout.slotBytes * this.depth);
    this.#listIova = memory.iovaOf(layout.listOffset);
    this.#slotBytes = layout.slotBytes;
    this.inlineCapacity = layout.slotBytes;
    this.sqIova = memory.iovaOf(layout.sqOffset);
    this.cqIova = memory.iovaOf(layout.cqOffset);
    this.#slots = new Array<NvmeRequest | null>(this.depth).fill(null);
    this.#abandoned = new Uint8Array(this.depth);
    this.#free = new Uint16Array(this.depth);
    // Lowest CIDs on top of the stack.
    for (let i = 0; i < this.depth; i++) this.#free[i] = this.depth - 1 - i;
    this.#freeCount = this.depth;
  }

  /** Commands written to the SQ and not yet completed. */
  get outstanding(): number {
    return this.#outstanding;
  }

  /** Commands waiting for a free slot. */
  get waiting(): number {
    return this.#waiting.length;
  }

  /** True once the pair was deleted or its controller went away. */
  get closed(): boolean {
    return this.#closed !== null;
  }

  /** SQ head as last reported by the controller, SQ tail, CQ head and the expected phase. */
  get pointers(): { sqHead: number; sqTail: number; cqHead: number; phase: number } {
    return { sqHead: this.#sqHead, sqTail: this.#sqTail, cqHead: this.#cqHead, phase: this.#phase };
  }

  /**
   * Submits `cmd` and resolves with its completion.
   *
   * @throws {NvmeError} the controller completed it with an error status.
   * @throws {NvmeTimeoutError} no completion within the timeout.
   * @throws {NvmeAbortedError} the pair was deleted or the device went away first.
   * @throws {RangeError} (synchronously rejected) for a transfer above the queue's maximum or an
   * inline payload above {@link QueuePair.inlineCapacity}.
   */
  submit(cmd: NvmeCommand, options: SubmitOptions = {}): Promise<Completion> {
    const req = new NvmeRequest().set(cmd);
    if (options.data !== undefined) {
      req.dataIova = options.data.iova;
      req.dataLength = options.data.length;
    }
    req.send = options.send ?? null;
    req.receive = options.receive ?? 0;
    req.timeoutMs = options.timeoutMs ?? -1;
    return new Promise<Completion>((resolve, reject) => {
      req.onComplete = (r) => {
        if (r.error !== null) reject(r.error);
        else if (r.status !== 0) reject(new NvmeError(r.status, { qid: this.qid, cid: r.cid, opcode: r.opcode }, r.dw0));
        else resolve(r.received === null ? { cid: r.cid, dw0: r.dw0, dw1: r.dw1 } : { cid: r.cid, dw0: r.dw0, dw1: r.dw1, data: r.received });
      };
      this.submitRequest(req);
    });
  }

  /**
   * Submits a caller-owned request; `req.onComplete` runs exactly once (with a status, a timeout
   * or an abort). Allocates nothing. A request with no free slot waits in FIFO order.
   *
   * @throws {RangeError} synchronously for a transfer or inline payload that does not fit.
   */
  submitRequest(req: NvmeRequest): void {
    if (req.dataLength > this.maxTransfer) {
      throw new RangeError(`a ${String(req.dataLength)}-byte transfer exceeds the queue's maximum of ${String(this.maxTransfer)} bytes`);
    }
    const inline = Math.max(req.send?.length ?? 0, req.receive);
    if (inline > this.inlineCapacity) {
      throw new RangeError(`${String(inline)} inline bytes exceed the slot capacity of ${String(this.inlineCapacity)}`);
    }
    if (req.dataLength > 0 && inline > 0) throw new RangeError('a command carries either a data buffer or inline bytes, not both');
    req.status = 0;
    req.dw0 = 0;
    req.dw1 = 0;
    req.error = null;
    req.received = null;
    req.cid = -1;
    if (this.#closed !== null) {
      this.#finishWithError(req, this.#closed);
      return;
    }
    if (this.#freeCount === 0) {
      this.#waiting.push(req);
      return;
    }
    this.#issue(req);
  }

  /**
   * Reaps every completion the controller has posted, runs their callbacks, and writes the CQ head
   * doorbell once. Returns the number reaped. Re-entrant calls (from a callback) return 0.
   */
  poll(): number {
    if (this.#polling || this.#closed !== null) return 0;
    this.#polling = true;
    let n = 0;
    try {
      const cq = this.#cq;
      const entries = this.entries;
      for (;;) {
        const at = this.#cqHead * 4;
        const dw3 = cq[at + 3]!;
        if (((dw3 >>> 16) & 1) !== this.#phase) break;
        const dw0 = cq[at]!;
        const dw1 = cq[at + 1]!;
        const dw2 = cq[at + 2]!;
        if (++this.#cqHead === entries) {
          this.#cqHead = 0;
          this.#phase ^= 1;
        }
        const sqhd = dw2 & 0xffff;
        if (sqhd < entries) this.#sqHead = sqhd;
        n++;
        this.#complete(dw3 & 0xffff, dw3 >>> 17, dw0, dw1);
        if (this.#closed !== null) return n;
      }
      if (n > 0) this.#doorbells.write(this.#cqDoorbell, this.#cqHead);
    } finally {
      this.#polling = false;
    }
    return n;
  }

  /** @internal Writes doorbells through `writer` from now on (after a reconnect or a move). */
  setDoorbells(writer: DoorbellWriter): void {
    this.#doorbells = writer;
  }

  /**
   * @internal Rings the SQ tail and CQ head doorbells with the current values, whatever was
   * written before (a doorbell lost with a connection), then reaps what completed meanwhile.
   */
  kick(): void {
    if (this.#closed !== null) return;
    this.#doorbells.ring(this.#sqDoorbell, this.#sqTail);
    this.#doorbells.ring(this.#cqDoorbell, this.#cqHead);
    this.poll();
    if (this.mode === 'poll' && this.#outstanding > 0) this.#schedulePoll();
  }

  /** Resolves once nothing is outstanding or waiting (immediately if so now, or if closed). */
  idle(): Promise<void> {
    if ((this.#outstanding === 0 && this.#waiting.length === 0) || this.#closed !== null) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * @internal Fails every outstanding and waiting command with `error` and stops the pair. The
   * controller calls it after deleting the pair, on reset, and when the connection ends.
   */
  abort(error: Error): void {
    if (this.#closed !== null) return;
    this.#closed = error;
    this.#stopSweep();
    const waiting = this.#waiting;
    this.#waiting = [];
    for (let cid = 0; cid < this.depth; cid++) {
      const req = this.#slots[cid];
      this.#slots[cid] = null;
      this.#abandoned[cid] = 0;
      if (req != null) this.#finishWithError(req, error);
    }
    this.#outstanding = 0;
    for (const req of waiting) this.#finishWithError(req, error);
    this.#wakeIdle();
  }

  // ---- internals ----

  #issue(req: NvmeRequest): void {
    const cid = this.#free[--this.#freeCount]!;
    const listAt = cid * this.#slotBytes;
    const listIova = this.#listIova + listAt;
    let prp1 = req.prp1;
    let prp2 = req.prp2;
    if (req.dataLength > 0) {
      try {
        buildPrps(req.dataIova, req.dataLength, this.pageSize, this.#lists, listIova, this.#prp, listAt, this.#slotBytes);
      } catch (err) {
        this.#free[this.#freeCount++] = cid;
        throw err;
      }
      prp1 = this.#prp.prp1;
      prp2 = this.#prp.prp2;
    } else if (req.send !== null || req.receive > 0) {
      const send = req.send ?? EMPTY;
      this.#lists.set(send, listAt);
      if (req.receive > send.length) this.#lists.fill(0, listAt + send.length, listAt + req.receive);
      prp1 = listIova;
      prp2 = 0;
    }
    req.cid = cid;
    this.#slots[cid] = req;
    this.#outstanding++;

    const sq = this.#sq;
    const at = this.#sqTail * 16;
    sq[at] = (req.opcode & 0xff) | ((req.flags & 0xff) << 8) | (cid << 16);
    sq[at + 1] = req.nsid;
    sq[at + 2] = req.cdw2;
    sq[at + 3] = req.cdw3;
    sq[at + 4] = req.mptr % 0x1_0000_0000;
    sq[at + 5] = Math.floor(req.mptr / 0x1_0000_0000);
    sq[at + 6] = prp1 % 0x1_0000_0000;
    sq[at + 7] = Math.floor(prp1 / 0x1_0000_0000);
    sq[at + 8] = prp2 % 0x1_0000_0000;
    sq[at + 9] = Math.floor(prp2 / 0x1_0000_0000);
    sq[at + 10] = req.cdw10;
    sq[at + 11] = req.cdw11;
    sq[at + 12] = req.cdw12;
    sq[at + 13] = req.cdw13;
    sq[at + 14] = req.cdw14;
    sq[at + 15] = req.cdw15;
    if (++this.#sqTail === this.entries) this.#sqTail = 0;
    req.submittedAt = performance.now();

    this.#sqDirty = true;
    if (!this.#flushQueued) {
      this.#flushQueued = true;
      queueMicrotask(this.#flush);
    }
    if (this.#timeoutMs > 0 || req.timeoutMs > 0) this.#armSweep();
    if (this.mode === 'poll') this.#schedulePoll();
  }

  #flushSq(): void {
    this.#flushQueued = false;
    if (!this.#sqDirty || this.#closed !== null) return;
    this.#sqDirty = false;
    this.#doorbells.write(this.#sqDoorbell, this.#sqTail);
  }

  #complete(cid: number, status: number, dw0: number, dw1: number): void {
    const req = cid < this.depth ? this.#slots[cid] : null;
    if (req == null) {
      if (cid < this.depth && this.#abandoned[cid] === 1) {
        // A timed-out command finally completed: its CID is free again.
        this.#abandoned[cid] = 0;
        this.#release(cid);
      } else {
        this.spuriousCompletions++;
        debug('qid %d: completion for CID %d, which is not outstanding', this.qid, cid);
      }
      return;
    }
    this.#slots[cid] = null;
    this.#outstanding--;
    this.completed++;
    req.status = status;
    req.dw0 = dw0;
    req.dw1 = dw1;
    if (req.receive > 0) {
      const at = cid * this.#slotBytes;
      req.received = Buffer.from(this.#lists.subarray(at, at + req.receive));
    }
    this.#release(cid);
    const cb = req.onComplete;
    if (cb !== null) cb(req);
    if (this.#outstanding === 0 && this.#waiting.length === 0) this.#wakeIdle();
  }

  /** Returns `cid` to the free stack and starts the next waiting request, if any. */
  #release(cid: number): void {
    this.#free[this.#freeCount++] = cid;
    if (this.#waiting.length > 0 && this.#closed === null) {
      const next = this.#waiting.shift()!;
      try {
        this.#issue(next);
      } catch (err) {
        this.#finishWithError(next, err as Error);
      }
    }
  }

  #finishWithError(req: NvmeRequest, error: Error): void {
    req.status = -1;
    req.error = error;
    const cb = req.onComplete;
    if (cb !== null) cb(req);
  }

  #wakeIdle(): void {
    if (this.#idleWaiters.length === 0) return;
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const w of waiters) w();
  }

  // ---- polled completions ----

  #schedulePoll(): void {
    if (this.#pollScheduled || this.#closed !== null) return;
    this.#pollScheduled = true;
    setImmediate(this.#pollLoop);
  }

  #pollTick(): void {
    this.#pollScheduled = false;
    if (this.#closed !== null) return;
    this.poll();
    if (this.#outstanding > 0) this.#schedulePoll();
  }

  // ---- timeouts ----

  #armSweep(): void {
    if (this.#sweepTimer !== null) return;
    const period = Math.max(10, Math.min(1000, (this.#timeoutMs > 0 ? this.#timeoutMs : 1000) / 4));
    this.#sweepTimer = setInterval(() => this.#sweep(), period);
    this.#sweepTimer.unref();
  }

  #stopSweep(): void {
    if (this.#sweepTimer !== null) clearInterval(this.#sweepTimer);
    this.#sweepTimer = null;
  }

  #sweep(): void {
    if (this.#outstanding === 0) {
      this.#stopSweep();
      return;
    }
    const now = performance.now();
    for (let cid = 0; cid < this.depth; cid++) {
      const req = this.#slots[cid];
      if (req == null) continue;
      const limit = req.timeoutMs >= 0 ? req.timeoutMs : this.#timeoutMs;
      if (limit <= 0 || now - req.submittedAt < limit) continue;
      debug('qid %d: CID %d (opcode 0x%s) timed out after %d ms', this.qid, cid, req.opcode.toString(16), limit);
      this.#slots[cid] = null;
      this.#abandoned[cid] = 1;
      this.#outstanding--;
      this.#finishWithError(req, new NvmeTimeoutError(this.qid, cid, req.opcode, limit));
    }
    if (this.#outstanding === 0 && this.#waiting.length === 0) this.#wakeIdle();
  }
}

/** @internal The abort error for a pair that was deleted. */
export function queueDeleted(qid: number): NvmeAbortedError {
  return new NvmeAbortedError('ECANCELED', `I/O queue pair ${String(qid)} was deleted`);
}
