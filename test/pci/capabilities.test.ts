import { describe, expect, it, vi } from 'vitest';
import {
  CapId,
  Cfg,
  Command,
  ConfigSpace,
  DevCtl,
  DevSta,
  DeviceSerialNumberCapability,
  ExpCap,
  ExtCapId,
  GenericExtendedCapability,
  MsiCap,
  MsiFlags,
  MsixCap,
  MsixFlags,
  PcieCapability,
  PmCap,
  PowerManagementCapability,
  PowerState,
  RegisterLayout,
  Status,
  VendorCapability,
  barOffset,
  type CapabilityWrite,
} from '../../lib/pci';
import { SERIAL, dump, fullDevice, readReg, walkCapabilities, walkExtended, writeReg } from './fixtures';

function conventional(): ConfigSpace {
  return new ConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0 });
}

describe('standard capability list', () => {
  it('walking from CAPABILITY_LIST visits every capability once, in order, and ends at 0', () => {
    const { space } = fullDevice();
    expect(walkCapabilities(space)).toEqual([
      [0x40, CapId.PM],
      [0x48, CapId.MSI],
      [0x60, CapId.MSIX],
      [0x6c, CapId.EXP],
      [0xa8, CapId.VNDR],
    ]);
    expect(space.u16(Cfg.STATUS) & Status.CAP_LIST).toBe(Status.CAP_LIST);
    expect(space.findCapability(CapId.MSIX)).toBe(0x60);
    expect(space.findCapability(CapId.AGP)).toBeUndefined();
  });

  it('without capabilities STATUS.CAP_LIST is clear and the pointer is 0', () => {
    const space = conventional();
    expect(space.u16(Cfg.STATUS) & Status.CAP_LIST).toBe(0);
    expect(walkCapabilities(space)).toEqual([]);
  });

  it('IDs and next pointers are read-only, and survive reset', () => {
    const { space } = fullDevice();
    for (const [offset] of walkCapabilities(space)) writeReg(space, offset, 2, 0xffff);
    space.reset();
    expect(walkCapabilities(space).map(([offset]) => offset)).toEqual([0x40, 0x48, 0x60, 0x6c, 0xa8]);
  });

  it('explicit offsets are honoured and linked in insertion order', () => {
    const space = conventional();
    space.addCapability(new PowerManagementCapability(), 0xc0);
    space.addCapability(new VendorCapability(new Uint8Array(4)), 0x50);
    space.addCapability(new VendorCapability(new Uint8Array(1))); // after the highest one
    expect(walkCapabilities(space)).toEqual([
      [0xc0, CapId.PM],
      [0x50, CapId.VNDR],
      [0xc8, CapId.VNDR],
    ]);
  });

  it('refuses misaligned, overlapping, too-low and too-high placements', () => {
    const space = conventional();
    space.addCapability(new PowerManagementCapability(), 0x40);
    const cap = (): VendorCapability => new VendorCapability(new Uint8Array(5));
    expect(() => space.addCapability(cap(), 0x4a)).toThrow(RangeError);
    expect(() => space.addCapability(cap(), 0x44)).toThrow(/overlap/);
    expect(() => space.addCapability(cap(), 0x3c)).toThrow(RangeError);
    expect(() => space.addCapability(cap(), 0xfc)).toThrow(RangeError);
    expect(() => space.addCapability(new VendorCapability(new Uint8Array(200)))).toThrow(RangeError);
    expect(walkCapabilities(space)).toEqual([[0x40, CapId.PM]]);
  });

  it('a capability object can only be placed once', () => {
    const pm = new PowerManagementCapability();
    conventional().addCapability(pm);
    expect(() => conventional().addCapability(pm)).toThrow(/already added/);
  });

  it('an unplaced capability cannot be queried', () => {
    expect(() => new PowerManagementCapability().powerState).toThrow(/not been added/);
  });
});

