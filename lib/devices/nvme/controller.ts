/**
 * `NvmeController`: an NVM Express 1.4 I/O controller with one namespace, as a PCIe endpoint
 * (class 01:08:02) served over vfio-user. BAR0 holds the registers and doorbells; BAR4 holds the
 * MSI-X table and PBA (one vector per completion queue), so the doorbell page can be mmap'd.
 *
 * The state machine (NVMe Base 1.4, 3.1 and 7.6):
 * - CC.EN 0 -> 1: the admin queues are taken from AQA/ASQ/ACQ and CSTS.RDY is set at once. A bad
 *   configuration (admin queue size, page size, command set, arbitration) sets CSTS.CFS instead.
 * - CC.EN 1 -> 0 (controller reset), DEVICE_RESET, FLR, or the client going away: every queue is
 *   deleted, outstanding commands are abandoned (their completions are never posted), features
 *   return to defaults; CSTS.RDY clears once the backend I/O already started has finished (at most
 *   CAP.TO; past it, CSTS.CFS is set too). No DMA happens after that. SeaBIOS and then Linux can
 *   therefore drive the same controller in one boot.
 * - CC.SHN: CSTS.SHST goes to "occurring", fetching stops, in-flight I/O finishes, the backend is
 *   flushed, then SHST reads "complete" (CFS if the flush failed).
 * - CSTS.CFS on internal fatal errors: queue memory that cannot be read or written.
 *
 * Queue processing is the hot path: doorbells (trapped writes, the mmap'd page, or shadow
 * doorbells) move tails; the controller fetches commands round-robin across submission queues with
 * an arbitration burst (Set Features 01h), reads each entry from a cached view of the ring, runs it,
 * and posts completions with the phase tag. Interrupts: MSI-X vector per completion queue through
 * {@link PciDevice.interrupt} with interrupt coalescing (Set Features 08h/09h), or, while MSI-X is
 * off, INTx with level semantics: asserted while any completion queue with interrupts enabled holds
 * entries the host has not consumed (masked per vector by INTMS/INTMC).
 *
 * This file holds the state machine; its parts live beside it: command-loop.ts (fetch, execute,
 * post), registers.ts (the register file), queue-table.ts, doorbell-updates.ts (doorbells, shadow
 * doorbells, polling), interrupts.ts, migration.ts, identity.ts (options and Identify data),
 * admin.ts and io.ts (the command sets).
 *
 * Guest errors are completion statuses, never exceptions (admin.ts, io.ts); exceptions from the
 * command loop mean bugs and become Internal Error completions plus a trace line.
 *
 * @packageDocumentation
 */
import { PciDevice, StopReason } from '../../pci/device';
import { ClassCode } from '../../pci/ids';
import { Errno, PciIrq } from '../../protocol/constants';
import type { ResetReason } from '../../server/device';
import type { AdminContext } from './admin';
import { AsyncEvents, ErrorLog, Features, temperatureWarning } from './admin-state';
import type { BlockBackend } from '../../block/backend';
import { RamBackend } from '../../block/ram';
import type { BulkData } from '../../server/state-stream';
import { MigrationRefusedError, fromBase64, toBase64 } from '../../server/state-stream';
import { AerType, CriticalWarning, LogId, Status } from '../../nvme/constants';
import { Aqa, Cc, Csts, Shn, Shst, ccShutdown } from '../../nvme/registers';
import { Sqe } from '../../nvme/structs';
import { AdaptivePoller, DEFAULT_POLL_POLICY } from '../../pci/poller';
import type { ControllerIdentity, HealthCounters, NamespaceIdentity } from './builders';
import { CommandLoop, hex } from './command-loop';
import { DoorbellUpdates } from './doorbell-updates';
import { DoorbellPage, type DoorbellMode } from './doorbells';
import { AERL, ELPE, TEMPERATURE, WCTEMP, controllerShape, identities, type NvmeControllerOptions } from './identity';
import { CompletionInterrupts } from './interrupts';
import type { IoContext, IoStats } from './io';
import { restoreState, saveState, type MigratingParts } from './migration';
import { QueueTable } from './queue-table';
import { CompletionQueue, SubmissionQueue, cqDoorbellIndex, sqDoorbellIndex, type QueuedRequest } from './queues';
import { BAR0_SIZE, MPSMAX, MPSMIN, RegisterFile, capValue } from './registers';
import type { Request } from './request';
import { RamNamespaceData, checkNvmeState, type NvmeState } from './state';

