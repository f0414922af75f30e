/** The NVMe command loop: fetch round-robin across submission queues, run, post completions in order. */
import type { AdaptivePoller } from '../../pci/poller';
import { AdminOpcode, Status, statusCode } from '../../nvme/constants';
import { adminCommand, type AdminContext } from './admin';
import type { ErrorLog, Features } from './admin-state';
import type { DoorbellUpdates } from './doorbell-updates';
import type { CompletionInterrupts } from './interrupts';
import { ioCommand, type IoContext } from './io';
import { noteWritten } from './migration';
import type { QueueTable } from './queue-table';
import type { CompletionQueue, QueuedRequest, SubmissionQueue } from './queues';
import { DEFERRED, type HandlerResult } from './request';
import type { RamNamespaceData } from './state';

/** Commands fetched per processing pass before yielding to the event loop. */
const PASS_BUDGET = 256;

/** The controller's live state, as the loop reads it. */
export interface CommandLoopHost {
  /** Enabled, healthy and not stopped: commands are fetched. */
  readonly running: boolean;
  /** Stopped and quiet: completions wait in their CQ's queue until resumed. */
  readonly frozen: boolean;
  /** A fatal controller error (CSTS.CFS): queue memory that cannot be read or written. */
  fail(why: string): void;
}

/** The controller's parts the loop drives. */
export interface CommandLoopParts {
  /** What the admin and I/O command handlers run against (the controller). */
  readonly context: AdminContext & IoContext;
  readonly features: Features;
  readonly errors: ErrorLog;
  readonly queues: QueueTable;
  readonly doorbells: DoorbellUpdates;
  readonly interrupts: CompletionInterrupts;
  readonly poller: AdaptivePoller;
  /** The RAM namespace's migration data (its dirty log), or null for shared storage. */
  readonly ramData: RamNamespaceData | null;
  readonly blockSize: number;
  readonly trace: ((line: string) => void) | undefined;
}

export class CommandLoop {
  /** Generation: bumped by every reset; completions of older commands are dropped. */
  epoch = 0;
  /** Handlers whose promise has not settled (backend I/O, DMA in progress). */
  busy = 0;
  /** Milliseconds with {@link busy} above zero, up to the last time it fell to zero. */
  busyMs = 0;
  busySince = 0;
  /** The admin command being executed (its CID is what a deferred Delete I/O SQ is saved with). */
  executingAdmin: QueuedRequest | null = null;
  private idleWaiters: (() => void)[] = [];
  private processing = false;
  private again = false;
  private processScheduled = false;
  private readonly processLater = () => {
    this.processScheduled = false;
    this.process();
  };

  constructor(
    private readonly host: CommandLoopHost,
    private readonly parts: CommandLoopParts,
  ) {}

