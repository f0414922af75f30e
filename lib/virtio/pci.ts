/**
 * `VirtioPciDevice`: the modern (virtio 1.2, non-transitional) PCI transport, as a {@link PciDevice}
 * served over vfio-user. A virtio device model extends it and supplies its configuration
 * structure, its feature bits and what to do with each descriptor chain; the transport does the
 * rest (virtio 1.2, 4.1):
 *
 * - Identity: vendor 0x1af4, device 0x1040 + the virtio device ID, revision 1, subsystem ID 0x40.
 * - BAR4 (16 KiB, 64-bit memory): common configuration at 0x0000, ISR status at 0x1000, device
 *   configuration at 0x2000, queue notify addresses at 0x3000 (`notify_off_multiplier` 4, queue
 *   k at 0x3000 + 4k). Vendor capabilities point at each; a fifth (PCI_CFG) is the config-space
 *   window onto the BARs that firmware may use. BAR1 holds the MSI-X table and PBA.
 * - Feature negotiation (device and driver feature words, FEATURES_OK refused for a subset the
 *   device does not offer or without VERSION_1), device status, and reset: writing 0 stops every
 *   queue; `device_status` reads 0 once the requests already in the backend have finished, so no
 *   DMA happens after the driver sees the reset complete. DEVICE_RESET, FLR and a client going
 *   away reset the same way.
 * - Virtqueues: per queue size, MSI-X vector, enable and the three ring addresses; split rings
 *   (virtqueue.ts) with indirect descriptors and EVENT_IDX, processed from DRIVER_OK on.
 * - Notifications: `'trap'` (default) — the notify area is plain registers, every driver notify is
 *   a (posted) REGION_WRITE and processes that queue at once. `'mmap'` — BAR4 is backed by a memfd
 *   and its notify page is offered as a sparse-mmap area, so notifies cost the guest a plain store
 *   and no message; the device polls the available rings adaptively (poller.ts). Trapped writes to
 *   the page still work in both modes. `'ioeventfd'` — each queue's notify address is also offered
 *   as an ioeventfd (DEVICE_GET_REGION_IO_FDS, one eventfd per queue, any write width): a client
 *   that uses them signals the eventfd instead of sending a message, and the device, watching
 *   them, processes that queue; clients that do not (QEMU 11.1) keep sending REGION_WRITEs. The
 *   eventfds are replaced when a client goes away, so copies it kept reach nothing.
 *   `'trap'` (or `'ioeventfd'`) with `spinUs`: after activity the device polls the
 *   rings for that long with notifications suppressed (EVENT_IDX `avail_event` out of reach, or
 *   NO_NOTIFY), then re-enables them, re-checks and sleeps, as NVMe shadow doorbells do: a busy
 *   guest then sends fewer notifies, at the price of a core spinning while it is busy.
 * - Interrupts: MSI-X (a vector per queue plus one for configuration changes, as the driver maps
 *   them), or, while MSI-X is off, INTx with the ISR status byte: the line is asserted with the
 *   ISR bit and deasserted when the driver reads ISR (read-to-clear).
 * - Guest errors never throw: a broken ring, an unreachable used ring or a bad queue setup set
 *   DEVICE_NEEDS_RESET (with a configuration-change interrupt after DRIVER_OK) and stop the device
 *   until the driver resets it; per-request problems are for the device model to fail.
 *
 * @packageDocumentation
 */
import { EventFd } from '../native/eventfd';
import type { Fd } from '../native/fd';
import { createMemfd } from '../native/memfd';
import { PciDevice } from '../pci/device';
import { VendorCapability } from '../pci/capabilities/vendor';
import type { CapabilityWrite } from '../pci/capabilities/common';
import { Errno, PciRegion } from '../protocol/constants';
import type { AccessResult, DeviceContext, ResetReason } from '../server/device';
import { AdaptivePoller, DEFAULT_POLL_POLICY, type PollPolicy, type PollTarget } from '../pci/poller';
import {
  CommonCfg,
  DeviceStatus,
  Feature,
  Isr,
  MAX_QUEUE_SIZE,
  PciCap,
  PciCapType,
  PciCfgCap,
  PciNotifyCap,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_PCI_MODERN_REVISION,
  VIRTIO_PCI_MODERN_SUBSYSTEM_ID_MIN,
  VIRTIO_PCI_VENDOR_ID,
  modernPciDeviceId,
} from './spec';
import { SplitVirtqueue, type VirtqElement } from './virtqueue';

/** How driver notifications reach the device; see the module documentation. */
export type NotifyMode = 'trap' | 'mmap' | 'ioeventfd';

const NOTIFY_MODES: readonly NotifyMode[] = ['trap', 'mmap', 'ioeventfd'];

/** Where the transport puts things. */
export const VirtioPciLayout = {
  /** BAR holding the virtio structures. */
  BAR: 4,
  BAR_SIZE: 0x4000,
  COMMON: 0x0000,
  ISR: 0x1000,
  DEVICE: 0x2000,
  NOTIFY: 0x3000,
  /** Each structure's area (one page, so the notify page can be mapped alone). */
  AREA_SIZE: 0x1000,
  NOTIFY_OFF_MULTIPLIER: 4,
  /** BAR holding the MSI-X table (at 0) and PBA. */
  MSIX_BAR: 1,
  MSIX_BAR_SIZE: 0x1000,
  MSIX_PBA: 0x800,
} as const;

