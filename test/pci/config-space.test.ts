import { describe, expect, it, vi } from 'vitest';
import { Cfg, ClassCode, Command, ConfigSpace, Status, STATUS_W1C_BITS, barOffset } from '../../lib/pci';
import { DEVICE, VENDOR, dump, fullDevice, readReg, writeReg } from './fixtures';

describe('type-0 header', () => {
  it('has the identity, BAR types and capability pointer at the standard offsets', () => {
    const header = Array.from(dump(fullDevice().space).subarray(0, 0x40));
    // prettier-ignore
    expect(header).toEqual([
      0x58, 0x4e, 0x01, 0x00, 0x00, 0x00, 0x10, 0x00, // vendor, device, command, status (CAP_LIST)
      0x02, 0x02, 0x08, 0x01, 0x00, 0x00, 0x00, 0x00, // revision, class 01:08:02, cache, latency, type, BIST
      0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // BAR0 64-bit, BAR1 upper half
      0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // BAR2 I/O, BAR3 absent
      0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // BAR4 prefetchable, BAR5 absent
      0x00, 0x00, 0x00, 0x00, 0xf4, 0x1a, 0x00, 0x11, // CardBus CIS, subsystem vendor/id
      0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, // ROM, capability list
      0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, // reserved, line, pin INTA#, min_gnt, max_lat
    ]);
  });

  it('sizes: 4096 for Express, 256 for conventional', () => {
    expect(fullDevice().space.size).toBe(4096);
    const conventional = new ConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0 });
    expect(conventional.size).toBe(256);
    expect(conventional.u16(Cfg.SUBSYSTEM_VENDOR_ID)).toBe(1); // defaults to the vendor
    expect(conventional.u8(Cfg.INTERRUPT_PIN)).toBe(0);
    expect(conventional.u8(Cfg.HEADER_TYPE)).toBe(0);
  });

  it('multi-function sets HEADER_TYPE bit 7', () => {
    const space = new ConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0, multiFunction: true });
    expect(space.u8(Cfg.HEADER_TYPE)).toBe(0x80);
  });

  it.each([
    ['vendorId', { vendorId: 0x10000 }],
    ['classCode', { classCode: 0x1000000 }],
    ['interruptPin', { interruptPin: 5 }],
    ['revision', { revision: -1 }],
    ['deviceId', { deviceId: 1.5 }],
  ])('refuses a bad %s', (_name, bad) => {
    expect(() => new ConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0, ...bad })).toThrow(RangeError);
  });
});

