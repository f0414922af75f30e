/**
 * The controller's side of migration: its state taken from its queues, features, logs and counters
 * (and given back to them on the destination), and the dirty log of the blocks that completed
 * writes changed while a RAM namespace is being sent. The state's format and checks are state.ts.
 *
 * @packageDocumentation
 */
import type { DmaSpace } from '../../server/dma';
import { Dsm } from '../../nvme/commands';
import { AdminOpcode, IoOpcode, Status } from '../../nvme/constants';
import type { AsyncEvents, ErrorLog, Features } from './admin-state';
import type { CompletionInterrupts } from './interrupts';
import { copyFromGuestSync } from './prp';
import { CompletionQueue, ShadowDoorbells, SubmissionQueue, type QueuedRequest } from './queues';
import type { QueueTable } from './queue-table';
import { NVME_STATE_VERSION, type CqState, type NvmeState, type RamNamespaceData, type SqState } from './state';
import { Sqe } from '../../nvme/structs';

/** The parts of a controller whose state migrates. */
export interface MigratingParts {
  readonly dma: DmaSpace;
  readonly queues: QueueTable;
  readonly features: Features;
  readonly events: AsyncEvents;
  readonly errors: ErrorLog;
  readonly stats: NvmeState['stats'];
  readonly irqs: CompletionInterrupts;
}

/** The controller's state, taken while stopped; `own` is what the controller itself holds. */
export function saveState(p: MigratingParts, own: Pick<NvmeState, 'regs' | 'doorbells' | 'criticalWarning'>): NvmeState {
  const waitingOf = (cq: CompletionQueue) => cq.waiting.map((r) => ({ sq: r.sq.id, cid: r.cid, status: r.status, dw0: r.dw0 >>> 0, dw1: r.dw1 >>> 0 }));
  const queues = p.queues;
  const cqs: CqState[] = queues.activeCqs.map((cq) => ({
    id: cq.id,
    size: cq.size,
    iova: cq.iova,
    vector: cq.vector,
    ien: cq.ien,
    head: cq.head,
    tail: cq.tail,
    phase: cq.phase,
    lastDoorbell: cq.lastDoorbell >>> 0,
    lastShadow: cq.lastShadow >>> 0,
    shadowUsed: cq.shadowUsed,
    waiting: waitingOf(cq),
  }));
  const sqs: SqState[] = queues.activeSqs.map((sq) => ({
    id: sq.id,
    size: sq.size,
    iova: sq.iova,
    cq: sq.cq.id,
    head: sq.head,
    tail: sq.tail,
    lastDoorbell: sq.lastDoorbell >>> 0,
    lastShadow: sq.lastShadow >>> 0,
    shadowUsed: sq.shadowUsed,
    deleting: queues.deletions.get(sq) ?? null,
  }));
  const f = p.features;
  const events = p.events.snapshot();
  return {
    version: NVME_STATE_VERSION,
    regs: own.regs,
    doorbells: own.doorbells,
    shadow: queues.shadow === null ? null : { dbs: queues.shadow.dbsIova, eis: queues.shadow.eisIova },
    cqs,
    sqs,
    rr: queues.rr,
    features: {
      arbitration: f.arbitration,
      powerState: f.powerState,
      tempOver: [...f.tempOver],
      tempUnder: [...f.tempUnder],
      errorRecovery: f.errorRecovery,
      writeCache: f.writeCache,
      coalescing: f.coalescing,
      coalescingDisabled: [...f.coalescingDisabled],
      writeAtomicity: f.writeAtomicity,
      asyncEventConfig: f.asyncEventConfig,
    },
    events,
    errors: { count: p.errors.count, entries: p.errors.snapshot() },
    stats: { ...p.stats },
    criticalWarning: own.criticalWarning,
    coalesce: [...p.irqs.coalesceCount],
  };
}

/**
 * Gives a checked state back to the parts of a controller just reset: its queues, the commands
 * that were in flight on the source (stamped with `epoch`), features, logs and counters. A Delete
 * I/O SQ that was waiting for its queue goes on waiting through `resumeDeletion`.
 */