describe('extended capability list', () => {
  it('starts at 0x100 and chains through the 12-bit next fields to 0', () => {
    const { space } = fullDevice();
    expect(walkExtended(space)).toEqual([
      [0x100, ExtCapId.DSN, 1],
      [0x10c, ExtCapId.VNDR, 1],
    ]);
    expect(readReg(space, 0x100, 4)).toBe((0x10c << 20) | (1 << 16) | ExtCapId.DSN);
    expect(readReg(space, 0x10c, 4) >>> 20).toBe(0);
    expect(space.findExtendedCapability(ExtCapId.DSN)).toBe(0x100);
  });

  it('an Express space without extended capabilities has a zero header at 0x100', () => {
    const space = new ConfigSpace({ express: true, vendorId: 1, deviceId: 2, classCode: 0 });
    expect(readReg(space, 0x100, 4)).toBe(0);
    expect(walkExtended(space)).toEqual([]);
  });

  it('headers are read-only', () => {
    const { space } = fullDevice();
    writeReg(space, 0x100, 4, 0xffffffff);
    writeReg(space, 0x10c, 4, 0);
    expect(walkExtended(space).map(([offset]) => offset)).toEqual([0x100, 0x10c]);
  });

  it('needs an Express space, and the first one at 0x100', () => {
    expect(() => conventional().addExtendedCapability(new DeviceSerialNumberCapability(1n))).toThrow(/Express/);
    const space = new ConfigSpace({ express: true, vendorId: 1, deviceId: 2, classCode: 0 });
    expect(() => space.addExtendedCapability(new DeviceSerialNumberCapability(1n), 0x200)).toThrow(RangeError);
    space.addExtendedCapability(new DeviceSerialNumberCapability(1n));
    space.addExtendedCapability(new DeviceSerialNumberCapability(2n), 0x800);
    expect(() => space.addExtendedCapability(new DeviceSerialNumberCapability(3n), 0xffc)).toThrow(RangeError);
    expect(walkExtended(space).map(([offset]) => offset)).toEqual([0x100, 0x800]);
  });

  it('Device Serial Number holds the 64-bit serial, read-only', () => {
    const { space } = fullDevice();
    writeReg(space, 0x104, 4, 0);
    expect(readReg(space, 0x104, 4)).toBe(0x89abcdef);
    expect(readReg(space, 0x108, 4)).toBe(0x01234567);
    expect(() => new DeviceSerialNumberCapability(-1n)).toThrow(RangeError);
    expect(() => new DeviceSerialNumberCapability(1n << 64n)).toThrow(RangeError);
    expect(SERIAL).toBe(0x0123_4567_89ab_cdefn);
  });

  it('a generic extended capability applies its body masks and calls its hook', () => {
    const onWrite = vi.fn<(write: CapabilityWrite) => void>();
    const space = new ConfigSpace({ express: true, vendorId: 1, deviceId: 2, classCode: 0 });
    const body = new RegisterLayout(8).define(0, 4, 0xabcd).define(4, 4, 0, { writable: 0x0000ffff });
    space.addExtendedCapability(new GenericExtendedCapability({ id: ExtCapId.VNDR, version: 2, body, onWrite }));
    writeReg(space, 0x104, 4, 0xffffffff);
    writeReg(space, 0x108, 4, 0x12345678);
    expect(readReg(space, 0x104, 4)).toBe(0xabcd);
    expect(readReg(space, 0x108, 4)).toBe(0x5678);
    expect(onWrite).toHaveBeenCalledTimes(2);
    expect(onWrite.mock.calls[1]?.[0]).toMatchObject({ base: 0x100, offset: 8 });
  });
});

describe('vendor-specific capability', () => {
  it('carries its length in byte 2 and the data after it; only writable data bytes change', () => {
    const { space, vendor } = fullDevice();
    expect(Array.from(dump(space).subarray(0xa8, 0xaf))).toEqual([0x09, 0x00, 7, 0xde, 0xad, 0xbe, 0xef]);
    space.write(0xaa, Uint8Array.of(0, 1, 2, 3, 4));
    expect(Array.from(dump(space).subarray(0xa8, 0xaf))).toEqual([0x09, 0x00, 7, 0xde, 0xad, 3, 4]);
    const data = new Uint8Array(4);
    vendor.readData(0, data);
    expect(Array.from(data)).toEqual([0xde, 0xad, 3, 4]);
  });

  it('tells its hook which bytes were written, with the bytes before', () => {
    const onWrite = vi.fn<(write: CapabilityWrite) => void>();
    const space = conventional();
    space.addCapability(new VendorCapability(Uint8Array.of(1, 2, 3), { writable: Uint8Array.of(0xff, 0xff, 0xff), onWrite }));
    space.write(0x3e, Uint8Array.of(9, 9, 9, 9, 9, 7)); // from MIN_GNT into the vendor data
    const write = onWrite.mock.calls[0]?.[0];
    expect(write?.base).toBe(0x40);
    expect(write?.offset).toBe(0);
    expect(Array.from(write?.data ?? [])).toEqual([9, 9, 9, 7]);
    expect(Array.from(write?.before ?? [])).toEqual([0x09, 0, 6, 1, 2, 3]);
    expect(space.u8(0x42)).toBe(6); // length is read-only
    expect(space.u8(0x43)).toBe(7);
    expect(space.u8(0x44)).toBe(2);
  });

  it('refuses data that would overflow the length byte', () => {
    expect(() => new VendorCapability(new Uint8Array(253))).toThrow(RangeError);
  });
});

