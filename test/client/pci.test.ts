import { describe, expect, it } from 'vitest';
import {
  PciFunction,
  VfioUserClient,
  type BarInfo,
  parseConfigHeader,
  parseMsixCapability,
  walkCapabilities,
  walkExtendedCapabilities,
} from '../../lib/client';
import { Command, DeviceFlags, RegionInfoFlags } from '../../lib/protocol/constants';
import { CapId, ExtCapId } from '../../lib/pci/ids';
import { PciDevice } from '../../lib/pci/device';
import type { DeviceContext, DeviceRegion, VfioUserDevice } from '../../lib/server/device';
import { useFdLeakCheck } from '../helpers/fds';
import { useCleanup, defer, connect, fakeServer, rejection, type HardwareBars } from './fixtures';
import { HardwareDecode } from './hardware';
import { startServer, TestDevice } from '../helpers/server';

useFdLeakCheck();

useCleanup();

function put(b: Buffer, at: number, size: 1 | 2 | 4, v: number): void {
  b.writeUIntLE(v >>> 0, at, size);
}

/**
 * A PCI Express function with real config-space semantics: per-byte write masks (so BAR sizing
 * by all-ones works), PM -> MSI-X -> PCIe capabilities, AER -> DSN extended capabilities.
 * BAR0: 64-bit memory, 16 KiB, MSI-X table at 0x2000 and PBA at 0x3000. BAR2: 256-byte I/O.
 * BAR3: 32-bit prefetchable memory, 4 KiB. ROM: 2 KiB.
 */
class PcieTestDevice implements VfioUserDevice {
  readonly flags = DeviceFlags.PCI | DeviceFlags.RESET;
  readonly config = Buffer.alloc(4096);
  readonly wmask = Buffer.alloc(4096);
  readonly bar0 = Buffer.alloc(16384);
  readonly bar2 = Buffer.alloc(256);
  readonly bar3 = Buffer.alloc(4096);
  readonly commandWrites: number[] = [];
  readonly regions: (DeviceRegion | null)[];
  readonly irqs = [{ count: 1 }, { count: 0 }, { count: 4 }, { count: 0 }, { count: 0 }];

  constructor() {
    const c = this.config;
    const m = this.wmask;
    put(c, 0x00, 2, 0x1b36);
    put(c, 0x02, 2, 0x0042);
    put(m, 0x04, 2, 0x0407); // IO | MEMORY | MASTER | INTX_DISABLE
    put(c, 0x06, 2, 0x0010); // CAP_LIST
    c[0x08] = 2;
    put(c, 0x09, 1, 0x02);
    put(c, 0x0a, 2, 0x0108); // NVMe class 01:08:02
    put(c, 0x2c, 2, 0x1af4);
    put(c, 0x2e, 2, 0x1100);
    c[0x34] = 0x40;
    c[0x3d] = 1;
    put(m, 0x3c, 1, 0xff);
    // BARs: flag bits fixed, address bits writable above the size.
    put(c, 0x10, 4, 0x4); // 64-bit memory
    put(m, 0x10, 4, 0xffffc000);
    put(m, 0x14, 4, 0xffffffff);
    put(c, 0x18, 4, 0x1); // I/O
    put(m, 0x18, 4, 0xffffff00);
    put(c, 0x1c, 4, 0x8); // 32-bit prefetchable
    put(m, 0x1c, 4, 0xfffff000);
    put(m, 0x30, 4, 0xfffff801); // ROM: 2 KiB + enable
    // PM at 0x40 -> MSI-X at 0x50 -> PCIe at 0x60.
    c[0x40] = CapId.PM;
    c[0x41] = 0x50;
    c[0x50] = CapId.MSIX;
    c[0x51] = 0x60;
    put(c, 0x52, 2, 3); // 4 vectors
    put(m, 0x52, 2, 0xc000);
    put(c, 0x54, 4, 0x2000 | 0); // table in BAR0 at 0x2000
    put(c, 0x58, 4, 0x3000 | 0); // PBA in BAR0 at 0x3000
    c[0x60] = CapId.EXP;
    c[0x61] = 0;
    // AER (v2) at 0x100 -> DSN (v1) at 0x140.
    put(c, 0x100, 4, ExtCapId.ERR | (2 << 16) | (0x140 << 20));
    put(c, 0x140, 4, ExtCapId.DSN | (1 << 16));
    const mem = (buf: Buffer, flags = RegionInfoFlags.READ | RegionInfoFlags.WRITE): DeviceRegion => ({
      size: buf.length,
      flags,
      read: (offset, dst) => {
        buf.copy(dst, 0, offset, offset + dst.length);
      },
      write: (offset, src) => {
        src.copy(buf, offset);
      },
    });
    this.regions = [
      mem(this.bar0),
      null,
      mem(this.bar2),
      mem(this.bar3),
      null,
      null,
      mem(Buffer.alloc(0x800, 0x55), RegionInfoFlags.READ),
      {
        size: 4096,
        flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
        read: (offset, dst) => {
          this.config.copy(dst, 0, offset, offset + dst.length);
        },
        write: (offset, src) => {
          for (let i = 0; i < src.length; i++) {
            const at = offset + i;
            this.config[at] = (this.config[at]! & ~this.wmask[at]!) | (src[i]! & this.wmask[at]!);
          }
          if (offset <= 0x04 && offset + src.length > 0x04) this.commandWrites.push(this.config.readUInt16LE(0x04));
        },
      },
      null,
    ];
  }

