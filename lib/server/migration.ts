/**
 * Migration v2 on the server side (reference §5): the device-state machine driven by
 * DEVICE_FEATURE MIG_DEVICE_STATE, and the data stream moved by MIG_DATA_READ / MIG_DATA_WRITE.
 *
 * The device supplies {@link MigrationHooks}; this module owns the states, the path through
 * intermediate states (the next-hop table of §5.3) and the sessions, so devices only stop, run,
 * save and load. A device saves either one blob (`save`/`load`: taken once it is stopped) or a
 * stream (`saver`/`loader`: produced and consumed piece by piece, which lets a device send data
 * while it still runs in PRE_COPY; `state-stream.ts` builds such a stream for our devices).
 *
 * Failure rules (our decisions, reference §5.3):
 * - A failed arc leaves the state where the walk got to (the client GETs it).
 * - A stream the device refuses (a bad header at MIG_DATA_WRITE, or RESUMING -> STOP finding it
 *   incomplete or invalid) fails that command with EINVAL; the failed RESUMING -> STOP moves to
 *   ERROR with nothing loaded. DEVICE_RESET (or the client going away) recovers ERROR to RUNNING.
 * - A client that goes away ends its session ({@link Migration.abortSession}): a device stopped
 *   for migration runs again, with its state intact (a stream is applied only when complete and
 *   valid), and the state is RUNNING, so the next client, which may know nothing of migration,
 *   finds a working device.
 */
import { Errno, MigState, MigrationFlags } from '../protocol/constants';

/** Produces a device's migration stream, piece by piece. */
export interface MigrationSaver {
  /**
   * The next bytes of the stream, at most `max` (synchronously: MIG_DATA_READ is answered at once).
   * While the device runs (`stopped` false: PRE_COPY) an empty result means "nothing more for
   * now"; once it is stopped (STOP_COPY) it means the end. The bytes are not touched again by the
   * saver once returned.
   */
  read(max: number, stopped: boolean): Uint8Array;
  /** Called when the session begins (the transition waits for it), before any read. */
  started?(): void | Promise<void>;
  /** Called once the device is stopped for STOP_COPY, before the first read of that phase. */
  stopped?(): void | Promise<void>;
  /** The session ended (complete or cancelled). */
  close?(): void;
}

/** Consumes a migration stream on the destination. */
export interface MigrationLoader {
  /** The next bytes, in order (any chunking). `data` is valid during the call only. Throw to refuse. */
  write(data: Buffer): void;
  /** The stream is complete (RESUMING -> STOP): validate and apply. Throw to refuse (nothing applied). */
  finish(): void | Promise<void>;
  /** The session ended without `finish` (refused, or the client went away). */
  abort?(): void;
}

/** What a device implements to be migratable: `setRunning`, and either save/load or saver/loader. */
export interface MigrationHooks {
  /** Offer PRE_COPY (saving while running). Default false: STOP_COPY only. */
  preCopy?: boolean;
  /**
   * Stop (false) or resume (true) the device: no DMA, no interrupts, no state change while stopped.
   * Stopping resolves once I/O already started has finished.
   */
  setRunning(running: boolean): void | Promise<void>;
  /** The device's internal state as one opaque blob (taken when it is stopped for STOP_COPY). */
  save?(): Uint8Array | Promise<Uint8Array>;
  /** Load a blob produced by `save` (when RESUMING ends). Throw to refuse invalid data. */
  load?(data: Buffer): void | Promise<void>;
  /** A saving session begins (RUNNING -> PRE_COPY, or STOP -> STOP_COPY). Takes precedence over `save`. */
  saver?(): MigrationSaver;
  /** A loading session begins (STOP -> RESUMING). Takes precedence over `load`. */
  loader?(): MigrationLoader;
}

const { ERROR, STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY } = MigState;

/** Next state on the way from `current` to `target` (reference §5.3); undefined = not allowed. */
const NEXT_HOP: Record<number, Record<number, number>> = {
  [STOP]: { [RUNNING]: RUNNING, [STOP_COPY]: STOP_COPY, [RESUMING]: RESUMING, [PRE_COPY]: RUNNING },
  [RUNNING]: { [STOP]: STOP, [STOP_COPY]: STOP, [RESUMING]: STOP, [PRE_COPY]: PRE_COPY },
  [STOP_COPY]: { [STOP]: STOP, [RUNNING]: STOP, [RESUMING]: STOP },
  [RESUMING]: { [STOP]: STOP, [RUNNING]: STOP, [STOP_COPY]: STOP, [PRE_COPY]: STOP },
  [PRE_COPY]: { [STOP]: RUNNING, [RUNNING]: RUNNING, [STOP_COPY]: STOP_COPY, [RESUMING]: RUNNING },
};

const EMPTY = new Uint8Array(0);

/** A saver over `save()`: nothing while running, the whole blob (taken once stopped) after. */
function blobSaver(save: () => Uint8Array | Promise<Uint8Array>): MigrationSaver {
  let blob: Uint8Array | null = null;
  let sent = 0;
  return {
    async stopped() {
      blob = await save();
    },
    read(max, stopped) {
      if (!stopped || blob === null) return EMPTY;
      const n = Math.min(max, blob.length - sent);
      const chunk = Buffer.from(blob.subarray(sent, sent + n));
      sent += n;
      return chunk;
    },
  };
}

/** A loader over `load()`: collects the stream, loads it whole. */
function blobLoader(load: (data: Buffer) => void | Promise<void>): MigrationLoader {
  let parts: Buffer[] = [];
  return {
    write(data) {
      parts.push(Buffer.from(data));
    },
    async finish() {
      const data = Buffer.concat(parts);
      parts = [];
      await load(data);
    },
    abort() {
      parts = [];
    },
  };
}

