/**
 * A {@link PciDevice} served the way servers that model real PCI serve it (QEMU's device models
 * over vfio-user, shared/peers.md §5): a BAR access is decoded only at the address the BAR was
 * programmed with, and only while COMMAND enables memory (or I/O) decoding; otherwise
 * REGION_READ/WRITE fails with EINVAL, as such a server reports "invalid address 0x0". A BAR
 * that overlaps another decoding BAR of the same space is refused too (on hardware one of them
 * would shadow the other). The expansion ROM decodes only when enabled and assigned.
 *
 * BAR sizing itself is the device's config space (the write masks of `PciDevice`), as on
 * hardware. mmap areas are withdrawn, so that every access goes through the gate.
 */
import { Errno, PciRegion } from '../../lib/protocol/constants';
import { Command } from '../../lib/pci/ids';
import type { PciDevice } from '../../lib/pci/device';
import type { DeviceContext, DeviceRegion, ResetReason, VfioUserDevice } from '../../lib/server/device';

/** A refused access: which region, where, and why. */
export interface RefusedAccess {
  region: number;
  offset: number;
  reason: 'unassigned' | 'decoding off' | 'overlap';
}

export class HardwareDecode implements VfioUserDevice {
  readonly regions: readonly (DeviceRegion | null)[];
  /** Every access refused so far. */
  readonly refused: RefusedAccess[] = [];

  constructor(readonly inner: PciDevice) {
    this.regions = inner.regions.map((r, index) => (r === null || index > PciRegion.ROM ? r : this.#gate(r, index)));
  }

  get flags(): number {
    return this.inner.flags;
  }

  get irqs() {
    return this.inner.irqs;
  }

  attach(ctx: DeviceContext): void {
    this.inner.attach(ctx);
  }

  reset(reason: ResetReason): Promise<void> {
    return this.inner.reset(reason);
  }

  irqsChanged(index: number): void {
    this.inner.irqsChanged(index);
  }

  async close(): Promise<void> {
    await (this.inner as { close?(): void | Promise<void> }).close?.();
  }

  /** Where BAR `index` (or the ROM, index 6) decodes, or why it does not. */
  decodes(index: number): { start: bigint; size: bigint } | RefusedAccess['reason'] {
    const config = this.inner.config;
    if (index === PciRegion.ROM) {
      if ((config.command & Command.MEMORY) === 0 || !config.romEnabled) return 'decoding off';
      if (config.romAddress === 0) return 'unassigned';
      return { start: BigInt(config.romAddress), size: BigInt(config.romSize) };
    }
    const bar = config.bar(index);
    if (bar === undefined) return 'unassigned';
    const bit = bar.kind === 'io' ? Command.IO : Command.MEMORY;
    if ((config.command & bit) === 0) return 'decoding off';
    const start = config.barAddress(index);
    if (start === 0n) return 'unassigned';
    const size = BigInt(bar.size);
    for (let other = 0; other < 6; other++) {
      const o = config.bar(other);
      if (other === index || o === undefined || o.kind !== bar.kind) continue;
      const at = config.barAddress(other);
      if (at !== 0n && at < start + size && start < at + BigInt(o.size)) return 'overlap';
    }
    return { start, size };
  }

  #gate(region: DeviceRegion, index: number): DeviceRegion {
    const check = (offset: number): number => {
      const d = this.decodes(index);
      if (typeof d === 'object') return 0;
      this.refused.push({ region: index, offset, reason: d });
      return Errno.EINVAL;
    };
    const { mmap: _mmap, ...rest } = region;
    return {
      ...rest,
      ...(region.read ? { read: (offset: number, dst: Buffer) => check(offset) || region.read!(offset, dst) } : {}),
      ...(region.write ? { write: (offset: number, src: Buffer) => check(offset) || region.write!(offset, src) } : {}),
    };
  }
}