describe('Power Management', () => {
  const pmcsr = 0x40 + PmCap.CTRL;

  it('reports PM 1.2, D0, No_Soft_Reset', () => {
    const { space, pm } = fullDevice();
    expect(readReg(space, 0x40 + PmCap.PMC, 2)).toBe(0x0003);
    expect(readReg(space, pmcsr, 2)).toBe(0x0008);
    expect(pm.powerState).toBe(PowerState.D0);
  });

  it('D0 -> D3hot -> D0 keeps state with No_Soft_Reset and tells the device', () => {
    const changes: number[][] = [];
    const space = conventional();
    space.defineBar(0, { size: 4096 });
    const pm = new PowerManagementCapability({ onPowerStateChange: (to, from) => changes.push([from, to]) });
    space.addCapability(pm);
    writeReg(space, Cfg.COMMAND, 2, Command.MEMORY);
    writeReg(space, pm.offset + PmCap.CTRL, 2, PowerState.D3HOT);
    expect(pm.powerState).toBe(PowerState.D3HOT);
    writeReg(space, pm.offset + PmCap.CTRL, 2, 0xffff & ~0x8000 & ~0x3); // all but PME_Status and state: D0
    expect(pm.powerState).toBe(PowerState.D0);
    expect(readReg(space, pm.offset + PmCap.CTRL, 2)).toBe(0x0008); // NSR read-only, PME_En not implemented
    expect(space.command).toBe(Command.MEMORY);
    expect(changes).toEqual([
      [0, 3],
      [3, 0],
    ]);
  });

  it('D3hot -> D0 without No_Soft_Reset resets the function', () => {
    const space = conventional();
    space.defineBar(0, { size: 4096 });
    const pm = new PowerManagementCapability({ noSoftReset: false });
    space.addCapability(pm);
    expect(space.u16(pm.offset + PmCap.CTRL)).toBe(0);
    writeReg(space, Cfg.COMMAND, 2, Command.MEMORY);
    writeReg(space, barOffset(0), 4, 0xfe000000);
    writeReg(space, pm.offset + PmCap.CTRL, 1, PowerState.D3HOT);
    expect(space.command).toBe(Command.MEMORY); // entering D3hot is not a reset
    writeReg(space, pm.offset + PmCap.CTRL, 1, PowerState.D0);
    expect(space.command).toBe(0);
    expect(space.barAddress(0)).toBe(0n);
    expect(pm.powerState).toBe(PowerState.D0);
  });

  it('uses onSoftReset when given', () => {
    const onSoftReset = vi.fn();
    const space = conventional();
    const pm = new PowerManagementCapability({ noSoftReset: false, onSoftReset });
    space.addCapability(pm);
    writeReg(space, pm.offset + PmCap.CTRL, 1, PowerState.D3HOT);
    writeReg(space, pm.offset + PmCap.CTRL, 1, PowerState.D0);
    expect(onSoftReset).toHaveBeenCalledTimes(1);
  });

  it('discards unsupported states and D3hot -> D1', () => {
    const onPowerStateChange = vi.fn();
    const space = conventional();
    const plain = new PowerManagementCapability({ onPowerStateChange });
    space.addCapability(plain);
    writeReg(space, plain.offset + PmCap.CTRL, 1, PowerState.D1);
    writeReg(space, plain.offset + PmCap.CTRL, 1, PowerState.D2);
    expect(plain.powerState).toBe(PowerState.D0);
    expect(onPowerStateChange).not.toHaveBeenCalled();

    const other = conventional();
    const d1 = new PowerManagementCapability({ d1: true, d2: true });
    other.addCapability(d1);
    expect(other.u16(d1.offset + PmCap.PMC)).toBe(0x0603);
    writeReg(other, d1.offset + PmCap.CTRL, 1, PowerState.D1);
    expect(d1.powerState).toBe(PowerState.D1);
    writeReg(other, d1.offset + PmCap.CTRL, 1, PowerState.D3HOT);
    writeReg(other, d1.offset + PmCap.CTRL, 1, PowerState.D1);
    expect(d1.powerState).toBe(PowerState.D3HOT);
  });
});

