/**
 * PciDevice's migration state: the whole visible PCI state (config space with BAR addresses,
 * COMMAND/STATUS and every capability, MSI and MSI-X tables, masks and pending bits, the INTx
 * level) moves through the built-in stream, whatever the chunking; a device built differently
 * refuses it; interrupts raised while stopped stay pending and go out when the device runs.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { PciDevice, StopReason } from '../../lib/pci/device';
import type { MigrationHooks } from '../../lib/server/migration';
import { MigrationRefusedError } from '../../lib/server/state-stream';
import { Cfg } from '../../lib/pci/ids';

class Dev extends PciDevice {
  constructor(barSize = 4096) {
    super({
      vendorId: 0x1b36,
      deviceId: 0x0011,
      classCode: 0xff0000,
      interruptPin: 1,
      express: true,
      pm: true,
      pcie: true,
      msi: { vectors: 4 },
      msix: { vectors: 8, table: { bar: 4, offset: 0 }, pba: { bar: 4, offset: 0x800 } },
      bars: { 0: { size: barSize, is64: true }, 4: { size: 4096 } },
      migration: true,
    });
  }
  raise(v: number) {
    return this.interrupt(v);
  }
}

/** Stops `from`, saves its whole stream, and loads it into `to` in chunks of `sizes` (cycled). */
async function move(from: PciDevice, to: PciDevice, sizes: number[] = [4096]): Promise<void> {
  const hooks = from.migration as MigrationHooks;
  await hooks.setRunning(false);
  const saver = hooks.saver!();
  const bytes: Buffer[] = [];
  for (;;) {
    const chunk = saver.read(1 << 20, true);
    if (chunk.length === 0) break;
    bytes.push(Buffer.from(chunk));
  }
  saver.close?.();
  const stream = Buffer.concat(bytes);
  const th = to.migration as MigrationHooks;
  await th.setRunning(false);
  const loader = th.loader!();
  for (let at = 0, i = 0; at < stream.length; i++) {
    const n = Math.max(1, sizes[i % sizes.length]!);
    loader.write(stream.subarray(at, at + n));
    at += n;
  }
  await loader.finish();
}

function programmed(): Dev {
  const d = new Dev();
  const w32 = (off: number, v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v >>> 0);
    d.config.write(off, b);
  };
  w32(0x10, 0xfebf0000); // BAR0 (64-bit)
  w32(0x14, 0x00000080);
  w32(0x20, 0xfebe0000); // BAR4
  w32(Cfg.COMMAND, 0x0006); // memory + bus master
  const msix = d.config.findCapability(0x11)!;
  const flags = Buffer.alloc(2);
  flags.writeUInt16LE(0x8000); // MSI-X enable
  d.config.write(msix + 2, flags);
  const entry = Buffer.alloc(16);
  entry.writeUInt32LE(0xfee00000, 0);
  entry.writeUInt32LE(0x4041, 8);
  d.msix!.writeTable(3 * 16, entry); // vector 3 programmed, unmasked
  d.raise(5); // no eventfd: pending
  d.setIntx(true);
  return d;
}

describe('PciDevice migration state', () => {
  it('moves config space, MSI-X table, PBA and INTx level', async () => {
    const a = programmed();
    const b = new Dev();
    await move(a, b);
    expect(Buffer.from(b.config.snapshot())).toEqual(Buffer.from(a.config.snapshot()));
    expect(b.config.barAddress(0)).toBe(0x80_febf0000n);
    expect(b.config.busMaster).toBe(true);
    expect(b.msix!.enabled).toBe(true);
    expect(b.msix!.data(3)).toBe(0x4041);
    expect(b.msix!.isPending(5)).toBe(true);
    expect(b.msix!.snapshot()).toEqual(a.msix!.snapshot());
    expect(b.config.u16(Cfg.STATUS) & 0x8).toBe(0x8);
  });

  it('any chunking of the stream loads the same state', async () => {
    const a = programmed();
    await fc.assert(
      fc.asyncProperty(fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 8 }), async (sizes) => {
        const b = new Dev();
        await (a.migration as MigrationHooks).setRunning(true);
        await move(a, b, sizes);
        expect(Buffer.from(b.config.snapshot())).toEqual(Buffer.from(a.config.snapshot()));
      }),
      { numRuns: 25 },
    );
  });

  it('a device built differently (another BAR size) refuses, changing nothing', async () => {
    const a = programmed();
    const b = new Dev(8192);
    const before = Buffer.from(b.config.snapshot());
    await expect(move(a, b)).rejects.toThrow(MigrationRefusedError);
    await expect(move(a, b)).rejects.toThrow(/another device: pci/);
    expect(Buffer.from(b.config.snapshot())).toEqual(before);
  });

  it('interrupts raised while stopped stay pending and go out when it runs again', async () => {
    const d = programmed();
    const sent: number[] = [];
    d.attach({
      dma: { enabled: true } as never,
      irqs: { trigger: (_i: number, v: number) => (sent.push(v), true) } as never,
      quiesced: () => false,
    });
    await d.pause(StopReason.MIGRATION);
    expect(d.raise(3)).toBe('pending');
    expect(sent).toEqual([]);
    d.resume(StopReason.MIGRATION);
    expect(sent).toContain(3);
    expect(d.msix!.isPending(3)).toBe(false);
  });
});
