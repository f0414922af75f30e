/**
 * `PciDevice`: a PCI function served over vfio-user. It turns a {@link ConfigSpace} and BAR
 * definitions into the server's {@link VfioUserDevice} regions, keeps DMA gated on bus mastering,
 * and drives INTx. Device models extend it (or compose it) and never see the protocol.
 */
import type { Fd } from '../native/fd';
import { sealSize } from '../native/memfd';
import { DeviceFlags, Errno, PciIrq, PciRegion, RegionInfoFlags } from '../protocol/constants';
import type { AccessResult, DeviceContext, DeviceRegion, ResetReason, VfioUserDevice } from '../server/device';
import { assertIoEventfds, type IoEventfd } from '../server/ioeventfd';
import type { IrqIndexInfo } from '../server/irq';
import type { MigrationHooks } from '../server/migration';
import {
  MigrationRefusedError,
  boolField,
  fromBase64,
  objectField,
  stateStreamHooks,
  toBase64,
  type BulkData,
  type StatefulDevice,
} from '../server/state-stream';
import { ConfigSpace, type BarOptions, type ConfigSpaceOptions } from './config-space';
import { Command } from './ids';
import { MsixTable } from './msix';
import type { Capability } from './capabilities/common';
import { MsixCapability, type MsixLocation } from './capabilities/msix';
import { MsiCapability, type MsiVectorCount } from './capabilities/msi';
import { PcieCapability, type PcieOptions } from './capabilities/pcie';
import { PowerManagementCapability, type PowerManagementOptions } from './capabilities/pm';
import type { TriggerResult } from './interrupts';

/** A BAR: its config-space declaration plus how accesses are served. */
export interface PciBar extends BarOptions {
  /** Serve a read of `dst.length` bytes at `offset` (inside the BAR). Return an errno to fail. */
  read?(offset: number, dst: Buffer): AccessResult | Promise<AccessResult>;
  /** Serve a write of `src` at `offset` (inside the BAR). */
  write?(offset: number, src: Buffer): AccessResult | Promise<AccessResult>;
  /**
   * Shared memory the client may mmap (areas relative to the BAR, page-aligned). A memfd made
   * with MFD_ALLOW_SEALING is sealed against shrinking and growing here, before any client sees
   * it; otherwise a client could truncate it (our own mappings of it survive that, poisoned).
   */
  mmap?: { fd: Fd; fileOffset: number; areas: { offset: number; size: number }[] };
}

export interface PciDeviceOptions extends ConfigSpaceOptions {
  /** BARs by index (0..5). */
  bars?: Partial<Record<number, PciBar>>;
  /** Power Management capability (true: defaults). */
  pm?: boolean | PowerManagementOptions;
  /** PCI Express capability (needs `express`; true: defaults). Its FLR resets the device. */
  pcie?: boolean | Omit<PcieOptions, 'onFunctionLevelReset'>;
  /** MSI capability with this many vectors (per-vector masking on). */
  msi?: { vectors: MsiVectorCount };
  /** MSI-X: vector count and where the table and PBA live (a BAR declared in `bars`). */
  msix?: { vectors: number; table: MsixLocation; pba: MsixLocation };
  /** Expansion ROM contents (region 6, read-only; the ROM BAR is sized to a power of two >= 2 KiB). */
  rom?: Uint8Array;
  /** More capabilities, placed after the built-in ones in this order. */
  capabilities?: Capability[];
  /**
   * Migration: hooks of your own, or `true` for the built-in stream (docs/migration.md), which
   * carries the whole visible PCI state (config space, MSI-X table and PBA, INTx level) plus what
   * a subclass adds ({@link PciDevice.saveDeviceState}, {@link PciDevice.loadDeviceState}).
   */
  migration?: MigrationHooks | true;
}

/** Why a device is stopped (bits of {@link PciDevice.stopReasons}). */
export const StopReason = {
  /** The migration state machine stopped it (STOP, STOP_COPY, RESUMING). */
  MIGRATION: 1,
  /** Its client went away and the server keeps its state (`keepState`) until the next one uses it. */
  DETACHED: 2,
} as const;