export type { NvmeControllerOptions } from './identity';

/** CAP.TO: how long a CC.EN transition may take (in-flight backend I/O must finish first). */
const READY_TIMEOUT_MS = 10_000;
/** MSI-X table and PBA live in BAR4. */
const MSIX_BAR = 4;
const MSIX_BAR_SIZE = 0x1000;
const MSIX_PBA_OFFSET = 0x800;

/** SMART counters kept by the controller. */
interface Stats extends IoStats {
  unsafeShutdowns: number;
}

export class NvmeController extends PciDevice implements AdminContext, IoContext {
  readonly backend: BlockBackend;
  readonly blockSize: number;
  readonly blockShift: number;
  /** Namespace size in logical blocks. */
  readonly blocks: number;
  readonly maxQueues: number;
  readonly maxQueueEntries: number;
  /** MDTS in bytes (Infinity when unlimited). */
  readonly maxTransfer: number;
  /** MSI-X vectors: one per completion queue (admin included). */
  readonly vectors: number;
  readonly doorbellMode: DoorbellMode;
  readonly controllerIdentity: ControllerIdentity;
  readonly namespaceIdentity: NamespaceIdentity;
  /** @internal Feature values (admin.ts). */
  readonly features: Features;
  /** @internal The Error Information log (admin.ts). */
  readonly errors = new ErrorLog(ELPE + 1);
  /** @internal Asynchronous events (admin.ts). */
  readonly events: AsyncEvents;
  /** @internal SMART counters. */
  readonly stats: Stats = { units512Read: 0, units512Written: 0, hostReads: 0, hostWrites: 0, mediaErrors: 0, unsafeShutdowns: 0 };
  /** The doorbell poller (mmap'd and shadow doorbells); exposed for measurements. */
  readonly poller: AdaptivePoller;
  /** How doorbell values arrived (see {@link DoorbellUpdates.counts}). */
  readonly doorbellCounts: { trapped: number; mapped: number; shadow: number };
  private readonly trace: ((line: string) => void) | undefined;
  private readonly regs: RegisterFile;
  private readonly doorbellPage: DoorbellPage;
  private readonly queues: QueueTable;
  private readonly doorbells: DoorbellUpdates;
  private readonly interrupts: CompletionInterrupts;
  private readonly loop: CommandLoop;
  private resetting = false;
  private resetTimer: NodeJS.Timeout | null = null;
  private shuttingDown = false;
  private criticalWarning = 0;
  private readonly createdAt = Date.now();
  private closed: Promise<void> | null = null;
  /** Stopped (migration, or detached with kept state): nothing is fetched, doorbells are only recorded. */
  private paused = false;
  /** Stopped and quiet: no DMA, no interrupts; completions wait in their CQ's queue until resumed. */
  private frozen = false;
  /** Settles when a controller reset in progress has finished. */
  private resetDone: Promise<void> = Promise.resolve();
  /** Settles when a shutdown in progress has finished. */
  private shutdownDone: Promise<void> = Promise.resolve();
  /** A migration is saving this controller; and a background flush loop runs (shared storage). */
  private saving = false;
  private preflushing = false;
  /** The RAM namespace's data for migration (null: the namespace is shared storage). */
  private readonly ramData: RamNamespaceData | null;

