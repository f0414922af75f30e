/**
 * The controller's completion interrupts: one MSI-X vector per completion queue, fired once per
 * batch of completions and subject to interrupt coalescing (Set Features 08h/09h); or, while MSI-X
 * is off, INTx with level semantics: asserted while any completion queue with interrupts enabled
 * holds entries the host has not consumed, unless INTMS masks its vector.
 *
 * @packageDocumentation
 */
import type { Features } from './admin-state';
import type { CompletionQueue } from './queues';
import type { QueueTable } from './queue-table';

/** What the interrupt logic reads of the controller and its PCI function. */
export interface InterruptHost {
  readonly msixEnabled: boolean;
  /** Stopped and quiet: interrupts wait until the controller runs again. */
  readonly frozen: boolean;
  /** The INTMS register: a set bit masks the vector's INTx. */
  readonly intms: number;
  readonly features: Features;
  readonly queues: QueueTable;
  /** Takes the host's newest shadow head of `cq` (it may have consumed entries already). */
  refreshShadowHead(cq: CompletionQueue): boolean;
  interrupt(vector: number): unknown;
  setIntx(asserted: boolean): void;
}

export class CompletionInterrupts {
  /** Completions posted per vector since it last fired (coalescing threshold). */
  readonly coalesceCount: Uint32Array;
  private readonly coalesceTimers: (NodeJS.Timeout | null)[];
  /** Completion queues with entries posted since the last flush. */
  private readonly pending: CompletionQueue[] = [];
  private flushQueued = false;
  private readonly flushBound = () => this.flush();
  /** The INTx level last set. */
  intxAsserted = false;

  constructor(
    vectors: number,
    private readonly host: InterruptHost,
  ) {
    this.coalesceCount = new Uint32Array(vectors);
    this.coalesceTimers = new Array<NodeJS.Timeout | null>(vectors).fill(null);
  }

  /** `cq` got a completion: its interrupt is decided once the current batch is done. */
  completed(cq: CompletionQueue): void {
    if (cq.posted++ === 0) this.pending.push(cq);
    if (!this.flushQueued) {
      this.flushQueued = true;
      queueMicrotask(this.flushBound);
    }
  }

  /** Decides now what a queued flush would decide later (stopping). */
  flushNow(): void {
    if (this.flushQueued) this.flush();
  }

  /** Once per batch of completions: interrupt each completion queue's vector (or update INTx). */
  private flush(): void {
    this.flushQueued = false;
    const list = this.pending;
    if (list.length === 0) return;
    if (!this.host.msixEnabled) {
      for (const cq of list) cq.posted = 0;
      list.length = 0;
      this.updateIntx();
      return;
    }
    const f = this.host.features;
    for (const cq of list) {
      const n = cq.posted;
      cq.posted = 0;
      const v = cq.vector;
      const coalescing = f.coalescing & 0xffff;
      if (cq.id === 0 || coalescing === 0 || f.coalescingDisabled[v] !== 0) {
        this.fire(v);
        continue;
      }
      const threshold = (coalescing & 0xff) + 1;
      const time = coalescing >>> 8;
      this.coalesceCount[v]! += n;
      if (this.coalesceCount[v]! >= threshold || time === 0) this.fire(v);
      else if (this.coalesceTimers[v] === null) {
        // TIME is in 100 µs units; Node timers have 1 ms resolution.
        const t = setTimeout(() => this.fire(v), Math.max(1, Math.ceil(time / 10)));
        t.unref();
        this.coalesceTimers[v] = t;
      }
    }
    list.length = 0;
  }

  fire(vector: number): void {
    const t = this.coalesceTimers[vector];
    if (t) clearTimeout(t);
    this.coalesceTimers[vector] = null;
    if (this.host.frozen) return; // its completions are still outstanding: interrupted when resumed
    this.coalesceCount[vector] = 0;
    if (this.host.msixEnabled) this.host.interrupt(vector);
  }

  /** Running again: interrupt every vector whose queue holds entries the host has not consumed. */
  refire(): void {
    if (!this.host.msixEnabled) {
      this.updateIntx();
      return;
    }
    const fired = new Set<number>();
    for (const cq of this.host.queues.activeCqs) {
      if (!cq.ien || cq.outstanding === 0 || fired.has(cq.vector)) continue;
      fired.add(cq.vector);
      this.fire(cq.vector);
    }
  }

  /** INTx level: any CQ with interrupts enabled holding unconsumed entries, unless masked. */
  updateIntx(): void {
    let level = false;
    const host = this.host;
    if (!host.msixEnabled) {
      for (const cq of host.queues.activeCqs) {
        if (!cq.ien) continue;
        if (cq.id !== 0) host.refreshShadowHead(cq);
        if (cq.outstanding === 0) continue;
        if (cq.vector < 32 && ((host.intms >>> cq.vector) & 1) !== 0) continue;
        level = true;
        break;
      }
    }
    if (level === this.intxAsserted) return;
    this.intxAsserted = level;
    host.setIntx(level);
  }

  /** `cq` was deleted: it has nothing left to interrupt for. */
  forget(cq: CompletionQueue): void {
    const i = this.pending.indexOf(cq);
    if (i >= 0) this.pending.splice(i, 1);
    this.updateIntx();
  }

  /** Cancels coalescing timers (their completions stay outstanding). */
  stopTimers(): void {
    for (let v = 0; v < this.coalesceTimers.length; v++) {
      const t = this.coalesceTimers[v];
      if (t) clearTimeout(t);
      this.coalesceTimers[v] = null;
    }
  }

  /** Controller reset: no timers, no counts, nothing pending. */
  reset(): void {
    this.stopTimers();
    this.coalesceCount.fill(0);
    this.pending.length = 0;
  }
}