/** Most virtqueues: one MSI-X vector each plus the configuration vector must fit the table. */
export const MAX_VIRTQUEUES = 127;
/** Chains taken per processing pass of a queue before yielding to the event loop. */
const PASS_BUDGET = 256;
/** How long a reset waits for requests in the backend before it completes anyway. */
const RESET_TIMEOUT_MS = 30_000;
/** Feature bits the transport itself offers: VERSION_1, INDIRECT_DESC, EVENT_IDX. */
const TRANSPORT_FEATURES = (1n << BigInt(Feature.VERSION_1)) | (1n << BigInt(Feature.INDIRECT_DESC)) | (1n << BigInt(Feature.EVENT_IDX));
/** Device-specific feature bits (0..23); the rest are the transport's. */
const DEVICE_FEATURE_MASK = (1n << 24n) - 1n;

/** Options of {@link VirtioPciDevice}. */
export interface VirtioPciOptions {
  /** Virtio device ID ({@link VirtioDeviceId}). */
  deviceType: number;
  /** 24-bit PCI class code. */
  classCode: number;
  /** Device-specific feature bits offered (0..23); the transport adds VERSION_1, INDIRECT_DESC and EVENT_IDX. */
  features: bigint;
  /** Number of virtqueues, 1..127. */
  queues: number;
  /** Largest queue size the driver may choose, a power of two from 2 to 32768 (default 256). */
  queueSize?: number;
  /** Bytes of the device configuration structure (at most 4096). */
  configSize: number;
  /** How notifications arrive (default `'trap'`). */
  notify?: NotifyMode;
  /** Polling policy for `'mmap'` notifications. */
  poll?: Partial<PollPolicy>;
  /**
   * `'trap'` only: after activity, poll the rings for this many microseconds with notifications
   * suppressed, then re-enable them and sleep (default 0: never poll; see the module docs).
   */
  spinUs?: number;
  /** PCI subsystem ID (default 0x40, the lowest a non-transitional device should have). */
  subsystemId?: number;
  /** Receives one line per notable event (status changes, resets, guest errors). */
  trace?: (line: string) => void;
}

/** Counters of what arrived how (for tests and measurements). */
export interface VirtioCounters {
  /** Notifies that came as REGION_WRITEs. */
  notifies: number;
  /** Wake-ups by a queue's ioeventfd (`'ioeventfd'` mode). */
  ioeventfds: number;
  /** Polls (mmap mode) that found work. */
  polledWork: number;
  /** Interrupts sent (MSI-X vectors or INTx assertions). */
  interrupts: number;
  /** Interrupts EVENT_IDX / NO_INTERRUPT let us skip. */
  suppressed: number;
}

export abstract class VirtioPciDevice<E extends VirtqElement = VirtqElement> extends PciDevice implements PollTarget {
  readonly queues: SplitVirtqueue<E>[];
  readonly notifyMode: NotifyMode;
  readonly poller: AdaptivePoller;
  /** Trapped notifications, suppressed while the poller spins (`spinUs` > 0). */
  private readonly hybrid: boolean;
  readonly counters: VirtioCounters = { notifies: 0, ioeventfds: 0, polledWork: 0, interrupts: 0, suppressed: 0 };
  /** Feature bits offered: the device's and the transport's. */
  readonly offeredFeatures: bigint;
  protected readonly trace: ((line: string) => void) | undefined;
  private readonly configSize: number;
  private readonly msixVectors: number;
  private readonly offered: [number, number];
  private readonly accepted: [number, number] = [0, 0];
  private status = 0;
  private deviceFeatureSelect = 0;
  private driverFeatureSelect = 0;
  private configVector = VIRTIO_MSI_NO_VECTOR;
  private queueSelect = 0;
  private generation = 0;
  private isr = 0;
  private readonly common = Buffer.alloc(CommonCfg.SIZE);
  private readonly pciCfg: VendorCapability;
  private readonly notifyMemfd: Fd | null;
  /** Generation: bumped by every reset; completions from an older one are dropped. */
  private epoch = 0;
  private resetting: Promise<void> | null = null;
  private idleWaiters: (() => void)[] = [];
  private closed: Promise<void> | null = null;
  private negotiatedEventIdx = false;
  private negotiatedIndirect = false;
  // Per queue: an interrupt check is queued (irqList), a drain is scheduled (setImmediate).
  private readonly irqQueued: Uint8Array;
  private readonly irqList: SplitVirtqueue<E>[] = [];
  private irqCount = 0;
  private irqFlushQueued = false;
  private readonly flushIrqsBound = () => this.flushIrqs();
  private readonly drainQueued: Uint8Array;
  private drainScheduled = false;
  private readonly drainLater = () => this.drainDeferred();
  /** `'ioeventfd'`: one watched eventfd per queue, and their listeners (made once). */
  private notifyFds: EventFd[] = [];
  private readonly notifyListeners: ((count: number) => void)[] = [];