describe('MSI and MSI-X capability registers', () => {
  it('MSI: 8 vectors, 64-bit, maskable; only enable and MME writable; MME clamped to MMC', () => {
    const { space } = fullDevice();
    const flags = 0x48 + MsiCap.FLAGS;
    expect(readReg(space, flags, 2)).toBe(MsiFlags.MASKBIT | MsiFlags.ADDR_64 | (3 << 1));
    writeReg(space, flags, 2, 0xffff);
    expect(readReg(space, flags, 2)).toBe(MsiFlags.MASKBIT | MsiFlags.ADDR_64 | (3 << 1) | (3 << 4) | MsiFlags.ENABLE);
    writeReg(space, 0x48 + MsiCap.ADDRESS_LO, 4, 0xfee0_0003);
    expect(readReg(space, 0x48 + MsiCap.ADDRESS_LO, 4)).toBe(0xfee0_0000);
    writeReg(space, 0x48 + MsiCap.MASK_64, 4, 0xffffffff);
    expect(readReg(space, 0x48 + MsiCap.MASK_64, 4)).toBe(0xff);
    writeReg(space, 0x48 + MsiCap.PENDING_64, 4, 0xffffffff);
    expect(readReg(space, 0x48 + MsiCap.PENDING_64, 4)).toBe(0);
  });

  it('MSI-X: table size, BIR/offsets read-only; only enable and function mask writable', () => {
    const { space, msix } = fullDevice();
    expect(readReg(space, 0x60 + MsixCap.FLAGS, 2)).toBe(15);
    expect(readReg(space, 0x60 + MsixCap.TABLE, 4)).toBe(0x0000_0004);
    expect(readReg(space, 0x60 + MsixCap.PBA, 4)).toBe(0x0000_1004);
    space.write(0x60, new Uint8Array(12).fill(0xff));
    expect(readReg(space, 0x60 + MsixCap.FLAGS, 2)).toBe(MsixFlags.ENABLE | MsixFlags.MASKALL | 15);
    expect(readReg(space, 0x60 + MsixCap.TABLE, 4)).toBe(0x0000_0004);
    expect(msix.tableRange).toEqual({ bar: 4, offset: 0, size: 256 });
    expect(msix.pbaRange).toEqual({ bar: 4, offset: 0x1000, size: 8 });
  });
});

