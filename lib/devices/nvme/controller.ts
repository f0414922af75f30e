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
 * Guest errors are completion statuses, never exceptions (admin.ts, io.ts); exceptions from this
 * file mean bugs and become Internal Error completions plus a trace line.
 *
 * @packageDocumentation
 */
import { createHash, randomBytes } from 'node:crypto';
import { PciDevice, StopReason } from '../../pci/device';
import { ClassCode, VendorId } from '../../pci/ids';
import { Errno, PciIrq } from '../../protocol/constants';
import type { ResetReason } from '../../server/device';
import { AsyncEvents, ErrorLog, Features, adminCommand, temperatureWarning, type AdminContext } from './admin';
import type { BlockBackend } from '../../block/backend';
import { RamBackend } from '../../block/ram';
import type { BulkData } from '../../server/state-stream';
import { MigrationRefusedError, fromBase64, toBase64 } from '../../server/state-stream';
import { AdminOpcode, AerErrorInfo, AerType, CriticalWarning, IoOpcode, LogId, Status, statusCode } from '../../nvme/spec/constants';
import { Dsm } from '../../nvme/spec/commands';
import { DOORBELL_MODES, DoorbellPage, type DoorbellMode } from './doorbells';
import { AdaptivePoller, DEFAULT_POLL_POLICY, type PollPolicy, type PollTarget } from '../../pci/poller';
import { ioCommand, type IoContext, type IoStats } from './io';
import { copyFromGuestSync } from './prp';
import { NVME_STATE_VERSION, RamNamespaceData, checkNvmeState, type CqState, type NvmeState, type SqState } from './state';
import { CompletionQueue, ShadowDoorbells, SubmissionQueue, cqDoorbellIndex, sqDoorbellIndex, type QueuedRequest } from './queues';
import { ADMIN_QUEUE_BASE_MASK_LO, AQA_WRITABLE, Aqa, CC_WRITABLE, Cc, Csts, DOORBELL_OFFSET, Reg, Shn, Shst, ccShutdown } from '../../nvme/spec/registers';
import { BAR0_SIZE, MPSMAX, MPSMIN, NVME_VERSION, capValue } from './registers';
import { DEFERRED, type HandlerResult } from './request';
import { Dlfeat, Oacs, Oncs, Sqe, VWC_FLUSH_BROADCAST, VWC_PRESENT } from '../../nvme/spec/structs';
import type { ControllerIdentity, HealthCounters, NamespaceIdentity } from './builders';

/** Options of {@link NvmeController}. */
export interface NvmeControllerOptions {
  /** The namespace's storage; the controller owns it from now on and closes it in {@link NvmeController.close}. */
  backend: BlockBackend;
  /** I/O queue pairs, 1..64 (default 16). MSI-X vectors = queues + 1. */
  queues?: number;
  /** Logical block size (default 512). */
  blockSize?: 512 | 4096;
  /** Serial number, up to 20 ASCII characters (default: random). Namespace IDs derive from it. */
  serial?: string;
  /** Model number, up to 40 ASCII characters. */
  model?: string;
  /** Firmware revision, up to 8 ASCII characters. */
  firmware?: string;
  /** How doorbell writes reach the controller (default `'trap'`; see doorbells.ts). */
  doorbells?: DoorbellMode;
  /** Maximum Data Transfer Size: 2^mdts * 4 KiB; 0 = no limit. Default 7 (512 KiB). */
  mdts?: number;
  /** Largest I/O queue, in entries (CAP.MQES + 1), 2..65536; default 1024. */
  maxQueueEntries?: number;
  /** Polling policy for mmap'd and shadow doorbells. */
  poll?: Partial<PollPolicy>;
  /** PCI vendor and device ID (default 0x4e58:0x0001, Nutanix's vfio-user NVMe ID). */
  vendorId?: number;
  deviceId?: number;
  /** Receives one line per notable event (controller state, admin commands, errors). */
  trace?: (line: string) => void;
}

const MAX_QUEUES = 64;
const DEFAULT_QUEUES = 16;
const DEFAULT_MDTS = 7;
const DEFAULT_QUEUE_ENTRIES = 1024;
/** CAP.TO: how long a CC.EN transition may take (in-flight backend I/O must finish first). */
const READY_TIMEOUT_MS = 10_000;
/** MSI-X table and PBA live in BAR4. */
const MSIX_BAR = 4;
const MSIX_BAR_SIZE = 0x1000;
const MSIX_PBA_OFFSET = 0x800;
/** Commands fetched per processing pass before yielding to the event loop. */
const PASS_BUDGET = 256;
/** Kelvin: composite temperature reported, warning and critical thresholds. */
const TEMPERATURE = 313;
const WCTEMP = 343;
const CCTEMP = 373;
const AERL = 3;
const ELPE = 63;

/** SMART counters kept by the controller. */
interface Stats extends IoStats {
  unsafeShutdowns: number;
}

export class NvmeController extends PciDevice implements AdminContext, IoContext, PollTarget {
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
  /**
   * How doorbell values arrived: `trapped` as REGION_WRITEs, `mapped` found in the shared page
   * (mmap'd, or the ioeventfds' shadow memory),
   * `shadow` found in the shadow doorbell buffer (each counts values that moved a tail or head).
   */
  readonly doorbellCounts = { trapped: 0, mapped: 0, shadow: 0 };