export class PciDevice implements VfioUserDevice {
  readonly flags = DeviceFlags.PCI | DeviceFlags.RESET;
  readonly config: ConfigSpace;
  readonly regions: (DeviceRegion | null)[];
  readonly irqs: IrqIndexInfo[];
  /** Set by the `migration` option or {@link PciDevice.enableMigration}, before the server starts. */
  migration?: MigrationHooks;
  /** The MSI-X table and PBA, when the device has MSI-X. */
  readonly msix: MsixTable | null = null;
  /** The MSI capability, when the device has MSI. */
  readonly msi: MsiCapability | null = null;
  protected ctx: DeviceContext | null = null;
  private intxLevel = false;
  private readonly msixCap: MsixCapability | null = null;
  /** {@link StopReason} bits; 0 while the device runs. */
  private stops = 0;
  /** Settles when the last stop has taken effect (I/O in flight finished). */
  private stopping: Promise<void> = Promise.resolve();
  /** @internal True while detached with kept state: the next BAR access resumes the device. */
  detached = false;

  constructor(options: PciDeviceOptions) {
    this.config = new ConfigSpace(options);
    this.regions = new Array<DeviceRegion | null>(PciRegion.NUM_FIXED).fill(null);
    let msixCap: MsixCapability | null = null;
    if (options.msix) {
      // The client emulates the MSI-X table (QEMU, like kernel VFIO) and never forwards its
      // per-vector masks: a vector the client gave an eventfd is deliverable, whatever our copy
      // of the table says (shared/peers.md §2). Enable and function mask still come through config.
      this.msix = new MsixTable({ vectors: options.msix.vectors, honourTableMask: false, deliver: (v) => this.deliverVector(PciIrq.MSIX, v) });
      msixCap = new MsixCapability(this.msix, { table: options.msix.table, pba: options.msix.pba });
    }
    this.msixCap = msixCap;
    // The first access to a BAR after the client went away (state kept) resumes the device.
    const wake = (): void => this.wake();
    for (const [key, bar] of Object.entries(options.bars ?? {})) {
      if (bar === undefined) continue;
      const index = Number(key);
      this.config.defineBar(index, bar);
      if (bar.mmap) sealSize(bar.mmap.fd);
      this.regions[index] = barRegion(bar, index, msixCap, this, wake);
    }
    this.regions[PciRegion.CONFIG] = this.configRegion();
    if (options.rom) this.regions[PciRegion.ROM] = this.romRegion(options.rom);
    if (options.pm) this.config.addCapability(new PowerManagementCapability(options.pm === true ? {} : options.pm));
    if (options.pcie) {
      const pcie = options.pcie === true ? {} : options.pcie;
      this.config.addCapability(new PcieCapability({ ...pcie, onFunctionLevelReset: () => this.functionLevelReset() }));
    }
    if (options.msi) {
      this.msi = new MsiCapability({ vectors: options.msi.vectors, perVectorMasking: true, deliver: (v) => this.deliverVector(PciIrq.MSI, v) });
      this.config.addCapability(this.msi);
    }
    if (msixCap) this.config.addCapability(msixCap);
    for (const cap of options.capabilities ?? []) this.config.addCapability(cap);
    this.irqs = [
      { count: (options.interruptPin ?? 0) > 0 ? 1 : 0 },
      { count: options.msi?.vectors ?? 0 },
      { count: options.msix?.vectors ?? 0 },
      { count: 1 },
      { count: 1 },
    ];
    this.config.onCommandChange((command, previous) => this.onCommand(command, previous));
    if (options.migration === true) this.enableMigration();
    else if (options.migration !== undefined) this.migration = options.migration;
  }

  /**
   * Raise interrupt `vector` the way the guest set the function up: MSI-X if enabled, else MSI,
   * else a pulse on INTx (models with level semantics drive {@link setIntx} themselves).
   */
  interrupt(vector: number): TriggerResult | 'intx' {
    if (this.msix?.enabled) return this.msix.trigger(vector);
    if (this.msi?.enabled) return this.msi.trigger(vector);
    if (this.irqs[PciIrq.INTX]!.count > 0) {
      this.setIntx(true);
      this.setIntx(false);
      return 'intx';
    }
    return 'disabled';
  }

  /** Send `vector` of `index` through the client's eventfd; false (kept pending) without one. */
  private deliverVector(index: number, vector: number): boolean {
    // MSI and MSI-X are memory writes by the function: not while bus mastering is off, nor while
    // the device is stopped (they stay pending and go out when it runs again).
    if (!this.config.busMaster || this.stops !== 0) return false;
    return this.ctx?.irqs.trigger(index, vector) ?? false;
  }

  private functionLevelReset(): void {
    this.reset('flr').catch((err: unknown) => this.onResetError(err));
  }