describe('PCI Express capability', () => {
  const at = 0x6c;

  it('is a version 2 endpoint with FLR and a x4 8 GT/s link', () => {
    const { space, pcie } = fullDevice();
    expect(readReg(space, at + ExpCap.FLAGS, 2)).toBe(0x0002);
    expect(readReg(space, at + ExpCap.DEVCAP, 4)).toBe(0x1000_8021);
    expect(readReg(space, at + ExpCap.DEVCTL, 2)).toBe(0x2810);
    expect(readReg(space, at + ExpCap.LNKCAP, 4)).toBe(0x43);
    expect(readReg(space, at + ExpCap.LNKSTA, 2)).toBe(0x1043);
    expect(readReg(space, at + ExpCap.LNKCAP2, 4)).toBe(0x0e);
    expect(readReg(space, at + ExpCap.LNKCTL2, 2)).toBe(3);
    expect(readReg(space, at + ExpCap.DEVCAP2, 4)).toBe(0x10);
    expect(pcie.maxPayloadSize).toBe(128);
    expect(pcie.maxReadRequestSize).toBe(512);
  });

  it('Device Control: writable fields change, unimplemented ones do not', () => {
    const { space, pcie } = fullDevice();
    writeReg(space, at + ExpCap.DEVCTL, 2, 0x7fff);
    expect(readReg(space, at + ExpCap.DEVCTL, 2)).toBe(0x79ff);
    expect(pcie.maxPayloadSize).toBe(128 << 7);
    expect(pcie.maxReadRequestSize).toBe(128 << 7);
  });

  it('Device Status error bits are write-1-to-clear', () => {
    const { space } = fullDevice();
    space.setU16(at + ExpCap.DEVSTA, DevSta.CED | DevSta.URD | DevSta.TRPND);
    writeReg(space, at + ExpCap.DEVSTA, 2, DevSta.URD | DevSta.TRPND);
    expect(readReg(space, at + ExpCap.DEVSTA, 2)).toBe(DevSta.CED | DevSta.TRPND);
  });

  it('Initiate FLR calls the reset hook, which restores power-on values; the bit reads 0', () => {
    const { space, flrCount, msi, msix, table } = fullDevice({ countFlr: true });
    const powerOn = dump(space);
    writeReg(space, Cfg.COMMAND, 2, Command.MEMORY | Command.MASTER);
    writeReg(space, barOffset(0), 4, 0xfebf0000);
    writeReg(space, 0x48 + MsiCap.FLAGS, 2, MsiFlags.ENABLE);
    writeReg(space, 0x60 + MsixCap.FLAGS, 2, MsixFlags.ENABLE);
    table.writeTable(12, Uint8Array.of(0, 0, 0, 0));
    expect([space.busMaster, msi.enabled, msix.enabled, table.enabled, table.isMasked(0)]).toEqual([true, true, true, true, false]);

    writeReg(space, at + ExpCap.DEVCTL, 2, DevCtl.BCR_FLR | 0x2810);
    expect(flrCount()).toBe(1);
    expect(dump(space)).toEqual(powerOn);
    expect([space.busMaster, msi.enabled, msix.enabled, table.enabled, table.isMasked(0)]).toEqual([false, false, false, false, true]);
  });

  it('a one-byte write of bit 7 at DEVCTL+1 is an FLR too; other writes are not', () => {
    const { space, flrCount } = fullDevice({ countFlr: true });
    writeReg(space, at + ExpCap.DEVCTL, 1, 0xff);
    writeReg(space, at + ExpCap.DEVCTL + 1, 1, 0x7f);
    expect(flrCount()).toBe(0);
    writeReg(space, at + ExpCap.DEVCTL + 1, 1, 0x80);
    expect(flrCount()).toBe(1);
  });

  it('the default FLR hook resets the config space', () => {
    const { space } = fullDevice();
    writeReg(space, Cfg.COMMAND, 2, Command.MASTER);
    writeReg(space, at + ExpCap.DEVCTL, 2, DevCtl.BCR_FLR);
    expect(space.command).toBe(0);
  });

  it('a bulk all-ones write over config space initiates an FLR', () => {
    const { space, flrCount } = fullDevice({ countFlr: true });
    space.write(0, new Uint8Array(4096).fill(0xff));
    expect(flrCount()).toBe(1);
  });

  it('without FLR the capability does not advertise it and ignores the bit', () => {
    const onFunctionLevelReset = vi.fn();
    const space = new ConfigSpace({ express: true, vendorId: 1, deviceId: 2, classCode: 0 });
    const pcie = new PcieCapability({ flr: false, onFunctionLevelReset });
    space.addCapability(pcie);
    expect(space.u32(pcie.offset + ExpCap.DEVCAP) & 0x1000_0000).toBe(0);
    writeReg(space, pcie.offset + ExpCap.DEVCTL, 2, DevCtl.BCR_FLR);
    expect(onFunctionLevelReset).not.toHaveBeenCalled();
  });

  it('a root-complex integrated endpoint has no link registers', () => {
    const space = new ConfigSpace({ express: true, vendorId: 1, deviceId: 2, classCode: 0 });
    const pcie = new PcieCapability({ type: 'rc-integrated', maxPayloadSupported: 512 });
    space.addCapability(pcie);
    expect(space.u16(pcie.offset + ExpCap.FLAGS)).toBe(0x0092);
    expect(space.u32(pcie.offset + ExpCap.DEVCAP) & 7).toBe(2);
    for (const reg of [ExpCap.LNKCAP, ExpCap.LNKCTL, ExpCap.LNKCAP2, ExpCap.LNKCTL2]) {
      writeReg(space, pcie.offset + reg, 2, 0xffff);
      expect(space.u32(pcie.offset + reg)).toBe(0);
    }
  });

  it('refuses impossible link and payload options', () => {
    expect(() => new PcieCapability({ linkSpeed: 9 })).toThrow(RangeError);
    expect(() => new PcieCapability({ linkWidth: 3 as 4 })).toThrow(RangeError);
    expect(() => new PcieCapability({ maxPayloadSupported: 100 as 128 })).toThrow(RangeError);
  });
});