  private readonly trace: ((line: string) => void) | undefined;
  private readonly cap: [number, number];
  private cc = 0;
  private csts = 0;
  private aqa = 0;
  private readonly asq = [0, 0];
  private readonly acq = [0, 0];
  private intms = 0;
  private pageSizeValue = 4096;
  private readonly doorbellPage: DoorbellPage;
  private readonly sqs: (SubmissionQueue | null)[];
  private readonly cqs: (CompletionQueue | null)[];
  /** Existing queues, admin first, in creation order (round-robin order). */
  private activeSqs: SubmissionQueue[] = [];
  private activeCqs: CompletionQueue[] = [];
  private rr = 0;
  private shadow: ShadowDoorbells | null = null;
  /** Generation: bumped by every reset; completions of older commands are dropped. */
  private epoch = 0;
  /** Handlers whose promise has not settled (backend I/O, DMA in progress). */
  private busy = 0;
  private idleWaiters: (() => void)[] = [];
  private busySince = 0;
  private busyMs = 0;
  private processing = false;
  private again = false;
  private processScheduled = false;
  private readonly processLater = () => {
    this.processScheduled = false;
    this.process();
  };
  private readonly irqCqs: CompletionQueue[] = [];
  /** The admin command being executed (its CID is what a deferred Delete I/O SQ is saved with). */
  private executingAdmin: QueuedRequest | null = null;
  /** Delete I/O SQ commands waiting for their queue's commands, by queue: the command's CID. */
  private readonly deletions = new Map<SubmissionQueue, number>();
  private irqFlushQueued = false;
  private readonly flushIrqsBound = () => this.flushIrqs();
  private readonly coalesceCount: Uint32Array;
  private readonly coalesceTimers: (NodeJS.Timeout | null)[];
  private intxAsserted = false;
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
    const queues = options.queues ?? DEFAULT_QUEUES;
    if (!Number.isInteger(queues) || queues < 1 || queues > MAX_QUEUES) throw new RangeError(`Expected queues from 1 to ${MAX_QUEUES}, got ${queues}`);
    const blockSize = options.blockSize ?? 512;
    if (blockSize !== 512 && blockSize !== 4096) throw new RangeError(`Expected blockSize 512 or 4096, got ${String(blockSize)}`);
    const mdts = options.mdts ?? DEFAULT_MDTS;
    if (!Number.isInteger(mdts) || mdts < 0 || mdts > 16) throw new RangeError(`Expected mdts from 0 to 16, got ${mdts}`);
    const entries = options.maxQueueEntries ?? DEFAULT_QUEUE_ENTRIES;
    if (!Number.isInteger(entries) || entries < 2 || entries > 65536) throw new RangeError(`Expected maxQueueEntries from 2 to 65536, got ${entries}`);
    const blocks = Math.floor(options.backend.size / blockSize);
    if (blocks < 1) throw new RangeError(`The backend (${options.backend.size} bytes) holds no ${blockSize}-byte block`);
    const mode = options.doorbells ?? 'trap';
    if (!DOORBELL_MODES.includes(mode)) throw new RangeError(`Expected doorbells 'trap', 'mmap' or 'ioeventfd', got ${String(mode)}`);
    const vendorId = options.vendorId ?? VendorId.NUTANIX;
    const vectors = queues + 1;
    const page = new DoorbellPage(mode, 2 * (queues + 1));
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
    if (mode === 'ioeventfd') {
      this.setIoEventfds(0, page.ioeventfds);
      page.onRing = () => this.doorbellRang();
    }
    this.doorbellPage = page;
    this.doorbellMode = mode;
    this.backend = options.backend;
    this.blockSize = blockSize;
    this.blockShift = blockSize === 512 ? 9 : 12;
    this.blocks = blocks;
    this.maxQueues = queues;
    this.maxQueueEntries = entries;
    this.maxTransfer = mdts === 0 ? Infinity : 2 ** mdts * 4096;
    this.vectors = vectors;
    this.trace = options.trace;
    this.cap = capValue({ maxQueueEntries: entries, timeoutMs: READY_TIMEOUT_MS });
    this.sqs = new Array<SubmissionQueue | null>(queues + 1).fill(null);
    this.cqs = new Array<CompletionQueue | null>(queues + 1).fill(null);
    this.coalesceCount = new Uint32Array(vectors);
    this.coalesceTimers = new Array<NodeJS.Timeout | null>(vectors).fill(null);
    this.features = new Features(vectors, WCTEMP);
    this.events = new AsyncEvents(AERL + 1, (req, status) => this.finish(req, status));
    this.poller = new AdaptivePoller(this, { ...DEFAULT_POLL_POLICY, ...options.poll });