  /** A reset hook failed after an FLR (no reply to carry the error): override to report it. */
  protected onResetError(_err: unknown): void {}

  /** The client's memory; refuses DMA while bus mastering is off. */
  get dma() {
    if (this.ctx === null) throw new Error('device is not attached to a server');
    return this.ctx.dma;
  }

  /**
   * Offer ioeventfds for BAR `bar` (libvfio-user's `vfu_create_ioeventfd`), replacing any offered
   * before: a client that asks (DEVICE_GET_REGION_IO_FDS) signals them instead of sending those
   * writes as REGION_WRITE; a client that does not keeps writing, so the BAR's `write` must serve
   * those registers too. See lib/server/ioeventfd.ts.
   *
   * @throws {RangeError} for a BAR that does not exist or an ioeventfd that does not fit it.
   */
  setIoEventfds(bar: number, ioeventfds: readonly IoEventfd[]): void {
    const region = Number.isInteger(bar) && bar >= 0 && bar < PciRegion.ROM ? this.regions[bar] : null;
    if (region == null) throw new RangeError(`BAR ${String(bar)} does not exist`);
    assertIoEventfds(ioeventfds, region.size, region.flags, `BAR ${bar}`);
    region.ioeventfds = ioeventfds;
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
    ctx.dma.enabled = this.config.busMaster;
  }

  /**
   * DEVICE_RESET, FLR, or the client went away: config space to power-on values, then the model.
   * A device detached with its state kept runs again after a reset; one stopped for migration
   * stays stopped (the migration state is the client's to change).
   */
  async reset(reason: ResetReason): Promise<void> {
    // The line goes low first: the COMMAND listener config.reset() fires must not see it high.
    this.setIntx(false);
    this.config.reset();
    this.msix?.reset();
    if (this.ctx) this.ctx.dma.enabled = this.config.busMaster;
    await this.onReset(reason);
    if (reason === 'lost-connection') this.onClientGone();
    if ((this.stops & StopReason.DETACHED) !== 0) this.resume(StopReason.DETACHED);
  }

  // ---- stopping and running (migration, kept state) ----

  /** {@link StopReason} bits: why the device is stopped (0: it runs). */
  get stopReasons(): number {
    return this.stops;
  }

  /** True while stopped for any reason: no DMA, no interrupts, no change of state by itself. */
  get stopped(): boolean {
    return this.stops !== 0;
  }

  /**
   * Stop for `reason`. The first reason stops the model ({@link PciDevice.onStop}: no DMA, no
   * interrupts, I/O in flight finished); resolves when that has taken effect.
   */
  async pause(reason: number): Promise<void> {
    const before = this.stops;
    this.stops |= reason;
    if (before === 0) this.stopping = Promise.resolve(this.onStop(reason)).catch(() => undefined);
    await this.stopping;
  }

  /** Withdraw stop `reason`; when none is left the model runs again ({@link PciDevice.onRun}). */
  resume(reason: number): void {
    if ((this.stops & reason) === 0) return;
    this.stops &= ~reason;
    if (reason === StopReason.DETACHED) this.detached = false;
    if (this.stops !== 0) return;
    this.onRun();
    // What was held back while stopped goes out now.
    this.msix?.retryPending();
    this.msi?.retryPending();
    if (this.intxLevel) this.signalIntx();
  }

  /** The server keeps this device for the next client (VfioUserDevice.suspend). */
  async suspend(): Promise<void> {
    this.detached = true;
    await this.pause(StopReason.DETACHED);
    this.onClientGone();
  }

  /** A BAR access while detached: the new client uses the device, so it carries on. */
  private wake(): void {
    if (this.detached) this.resume(StopReason.DETACHED);
  }

  /**
   * The model stops: no DMA and no interrupts from now on; resolve once I/O already started has
   * finished. `reason` is the first {@link StopReason}. Default: nothing to do.
   */
  protected onStop(_reason: number): void | Promise<void> {}

  /** The model runs again after {@link PciDevice.onStop}. */
  protected onRun(): void {}

  // ---- migration: the built-in state stream ----

