/**
 * `migrate(source, destination)`: what a VMM does to move a device from one vfio-user server to
 * another with migration v2 (reference §5.6), over two {@link VfioUserClient}s.
 *
 * 1. Both devices must offer migration (GET MIGRATION with STOP_COPY); the source must run.
 * 2. The destination goes to RESUMING (through STOP): it is fresh, nothing of it is lost.
 * 3. Dirty logging starts on the source for every fd-backed DMA map (if the source offers it):
 *    the pages the device writes in our memory, which a VMM copies to the destination's memory
 *    with the rest of guest RAM (`onDirty`).
 * 4. PRE_COPY, if the source offers it: rounds of MIG_DATA_READ until an empty reply ("nothing
 *    more for now"), each chunk written to the destination with MIG_DATA_WRITE as it comes (a
 *    few writes in flight while the next read goes out), then a dirty-page report. The rounds
 *    stop when one carried at most `convergeBytes` (device data plus dirty memory), after
 *    `maxRounds`, after `maxPreCopyMs`, or when rounds stop shrinking.
 * 5. Downtime starts: the source goes to STOP_COPY (it stops, its I/O finishes) and the rest of
 *    the stream moves until an empty read; a last dirty-page report.
 * 6. The destination goes to STOP (it checks and loads the stream), `beforeResume` runs (the VMM
 *    points its interrupts and drivers at the destination), then RUNNING: downtime ends.
 * 7. The source goes to STOP (its saving session ends) and dirty logging stops.
 *
 * The stream is opaque: its bytes move in the source's chunks, in order, never parsed, so any v2
 * device works (libvfio-user's samples stream raw BAR contents).
 *
 * On any failure before the destination runs, the source is put back to RUNNING (from PRE_COPY,
 * STOP_COPY or STOP) and the destination is left usable: SET RUNNING; a destination that refused
 * its stream and went to ERROR is reset (DEVICE_RESET recovers ERROR). The error
 * ({@link MigrationError}) says in which phase it failed and where each device ended up.
 *
 * @packageDocumentation
 */
import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { debuglog } from 'node:util';
import { MigState } from '../protocol/constants';
import type { VfioUserClient } from './client';
import type { DmaMemory } from './dma';
import { migStateName, type DirtyBitmap } from './migration';

const debug = debuglog('vfio-user:migrate');

const { ERROR, STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY } = MigState;

/** Options of {@link migrate}. */
export interface MigrateOptions {
  /** Use PRE_COPY when the source offers it (default true). */
  preCopy?: boolean;
  /** A PRE_COPY round that carried at most this many bytes (stream plus dirty memory) ends pre-copy (default 1 MiB). */
  convergeBytes?: number;
  /** Most PRE_COPY rounds (default 30). */
  maxRounds?: number;
  /** Longest time in PRE_COPY (default 60000 ms); then the device is stopped anyway. */
  maxPreCopyMs?: number;
  /**
   * Dirty logging of the source's writes into our memory: 'auto' (default: when the source offers
   * it and we have fd-backed maps), true (required: fail if the source refuses), false (none).
   */
  dirtyLogging?: boolean | 'auto';
  /** Page size asked for dirty logging (default: the source's smallest page). */
  dirtyPageSize?: number;
  /** Each dirty-page report, per map: a VMM copies those pages to the destination's memory. */
  onDirty?: (map: DmaMemory, pages: DirtyBitmap) => void | Promise<void>;
  /**
   * Runs after the destination loaded the state and before it runs (inside the downtime): point
   * interrupts, doorbells and drivers at the destination here.
   */
  beforeResume?: () => void | Promise<void>;
  /** MIG_DATA_WRITEs in flight to the destination at once (default 4). */
  window?: number;
  /** Reply timeout of each migration request in ms (default: the clients'). */
  timeoutMs?: number;
  /** Cancels the migration (the source resumes as on failure). */
  signal?: AbortSignal;
}