describe('write masks', () => {
  it('read-only identity fields ignore all-ones writes', () => {
    const { space } = fullDevice();
    const before = dump(space);
    for (const offset of [Cfg.VENDOR_ID, Cfg.REVISION_ID, Cfg.SUBSYSTEM_VENDOR_ID, Cfg.CARDBUS_CIS]) {
      writeReg(space, offset, 4, 0xffffffff);
    }
    writeReg(space, Cfg.HEADER_TYPE, 2, 0xffff); // header type and BIST
    writeReg(space, Cfg.CAPABILITY_LIST, 4, 0xffffffff);
    writeReg(space, Cfg.INTERRUPT_PIN, 1, 0xff);
    writeReg(space, Cfg.MIN_GNT, 2, 0xffff);
    const after = dump(space);
    for (const offset of [0, 1, 2, 3, 8, 9, 10, 11, 0x0e, 0x0f, 0x28, 0x2c, 0x2d, 0x2e, 0x2f, 0x34, 0x35, 0x3d, 0x3e, 0x3f]) {
      expect(after[offset], `byte ${offset}`).toBe(before[offset]);
    }
  });

  it('COMMAND keeps only the implemented bits', () => {
    const { space } = fullDevice();
    writeReg(space, Cfg.COMMAND, 2, 0xffff);
    const implemented = Command.IO | Command.MEMORY | Command.MASTER | Command.PARITY | Command.SERR | Command.INTX_DISABLE;
    expect(readReg(space, Cfg.COMMAND, 2)).toBe(implemented);
    writeReg(space, Cfg.COMMAND, 2, 0);
    expect(readReg(space, Cfg.COMMAND, 2)).toBe(0);
  });

  it('STATUS error bits clear only where 1 is written; read-only bits stay', () => {
    const { space } = fullDevice();
    space.setU16(Cfg.STATUS, STATUS_W1C_BITS | Status.CAP_LIST | Status.INTERRUPT);
    writeReg(space, Cfg.STATUS, 2, 0);
    expect(readReg(space, Cfg.STATUS, 2)).toBe(STATUS_W1C_BITS | Status.CAP_LIST | Status.INTERRUPT);
    writeReg(space, Cfg.STATUS, 2, Status.PARITY | Status.REC_MASTER_ABORT | Status.CAP_LIST | Status.INTERRUPT);
    const left = STATUS_W1C_BITS & ~(Status.PARITY | Status.REC_MASTER_ABORT);
    expect(readReg(space, Cfg.STATUS, 2)).toBe(left | Status.CAP_LIST | Status.INTERRUPT);
    writeReg(space, Cfg.STATUS, 2, 0xffff);
    expect(readReg(space, Cfg.STATUS, 2)).toBe(Status.CAP_LIST | Status.INTERRUPT);
  });

  it('a dword write at COMMAND sets command bits and clears status bits in one go', () => {
    const { space } = fullDevice();
    space.setU16(Cfg.STATUS, Status.CAP_LIST | Status.SIG_TARGET_ABORT | Status.DETECTED_PARITY);
    writeReg(space, Cfg.COMMAND, 4, (Status.SIG_TARGET_ABORT << 16) | Command.MEMORY | Command.MASTER);
    expect(readReg(space, Cfg.COMMAND, 2)).toBe(Command.MEMORY | Command.MASTER);
    expect(readReg(space, Cfg.STATUS, 2)).toBe(Status.CAP_LIST | Status.DETECTED_PARITY);
  });

  it('scratch registers: interrupt line and cache line size are writable', () => {
    const { space } = fullDevice();
    writeReg(space, Cfg.INTERRUPT_LINE, 1, 0x0b);
    writeReg(space, Cfg.CACHE_LINE_SIZE, 1, 0x10);
    expect(space.u8(Cfg.INTERRUPT_LINE)).toBe(0x0b);
    expect(space.u8(Cfg.CACHE_LINE_SIZE)).toBe(0x10);
  });

  it('latency timer is hardwired to 0 on Express and writable on conventional PCI', () => {
    const express = fullDevice().space;
    writeReg(express, Cfg.LATENCY_TIMER, 1, 0x40);
    expect(express.u8(Cfg.LATENCY_TIMER)).toBe(0);
    const conventional = new ConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0 });
    writeReg(conventional, Cfg.LATENCY_TIMER, 1, 0x40);
    expect(conventional.u8(Cfg.LATENCY_TIMER)).toBe(0x40);
  });

  it('unimplemented space (between and after capabilities) is read-only zero', () => {
    const { space } = fullDevice();
    writeReg(space, 0xf0, 4, 0xffffffff);
    writeReg(space, 0xffc, 4, 0xffffffff);
    expect(readReg(space, 0xf0, 4)).toBe(0);
    expect(readReg(space, 0xffc, 4)).toBe(0);
  });

  it('masks() reports the writable and W1C masks', () => {
    const { writable, w1c } = fullDevice().space.masks();
    expect(writable[Cfg.VENDOR_ID]).toBe(0);
    expect(writable[Cfg.COMMAND]).toBe(0x47);
    expect(w1c[Cfg.STATUS + 1]).toBe(0xf9);
    expect(writable.length).toBe(4096);
  });

  it('defineRegister adds a device-specific register with a power-on value', () => {
    const { space } = fullDevice();
    space.defineRegister(0xf0, 4, 0x1234_0000, { writable: 0x0000ffff, w1c: 0x00ff_0000 });
    writeReg(space, 0xf0, 4, 0xffff_abcd);
    expect(readReg(space, 0xf0, 4)).toBe(0x1200_abcd);
    space.reset();
    expect(readReg(space, 0xf0, 4)).toBe(0x1234_0000);
  });
});