  constructor(options: VirtioPciOptions) {
    const queues = options.queues;
    if (!Number.isInteger(queues) || queues < 1 || queues > MAX_VIRTQUEUES) throw new RangeError(`Expected queues from 1 to ${MAX_VIRTQUEUES}, got ${queues}`);
    const queueSize = options.queueSize ?? 256;
    if (!Number.isInteger(queueSize) || queueSize < 2 || queueSize > MAX_QUEUE_SIZE || (queueSize & (queueSize - 1)) !== 0) {
      throw new RangeError(`Expected queueSize to be a power of two from 2 to ${MAX_QUEUE_SIZE}, got ${queueSize}`);
    }
    if (!Number.isInteger(options.configSize) || options.configSize < 0 || options.configSize > VirtioPciLayout.AREA_SIZE) {
      throw new RangeError(`Expected configSize from 0 to ${VirtioPciLayout.AREA_SIZE}, got ${options.configSize}`);
    }
    if ((options.features & ~DEVICE_FEATURE_MASK) !== 0n) throw new RangeError('Expected device feature bits in 0..23 only');
    const mode = options.notify ?? 'trap';
    if (!NOTIFY_MODES.includes(mode)) throw new RangeError(`Expected notify 'trap', 'mmap' or 'ioeventfd', got ${String(mode)}`);
    const spinUs = options.spinUs ?? 0;
    if (!Number.isFinite(spinUs) || spinUs < 0) throw new RangeError(`Expected spinUs >= 0, got ${spinUs}`);
    const L = VirtioPciLayout;
    const vectors = queues + 1;
    // Region and capability callbacks run after construction; they reach the instance through this.
    const self: { d: VirtioPciDevice<E> | null } = { d: null };
    const notifyMemfd = mode === 'mmap' ? createMemfd('vfio-user-virtio-notify', L.BAR_SIZE, { sealSize: true }) : null;
    const pciCfg = new VendorCapability(virtioCap(PciCapType.PCI_CFG, 0, 0, 0, PciCfgCap.SIZE), {
      writable: pciCfgWritable(),
      onWrite: (w) => self.d!.pciCfgWritten(w),
    });
    try {
      super({
        vendorId: VIRTIO_PCI_VENDOR_ID,
        deviceId: modernPciDeviceId(options.deviceType),
        subsystemVendorId: VIRTIO_PCI_VENDOR_ID,
        subsystemId: options.subsystemId ?? VIRTIO_PCI_MODERN_SUBSYSTEM_ID_MIN,
        revision: VIRTIO_PCI_MODERN_REVISION,
        classCode: options.classCode,
        interruptPin: 1,
        express: true,
        bars: {
          [L.MSIX_BAR]: {
            size: L.MSIX_BAR_SIZE,
            // Outside the table and PBA: reserved, reads 0, writes ignored.
            read: (_offset, dst) => {
              dst.fill(0);
            },
            write: () => {},
          },
          [L.BAR]: {
            size: L.BAR_SIZE,
            is64: true,
            read: (offset, dst) => self.d!.readBar(offset, dst),
            write: (offset, src) => self.d!.writeBar(offset, src),
            ...(notifyMemfd !== null ? { mmap: { fd: notifyMemfd, fileOffset: 0, areas: [{ offset: L.NOTIFY, size: L.AREA_SIZE }] } } : {}),
          },
        },
        pm: true,
        pcie: true,
        msix: { vectors, table: { bar: L.MSIX_BAR, offset: 0 }, pba: { bar: L.MSIX_BAR, offset: L.MSIX_PBA } },
        capabilities: [
          new VendorCapability(virtioCap(PciCapType.COMMON_CFG, L.BAR, L.COMMON, L.AREA_SIZE, PciCap.SIZE)),
          new VendorCapability(virtioCap(PciCapType.ISR_CFG, L.BAR, L.ISR, L.AREA_SIZE, PciCap.SIZE)),
          new VendorCapability(virtioCap(PciCapType.DEVICE_CFG, L.BAR, L.DEVICE, L.AREA_SIZE, PciCap.SIZE)),
          new VendorCapability(virtioCap(PciCapType.NOTIFY_CFG, L.BAR, L.NOTIFY, L.AREA_SIZE, PciNotifyCap.SIZE, L.NOTIFY_OFF_MULTIPLIER)),
          pciCfg,
        ],
      });
    } catch (err) {
      notifyMemfd?.close();
      throw err;
    }
    self.d = this;
    this.pciCfg = pciCfg;
    this.notifyMemfd = notifyMemfd;
    this.notifyMode = mode;
    this.configSize = options.configSize;
    this.msixVectors = vectors;
    this.trace = options.trace;
    this.offeredFeatures = options.features | TRANSPORT_FEATURES;
    this.offered = [Number(this.offeredFeatures & 0xffff_ffffn), Number(this.offeredFeatures >> 32n)];
    this.queues = [];
    for (let i = 0; i < queues; i++) this.queues.push(new SplitVirtqueue<E>(i, queueSize, (q) => this.createElement(q)));
    this.irqQueued = new Uint8Array(queues);
    this.drainQueued = new Uint8Array(queues);
    this.hybrid = mode !== 'mmap' && spinUs > 0;
    this.poller = new AdaptivePoller(this, this.hybrid ? { ...DEFAULT_POLL_POLICY, spinUs } : { ...DEFAULT_POLL_POLICY, ...options.poll });
    this.wrapConfigRead();
    if (mode === 'ioeventfd') {
      for (const q of this.queues) {
        const index = q.index;
        this.notifyListeners.push((count) => {
          if (count === 0) return; // the watch failed: REGION_WRITEs still work
          this.counters.ioeventfds++;
          this.kick(index);
        });
      }
      this.armNotifyFds();
    }
  }

  /** New eventfds for the queues' notify addresses, watched and offered for BAR4 (old ones closed). */
  private armNotifyFds(): void {
    for (const e of this.notifyFds) e.close();
    const L = VirtioPciLayout;
    this.notifyFds = this.queues.map((q) => {
      const e = EventFd.create();
      e.watch(this.notifyListeners[q.index]!);
      return e;
    });
    this.setIoEventfds(
      L.BAR,
      this.notifyFds.map((e, i) => ({ offset: L.NOTIFY + i * L.NOTIFY_OFF_MULTIPLIER, size: 0 as const, fd: e.fd })),
    );
  }

  // ---- what a device model supplies ----

  /** Makes a pooled element for `queue` (a subclass with the device's per-request fields). */
  protected abstract createElement(queue: SplitVirtqueue<E>): E;

  /**
   * Handles one chain. Must not throw: the device completes it later with {@link complete}
   * (after setting `written`), whatever happens, or calls {@link needsReset}.
   */
  protected abstract handle(element: E): void;

  /** Serves a read of the device configuration structure (`offset + dst.length <= configSize`). */
  protected abstract readDeviceConfig(offset: number, dst: Buffer): void;

  /** Serves a write to the device configuration structure (default: read-only, ignored). */
  protected writeDeviceConfig(_offset: number, _src: Buffer): void {}