export class Migration {
  state: number = RUNNING;
  /** Why the last stream was refused or the last load failed (for logs), or null. */
  lastError: Error | null = null;
  /** Told when a stream is refused (its reason), e.g. to log it: the client only sees EINVAL. */
  onRefused: ((err: Error) => void) | null = null;
  private saver: MigrationSaver | null = null;
  private loader: MigrationLoader | null = null;
  /** The loader refused the stream: later writes and RESUMING -> STOP fail. */
  private refused: Error | null = null;
  /** The device was stopped by this state machine (STOP, STOP_COPY, RESUMING, ERROR). */
  private stopped = false;

  constructor(private readonly hooks: MigrationHooks) {}

  /** The MIGRATION feature's flags (reference §3.16). */
  get flags(): bigint {
    return BigInt(MigrationFlags.STOP_COPY | (this.hooks.preCopy ? MigrationFlags.PRE_COPY : 0));
  }

  /** Walk to `target` through the next-hop table. Returns 0 or an errno (state = where it got to). */
  async setState(target: number): Promise<number> {
    if (target === this.state) return 0;
    if (this.state === ERROR || !this.reachable(target)) return Errno.EINVAL;
    while (this.state !== target) {
      const next = NEXT_HOP[this.state]?.[target];
      if (next === undefined) return Errno.EINVAL;
      try {
        await this.arc(this.state, next);
      } catch (err) {
        this.lastError = err as Error;
        if (this.state === RESUMING && next === STOP) {
          // The stream was incomplete or invalid: nothing was loaded; only a reset recovers.
          this.endLoading();
          this.state = ERROR;
          this.onRefused?.(err as Error);
        }
        return Errno.EINVAL;
      }
      this.state = next;
    }
    return 0;
  }

  /** MIG_DATA_READ: up to `size` bytes of the stream being saved; empty = none (now, or at all). */
  read(size: number): Buffer | number {
    const saver = this.saver;
    if ((this.state !== STOP_COPY && this.state !== PRE_COPY) || saver === null) return Errno.EINVAL;
    let out: Uint8Array;
    try {
      out = saver.read(size, this.state === STOP_COPY);
    } catch (err) {
      this.lastError = err as Error;
      return Errno.EIO;
    }
    if (out.length > size) return Errno.EIO;
    return Buffer.isBuffer(out) ? out : Buffer.from(out.buffer, out.byteOffset, out.byteLength);
  }

  /** MIG_DATA_WRITE: the next bytes of the stream being loaded (valid during the call). */
  write(data: Uint8Array): number {
    const loader = this.loader;
    if (this.state !== RESUMING || loader === null || this.refused !== null) return Errno.EINVAL;
    try {
      loader.write(Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength));
    } catch (err) {
      return this.refuse(err as Error);
    }
    return 0;
  }

  /**
   * The client went away: its session ends with it, and the next client finds a device that runs
   * (see the module comment). Returns after the device was resumed, or reset and resumed.
   */
  async abortSession(): Promise<void> {
    this.endSaving();
    this.endLoading();
    this.state = RUNNING;
    if (this.stopped) {
      this.stopped = false;
      await this.hooks.setRunning(true);
    }
  }

  /** Reset: ERROR recovers to RUNNING; other states are left alone (reference §5.3 decision). */
  async onReset(): Promise<void> {
    if (this.state !== ERROR) return;
    this.state = RUNNING;
    if (this.stopped) {
      this.stopped = false;
      await this.hooks.setRunning(true);
    }
  }

  private refuse(err: Error): number {
    this.refused = err;
    this.lastError = err;
    this.onRefused?.(err);
    return Errno.EINVAL;
  }

  private reachable(target: number): boolean {
    if (target === PRE_COPY) return this.hooks.preCopy === true;
    return target === STOP || target === RUNNING || target === STOP_COPY || target === RESUMING;
  }

  private startSaving(): void {
    const h = this.hooks;
    this.saver = h.saver ? h.saver() : h.save ? blobSaver(h.save) : blobSaver(() => EMPTY);
  }

  private endSaving(): void {
    const saver = this.saver;
    this.saver = null;
    saver?.close?.();
  }

  private endLoading(): void {
    const loader = this.loader;
    this.loader = null;
    this.refused = null;
    loader?.abort?.();
  }

  private async arc(from: number, to: number): Promise<void> {
    if ((from === RUNNING && to === STOP) || (from === PRE_COPY && to === STOP_COPY)) {
      await this.hooks.setRunning(false);
      this.stopped = true;
      if (to === STOP_COPY) await this.saver?.stopped?.();
    } else if (from === STOP && to === RUNNING) {
      await this.hooks.setRunning(true);
      this.stopped = false;
    }
    if (to === PRE_COPY) {
      this.startSaving();
      await this.saver?.started?.();
    }
    if (from === STOP && to === STOP_COPY) {
      this.startSaving();
      await this.saver?.started?.();
      await this.saver?.stopped?.();
    }
    if (from === STOP_COPY || (from === PRE_COPY && to === RUNNING)) this.endSaving();
    if (to === RESUMING) {
      const h = this.hooks;
      this.refused = null;
      this.loader = h.loader ? h.loader() : h.load ? blobLoader(h.load) : blobLoader(() => undefined);
    }
    if (from === RESUMING) {
      const loader = this.loader;
      if (this.refused !== null) throw this.refused;
      if (loader === null) throw new Error('no loading session');
      await loader.finish();
      this.loader = null;
    }
  }
}
