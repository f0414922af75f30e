/**
 * How doorbell values reach the queues: trapped register writes, the polled doorbell page (mmap'd,
 * or written by ioeventfd clients), and the shadow doorbell buffer with its EventIdx (Doorbell
 * Buffer Config). Each new tail or head moves its queue; an invalid one raises an asynchronous
 * error event. While the controller is stopped, values are recorded and acted on when it runs.
 *
 * @packageDocumentation
 */
import type { DmaSpace } from '../../server/dma';
import type { PollTarget } from '../../pci/poller';
import { AerErrorInfo, AerType, LogId, Status } from '../../nvme/constants';
import type { DoorbellMode, DoorbellPage } from './doorbells';
import { ShadowDoorbells, cqDoorbellIndex, sqDoorbellIndex, type CompletionQueue, type SubmissionQueue } from './queues';
import type { QueueTable } from './queue-table';

/** What doorbell handling needs of the controller. */
export interface DoorbellHost {
  readonly dma: DmaSpace;
  /** Memory page size (CC.MPS) in bytes. */
  readonly pageSize: number;
  readonly queues: QueueTable;
  /** MSI-X delivers completions (else INTx, whose level follows the CQ heads). */
  readonly msixEnabled: boolean;
  /** Enabled, healthy and not stopped: values are acted on. */
  readonly running: boolean;
  /** Stopped but otherwise running: values are recorded for later. */
  readonly recording: boolean;
  /** Fetch and run what the submission queues hold. */
  process(): void;
  /** The host consumed completions of `cq`. */
  cqHeadMoved(cq: CompletionQueue): void;
  raiseEvent(type: number, info: number, log: number): void;
  /** The poller should look again soon. */
  wake(): void;
  trace: ((line: string) => void) | undefined;
}

export class DoorbellUpdates implements PollTarget {
  /**
   * How doorbell values arrived: `trapped` as REGION_WRITEs, `mapped` found in the shared page
   * (mmap'd, or the ioeventfds' shadow memory), `shadow` found in the shadow doorbell buffer (each
   * counts values that moved a tail or head).
   */
  readonly counts = { trapped: 0, mapped: 0, shadow: 0 };

  constructor(
    private readonly mode: DoorbellMode,
    private readonly page: DoorbellPage,
    private readonly host: DoorbellHost,
  ) {}

  /** A trapped write of `value` to doorbell dword `index`. */
  written(index: number, value: number): void {
    const host = this.host;
    if (!host.running) {
      if (host.recording) this.record(index, value);
      return;
    }
    const queues = host.queues;
    const qid = index >> 1;
    const queue = index & 1 ? queues.cqs[qid] : queues.sqs[qid];
    if (queues.shadow !== null && qid !== 0 && queue != null) {
      // With shadow doorbells a trapped write is only a wake-up. It travels as a posted message and
      // can arrive after newer values the controller already took from the shadow buffer; applying
      // it would move a tail backwards and re-run stale entries. A host that uses the shadows writes
      // them before the register, so they hold the newest value: read those instead. Only a host
      // that never touched this queue's shadow gets its register value applied.
      this.poll();
      if (queue.shadowUsed) {
        this.counts.trapped++;
        return;
      }
    }
    if ((index & 1) === 0) {
      const sq = queues.sqs[qid];
      if (sq == null) return this.invalid(AerErrorInfo.INVALID_DB_REGISTER, index, value);
      sq.lastDoorbell = value;
      if (!sq.setTail(value)) return this.invalid(AerErrorInfo.INVALID_DB_VALUE, index, value);
      this.counts.trapped++;
      host.process();
    } else {
      const cq = queues.cqs[qid];
      if (cq == null) return this.invalid(AerErrorInfo.INVALID_DB_REGISTER, index, value);
      cq.lastDoorbell = value;
      if (!cq.setHead(value)) return this.invalid(AerErrorInfo.INVALID_DB_VALUE, index, value);
      this.counts.trapped++;
      host.cqHeadMoved(cq);
    }
  }