  /** Extra checks of the features the driver accepted (at FEATURES_OK); false refuses them. */
  protected acceptFeatures(_features: bigint): boolean {
    return true;
  }

  /** The device went back to its initial state (after in-flight requests finished). */
  protected onVirtioReset(): void {}

  /** The driver set DRIVER_OK with these features. */
  protected onDriverOk(): void {}

  /** Releases the device model's resources after the transport stopped (from {@link close}). */
  protected onClose(): Promise<void> | void {}

  override attach(ctx: DeviceContext): void {
    super.attach(ctx);
    for (const q of this.queues) q.attach(ctx.dma);
  }

  // ---- state ----

  /** `device_status` as the driver reads it. */
  get deviceStatus(): number {
    return this.status;
  }

  /** The features the driver accepted (valid once FEATURES_OK is set). */
  get driverFeatures(): bigint {
    return BigInt(this.accepted[0]) | (BigInt(this.accepted[1]) << 32n);
  }

  /** True if feature `bit` was negotiated (offered, accepted, FEATURES_OK). */
  negotiated(bit: number): boolean {
    if ((this.status & DeviceStatus.FEATURES_OK) === 0) return false;
    const word = this.accepted[bit >>> 5] ?? 0;
    return ((word >>> (bit & 31)) & 1) === 1;
  }

  /**
   * Processing requests: DRIVER_OK and FEATURES_OK, no NEEDS_RESET or FAILED, not resetting, not
   * stopped (migration, or detached with its state kept).
   */
  get running(): boolean {
    const s = this.status;
    return (
      (s & (DeviceStatus.DRIVER_OK | DeviceStatus.FEATURES_OK | DeviceStatus.DEVICE_NEEDS_RESET | DeviceStatus.FAILED)) ===
        (DeviceStatus.DRIVER_OK | DeviceStatus.FEATURES_OK) &&
      this.resetting === null &&
      this.closed === null &&
      !this.stopped
    );
  }

  /** Elements handed to the device and not completed yet, over all queues. */
  get inFlight(): number {
    let n = 0;
    for (const q of this.queues) n += q.inflight;
    return n;
  }

  get pollable(): boolean {
    return (this.notifyMode === 'mmap' || this.hybrid) && this.running;
  }

  get canSleep(): boolean {
    return this.hybrid;
  }

  /** PollTarget (hybrid): notifications back on for every queue; false if work slipped in. */
  arm(): boolean {
    if (!this.running) return true;
    for (const q of this.queues) {
      if (q.running && !q.enableNotify()) {
        this.needsReset(`queue ${q.index}: used ring unreachable`);
        return true;
      }
    }
    let work = false;
    for (const q of this.queues) {
      if (!q.running || q.pending() === 0) continue;
      work = true;
      this.drain(q);
    }
    return !work;
  }

  /**
   * A guest error the device cannot recover from: sets DEVICE_NEEDS_RESET, stops every queue and
   * tells the driver (a configuration-change interrupt) if it is running. Idempotent.
   */
  needsReset(why: string): void {
    if ((this.status & DeviceStatus.DEVICE_NEEDS_RESET) !== 0 || this.resetting !== null) return;
    this.trace?.(`virtio: DEVICE_NEEDS_RESET: ${why}`);
    const wasOk = (this.status & DeviceStatus.DRIVER_OK) !== 0;
    this.status |= DeviceStatus.DEVICE_NEEDS_RESET;
    for (const q of this.queues) q.stop();
    this.poller.stop();
    if (wasOk) this.configInterrupt();
  }

  /** The device configuration changed (device-initiated): new generation, interrupt the driver. */
  protected configChanged(): void {
    this.generation = (this.generation + 1) & 0xff;
    if ((this.status & DeviceStatus.DRIVER_OK) !== 0) this.configInterrupt();
  }

  // ---- completion and interrupts ----

  /**
   * Returns an element to the driver: its head and `written` go into the used ring. Completions
   * from before a reset, or after DEVICE_NEEDS_RESET, are dropped. Never throws.
   */
  complete(e: E): void {
    const q = this.queues[e.queue.index]!;
    if (e.epoch !== this.epoch || !q.running) {
      q.recycle(e);
      this.idleCheck();
      return;
    }
    const wasFull = q.inflight >= q.size;
    const ok = q.push(e);
    q.recycle(e);
    if (!ok) {
      this.needsReset(`queue ${q.index}: used ring unreachable`);
      this.idleCheck();
      return;
    }
    if (this.irqQueued[q.index] === 0) {
      this.irqQueued[q.index] = 1;
      this.irqList[this.irqCount++] = q;
      if (!this.irqFlushQueued) {
        this.irqFlushQueued = true;
        queueMicrotask(this.flushIrqsBound);
      }
    }
    if (wasFull) this.scheduleDrain(q);
    this.poller.wake();
    this.idleCheck();
  }

  /** Once per batch of completions: interrupt each queue the driver wants to hear from. */
  private flushIrqs(): void {
    this.irqFlushQueued = false;
    // Count-based, never truncated: V8 reallocates an array whose length was set to 0.
    const list = this.irqList;
    const n = this.irqCount;
    this.irqCount = 0;
    for (let i = 0; i < n; i++) {
      const q = list[i]!;
      this.irqQueued[q.index] = 0;
      if (!q.running) continue;
      if (q.needsInterrupt()) this.queueInterrupt(q);
      else this.counters.suppressed++;
    }
  }

  private queueInterrupt(q: SplitVirtqueue<E>): void {
    if (this.msix?.enabled) {
      if (q.msixVector === VIRTIO_MSI_NO_VECTOR) return;
      this.counters.interrupts++;
      this.interrupt(q.msixVector);
      return;
    }
    this.isr |= Isr.QUEUE;
    this.counters.interrupts++;
    this.setIntx(true);
  }

