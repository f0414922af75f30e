import { describe, expect, it } from 'vitest';
import { Cfg, ClassCode, ConfigSpace, barOffset } from '../../lib/pci';
import { fullDevice, readReg, writeReg } from './fixtures';

/** What a client does: save, write all-ones, read back, restore. Returns the read-back value. */
function probe(space: ConfigSpace, offset: number, pattern = 0xffffffff): number {
  const saved = readReg(space, offset, 4);
  writeReg(space, offset, 4, pattern);
  const sized = readReg(space, offset, 4);
  writeReg(space, offset, 4, saved);
  expect(readReg(space, offset, 4)).toBe(saved);
  return sized;
}

function bare(express = false): ConfigSpace {
  return new ConfigSpace({ express, vendorId: 0x1234, deviceId: 0x5678, classCode: ClassCode.OTHER });
}

describe('BAR sizing probe: exact values a client reads back after writing 0xffffffff', () => {
  it('64-bit non-prefetchable 16 KiB: lower ~(size-1)|MEM_TYPE_64, upper all-ones', () => {
    const { space } = fullDevice();
    expect(readReg(space, barOffset(0), 4)).toBe(0x00000004);
    expect(probe(space, barOffset(0))).toBe(0xffffc004);
    expect(probe(space, barOffset(1))).toBe(0xffffffff);
  });

  it('I/O 32 bytes: ~(size-1) with bit 0 set', () => {
    const { space } = fullDevice();
    expect(readReg(space, barOffset(2), 4)).toBe(0x00000001);
    expect(probe(space, barOffset(2))).toBe(0xffffffe1);
  });

  it('32-bit prefetchable 8 KiB', () => {
    const { space } = fullDevice();
    expect(readReg(space, barOffset(4), 4)).toBe(0x00000008);
    expect(probe(space, barOffset(4))).toBe(0xffffe008);
  });

  it('absent BARs read 0 before and after the probe', () => {
    const { space } = fullDevice();
    for (const index of [3, 5]) {
      expect(readReg(space, barOffset(index), 4)).toBe(0);
      expect(probe(space, barOffset(index))).toBe(0);
    }
    expect(space.bar(3)).toBeUndefined();
    expect(space.bar(1)).toBeUndefined(); // upper half of BAR0
  });

  it('ROM 64 KiB: enable bit is writable, address bits size the ROM', () => {
    const { space } = fullDevice();
    expect(readReg(space, Cfg.ROM_ADDRESS, 4)).toBe(0);
    expect(probe(space, Cfg.ROM_ADDRESS)).toBe(0xffff0001);
    expect(probe(space, Cfg.ROM_ADDRESS, 0xfffff800)).toBe(0xffff0000); // Linux's PCI_ROM_ADDRESS_MASK probe
  });

  it('absent ROM reads 0 and ignores writes', () => {
    const space = bare();
    expect(probe(space, Cfg.ROM_ADDRESS)).toBe(0);
    expect(space.romSize).toBe(0);
  });

  it('64-bit BAR of 8 GiB sizes through the upper register', () => {
    const space = bare(true);
    space.defineBar(2, { size: 8 * 2 ** 30, is64: true, prefetchable: true });
    expect(probe(space, barOffset(2))).toBe(0x0000000c);
    expect(probe(space, barOffset(3))).toBe(0xfffffffe);
  });

  it('smallest and largest sizes', () => {
    const space = bare();
    space.defineBar(0, { size: 16 });
    space.defineBar(1, { size: 4, kind: 'io' });
    space.defineBar(2, { size: 2 ** 31 });
    space.defineBar(3, { size: 256, kind: 'io' });
    expect(probe(space, barOffset(0))).toBe(0xfffffff0);
    expect(probe(space, barOffset(1))).toBe(0xfffffffd);
    expect(probe(space, barOffset(2))).toBe(0x80000000);
    expect(probe(space, barOffset(3))).toBe(0xffffff01);
  });

  it('a 2-byte probe of the upper word sizes it too (byte-granular masks)', () => {
    const { space } = fullDevice();
    writeReg(space, barOffset(4) + 2, 2, 0xffff);
    expect(readReg(space, barOffset(4), 4)).toBe(0xffff0008);
  });
});