  constructor(options: NvmeControllerOptions) {
    const shape = controllerShape(options);
    const { vendorId, vectors } = shape;
    const page = new DoorbellPage(shape.doorbells, 2 * (shape.queues + 1));
    // Region callbacks run after construction; they reach the instance through this holder.
    const self: { c: NvmeController | null } = { c: null };
    try {
      super({
        vendorId,
        deviceId: options.deviceId ?? 0x0001,
        subsystemVendorId: vendorId,
        subsystemId: 0,
        classCode: ClassCode.STORAGE_NVME,
        revision: 0,
        interruptPin: 1,
        express: true,
        bars: {
          0: {
            size: BAR0_SIZE,
            is64: true,
            read: (offset, dst) => self.c!.readBar0(offset, dst),
            write: (offset, src) => self.c!.writeBar0(offset, src),
            ...(page.mmap ? { mmap: page.mmap } : {}),
          },
          [MSIX_BAR]: {
            size: MSIX_BAR_SIZE,
            // Outside the table and PBA: reserved, reads 0, writes ignored.
            read: (_offset, dst) => {
              dst.fill(0);
            },
            write: () => {},
          },
        },
        pm: true,
        pcie: true,
        msix: { vectors, table: { bar: MSIX_BAR, offset: 0 }, pba: { bar: MSIX_BAR, offset: MSIX_PBA_OFFSET } },
      });
    } catch (err) {
      page.close();
      throw err;
    }
    self.c = this;
    this.doorbellPage = page;
    this.doorbellMode = shape.doorbells;
    this.backend = options.backend;
    this.blockSize = shape.blockSize;
    this.blockShift = shape.blockShift;
    this.blocks = shape.blocks;
    this.maxQueues = shape.queues;
    this.maxQueueEntries = shape.maxQueueEntries;
    this.maxTransfer = shape.mdts === 0 ? Infinity : 2 ** shape.mdts * 4096;
    this.vectors = vectors;
    this.trace = options.trace;
    this.features = new Features(vectors, WCTEMP);
    this.events = new AsyncEvents(AERL + 1, (req, status) => this.loop.finish(req, status));
    this.regs = new RegisterFile(capValue({ maxQueueEntries: shape.maxQueueEntries, timeoutMs: READY_TIMEOUT_MS }), page, {
      ccWritten: (old, next) => this.ccWritten(old, next),
      intmsChanged: () => this.interrupts.updateIntx(),
      doorbellWritten: (index, value) => this.doorbells.written(index, value),
    });
    this.queues = new QueueTable(shape.queues);
    // The parts read the controller's state through these getters, never a copy of it.
    const ctrl = this;
    this.doorbells = new DoorbellUpdates(shape.doorbells, page, {
      get dma() {
        return ctrl.dma;
      },
      get pageSize() {
        return ctrl.regs.pageSize;
      },
      queues: this.queues,
      get msixEnabled() {
        return ctrl.msixEnabled;
      },
      get running() {
        return ctrl.running;
      },
      get recording() {
        return ctrl.paused && ctrl.live;
      },
      process: () => this.loop.process(),
      cqHeadMoved: (cq) => this.loop.cqHeadMoved(cq),
      raiseEvent: (type, info, log) => this.events.raise(type, info, log),
      wake: () => this.poller.wake(),
      trace: this.trace,
    });
    this.doorbellCounts = this.doorbells.counts;
    this.interrupts = new CompletionInterrupts(vectors, {
      get msixEnabled() {
        return ctrl.msixEnabled;
      },
      get frozen() {
        return ctrl.frozen;
      },
      get intms() {
        return ctrl.regs.intms;
      },
      features: this.features,
      queues: this.queues,
      refreshShadowHead: (cq) => this.doorbells.refreshShadowHead(cq),
      interrupt: (vector) => this.interrupt(vector),
      setIntx: (asserted) => this.setIntx(asserted),
    });
    if (shape.doorbells === 'ioeventfd') {
      this.setIoEventfds(0, page.ioeventfds);
      page.onRing = () => this.doorbells.rang();
    }
    this.poller = new AdaptivePoller(this.doorbells, { ...DEFAULT_POLL_POLICY, ...options.poll });
    const ids = identities(options, shape);
    this.controllerIdentity = ids.controller;
    this.namespaceIdentity = ids.namespace;
    this.ramData = options.backend instanceof RamBackend ? new RamNamespaceData(options.backend) : null;
    this.loop = new CommandLoop(
      {
        get running() {
          return ctrl.running;
        },
        get frozen() {
          return ctrl.frozen;
        },
        fail: (why) => this.fail(why),
      },
      {
        context: this,
        features: this.features,
        errors: this.errors,
        queues: this.queues,
        doorbells: this.doorbells,
        interrupts: this.interrupts,
        poller: this.poller,
        ramData: this.ramData,
        blockSize: this.blockSize,
        trace: this.trace,
      },
    );
    this.enableMigration();
  }