  attach(_ctx: DeviceContext): void {}
}

async function open(device: VfioUserDevice): Promise<{ client: VfioUserClient; fn: PciFunction }> {
  const s = await startServer(device);
  defer(s.stop);
  const client = await VfioUserClient.connect(s.socketPath);
  defer(() => client.close());
  return { client, fn: await PciFunction.open(client) };
}

describe('config-space decoding: hostile input', () => {
  it('refuses a config snapshot shorter than the header', () => {
    expect(() => parseConfigHeader(Buffer.alloc(63))).toThrow(RangeError);
  });

  it('stops capability walks at loops, bad pointers and the entry limit', () => {
    const c = Buffer.alloc(256);
    c.writeUInt16LE(0x0010, 6);
    c[0x34] = 0x40;
    c[0x40] = 0x05;
    c[0x41] = 0x48;
    c[0x48] = 0x11;
    c[0x49] = 0x40; // back to the first: a loop
    expect(walkCapabilities(c).map((x) => x.offset)).toEqual([0x40, 0x48]);
    c[0x49] = 0x20; // into the header: stop
    expect(walkCapabilities(c)).toHaveLength(2);
    c[0x49] = 0xff; // the pointer's low bits are ignored; 0xfc + 2 still fits
    expect(walkCapabilities(c).map((x) => x.offset)).toEqual([0x40, 0x48, 0xfc]);
    // No CAP_LIST bit: no capabilities, whatever the pointer says.
    c.writeUInt16LE(0, 6);
    expect(walkCapabilities(c)).toEqual([]);
    // A chain through every dword is cut at 48 entries.
    const all = Buffer.alloc(256);
    all.writeUInt16LE(0x0010, 6);
    all[0x34] = 0x40;
    for (let at = 0x40; at < 0x100; at += 4) {
      all[at] = 0x09;
      all[at + 1] = at + 4 < 0x100 ? at + 4 : 0;
    }
    expect(walkCapabilities(all)).toHaveLength(48);
  });

  it('walks extended capabilities only in 4 KiB config space, loop-safe', () => {
    expect(walkExtendedCapabilities(Buffer.alloc(256))).toEqual([]);
    const c = Buffer.alloc(4096);
    expect(walkExtendedCapabilities(c)).toEqual([]);
    c.writeUInt32LE(0xffffffff, 0x100);
    expect(walkExtendedCapabilities(c)).toEqual([]);
    c.writeUInt32LE(0x0001 | (1 << 16) | (0x180 << 20), 0x100);
    c.writeUInt32LE(0x0003 | (1 << 16) | (0x100 << 20), 0x180); // back to 0x100
    expect(walkExtendedCapabilities(c).map((x) => [x.id, x.offset])).toEqual([
      [1, 0x100],
      [3, 0x180],
    ]);
    c.writeUInt32LE(0x0003 | (1 << 16) | (0x040 << 20), 0x180); // below 0x100: stop
    expect(walkExtendedCapabilities(c)).toHaveLength(2);
  });

  it('decodes an MSI-X capability and refuses one past the end', () => {
    const c = Buffer.alloc(256);
    c.writeUInt16LE(0xc00f, 0x52);
    c.writeUInt32LE(0x2004, 0x54);
    c.writeUInt32LE(0x3005, 0x58);
    expect(parseMsixCapability(c, 0x50)).toEqual({
      capOffset: 0x50,
      tableSize: 16,
      tableBar: 4,
      tableOffset: 0x2000,
      pbaBar: 5,
      pbaOffset: 0x3000,
      enabled: true,
      functionMasked: true,
    });
    expect(() => parseMsixCapability(c, 250)).toThrow(RangeError);
  });
});