describe('accesses of any size at any offset', () => {
  it('reads of 1, 2, 3, 4, 5, 7 and 8 bytes at odd offsets see the same bytes as a full dump', () => {
    const { space } = fullDevice();
    writeReg(space, barOffset(0), 4, 0xfebf0000);
    const whole = dump(space);
    for (const [offset, length] of [[0x01, 1], [0x03, 2], [0x05, 3], [0x09, 4], [0x0b, 5], [0x3b, 7], [0x0f, 8], [0xff9, 7]]) {
      const part = new Uint8Array(length as number);
      space.read(offset as number, part);
      expect(Array.from(part), `${offset}+${length}`).toEqual(Array.from(whole.subarray(offset, (offset as number) + (length as number))));
    }
  });

  it('an 8-byte write probes both registers of a 64-bit BAR at once', () => {
    const { space } = fullDevice();
    space.write(barOffset(0), new Uint8Array(8).fill(0xff));
    expect(readReg(space, barOffset(0), 4)).toBe(0xffffc004);
    expect(readReg(space, barOffset(1), 4)).toBe(0xffffffff);
    expect(space.barAddress(0)).toBe(0xffff_ffff_ffff_c000n);
  });

  it('a 3-byte write at an odd offset spanning a read-only and a writable register', () => {
    const { space } = fullDevice();
    space.write(0x03, Uint8Array.of(0xff, 0x06, 0x04)); // device ID high byte, COMMAND
    expect(space.u16(Cfg.DEVICE_ID)).toBe(DEVICE);
    expect(space.command).toBe(Command.MEMORY | Command.MASTER | Command.INTX_DISABLE);
  });

  it('a write spanning the end of the header into the first capability changes only writable bytes', () => {
    const { space } = fullDevice();
    const before = dump(space);
    space.write(0x3b, new Uint8Array(9).fill(0xff)); // 0x3b..0x43: reserved, line, pin, gnt, lat, PM id/next/PMC
    const after = dump(space);
    expect(after[Cfg.INTERRUPT_LINE]).toBe(0xff);
    for (const offset of [0x3b, 0x3d, 0x3e, 0x3f, 0x40, 0x41, 0x42, 0x43]) expect(after[offset]).toBe(before[offset]);
  });

  it('whole-space reads and writes work', () => {
    const { space } = fullDevice();
    const before = dump(space);
    space.write(0, new Uint8Array(4096));
    expect(Array.from(dump(space).subarray(0, 4))).toEqual(Array.from(before.subarray(0, 4)));
  });

  it('a read never touches bytes of the destination buffer outside its view', () => {
    const { space } = fullDevice();
    const buffer = new Uint8Array(16).fill(0xaa);
    space.read(0, buffer.subarray(4, 8));
    expect(Array.from(buffer.subarray(0, 4))).toEqual([0xaa, 0xaa, 0xaa, 0xaa]);
    expect(Array.from(buffer.subarray(4, 8))).toEqual([0x58, 0x4e, 0x01, 0x00]);
    expect(Array.from(buffer.subarray(8))).toEqual(new Array(8).fill(0xaa));
  });

  it('typed helpers read little-endian at any alignment', () => {
    const { space } = fullDevice();
    expect(space.u16(Cfg.VENDOR_ID)).toBe(VENDOR);
    expect(space.u32(Cfg.VENDOR_ID)).toBe((DEVICE << 16) | VENDOR);
    expect(space.u16(0x01)).toBe(0x014e);
    expect(space.u32(Cfg.REVISION_ID) >>> 8).toBe(ClassCode.STORAGE_NVME);
  });
});