/** Where a migration is (events of {@link Migrator}). */
export interface MigrationProgress {
  phase: 'setup' | 'precopy' | 'stopcopy' | 'resume' | 'done';
  /** PRE_COPY round (1-based); 0 outside PRE_COPY. */
  round: number;
  /** Stream bytes of this round (or of STOP_COPY). */
  roundBytes: number;
  /** Stream bytes so far. */
  bytes: number;
  /** Pages the source reported dirty in this round. */
  dirtyPages: number;
  /** ms since the start. */
  elapsedMs: number;
}

/** What {@link migrate} measured. */
export interface MigrationResult {
  /** Source stopped (STOP_COPY requested) to destination running (RUNNING answered), in ms. */
  downtimeMs: number;
  /** The whole migration, in ms. */
  totalMs: number;
  /** PRE_COPY rounds (0 without PRE_COPY). */
  precopyRounds: number;
  /** Stream bytes moved in total. */
  bytes: number;
  /** ... during PRE_COPY, and during the downtime. */
  precopyBytes: number;
  stopCopyBytes: number;
  /** Dirty pages reported in total, and in the final report (inside the downtime). */
  dirtyPages: number;
  finalDirtyPages: number;
  /** PRE_COPY ended because a round was small enough (not by a limit). */
  converged: boolean;
  /** Where the downtime went, in ms: stopping the source, moving the rest, loading, `beforeResume`, running. */
  downtime: { stop: number; transfer: number; load: number; beforeResume: number; resume: number };
  /** Non-fatal problems after the destination ran (e.g. ending the source's session). */
  warnings: string[];
}

