/**
 * {@link AdaptivePoller}: how a device learns of work that arrives as plain stores into memory it
 * shares with the client (an NVMe doorbell page or shadow doorbells, a virtio notify page or
 * available rings), where no message and no interrupt says that anything happened.
 *
 * | phase | entered                             | next poll               |
 * |-------|-------------------------------------|-------------------------|
 * | spin  | on any work, notify or completion   | `setImmediate`          |
 * | short | the spin window without work        | `setTimeout(shortMs)`   |
 * | long  | `shortForMs` (100 ms) without work   | `setTimeout(longMs)`    |
 * | sleep | the target armed its notifications  | none: a trapped notify wakes it |
 *
 * The spin window starts at `spinUs` (200 µs). Work found by the first timer polls after it (a
 * client whose requests come a little further apart than the window, as a guest at queue depth 1
 * does) doubles it, up to `maxSpinUs`, so that the next request is caught by a spin poll instead
 * of waiting for a timer; a pause long enough to reach the long phase resets it.
 *
 * Spinning costs a core while the guest is busy, so the window is short: under TCG the guest
 * competes with us for the same cores. A spin poll that found nothing yields the CPU (sched_yield),
 * so a vCPU or VMM main loop waiting for this CPU runs at once instead of after the window
 * (measured: the guest's QD1 latency doubled under a spin that never yielded). Timers are unref'd: an idle poller never keeps the process
 * alive. Used by the NVMe controller (lib/devices/nvme/doorbells.ts) and the virtio-pci transport.
 *
 * @packageDocumentation
 */

import { binding } from '../native/binding';

/** Tunables of {@link AdaptivePoller}. */
export interface PollPolicy {
  /** Keep polling with setImmediate for this long after the last work, in microseconds. */
  spinUs: number;
  /** The most the spin window grows to when work keeps arriving just after it (µs; default 1000). */
  maxSpinUs?: number;
  /** Then poll every `shortMs` milliseconds... */
  shortMs: number;
  /** ...until idle for `shortForMs` milliseconds... */
  shortForMs: number;
  /** ...and every `longMs` milliseconds after that. */
  longMs: number;
}

const DEFAULT_MAX_SPIN_US = 1000;
export const DEFAULT_POLL_POLICY: Readonly<PollPolicy> = Object.freeze({ spinUs: 200, maxSpinUs: DEFAULT_MAX_SPIN_US, shortMs: 1, shortForMs: 100, longMs: 10 });

/** What the poller drives. */
export interface PollTarget {
  /** Looks for new work (doorbell values, available rings) and processes it; true if there was any. */
  poll(): boolean;
  /** Whether anything needs polling now (shared doorbell or notify memory is in use). */
  readonly pollable: boolean;
  /** True if the poller may stop after the spin window: every submission is notified after {@link arm}. */
  readonly canSleep: boolean;
  /**
   * Re-enables notifications before sleeping and checks nothing slipped in meanwhile. True if it
   * is safe to sleep; false: keep polling.
   */
  arm(): boolean;
}

export type PollPhase = 'stopped' | 'spin' | 'short' | 'long' | 'sleep';

/** Spins while busy, backs off to timers when idle, sleeps when the target allows it. */
export class AdaptivePoller {
  private phaseValue: PollPhase = 'stopped';
  private lastWork = 0;
  /** The current spin window (µs): `spinUs`, doubled while work arrives just after it. */
  private windowUs: number;
  /** Woken while spinning: counts as work at the next poll. */
  private woken = false;
  private immediate: NodeJS.Immediate | null = null;
  private timer: NodeJS.Timeout | null = null;
  /** Polls done in each phase (for tests and measurements). */
  readonly counts = { spin: 0, short: 0, long: 0, arms: 0 };
  private readonly tick = () => this.run();

  constructor(
    private readonly target: PollTarget,
    readonly policy: Readonly<PollPolicy> = DEFAULT_POLL_POLICY,
  ) {
    this.windowUs = policy.spinUs;
  }

  get phase(): PollPhase {
    return this.phaseValue;
  }

  /** The spin window now, in microseconds. */
  get spinWindowUs(): number {
    return this.windowUs;
  }

  /** Activity seen (a notify or doorbell message, a register access, a completion): poll eagerly again. */
  wake(): void {
    // While spinning the next poll is near: it takes the time then (no clock read per completion).
    if (this.phaseValue === 'spin') {
      this.woken = true;
      return;
    }
    if (!this.target.pollable) return;
    this.lastWork = performance.now();
    this.cancel();
    this.phaseValue = 'spin';
    this.immediate = setImmediate(this.tick);
  }

  /** Stops polling (the device is disabled or reset). */
  stop(): void {
    this.cancel();
    this.woken = false;
    this.phaseValue = 'stopped';
  }

  private cancel(): void {
    if (this.immediate !== null) clearImmediate(this.immediate);
    if (this.timer !== null) clearTimeout(this.timer);
    this.immediate = null;
    this.timer = null;
  }

  private run(): void {
    this.immediate = null;
    this.timer = null;
    const target = this.target;
    if (!target.pollable) {
      this.phaseValue = 'stopped';
      return;
    }
    const phase = this.phaseValue;
    if (phase === 'spin') this.counts.spin++;
    else if (phase === 'short') this.counts.short++;
    else if (phase === 'long') this.counts.long++;
    const now = performance.now();
    if (this.woken) {
      this.woken = false;
      this.lastWork = now;
    }
    const policy = this.policy;
    if (target.poll()) {
      // Found by one of the first timer polls after the window: the window was just too short.
      if (phase === 'short' && (now - this.lastWork) * 1000 < this.windowUs + 2000 * policy.shortMs) {
        const most = Math.max(policy.maxSpinUs ?? DEFAULT_MAX_SPIN_US, policy.spinUs);
        this.windowUs = Math.min(most, this.windowUs * 2);
      }
      this.lastWork = now;
    }
    // poll() may have stopped us (a reset, a fault) or woken us (a completion): respect that.
    if (this.phaseValue === 'stopped' || this.immediate !== null || this.timer !== null) return;
    const idleMs = now - this.lastWork;
    if (idleMs * 1000 < this.windowUs) {
      if (this.lastWork !== now) binding.schedYield();
      this.phaseValue = 'spin';
      this.immediate = setImmediate(this.tick);
      return;
    }
    if (target.canSleep) {
      this.counts.arms++;
      if (target.arm()) {
        this.phaseValue = 'sleep';
        return;
      }
      this.lastWork = performance.now();
      this.phaseValue = 'spin';
      this.immediate = setImmediate(this.tick);
      return;
    }
    const long = idleMs >= policy.shortForMs;
    if (long) this.windowUs = policy.spinUs;
    this.phaseValue = long ? 'long' : 'short';
    this.timer = setTimeout(this.tick, long ? policy.longMs : policy.shortMs);
    this.timer.unref();
  }
}
