/**
 * Quiescing a device before the commands that change what it may touch (libvfio-user's quiesce
 * callback, `vfu_setup_device_quiesce_cb` / `vfu_device_quiesced`): DMA_MAP, DMA_UNMAP (ALL
 * included), DEVICE_RESET, a migration state change, and the reset after a client went away.
 *
 * A device that implements {@link VfioUserDevice.quiesce} is asked first. It stops starting DMA
 * (and interrupts) and says it is quiesced by returning (nothing, or a promise that resolves), or
 * answers {@link QUIESCE_BUSY} and calls `ctx.quiesced()` later, from any callback or timer
 * (deferred quiesce). Meanwhile the command waits, and so do the commands after it (the session
 * executes in order). Then the command runs, and {@link VfioUserDevice.unquiesce} tells the device
 * it may carry on. A device that fails to quiesce (`quiesced(errno)`, or a promise that rejects)
 * fails the command with that errno (EBUSY when the rejection carries none) and is not told to
 * unquiesce, since it never quiesced; the reset after a hang-up happens anyway, after at most
 * {@link FORCED_QUIESCE_WAIT_MS} (a device that never finishes cannot keep the next client out).
 *
 * @packageDocumentation
 */
import { Errno } from '../protocol/constants';

/** What {@link VfioUserDevice.quiesce} returns to defer: call `ctx.quiesced()` when done. */
export const QUIESCE_BUSY = 'busy';

/** How long an operation that must happen anyway (the reset after a hang-up) waits for a quiesce. */
export const FORCED_QUIESCE_WAIT_MS = 5000;

/** Why the device is asked to quiesce. */
export type QuiesceReason = 'dma-map' | 'dma-unmap' | 'reset' | 'migration' | 'lost-connection';

/** The device side of quiescing (a subset of VfioUserDevice). */
export interface Quiescable {
  quiesce?(reason: QuiesceReason): void | Promise<void> | typeof QUIESCE_BUSY;
  unquiesce?(reason: QuiesceReason): void;
}

export class Quiescer {
  /** The deferred quiesce being waited for (QUIESCE_BUSY), or null. */
  private waiting: ((errno: number) => void) | null = null;
  /** Times the device was asked, and of those, how many it deferred (for tests and stats). */
  readonly counts = { asked: 0, deferred: 0 };

  constructor(
    private readonly device: Quiescable,
    /** Told of a device callback that threw (the command then fails with EINVAL). */
    private readonly onError: (err: unknown) => void = () => {},
  ) {}

  /** True if the device wants to be quiesced at all (otherwise {@link run} just runs). */
  get enabled(): boolean {
    return typeof this.device.quiesce === 'function';
  }

  /** True while a deferred quiesce is outstanding. */
  get pending(): boolean {
    return this.waiting !== null;
  }

  /**
   * Quiesce the device for `reason`, run `op`, then unquiesce. Resolves with what `op` returned,
   * or with the errno the device failed to quiesce with (then `op` does not run, unless `force`:
   * then it runs anyway, after at most {@link FORCED_QUIESCE_WAIT_MS}).
   */
  async run<T>(reason: QuiesceReason, op: () => T | Promise<T>, force = false): Promise<T | number> {
    if (!this.enabled) return op();
    const errno = force ? await this.bounded(this.quiesce(reason)) : await this.quiesce(reason);
    if (errno !== 0 && !force) return errno;
    try {
      return await op();
    } finally {
      if (errno === 0) {
        try {
          this.device.unquiesce?.(reason);
        } catch (err) {
          this.onError(err);
        }
      }
    }
  }

  /**
   * The device finished a deferred quiesce (`ctx.quiesced`): 0 when quiesced, else the errno the
   * command fails with. False if no quiesce was outstanding (a device bug; nothing happens).
   */
  done(errno = 0): boolean {
    const waiting = this.waiting;
    if (waiting === null) return false;
    this.waiting = null;
    waiting(Number.isInteger(errno) && errno >= 0 ? errno : Errno.EINVAL);
    return true;
  }

  /** `quiesced`, or ETIMEDOUT (and the deferred quiesce abandoned) after FORCED_QUIESCE_WAIT_MS. */
  private bounded(quiesced: Promise<number>): Promise<number> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiting = null;
        resolve(Errno.ETIMEDOUT);
      }, FORCED_QUIESCE_WAIT_MS);
      void quiesced.then((errno) => {
        clearTimeout(timer);
        resolve(errno);
      });
    });
  }

  private quiesce(reason: QuiesceReason): Promise<number> {
    this.counts.asked++;
    let result: void | Promise<void> | typeof QUIESCE_BUSY;
    try {
      result = this.device.quiesce!(reason);
    } catch (err) {
      this.onError(err);
      return Promise.resolve(Errno.EINVAL);
    }
    if (result === QUIESCE_BUSY) {
      this.counts.deferred++;
      // A quiesce still outstanding (its command's client left) is abandoned for this one.
      this.waiting?.(Errno.EBUSY);
      return new Promise((resolve) => {
        this.waiting = resolve;
      });
    }
    if (result instanceof Promise) {
      return result.then(
        () => 0,
        (err: unknown) => {
          const errno = (err as { errno?: unknown } | null)?.errno;
          return typeof errno === 'number' && errno > 0 ? errno : Errno.EBUSY;
        },
      );
    }
    return Promise.resolve(0);
  }
}
