/**
 * The state the admin command set owns and the rest of the controller reads: feature values (Set /
 * Get Features, with their reset defaults), the Error Information log, and the Asynchronous Event
 * Requests with the events waiting for one. The commands themselves are in admin.ts.
 *
 * @packageDocumentation
 */
import { AerType, LogId, Status } from '../../nvme/constants';
import { ErrorLogEntry } from '../../nvme/structs';
import { writeErrorLogEntry, type ErrorRecord } from './builders';
import type { QueuedRequest } from './queues';
import { DEFERRED } from './request';

/** Temperature sensors addressable by TMPSEL: 0 = composite, 1..8. */
export const SENSORS = 9;
const DEFAULT_ARBITRATION_BURST = 3; // 2^3 = 8 commands per queue per round

/** Feature values (Set/Get Features), with their defaults for a controller reset. */
export class Features {
  arbitration = DEFAULT_ARBITRATION_BURST;
  powerState = 0;
  readonly tempOver = new Array<number>(SENSORS).fill(0);
  readonly tempUnder = new Array<number>(SENSORS).fill(0);
  errorRecovery = 0;
  writeCache = true;
  /** Interrupt coalescing: THR (7:0, 0's based) and TIME (15:8, 100 µs units). */
  coalescing = 0;
  /** Interrupt Vector Configuration: coalescing disabled, per vector. */
  readonly coalescingDisabled: Uint8Array;
  writeAtomicity = 0;
  asyncEventConfig = 0;
  #defaults: Features | null = null;

  constructor(
    readonly vectors: number,
    private readonly defaultOverTemp: number,
  ) {
    this.coalescingDisabled = new Uint8Array(vectors);
    this.reset();
  }

  /** The default values (Get Features with SEL = default or saved). */
  get defaults(): Features {
    this.#defaults ??= new Features(this.vectors, this.defaultOverTemp);
    return this.#defaults;
  }

  /** Arbitration Burst: commands taken from one SQ per round (Infinity for "no limit"). */
  get burst(): number {
    const ab = this.arbitration & 0x7;
    return ab === 7 ? Infinity : 1 << ab;
  }

  reset(): void {
    this.arbitration = DEFAULT_ARBITRATION_BURST;
    this.powerState = 0;
    this.tempOver.fill(this.defaultOverTemp);
    this.tempUnder.fill(0);
    this.errorRecovery = 0;
    this.writeCache = true;
    this.coalescing = 0;
    this.coalescingDisabled.fill(0);
    this.writeAtomicity = 0;
    this.asyncEventConfig = 0;
  }
}

/** Whether the composite temperature is over its over-threshold or under its (enabled) under-threshold. */
export function temperatureWarning(f: Features, temperature: number): boolean {
  return temperature > f.tempOver[0]! || (f.tempUnder[0]! > 0 && temperature < f.tempUnder[0]!);
}

// ---- error information log ----

/** The Error Information log: the most recent errors in a ring of ELPE + 1 entries. */
export class ErrorLog {
  /** Errors recorded since power-on (the Error Count of the newest entry). */
  count = 0;
  private readonly ring: ErrorRecord[] = [];
  private next = 0;

  constructor(readonly capacity: number) {}

  record(e: Omit<ErrorRecord, 'count'>): void {
    this.count++;
    const entry = { ...e, count: this.count };
    if (this.ring.length < this.capacity) this.ring.push(entry);
    else this.ring[this.next] = entry;
    this.next = (this.next + 1) % this.capacity;
  }

  get size(): number {
    return this.capacity * ErrorLogEntry.SIZE;
  }

  /** The entries, oldest first (device state, for migration). */
  snapshot(): ErrorRecord[] {
    const out: ErrorRecord[] = [];
    for (let i = this.ring.length - 1; i >= 0; i--) out.push({ ...this.ring[(this.next - 1 - i + 2 * this.capacity) % this.capacity]! });
    return out;
  }