describe('PciFunction', () => {
  it('reads and decodes a PCIe function: header, capabilities, extended capabilities, MSI-X', async () => {
    const { fn } = await open(new PcieTestDevice());
    expect(fn.config.length).toBe(4096);
    expect(fn.header).toMatchObject({
      vendorId: 0x1b36,
      deviceId: 0x0042,
      revisionId: 2,
      classCode: 0x010802,
      subsystemVendorId: 0x1af4,
      subsystemId: 0x1100,
      interruptPin: 1,
      hasCapabilities: true,
      capabilitiesPointer: 0x40,
    });
    expect(fn.capabilities.map((c) => [c.id, c.offset])).toEqual([
      [CapId.PM, 0x40],
      [CapId.MSIX, 0x50],
      [CapId.EXP, 0x60],
    ]);
    expect(fn.extendedCapabilities).toEqual([
      { id: ExtCapId.ERR, version: 2, offset: 0x100 },
      { id: ExtCapId.DSN, version: 1, offset: 0x140 },
    ]);
    expect(fn.findExtendedCapability(ExtCapId.DSN)?.offset).toBe(0x140);
    expect(fn.msix).toMatchObject({ tableSize: 4, tableBar: 0, tableOffset: 0x2000, pbaBar: 0, pbaOffset: 0x3000, enabled: false });
  });

  it('sizes BARs by probing, with decoding off meanwhile, and restores every register', async () => {
    const device = new PcieTestDevice();
    device.config.writeUInt32LE(0xfe000004, 0x10);
    device.config.writeUInt32LE(0x00000001, 0x14);
    device.config.writeUInt32LE(0x0000c001, 0x18);
    device.config.writeUInt16LE(0x0003, 0x04);
    const { fn } = await open(device);
    const before = Buffer.from(device.config.subarray(0, 0x40));
    const bars = await fn.probeBars();
    expect(bars.map((b) => [b.index, b.kind, b.is64, b.prefetchable, b.size, b.address, b.regionSize])).toEqual([
      [0, 'memory', true, false, 16384n, 0x1_fe000000n, 16384],
      [2, 'io', false, false, 256n, 0xc000n, 256],
      [3, 'memory', false, true, 4096n, 0n, 4096],
      [4, 'memory', false, false, 0n, 0n, 0],
      [5, 'memory', false, false, 0n, 0n, 0],
    ]);
    expect(device.config.subarray(0, 0x40)).toEqual(before);
    // COMMAND: memory and I/O decoding switched off for the probe, then restored.
    expect(device.commandWrites).toEqual([0x0000, 0x0003]);
    expect(await fn.probeRom()).toBe(0x800);
  });

  it('enables memory space and bus mastering', async () => {
    const device = new PcieTestDevice();
    const { fn } = await open(device);
    expect(await fn.enable()).toBe(0x0006);
    expect(device.config.readUInt16LE(4)).toBe(0x0006);
    await fn.enable({ busMaster: false, io: true });
    expect(device.config.readUInt16LE(4)).toBe(0x0003);
  });

  it('programs MSI-X through the BAR holding the table, and reads the PBA', async () => {
    const device = new PcieTestDevice();
    const { client, fn } = await open(device);
    await fn.setMsixEnabled(true, true);
    expect(device.config.readUInt16LE(0x52) & 0xc000).toBe(0xc000);
    await fn.setMsixEnabled(true);
    expect(device.config.readUInt16LE(0x52) & 0xc000).toBe(0x8000);
    expect(fn.msix?.enabled).toBe(true);

    await fn.writeMsixVector(1, { address: 0xfee0_1000n, data: 0x4021, masked: true });
    await fn.setMsixVectorMasked(1, false);
    await client.flush();
    expect(device.bar0.subarray(0x2010, 0x2020)).toEqual(Buffer.from([0x00, 0x10, 0xe0, 0xfe, 0, 0, 0, 0, 0x21, 0x40, 0, 0, 0, 0, 0, 0]));
    expect(await fn.readMsixVector(1)).toEqual({ address: 0xfee01000n, data: 0x4021, masked: false });
    await expect(fn.writeMsixVector(4, { address: 0n, data: 0, masked: true })).rejects.toThrow(RangeError);

    device.bar0[0x3000] = 0b1010;
    expect(await fn.readMsixPba()).toEqual([false, true, false, true]);
  });

  it('handles a conventional 256-byte function without capabilities', async () => {
    const { fn } = await open(new TestDevice());
    expect(fn.header.vendorId).toBe(0x1234);
    expect(fn.capabilities).toEqual([]);
    expect(fn.extendedCapabilities).toEqual([]);
    expect(fn.msix).toBeNull();
    await expect(fn.readMsixPba()).rejects.toThrow(/no MSI-X/);
  });
});