  /** Offer migration with the built-in stream (call in the constructor, before the server starts). */
  protected enableMigration(): void {
    const self = this;
    const adapter: StatefulDevice = {
      migrationIdentity: () => ({ kind: self.migrationKind(), pci: self.pciIdentity(), ...self.migrationIdentity() }),
      setRunning: (running) => (running ? self.resume(StopReason.MIGRATION) : self.pause(StopReason.MIGRATION)),
      saveState: () => ({ pci: self.savePciState(), device: self.saveDeviceState() }),
      loadState: (state) => {
        const s = objectField(state, 'state');
        const applyPci = self.checkPciState(s.pci);
        const applyDevice = self.loadDeviceState(s.device);
        applyPci();
        applyDevice();
      },
      bulkData: () => self.migrationBulkData(),
      savingChanged: (saving) => self.onSavingChanged(saving),
    };
    this.migration = stateStreamHooks(adapter);
  }

  /** The device kind in the migration stream (default: the class name). */
  protected migrationKind(): string {
    return this.constructor.name;
  }

  /** Identity and geometry a destination must share (merged into the stream header). */
  protected migrationIdentity(): Record<string, unknown> {
    return {};
  }

  /** The model's own state (JSON-serialisable), taken while stopped. */
  protected saveDeviceState(): unknown {
    return null;
  }

  /**
   * Check `state` (from {@link PciDevice.saveDeviceState} of an identical device) and return a
   * function that applies it; throw {@link MigrationRefusedError} to refuse, changing nothing.
   */
  protected loadDeviceState(_state: unknown): () => void {
    return () => undefined;
  }

  /**
   * A migration's saving session began (true: the transition waits for the promise, the device
   * still running) or ended (false). Default: nothing to do.
   */
  protected onSavingChanged(_saving: boolean): void | Promise<void> {}

  /** Data the model migrates in bulk, iteratively (a RAM disk), or null. */
  protected migrationBulkData(): BulkData | null {
    return null;
  }

  private pciIdentity(): Record<string, unknown> {
    const c = this.config;
    return { vendorId: c.u16(0), deviceId: c.u16(2), classCode: c.u32(8) >>> 8, size: c.size, layout: c.fingerprint(), msix: this.msix?.vectors ?? 0 };
  }

  /** The whole visible PCI state: config space (BAR addresses, COMMAND/STATUS, every capability), MSI-X, INTx. */
  private savePciState(): unknown {
    const msix = this.msix?.snapshot();
    return {
      config: toBase64(this.config.snapshot()),
      msix: msix === undefined ? null : { table: toBase64(msix.table), pba: toBase64(msix.pba) },
      intx: this.intxLevel,
    };
  }

  private checkPciState(value: unknown): () => void {
    const s = objectField(value, 'pci');
    const config = fromBase64(s.config, this.config.size, 'pci.config');
    const intx = boolField(s.intx, 'pci.intx');
    let msix: { table: Buffer; pba: Buffer } | null = null;
    if (this.msix !== null) {
      const m = objectField(s.msix, 'pci.msix');
      msix = { table: fromBase64(m.table, this.msix.tableSize, 'pci.msix.table'), pba: fromBase64(m.pba, this.msix.pbaSize, 'pci.msix.pba') };
    } else if (s.msix !== null) {
      throw new MigrationRefusedError('pci.msix: the device here has no MSI-X');
    }
    return () => {
      this.config.restore(config);
      if (this.ctx) this.ctx.dma.enabled = this.config.busMaster;
      if (msix !== null) {
        this.msix!.restore(msix.table, msix.pba);
        this.msix!.setControl(this.msixCap!.enabled, this.msixCap!.functionMasked);
      }
      this.intxLevel = intx;
    };
  }

  /**
   * The client went away (reset for it, or suspended for the next one with keepState): fds it was
   * given and may have kept copies of (ioeventfds) must be replaced so that those reach nothing.
   * Runs once the model is reset or stopped. Default: nothing to do.
   */
  protected onClientGone(): void {}

  /** Device-specific reset work; runs after config space is back to power-on values. */
  protected onReset(_reason: ResetReason): void | Promise<void> {}

  /** Drive the INTx line. A rising edge signals the client (unless COMMAND.INTX_DISABLE). */
  setIntx(asserted: boolean): void {
    const rising = asserted && !this.intxLevel;
    this.intxLevel = asserted;
    this.config.setInterruptStatus(asserted);
    if (rising) this.signalIntx();
  }

  irqsChanged(index: number): void {
    // The client signals end-of-interrupt by unmasking INTx: a line still asserted fires again.
    if (index === PciIrq.INTX && this.intxLevel) this.signalIntx();
    // New eventfds: vectors that were raised without one go out now.
    if (index === PciIrq.MSIX) this.msix?.retryPending();
    if (index === PciIrq.MSI) this.msi?.retryPending();
  }