  private configInterrupt(): void {
    if (this.msix?.enabled) {
      if (this.configVector !== VIRTIO_MSI_NO_VECTOR) this.interrupt(this.configVector);
      return;
    }
    this.isr |= Isr.CONFIG;
    this.setIntx(true);
  }

  // ---- processing ----

  /** A notify for queue `index` (a trapped write, or the test harness). */
  notify(index: number): void {
    this.counters.notifies++;
    this.kick(index);
  }

  /** Queue `index` has work (a notify by message or eventfd): process it. */
  private kick(index: number): void {
    const q = this.queues[index];
    if (q === undefined || !q.running || !this.running) return;
    this.drain(q);
  }

  /** PollTarget: looks at every running queue's available index. */
  poll(): boolean {
    if (!this.running) return false;
    let work = false;
    for (const q of this.queues) {
      if (!q.running || q.pending() === 0) continue;
      work = true;
      this.drain(q);
    }
    if (work) this.counters.polledWork++;
    return work;
  }

  /** Takes and handles chains until the queue is empty (re-checking after re-enabling notifies). */
  private drain(q: SplitVirtqueue<E>): void {
    let budget = PASS_BUDGET;
    if (this.hybrid) q.suppressNotify();
    else q.disableNotify();
    for (;;) {
      while (budget > 0) {
        const e = q.pop();
        if (e === null) break;
        budget--;
        e.epoch = this.epoch;
        this.dispatch(e);
        if (!q.running) return;
      }
      if (q.fault !== null) {
        this.needsReset(q.fault);
        return;
      }
      if (!q.running || !this.running) return;
      if (budget <= 0) {
        this.scheduleDrain(q);
        return;
      }
      // Every element is in flight: completing one reschedules the drain.
      if (q.inflight >= q.size) return;
      // Polling: notifications stay off until the poller re-arms them.
      if (this.hybrid) {
        this.poller.wake();
        return;
      }
      if (!q.enableNotify()) {
        this.needsReset(`queue ${q.index}: used ring unreachable`);
        return;
      }
      if (q.pending() === 0) return;
      q.disableNotify();
    }
  }

  private dispatch(e: E): void {
    try {
      this.handle(e);
    } catch (err) {
      this.trace?.(`virtio: internal error on queue ${e.queue.index}: ${(err as Error)?.stack ?? String(err)}`);
      this.needsReset('internal error');
    }
  }

  private scheduleDrain(q: SplitVirtqueue<E>): void {
    this.drainQueued[q.index] = 1;
    if (this.drainScheduled) return;
    this.drainScheduled = true;
    setImmediate(this.drainLater);
  }

  private drainDeferred(): void {
    this.drainScheduled = false;
    for (const q of this.queues) {
      if (this.drainQueued[q.index] === 0) continue;
      this.drainQueued[q.index] = 0;
      if (q.running && this.running) this.drain(q);
    }
  }

  // ---- reset, close ----

  /**
   * Virtio reset: stops every queue, waits for the requests in the backend (so no DMA follows),
   * then returns registers and queues to their initial values. `device_status` reads the old
   * value until then. Concurrent calls share one reset.
   */
  virtioReset(why: string): Promise<void> {
    if (this.resetting !== null) return this.resetting;
    this.epoch++;
    this.poller.stop();
    for (const q of this.queues) q.stop();
    this.trace?.(`virtio: reset (${why}), ${this.inFlight} request(s) in flight`);
    const run = async () => {
      await this.whenIdle(RESET_TIMEOUT_MS);
      this.status = 0;
      this.accepted[0] = this.accepted[1] = 0;
      this.deviceFeatureSelect = 0;
      this.driverFeatureSelect = 0;
      this.configVector = VIRTIO_MSI_NO_VECTOR;
      this.queueSelect = 0;
      this.negotiatedEventIdx = false;
      this.negotiatedIndirect = false;
      this.isr = 0;
      this.setIntx(false);
      for (const q of this.queues) q.reset();
      this.onVirtioReset();
    };
    this.resetting = run().finally(() => {
      this.resetting = null;
    });
    return this.resetting;
  }

  /**
   * Stopped (the server keeps the device for the next client, or a migration stopped it): no new
   * chains are taken; requests in the backend finish and complete (their interrupts are held by
   * PciDevice until it runs again). Resolves once they have.
   */
  protected override async onStop(_reason: number): Promise<void> {
    this.poller.stop();
    this.trace?.(`virtio: stopped, ${this.inFlight} request(s) in flight`);
    await this.whenIdle(RESET_TIMEOUT_MS);
    if (this.irqFlushQueued) this.flushIrqs();
  }

  /** Runs again: take what the driver made available meanwhile. */
  protected override onRun(): void {
    if (!this.running) return;
    this.trace?.('virtio: running');
    for (const q of this.queues) if (q.running && q.pending() !== 0) this.drain(q);
    this.poller.wake();
  }

  /** DEVICE_RESET, FLR, lost connection: config space to power-on values, then a virtio reset. */
  protected override async onReset(reason: ResetReason): Promise<void> {
    await this.virtioReset(`device reset: ${reason}`);
  }

  /** A departed client may have kept copies of the eventfds: the next one gets new ones. */
  protected override onClientGone(): void {
    if (this.notifyMode === 'ioeventfd' && this.closed === null) this.armNotifyFds();
  }

  /** Stops processing, waits for in-flight requests, releases resources. Idempotent. */
  close(): Promise<void> {
    this.closed ??= (async () => {
      this.epoch++;
      this.poller.stop();
      for (const q of this.queues) q.stop();
      await this.whenIdle(RESET_TIMEOUT_MS);
      for (const e of this.notifyFds) e.close();
      this.notifyMemfd?.close();
      await this.onClose();
    })();
    return this.closed;
  }

