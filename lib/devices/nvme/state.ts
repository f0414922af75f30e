/**
 * The NVMe controller's migration state: what it consists of, its checks, and the RAM namespace's
 * data as bulk data (docs/migration.md).
 *
 * The controller saves its state while stopped (every backend I/O it had started has finished and
 * its completion is either posted or waiting in its completion queue's queue), as plain JSON:
 * registers, the doorbell page, the shadow doorbell and EventIdx addresses, every queue (base,
 * size, head, tail, phase, vector, the doorbell values last seen, and the completions waiting for
 * room), the outstanding Asynchronous Event Requests and pending events, features, the Error
 * Information log, SMART counters and the interrupt coalescing counts. Commands still in a
 * submission queue were never fetched: the destination fetches them. So no command is lost, and
 * none is completed twice (a completion is either in guest memory, or in the state, not both).
 *
 * {@link checkNvmeState} validates everything a destination is about to apply (sizes, queue ids,
 * references between queues, ranges) and throws {@link MigrationRefusedError} before anything
 * changes.
 *
 * @packageDocumentation
 */
import * as fs from 'node:fs';
import { binding } from '../../native/binding';
import type { RamBackend } from '../../block/ram';
import type { ErrorRecord } from './builders';
import { MigrationRefusedError, arrayField, boolField, fromBase64, intField, objectField, type BulkData } from '../../server/state-stream';

/** Version of the JSON below; a destination refuses another. */
export const NVME_STATE_VERSION = 1;

export interface CompletionState {
  sq: number;
  cid: number;
  status: number;
  dw0: number;
  dw1: number;
}

export interface CqState {
  id: number;
  size: number;
  iova: number;
  vector: number;
  ien: boolean;
  head: number;
  tail: number;
  phase: number;
  lastDoorbell: number;
  lastShadow: number;
  shadowUsed: boolean;
  /** Completions that were waiting for room, in order. */
  waiting: CompletionState[];
}

export interface SqState {
  id: number;
  size: number;
  iova: number;
  cq: number;
  head: number;
  tail: number;
  lastDoorbell: number;
  lastShadow: number;
  shadowUsed: boolean;
  /** CID of a Delete I/O Submission Queue waiting for this queue's commands, or null. */
  deleting: number | null;
}

export interface FeatureState {
  arbitration: number;
  powerState: number;
  tempOver: number[];
  tempUnder: number[];
  errorRecovery: number;
  writeCache: boolean;
  coalescing: number;
  coalescingDisabled: number[];
  writeAtomicity: number;
  asyncEventConfig: number;
}

export interface NvmeState {
  version: number;
  regs: { cc: number; csts: number; aqa: number; asq: number[]; acq: number[]; intms: number; pageSize: number };
  /** The doorbell page (base64): trapped values, or the shared page as the client left it. */
  doorbells: string;
  shadow: { dbs: number; eis: number } | null;
  /** Queues in creation (round-robin) order, admin first. */
  cqs: CqState[];
  sqs: SqState[];
  rr: number;
  features: FeatureState;
  events: { outstanding: number[]; queue: { type: number; info: number; log: number }[]; masked: number };
  errors: { count: number; entries: ErrorRecord[] };
  stats: { units512Read: number; units512Written: number; hostReads: number; hostWrites: number; mediaErrors: number; unsafeShutdowns: number };
  criticalWarning: number;
  /** Completions counted towards each vector's coalescing threshold. */
  coalesce: number[];
}

/** What the checks need to know of the controller that loads the state. */
export interface StateLimits {
  /** I/O queues (highest qid). */
  queues: number;
  /** Largest queue in entries. */
  maxQueueEntries: number;
  /** MSI-X vectors. */
  vectors: number;
  /** Outstanding AER limit (AERL + 1). */
  aerLimit: number;
  /** Error log capacity. */
  errorCapacity: number;
  /** Temperature thresholds per feature. */
  sensors: number;
  /** Bytes of the doorbell page. */
  doorbellBytes: number;
}

const U32 = 0xffff_ffff;
const SAFE = Number.MAX_SAFE_INTEGER;