  /** A doorbell written while stopped: the new tail or head is taken, and acted on when resumed. */
  private record(index: number, value: number): void {
    const queues = this.host.queues;
    const qid = index >> 1;
    const queue = index & 1 ? queues.cqs[qid] : queues.sqs[qid];
    if (queue == null) return this.invalid(AerErrorInfo.INVALID_DB_REGISTER, index, value);
    // With shadow doorbells in use, the shadow holds the newest value (see written).
    if (queues.shadow !== null && qid !== 0 && queue.shadowUsed) return;
    queue.lastDoorbell = value;
    const ok = index & 1 ? (queue as CompletionQueue).setHead(value) : (queue as SubmissionQueue).setTail(value);
    if (!ok) this.invalid(AerErrorInfo.INVALID_DB_VALUE, index, value);
  }

  /**
   * An ioeventfd doorbell rang: the client stored the new values into the page (their shadow
   * memory) before signalling. Running: read them as the mmap'd page is read. Stopped: take them
   * as trapped writes are taken while stopped, to act on when resumed.
   */
  rang(): void {
    const host = this.host;
    if (host.running) {
      this.poll();
      return;
    }
    if (!host.recording) return;
    const page = this.page;
    for (const sq of host.queues.activeSqs) {
      const i = sqDoorbellIndex(sq.id);
      if (page.read(i) !== sq.lastDoorbell) this.record(i, page.read(i));
    }
    for (const cq of host.queues.activeCqs) {
      const i = cqDoorbellIndex(cq.id);
      if (page.read(i) !== cq.lastDoorbell) this.record(i, page.read(i));
    }
  }

  private invalid(info: number, index: number, value: number): void {
    this.host.trace?.(`nvme: invalid doorbell ${index & 1 ? 'CQ' : 'SQ'} ${index >> 1} ${info === AerErrorInfo.INVALID_DB_REGISTER ? 'register' : `value ${value}`}`);
    this.host.raiseEvent(AerType.ERROR, info, LogId.ERROR);
  }

  /** PollTarget: reads the mmap'd doorbell page and the shadow doorbells. */
  poll(): boolean {
    const host = this.host;
    if (!host.running) return false;
    const queues = host.queues;
    let changed = false;
    if (this.mode !== 'trap') {
      const page = this.page;
      for (const sq of queues.activeSqs) {
        const v = page.read(sqDoorbellIndex(sq.id));
        if (v === sq.lastDoorbell) continue;
        sq.lastDoorbell = v;
        // A queue that uses its shadow doorbell takes its values from there (read below): the
        // register may hold an older one, as in written(). Its change is only a wake-up.
        if (sq.shadowUsed && queues.shadow !== null && sq.id !== 0) continue;
        if (sq.setTail(v)) {
          changed = true;
          this.counts.mapped++;
        } else this.invalid(AerErrorInfo.INVALID_DB_VALUE, sqDoorbellIndex(sq.id), v);
      }
      for (const cq of queues.activeCqs) {
        const v = page.read(cqDoorbellIndex(cq.id));
        if (v === cq.lastDoorbell) continue;
        cq.lastDoorbell = v;
        if (cq.shadowUsed && queues.shadow !== null && cq.id !== 0) continue;
        if (cq.setHead(v)) {
          changed = true;
          this.counts.mapped++;
          host.cqHeadMoved(cq);
        } else this.invalid(AerErrorInfo.INVALID_DB_VALUE, cqDoorbellIndex(cq.id), v);
      }
    }
    const shadow = queues.shadow;
    let trailed = false;
    if (shadow !== null) {
      for (const sq of queues.activeSqs) {
        if (sq.id === 0) continue; // the admin queue never uses shadow doorbells
        const v = shadow.read(sqDoorbellIndex(sq.id));
        if (v < 0 || v === sq.lastShadow) continue;
        sq.lastShadow = v;
        sq.shadowUsed = true;
        if (sq.setTail(v)) {
          changed = true;
          this.counts.shadow++;
          shadow.writeEventIdx(sqDoorbellIndex(sq.id), trailing(v, sq.size));
          trailed = true;
        }
      }
      for (const cq of queues.activeCqs) {
        if (cq.id !== 0 && this.refreshShadowHead(cq)) {
          changed = true;
          shadow.writeEventIdx(cqDoorbellIndex(cq.id), trailing(cq.head, cq.size));
          trailed = true;
          host.cqHeadMoved(cq);
        }
      }
    }
    // An EventIdx just behind the newest value is one the host cannot pass (a queue holds at most
    // size - 1 entries), so it stops ringing the real doorbell: a trapped write per lap of the
    // ring otherwise. That is only right while the poller keeps looking: wake it; it publishes
    // the real EventIdx again (arm) before it sleeps.
    if (trailed) host.wake();
    if (changed) host.process();
    return changed;
  }