  private idleCheck(): void {
    if (this.idleWaiters.length === 0 || this.inFlight > 0) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  private whenIdle(timeoutMs: number): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.trace?.(`virtio: ${this.inFlight} request(s) still in flight after ${timeoutMs} ms; completing the reset anyway`);
        resolve();
      }, timeoutMs);
      timer.unref();
      this.idleWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  // ---- BAR4: the virtio structures ----

  private readBar(offset: number, dst: Buffer): AccessResult {
    const L = VirtioPciLayout;
    const area = offset & ~(L.AREA_SIZE - 1);
    const rel = offset - area;
    if (rel + dst.length > L.AREA_SIZE) return Errno.EINVAL;
    switch (area) {
      case L.COMMON:
        this.readCommon(rel, dst);
        return 0;
      case L.ISR:
        dst.fill(0);
        if (rel === 0 && dst.length > 0) {
          dst[0] = this.isr;
          // Read-to-clear; the INTx line follows the ISR (4.1.4.5).
          if (this.isr !== 0) {
            this.isr = 0;
            this.setIntx(false);
          }
        }
        return 0;
      case L.DEVICE:
        dst.fill(0);
        if (rel < this.configSize) {
          const n = Math.min(dst.length, this.configSize - rel);
          this.readDeviceConfig(rel, dst.subarray(0, n));
        }
        return 0;
      default:
        // The notify area reads as zeroes.
        dst.fill(0);
        return 0;
    }
  }

  private writeBar(offset: number, src: Buffer): AccessResult {
    const L = VirtioPciLayout;
    const area = offset & ~(L.AREA_SIZE - 1);
    const rel = offset - area;
    if (rel + src.length > L.AREA_SIZE) return Errno.EINVAL;
    switch (area) {
      case L.NOTIFY:
        // The queue is the one whose notify address was written (4.1.4.4); the value (its index) is not needed.
        this.notify(Math.floor(rel / L.NOTIFY_OFF_MULTIPLIER));
        return 0;
      case L.COMMON:
        this.writeCommon(rel, src);
        return 0;
      case L.DEVICE:
        if (rel < this.configSize) this.writeDeviceConfig(rel, src.subarray(0, Math.min(src.length, this.configSize - rel)));
        return 0;
      default:
        return 0; // ISR is read-only
    }
  }

  /** The common configuration as the driver would read it now, into {@link common}. */
  private snapshotCommon(): Buffer {
    const c = this.common;
    const q = this.queues[this.queueSelect];
    const select = this.deviceFeatureSelect;
    c.writeUInt32LE(select >>> 0, CommonCfg.DEVICE_FEATURE_SELECT);
    c.writeUInt32LE(select < 2 ? this.offered[select]! >>> 0 : 0, CommonCfg.DEVICE_FEATURE);
    c.writeUInt32LE(this.driverFeatureSelect >>> 0, CommonCfg.DRIVER_FEATURE_SELECT);
    c.writeUInt32LE(this.driverFeatureSelect < 2 ? this.accepted[this.driverFeatureSelect]! >>> 0 : 0, CommonCfg.DRIVER_FEATURE);
    c.writeUInt16LE(this.configVector, CommonCfg.CONFIG_MSIX_VECTOR);
    c.writeUInt16LE(this.queues.length, CommonCfg.NUM_QUEUES);
    c[CommonCfg.DEVICE_STATUS] = this.status;
    c[CommonCfg.CONFIG_GENERATION] = this.generation;
    c.writeUInt16LE(this.queueSelect, CommonCfg.QUEUE_SELECT);
    // A queue that does not exist reads size 0 (4.1.4.3.1).
    c.writeUInt16LE(q === undefined ? 0 : q.size & 0xffff, CommonCfg.QUEUE_SIZE);
    c.writeUInt16LE(q === undefined ? VIRTIO_MSI_NO_VECTOR : q.msixVector, CommonCfg.QUEUE_MSIX_VECTOR);
    c.writeUInt16LE(q?.enabled === true ? 1 : 0, CommonCfg.QUEUE_ENABLE);
    c.writeUInt16LE(q === undefined ? 0 : q.index, CommonCfg.QUEUE_NOTIFY_OFF);
    c.writeUInt32LE(q?.descAddr[0] ?? 0, CommonCfg.QUEUE_DESC);
    c.writeUInt32LE(q?.descAddr[1] ?? 0, CommonCfg.QUEUE_DESC + 4);
    c.writeUInt32LE(q?.driverAddr[0] ?? 0, CommonCfg.QUEUE_DRIVER);
    c.writeUInt32LE(q?.driverAddr[1] ?? 0, CommonCfg.QUEUE_DRIVER + 4);
    c.writeUInt32LE(q?.deviceAddr[0] ?? 0, CommonCfg.QUEUE_DEVICE);
    c.writeUInt32LE(q?.deviceAddr[1] ?? 0, CommonCfg.QUEUE_DEVICE + 4);
    c.writeUInt16LE(q === undefined ? 0 : q.index, CommonCfg.QUEUE_NOTIFY_DATA);
    c.writeUInt16LE(0, CommonCfg.QUEUE_RESET);
    return c;
  }

  private readCommon(rel: number, dst: Buffer): void {
    dst.fill(0);
    if (rel >= CommonCfg.SIZE) return;
    const c = this.snapshotCommon();
    c.copy(dst, 0, rel, Math.min(CommonCfg.SIZE, rel + dst.length));
  }

  private writeCommon(rel: number, src: Buffer): void {
    if (rel >= CommonCfg.SIZE) return;
    const c = this.snapshotCommon();
    const end = Math.min(CommonCfg.SIZE, rel + src.length);
    src.copy(c, rel, 0, end - rel);
    for (const [field, size] of WRITABLE_FIELDS) {
      if (field >= end || field + size <= rel) continue;
      const value = size === 1 ? c[field]! : size === 2 ? c.readUInt16LE(field) : c.readUInt32LE(field);
      this.writeField(field, value);
    }
  }

  private writeField(field: number, value: number): void {
    if (this.resetting !== null && field !== CommonCfg.DEVICE_STATUS) return;
    const q = this.queues[this.queueSelect];
    switch (field) {
      case CommonCfg.DEVICE_FEATURE_SELECT:
        this.deviceFeatureSelect = value;
        return;
      case CommonCfg.DRIVER_FEATURE_SELECT:
        this.driverFeatureSelect = value;
        return;
      case CommonCfg.DRIVER_FEATURE:
        // Fixed once FEATURES_OK is set; bits beyond 63 are not ours to take.
        if ((this.status & DeviceStatus.FEATURES_OK) === 0 && this.driverFeatureSelect < 2) this.accepted[this.driverFeatureSelect] = value >>> 0;
        return;
      case CommonCfg.CONFIG_MSIX_VECTOR:
        this.configVector = this.checkedVector(value);
        return;
      case CommonCfg.DEVICE_STATUS:
        this.writeStatus(value);
        return;
      case CommonCfg.QUEUE_SELECT:
        this.queueSelect = value;
        return;
      case CommonCfg.QUEUE_MSIX_VECTOR:
        if (q !== undefined) q.msixVector = this.checkedVector(value);
        return;
      case CommonCfg.QUEUE_ENABLE:
        if (q !== undefined && value === 1 && !q.enabled) this.enableQueue(q);
        return;
      default:
        break;
    }
    // The rest configure a queue, and only while it is disabled.
    if (q === undefined || q.enabled) return;
    switch (field) {
      case CommonCfg.QUEUE_SIZE:
        q.size = value;
        return;
      case CommonCfg.QUEUE_DESC:
      case CommonCfg.QUEUE_DESC + 4:
        q.descAddr[(field - CommonCfg.QUEUE_DESC) >> 2] = value >>> 0;
        return;
      case CommonCfg.QUEUE_DRIVER:
      case CommonCfg.QUEUE_DRIVER + 4:
        q.driverAddr[(field - CommonCfg.QUEUE_DRIVER) >> 2] = value >>> 0;
        return;
      case CommonCfg.QUEUE_DEVICE:
      case CommonCfg.QUEUE_DEVICE + 4:
        q.deviceAddr[(field - CommonCfg.QUEUE_DEVICE) >> 2] = value >>> 0;
        return;
      default:
        return; // queue_reset without VIRTIO_F_RING_RESET: ignored
    }
  }

  /** A vector the driver may map: in the table, or NO_VECTOR (which a failed mapping reads as, 4.1.5.1.2). */
  private checkedVector(value: number): number {
    return value < this.msixVectors ? value : VIRTIO_MSI_NO_VECTOR;
  }

  private enableQueue(q: SplitVirtqueue<E>): void {
    q.enabled = true;
    if (!this.running) return;
    // Enabled after DRIVER_OK: start it now.
    const why = q.start(this.negotiatedEventIdx, this.negotiatedIndirect);
    if (why !== null) this.needsReset(why);
  }

  private writeStatus(value: number): void {
    const v = value & 0xff;
    if (v === 0) {
      void this.virtioReset('driver wrote 0 to device_status');
      return;
    }
    if (this.resetting !== null) return;
    const old = this.status;
    // NEEDS_RESET is the device's; FEATURES_OK, once set, stays until a reset.
    let next = (v & ~DeviceStatus.DEVICE_NEEDS_RESET) | (old & (DeviceStatus.DEVICE_NEEDS_RESET | DeviceStatus.FEATURES_OK));
    if ((next & DeviceStatus.FEATURES_OK) !== 0 && (old & DeviceStatus.FEATURES_OK) === 0 && !this.featuresAcceptable()) {
      next &= ~DeviceStatus.FEATURES_OK;
      this.trace?.(`virtio: refused driver features 0x${this.driverFeatures.toString(16)} (offered 0x${this.offeredFeatures.toString(16)})`);
    }
    this.status = next;
    if (this.trace && next !== old) this.trace(`virtio: status 0x${old.toString(16)} -> 0x${next.toString(16)}`);
    if ((next & DeviceStatus.FEATURES_OK) !== 0 && (old & DeviceStatus.FEATURES_OK) === 0) {
      this.negotiatedEventIdx = this.negotiated(Feature.EVENT_IDX);
      this.negotiatedIndirect = this.negotiated(Feature.INDIRECT_DESC);
    }
    if ((next & DeviceStatus.DRIVER_OK) !== 0 && (old & DeviceStatus.DRIVER_OK) === 0 && this.running) this.driverOk();
    else if (!this.running) {
      for (const q of this.queues) q.stop();
      this.poller.stop();
    }
  }

  private featuresAcceptable(): boolean {
    const [lo, hi] = this.accepted;
    if ((lo & ~this.offered[0]) >>> 0 !== 0 || (hi & ~this.offered[1]) >>> 0 !== 0) return false;
    if (((hi >>> (Feature.VERSION_1 - 32)) & 1) === 0) return false;
    return this.acceptFeatures(this.driverFeatures);
  }

  private driverOk(): void {
    for (const q of this.queues) {
      if (!q.enabled) continue;
      const why = q.start(this.negotiatedEventIdx, this.negotiatedIndirect);
      if (why !== null) {
        this.needsReset(why);
        return;
      }
    }
    this.onDriverOk();
    // Buffers made available before DRIVER_OK (not allowed, but harmless) are taken now.
    for (const q of this.queues) if (q.running && this.running && q.pending() !== 0) this.drain(q);
    this.poller.wake();
  }

  // ---- the PCI_CFG capability: BAR access through config space (4.1.4.9) ----

  private pciCfgWindow(): { bar: number; offset: number; length: number } {
    const head = Buffer.alloc(PciCap.LENGTH + 4 - PciCap.CFG_TYPE);
    this.pciCfg.readData(0, head);
    return {
      bar: head[PciCap.BAR - PciCap.CFG_TYPE]!,
      offset: head.readUInt32LE(PciCap.OFFSET - PciCap.CFG_TYPE),
      length: head.readUInt32LE(PciCap.LENGTH - PciCap.CFG_TYPE),
    };
  }

  /** A valid window: BAR4, length 1, 2 or 4, aligned, inside the BAR. */
  private static windowOk(w: { bar: number; offset: number; length: number }): boolean {
    return (
      w.bar === VirtioPciLayout.BAR &&
      (w.length === 1 || w.length === 2 || w.length === 4) &&
      w.offset % w.length === 0 &&
      w.offset + w.length <= VirtioPciLayout.BAR_SIZE
    );
  }

  private pciCfgWritten(w: CapabilityWrite): void {
    const data = PciCfgCap.PCI_CFG_DATA;
    if (w.offset + w.data.length <= data || w.offset >= data + 4) return;
    const win = this.pciCfgWindow();
    if (!VirtioPciDevice.windowOk(win)) return;
    const bytes = Buffer.alloc(4);
    this.pciCfg.readData(data - PciCap.CFG_TYPE, bytes);
    this.writeBar(win.offset, bytes.subarray(0, win.length));
  }

  /** Reads of `pci_cfg_data` are served from the BAR at that moment: wrap the config region's read. */
  private wrapConfigRead(): void {
    const region = this.regions[PciRegion.CONFIG]!;
    const read = region.read!.bind(region);
    const dataAt = this.pciCfg.offset + PciCfgCap.PCI_CFG_DATA;
    (this.regions as (typeof region | null)[])[PciRegion.CONFIG] = {
      ...region,
      read: (offset, dst) => {
        // Only for an access the region will serve: a refused one must change nothing.
        const served = Number.isSafeInteger(offset) && offset >= 0 && offset + dst.length <= region.size;
        if (served && offset < dataAt + 4 && dataAt < offset + dst.length) this.refreshPciCfgData(dataAt);
        return read(offset, dst);
      },
    };
  }

  private refreshPciCfgData(dataAt: number): void {
    const win = this.pciCfgWindow();
    const bytes = Buffer.alloc(4);
    if (VirtioPciDevice.windowOk(win)) this.readBar(win.offset, bytes.subarray(0, win.length));
    this.config.setU32(dataAt, bytes.readUInt32LE(0));
  }
}