/** Why a migration failed, and where it left both devices. */
export class MigrationError extends Error {
  override readonly name = 'MigrationError';
  constructor(
    message: string,
    readonly phase: MigrationProgress['phase'],
    /** The source's migration state after recovery (RUNNING if it was recovered), or null if unknown. */
    readonly sourceState: number | null,
    /** The destination's migration state after recovery, or null if unknown. */
    readonly destinationState: number | null,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** Events of {@link Migrator}. */
export interface MigratorEvents {
  progress: [progress: MigrationProgress];
}

/** One migration, with progress events; {@link migrate} runs one. */
export class Migrator extends EventEmitter<MigratorEvents> {
  readonly #source: VfioUserClient;
  readonly #destination: VfioUserClient;
  readonly #options: MigrateOptions;
  #phase: MigrationProgress['phase'] = 'setup';
  #start = 0;
  #bytes = 0;
  #sourceTouched = false;
  #destinationTouched = false;
  #logging = false;
  #logPageSize = 4096;
  #logged: DmaMemory[] = [];
  #ran = false;

  constructor(source: VfioUserClient, destination: VfioUserClient, options: MigrateOptions = {}) {
    super();
    if (source === destination) throw new TypeError('Expected two different clients: the source and the destination');
    this.#source = source;
    this.#destination = destination;
    this.#options = options;
  }

  /** Runs the migration (once). */
  async run(): Promise<MigrationResult> {
    if (this.#ran) throw new Error('a Migrator runs once');
    this.#ran = true;
    this.#start = performance.now();
    try {
      return await this.#migrate();
    } catch (err) {
      throw await this.#recover(err);
    }
  }

  async #migrate(): Promise<MigrationResult> {
    const o = this.#options;
    const src = this.#source;
    const dst = this.#destination;
    const call = { timeoutMs: o.timeoutMs };
    this.#progress(0, 0, 0);
    const [sup, dsup] = await Promise.all([src.migrationSupport(call), dst.migrationSupport(call)]);
    if (sup === null || !sup.stopCopy) throw new Error('the source device cannot migrate (no MIGRATION feature with STOP_COPY)');
    if (dsup === null || !dsup.stopCopy) throw new Error('the destination device cannot migrate (no MIGRATION feature with STOP_COPY)');
    const state = await src.migrationState(call);
    if (state !== RUNNING) throw new Error(`the source device is ${migStateName(state)}, not RUNNING`);
    const preCopy = (o.preCopy ?? true) && sup.preCopy;

    this.#destinationTouched = true;
    await dst.setMigrationState(RESUMING, call);
    await this.#startLogging();
    this.#checkAbort();

    let rounds = 0;
    let precopyBytes = 0;
    let dirtyPages = 0;
    let converged = false;
    if (preCopy) {
      this.#phase = 'precopy';
      this.#sourceTouched = true;
      await src.setMigrationState(PRE_COPY, call);
      const convergeBytes = o.convergeBytes ?? 1024 * 1024;
      const maxRounds = o.maxRounds ?? 30;
      const deadline = performance.now() + (o.maxPreCopyMs ?? 60_000);
      let previous = Infinity;
      let growing = 0;
      for (;;) {
        rounds++;
        const bytes = await this.#pump();
        precopyBytes += bytes;
        const dirty = await this.#report();
        dirtyPages += dirty;
        this.#progress(rounds, bytes, dirty);
        const carried = bytes + dirty * this.#logPageSize;
        debug('round %d: %d stream bytes, %d dirty pages', rounds, bytes, dirty);
        if (carried <= convergeBytes) {
          converged = true;
          break;
        }
        growing = carried >= previous * 0.9 ? growing + 1 : 0;
        previous = carried;
        if (rounds >= maxRounds || performance.now() >= deadline || growing >= 3) break;
        this.#checkAbort();
      }
    }

    // ---- downtime ----
    this.#phase = 'stopcopy';
    this.#checkAbort();
    const t0 = performance.now();
    this.#sourceTouched = true;
    await src.setMigrationState(STOP_COPY, call);
    const t1 = performance.now();
    const stopCopyBytes = await this.#pump();
    const finalDirty = await this.#report();
    dirtyPages += finalDirty;
    this.#progress(0, stopCopyBytes, finalDirty);
    const t2 = performance.now();
    this.#phase = 'resume';
    await dst.setMigrationState(STOP, call);
    const t3 = performance.now();
    await o.beforeResume?.();
    const t4 = performance.now();
    await dst.setMigrationState(RUNNING, call);
    const t5 = performance.now();
    this.#destinationTouched = false;

    // The destination runs: what follows cannot fail the migration.
    const warnings: string[] = [];
    try {
      await src.setMigrationState(STOP, call);
    } catch (err) {
      warnings.push(`ending the source's saving session: ${(err as Error).message}`);
    }
    this.#sourceTouched = false;
    await this.#stopLogging(warnings);
    this.#phase = 'done';
    this.#progress(0, 0, 0);
    return {
      downtimeMs: t5 - t0,
      totalMs: performance.now() - this.#start,
      precopyRounds: rounds,
      bytes: this.#bytes,
      precopyBytes,
      stopCopyBytes,
      dirtyPages,
      finalDirtyPages: finalDirty,
      converged,
      downtime: { stop: t1 - t0, transfer: t2 - t1, load: t3 - t2, beforeResume: t4 - t3, resume: t5 - t4 },
      warnings,
    };
  }

  /** Moves stream bytes from the source to the destination until an empty read; returns how many. */
  async #pump(): Promise<number> {
    const src = this.#source;
    const dst = this.#destination;
    const timeoutMs = this.#options.timeoutMs;
    const window = Math.max(1, this.#options.window ?? 4);
    const inFlight: Promise<void>[] = [];
    let failure: unknown = null;
    let bytes = 0;
    try {
      for (;;) {
        if (failure !== null) break;
        const chunk = await src.readMigrationData(undefined, { timeoutMs });
        if (chunk.length === 0) break;
        bytes += chunk.length;
        this.#bytes += chunk.length;
        const write = dst.writeMigrationData(chunk, { timeoutMs }).catch((err: unknown) => {
          failure ??= err;
        });
        inFlight.push(write);
        if (inFlight.length >= window) await inFlight.shift();
      }
    } finally {
      await Promise.all(inFlight);
    }
    if (failure !== null) throw failure;
    return bytes;
  }

  async #startLogging(): Promise<void> {
    const o = this.#options;
    const want = o.dirtyLogging ?? 'auto';
    const maps = this.#source.dmaMaps.filter((m) => m.shared && m.mapped);
    if (want === false || maps.length === 0) return;
    try {
      this.#logPageSize = await this.#source.startDirtyLogging({ pageSize: o.dirtyPageSize, ranges: maps.map((m) => ({ iova: m.iova, length: m.size })), timeoutMs: o.timeoutMs });
      this.#logging = true;
      this.#logged = maps;
    } catch (err) {
      if (want === true) throw err;
      debug('dirty logging refused (%s): going on without it', (err as Error).message);
    }
  }

  /** One dirty-page report of every logged map; returns the number of dirty pages. */
  async #report(): Promise<number> {
    if (!this.#logging) return 0;
    let n = 0;
    for (const m of this.#logged) {
      if (!m.mapped) continue;
      const pages = await this.#source.dirtyPages(m.iova, m.size, this.#logPageSize, { timeoutMs: this.#options.timeoutMs });
      n += pages.count;
      if (pages.count > 0) await this.#options.onDirty?.(m, pages);
    }
    return n;
  }

  async #stopLogging(warnings: string[]): Promise<void> {
    if (!this.#logging) return;
    this.#logging = false;
    try {
      await this.#source.stopDirtyLogging({ timeoutMs: this.#options.timeoutMs });
    } catch (err) {
      warnings.push(`stopping dirty logging: ${(err as Error).message}`);
    }
  }

  #progress(round: number, roundBytes: number, dirtyPages: number): void {
    this.emit('progress', { phase: this.#phase, round, roundBytes, bytes: this.#bytes, dirtyPages, elapsedMs: performance.now() - this.#start });
  }

  #checkAbort(): void {
    const signal = this.#options.signal;
    if (signal?.aborted) throw Object.assign(new Error('the migration was cancelled'), { code: 'ABORT_ERR', cause: signal.reason });
  }

  /** Puts the source back to RUNNING and leaves the destination usable; the error to throw. */
  async #recover(err: unknown): Promise<MigrationError> {
    const phase = this.#phase;
    const call = { timeoutMs: this.#options.timeoutMs };
    const src = this.#source;
    const dst = this.#destination;
    let sourceState: number | null = null;
    let destinationState: number | null = null;
    if (!src.closed) {
      try {
        if (this.#sourceTouched) await src.setMigrationState(RUNNING, call);
        sourceState = await src.migrationState(call);
      } catch (e) {
        debug('source recovery: %s', (e as Error).message);
        sourceState = await src.migrationState(call).catch(() => null);
      }
      await this.#stopLogging([]);
    }
    if (!dst.closed && this.#destinationTouched) {
      destinationState = await recoverDestination(dst, call.timeoutMs);
    } else if (!dst.closed) {
      destinationState = await dst.migrationState(call).catch(() => null);
    }
    const why = (err as Error)?.message ?? String(err);
    const where = `source ${sourceState === null ? 'unknown' : migStateName(sourceState)}, destination ${destinationState === null ? 'unknown' : migStateName(destinationState)}`;
    return new MigrationError(`migration failed in ${phase}: ${why} (${where})`, phase, sourceState, destinationState, { cause: err });
  }
}

/** A destination that got part of a stream: back to RUNNING (reset if it went to ERROR). */
async function recoverDestination(dst: VfioUserClient, timeoutMs: number | undefined): Promise<number | null> {
  const call = { timeoutMs };
  try {
    await dst.setMigrationState(RUNNING, call);
  } catch (e) {
    debug('destination recovery: %s', (e as Error).message);
  }
  let state = await dst.migrationState(call).catch(() => null);
  if (state === ERROR || state === RESUMING || state === STOP) {
    // ERROR (a refused stream) recovers with a reset; other stuck states get one more try after it.
    try {
      if (dst.device.resettable) await dst.reset(call);
      if ((await dst.migrationState(call)) !== RUNNING) await dst.setMigrationState(RUNNING, call);
    } catch (e) {
      debug('destination reset: %s', (e as Error).message);
    }
    state = await dst.migrationState(call).catch(() => null);
  }
  return state;
}

/**
 * Migrates the device behind `source` to the one behind `destination` (see the module comment).
 * Resolves with what it measured; rejects with {@link MigrationError} after recovering both sides.
 */
export function migrate(source: VfioUserClient, destination: VfioUserClient, options: MigrateOptions & { onProgress?: (p: MigrationProgress) => void } = {}): Promise<MigrationResult> {
  const m = new Migrator(source, destination, options);
  if (options.onProgress) m.on('progress', options.onProgress);
  return m.run();
}