  // ---- public state ----

  /** CSTS.RDY. */
  get ready(): boolean {
    return (this.regs.csts & Csts.RDY) !== 0;
  }

  /** CSTS.CFS. */
  get fatal(): boolean {
    return (this.regs.csts & Csts.CFS) !== 0;
  }

  /** Memory page size (CC.MPS) in bytes. */
  get pageSize(): number {
    return this.regs.pageSize;
  }

  get msixEnabled(): boolean {
    return this.msix?.enabled ?? false;
  }

  get writeCacheEnabled(): boolean {
    return this.features.writeCache;
  }

  get hasIoQueues(): boolean {
    return this.queues.hasIoQueues;
  }

  /** Commands whose backend I/O is in progress. */
  get inFlight(): number {
    return this.loop.busy;
  }

  sq(qid: number): SubmissionQueue | null {
    return this.queues.sq(qid);
  }

  cq(qid: number): CompletionQueue | null {
    return this.queues.cq(qid);
  }

  /** Stops polling, abandons queued work, waits for in-flight I/O, closes the backend. Idempotent. */
  close(): Promise<void> {
    this.closed ??= (async () => {
      this.loop.epoch++;
      this.teardown();
      this.regs.csts = 0;
      await this.loop.whenIdle();
      this.doorbellPage.close();
      await this.backend.close();
    })();
    return this.closed;
  }

  // ---- BAR0 ----

  private readBar0(offset: number, dst: Buffer): number {
    if (this.closed !== null) return Errno.EIO;
    this.poller.wake();
    this.regs.readBar0(offset, dst);
    return 0;
  }

  private writeBar0(offset: number, src: Buffer): number {
    if (this.closed !== null) return Errno.EIO;
    this.regs.writeBar0(offset, src);
    this.poller.wake();
    return 0;
  }

  /** CC written: enable, reset or shut down as its EN and SHN fields moved. */
  private ccWritten(old: number, next: number): void {
    const wasEnabled = (old & Cc.EN) !== 0;
    const enable = (next & Cc.EN) !== 0;
    if (this.trace && old !== next) this.trace(`nvme: CC 0x${hex(old)} -> 0x${hex(next)}`);
    if (!wasEnabled && enable) this.enable();
    else if (wasEnabled && !enable) this.controllerReset('CC.EN cleared');
    const shn = ccShutdown(next);
    if (shn !== Shn.NONE && ccShutdown(old) === Shn.NONE && enable) this.shutdown(shn);
  }

  // ---- state machine ----

  private get running(): boolean {
    return (this.regs.csts & (Csts.RDY | Csts.CFS | Csts.SHST_MASK)) === Csts.RDY && !this.resetting && !this.shuttingDown && !this.paused;
  }

  /** Enabled and healthy, paused or not (doorbells written while paused are recorded). */
  private get live(): boolean {
    return (this.regs.csts & (Csts.RDY | Csts.CFS | Csts.SHST_MASK)) === Csts.RDY && !this.resetting && !this.shuttingDown;
  }