/** Writable fields of the common configuration, [offset, size], in offset order. */
const WRITABLE_FIELDS: readonly (readonly [number, 1 | 2 | 4])[] = [
  [CommonCfg.DEVICE_FEATURE_SELECT, 4],
  [CommonCfg.DRIVER_FEATURE_SELECT, 4],
  [CommonCfg.DRIVER_FEATURE, 4],
  [CommonCfg.CONFIG_MSIX_VECTOR, 2],
  [CommonCfg.DEVICE_STATUS, 1],
  [CommonCfg.QUEUE_SELECT, 2],
  [CommonCfg.QUEUE_SIZE, 2],
  [CommonCfg.QUEUE_MSIX_VECTOR, 2],
  [CommonCfg.QUEUE_DESC, 4],
  [CommonCfg.QUEUE_DESC + 4, 4],
  [CommonCfg.QUEUE_DRIVER, 4],
  [CommonCfg.QUEUE_DRIVER + 4, 4],
  [CommonCfg.QUEUE_DEVICE, 4],
  [CommonCfg.QUEUE_DEVICE + 4, 4],
  [CommonCfg.QUEUE_RESET, 2],
  // Last: enabling takes the configuration written by the same access.
  [CommonCfg.QUEUE_ENABLE, 2],
];

/**
 * The data of a `struct virtio_pci_cap` after its 3-byte header (vendor ID, next, length), for
 * {@link VendorCapability}: cfg_type, bar, id, padding, offset, length, and for the notify
 * capability the multiplier. `size` is the whole capability's size (16 or 20).
 */