  /** Resolves once no handler is in flight. */
  whenIdle(): Promise<void> {
    if (this.busy === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private busyEnter(): void {
    if (this.busy++ === 0) this.busySince = performance.now();
  }

  private busyLeave(): void {
    if (--this.busy > 0) return;
    this.busyMs += performance.now() - this.busySince;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  /** Fetches and runs commands, round-robin across submission queues, until none is ready. */
  process(): void {
    if (this.processing) {
      this.again = true;
      return;
    }
    this.processing = true;
    try {
      let budget = PASS_BUDGET;
      do {
        this.again = false;
        budget = this.runQueues(budget);
      } while (this.again && budget > 0);
      if (budget <= 0) this.scheduleProcess();
    } finally {
      this.processing = false;
    }
  }

  private scheduleProcess(): void {
    if (this.processScheduled) return;
    this.processScheduled = true;
    setImmediate(this.processLater);
  }

  private runQueues(budget: number): number {
    const host = this.host;
    const queues = this.parts.queues;
    const burst = this.parts.features.burst;
    let progress = true;
    while (progress && budget > 0 && host.running) {
      progress = false;
      const list = queues.activeSqs;
      const n = list.length;
      for (let k = 0; k < n && budget > 0; k++) {
        const sq = list[(queues.rr + k) % n];
        if (sq === undefined) continue;
        let taken = 0;
        while (taken < burst && budget > 0 && sq.ready && host.running) {
          this.execute(sq);
          taken++;
          budget--;
          progress = true;
        }
      }
      if (n > 0) queues.rr = (queues.rr + 1) % n;
    }
    return budget;
  }

  private execute(sq: SubmissionQueue): void {
    const req = sq.fetch();
    if (req === null) {
      this.host.fail(`cannot read SQ ${sq.id} entry ${sq.head} at 0x${sq.iova.toString(16)}`);
      return;
    }
    req.epoch = this.epoch;
    let result: HandlerResult;
    try {
      if (sq.id === 0) {
        this.executingAdmin = req;
        result = adminCommand(this.parts.context, req);
      } else {
        result = ioCommand(this.parts.context, req);
      }
    } catch (err) {
      this.parts.trace?.(`nvme: internal error in opcode 0x${hex(req.opcode, 2)} on SQ ${sq.id}: ${(err as Error)?.stack ?? String(err)}`);
      result = Status.INTERNAL;
    }
    this.executingAdmin = null;
    if (typeof result === 'number') {
      if (result !== DEFERRED) this.finish(req, result);
      return;
    }
    this.busyEnter();
    req.onSettled ??= (status: number) => {
      this.busyLeave();
      this.finish(req, status);
    };
    req.onFailed ??= (err: unknown) => {
      this.busyLeave();
      this.parts.trace?.(`nvme: internal error in opcode 0x${hex(req.opcode, 2)} on SQ ${req.sq.id}: ${(err as Error)?.stack ?? String(err)}`);
      this.finish(req, Status.INTERNAL);
    };
    result.then(req.onSettled, req.onFailed);
  }

  /** Posts a command's completion (now, or when its CQ has room); drops it after a reset. */
  finish(req: QueuedRequest, status: number): void {
    const sq = req.sq;
    const { ramData, trace } = this.parts;
    // A migration's dirty log: data written, even by a command a reset dropped, goes again.
    if (ramData !== null && sq.id !== 0 && ramData.tracking) noteWritten(ramData, this.parts.context.dma, this.parts.blockSize, req);
    if (req.epoch !== this.epoch) {
      sq.recycle(req);
      return;
    }
    req.status = status;
    if (sq.id === 0 && trace) trace(`nvme: admin ${adminName(req.opcode)} cid=${req.cid} -> ${statusText(status)}`);
    if (status !== Status.SUCCESS) this.recordError(req, status);
    const cq = sq.cq;
    // A full CQ may have room already if the host moved its shadow head.
    if (cq.full && cq.id !== 0 && this.parts.doorbells.refreshShadowHead(cq)) this.cqHeadMoved(cq);
    if (cq.waiting.length > 0 || cq.full || this.host.frozen) {
      cq.waiting.push(req);
      return;
    }
    this.post(req);
  }

  /** The host consumed completions: post what waited for room, re-evaluate INTx. */
  cqHeadMoved(cq: CompletionQueue): void {
    if (this.host.frozen) return; // posted when resumed
    const waiting = cq.waiting;
    while (waiting.length > 0 && !cq.full) {
      const req = waiting.shift()!;
      if (!this.post(req)) return;
    }
    const interrupts = this.parts.interrupts;
    if (interrupts.intxAsserted) interrupts.updateIntx();
  }

  private post(req: QueuedRequest): boolean {
    const sq = req.sq;
    const cq = sq.cq;
    if (!cq.post(req.dw0, req.dw1, sq.head, sq.id, req.cid, req.status)) {
      this.host.fail(`cannot write CQ ${cq.id} entry ${cq.tail} at 0x${cq.iova.toString(16)}`);
      sq.recycle(req);
      return false;
    }
    const wasFull = sq.inflight >= sq.size;
    sq.recycle(req);
    if (wasFull && sq.pending > 0) this.scheduleProcess();
    if (cq.ien) this.parts.interrupts.completed(cq);
    this.parts.poller.wake();
    return true;
  }

  private recordError(req: QueuedRequest, status: number): void {
    const code = statusCode(status);
    if (code === statusCode(Status.ABORT_REQ) || code === statusCode(Status.ABORT_QUEUE)) return;
    this.parts.errors.record({ sqid: req.sq.id, cid: req.cid, status, location: 0xffff, lba: req.lba, nsid: req.nsid });
    const trace = this.parts.trace;
    if (req.sq.id !== 0 && trace) trace(`nvme: I/O opcode 0x${hex(req.opcode, 2)} cid=${req.cid} on SQ ${req.sq.id} -> ${statusText(status)}`);
  }
}

/** `v` as `width` hex digits (traces). */
export function hex(v: number, width = 8): string {
  return (v >>> 0).toString(16).padStart(width, '0');
}

const ADMIN_NAMES = new Map<number, string>(Object.entries(AdminOpcode).map(([k, v]) => [v, k]));

function adminName(opcode: number): string {
  return ADMIN_NAMES.get(opcode) ?? `0x${hex(opcode, 2)}`;
}

function statusText(status: number): string {
  if (status === Status.SUCCESS) return 'SUCCESS';
  for (const [name, value] of Object.entries(Status)) if (statusCode(value) === statusCode(status)) return `${name} (0x${hex(status, 4)})`;
  return `0x${hex(status, 4)}`;
}