  private enable(): void {
    if (this.resetting || (this.regs.csts & Csts.RDY) !== 0 || this.closed !== null) return;
    const cc = this.regs.cc;
    const asqs = (this.regs.aqa & Aqa.ASQS_MASK) + 1;
    const acqs = ((this.regs.aqa & Aqa.ACQS_MASK) >>> Aqa.ACQS_SHIFT) + 1;
    const mps = (cc & Cc.MPS_MASK) >>> Cc.MPS_SHIFT;
    const css = (cc & Cc.CSS_MASK) >>> Cc.CSS_SHIFT;
    const ams = (cc & Cc.AMS_MASK) >>> Cc.AMS_SHIFT;
    const asq = u64(this.regs.asq);
    const acq = u64(this.regs.acq);
    let problem = '';
    if (asqs < 2 || acqs < 2) problem = `admin queue sizes ${asqs}/${acqs}`;
    else if (mps < MPSMIN || mps > MPSMAX) problem = `page size 2^${12 + mps}`;
    else if (css !== 0) problem = `command set ${css}`;
    else if (ams !== 0) problem = `arbitration mechanism ${ams}`;
    else if (asq < 0 || acq < 0) problem = 'admin queue address above 2^53';
    if (problem !== '') {
      this.regs.csts |= Csts.CFS;
      this.trace?.(`nvme: enable failed (${problem}): CSTS.CFS`);
      return;
    }
    this.regs.pageSize = 1 << (12 + mps);
    const dma = this.dma;
    const cq = new CompletionQueue(dma, 0, acqs, acq, 0, true);
    const sq = new SubmissionQueue(dma, 0, asqs, asq, cq, Sqe.SIZE);
    this.queues.setAdmin(sq, cq);
    this.regs.csts = Csts.RDY;
    this.trace?.(`nvme: ready (admin SQ ${asqs}@0x${asq.toString(16)}, CQ ${acqs}@0x${acq.toString(16)}, page ${this.regs.pageSize})`);
    this.poller.wake();
  }

  /**
   * Controller reset: queues deleted, commands abandoned, features to defaults. CSTS.RDY clears
   * when the backend I/O already started has finished. Resolves then.
   */
  private controllerReset(why: string): Promise<void> {
    this.loop.epoch++;
    this.teardown();
    this.trace?.(`nvme: reset (${why}), ${this.loop.busy} command(s) still in the backend`);
    if (this.loop.busy === 0) {
      this.finishReset();
      return Promise.resolve();
    }
    this.resetting = true;
    const epoch = this.loop.epoch;
    if (this.resetTimer !== null) clearTimeout(this.resetTimer);
    this.resetTimer = setTimeout(() => {
      if (this.resetting && this.loop.epoch === epoch) {
        this.regs.csts |= Csts.CFS;
        this.trace?.(`nvme: reset exceeded CAP.TO (${READY_TIMEOUT_MS} ms): CSTS.CFS`);
      }
    }, READY_TIMEOUT_MS);
    this.resetTimer.unref();
    this.resetDone = this.loop.whenIdle().then(() => {
      if (this.loop.epoch === epoch) this.finishReset();
    });
    return this.resetDone;
  }

  private finishReset(): void {
    if (this.resetTimer !== null) clearTimeout(this.resetTimer);
    this.resetTimer = null;
    this.resetting = false;
    this.shuttingDown = false;
    this.regs.csts = 0;
    // A host that set CC.EN again without waiting for RDY = 0 gets its enable now.
    if ((this.regs.cc & Cc.EN) !== 0) this.enable();
  }

  /** Drops every queue, pending completion, event, timer and shadow doorbell. */
  private teardown(): void {
    this.poller.stop();
    this.interrupts.reset();
    this.queues.clear();
    this.events.reset();
    this.features.reset();
    this.criticalWarning = 0;
    this.doorbellPage.clear();
    this.interrupts.updateIntx();
  }

