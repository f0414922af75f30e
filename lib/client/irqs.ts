/**
 * Interrupts on the client side (reference §3.7, §3.8, §6.6; peers.md §2).
 *
 * The client owns routing: for every vector it wants, it creates an eventfd and hands it to the
 * server with `DEVICE_SET_IRQS` (DATA_EVENTFD | ACTION_TRIGGER), several messages when there are
 * more vectors than the server's `max_msg_fds`. The server interrupts by signalling that eventfd;
 * a watcher here drains it and reports `{ index, vector, count }` (`count` > 1 when signals
 * collapsed before we read). Masking, unmasking and software triggering are `DEVICE_SET_IRQS`
 * actions with DATA_NONE (every vector of the range) or DATA_BOOL (one byte per vector: only the
 * vectors whose byte is 1); disabling an index is `count` 0 with NONE | TRIGGER. MASK and UNMASK
 * also take eventfds (DATA_EVENTFD): the client signals them instead of sending a message, as KVM's
 * resampler signals the INTx resample (unmask) fd on end of interrupt.
 *
 * @packageDocumentation
 */
import { debuglog } from 'node:util';
import { EventFd } from '../native/eventfd';
import { Command, IrqSetFlags } from '../protocol/constants';
import { encodeSetIrqsRequest, decodeSetIrqsReply, type IrqInfo } from '../protocol/messages/irq';

const debug = debuglog('vfio-user:client');

/** One interrupt: `count` signals of vector `vector` of IRQ index `index` since the last event. */
export interface IrqEvent {
  readonly index: number;
  readonly vector: number;
  readonly count: number;
}

/** What one IRQ index supports (reference §3.7). */
export interface IrqIndexInfo {
  /** IRQ index (0 INTx, 1 MSI, 2 MSI-X, 3 ERR, 4 REQ). */
  readonly index: number;
  /** {@link IrqInfoFlags} (EVENTFD, MASKABLE, AUTOMASKED, NORESIZE). */
  readonly flags: number;
  /** Number of vectors; 0 = not supported. */
  readonly count: number;
}

/** Options of {@link IrqChannels.events}. */
export interface IrqEventsOptions {
  /** Only events of this IRQ index. */
  index?: number;
  /** Only events of this vector. */
  vector?: number;
}

/** @internal What the IRQ channels need from the client. */
export interface IrqCore {
  /** Sends a command expecting an empty reply. */
  call(command: number, body: Uint8Array, fds: readonly number[] | null): Promise<Buffer>;
  /** Most fds the server accepts per message. */
  readonly maxSendFds: number;
  /** Called for every interrupt received. */
  onIrq(event: IrqEvent): void;
}

type Subscriber = (event: IrqEvent) => void;

/** The action an eventfd of {@link IrqChannels.setActionEventfds} stands for. */
export type IrqAction = 'mask' | 'unmask';

/** Vectors a range applies to: a count (DATA_NONE), or one boolean per vector (DATA_BOOL). */
export type IrqSelection = number | readonly boolean[];

/** Largest vector count any PCI index can have (MSI-X: 2048); larger claims are not believed. */
export const MAX_IRQ_VECTORS = 2048;

/**
 * The eventfds of every IRQ index and the events they produce. Reached as
 * {@link VfioUserClient.irqs}; the client's `enableIrqs`/`disableIrqs`/... delegate here.
 */
export class IrqChannels {
  readonly #infos: readonly IrqIndexInfo[];
  readonly #fds: (EventFd | null)[][];
  readonly #actionFds: Record<IrqAction, (EventFd | null)[][]>;
  readonly #counts: number[][];
  readonly #subscribers = new Set<Subscriber>();
  readonly #enders = new Set<() => void>();
  #closed = false;