/** Checks `value` (a STATE record's `device` part) against `limits`; the parsed state, or throws. */
export function checkNvmeState(value: unknown, limits: StateLimits): NvmeState {
  const s = objectField(value, 'nvme');
  if (s.version !== NVME_STATE_VERSION) throw new MigrationRefusedError(`nvme state version ${JSON.stringify(s.version)}; this server reads ${NVME_STATE_VERSION}`);
  const r = objectField(s.regs, 'nvme.regs');
  const pageSize = intField(r.pageSize, 'nvme.regs.pageSize', 4096, 2 ** 27);
  if ((pageSize & (pageSize - 1)) !== 0) throw new MigrationRefusedError(`nvme.regs.pageSize ${pageSize} is not a power of two`);
  const pair = (v: unknown, what: string): number[] => {
    const a = arrayField(v, what, 2);
    if (a.length !== 2) throw new MigrationRefusedError(`${what}: expected two dwords`);
    return [intField(a[0], what), intField(a[1], what)];
  };
  const regs = {
    cc: intField(r.cc, 'nvme.regs.cc', 0, U32),
    csts: intField(r.csts, 'nvme.regs.csts', 0, U32),
    aqa: intField(r.aqa, 'nvme.regs.aqa', 0, U32),
    asq: pair(r.asq, 'nvme.regs.asq'),
    acq: pair(r.acq, 'nvme.regs.acq'),
    intms: intField(r.intms, 'nvme.regs.intms', 0, U32),
    pageSize,
  };
  fromBase64(s.doorbells, limits.doorbellBytes, 'nvme.doorbells');
  let shadow: NvmeState['shadow'] = null;
  if (s.shadow !== null) {
    const sh = objectField(s.shadow, 'nvme.shadow');
    shadow = { dbs: intField(sh.dbs, 'nvme.shadow.dbs', 0, SAFE), eis: intField(sh.eis, 'nvme.shadow.eis', 0, SAFE) };
  }

  const maxQ = limits.queues;
  const cqs: CqState[] = [];
  const cqIds = new Set<number>();
  for (const [i, v] of arrayField(s.cqs, 'nvme.cqs', maxQ + 1).entries()) {
    const q = objectField(v, `nvme.cqs[${i}]`);
    const w = `nvme.cqs[${i}]`;
    const id = intField(q.id, `${w}.id`, 0, maxQ);
    if (cqIds.has(id)) throw new MigrationRefusedError(`${w}: CQ ${id} twice`);
    cqIds.add(id);
    const size = intField(q.size, `${w}.size`, 2, id === 0 ? 4096 : limits.maxQueueEntries);
    const cq: CqState = {
      id,
      size,
      iova: intField(q.iova, `${w}.iova`, 0, SAFE),
      vector: intField(q.vector, `${w}.vector`, 0, Math.max(0, limits.vectors - 1)),
      ien: boolField(q.ien, `${w}.ien`),
      head: intField(q.head, `${w}.head`, 0, size - 1),
      tail: intField(q.tail, `${w}.tail`, 0, size - 1),
      phase: intField(q.phase, `${w}.phase`, 0, 1),
      lastDoorbell: intField(q.lastDoorbell, `${w}.lastDoorbell`),
      lastShadow: intField(q.lastShadow, `${w}.lastShadow`),
      shadowUsed: boolField(q.shadowUsed, `${w}.shadowUsed`),
      waiting: [],
    };
    for (const [k, c] of arrayField(q.waiting, `${w}.waiting`, 65536).entries()) {
      const e = objectField(c, `${w}.waiting[${k}]`);
      cq.waiting.push({
        sq: intField(e.sq, `${w}.waiting[${k}].sq`, 0, maxQ),
        cid: intField(e.cid, `${w}.waiting[${k}].cid`, 0, 0xffff),
        status: intField(e.status, `${w}.waiting[${k}].status`, 0, 0x7fff),
        dw0: intField(e.dw0, `${w}.waiting[${k}].dw0`),
        dw1: intField(e.dw1, `${w}.waiting[${k}].dw1`),
      });
    }
    cqs.push(cq);
  }
  const sqs: SqState[] = [];
  const sqIds = new Set<number>();
  for (const [i, v] of arrayField(s.sqs, 'nvme.sqs', maxQ + 1).entries()) {
    const q = objectField(v, `nvme.sqs[${i}]`);
    const w = `nvme.sqs[${i}]`;
    const id = intField(q.id, `${w}.id`, 0, maxQ);
    if (sqIds.has(id)) throw new MigrationRefusedError(`${w}: SQ ${id} twice`);
    sqIds.add(id);
    const size = intField(q.size, `${w}.size`, 2, id === 0 ? 4096 : limits.maxQueueEntries);
    const cq = intField(q.cq, `${w}.cq`, 0, maxQ);
    if (!cqIds.has(cq) || (id === 0) !== (cq === 0)) throw new MigrationRefusedError(`${w}: SQ ${id} posts to CQ ${cq}, which does not exist or does not match`);
    sqs.push({
      id,
      size,
      iova: intField(q.iova, `${w}.iova`, 0, SAFE),
      cq,
      head: intField(q.head, `${w}.head`, 0, size - 1),
      tail: intField(q.tail, `${w}.tail`, 0, size - 1),
      lastDoorbell: intField(q.lastDoorbell, `${w}.lastDoorbell`),
      lastShadow: intField(q.lastShadow, `${w}.lastShadow`),
      shadowUsed: boolField(q.shadowUsed, `${w}.shadowUsed`),
      deleting: q.deleting === null ? null : intField(q.deleting, `${w}.deleting`, 0, 0xffff),
    });
  }
  // Waiting completions name an SQ that posts to that CQ.
  for (const cq of cqs) {
    for (const c of cq.waiting) {
      const sq = sqs.find((q) => q.id === c.sq);
      if (sq === undefined || sq.cq !== cq.id) throw new MigrationRefusedError(`nvme: a completion waiting in CQ ${cq.id} names SQ ${c.sq}, which does not post there`);
    }
  }
  if ((sqs.length === 0) !== (cqs.length === 0) || (sqs.length > 0 && (sqs[0]!.id !== 0 || cqs[0]!.id !== 0))) {
    throw new MigrationRefusedError('nvme: queues without the admin queue pair first');
  }

  const f = objectField(s.features, 'nvme.features');
  const temps = (v: unknown, what: string): number[] => {
    const a = arrayField(v, what, limits.sensors);
    if (a.length !== limits.sensors) throw new MigrationRefusedError(`${what}: expected ${limits.sensors} thresholds`);
    return a.map((t, k) => intField(t, `${what}[${k}]`, 0, 0xffff));
  };
  const disabled = arrayField(f.coalescingDisabled, 'nvme.features.coalescingDisabled', limits.vectors);
  if (disabled.length !== limits.vectors) throw new MigrationRefusedError(`nvme.features.coalescingDisabled: expected ${limits.vectors} entries`);
  const features: FeatureState = {
    arbitration: intField(f.arbitration, 'nvme.features.arbitration'),
    powerState: intField(f.powerState, 'nvme.features.powerState'),
    tempOver: temps(f.tempOver, 'nvme.features.tempOver'),
    tempUnder: temps(f.tempUnder, 'nvme.features.tempUnder'),
    errorRecovery: intField(f.errorRecovery, 'nvme.features.errorRecovery'),
    writeCache: boolField(f.writeCache, 'nvme.features.writeCache'),
    coalescing: intField(f.coalescing, 'nvme.features.coalescing'),
    coalescingDisabled: disabled.map((d, k) => intField(d, `nvme.features.coalescingDisabled[${k}]`, 0, 1)),
    writeAtomicity: intField(f.writeAtomicity, 'nvme.features.writeAtomicity'),
    asyncEventConfig: intField(f.asyncEventConfig, 'nvme.features.asyncEventConfig'),
  };

  const e = objectField(s.events, 'nvme.events');
  const events = {
    outstanding: arrayField(e.outstanding, 'nvme.events.outstanding', limits.aerLimit).map((c, k) => intField(c, `nvme.events.outstanding[${k}]`, 0, 0xffff)),
    queue: arrayField(e.queue, 'nvme.events.queue', 256).map((q, k) => {
      const o = objectField(q, `nvme.events.queue[${k}]`);
      return { type: intField(o.type, 'nvme.events.type', 0, 7), info: intField(o.info, 'nvme.events.info', 0, 0xff), log: intField(o.log, 'nvme.events.log', 0, 0xff) };
    }),
    masked: intField(e.masked, 'nvme.events.masked', 0, 0xff),
  };
  if (events.outstanding.length > 0 && !sqIds.has(0)) throw new MigrationRefusedError('nvme: outstanding AERs without an admin queue');

  const er = objectField(s.errors, 'nvme.errors');
  const errors = {
    count: intField(er.count, 'nvme.errors.count', 0, SAFE),
    entries: arrayField(er.entries, 'nvme.errors.entries', limits.errorCapacity).map((x, k) => {
      const o = objectField(x, `nvme.errors.entries[${k}]`);
      const w = `nvme.errors.entries[${k}]`;
      return {
        count: intField(o.count, `${w}.count`, 0, SAFE),
        sqid: intField(o.sqid, `${w}.sqid`, 0, 0xffff),
        cid: intField(o.cid, `${w}.cid`, 0, 0xffff),
        status: intField(o.status, `${w}.status`, 0, 0xffff),
        location: intField(o.location, `${w}.location`, 0, 0xffff),
        lba: intField(o.lba, `${w}.lba`, 0, SAFE),
        nsid: intField(o.nsid, `${w}.nsid`),
      };
    }),
  };

  const st = objectField(s.stats, 'nvme.stats');
  const stats = {
    units512Read: intField(st.units512Read, 'nvme.stats.units512Read', 0, SAFE),
    units512Written: intField(st.units512Written, 'nvme.stats.units512Written', 0, SAFE),
    hostReads: intField(st.hostReads, 'nvme.stats.hostReads', 0, SAFE),
    hostWrites: intField(st.hostWrites, 'nvme.stats.hostWrites', 0, SAFE),
    mediaErrors: intField(st.mediaErrors, 'nvme.stats.mediaErrors', 0, SAFE),
    unsafeShutdowns: intField(st.unsafeShutdowns, 'nvme.stats.unsafeShutdowns', 0, SAFE),
  };
  const coalesce = arrayField(s.coalesce, 'nvme.coalesce', limits.vectors).map((c, k) => intField(c, `nvme.coalesce[${k}]`));
  if (coalesce.length !== limits.vectors) throw new MigrationRefusedError(`nvme.coalesce: expected ${limits.vectors} entries`);
  return {
    version: NVME_STATE_VERSION,
    regs,
    doorbells: s.doorbells as string,
    shadow,
    cqs,
    sqs,
    rr: intField(s.rr, 'nvme.rr', 0, maxQ + 1),
    features,
    events,
    errors,
    stats,
    criticalWarning: intField(s.criticalWarning, 'nvme.criticalWarning', 0, 0xff),
    coalesce,
  };
}