  private shutdown(kind: number): void {
    const epoch = this.loop.epoch;
    this.shuttingDown = true;
    this.regs.csts = (this.regs.csts & ~Csts.SHST_MASK) | (Shst.OCCURRING << Csts.SHST_SHIFT);
    this.trace?.(`nvme: ${kind === Shn.ABRUPT ? 'abrupt' : 'normal'} shutdown`);
    this.shutdownDone = this.loop.whenIdle()
      .then(() => this.backend.flush())
      .then(
        () => true,
        (err: unknown) => {
          this.trace?.(`nvme: flush at shutdown failed: ${String(err)}`);
          return false;
        },
      )
      .then((ok) => {
        if (this.loop.epoch !== epoch) return;
        this.regs.csts = (this.regs.csts & ~Csts.SHST_MASK) | (Shst.COMPLETE << Csts.SHST_SHIFT) | (ok ? 0 : Csts.CFS);
        this.trace?.('nvme: shutdown complete');
      });
  }

  private fail(why: string): void {
    if ((this.regs.csts & Csts.CFS) === 0) this.trace?.(`nvme: fatal: ${why}: CSTS.CFS`);
    this.regs.csts |= Csts.CFS;
    this.poller.stop();
  }

  /** DEVICE_RESET, FLR, lost connection: a controller reset plus registers to power-on values. */
  protected override async onReset(reason: ResetReason): Promise<void> {
    if (reason === 'lost-connection' && (this.regs.csts & Csts.RDY) !== 0 && (this.regs.csts & Csts.SHST_MASK) === 0) this.stats.unsafeShutdowns++;
    this.interrupts.intxAsserted = false;
    this.regs.powerOn();
    await this.controllerReset(`device reset: ${reason}`);
    this.regs.csts = 0;
  }

  /** A departed client's copies of the doorbell eventfd and memory must reach nothing. */
  protected override onClientGone(): void {
    if (this.doorbellMode === 'ioeventfd') this.setIoEventfds(0, this.doorbellPage.renew());
  }

  // ---- stopping and running (migration, kept state) ----

  /**
   * Stop: nothing more is fetched; backend I/O already started finishes and posts its completions
   * (interrupts for them stay pending in the PCI layer); a reset or shutdown in progress finishes;
   * for a migration, shared storage is flushed. Then no DMA happens until {@link onRun}.
   */
  protected override async onStop(reason: number): Promise<void> {
    this.paused = true;
    this.poller.stop();
    this.trace?.(`nvme: stopping (${reason === StopReason.MIGRATION ? 'migration' : 'client gone, state kept'}), ${this.loop.busy} command(s) in the backend`);
    await this.loop.whenIdle();
    await this.resetDone;
    await this.shutdownDone;
    this.interrupts.flushNow();
    if (reason === StopReason.MIGRATION && this.ramData === null) {
      try {
        await this.backend.flush();
      } catch (err) {
        this.trace?.(`nvme: flush at stop failed: ${String(err)}`);
      }
    }
    if (!this.paused) return; // resumed meanwhile
    this.frozen = true;
    this.interrupts.stopTimers();
  }

  /** Run again: post completions that waited, interrupt for what the host has not consumed, fetch. */
  protected override onRun(): void {
    this.paused = false;
    this.frozen = false;
    for (const cq of this.queues.activeCqs) if (cq.waiting.length > 0) this.loop.cqHeadMoved(cq);
    this.interrupts.refire();
    this.trace?.('nvme: running');
    this.poller.wake();
    if (this.doorbells.pollable) this.doorbells.poll();
    this.loop.process();
  }

  protected override migrationKind(): string {
    return 'nvme';
  }

  protected override migrationIdentity(): Record<string, unknown> {
    const id = this.controllerIdentity;
    return {
      serial: id.serial,
      model: id.model,
      firmware: id.firmware,
      blockSize: this.blockSize,
      blocks: this.blocks,
      queues: this.maxQueues,
      maxQueueEntries: this.maxQueueEntries,
      mdts: id.mdts,
      doorbells: this.doorbellMode,
      storage: this.ramData !== null ? 'ram' : 'shared',
      readOnly: this.backend.readOnly === true,
    };
  }