  /** @internal */
  constructor(
    infos: readonly IrqIndexInfo[],
    private readonly core: IrqCore,
  ) {
    this.#infos = infos;
    this.#fds = infos.map((i) => new Array<EventFd | null>(i.count).fill(null));
    this.#actionFds = {
      mask: infos.map((i) => new Array<EventFd | null>(i.count).fill(null)),
      unmask: infos.map((i) => new Array<EventFd | null>(i.count).fill(null)),
    };
    this.#counts = infos.map((i) => new Array<number>(i.count).fill(0));
  }

  /** What the server reported for each IRQ index. */
  get info(): readonly IrqIndexInfo[] {
    return this.#infos;
  }

  /** Vectors of `index` that currently have an eventfd. */
  enabledVectors(index: number): number[] {
    const fds = this.#fds[index] ?? [];
    const out: number[] = [];
    fds.forEach((fd, v) => {
      if (fd !== null) out.push(v);
    });
    return out;
  }

  /** Signals received so far on vector `vector` of `index` (summing collapsed signals). */
  received(index: number, vector: number): number {
    return this.#counts[index]?.[vector] ?? 0;
  }

  /**
   * Gives vectors `[start, start + count)` of `index` fresh eventfds (SET_IRQS EVENTFD | TRIGGER),
   * replacing any they had, split into messages of at most the server's `max_msg_fds` fds.
   *
   * @throws {RangeError} for an index or vector range the server did not report, or a server
   * that accepts no fds.
   * @throws {VfioUserError} if the server refuses; the vectors of the range are then left without
   * eventfds (disable and enable again).
   */
  async enable(index: number, count: number, start = 0): Promise<void> {
    this.#checkRange(index, start, count, 1);
    const perMessage = this.core.maxSendFds;
    if (perMessage < 1) throw new RangeError('the server accepts no file descriptors (max_msg_fds 0): eventfds cannot be passed');
    const fresh: EventFd[] = [];
    try {
      for (let i = 0; i < count; i++) fresh.push(EventFd.create());
    } catch (err) {
      for (const e of fresh) e.close();
      throw err;
    }
    const calls: Promise<Buffer>[] = [];
    for (let i = 0; i < count; i += perMessage) {
      const n = Math.min(perMessage, count - i);
      const body = encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, index, start: start + i, count: n });
      calls.push(this.core.call(Command.DEVICE_SET_IRQS, body, fresh.slice(i, i + n).map((e) => e.fd.value)).then(checkEmpty));
    }
    const failure = await firstFailure(calls);
    const table = this.#fds[index]!;
    if (failure !== null || this.#closed) {
      for (const e of fresh) e.close();
      // The server may hold some of the new fds (now dead) for part of the range: forget the old ones.
      for (let v = start; v < start + count; v++) this.#replace(table, v, null);
      if (failure !== null) throw failure;
      return;
    }
    fresh.forEach((efd, i) => {
      const vector = start + i;
      this.#replace(table, vector, efd);
      efd.watch((n, err) => this.#signalled(index, vector, n, err));
    });
  }

  /**
   * Disables interrupts of `index`. Without a range: SET_IRQS NONE | TRIGGER with `count` 0 (every
   * vector of the index, as QEMU does). With a range: EVENTFD | TRIGGER without fds (de-assign).
   * Our eventfds are closed whatever the server answers.
   *
   * @throws {VfioUserError} if the server refuses.
   */
  async disable(index: number, range?: { start: number; count: number }): Promise<void> {
    let start = 0;
    let count = 0;
    let flags = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER;
    if (range !== undefined) {
      ({ start, count } = range);
      this.#checkRange(index, start, count, 1);
      flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER;
    } else {
      this.#checkRange(index, 0, 0, 0);
    }
    try {
      await this.core.call(Command.DEVICE_SET_IRQS, encodeSetIrqsRequest({ flags, index, start, count }), null).then(checkEmpty);
    } finally {
      const table = this.#fds[index]!;
      const end = range === undefined ? table.length : start + count;
      for (let v = start; v < end; v++) this.#replace(table, v, null);
    }
  }

  /**
   * SET_IRQS MASK (or UNMASK) from vector `start`: with a count, DATA_NONE for
   * `[start, start + count)`; with an array of booleans, DATA_BOOL for `[start, start + length)`,
   * affecting only the vectors whose entry is true.
   */
  async setMasked(index: number, masked: boolean, start = 0, select: IrqSelection = 1): Promise<void> {
    const action = masked ? IrqSetFlags.ACTION_MASK : IrqSetFlags.ACTION_UNMASK;
    await this.core.call(Command.DEVICE_SET_IRQS, this.#selectBody(index, action, start, select), null).then(checkEmpty);
  }

  /**
   * SET_IRQS TRIGGER without eventfds (a software trigger: the server fires the vectors itself),
   * with DATA_NONE for `[start, start + count)` or DATA_BOOL for the vectors whose entry is true.
   */
  async trigger(index: number, start = 0, select: IrqSelection = 1): Promise<void> {
    await this.core.call(Command.DEVICE_SET_IRQS, this.#selectBody(index, IrqSetFlags.ACTION_TRIGGER, start, select), null).then(checkEmpty);
  }

  /**
   * Gives vectors `[start, start + count)` of `index` fresh eventfds for the MASK or UNMASK action
   * (SET_IRQS EVENTFD | MASK/UNMASK), replacing any they had, and returns them in vector order:
   * signalling one masks (or unmasks) its vector without a message, e.g. the INTx resample fd
   * (`'unmask'`, index 0) signalled on end of interrupt. The client owns them: they are closed by
   * {@link IrqChannels.clearActionEventfds} or when the client closes; do not close them yourself.
   *
   * @throws {RangeError} for an index or range the server did not report, or a server that
   * accepts fewer fds than `count` per message.
   * @throws {VfioUserError} if the server refuses (the vectors are then left without such eventfds).
   */
  async setActionEventfds(index: number, action: IrqAction, start = 0, count = 1): Promise<EventFd[]> {
    this.#checkRange(index, start, count, 1);
    const flag = actionFlag(action);
    if (this.core.maxSendFds < count) {
      throw new RangeError(`the server accepts ${String(this.core.maxSendFds)} fds per message; ${String(count)} ${action} eventfds do not fit`);
    }
    const fresh: EventFd[] = [];
    try {
      for (let i = 0; i < count; i++) fresh.push(EventFd.create());
    } catch (err) {
      for (const e of fresh) e.close();
      throw err;
    }
    const table = this.#actionFds[action][index]!;
    const body = encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_EVENTFD | flag, index, start, count });
    try {
      await this.core.call(Command.DEVICE_SET_IRQS, body, fresh.map((e) => e.fd.value)).then(checkEmpty);
    } catch (err) {
      for (const e of fresh) e.close();
      for (let v = start; v < start + count; v++) this.#replace(table, v, null);
      throw err;
    }
    if (this.#closed) {
      for (const e of fresh) e.close();
      return [];
    }
    fresh.forEach((efd, i) => this.#replace(table, start + i, efd));
    return fresh;
  }

  /**
   * Withdraws the MASK or UNMASK eventfds of `[start, start + count)` (SET_IRQS EVENTFD with no
   * fds) and closes ours, whatever the server answers.
   */
  async clearActionEventfds(index: number, action: IrqAction, start = 0, count = 1): Promise<void> {
    this.#checkRange(index, start, count, 1);
    const body = encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_EVENTFD | actionFlag(action), index, start, count });
    try {
      await this.core.call(Command.DEVICE_SET_IRQS, body, null).then(checkEmpty);
    } finally {
      const table = this.#actionFds[action][index]!;
      for (let v = start; v < start + count; v++) this.#replace(table, v, null);
    }
  }

  /**
   * After a reconnect: hands the server every eventfd we hold again (TRIGGER, and MASK/UNMASK
   * eventfds), runs of consecutive vectors per message, split by the server's `max_msg_fds`. The
   * eventfds and their watchers stay as they are. Rejects with the first failure after trying all.
   */
  async resendAll(): Promise<void> {
    const calls: Promise<unknown>[] = [];
    const perMessage = Math.max(1, this.core.maxSendFds);
    const send = (index: number, action: number, table: (EventFd | null)[]) => {
      for (let v = 0; v < table.length; ) {
        if (table[v] == null) {
          v++;
          continue;
        }
        let end = v + 1;
        while (end < table.length && table[end] != null && end - v < perMessage) end++;
        const fds = table.slice(v, end).map((e) => e!.fd.value);
        const body = encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_EVENTFD | action, index, start: v, count: end - v });
        calls.push(this.core.call(Command.DEVICE_SET_IRQS, body, fds).then(checkEmpty));
        v = end;
      }
    };
    this.#fds.forEach((table, index) => send(index, IrqSetFlags.ACTION_TRIGGER, table));
    this.#actionFds.mask.forEach((table, index) => send(index, IrqSetFlags.ACTION_MASK, table));
    this.#actionFds.unmask.forEach((table, index) => send(index, IrqSetFlags.ACTION_UNMASK, table));
    const failure = await firstFailure(calls);
    if (failure !== null) throw failure;
  }

  /** The MASK or UNMASK eventfd of a vector (from {@link IrqChannels.setActionEventfds}), or null. */
  actionEventfd(index: number, action: IrqAction, vector: number): EventFd | null {
    return this.#actionFds[action][index]?.[vector] ?? null;
  }

  /**
   * Interrupts as an async iterator, from now until the client closes (or the loop breaks).
   * Events not yet consumed are coalesced per vector (their counts add up), so a slow consumer
   * costs at most one queued event per vector.
   */
  events(options: IrqEventsOptions = {}): AsyncIterableIterator<IrqEvent> {
    const queue: IrqEvent[] = [];
    let waiter: ((r: IteratorResult<IrqEvent>) => void) | null = null;
    let done = this.#closed;
    const matches = (e: IrqEvent): boolean =>
      (options.index === undefined || e.index === options.index) && (options.vector === undefined || e.vector === options.vector);
    const subscriber: Subscriber = (e) => {
      if (!matches(e)) return;
      if (waiter !== null) {
        const w = waiter;
        waiter = null;
        w({ value: e, done: false });
        return;
      }
      const i = queue.findIndex((q) => q.index === e.index && q.vector === e.vector);
      if (i >= 0) queue[i] = { index: e.index, vector: e.vector, count: queue[i]!.count + e.count };
      else queue.push(e);
    };
    const end = (): void => {
      done = true;
      this.#subscribers.delete(subscriber);
      this.#enders.delete(end);
      if (waiter !== null) {
        const w = waiter;
        waiter = null;
        w({ value: undefined, done: true });
      }
    };
    if (!done) {
      this.#subscribers.add(subscriber);
      this.#enders.add(end);
    }
    const iterator: AsyncIterableIterator<IrqEvent> = {
      next: () => {
        if (queue.length > 0) return Promise.resolve({ value: queue.shift()!, done: false });
        if (done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => {
          waiter = resolve;
        });
      },
      return: () => {
        end();
        queue.length = 0;
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return iterator;
      },
    };
    return iterator;
  }

  /**
   * Resolves with the next interrupt of `index` (and `vector`, if given).
   *
   * @throws an Error with code 'ETIMEDOUT' after `timeoutMs` (default 5000), or 'ECONNRESET' if
   * the client closes first.
   */
  wait(index: number, vector?: number, timeoutMs = 5000): Promise<IrqEvent> {
    const it = this.events({ index, vector });
    return new Promise<IrqEvent>((resolve, reject) => {
      const timer = setTimeout(() => {
        void it.return!();
        reject(Object.assign(new Error(`no interrupt on index ${String(index)}${vector === undefined ? '' : ` vector ${String(vector)}`} within ${String(timeoutMs)} ms`), { code: 'ETIMEDOUT' }));
      }, timeoutMs);
      it.next().then(
        (r) => {
          clearTimeout(timer);
          void it.return!();
          if (r.done === true) reject(Object.assign(new Error('the client closed'), { code: 'ECONNRESET' }));
          else resolve(r.value);
        },
        (err: unknown) => {
          clearTimeout(timer);
          reject(err as Error);
        },
      );
    });
  }

  /** @internal Closes every eventfd and ends every iterator. */
  closeAll(): void {
    this.#closed = true;
    for (const table of [...this.#fds, ...this.#actionFds.mask, ...this.#actionFds.unmask]) for (let v = 0; v < table.length; v++) this.#replace(table, v, null);
    for (const end of [...this.#enders]) end();
  }

  #signalled(index: number, vector: number, count: number, err?: Error): void {
    if (err !== undefined) {
      debug('watching the eventfd of irq %d vector %d failed: %s', index, vector, err.message);
      return;
    }
    this.#counts[index]![vector]! += count;
    const event: IrqEvent = { index, vector, count };
    this.core.onIrq(event);
    for (const s of [...this.#subscribers]) s(event);
  }

  #replace(table: (EventFd | null)[], vector: number, efd: EventFd | null): void {
    const old = table[vector];
    if (old != null && old !== efd) old.close();
    table[vector] = efd;
  }

  /** A SET_IRQS body for `action` over a count (DATA_NONE) or a boolean per vector (DATA_BOOL). */
  #selectBody(index: number, action: number, start: number, select: IrqSelection): Buffer {
    if (typeof select === 'number') {
      this.#checkRange(index, start, select, 1);
      return encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_NONE | action, index, start, count: select });
    }
    if (!Array.isArray(select) || !select.every((b) => typeof b === 'boolean')) {
      throw new TypeError('Expected the vectors to be a count or an array of booleans');
    }
    this.#checkRange(index, start, select.length, 1);
    const data = Uint8Array.from(select, (b) => (b ? 1 : 0));
    return encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_BOOL | action, index, start, count: select.length, data });
  }

  #checkRange(index: number, start: number, count: number, minCount: number): void {
    const info = this.#infos[index];
    if (!Number.isInteger(index) || info === undefined) {
      throw new RangeError(`Expected an IRQ index below ${String(this.#infos.length)}, got ${String(index)}`);
    }
    if (!Number.isInteger(start) || !Number.isInteger(count) || start < 0 || count < minCount || start + count > info.count) {
      throw new RangeError(`IRQ index ${String(index)} has ${String(info.count)} vectors; [${String(start)}, +${String(count)}) is not a valid range`);
    }
  }
}

/** @internal Builds the per-index info of a `DEVICE_GET_IRQ_INFO` reply. */
export function irqIndexInfo(reply: IrqInfo): IrqIndexInfo {
  return Object.freeze({ index: reply.index, flags: reply.flags, count: reply.count });
}

function actionFlag(action: IrqAction): number {
  if (action === 'mask') return IrqSetFlags.ACTION_MASK;
  if (action === 'unmask') return IrqSetFlags.ACTION_UNMASK;
  throw new TypeError(`Expected the action to be 'mask' or 'unmask', got ${String(action)}`);
}

function checkEmpty(payload: Buffer): Buffer {
  decodeSetIrqsReply(payload);
  return payload;
}

/** Waits for all; returns the first rejection (in order), or null. Never leaves one unhandled. */
async function firstFailure(calls: Promise<unknown>[]): Promise<Error | null> {
  const results = await Promise.allSettled(calls);
  for (const r of results) if (r.status === 'rejected') return r.reason as Error;
  return null;
}