/** True if no two of `bars` (same space) overlap and each is aligned to its size. */
function wellPlaced(bars: readonly BarInfo[]): boolean {
  const live = bars.filter((b) => b.size > 0n);
  return live.every(
    (b) =>
      b.address !== 0n &&
      b.address % b.size === 0n &&
      live.every((o) => o === b || o.kind !== b.kind || o.address + o.size <= b.address || b.address + b.size <= o.address),
  );
}

describe('BAR assignment, against servers that decode BARs as hardware does', () => {
  const hwBars = (): HardwareBars => ({
    bars: {
      0: { size: 0x4000, is64: true },
      2: { size: 0x10_0000, is64: true, prefetchable: true },
      4: { size: 0x20, kind: 'io' },
      5: { size: 0x1000 },
    },
    refused: [],
  });

  it('a scripted server refuses BAR accesses until the BARs are assigned; enable() assigns them as firmware does', async () => {
    const hw = hwBars();
    const fake = fakeServer({ hardware: hw });
    const client = await connect(fake.path);
    const fn = await PciFunction.open(client);
    expect(await rejection(client.read(0, 0, 4))).toMatchObject({ code: 'EINVAL' });
    expect(hw.refused).toEqual(['BAR0+0: decoding off']);

    await fn.enable({ io: true });
    for (const index of [0, 2, 4, 5]) {
      await client.writeUint(index, 0, 4, 0x1234_5678 + index, { posted: false });
      expect(await client.readUint(index, 0, 4)).toBe(0x1234_5678 + index);
    }
    expect(hw.refused).toHaveLength(1);
    // Largest first, naturally aligned: the 64-bit prefetchable BAR in the 64-bit window, the
    // others in the 32-bit memory window, the I/O BAR in the I/O window.
    const bars = fn.bars.filter((b) => b.size > 0n);
    expect(bars.map((b) => [b.index, b.size, b.address])).toEqual([
      [0, 0x4000n, 0xc000_0000n],
      [2, 0x10_0000n, 0x80_0000_0000n],
      [4, 0x20n, 0xc000n],
      [5, 0x1000n, 0xc000_4000n],
    ]);
    expect(wellPlaced(bars)).toBe(true);

    // On the wire: sizing (all-ones) with decoding off, addresses written, then decoding on.
    const configWrites = fake.received
      .filter((m) => m.command === Command.REGION_WRITE && m.payload.readUInt32LE(8) === 7)
      .map((m) => [Number(m.payload.readBigUInt64LE(0)), m.payload.readUIntLE(16, m.payload.readUInt32LE(12))]);
    const firstAllOnes = configWrites.findIndex(([at, v]) => at === 0x10 && v === 0xffffffff);
    const addressWrite = configWrites.findIndex(([at, v]) => at === 0x10 && v === 0xc000_0004);
    const decodeOn = configWrites.findIndex(([at, v]) => at === 4 && (v! & 0x3) === 0x3);
    expect(firstAllOnes).toBeGreaterThanOrEqual(0);
    expect(addressWrite).toBeGreaterThan(firstAllOnes);
    expect(decodeOn).toBeGreaterThan(addressWrite);
    expect(configWrites.slice(0, decodeOn).every(([at, v]) => at !== 4 || (v! & 0x3) === 0)).toBe(true);
  });

  it('leaves BARs unassigned when told (the old behaviour): a hardware-like server refuses them', async () => {
    const hw = hwBars();
    const fake = fakeServer({ hardware: hw });
    const client = await connect(fake.path);
    const fn = await PciFunction.open(client);
    await fn.enable({ assignBars: false });
    expect(await rejection(client.read(0, 0, 4))).toMatchObject({ code: 'EINVAL' });
    expect(hw.refused).toEqual(['BAR0+0: invalid address 0x0']);
  });

  /** A PciDevice with every kind of BAR, served behind hardware-like decoding. */
  function hardwareDevice(): { device: HardwareDecode; pci: PciDevice } {
    const mem = (size: number) => {
      const b = Buffer.alloc(size);
      return {
        read: (offset: number, dst: Buffer) => {
          b.copy(dst, 0, offset, offset + dst.length);
        },
        write: (offset: number, src: Buffer) => {
          src.copy(b, offset);
        },
      };
    };
    const pci = new PciDevice({
      vendorId: 0x1b36,
      deviceId: 0x0042,
      classCode: 0x058000,
      bars: {
        0: { size: 0x4000, is64: true, ...mem(0x4000) },
        2: { size: 0x2000, ...mem(0x2000) },
        3: { size: 0x1_0000, prefetchable: true, ...mem(0x1_0000) },
        4: { size: 0x100, kind: 'io', ...mem(0x100) },
      },
      rom: Buffer.alloc(0x1000, 0x55),
    });
    return { device: new HardwareDecode(pci), pci };
  }

  it('assigns our own PciDevice behind hardware decoding, keeping an address already set', async () => {
    const { device, pci } = hardwareDevice();
    // BAR2 already programmed (by earlier firmware, say): it stays where it is.
    pci.config.write(0x18, Buffer.from([0x00, 0x00, 0x00, 0xc0]));
    const s = await startServer(device);
    defer(s.stop);
    const client = await connect(s.socketPath);
    const fn = await PciFunction.open(client);
    expect(await rejection(client.read(2, 0, 4))).toMatchObject({ code: 'EINVAL' });

    await fn.enable({ io: true });
    expect(pci.config.barAddress(2)).toBe(0xc000_0000n);
    expect(pci.config.barAddress(3)).toBe(0xc001_0000n);
    expect(pci.config.barAddress(0)).toBe(0xc000_4000n);
    expect(pci.config.barAddress(4)).toBe(0xc000n);
    expect(pci.config.romAddress).not.toBe(0);
    expect(pci.config.romEnabled).toBe(false);
    expect(wellPlaced(fn.bars)).toBe(true);
    const refusedBefore = device.refused.length;
    for (const index of [0, 2, 3, 4]) {
      await client.writeUint(index, 8, 4, 0xa5a5_0000 + index, { posted: false });
      expect(await client.readUint(index, 8, 4)).toBe(0xa5a5_0000 + index);
    }
    expect(device.refused.length).toBe(refusedBefore);

    // Again: nothing moves.
    const before = fn.bars.map((b) => b.address);
    await fn.enable({ io: true });
    expect(fn.bars.map((b) => b.address)).toEqual(before);
    expect((await fn.probeBars()).map((b) => b.address)).toEqual(before);
  });

  it('fails with ENOSPC when a window is too small, leaving decoding as it was', async () => {
    const { device, pci } = hardwareDevice();
    const s = await startServer(device);
    defer(s.stop);
    const client = await connect(s.socketPath);
    const fn = await PciFunction.open(client);
    const err = await rejection(fn.enable({ windows: { mem32: { start: 0xc000_0000n, end: 0xc000_8000n } } }));
    expect(err).toMatchObject({ code: 'ENOSPC' });
    expect((err as Error).message).toMatch(/BAR3/);
    expect(pci.config.command & 0x3).toBe(0);
    await expect(fn.enable({ windows: { mem32: { start: 0xffff_0000n, end: 0x1_0001_0000n } } })).rejects.toThrow(RangeError);
    await expect(fn.enable({ windows: { io: { start: 0xd000n, end: 0xc000n } } })).rejects.toThrow(RangeError);
  });

  it('places a 64-bit BAR that does not fit below 4 GiB in the 64-bit window', async () => {
    const { device, pci } = hardwareDevice();
    const s = await startServer(device);
    defer(s.stop);
    const client = await connect(s.socketPath);
    const fn = await PciFunction.open(client);
    await fn.enable({ windows: { mem32: { start: 0xc000_0000n, end: 0xc001_3000n } } });
    expect(pci.config.barAddress(0)).toBe(0x80_0000_0000n);
    expect(wellPlaced(fn.bars)).toBe(true);
  });
});