  protected override migrationBulkData(): BulkData | null {
    return this.ramData;
  }

  /**
   * Shared storage is flushed at the stop (it is the destination's disk too), inside the downtime,
   * and a flush costs what is not yet written back. So when a saving session begins (the device
   * still running) the storage is flushed once, and flushes go on in the background while the
   * session runs: the flush at the stop finds little left to write.
   */
  protected override async onSavingChanged(saving: boolean): Promise<void> {
    this.saving = saving;
    if (!saving || this.ramData !== null) return;
    try {
      await this.backend.flush();
    } catch (err) {
      this.trace?.(`nvme: flush before migration failed: ${String(err)}`);
    }
    if (this.preflushing) return;
    this.preflushing = true;
    void (async () => {
      try {
        while (this.saving && !this.paused && this.closed === null) {
          const t = performance.now();
          await this.backend.flush();
          // A fast flush means little to write back: no need to spin.
          if (performance.now() - t < 2) await new Promise((r) => setTimeout(r, 5));
        }
      } catch (err) {
        this.trace?.(`nvme: background flush failed: ${String(err)}`);
      } finally {
        this.preflushing = false;
      }
    })();
  }

  /** The controller's state (see state.ts), taken while stopped. */
  protected override saveDeviceState(): NvmeState {
    const r = this.regs;
    return saveState(this.migratingParts(), {
      regs: { cc: r.cc, csts: r.csts, aqa: r.aqa, asq: [...r.asq], acq: [...r.acq], intms: r.intms, pageSize: r.pageSize },
      doorbells: toBase64(this.doorbellPage.bytes),
      criticalWarning: this.criticalWarning,
    });
  }

  /** Checks a state from an identical controller (see state.ts); the returned function applies it. */
  protected override loadDeviceState(value: unknown): () => void {
    const s = checkNvmeState(value, {
      queues: this.maxQueues,
      maxQueueEntries: this.maxQueueEntries,
      vectors: this.vectors,
      aerLimit: this.events.limit,
      errorCapacity: this.errors.capacity,
      sensors: this.features.tempOver.length,
      doorbellBytes: this.doorbellPage.bytes.length,
    });
    const page = fromBase64(s.doorbells, this.doorbellPage.bytes.length, 'nvme.doorbells');
    if (s.shadow !== null && (s.shadow.dbs % s.regs.pageSize !== 0 || s.shadow.eis % s.regs.pageSize !== 0)) {
      throw new MigrationRefusedError('nvme.shadow: buffers not page aligned');
    }
    return () => this.applyState(s, page);
  }

  private applyState(s: NvmeState, page: Buffer): void {
    this.loop.epoch++;
    this.teardown();
    const r = this.regs;
    r.cc = s.regs.cc;
    r.csts = s.regs.csts;
    r.aqa = s.regs.aqa;
    r.asq[0] = s.regs.asq[0]!;
    r.asq[1] = s.regs.asq[1]!;
    r.acq[0] = s.regs.acq[0]!;
    r.acq[1] = s.regs.acq[1]!;
    r.intms = s.regs.intms;
    r.pageSize = s.regs.pageSize;
    this.doorbellPage.bytes.set(page);
    restoreState(this.migratingParts(), s, this.loop.epoch, (sq, req) => {
      this.loop.executingAdmin = req;
      this.deleteSq(sq, () => this.loop.finish(req, Status.SUCCESS));
      this.loop.executingAdmin = null;
    });
    this.criticalWarning = s.criticalWarning;
    this.trace?.(`nvme: state loaded (${this.queues.activeSqs.length} SQs, ${this.queues.activeCqs.length} CQs)`);
  }

  private migratingParts(): MigratingParts {
    return { dma: this.dma, queues: this.queues, features: this.features, events: this.events, errors: this.errors, stats: this.stats, irqs: this.interrupts };
  }