function virtioCap(type: number, bar: number, offset: number, length: number, size: number, multiplier?: number): Buffer {
  const data = Buffer.alloc(size - PciCap.CFG_TYPE);
  data[PciCap.CFG_TYPE - PciCap.CFG_TYPE] = type;
  data[PciCap.BAR - PciCap.CFG_TYPE] = bar;
  data.writeUInt32LE(offset, PciCap.OFFSET - PciCap.CFG_TYPE);
  data.writeUInt32LE(length, PciCap.LENGTH - PciCap.CFG_TYPE);
  if (multiplier !== undefined) data.writeUInt32LE(multiplier, PciNotifyCap.NOTIFY_OFF_MULTIPLIER - PciCap.CFG_TYPE);
  return data;
}

/** PCI_CFG: the driver writes bar, offset, length and the data window. */
function pciCfgWritable(): Buffer {
  const w = Buffer.alloc(PciCfgCap.SIZE - PciCap.CFG_TYPE);
  w[PciCap.BAR - PciCap.CFG_TYPE] = 0xff;
  w.fill(0xff, PciCap.OFFSET - PciCap.CFG_TYPE, PciCap.LENGTH + 4 - PciCap.CFG_TYPE);
  w.fill(0xff, PciCfgCap.PCI_CFG_DATA - PciCap.CFG_TYPE, PciCfgCap.SIZE - PciCap.CFG_TYPE);
  return w;
}