  /** Takes the count and entries (oldest first) of a {@link snapshot}; the newest `capacity` are kept. */
  restore(count: number, entries: readonly ErrorRecord[]): void {
    this.ring.length = 0;
    this.next = 0;
    for (const e of entries.slice(-this.capacity)) {
      this.ring.push({ ...e });
      this.next = (this.next + 1) % this.capacity;
    }
    this.count = count;
  }

  /** Writes the log, newest entry first, into zeroed `dst` (`size` bytes). */
  write(dst: Buffer): void {
    for (let i = 0; i < this.ring.length; i++) {
      const e = this.ring[(this.next - 1 - i + this.capacity) % this.capacity]!;
      writeErrorLogEntry(dst, i * ErrorLogEntry.SIZE, e);
    }
  }
}

// ---- asynchronous events ----

interface PendingEvent {
  type: number;
  info: number;
  log: number;
}

/**
 * Asynchronous Event Requests and the events waiting for one. An event of a type is reported once;
 * further events of that type wait until the host reads the associated log page (with RAE clear).
 */
export class AsyncEvents {
  private readonly outstanding: QueuedRequest[] = [];
  private readonly queue: PendingEvent[] = [];
  /** Bit per event type: reported, log page not read yet. */
  private masked = 0;

  constructor(
    /** AERL + 1. */
    readonly limit: number,
    private readonly complete: (req: QueuedRequest, status: number) => void,
  ) {}

  get waiting(): number {
    return this.outstanding.length;
  }

  /** An Asynchronous Event Request arrived. */
  submit(req: QueuedRequest): number {
    if (this.outstanding.length >= this.limit) return Status.ASYNC_LIMIT;
    this.outstanding.push(req);
    this.deliver();
    return DEFERRED;
  }

  raise(type: number, info: number, log: number): void {
    if (this.queue.some((e) => e.type === type && e.info === info && e.log === log)) return;
    this.queue.push({ type, info, log });
    this.deliver();
  }

  /** The host read log page `lid` with RAE clear: events of its type may be reported again. */
  logRead(lid: number): void {
    if (lid === LogId.ERROR) this.masked &= ~(1 << AerType.ERROR);
    if (lid === LogId.SMART) this.masked &= ~(1 << AerType.SMART);
    this.deliver();
  }

  /** Completes an outstanding AER with Abort Requested; false if `cid` is not one. */
  abort(cid: number): boolean {
    const i = this.outstanding.findIndex((r) => r.cid === cid);
    if (i < 0) return false;
    const [req] = this.outstanding.splice(i, 1);
    this.complete(req!, Status.ABORT_REQ);
    return true;
  }

  /** Outstanding requests (their CIDs), events waiting, and the types reported but not yet read. */
  snapshot(): { outstanding: number[]; queue: { type: number; info: number; log: number }[]; masked: number } {
    return { outstanding: this.outstanding.map((r) => r.cid), queue: this.queue.map((e) => ({ ...e })), masked: this.masked };
  }

  /** Takes the state of a {@link snapshot}, with `outstanding` rebuilt as requests of the admin queue. */
  restore(outstanding: QueuedRequest[], queue: readonly { type: number; info: number; log: number }[], masked: number): void {
    this.outstanding.length = 0;
    this.outstanding.push(...outstanding);
    this.queue.length = 0;
    this.queue.push(...queue.map((e) => ({ ...e })));
    this.masked = masked;
  }

  /** Controller reset: outstanding requests are dropped without completion, events forgotten. */
  reset(): void {
    this.outstanding.length = 0;
    this.queue.length = 0;
    this.masked = 0;
  }

  private deliver(): void {
    while (this.outstanding.length > 0) {
      const i = this.queue.findIndex((e) => (this.masked & (1 << e.type)) === 0);
      if (i < 0) return;
      const [event] = this.queue.splice(i, 1);
      const req = this.outstanding.shift()!;
      this.masked |= 1 << event!.type;
      req.dw0 = (event!.type & 0x7) | ((event!.info & 0xff) << 8) | ((event!.log & 0xff) << 16);
      this.complete(req, Status.SUCCESS);
    }
  }
}
