/**
 * A fully featured PCI Express function (NVMe-like identity, every capability builder) and helpers
 * that access config space the way a client does: through `read`/`write` byte ranges.
 */
import {
  ClassCode,
  ConfigSpace,
  DeviceSerialNumberCapability,
  GenericExtendedCapability,
  MsiCapability,
  MsixCapability,
  MsixTable,
  PcieCapability,
  PowerManagementCapability,
  RegisterLayout,
  VendorCapability,
  ExtCapId,
  type DeliverFn,
} from '../../lib/pci';

export const VENDOR = 0x4e58;
export const DEVICE = 0x0001;
export const SERIAL = 0x0123_4567_89ab_cdefn;

/** Vectors delivered, in order, by the fixture's deliver functions. */
export interface Recorder {
  delivered: number[];
  deliver: DeliverFn;
}

export function recorder(accept: (vector: number) => boolean = () => true): Recorder {
  const delivered: number[] = [];
  return {
    delivered,
    deliver: (vector) => {
      if (!accept(vector)) return false;
      delivered.push(vector);
      return true;
    },
  };
}

export interface FullDevice {
  space: ConfigSpace;
  pm: PowerManagementCapability;
  msi: MsiCapability;
  msix: MsixCapability;
  table: MsixTable;
  pcie: PcieCapability;
  vendor: VendorCapability;
  dsn: DeviceSerialNumberCapability;
  generic: GenericExtendedCapability;
  flrCount: () => number;
}

/**
 * BAR0: 64-bit 16 KiB memory; BAR2: 32 bytes I/O; BAR4: 32-bit prefetchable 8 KiB holding the MSI-X
 * table (offset 0) and PBA (0x1000); ROM 64 KiB. Capabilities: PM, MSI (8 vectors, 64-bit,
 * maskable), MSI-X (16 vectors), PCIe, vendor (4 data bytes, 2 writable); extended: DSN and a
 * generic vendor-specific one with one writable dword.
 * `flr` false leaves the PCIe reset hook at its default (config space reset).
 */
export function fullDevice(options: { countFlr?: boolean } = {}): FullDevice {
  const space = new ConfigSpace({
    express: true,
    vendorId: VENDOR,
    deviceId: DEVICE,
    subsystemVendorId: 0x1af4,
    subsystemId: 0x1100,
    classCode: ClassCode.STORAGE_NVME,
    revision: 2,
    interruptPin: 1,
  });
  space.defineBar(0, { size: 0x4000, is64: true });
  space.defineBar(2, { size: 32, kind: 'io' });
  space.defineBar(4, { size: 0x2000, prefetchable: true });
  space.defineRom(0x10000);
  let flrs = 0;
  const pm = new PowerManagementCapability();
  const msi = new MsiCapability({ vectors: 8 });
  const table = new MsixTable({ vectors: 16 });
  const msix = new MsixCapability(table, { table: { bar: 4, offset: 0 }, pba: { bar: 4, offset: 0x1000 } });
  const pcie = new PcieCapability(
    options.countFlr === true
      ? {
          onFunctionLevelReset: () => {
            flrs++;
            space.reset();
          },
        }
      : {},
  );
  const vendor = new VendorCapability(Uint8Array.of(0xde, 0xad, 0xbe, 0xef), {
    writable: Uint8Array.of(0, 0, 0xff, 0xff),
  });
  for (const cap of [pm, msi, msix, pcie, vendor]) space.addCapability(cap);
  const dsn = new DeviceSerialNumberCapability(SERIAL);
  const generic = new GenericExtendedCapability({
    id: ExtCapId.VNDR,
    version: 1,
    body: new RegisterLayout(8).define(0, 4, 0x0008_0001).define(4, 4, 0, { writable: 0xffffffff }),
  });
  space.addExtendedCapability(dsn);
  space.addExtendedCapability(generic);
  return { space, pm, msi, msix, table, pcie, vendor, dsn, generic, flrCount: () => flrs };
}

/** A guest read of `size` bytes (1, 2 or 4) as a number. */
export function readReg(space: ConfigSpace, offset: number, size: 1 | 2 | 4): number {
  const bytes = new Uint8Array(size);
  space.read(offset, bytes);
  return bytes.reduceRight((value, byte) => value * 256 + byte, 0);
}

/** A guest write of `size` bytes (1, 2 or 4), little-endian. */
export function writeReg(space: ConfigSpace, offset: number, size: 1 | 2 | 4, value: number): void {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) bytes[i] = Math.floor(value / 256 ** i) & 0xff;
  space.write(offset, bytes);
}

/** The whole space as the client's first 256-byte (or 4 KiB) read sees it. */
export function dump(space: ConfigSpace): Uint8Array {
  const bytes = new Uint8Array(space.size);
  space.read(0, bytes);
  return bytes;
}

/** Walks the standard list from CAPABILITY_LIST: [offset, id] pairs; throws on a loop. */
export function walkCapabilities(space: ConfigSpace): [number, number][] {
  const seen: [number, number][] = [];
  for (let at = readReg(space, 0x34, 1); at !== 0; at = readReg(space, at + 1, 1)) {
    if (seen.length > 48) throw new Error('capability list loops');
    seen.push([at, readReg(space, at, 1)]);
  }
  return seen;
}

/** Walks the extended list from 0x100: [offset, id, version] triples; throws on a loop. */
export function walkExtended(space: ConfigSpace): [number, number, number][] {
  const seen: [number, number, number][] = [];
  let at = 0x100;
  while (at !== 0) {
    const header = readReg(space, at, 4);
    if (header === 0) break;
    if (seen.length > 960) throw new Error('extended capability list loops');
    seen.push([at, header & 0xffff, (header >>> 16) & 0xf]);
    at = header >>> 20;
  }
  return seen;
}