  /** PollTarget: publish EventIdx = what we have seen, then make sure nothing slipped past. */
  arm(): boolean {
    const queues = this.host.queues;
    const shadow = queues.shadow;
    if (shadow === null || !this.host.running) return true;
    for (const sq of queues.activeSqs) if (sq.id !== 0) shadow.writeEventIdx(sqDoorbellIndex(sq.id), sq.tail);
    // A CQ head matters to us only while completions wait for room, or while INTx's level
    // follows it; otherwise the host need not ring the CQ doorbell (a message and a wake-up per
    // I/O at QD1): its head is read from the shadow when a queue looks full.
    const headless = this.host.msixEnabled;
    for (const cq of queues.activeCqs) {
      if (cq.id === 0) continue;
      const want = headless && cq.waiting.length === 0 ? trailing(cq.head, cq.size) : cq.head;
      shadow.writeEventIdx(cqDoorbellIndex(cq.id), want);
    }
    // The stores above are sequentially consistent, so this re-read cannot miss a tail the guest
    // published before it read our EventIdx.
    return !this.poll();
  }

  get pollable(): boolean {
    return this.host.running && (this.mode === 'mmap' || this.host.queues.shadow !== null);
  }

  get canSleep(): boolean {
    return this.mode !== 'mmap';
  }

  /** Reads a CQ's shadow head; true if it moved. */
  refreshShadowHead(cq: CompletionQueue): boolean {
    const shadow = this.host.queues.shadow;
    if (shadow === null) return false;
    const v = shadow.read(cqDoorbellIndex(cq.id));
    if (v < 0 || v === cq.lastShadow) return false;
    cq.lastShadow = v;
    cq.shadowUsed = true;
    if (!cq.setHead(v)) return false;
    this.counts.shadow++;
    return true;
  }

  /** A new queue's doorbell (dword `index`) starts at 0, in the page and in the shadows. */
  queueCreated(index: number): void {
    this.page.write(index, 0);
    const shadow = this.host.queues.shadow;
    if (shadow !== null) {
      shadow.writeDoorbell(index, 0);
      shadow.writeEventIdx(index, 0);
    }
  }

  /** Doorbell Buffer Config: shadow doorbells at `dbs`, EventIdx at `eis`. A status. */
  configureShadows(dbs: number, eis: number): number {
    const host = this.host;
    const ps = host.pageSize;
    if (dbs < 0 || eis < 0 || dbs % ps !== 0 || eis % ps !== 0 || dbs === eis) return Status.INVALID_FIELD;
    const shadow = new ShadowDoorbells(host.dma, dbs, eis, ps);
    if (!shadow.reachable()) return Status.INVALID_FIELD;
    host.queues.shadow = shadow;
    // Start the shadows from the doorbells' current values (the host may already use its queues).
    for (const sq of host.queues.activeSqs) {
      if (sq.id === 0) continue;
      shadow.writeDoorbell(sqDoorbellIndex(sq.id), sq.tail);
      shadow.writeEventIdx(sqDoorbellIndex(sq.id), sq.tail);
      sq.lastShadow = sq.tail;
      sq.shadowUsed = false;
    }
    for (const cq of host.queues.activeCqs) {
      if (cq.id === 0) continue;
      shadow.writeDoorbell(cqDoorbellIndex(cq.id), cq.head);
      shadow.writeEventIdx(cqDoorbellIndex(cq.id), cq.head);
      cq.lastShadow = cq.head;
      cq.shadowUsed = false;
    }
    host.trace?.(`nvme: shadow doorbells at 0x${dbs.toString(16)}, EventIdx at 0x${eis.toString(16)}`);
    host.wake();
    return Status.SUCCESS;
  }
}

/** The index one behind `value` in a ring of `size` entries. */
function trailing(value: number, size: number): number {
  return value === 0 ? size - 1 : value - 1;
}