describe('out-of-range accesses throw RangeError (the server answers EINVAL) and change nothing', () => {
  const cases: [string, number, number][] = [
    ['negative offset', -1, 1],
    ['crossing the end', 4095, 2],
    ['starting at the end', 4096, 1],
    ['far beyond', 2 ** 40, 4],
    ['fractional offset', 1.5, 1],
    ['NaN offset', Number.NaN, 1],
  ];

  it.each(cases)('read: %s', (_name, offset, length) => {
    expect(() => fullDevice().space.read(offset, new Uint8Array(length))).toThrow(RangeError);
  });

  it.each(cases)('write: %s', (_name, offset, length) => {
    const { space } = fullDevice();
    const before = dump(space);
    expect(() => space.write(offset, new Uint8Array(length).fill(0xff))).toThrow(RangeError);
    expect(dump(space)).toEqual(before);
  });

  it('a conventional space ends at 256', () => {
    const space = new ConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0 });
    expect(() => space.read(0xff, new Uint8Array(2))).toThrow(RangeError);
    expect(() => space.write(0x100, new Uint8Array(1))).toThrow(RangeError);
    expect(() => space.u32(0xfd)).toThrow(RangeError);
    expect(() => space.setU8(256, 0)).toThrow(RangeError);
  });

  it('zero-length accesses at the end are allowed', () => {
    const { space } = fullDevice();
    expect(() => space.read(4096, new Uint8Array(0))).not.toThrow();
    expect(() => space.write(4096, new Uint8Array(0))).not.toThrow();
  });
});

describe('COMMAND state and notifications', () => {
  it('exposes the decoded bits', () => {
    const { space } = fullDevice();
    expect([space.memoryEnabled, space.ioEnabled, space.busMaster, space.intxDisabled]).toEqual([false, false, false, false]);
    writeReg(space, Cfg.COMMAND, 2, Command.IO | Command.MEMORY | Command.MASTER | Command.INTX_DISABLE);
    expect([space.memoryEnabled, space.ioEnabled, space.busMaster, space.intxDisabled]).toEqual([true, true, true, true]);
  });

  it('tells listeners about changes only, with new and previous values, until unsubscribed', () => {
    const { space } = fullDevice();
    const listener = vi.fn();
    const off = space.onCommandChange(listener);
    writeReg(space, Cfg.COMMAND, 2, Command.MASTER);
    writeReg(space, Cfg.COMMAND, 2, Command.MASTER); // unchanged
    writeReg(space, Cfg.COMMAND, 2, Command.MASTER | Command.SPECIAL); // unimplemented bit: unchanged
    writeReg(space, Cfg.COMMAND, 1, 0);
    expect(listener.mock.calls).toEqual([
      [Command.MASTER, 0],
      [0, Command.MASTER],
    ]);
    off();
    writeReg(space, Cfg.COMMAND, 2, Command.MEMORY);
    expect(listener).toHaveBeenCalledTimes(2);
  });

  it('lets a device see bus mastering go off on reset', () => {
    const { space } = fullDevice();
    const seen: boolean[] = [];
    space.onCommandChange(() => seen.push(space.busMaster));
    writeReg(space, Cfg.COMMAND, 2, Command.MASTER | Command.MEMORY);
    space.reset();
    expect(seen).toEqual([true, false]);
  });

  it('device-side stores neither notify nor become power-on values', () => {
    const { space } = fullDevice();
    const listener = vi.fn();
    space.onCommandChange(listener);
    space.setU16(Cfg.COMMAND, Command.MASTER);
    expect(listener).not.toHaveBeenCalled();
    space.setU16(Cfg.VENDOR_ID, 0xabcd);
    space.reset();
    expect(space.u16(Cfg.VENDOR_ID)).toBe(VENDOR);
  });

  it('setInterruptStatus mirrors INTx into STATUS.INTERRUPT', () => {
    const { space } = fullDevice();
    space.setInterruptStatus(true);
    expect(space.u16(Cfg.STATUS) & Status.INTERRUPT).toBe(Status.INTERRUPT);
    space.setInterruptStatus(false);
    expect(space.u16(Cfg.STATUS)).toBe(Status.CAP_LIST);
  });
});

describe('reset', () => {
  it('restores every byte to its power-on value', () => {
    const { space } = fullDevice();
    const powerOn = dump(space);
    space.write(0, new Uint8Array(4096).fill(0x7f)); // 0xff would also initiate an FLR
    expect(dump(space)).not.toEqual(powerOn);
    space.reset();
    expect(dump(space)).toEqual(powerOn);
  });
});