    const serial = options.serial ?? `VU${randomBytes(6).toString('hex').toUpperCase()}`;
    const model = options.model ?? 'vfio-user NVMe controller';
    const firmware = options.firmware ?? '0.1.0';
    const ids = deriveIds(serial, model);
    this.controllerIdentity = {
      vendorId,
      subsystemVendorId: vendorId,
      serial,
      model,
      firmware,
      mdts,
      cntlid: 1,
      aerl: AERL,
      acl: 3,
      elpe: ELPE,
      wctemp: WCTEMP,
      cctemp: CCTEMP,
      capacity: blocks * blockSize,
      subnqn: `nqn.2014-08.org.nvmexpress:uuid:${ids.uuidText}`,
      oncs: Oncs.COMPARE | Oncs.DSM | Oncs.WRITE_ZEROES,
      oacs: Oacs.DBBUF,
      vwc: VWC_PRESENT | VWC_FLUSH_BROADCAST,
      version: NVME_VERSION,
    };
    const zeroes = options.backend.discardZeroes === true;
    this.namespaceIdentity = {
      blocks,
      lbads: this.blockShift,
      dlfeat: zeroes ? Dlfeat.READ_ZEROES | Dlfeat.WZ_DEAC : Dlfeat.NOT_REPORTED,
      nguid: ids.nguid,
      eui64: ids.eui64,
      uuid: ids.uuid,
      npwg: Math.max(1, 4096 >> this.blockShift),
      writeProtected: options.backend.readOnly === true,
    };
    this.ramData = options.backend instanceof RamBackend ? new RamNamespaceData(options.backend) : null;
    this.enableMigration();
  }

  // ---- public state ----

  /** CSTS.RDY. */
  get ready(): boolean {
    return (this.csts & Csts.RDY) !== 0;
  }

  /** CSTS.CFS. */
  get fatal(): boolean {
    return (this.csts & Csts.CFS) !== 0;
  }

  /** Memory page size (CC.MPS) in bytes. */
  get pageSize(): number {
    return this.pageSizeValue;
  }

  get msixEnabled(): boolean {
    return this.msix?.enabled ?? false;
  }

  get writeCacheEnabled(): boolean {
    return this.features.writeCache;
  }

  get hasIoQueues(): boolean {
    return this.activeSqs.length > 1 || this.activeCqs.length > 1;
  }

  /** Commands whose backend I/O is in progress. */
  get inFlight(): number {
    return this.busy;
  }

  sq(qid: number): SubmissionQueue | null {
    return this.sqs[qid] ?? null;
  }

  cq(qid: number): CompletionQueue | null {
    return this.cqs[qid] ?? null;
  }

  /** Stops polling, abandons queued work, waits for in-flight I/O, closes the backend. Idempotent. */
  close(): Promise<void> {
    this.closed ??= (async () => {
      this.epoch++;
      this.teardown();
      this.csts = 0;
      await this.whenIdle();
      this.doorbellPage.close();
      await this.backend.close();
    })();
    return this.closed;
  }

  // ---- BAR0: registers and doorbells ----

  private readBar0(offset: number, dst: Buffer): number {
    if (this.closed !== null) return Errno.EIO;
    this.poller.wake();
    const page = this.doorbellPage.bytes;
    let value = 0;
    let base = -1;
    for (let i = 0; i < dst.length; i++) {
      const at = offset + i;
      if (at >= DOORBELL_OFFSET) {
        dst[i] = page[at - DOORBELL_OFFSET]!;
        continue;
      }
      const b = at & ~3;
      if (b !== base) {
        base = b;
        value = this.readRegister(b);
      }
      dst[i] = (value >>> ((at - b) * 8)) & 0xff;
    }
    return 0;
  }

  private writeBar0(offset: number, src: Buffer): number {
    if (this.closed !== null) return Errno.EIO;
    let i = 0;
    while (i < src.length) {
      const at = offset + i;
      const base = at & ~3;
      const end = Math.min(src.length, i + base + 4 - at);
      if (base >= DOORBELL_OFFSET) {
        const index = (base - DOORBELL_OFFSET) >> 2;
        let v = this.doorbellPage.read(index);
        for (let k = i; k < end; k++) v = setByte(v, offset + k - base, src[k]!);
        this.doorbellPage.write(index, v);
        this.doorbellWrite(index, v >>> 0);
      } else {
        // INTMS and INTMC are write-1-to-set/clear: bytes not written count as 0.
        let v = base === Reg.INTMS || base === Reg.INTMC ? 0 : this.readRegister(base);
        for (let k = i; k < end; k++) v = setByte(v, offset + k - base, src[k]!);
        this.writeRegister(base, v >>> 0);
      }
      i = end;
    }
    this.poller.wake();
    return 0;
  }

  private readRegister(base: number): number {
    switch (base) {
      case Reg.CAP:
        return this.cap[0];
      case Reg.CAP + 4:
        return this.cap[1];
      case Reg.VS:
        return NVME_VERSION;
      case Reg.INTMS:
      case Reg.INTMC:
        return this.intms;
      case Reg.CC:
        return this.cc;
      case Reg.CSTS:
        return this.csts;
      case Reg.AQA:
        return this.aqa;
      case Reg.ASQ:
        return this.asq[0]!;
      case Reg.ASQ + 4:
        return this.asq[1]!;
      case Reg.ACQ:
        return this.acq[0]!;
      case Reg.ACQ + 4:
        return this.acq[1]!;
      default:
        return 0; // reserved, optional features absent (CMB, PMR, boot partitions), NSSR
    }
  }

  private writeRegister(base: number, value: number): void {
    switch (base) {
      case Reg.INTMS:
        this.intms = (this.intms | value) >>> 0;
        this.updateIntx();
        return;
      case Reg.INTMC:
        this.intms = (this.intms & ~value) >>> 0;
        this.updateIntx();
        return;
      case Reg.CC:
        this.writeCc(value);
        return;
      case Reg.AQA:
        this.aqa = value & AQA_WRITABLE;
        return;
      case Reg.ASQ:
        this.asq[0] = (value & ADMIN_QUEUE_BASE_MASK_LO) >>> 0;
        return;
      case Reg.ASQ + 4:
        this.asq[1] = value;
        return;
      case Reg.ACQ:
        this.acq[0] = (value & ADMIN_QUEUE_BASE_MASK_LO) >>> 0;
        return;
      case Reg.ACQ + 4:
        this.acq[1] = value;
        return;
      default:
        return; // read-only or reserved; NSSR without CAP.NSSRS does nothing
    }
  }

  private writeCc(value: number): void {
    const old = this.cc;
    let next = value & CC_WRITABLE;
    const wasEnabled = (old & Cc.EN) !== 0;
    const enable = (next & Cc.EN) !== 0;
    if (wasEnabled && enable) {
      // While enabled, page size, command set and arbitration are fixed.
      const fixed = Cc.MPS_MASK | Cc.CSS_MASK | Cc.AMS_MASK;
      next = (next & ~fixed) | (old & fixed);
    }
    this.cc = next >>> 0;
    if (this.trace && old !== next) this.trace(`nvme: CC 0x${hex(old)} -> 0x${hex(next)}`);
    if (!wasEnabled && enable) this.enable();
    else if (wasEnabled && !enable) this.controllerReset('CC.EN cleared');
    const shn = ccShutdown(next);
    if (shn !== Shn.NONE && ccShutdown(old) === Shn.NONE && enable) this.shutdown(shn);
  }

  // ---- state machine ----

  private get running(): boolean {
    return (this.csts & (Csts.RDY | Csts.CFS | Csts.SHST_MASK)) === Csts.RDY && !this.resetting && !this.shuttingDown && !this.paused;
  }

  /** Enabled and healthy, paused or not (doorbells written while paused are recorded). */
  private get live(): boolean {
    return (this.csts & (Csts.RDY | Csts.CFS | Csts.SHST_MASK)) === Csts.RDY && !this.resetting && !this.shuttingDown;
  }

  private enable(): void {
    if (this.resetting || (this.csts & Csts.RDY) !== 0 || this.closed !== null) return;
    const cc = this.cc;
    const asqs = (this.aqa & Aqa.ASQS_MASK) + 1;
    const acqs = ((this.aqa & Aqa.ACQS_MASK) >>> Aqa.ACQS_SHIFT) + 1;
    const mps = (cc & Cc.MPS_MASK) >>> Cc.MPS_SHIFT;
    const css = (cc & Cc.CSS_MASK) >>> Cc.CSS_SHIFT;
    const ams = (cc & Cc.AMS_MASK) >>> Cc.AMS_SHIFT;
    const asq = u64(this.asq);
    const acq = u64(this.acq);
    let problem = '';
    if (asqs < 2 || acqs < 2) problem = `admin queue sizes ${asqs}/${acqs}`;
    else if (mps < MPSMIN || mps > MPSMAX) problem = `page size 2^${12 + mps}`;
    else if (css !== 0) problem = `command set ${css}`;
    else if (ams !== 0) problem = `arbitration mechanism ${ams}`;
    else if (asq < 0 || acq < 0) problem = 'admin queue address above 2^53';
    if (problem !== '') {
      this.csts |= Csts.CFS;
      this.trace?.(`nvme: enable failed (${problem}): CSTS.CFS`);
      return;
    }
    this.pageSizeValue = 1 << (12 + mps);
    const dma = this.dma;
    const cq = new CompletionQueue(dma, 0, acqs, acq, 0, true);
    const sq = new SubmissionQueue(dma, 0, asqs, asq, cq, Sqe.SIZE);
    cq.sqCount = 1;
    this.cqs[0] = cq;
    this.sqs[0] = sq;
    this.activeCqs = [cq];
    this.activeSqs = [sq];
    this.csts = Csts.RDY;
    this.trace?.(`nvme: ready (admin SQ ${asqs}@0x${asq.toString(16)}, CQ ${acqs}@0x${acq.toString(16)}, page ${this.pageSizeValue})`);
    this.poller.wake();
  }

  /**
   * Controller reset: queues deleted, commands abandoned, features to defaults. CSTS.RDY clears
   * when the backend I/O already started has finished. Resolves then.
   */
  private controllerReset(why: string): Promise<void> {
    this.epoch++;
    this.teardown();
    this.trace?.(`nvme: reset (${why}), ${this.busy} command(s) still in the backend`);
    if (this.busy === 0) {
      this.finishReset();
      return Promise.resolve();
    }
    this.resetting = true;
    const epoch = this.epoch;
    if (this.resetTimer !== null) clearTimeout(this.resetTimer);
    this.resetTimer = setTimeout(() => {
      if (this.resetting && this.epoch === epoch) {
        this.csts |= Csts.CFS;
        this.trace?.(`nvme: reset exceeded CAP.TO (${READY_TIMEOUT_MS} ms): CSTS.CFS`);
      }
    }, READY_TIMEOUT_MS);
    this.resetTimer.unref();
    this.resetDone = this.whenIdle().then(() => {
      if (this.epoch === epoch) this.finishReset();
    });
    return this.resetDone;
  }

  private finishReset(): void {
    if (this.resetTimer !== null) clearTimeout(this.resetTimer);
    this.resetTimer = null;
    this.resetting = false;
    this.shuttingDown = false;
    this.csts = 0;
    // A host that set CC.EN again without waiting for RDY = 0 gets its enable now.
    if ((this.cc & Cc.EN) !== 0) this.enable();
  }

  /** Drops every queue, pending completion, event, timer and shadow doorbell. */
  private teardown(): void {
    this.poller.stop();
    for (let v = 0; v < this.coalesceTimers.length; v++) {
      const t = this.coalesceTimers[v];
      if (t) clearTimeout(t);
      this.coalesceTimers[v] = null;
    }
    this.coalesceCount.fill(0);
    this.sqs.fill(null);
    this.cqs.fill(null);
    this.activeSqs = [];
    this.activeCqs = [];
    this.irqCqs.length = 0;
    this.rr = 0;
    this.shadow = null;
    this.deletions.clear();
    this.events.reset();
    this.features.reset();
    this.criticalWarning = 0;
    this.doorbellPage.clear();
    this.updateIntx();
  }

  private shutdown(kind: number): void {
    const epoch = this.epoch;
    this.shuttingDown = true;
    this.csts = (this.csts & ~Csts.SHST_MASK) | (Shst.OCCURRING << Csts.SHST_SHIFT);
    this.trace?.(`nvme: ${kind === Shn.ABRUPT ? 'abrupt' : 'normal'} shutdown`);
    this.shutdownDone = this.whenIdle()
      .then(() => this.backend.flush())
      .then(
        () => true,
        (err: unknown) => {
          this.trace?.(`nvme: flush at shutdown failed: ${String(err)}`);
          return false;
        },
      )
      .then((ok) => {
        if (this.epoch !== epoch) return;
        this.csts = (this.csts & ~Csts.SHST_MASK) | (Shst.COMPLETE << Csts.SHST_SHIFT) | (ok ? 0 : Csts.CFS);
        this.trace?.('nvme: shutdown complete');
      });
  }

  private fail(why: string): void {
    if ((this.csts & Csts.CFS) === 0) this.trace?.(`nvme: fatal: ${why}: CSTS.CFS`);
    this.csts |= Csts.CFS;
    this.poller.stop();
  }

  /** DEVICE_RESET, FLR, lost connection: a controller reset plus registers to power-on values. */
  protected override async onReset(reason: ResetReason): Promise<void> {
    if (reason === 'lost-connection' && (this.csts & Csts.RDY) !== 0 && (this.csts & Csts.SHST_MASK) === 0) this.stats.unsafeShutdowns++;
    this.intxAsserted = false;
    this.cc = 0;
    this.aqa = 0;
    this.asq[0] = this.asq[1] = 0;
    this.acq[0] = this.acq[1] = 0;
    this.intms = 0;
    await this.controllerReset(`device reset: ${reason}`);
    // A departed client's copies of the doorbell eventfd and memory must reach nothing.
    if (reason === 'lost-connection' && this.doorbellMode === 'ioeventfd') this.setIoEventfds(0, this.doorbellPage.renew());
    this.csts = 0;
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
    this.trace?.(`nvme: stopping (${reason === StopReason.MIGRATION ? 'migration' : 'client gone, state kept'}), ${this.busy} command(s) in the backend`);
    await this.whenIdle();
    await this.resetDone;
    await this.shutdownDone;
    if (this.irqFlushQueued) this.flushIrqs();
    if (reason === StopReason.MIGRATION && this.ramData === null) {
      try {
        await this.backend.flush();
      } catch (err) {
        this.trace?.(`nvme: flush at stop failed: ${String(err)}`);
      }
    }
    if (!this.paused) return; // resumed meanwhile
    this.frozen = true;
    for (let v = 0; v < this.coalesceTimers.length; v++) {
      const t = this.coalesceTimers[v];
      if (t) clearTimeout(t);
      this.coalesceTimers[v] = null;
    }
  }

  /** Run again: post completions that waited, interrupt for what the host has not consumed, fetch. */
  protected override onRun(): void {
    this.paused = false;
    this.frozen = false;
    for (const cq of this.activeCqs) if (cq.waiting.length > 0) this.cqHeadMoved(cq);
    if (this.msixEnabled) {
      const fired = new Set<number>();
      for (const cq of this.activeCqs) {
        if (!cq.ien || cq.outstanding === 0 || fired.has(cq.vector)) continue;
        fired.add(cq.vector);
        this.fire(cq.vector);
      }
    } else {
      this.updateIntx();
    }
    this.trace?.('nvme: running');
    this.poller.wake();
    if (this.pollable) this.poll();
    this.process();
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
    const waitingOf = (cq: CompletionQueue) => cq.waiting.map((r) => ({ sq: r.sq.id, cid: r.cid, status: r.status, dw0: r.dw0 >>> 0, dw1: r.dw1 >>> 0 }));
    const cqs: CqState[] = this.activeCqs.map((cq) => ({
      id: cq.id,
      size: cq.size,
      iova: cq.iova,
      vector: cq.vector,
      ien: cq.ien,
      head: cq.head,
      tail: cq.tail,
      phase: cq.phase,
      lastDoorbell: cq.lastDoorbell >>> 0,
      lastShadow: cq.lastShadow >>> 0,
      shadowUsed: cq.shadowUsed,
      waiting: waitingOf(cq),
    }));
    const sqs: SqState[] = this.activeSqs.map((sq) => ({
      id: sq.id,
      size: sq.size,
      iova: sq.iova,
      cq: sq.cq.id,
      head: sq.head,
      tail: sq.tail,
      lastDoorbell: sq.lastDoorbell >>> 0,
      lastShadow: sq.lastShadow >>> 0,
      shadowUsed: sq.shadowUsed,
      deleting: this.deletions.get(sq) ?? null,
    }));
    const f = this.features;
    const events = this.events.snapshot();
    return {
      version: NVME_STATE_VERSION,
      regs: { cc: this.cc, csts: this.csts, aqa: this.aqa, asq: [...this.asq], acq: [...this.acq], intms: this.intms, pageSize: this.pageSizeValue },
      doorbells: toBase64(this.doorbellPage.bytes),
      shadow: this.shadow === null ? null : { dbs: this.shadow.dbsIova, eis: this.shadow.eisIova },
      cqs,
      sqs,
      rr: this.rr,
      features: {
        arbitration: f.arbitration,
        powerState: f.powerState,
        tempOver: [...f.tempOver],
        tempUnder: [...f.tempUnder],
        errorRecovery: f.errorRecovery,
        writeCache: f.writeCache,
        coalescing: f.coalescing,
        coalescingDisabled: [...f.coalescingDisabled],
        writeAtomicity: f.writeAtomicity,
        asyncEventConfig: f.asyncEventConfig,
      },
      events,
      errors: { count: this.errors.count, entries: this.errors.snapshot() },
      stats: { ...this.stats },
      criticalWarning: this.criticalWarning,
      coalesce: [...this.coalesceCount],
    };
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
    this.epoch++;
    this.teardown();
    this.cc = s.regs.cc;
    this.csts = s.regs.csts;
    this.aqa = s.regs.aqa;
    this.asq[0] = s.regs.asq[0]!;
    this.asq[1] = s.regs.asq[1]!;
    this.acq[0] = s.regs.acq[0]!;
    this.acq[1] = s.regs.acq[1]!;
    this.intms = s.regs.intms;
    this.pageSizeValue = s.regs.pageSize;
    this.doorbellPage.bytes.set(page);
    const dma = this.dma;
    for (const q of s.cqs) {
      const cq = new CompletionQueue(dma, q.id, q.size, q.iova, q.vector, q.ien);
      cq.head = q.head;
      cq.tail = q.tail;
      cq.phase = q.phase;
      cq.lastDoorbell = q.lastDoorbell;
      cq.lastShadow = q.lastShadow;
      cq.shadowUsed = q.shadowUsed;
      this.cqs[q.id] = cq;
      this.activeCqs.push(cq);
    }
    for (const q of s.sqs) {
      const cq = this.cqs[q.cq]!;
      const sq = new SubmissionQueue(dma, q.id, q.size, q.iova, cq, Sqe.SIZE);
      sq.head = q.head;
      sq.tail = q.tail;
      sq.lastDoorbell = q.lastDoorbell;
      sq.lastShadow = q.lastShadow;
      sq.shadowUsed = q.shadowUsed;
      cq.sqCount++;
      this.sqs[q.id] = sq;
      this.activeSqs.push(sq);
    }
    this.rr = s.rr % Math.max(1, this.activeSqs.length);
    // Commands that were in flight on the source: completions waiting for room, outstanding AERs,
    // Delete I/O SQ commands waiting for their queue's commands.
    for (const q of s.cqs) {
      const cq = this.cqs[q.id]!;
      for (const c of q.waiting) {
        const req = this.sqs[c.sq]!.restoreRequest(c.cid, 0);
        req.epoch = this.epoch;
        req.status = c.status;
        req.dw0 = c.dw0;
        req.dw1 = c.dw1;
        cq.waiting.push(req);
      }
    }
    const admin = this.sqs[0];
    const aers = admin == null ? [] : s.events.outstanding.map((cid) => {
      const req = admin.restoreRequest(cid, AdminOpcode.ASYNC_EVENT);
      req.epoch = this.epoch;
      return req;
    });
    this.events.restore(aers, s.events.queue, s.events.masked);
    for (const q of s.sqs) {
      if (q.deleting === null || admin == null) continue;
      const req = admin.restoreRequest(q.deleting, AdminOpcode.DELETE_SQ);
      req.epoch = this.epoch;
      req.cdw10 = q.id;
      this.executingAdmin = req;
      this.deleteSq(this.sqs[q.id]!, () => this.finish(req, Status.SUCCESS));
      this.executingAdmin = null;
    }
    this.shadow = s.shadow === null ? null : new ShadowDoorbells(dma, s.shadow.dbs, s.shadow.eis, s.regs.pageSize);
    const f = this.features;
    f.arbitration = s.features.arbitration;
    f.powerState = s.features.powerState;
    s.features.tempOver.forEach((v, i) => (f.tempOver[i] = v));
    s.features.tempUnder.forEach((v, i) => (f.tempUnder[i] = v));
    f.errorRecovery = s.features.errorRecovery;
    f.writeCache = s.features.writeCache;
    f.coalescing = s.features.coalescing;
    f.coalescingDisabled.set(s.features.coalescingDisabled);
    f.writeAtomicity = s.features.writeAtomicity;
    f.asyncEventConfig = s.features.asyncEventConfig;
    this.errors.restore(s.errors.count, s.errors.entries);
    Object.assign(this.stats, s.stats);
    this.criticalWarning = s.criticalWarning;
    this.coalesceCount.set(s.coalesce);
    this.trace?.(`nvme: state loaded (${this.activeSqs.length} SQs, ${this.activeCqs.length} CQs)`);
  }

  override irqsChanged(index: number): void {
    if (index === PciIrq.INTX) this.updateIntx();
    super.irqsChanged(index);
  }

  // ---- busy accounting ----

  private busyEnter(): void {
    if (this.busy++ === 0) this.busySince = performance.now();
  }

  private busyLeave(): void {
    if (--this.busy > 0) return;
    this.busyMs += performance.now() - this.busySince;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  private whenIdle(): Promise<void> {
    if (this.busy === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  // ---- doorbells ----

  private doorbellWrite(index: number, value: number): void {
    if (!this.running) {
      if (this.paused && this.live) this.recordDoorbell(index, value);
      return;
    }
    const qid = index >> 1;
    const queue = index & 1 ? this.cqs[qid] : this.sqs[qid];
    if (this.shadow !== null && qid !== 0 && queue != null) {
      // With shadow doorbells a trapped write is only a wake-up. It travels as a posted message and
      // can arrive after newer values the controller already took from the shadow buffer; applying
      // it would move a tail backwards and re-run stale entries. A host that uses the shadows writes
      // them before the register, so they hold the newest value: read those instead. Only a host
      // that never touched this queue's shadow gets its register value applied.
      this.poll();
      if (queue.shadowUsed) {
        this.doorbellCounts.trapped++;
        return;
      }
    }
    if ((index & 1) === 0) {
      const sq = this.sqs[qid];
      if (sq == null) return this.badDoorbell(AerErrorInfo.INVALID_DB_REGISTER, index, value);
      sq.lastDoorbell = value;
      if (!sq.setTail(value)) return this.badDoorbell(AerErrorInfo.INVALID_DB_VALUE, index, value);
      this.doorbellCounts.trapped++;
      this.process();
    } else {
      const cq = this.cqs[qid];
      if (cq == null) return this.badDoorbell(AerErrorInfo.INVALID_DB_REGISTER, index, value);
      cq.lastDoorbell = value;
      if (!cq.setHead(value)) return this.badDoorbell(AerErrorInfo.INVALID_DB_VALUE, index, value);
      this.doorbellCounts.trapped++;
      this.cqHeadMoved(cq);
    }
  }

  /** A doorbell written while stopped: the new tail or head is taken, and acted on when resumed. */
  private recordDoorbell(index: number, value: number): void {
    const qid = index >> 1;
    const queue = index & 1 ? this.cqs[qid] : this.sqs[qid];
    if (queue == null) return this.badDoorbell(AerErrorInfo.INVALID_DB_REGISTER, index, value);
    // With shadow doorbells in use, the shadow holds the newest value (see doorbellWrite).
    if (this.shadow !== null && qid !== 0 && queue.shadowUsed) return;
    queue.lastDoorbell = value;
    const ok = index & 1 ? (queue as CompletionQueue).setHead(value) : (queue as SubmissionQueue).setTail(value);
    if (!ok) this.badDoorbell(AerErrorInfo.INVALID_DB_VALUE, index, value);
  }

  /**
   * An ioeventfd doorbell rang: the client stored the new values into the page (their shadow
   * memory) before signalling. Running: read them as the mmap'd page is read. Stopped: take them
   * as trapped writes are taken while stopped, to act on when resumed.
   */
  private doorbellRang(): void {
    if (this.running) {
      this.poll();
      return;
    }
    if (!this.paused || !this.live) return;
    const page = this.doorbellPage;
    for (const sq of this.activeSqs) {
      const i = sqDoorbellIndex(sq.id);
      if (page.read(i) !== sq.lastDoorbell) this.recordDoorbell(i, page.read(i));
    }
    for (const cq of this.activeCqs) {
      const i = cqDoorbellIndex(cq.id);
      if (page.read(i) !== cq.lastDoorbell) this.recordDoorbell(i, page.read(i));
    }
  }

  private badDoorbell(info: number, index: number, value: number): void {
    this.trace?.(`nvme: invalid doorbell ${index & 1 ? 'CQ' : 'SQ'} ${index >> 1} ${info === AerErrorInfo.INVALID_DB_REGISTER ? 'register' : `value ${value}`}`);
    this.events.raise(AerType.ERROR, info, LogId.ERROR);
  }

  /** PollTarget: reads the mmap'd doorbell page and the shadow doorbells. */
  poll(): boolean {
    if (!this.running) return false;
    let changed = false;
    if (this.doorbellMode !== 'trap') {
      const page = this.doorbellPage;
      for (const sq of this.activeSqs) {
        const v = page.read(sqDoorbellIndex(sq.id));
        if (v === sq.lastDoorbell) continue;
        sq.lastDoorbell = v;
        // A queue that uses its shadow doorbell takes its values from there (read below): the
        // register may hold an older one, as in doorbellWrite. Its change is only a wake-up.
        if (sq.shadowUsed && this.shadow !== null && sq.id !== 0) continue;
        if (sq.setTail(v)) {
          changed = true;
          this.doorbellCounts.mapped++;
        } else this.badDoorbell(AerErrorInfo.INVALID_DB_VALUE, sqDoorbellIndex(sq.id), v);
      }
      for (const cq of this.activeCqs) {
        const v = page.read(cqDoorbellIndex(cq.id));
        if (v === cq.lastDoorbell) continue;
        cq.lastDoorbell = v;
        if (cq.shadowUsed && this.shadow !== null && cq.id !== 0) continue;
        if (cq.setHead(v)) {
          changed = true;
          this.doorbellCounts.mapped++;
          this.cqHeadMoved(cq);
        } else this.badDoorbell(AerErrorInfo.INVALID_DB_VALUE, cqDoorbellIndex(cq.id), v);
      }
    }
    const shadow = this.shadow;
    if (shadow !== null) {
      for (const sq of this.activeSqs) {
        if (sq.id === 0) continue; // the admin queue never uses shadow doorbells
        const v = shadow.read(sqDoorbellIndex(sq.id));
        if (v < 0 || v === sq.lastShadow) continue;
        sq.lastShadow = v;
        sq.shadowUsed = true;
        if (sq.setTail(v)) {
          changed = true;
          this.doorbellCounts.shadow++;
        }
      }
      for (const cq of this.activeCqs) {
        if (cq.id !== 0 && this.refreshShadowHead(cq)) {
          changed = true;
          this.cqHeadMoved(cq);
        }
      }
    }
    if (changed) this.process();
    return changed;
  }

  /** PollTarget: publish EventIdx = what we have seen, then make sure nothing slipped past. */
  arm(): boolean {
    const shadow = this.shadow;
    if (shadow === null || !this.running) return true;
    for (const sq of this.activeSqs) if (sq.id !== 0) shadow.writeEventIdx(sqDoorbellIndex(sq.id), sq.tail);
    for (const cq of this.activeCqs) if (cq.id !== 0) shadow.writeEventIdx(cqDoorbellIndex(cq.id), cq.head);
    // The stores above are sequentially consistent, so this re-read cannot miss a tail the guest
    // published before it read our EventIdx.
    return !this.poll();
  }

  get pollable(): boolean {
    return this.running && (this.doorbellMode === 'mmap' || this.shadow !== null);
  }

  get canSleep(): boolean {
    return this.doorbellMode !== 'mmap';
  }

  /** Reads a CQ's shadow head; true if it moved. */
  private refreshShadowHead(cq: CompletionQueue): boolean {
    const shadow = this.shadow;
    if (shadow === null) return false;
    const v = shadow.read(cqDoorbellIndex(cq.id));
    if (v < 0 || v === cq.lastShadow) return false;
    cq.lastShadow = v;
    cq.shadowUsed = true;
    if (!cq.setHead(v)) return false;
    this.doorbellCounts.shadow++;
    return true;
  }

  /** The host consumed completions: post what waited for room, re-evaluate INTx. */
  private cqHeadMoved(cq: CompletionQueue): void {
    if (this.frozen) return; // posted when resumed
    const waiting = cq.waiting;
    while (waiting.length > 0 && !cq.full) {
      const req = waiting.shift()!;
      if (!this.post(req)) return;
    }
    if (this.intxAsserted) this.updateIntx();
  }

  configureShadowDoorbells(dbs: number, eis: number): number {
    const ps = this.pageSizeValue;
    if (dbs < 0 || eis < 0 || dbs % ps !== 0 || eis % ps !== 0 || dbs === eis) return Status.INVALID_FIELD;
    const shadow = new ShadowDoorbells(this.dma, dbs, eis, ps);
    if (!shadow.reachable()) return Status.INVALID_FIELD;
    this.shadow = shadow;
    // Start the shadows from the doorbells' current values (the host may already use its queues).
    for (const sq of this.activeSqs) {
      if (sq.id === 0) continue;
      shadow.writeDoorbell(sqDoorbellIndex(sq.id), sq.tail);
      shadow.writeEventIdx(sqDoorbellIndex(sq.id), sq.tail);
      sq.lastShadow = sq.tail;
      sq.shadowUsed = false;
    }
    for (const cq of this.activeCqs) {
      if (cq.id === 0) continue;
      shadow.writeDoorbell(cqDoorbellIndex(cq.id), cq.head);
      shadow.writeEventIdx(cqDoorbellIndex(cq.id), cq.head);
      cq.lastShadow = cq.head;
      cq.shadowUsed = false;
    }
    this.trace?.(`nvme: shadow doorbells at 0x${dbs.toString(16)}, EventIdx at 0x${eis.toString(16)}`);
    this.poller.wake();
    return Status.SUCCESS;
  }

  // ---- queues (AdminContext) ----

  createCq(qid: number, size: number, iova: number, vector: number, ien: boolean): number {
    const cq = new CompletionQueue(this.dma, qid, size, iova, vector, ien);
    if (!cq.ring.reachable()) return Status.INVALID_FIELD;
    this.cqs[qid] = cq;
    this.activeCqs.push(cq);
    this.doorbellPage.write(cqDoorbellIndex(qid), 0);
    if (this.shadow !== null) {
      this.shadow.writeDoorbell(cqDoorbellIndex(qid), 0);
      this.shadow.writeEventIdx(cqDoorbellIndex(qid), 0);
    }
    return Status.SUCCESS;
  }

  createSq(qid: number, size: number, iova: number, cq: CompletionQueue): number {
    const sq = new SubmissionQueue(this.dma, qid, size, iova, cq, Sqe.SIZE);
    if (!sq.ring.reachable()) return Status.INVALID_FIELD;
    this.sqs[qid] = sq;
    this.activeSqs.push(sq);
    cq.sqCount++;
    this.doorbellPage.write(sqDoorbellIndex(qid), 0);
    if (this.shadow !== null) {
      this.shadow.writeDoorbell(sqDoorbellIndex(qid), 0);
      this.shadow.writeEventIdx(sqDoorbellIndex(qid), 0);
    }
    return Status.SUCCESS;
  }

  deleteSq(sq: SubmissionQueue, done: () => void): void {
    const cid = this.executingAdmin?.cid ?? 0;
    const epoch = this.epoch;
    const remove = () => {
      this.deletions.delete(sq);
      if (this.epoch !== epoch) return;
      this.sqs[sq.id] = null;
      this.activeSqs = this.activeSqs.filter((q) => q !== sq);
      sq.cq.sqCount--;
      done();
    };
    if (sq.inflight === 0) remove();
    else {
      sq.onDrained = remove;
      this.deletions.set(sq, cid);
    }
  }

  deleteCq(cq: CompletionQueue): void {
    this.cqs[cq.id] = null;
    this.activeCqs = this.activeCqs.filter((q) => q !== cq);
    const i = this.irqCqs.indexOf(cq);
    if (i >= 0) this.irqCqs.splice(i, 1);
    this.updateIntx();
  }

  // ---- processing ----

  /** Fetches and runs commands, round-robin across submission queues, until none is ready. */
  private process(): void {
    if (this.processing) {
      this.again = true;
      return;
    }
    this.processing = true;
    try {
      let budget = PASS_BUDGET;
      do {
        this.again = false;
        budget = this.runQueues(budget);
      } while (this.again && budget > 0);
      if (budget <= 0) this.scheduleProcess();
    } finally {
      this.processing = false;
    }
  }

  private scheduleProcess(): void {
    if (this.processScheduled) return;
    this.processScheduled = true;
    setImmediate(this.processLater);
  }

  private runQueues(budget: number): number {
    const burst = this.features.burst;
    let progress = true;
    while (progress && budget > 0 && this.running) {
      progress = false;
      const list = this.activeSqs;
      const n = list.length;
      for (let k = 0; k < n && budget > 0; k++) {
        const sq = list[(this.rr + k) % n];
        if (sq === undefined) continue;
        let taken = 0;
        while (taken < burst && budget > 0 && sq.ready && this.running) {
          this.execute(sq);
          taken++;
          budget--;
          progress = true;
        }
      }
      if (n > 0) this.rr = (this.rr + 1) % n;
    }
    return budget;
  }

  private execute(sq: SubmissionQueue): void {
    const req = sq.fetch();
    if (req === null) {
      this.fail(`cannot read SQ ${sq.id} entry ${sq.head} at 0x${sq.iova.toString(16)}`);
      return;
    }
    req.epoch = this.epoch;
    let result: HandlerResult;
    try {
      if (sq.id === 0) {
        this.executingAdmin = req;
        result = adminCommand(this, req);
      } else {
        result = ioCommand(this, req);
      }
    } catch (err) {
      this.trace?.(`nvme: internal error in opcode 0x${hex(req.opcode, 2)} on SQ ${sq.id}: ${(err as Error)?.stack ?? String(err)}`);
      result = Status.INTERNAL;
    }
    this.executingAdmin = null;
    if (typeof result === 'number') {
      if (result !== DEFERRED) this.finish(req, result);
      return;
    }
    this.busyEnter();
    req.onSettled ??= (status: number) => {
      this.busyLeave();
      this.finish(req, status);
    };
    req.onFailed ??= (err: unknown) => {
      this.busyLeave();
      this.trace?.(`nvme: internal error in opcode 0x${hex(req.opcode, 2)} on SQ ${req.sq.id}: ${(err as Error)?.stack ?? String(err)}`);
      this.finish(req, Status.INTERNAL);
    };
    result.then(req.onSettled, req.onFailed);
  }

  /** Posts a command's completion (now, or when its CQ has room); drops it after a reset. */
  finish(req: QueuedRequest, status: number): void {
    const sq = req.sq;
    // A migration's dirty log: data written, even by a command a reset dropped, goes again.
    if (this.ramData !== null && sq.id !== 0 && this.ramData.tracking) this.noteWritten(req);
    if (req.epoch !== this.epoch) {
      sq.recycle(req);
      return;
    }
    req.status = status;
    if (sq.id === 0 && this.trace) this.trace(`nvme: admin ${adminName(req.opcode)} cid=${req.cid} -> ${statusText(status)}`);
    if (status !== Status.SUCCESS) this.recordError(req, status);
    const cq = sq.cq;
    // A full CQ may have room already if the host moved its shadow head.
    if (cq.full && cq.id !== 0 && this.refreshShadowHead(cq)) this.cqHeadMoved(cq);
    if (cq.waiting.length > 0 || cq.full || this.frozen) {
      cq.waiting.push(req);
      return;
    }
    this.post(req);
  }

  /** Logs the blocks a completed I/O command may have changed (RAM namespace, while migrating). */
  private noteWritten(req: QueuedRequest): void {
    const data = this.ramData!;
    const op = req.opcode;
    if (op === IoOpcode.WRITE || op === IoOpcode.WRITE_ZEROES) {
      if (req.cdw11 > 0x1f_ffff) return;
      const slba = req.cdw11 * 0x1_0000_0000 + req.cdw10;
      data.mark(slba * this.blockSize, ((req.cdw12 & 0xffff) + 1) * this.blockSize);
    } else if (op === IoOpcode.DSM && (req.cdw11 & Dsm.AD) !== 0) {
      // The ranges are still in guest memory; if they cannot be read now, everything goes again.
      const count = (req.cdw10 & 0xff) + 1;
      const list = dsmScratch.subarray(0, count * Dsm.RANGE_BYTES);
      if (req.segs.count === 0 || copyFromGuestSync(this.dma, req.segs, list) !== Status.SUCCESS) {
        data.markAll();
        return;
      }
      for (let i = 0; i < count; i++) {
        const at = i * Dsm.RANGE_BYTES;
        const hi = list.readUInt32LE(at + 12);
        if (hi > 0x1f_ffff) continue;
        data.mark((hi * 0x1_0000_0000 + list.readUInt32LE(at + 8)) * this.blockSize, list.readUInt32LE(at + 4) * this.blockSize);
      }
    }
  }

  private post(req: QueuedRequest): boolean {
    const sq = req.sq;
    const cq = sq.cq;
    if (!cq.post(req.dw0, req.dw1, sq.head, sq.id, req.cid, req.status)) {
      this.fail(`cannot write CQ ${cq.id} entry ${cq.tail} at 0x${cq.iova.toString(16)}`);
      sq.recycle(req);
      return false;
    }
    const wasFull = sq.inflight >= sq.size;
    sq.recycle(req);
    if (wasFull && sq.pending > 0) this.scheduleProcess();
    if (cq.ien) this.queueIrq(cq);
    this.poller.wake();
    return true;
  }

  private recordError(req: QueuedRequest, status: number): void {
    const code = statusCode(status);
    if (code === statusCode(Status.ABORT_REQ) || code === statusCode(Status.ABORT_QUEUE)) return;
    this.errors.record({ sqid: req.sq.id, cid: req.cid, status, location: 0xffff, lba: req.lba, nsid: req.nsid });
    if (req.sq.id !== 0 && this.trace) this.trace(`nvme: I/O opcode 0x${hex(req.opcode, 2)} cid=${req.cid} on SQ ${req.sq.id} -> ${statusText(status)}`);
  }

  /** A backend operation failed (IoContext). */
  backendError(req: QueuedRequest, err: unknown): void {
    this.trace?.(`nvme: backend error for opcode 0x${hex(req.opcode, 2)} at LBA ${req.lba}: ${(err as Error)?.message ?? String(err)}`);
  }

  // ---- interrupts ----

  private queueIrq(cq: CompletionQueue): void {
    if (cq.posted++ === 0) this.irqCqs.push(cq);
    if (!this.irqFlushQueued) {
      this.irqFlushQueued = true;
      queueMicrotask(this.flushIrqsBound);
    }
  }

  /** Once per batch of completions: interrupt each completion queue's vector (or update INTx). */
  private flushIrqs(): void {
    this.irqFlushQueued = false;
    const list = this.irqCqs;
    if (list.length === 0) return;
    if (!this.msixEnabled) {
      for (const cq of list) cq.posted = 0;
      list.length = 0;
      this.updateIntx();
      return;
    }
    const f = this.features;
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

  private fire(vector: number): void {
    const t = this.coalesceTimers[vector];
    if (t) clearTimeout(t);
    this.coalesceTimers[vector] = null;
    if (this.frozen) return; // its completions are still outstanding: interrupted when resumed
    this.coalesceCount[vector] = 0;
    if (this.msixEnabled) this.interrupt(vector);
  }

  /** INTx level: any CQ with interrupts enabled holding unconsumed entries, unless masked. */
  private updateIntx(): void {
    let level = false;
    if (!this.msixEnabled) {
      for (const cq of this.activeCqs) {
        if (!cq.ien) continue;
        if (cq.id !== 0) this.refreshShadowHead(cq);
        if (cq.outstanding === 0) continue;
        if (cq.vector < 32 && ((this.intms >>> cq.vector) & 1) !== 0) continue;
        level = true;
        break;
      }
    }
    if (level === this.intxAsserted) return;
    this.intxAsserted = level;
    this.setIntx(level);
  }

  // ---- SMART, temperature ----

  /** Current SMART / Health counters. */
  health(): HealthCounters {
    const busyMs = this.busyMs + (this.busy > 0 ? performance.now() - this.busySince : 0);
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

function setByte(word: number, index: number, byte: number): number {
  const shift = index * 8;
  return ((word & ~(0xff << shift)) | (byte << shift)) >>> 0;
}

/** A 64-bit register pair as a Number; -1 above 2^53. */
function u64(pair: readonly number[]): number {
  const hi = pair[1]! >>> 0;
  if (hi > 0x1f_ffff) return -1;
  return hi * 0x1_0000_0000 + (pair[0]! >>> 0);
}

function hex(v: number, width = 8): string {
  return (v >>> 0).toString(16).padStart(width, '0');
}

const ADMIN_NAMES = new Map<number, string>(Object.entries(AdminOpcode).map(([k, v]) => [v, k]));

function adminName(opcode: number): string {
  return ADMIN_NAMES.get(opcode) ?? `0x${hex(opcode, 2)}`;
}

function statusText(status: number): string {
  if (status === Status.SUCCESS) return 'SUCCESS';
  for (const [name, value] of Object.entries(Status)) if (statusCode(value) === statusCode(status)) return `${name} (0x${hex(status, 4)})`;
  return `0x${hex(status, 4)}`;
}

/** Namespace IDs and the subsystem UUID, derived from serial and model (stable, unique per serial). */
function deriveIds(serial: string, model: string): { nguid: Buffer; eui64: Buffer; uuid: Buffer; uuidText: string } {
  const h = createHash('sha256').update(`vfio-user nvme\0${serial}\0${model}`).digest();
  const nguid = Buffer.from(h.subarray(0, 16));
  const eui64 = Buffer.from(h.subarray(16, 24));
  eui64[0] = (eui64[0]! & 0xfc) | 0x02; // locally administered, unicast
  const uuid = Buffer.from(createHash('sha256').update(`vfio-user nvme uuid\0${serial}\0${model}`).digest().subarray(0, 16));
  uuid[6] = (uuid[6]! & 0x0f) | 0x80; // version 8 (custom)
  uuid[8] = (uuid[8]! & 0x3f) | 0x80; // RFC 4122 variant
  const x = uuid.toString('hex');
  const uuidText = `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
  return { nguid, eui64, uuid, uuidText };
}

/** Scratch for a Dataset Management range list re-read for the dirty log (256 ranges). */
const dsmScratch = Buffer.alloc(Dsm.MAX_RANGES * Dsm.RANGE_BYTES);