describe('programmed BAR addresses', () => {
  it('32-bit, 64-bit and I/O addresses, type bits stripped and kept', () => {
    const { space } = fullDevice();
    writeReg(space, barOffset(0), 4, 0xfebf0000);
    writeReg(space, barOffset(1), 4, 0x00000001);
    writeReg(space, barOffset(2), 4, 0x0000c040);
    writeReg(space, barOffset(4), 4, 0xfe000000);
    expect(space.barAddress(0)).toBe(0x1_febf_0000n);
    expect(space.barAddress(2)).toBe(0xc040n);
    expect(space.barAddress(4)).toBe(0xfe00_0000n);
    expect(readReg(space, barOffset(0), 4)).toBe(0xfebf0004);
    expect(readReg(space, barOffset(4), 4)).toBe(0xfe000008);
  });

  it('address bits below the size are read-only zero', () => {
    const { space } = fullDevice();
    writeReg(space, barOffset(4), 4, 0xfe001234);
    expect(space.barAddress(4)).toBe(0xfe00_0000n);
  });

  it('ROM address and enable', () => {
    const { space } = fullDevice();
    writeReg(space, Cfg.ROM_ADDRESS, 4, 0xfeb8_0001);
    expect(space.romAddress).toBe(0xfeb8_0000);
    expect(space.romEnabled).toBe(true);
    writeReg(space, Cfg.ROM_ADDRESS, 1, 0);
    expect(space.romEnabled).toBe(false);
  });

  it('barAddress of an undefined BAR or an upper half is a RangeError', () => {
    const { space } = fullDevice();
    expect(() => space.barAddress(1)).toThrow(RangeError);
    expect(() => space.barAddress(3)).toThrow(RangeError);
  });

  it('reset unprograms BARs', () => {
    const { space } = fullDevice();
    writeReg(space, barOffset(0), 4, 0xfebf0000);
    space.reset();
    expect(space.barAddress(0)).toBe(0n);
    expect(readReg(space, barOffset(0), 4)).toBe(0x4);
  });
});

describe('BAR declarations', () => {
  it('describes what was declared', () => {
    const { space } = fullDevice();
    expect(space.bar(0)).toEqual({ index: 0, size: 0x4000, kind: 'memory', is64: true, prefetchable: false });
    expect(space.bar(2)).toEqual({ index: 2, size: 32, kind: 'io', is64: false, prefetchable: false });
    expect(space.romSize).toBe(0x10000);
  });

  it.each([
    ['not a power of two', 0, { size: 3000 }],
    ['memory below 16 bytes', 0, { size: 8 }],
    ['I/O below 4 bytes', 0, { size: 2, kind: 'io' as const }],
    ['I/O above 256 bytes', 0, { size: 512, kind: 'io' as const }],
    ['32-bit memory of 4 GiB', 0, { size: 2 ** 32 }],
    ['64-bit BAR 5', 5, { size: 4096, is64: true }],
    ['prefetchable I/O', 0, { size: 16, kind: 'io' as const, prefetchable: true }],
    ['index 6', 6, { size: 4096 }],
    ['fractional size', 0, { size: 4096.5 }],
  ])('refuses %s with RangeError', (_name, index, options) => {
    expect(() => bare().defineBar(index, options)).toThrow(RangeError);
  });

  it('refuses a slot that is taken, including the upper half of a 64-bit BAR', () => {
    const space = bare();
    space.defineBar(0, { size: 4096, is64: true });
    expect(() => space.defineBar(0, { size: 4096 })).toThrow(/already defined/);
    expect(() => space.defineBar(1, { size: 4096 })).toThrow(/already defined/);
    space.defineBar(3, { size: 4096 });
    expect(() => space.defineBar(2, { size: 4096, is64: true })).toThrow(/already defined/);
  });

  it('refuses a bad ROM', () => {
    expect(() => bare().defineRom(1024)).toThrow(RangeError);
    const space = bare();
    space.defineRom(4096);
    expect(() => space.defineRom(4096)).toThrow(/already defined/);
  });

  it('COMMAND.IO and MEMORY become writable only with a BAR that decodes them', () => {
    const space = bare();
    writeReg(space, Cfg.COMMAND, 2, 0x0007);
    expect(readReg(space, Cfg.COMMAND, 2)).toBe(0x0004);
    space.defineBar(0, { size: 4096 });
    writeReg(space, Cfg.COMMAND, 2, 0x0007);
    expect(readReg(space, Cfg.COMMAND, 2)).toBe(0x0006);
    space.defineBar(1, { size: 16, kind: 'io' });
    writeReg(space, Cfg.COMMAND, 2, 0x0007);
    expect(readReg(space, Cfg.COMMAND, 2)).toBe(0x0007);
  });
});

describe('BAR shared memory', () => {
  it('seals a sealable memfd against shrinking and growing before a client can see it', async () => {
    const { PciDevice } = await import('../../lib/pci/device');
    const { createMemfd, isSealedAgainstShrinking } = await import('../../lib/native/memfd');
    const fs = await import('node:fs');
    const sealable = createMemfd('bar-shared', 0x4000, { allowSealing: true });
    const plain = createMemfd('bar-plain', 0x4000);
    new PciDevice({
      vendorId: 0x1234,
      deviceId: 0x5678,
      classCode: ClassCode.OTHER,
      bars: {
        0: { size: 0x4000, mmap: { fd: sealable, fileOffset: 0, areas: [{ offset: 0, size: 0x4000 }] } },
        2: { size: 0x4000, mmap: { fd: plain, fileOffset: 0, areas: [{ offset: 0, size: 0x4000 }] } },
      },
    });
    expect(isSealedAgainstShrinking(sealable)).toBe(true);
    expect(() => fs.ftruncateSync(sealable.value, 0)).toThrow(expect.objectContaining({ code: 'EPERM' }));
    expect(isSealedAgainstShrinking(plain)).toBe(false); // made without MFD_ALLOW_SEALING: cannot be
    sealable.close();
    plain.close();
  });
});