  override irqsChanged(index: number): void {
    if (index === PciIrq.INTX) this.interrupts.updateIntx();
    super.irqsChanged(index);
  }

  // ---- doorbells and queues ----

  configureShadowDoorbells(dbs: number, eis: number): number {
    return this.doorbells.configureShadows(dbs, eis);
  }

  createCq(qid: number, size: number, iova: number, vector: number, ien: boolean): number {
    const cq = new CompletionQueue(this.dma, qid, size, iova, vector, ien);
    if (!cq.ring.reachable()) return Status.INVALID_FIELD;
    this.queues.addCq(cq);
    this.doorbells.queueCreated(cqDoorbellIndex(qid));
    return Status.SUCCESS;
  }

  createSq(qid: number, size: number, iova: number, cq: CompletionQueue): number {
    const sq = new SubmissionQueue(this.dma, qid, size, iova, cq, Sqe.SIZE);
    if (!sq.ring.reachable()) return Status.INVALID_FIELD;
    this.queues.addSq(sq);
    this.doorbells.queueCreated(sqDoorbellIndex(qid));
    return Status.SUCCESS;
  }

  deleteSq(sq: SubmissionQueue, done: () => void): void {
    const cid = this.loop.executingAdmin?.cid ?? 0;
    const epoch = this.loop.epoch;
    const remove = () => {
      this.queues.deletions.delete(sq);
      if (this.loop.epoch !== epoch) return;
      this.queues.removeSq(sq);
      done();
    };
    if (sq.inflight === 0) remove();
    else {
      sq.onDrained = remove;
      this.queues.deletions.set(sq, cid);
    }
  }

  deleteCq(cq: CompletionQueue): void {
    this.queues.removeCq(cq);
    this.interrupts.forget(cq);
  }

  /** Posts the completion of a request that a handler deferred (AdminContext). */
  finish(req: QueuedRequest, status: number): void {
    this.loop.finish(req, status);
  }

  /** A backend operation failed (IoContext). */
  backendError(req: Request, err: unknown): void {
    this.trace?.(`nvme: backend error for opcode 0x${hex(req.opcode, 2)} at LBA ${req.lba}: ${(err as Error)?.message ?? String(err)}`);
  }

  // ---- SMART, temperature ----

  /** Current SMART / Health counters. */
  health(): HealthCounters {
    const busyMs = this.loop.busyMs + (this.loop.busy > 0 ? performance.now() - this.loop.busySince : 0);
    return {
      criticalWarning: this.criticalWarning,
      temperature: TEMPERATURE,
      units512Read: this.stats.units512Read,
      units512Written: this.stats.units512Written,
      hostReads: this.stats.hostReads,
      hostWrites: this.stats.hostWrites,
      busyMinutes: Math.floor(busyMs / 60_000),
      powerCycles: 1,
      powerOnHours: Math.floor((Date.now() - this.createdAt) / 3_600_000),
      unsafeShutdowns: this.stats.unsafeShutdowns,
      mediaErrors: this.stats.mediaErrors,
      errorLogEntries: this.errors.count,
    };
  }

  temperatureChanged(): void {
    const warn = temperatureWarning(this.features, TEMPERATURE);
    if (!warn) {
      this.criticalWarning &= ~CriticalWarning.TEMPERATURE;
      return;
    }
    this.criticalWarning |= CriticalWarning.TEMPERATURE;
    if ((this.features.asyncEventConfig & CriticalWarning.TEMPERATURE) !== 0) {
      this.events.raise(AerType.SMART, 0x01, LogId.SMART);
    }
  }
}

// ---- helpers ----

/** A 64-bit register pair as a Number; -1 above 2^53. */
function u64(pair: readonly number[]): number {
  const hi = pair[1]! >>> 0;
  if (hi > 0x1f_ffff) return -1;
  return hi * 0x1_0000_0000 + (pair[0]! >>> 0);
}