// ---- the RAM namespace's blocks as bulk data ----

/** Most tracking granules for one namespace (the granule grows with the disk to stay within this). */
const MAX_GRANULES = 1 << 20;

/**
 * A RAM namespace's data, migrated iteratively ({@link BulkData}). Writes are logged by the
 * controller when their commands complete ({@link RamNamespaceData.mark}); reads for the stream go
 * through the memfd with pread, so holes read as zeroes without taking memory.
 */
export class RamNamespaceData implements BulkData {
  readonly size: number;
  readonly granule: number;
  private log: Uint8Array | null = null;
  private readonly bytes: number;

  constructor(private readonly backend: RamBackend) {
    this.size = backend.size;
    let g = 4096;
    while (Math.ceil(this.size / g) > MAX_GRANULES) g *= 2;
    this.granule = g;
    this.bytes = Math.ceil(Math.ceil(this.size / g) / 8);
  }

  /** True while a saving session logs writes. */
  get tracking(): boolean {
    return this.log !== null;
  }

  startTracking(): void {
    this.log = new Uint8Array(this.bytes);
  }

  stopTracking(): void {
    this.log = null;
  }

  /** Bytes `[offset, offset + length)` were written (clamped to the namespace). */
  mark(offset: number, length: number): void {
    const log = this.log;
    if (log === null || length <= 0) return;
    const end = Math.min(this.size, offset + length);
    if (offset >= end) return;
    const g = this.granule;
    const last = Math.floor((end - 1) / g);
    for (let k = Math.floor(offset / g); k <= last; k++) log[k >> 3] = log[k >> 3]! | (1 << (k & 7));
  }

  /** Everything is dirty (a write whose range could not be learned). */
  markAll(): void {
    this.log?.fill(0xff);
  }

  takeDirty(): Uint8Array {
    const out = this.log ?? new Uint8Array(this.bytes);
    if (this.log !== null) this.log = new Uint8Array(this.bytes);
    const granules = Math.ceil(this.size / this.granule);
    if (granules % 8 !== 0) out[out.length - 1]! &= (1 << (granules % 8)) - 1;
    return out;
  }

  read(offset: number, dst: Buffer): void {
    const fd = this.backend.fd.value;
    for (let done = 0; done < dst.length; ) {
      const n = fs.readSync(fd, dst, done, dst.length - done, offset + done);
      if (n <= 0) {
        dst.fill(0, done);
        return;
      }
      done += n;
    }
  }

  /** Straight into the memfd (also for a read-only namespace: migration fills it like a loader). */
  write(offset: number, src: Buffer): void {
    this.backend.view(offset, src.length).set(src);
  }

  zero(offset: number, length: number): void {
    if (length > 0) binding.punchHole(this.backend.fd.value, offset, length);
  }
}