  private signalIntx(): void {
    if (this.ctx === null || this.stops !== 0 || (this.config.command & Command.INTX_DISABLE) !== 0) return;
    this.ctx.irqs.trigger(PciIrq.INTX, 0);
  }

  private onCommand(command: number, previous: number): void {
    if (this.ctx) this.ctx.dma.enabled = (command & Command.MASTER) !== 0;
    if ((command & Command.MASTER) !== 0) {
      this.msix?.retryPending();
      this.msi?.retryPending();
    }
    // Re-enabling INTx (INTX_DISABLE 1 -> 0) with the line asserted delivers it; other COMMAND
    // writes leave INTx alone.
    const reenabled = (previous & Command.INTX_DISABLE) !== 0 && (command & Command.INTX_DISABLE) === 0;
    if (reenabled && this.intxLevel) this.signalIntx();
  }

  private romRegion(contents: Uint8Array): DeviceRegion {
    const size = Math.max(2048, 2 ** Math.ceil(Math.log2(Math.max(contents.length, 1))));
    this.config.defineRom(size);
    const image = Buffer.alloc(size);
    image.set(contents);
    return {
      size,
      flags: RegionInfoFlags.READ,
      read: (offset, dst) => {
        if (!inside(offset, dst.length, size)) return Errno.EINVAL;
        image.copy(dst, 0, offset, offset + dst.length);
      },
    };
  }

  private configRegion(): DeviceRegion {
    const config = this.config;
    return {
      size: config.size,
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
      read: (offset, dst) => {
        if (!inside(offset, dst.length, config.size)) return Errno.EINVAL;
        config.read(offset, dst);
      },
      write: (offset, src) => {
        if (!inside(offset, src.length, config.size)) return Errno.EINVAL;
        config.write(offset, src);
      },
    };
  }
}

/**
 * True if `[offset, offset + length)` lies in a region of `size` bytes. The server checks this
 * before calling a region, but the regions are public (`device.regions`) and an access outside
 * must be refused with EINVAL, not throw (config space) or half-succeed (a ROM read past the end
 * would leave the rest of `dst` as it was and report success).
 */
function inside(offset: number, length: number, size: number): boolean {
  return Number.isSafeInteger(offset) && offset >= 0 && offset + length <= size;
}

/**
 * A BAR's region: the MSI-X table and PBA (if they live here) are served by the MSI-X model.
 * Every access first wakes a device detached with kept state (one field test while attached).
 */
function barRegion(bar: PciBar, index: number, msixCap: MsixCapability | null, owner: PciDevice, wake: () => void): DeviceRegion {
  const table = msixCap?.tableRange.bar === index ? msixCap.tableRange : null;
  const pba = msixCap?.pbaRange.bar === index ? msixCap.pbaRange : null;
  const msix = msixCap?.msix;
  const within = (r: { offset: number; size: number } | null, offset: number, length: number) =>
    r !== null && offset >= r.offset && offset + length <= r.offset + r.size;
  const overlaps = (r: { offset: number; size: number } | null, offset: number, length: number) =>
    r !== null && offset < r.offset + r.size && r.offset < offset + length;
  return {
    size: bar.size,
    flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
    read: (offset, dst) => {
      if (owner.detached) wake();
      if (!inside(offset, dst.length, bar.size)) return Errno.EINVAL;
      if (within(table, offset, dst.length)) return msix!.readTable(offset - table!.offset, dst);
      if (within(pba, offset, dst.length)) return msix!.readPba(offset - pba!.offset, dst);
      if (overlaps(table, offset, dst.length) || overlaps(pba, offset, dst.length) || !bar.read) return Errno.EINVAL;
      return bar.read(offset, dst);
    },
    write: (offset, src) => {
      if (owner.detached) wake();
      if (!inside(offset, src.length, bar.size)) return Errno.EINVAL;
      if (within(table, offset, src.length)) return msix!.writeTable(offset - table!.offset, src);
      if (within(pba, offset, src.length)) return msix!.writePba(offset - pba!.offset, src);
      if (overlaps(table, offset, src.length) || overlaps(pba, offset, src.length) || !bar.write) return Errno.EINVAL;
      return bar.write(offset, src);
    },
    ...(bar.mmap ? { mmap: bar.mmap } : {}),
  };
}
