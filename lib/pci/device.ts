/**
 * `PciDevice`: a PCI function served over vfio-user. It turns a {@link ConfigSpace} and BAR
 * definitions into the server's {@link VfioUserDevice} regions, keeps DMA gated on bus mastering,
 * and drives INTx. Device models extend it (or compose it) and never see the protocol.
 */
import type { Fd } from '../native/fd';
import { DeviceFlags, Errno, PciIrq, PciRegion, RegionInfoFlags } from '../protocol/constants';
import type { AccessResult, DeviceContext, DeviceRegion, ResetReason, VfioUserDevice } from '../server/device';
import type { IrqIndexInfo } from '../server/irq';
import type { MigrationHooks } from '../server/migration';
import { ConfigSpace, type BarOptions, type ConfigSpaceOptions } from './config-space';
import { Command } from './ids';

/** A BAR: its config-space declaration plus how accesses are served. */
export interface PciBar extends BarOptions {
  /** Serve a read of `dst.length` bytes at `offset` (inside the BAR). Return an errno to fail. */
  read?(offset: number, dst: Buffer): AccessResult | Promise<AccessResult>;
  /** Serve a write of `src` at `offset` (inside the BAR). */
  write?(offset: number, src: Buffer): AccessResult | Promise<AccessResult>;
  /** Shared memory the client may mmap (areas relative to the BAR, page-aligned). */
  mmap?: { fd: Fd; fileOffset: number; areas: { offset: number; size: number }[] };
}

export interface PciDeviceOptions extends ConfigSpaceOptions {
  /** BARs by index (0..5). */
  bars?: Partial<Record<number, PciBar>>;
  /** MSI vectors (0: no MSI) and MSI-X vectors (0: no MSI-X) the client may route. */
  msiVectors?: number;
  msixVectors?: number;
  migration?: MigrationHooks;
}

export class PciDevice implements VfioUserDevice {
  readonly flags = DeviceFlags.PCI | DeviceFlags.RESET;
  readonly config: ConfigSpace;
  readonly regions: (DeviceRegion | null)[];
  readonly irqs: IrqIndexInfo[];
  readonly migration?: MigrationHooks;
  protected ctx: DeviceContext | null = null;
  private intxLevel = false;

  constructor(options: PciDeviceOptions) {
    this.config = new ConfigSpace(options);
    this.migration = options.migration;
    this.regions = new Array<DeviceRegion | null>(PciRegion.NUM_FIXED).fill(null);
    for (const [key, bar] of Object.entries(options.bars ?? {})) {
      if (bar === undefined) continue;
      const index = Number(key);
      this.config.defineBar(index, bar);
      this.regions[index] = barRegion(bar);
    }
    this.regions[PciRegion.CONFIG] = this.configRegion();
    this.irqs = [
      { count: (options.interruptPin ?? 0) > 0 ? 1 : 0 },
      { count: options.msiVectors ?? 0 },
      { count: options.msixVectors ?? 0 },
      { count: 1 },
      { count: 1 },
    ];
    this.config.onCommandChange((command) => this.onCommand(command));
  }

  /** The client's memory; refuses DMA while bus mastering is off. */
  get dma() {
    if (this.ctx === null) throw new Error('device is not attached to a server');
    return this.ctx.dma;
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
    ctx.dma.enabled = this.config.busMaster;
  }

  /** DEVICE_RESET, FLR, or the client went away: config space to power-on values, then the model. */
  async reset(reason: ResetReason): Promise<void> {
    this.config.reset();
    this.setIntx(false);
    if (this.ctx) this.ctx.dma.enabled = this.config.busMaster;
    await this.onReset(reason);
  }

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
  }

  private signalIntx(): void {
    if (this.ctx === null || (this.config.command & Command.INTX_DISABLE) !== 0) return;
    this.ctx.irqs.trigger(PciIrq.INTX, 0);
  }

  private onCommand(command: number): void {
    if (this.ctx) this.ctx.dma.enabled = (command & Command.MASTER) !== 0;
    // Re-enabling INTx with the line asserted delivers it.
    if ((command & Command.INTX_DISABLE) === 0 && this.intxLevel) this.signalIntx();
  }

  private configRegion(): DeviceRegion {
    const config = this.config;
    return {
      size: config.size,
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
      read: (offset, dst) => {
        config.read(offset, dst);
      },
      write: (offset, src) => {
        config.write(offset, src);
      },
    };
  }
}

function barRegion(bar: PciBar): DeviceRegion {
  const region: DeviceRegion = {
    size: bar.size,
    flags: (bar.read || bar.mmap ? RegionInfoFlags.READ : 0) | (bar.write || bar.mmap ? RegionInfoFlags.WRITE : 0),
    read: bar.read ? (offset, dst) => bar.read!(offset, dst) : () => Errno.EINVAL,
    write: bar.write ? (offset, src) => bar.write!(offset, src) : () => Errno.EINVAL,
    ...(bar.mmap ? { mmap: bar.mmap } : {}),
  };
  return region;
}