export function restoreState(p: MigratingParts, s: NvmeState, epoch: number, resumeDeletion: (sq: SubmissionQueue, req: QueuedRequest) => void): void {
  const dma = p.dma;
  const queues = p.queues;
  for (const q of s.cqs) {
    const cq = new CompletionQueue(dma, q.id, q.size, q.iova, q.vector, q.ien);
    cq.head = q.head;
    cq.tail = q.tail;
    cq.phase = q.phase;
    cq.lastDoorbell = q.lastDoorbell;
    cq.lastShadow = q.lastShadow;
    cq.shadowUsed = q.shadowUsed;
    queues.addCq(cq);
  }
  for (const q of s.sqs) {
    const cq = queues.cqs[q.cq]!;
    const sq = new SubmissionQueue(dma, q.id, q.size, q.iova, cq, Sqe.SIZE);
    sq.head = q.head;
    sq.tail = q.tail;
    sq.lastDoorbell = q.lastDoorbell;
    sq.lastShadow = q.lastShadow;
    sq.shadowUsed = q.shadowUsed;
    queues.addSq(sq);
  }
  queues.rr = s.rr % Math.max(1, queues.activeSqs.length);
  // Commands that were in flight on the source: completions waiting for room, outstanding AERs,
  // Delete I/O SQ commands waiting for their queue's commands.
  for (const q of s.cqs) {
    const cq = queues.cqs[q.id]!;
    for (const c of q.waiting) {
      const req = queues.sqs[c.sq]!.restoreRequest(c.cid, 0);
      req.epoch = epoch;
      req.status = c.status;
      req.dw0 = c.dw0;
      req.dw1 = c.dw1;
      cq.waiting.push(req);
    }
  }
  const admin = queues.sqs[0];
  const aers =
    admin == null
      ? []
      : s.events.outstanding.map((cid) => {
          const req = admin.restoreRequest(cid, AdminOpcode.ASYNC_EVENT);
          req.epoch = epoch;
          return req;
        });
  p.events.restore(aers, s.events.queue, s.events.masked);
  for (const q of s.sqs) {
    if (q.deleting === null || admin == null) continue;
    const req = admin.restoreRequest(q.deleting, AdminOpcode.DELETE_SQ);
    req.epoch = epoch;
    req.cdw10 = q.id;
    resumeDeletion(queues.sqs[q.id]!, req);
  }
  queues.shadow = s.shadow === null ? null : new ShadowDoorbells(dma, s.shadow.dbs, s.shadow.eis, s.regs.pageSize);
  const f = p.features;
  f.arbitration = s.features.arbitration;
  f.powerState = s.features.powerState;
  s.features.tempOver.forEach((v, i) => (f.tempOver[i] = v));
  s.features.tempUnder.forEach((v, i) => (f.tempUnder[i] = v));
  f.errorRecovery = s.features.errorRecovery;
  f.writeCache = s.features.writeCache;
  f.coalescing = s.features.coalescing;
  f.coalescingDisabled.set(s.features.coalescingDisabled);
  f.writeAtomicity = s.features.writeAtomicity;
  f.asyncEventConfig = s.features.asyncEventConfig;
  p.errors.restore(s.errors.count, s.errors.entries);
  Object.assign(p.stats, s.stats);
  p.irqs.coalesceCount.set(s.coalesce);
}

/** Scratch for a Dataset Management range list re-read for the dirty log. */
const dsmScratch = Buffer.alloc(Dsm.MAX_RANGES * Dsm.RANGE_BYTES);

/** Logs the blocks a completed I/O command may have changed (RAM namespace, while migrating). */
export function noteWritten(data: RamNamespaceData, dma: DmaSpace, blockSize: number, req: QueuedRequest): void {
  const op = req.opcode;
  if (op === IoOpcode.WRITE || op === IoOpcode.WRITE_ZEROES) {
    if (req.cdw11 > 0x1f_ffff) return;
    const slba = req.cdw11 * 0x1_0000_0000 + req.cdw10;
    data.mark(slba * blockSize, ((req.cdw12 & 0xffff) + 1) * blockSize);
  } else if (op === IoOpcode.DSM && (req.cdw11 & Dsm.AD) !== 0) {
    // The ranges are still in guest memory; if they cannot be read now, everything goes again.
    const count = (req.cdw10 & 0xff) + 1;
    const list = dsmScratch.subarray(0, count * Dsm.RANGE_BYTES);
    if (req.segs.count === 0 || copyFromGuestSync(dma, req.segs, list) !== Status.SUCCESS) {
      data.markAll();
      return;
    }
    for (let i = 0; i < count; i++) {
      const at = i * Dsm.RANGE_BYTES;
      const hi = list.readUInt32LE(at + 12);
      if (hi > 0x1f_ffff) continue;
      data.mark((hi * 0x1_0000_0000 + list.readUInt32LE(at + 8)) * blockSize, list.readUInt32LE(at + 4) * blockSize);
    }
  }
}
