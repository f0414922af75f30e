/**
 * Migration v2 on the server side (reference §5): the device-state machine driven by
 * DEVICE_FEATURE MIG_DEVICE_STATE, and the data stream moved by MIG_DATA_READ / MIG_DATA_WRITE.
 *
 * The device supplies {@link MigrationHooks}; this module owns the states, the path through
 * intermediate states (the next-hop table of §5.3) and the byte stream, so devices only stop,
 * run, save and load.
 */
import { Errno, MigState, MigrationFlags } from '../protocol/constants';

/** What a device implements to be migratable. */
export interface MigrationHooks {
  /** Offer PRE_COPY (saving while running). Default false: STOP_COPY only. */
  preCopy?: boolean;
  /** Stop (false) or resume (true) the device: no DMA, no interrupts, no state change while stopped. */
  setRunning(running: boolean): void | Promise<void>;
  /** The device's internal state as one opaque blob (taken when a saving session starts). */
  save(): Uint8Array | Promise<Uint8Array>;
  /** Load a blob produced by `save` (when RESUMING ends). Throw to refuse invalid data. */
  load(data: Buffer): void | Promise<void>;
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

export class Migration {
  state: number = RUNNING;
  private outgoing: Uint8Array | null = null;
  private sent = 0;
  private incoming: Buffer[] = [];

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
      } catch {
        return Errno.EINVAL;
      }
      this.state = next;
    }
    return 0;
  }

  /** MIG_DATA_READ: up to `size` bytes of the saved stream; empty at the end. */
  read(size: number): Buffer | number {
    if (this.state !== STOP_COPY && this.state !== PRE_COPY) return Errno.EINVAL;
    const data = this.outgoing ?? new Uint8Array(0);
    const n = Math.min(size, data.length - this.sent);
    const chunk = Buffer.from(data.subarray(this.sent, this.sent + n));
    this.sent += n;
    return chunk;
  }

  /** MIG_DATA_WRITE: append to the stream being resumed. */
  write(data: Uint8Array): number {
    if (this.state !== RESUMING) return Errno.EINVAL;
    this.incoming.push(Buffer.from(data));
    return 0;
  }

  /**
   * The client went away: its data session ends with it. A saving or loading state falls back to
   * the state the device is really in (PRE_COPY -> RUNNING, STOP_COPY and RESUMING -> STOP, the
   * partial stream dropped, nothing loaded), so the next client starts from a plain state.
   */
  abortSession(): void {
    this.outgoing = null;
    this.sent = 0;
    this.incoming = [];
    if (this.state === PRE_COPY) this.state = RUNNING;
    else if (this.state === STOP_COPY || this.state === RESUMING) this.state = STOP;
  }

  /** Reset: ERROR recovers to RUNNING; other states are left alone (reference §5.3 decision). */
  onReset(): void {
    if (this.state === ERROR) this.state = RUNNING;
  }

  private reachable(target: number): boolean {
    if (target === PRE_COPY) return this.hooks.preCopy === true;
    return target === STOP || target === RUNNING || target === STOP_COPY || target === RESUMING;
  }

  private async arc(from: number, to: number): Promise<void> {
    if (from === RUNNING && to === STOP) await this.hooks.setRunning(false);
    else if (from === STOP && to === RUNNING) await this.hooks.setRunning(true);
    else if (from === PRE_COPY && to === STOP_COPY) await this.hooks.setRunning(false);
    // The whole state is one blob taken once the device is stopped; PRE_COPY runs the session
    // but has nothing to send early (a MIG_DATA_READ there returns 0 bytes: "nothing for now").
    if (to === PRE_COPY) {
      this.outgoing = null;
      this.sent = 0;
    } else if (to === STOP_COPY) {
      this.outgoing = await this.hooks.save();
      this.sent = 0;
    }
    if (from === STOP_COPY || (from === PRE_COPY && to === RUNNING)) this.outgoing = null;
    if (to === RESUMING) this.incoming = [];
    if (from === RESUMING) {
      const data = Buffer.concat(this.incoming);
      this.incoming = [];
      await this.hooks.load(data);
    }
  }
}
