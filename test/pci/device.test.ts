/**
 * PciDevice: the bridge from lib/pci (ConfigSpace, capabilities, MsixTable) to the server's
 * VfioUserDevice. Exercised the way QEMU's vfio-user-pci drives a device (shared/peers.md §2):
 * REGION_READ/WRITE bytes on region 7 and the BARs, SET_IRQS with eventfds we create and drain,
 * DEVICE_RESET, and a hang-up. A few checks go straight at the object where that is simpler.
 */
import * as fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { binding } from '../../lib/native/binding';
import { createMemfd } from '../../lib/native/memfd';
import { PciDevice, type PciDeviceOptions } from '../../lib/pci/device';
import { CapId, Cfg, Command, DevCtl, ExpCap, MSIX_ENTRY_SIZE, MsiCap, MsiFlags, MsixCap, MsixEntry, MsixFlags, Status } from '../../lib/pci';
import { DmaError } from '../../lib/server/dma';
import type { ResetReason } from '../../lib/server/device';
import {
  Command as Msg,
  DeviceFlags,
  DmaMapFlags,
  Errno,
  IrqSetFlags,
  PciIrq,
  PciRegion,
  RegionInfoFlags,
} from '../../lib/protocol/constants';
import { decodeDeviceInfoReply, encodeDeviceInfoRequest } from '../../lib/protocol/messages/device';
import { decodeRegionInfoReply, encodeRegionInfoRequest } from '../../lib/protocol/messages/region';
import { decodeIrqInfoReply, encodeIrqInfoRequest, encodeSetIrqsRequest } from '../../lib/protocol/messages/irq';
import { encodeDmaMapRequest } from '../../lib/protocol/messages/dma';
import { rawClient, regionAccess, startServer, type RawClient } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

// Registered after the fd check, so it runs first (hooks unwind in reverse order).
const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

const { DATA_NONE, DATA_EVENTFD, ACTION_MASK, ACTION_UNMASK, ACTION_TRIGGER } = IrqSetFlags;
const CONFIG = PciRegion.CONFIG;
const MSIX_VECTORS = 8;
const PBA_OFFSET = 0x1000;

// ---- the device under test ------------------------------------------------------------------------

/**
 * BAR0: 64-bit 16 KiB RAM-like memory; BAR2: 8 KiB holding the MSI-X table (offset 0) and PBA
 * (0x1000), other offsets answered by a callback; BAR4: 32-byte I/O BAR with an asynchronous read
 * and a write that fails at offset 0; BAR5: 16 bytes without callbacks. PM, PCIe (FLR), MSI with 4
 * vectors, MSI-X with 8; INTA#.
 */
class Fixture extends PciDevice {
  readonly resets: ResetReason[] = [];
  readonly resetErrors: unknown[] = [];
  failResetWith: Error | null = null;

  constructor(
    readonly bar0: Buffer,
    readonly log: string[],
    overrides: Partial<PciDeviceOptions> = {},
  ) {
    super({
      express: true,
      vendorId: 0x4e58,
      deviceId: 0x0042,
      subsystemVendorId: 0x1af4,
      subsystemId: 0x1100,
      classCode: 0x0b4000,
      revision: 3,
      interruptPin: 1,
      bars: {
        0: {
          size: 0x4000,
          is64: true,
          read: (offset, dst) => {
            log.push(`bar0 read ${offset} ${dst.length}`);
            bar0.copy(dst, 0, offset, offset + dst.length);
          },
          write: (offset, src) => {
            log.push(`bar0 write ${offset} ${src.length}`);
            src.copy(bar0, offset);
          },
        },
        2: {
          size: 0x2000,
          read: (offset, dst) => {
            log.push(`bar2 read ${offset} ${dst.length}`);
            dst.fill(0xa5);
          },
          write: (offset, src) => {
            log.push(`bar2 write ${offset} ${src.length}`);
          },
        },
        4: {
          size: 32,
          kind: 'io',
          read: async (offset, dst) => {
            await new Promise((resolve) => setImmediate(resolve));
            log.push(`bar4 read ${offset} ${dst.length}`);
            dst.fill(0x5a);
          },
          write: (offset) => (offset === 0 ? Errno.EIO : 0),
        },
        5: { size: 16 },
      },
      pm: true,
      pcie: true,
      msi: { vectors: 4 },
      msix: { vectors: MSIX_VECTORS, table: { bar: 2, offset: 0 }, pba: { bar: 2, offset: PBA_OFFSET } },
      ...overrides,
    });
  }

  protected override onReset(reason: ResetReason): void {
    this.resets.push(reason);
    if (this.failResetWith) throw this.failResetWith;
  }

  protected override onResetError(err: unknown): void {
    this.resetErrors.push(err);
  }
}

function makeDevice(overrides: Partial<PciDeviceOptions> = {}): Fixture {
  return new Fixture(Buffer.alloc(0x4000), [], overrides);
}

function powerOnBytes(device: PciDevice): Buffer {
  const bytes = Buffer.alloc(device.config.size);
  device.config.read(0, bytes);
  return bytes;
}

function capAt(device: PciDevice, id: number): number {
  const at = device.config.findCapability(id);
  if (at === undefined) throw new Error(`no capability 0x${id.toString(16)}`);
  return at;
}

// ---- the client side ------------------------------------------------------------------------------

interface Rig {
  device: Fixture;
  client: RawClient;
  stop(): Promise<void>;
  serverDisconnected(): Promise<void>;
  powerOn: Buffer;
  socketPath: string;
}

async function serve(device: Fixture = makeDevice()): Promise<Rig> {
  const powerOn = powerOnBytes(device);
  const s = await startServer(device);
  const client = await rawClient(s.socketPath);
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await s.stop();
    client.close();
  };
  cleanups.push(stop);
  const serverDisconnected = () => new Promise<void>((resolve) => s.server.once('disconnect', () => resolve()));
  return { device, client, stop, serverDisconnected, powerOn, socketPath: s.socketPath };
}

/** A non-blocking eventfd we own (closed after the test). */
function eventfd(): number {
  const fd = binding.eventfd(0, binding.constants.EFD_NONBLOCK);
  cleanups.push(() => fs.closeSync(fd));
  return fd;
}

const drain = (fd: number): number => binding.eventfdDrain(fd);

function ok(reply: Buffer | number): Buffer {
  if (typeof reply === 'number') throw new Error(`expected a reply, got errno ${reply}`);
  return reply;
}

async function read(c: RawClient, region: number, offset: number, count: number): Promise<Buffer | number> {
  const reply = await c.msg(Msg.REGION_READ, regionAccess(region, offset, count));
  if (typeof reply === 'number') return reply;
  expect(reply.length).toBe(16 + count);
  return Buffer.from(reply.subarray(16));
}

async function write(c: RawClient, region: number, offset: number, data: Uint8Array): Promise<number> {
  const reply = await c.msg(Msg.REGION_WRITE, regionAccess(region, offset, data.length, data));
  return typeof reply === 'number' ? reply : 0;
}

function le(value: number, size: number): Buffer {
  const b = Buffer.alloc(size);
  b.writeUIntLE(value >>> 0, 0, size);
  return b;
}

async function cfgRead(c: RawClient, offset: number, size: 1 | 2 | 4): Promise<number> {
  return ok(await read(c, CONFIG, offset, size)).readUIntLE(0, size);
}

async function cfgWrite(c: RawClient, offset: number, size: 1 | 2 | 4, value: number): Promise<void> {
  expect(await write(c, CONFIG, offset, le(value, size))).toBe(0);
}

async function setIrqs(c: RawClient, flags: number, index: number, start: number, count: number, fds: number[] = []): Promise<number> {
  const reply = await c.msg(Msg.DEVICE_SET_IRQS, encodeSetIrqsRequest({ flags, index, start, count }), fds);
  return typeof reply === 'number' ? reply : 0;
}

/** QEMU's way of handing vector `vector` of `index` its eventfd. */
async function giveEventfd(c: RawClient, index: number, vector: number): Promise<number> {
  const fd = eventfd();
  expect(await setIrqs(c, DATA_EVENTFD | ACTION_TRIGGER, index, vector, 1, [fd])).toBe(0);
  return fd;
}

async function setCommand(c: RawClient, bits: number): Promise<void> {
  await cfgWrite(c, Cfg.COMMAND, 2, bits);
}

async function msixControl(rig: Pick<Rig, 'client' | 'device'>, flags: number): Promise<void> {
  await cfgWrite(rig.client, capAt(rig.device, CapId.MSIX) + MsixCap.FLAGS, 2, flags);
}

async function pba(c: RawClient): Promise<number> {
  return ok(await read(c, 2, PBA_OFFSET, 8)).readUInt8(0);
}

// ---- config space -----------------------------------------------------------------------------------

describe('PciDevice: config region 7 serves the ConfigSpace', () => {
  it('reports a PCI device with reset, 9 regions and 5 IRQ indexes with the declared counts', async () => {
    const { client } = await serve();
    const info = decodeDeviceInfoReply(ok(await client.msg(Msg.DEVICE_GET_INFO, encodeDeviceInfoRequest())));
    expect(info).toMatchObject({ flags: DeviceFlags.PCI | DeviceFlags.RESET, numRegions: 9, numIrqs: 5 });
    const counts: number[] = [];
    for (let index = 0; index < 5; index++) {
      counts.push(decodeIrqInfoReply(ok(await client.msg(Msg.DEVICE_GET_IRQ_INFO, encodeIrqInfoRequest({ index })))).count);
    }
    expect(counts).toEqual([1, 4, MSIX_VECTORS, 1, 1]);
  });

  it('describes config (4 KiB, express) and each BAR as a region of its size; absent slots are empty', async () => {
    const { client } = await serve();
    const sizes: bigint[] = [];
    const flags: number[] = [];
    for (let index = 0; index < 9; index++) {
      const r = decodeRegionInfoReply(ok(await client.msg(Msg.DEVICE_GET_REGION_INFO, encodeRegionInfoRequest({ index }))));
      sizes.push(r.size);
      flags.push(r.flags);
    }
    // BAR1 is the upper half of the 64-bit BAR0; BAR3, ROM and VGA are absent.
    expect(sizes).toEqual([0x4000n, 0n, 0x2000n, 0n, 32n, 16n, 0n, 4096n, 0n]);
    const rw = RegionInfoFlags.READ | RegionInfoFlags.WRITE;
    expect(flags).toEqual([rw, 0, rw, 0, rw, rw, 0, rw, 0]);
  });

  it("answers QEMU's first 256-byte read with the IDs, class, header type, pin and capability list", async () => {
    const { client, device } = await serve();
    const cfg = ok(await read(client, CONFIG, 0, 256));
    expect(cfg.readUInt16LE(Cfg.VENDOR_ID)).toBe(0x4e58);
    expect(cfg.readUInt16LE(Cfg.DEVICE_ID)).toBe(0x0042);
    expect(cfg.readUInt8(Cfg.REVISION_ID)).toBe(3);
    expect(cfg.readUIntLE(Cfg.CLASS_PROG, 3)).toBe(0x0b4000);
    expect(cfg.readUInt8(Cfg.HEADER_TYPE)).toBe(0);
    expect(cfg.readUInt16LE(Cfg.SUBSYSTEM_VENDOR_ID)).toBe(0x1af4);
    expect(cfg.readUInt16LE(Cfg.SUBSYSTEM_ID)).toBe(0x1100);
    expect(cfg.readUInt8(Cfg.INTERRUPT_PIN)).toBe(1);
    expect(cfg.readUInt16LE(Cfg.COMMAND)).toBe(0);
    expect(cfg.readUInt16LE(Cfg.STATUS) & Status.CAP_LIST).toBe(Status.CAP_LIST);
    const caps: [number, number][] = [];
    for (let at = cfg.readUInt8(Cfg.CAPABILITY_LIST); at !== 0 && caps.length < 48; at = cfg.readUInt8(at + 1)) caps.push([at, cfg.readUInt8(at)]);
    expect(caps.map(([, id]) => id)).toEqual([CapId.PM, CapId.EXP, CapId.MSI, CapId.MSIX]);
    expect(caps.map(([at]) => at)).toEqual([CapId.PM, CapId.EXP, CapId.MSI, CapId.MSIX].map((id) => capAt(device, id)));
    // The MSI-X capability points at BAR2: table at 0, PBA at 0x1000, 8 vectors.
    const msix = capAt(device, CapId.MSIX);
    expect(cfg.readUInt16LE(msix + MsixCap.FLAGS)).toBe(MSIX_VECTORS - 1);
    expect(cfg.readUInt32LE(msix + MsixCap.TABLE)).toBe(0x0000_0002);
    expect(cfg.readUInt32LE(msix + MsixCap.PBA)).toBe(PBA_OFFSET | 2);
    // The rest of the 4 KiB is there too (region size = ConfigSpace size).
    expect(ok(await read(client, CONFIG, 4092, 4)).length).toBe(4);
  });

  it('answers the BAR and ROM sizing probe exactly as QEMU does it (write ~0, read back, restore)', async () => {
    const { client, device } = await serve();
    const probes: number[] = [];
    for (const offset of [0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, Cfg.ROM_ADDRESS]) {
      const original = await cfgRead(client, offset, 4);
      await cfgWrite(client, offset, 4, 0xffffffff);
      probes.push(await cfgRead(client, offset, 4));
      await cfgWrite(client, offset, 4, original);
      expect(await cfgRead(client, offset, 4), `restored 0x${offset.toString(16)}`).toBe(original);
    }
    expect(probes.map((p) => p.toString(16))).toEqual(
      [0xffffc004, 0xffffffff, 0xffffe000, 0, 0xffffffe1, 0xfffffff0, 0].map((p) => p.toString(16)),
    );
    // Then the guest programs addresses; the type bits stay.
    await cfgWrite(client, 0x10, 4, 0xfe004000);
    await cfgWrite(client, 0x14, 4, 0x1);
    expect(await cfgRead(client, 0x10, 4)).toBe(0xfe004004);
    expect(device.config.barAddress(0)).toBe(0x1_fe00_4000n);
  });

  it('takes 1-, 2- and 4-byte accesses through the masks; read-only fields keep their value', async () => {
    const { client, device } = await serve();
    await cfgWrite(client, Cfg.VENDOR_ID, 4, 0xffffffff);
    expect(await cfgRead(client, Cfg.VENDOR_ID, 4)).toBe(0x0042_4e58);
    await cfgWrite(client, Cfg.INTERRUPT_LINE, 1, 0x0b);
    expect(await cfgRead(client, Cfg.INTERRUPT_LINE, 2)).toBe(0x010b); // line written, pin read-only
    await cfgWrite(client, Cfg.COMMAND, 2, Command.MEMORY | Command.MASTER | 0x0008);
    expect(await cfgRead(client, Cfg.COMMAND, 2)).toBe(Command.MEMORY | Command.MASTER); // special cycles hardwired
    expect(device.config.busMaster).toBe(true);
    expect(await read(client, CONFIG, 4095, 2)).toBe(Errno.EINVAL);
    expect(await write(client, CONFIG, 4096, le(0, 1))).toBe(Errno.EINVAL);
  });
});

// ---- BARs -----------------------------------------------------------------------------------------

describe('PciDevice: BAR regions route to the BAR callbacks', () => {
  it('passes BAR-relative offsets and the exact byte count, both ways', async () => {
    const { client, device } = await serve();
    const data = Buffer.from([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(await write(client, 0, 0x3ff8, data)).toBe(0);
    expect(device.bar0.subarray(0x3ff8)).toEqual(data);
    device.bar0.writeUInt32LE(0xdeadbeef, 0x100);
    expect(await read(client, 0, 0x100, 4)).toEqual(le(0xdeadbeef, 4));
    expect(await read(client, 0, 0x3ffc, 4)).toEqual(data.subarray(4));
    expect(device.log).toEqual(['bar0 write 16376 8', 'bar0 read 256 4', 'bar0 read 16380 4']);
    // Past the BAR's end: refused before the callback.
    expect(await read(client, 0, 0x3ffc, 8)).toBe(Errno.EINVAL);
    expect(device.log).toHaveLength(3);
  });

  it('waits for asynchronous callbacks and hands their errno to the client', async () => {
    const { client, device } = await serve();
    expect(await read(client, 4, 4, 4)).toEqual(Buffer.alloc(4, 0x5a));
    expect(device.log).toEqual(['bar4 read 4 4']);
    expect(await write(client, 4, 0, le(1, 1))).toBe(Errno.EIO);
    expect(await write(client, 4, 1, le(1, 1))).toBe(0);
  });

  it('refuses accesses to a BAR without callbacks and to the upper half of a 64-bit BAR', async () => {
    const { client } = await serve();
    expect(await read(client, 5, 0, 4)).toBe(Errno.EINVAL);
    expect(await write(client, 5, 0, le(0, 4))).toBe(Errno.EINVAL);
    expect(await read(client, 1, 0, 4)).toBe(Errno.EINVAL);
    expect(await read(client, 3, 0, 4)).toBe(Errno.EINVAL);
  });
});

describe('PciDevice: the MSI-X table and PBA inside BAR2 are served by the MsixTable', () => {
  it('reads the table (power-on: every vector masked) and writes through its masks, not the callback', async () => {
    const { client, device } = await serve();
    const table = ok(await read(client, 2, 0, MSIX_VECTORS * MSIX_ENTRY_SIZE));
    for (let v = 0; v < MSIX_VECTORS; v++) {
      expect(table.readUInt32LE(v * MSIX_ENTRY_SIZE + MsixEntry.VECTOR_CTRL), `vector ${v}`).toBe(1);
      expect(table.readUInt32LE(v * MSIX_ENTRY_SIZE + MsixEntry.LOWER_ADDR)).toBe(0);
    }
    const entry = Buffer.alloc(16);
    entry.writeUInt32LE(0xfee0_0003, 0); // address bits 1:0 are not writable
    entry.writeUInt32LE(0x1, 4);
    entry.writeUInt32LE(0x4041, 8);
    entry.writeUInt32LE(0xffff_fffe, 12); // unmask; reserved control bits stay 0
    expect(await write(client, 2, 3 * MSIX_ENTRY_SIZE, entry)).toBe(0);
    expect(device.msix!.address(3)).toBe(0x1_fee0_0000n);
    expect(device.msix!.data(3)).toBe(0x4041);
    expect(device.msix!.isMasked(3)).toBe(false);
    expect(ok(await read(client, 2, 3 * MSIX_ENTRY_SIZE + 8, 8))).toEqual(Buffer.from([0x41, 0x40, 0, 0, 0, 0, 0, 0]));
    // The last dword of the table, alone.
    expect(await read(client, 2, MSIX_VECTORS * MSIX_ENTRY_SIZE - 4, 4)).toEqual(le(1, 4));
    expect(device.log).toEqual([]);
  });

  it('reads the PBA from the MsixTable, ignores PBA writes, and sends other offsets to the callback', async () => {
    const { client, device } = await serve();
    await msixControl({ device, client }, MsixFlags.ENABLE | MsixFlags.MASKALL);
    expect(device.interrupt(1)).toBe('pending');
    expect(device.interrupt(6)).toBe('pending');
    expect(await read(client, 2, PBA_OFFSET, 8)).toEqual(Buffer.from([0x42, 0, 0, 0, 0, 0, 0, 0]));
    expect(await write(client, 2, PBA_OFFSET, Buffer.alloc(8))).toBe(0);
    expect(await pba(client)).toBe(0x42);
    expect(device.log).toEqual([]);
    expect(await read(client, 2, 0x800, 2)).toEqual(Buffer.from([0xa5, 0xa5]));
    expect(await write(client, 2, PBA_OFFSET + 8, le(7, 4))).toBe(0);
    expect(device.log).toEqual(['bar2 read 2048 2', 'bar2 write 4104 4']);
  });

  it('refuses (EINVAL) accesses that straddle the table or PBA edge, changing nothing', async () => {
    const { client, device } = await serve();
    const tableEnd = MSIX_VECTORS * MSIX_ENTRY_SIZE;
    expect(await read(client, 2, tableEnd - 4, 8)).toBe(Errno.EINVAL);
    expect(await write(client, 2, tableEnd - 4, Buffer.alloc(8))).toBe(Errno.EINVAL);
    expect(await read(client, 2, PBA_OFFSET - 4, 8)).toBe(Errno.EINVAL);
    expect(await write(client, 2, PBA_OFFSET - 4, Buffer.alloc(8))).toBe(Errno.EINVAL);
    expect(await read(client, 2, PBA_OFFSET + 4, 8)).toBe(Errno.EINVAL);
    // A big read covering both.
    expect(await read(client, 2, 0, 0x2000)).toBe(Errno.EINVAL);
    expect(device.msix!.isMasked(MSIX_VECTORS - 1)).toBe(true);
    expect(device.log).toEqual([]);
  });
});

// ---- interrupts -------------------------------------------------------------------------------------

describe('PciDevice.interrupt(): MSI-X (the client emulates the table)', () => {
  /** MSI-X enabled, bus master on, and eventfds for the given vectors. */
  async function msixReady(vectors: number[]): Promise<Rig & { fds: Map<number, number> }> {
    const rig = await serve();
    await setCommand(rig.client, Command.MEMORY | Command.MASTER);
    await msixControl(rig, MsixFlags.ENABLE);
    const fds = new Map<number, number>();
    for (const v of vectors) fds.set(v, await giveEventfd(rig.client, PciIrq.MSIX, v));
    return { ...rig, fds };
  }

  it("signals the vector's eventfd although our copy of the table still has the vector masked", async () => {
    const { device, fds } = await msixReady([0, 3]);
    expect(device.msix!.enabled).toBe(true);
    expect(device.msix!.isMasked(3)).toBe(true);
    expect(device.interrupt(3)).toBe('delivered');
    expect(drain(fds.get(3)!)).toBe(1);
    expect(drain(fds.get(0)!)).toBe(0);
    expect(device.interrupt(3)).toBe('delivered');
    expect(device.interrupt(3)).toBe('delivered');
    expect(drain(fds.get(3)!)).toBe(2);
    expect(device.msix!.isPending(3)).toBe(false);
  });

  it('keeps vectors pending under the function mask and delivers them when it is cleared', async () => {
    const rig = await msixReady([2, 5]);
    const { client, device, fds } = rig;
    await msixControl(rig, MsixFlags.ENABLE | MsixFlags.MASKALL);
    expect(device.interrupt(2)).toBe('pending');
    expect(device.interrupt(2)).toBe('pending');
    expect(drain(fds.get(2)!)).toBe(0);
    expect(await pba(client)).toBe(0x04);
    await msixControl(rig, MsixFlags.ENABLE);
    expect(drain(fds.get(2)!)).toBe(1); // pending is one bit: one message
    expect(drain(fds.get(5)!)).toBe(0);
    expect(await pba(client)).toBe(0);
  });

  it('keeps a vector without an eventfd pending and sends it when SET_IRQS hands one over', async () => {
    const { client, device } = await msixReady([0]);
    expect(device.interrupt(6)).toBe('pending');
    expect(await pba(client)).toBe(0x40);
    const fd = await giveEventfd(client, PciIrq.MSIX, 6);
    expect(drain(fd)).toBe(1);
    expect(await pba(client)).toBe(0);
    expect(device.interrupt(6)).toBe('delivered');
    expect(drain(fd)).toBe(1);
    // Disabling all vectors (count 0) takes the eventfds away again.
    expect(await setIrqs(client, DATA_NONE | ACTION_TRIGGER, PciIrq.MSIX, 0, 0)).toBe(0);
    expect(device.interrupt(6)).toBe('pending');
    expect(drain(fd)).toBe(0);
  });

  it("reports 'disabled' and records nothing while MSI-X is off", async () => {
    const rig = await msixReady([1]);
    await msixControl(rig, 0);
    await cfgWrite(rig.client, Cfg.COMMAND, 2, Command.MASTER | Command.INTX_DISABLE);
    expect(rig.device.msix!.enabled).toBe(false);
    expect(rig.device.interrupt(1)).toBe('intx');
    expect(drain(rig.fds.get(1)!)).toBe(0);
    expect(await pba(rig.client)).toBe(0);
  });
});

describe('PciDevice: bus mastering gates DMA and MSI/MSI-X', () => {
  const PAGE = 4096;

  async function withGuestMemory(rig: Rig): Promise<number> {
    const mem = createMemfd('guest', 2 * PAGE);
    cleanups.push(() => mem.close());
    const map = encodeDmaMapRequest({ flags: DmaMapFlags.READ | DmaMapFlags.WRITE, address: 0x10000n, size: BigInt(2 * PAGE) });
    expect(ok(await rig.client.msg(Msg.DMA_MAP, map, [mem.value]))).toBeDefined();
    return mem.value;
  }

  function dmaErrno(fn: () => unknown): number | null {
    try {
      fn();
      return null;
    } catch (err) {
      expect(err).toBeInstanceOf(DmaError);
      return (err as DmaError).errno;
    }
  }

  it('refuses DMA (EPERM) and holds MSI-X back until COMMAND.MASTER is set, and again after it is cleared', async () => {
    const rig = await serve();
    const { client, device } = rig;
    const memfd = await withGuestMemory(rig);
    await msixControl(rig, MsixFlags.ENABLE);
    const fd = await giveEventfd(client, PciIrq.MSIX, 4);

    expect(device.config.busMaster).toBe(false);
    expect(dmaErrno(() => device.dma.view(0x10000, 16, false))).toBe(Errno.EPERM);
    await expect(device.dma.write(0x10000, Buffer.from('x'))).rejects.toMatchObject({ errno: Errno.EPERM });
    expect(device.interrupt(4)).toBe('pending');
    expect(drain(fd)).toBe(0);

    await setCommand(client, Command.MEMORY | Command.MASTER);
    expect(drain(fd)).toBe(1); // the pending vector goes out with MASTER
    expect(await pba(client)).toBe(0);
    device.dma.view(0x10000, 5, true).write('hello');
    const seen = Buffer.alloc(5);
    fs.readSync(memfd, seen, 0, 5, 0);
    expect(seen.toString()).toBe('hello');

    await setCommand(client, Command.MEMORY);
    expect(dmaErrno(() => device.dma.view(0x10000, 16, false))).toBe(Errno.EPERM);
    expect(device.interrupt(4)).toBe('pending');
    expect(drain(fd)).toBe(0);
  });

  it('holds MSI back without MASTER and sends it when MASTER is set', async () => {
    const rig = await serve();
    const { client, device } = rig;
    const msi = capAt(device, CapId.MSI);
    await cfgWrite(client, msi + MsiCap.FLAGS, 2, MsiFlags.ENABLE);
    const fd = await giveEventfd(client, PciIrq.MSI, 0);
    expect(device.interrupt(0)).toBe('pending');
    expect(drain(fd)).toBe(0);
    await setCommand(client, Command.MASTER);
    expect(drain(fd)).toBe(1);
    expect(device.msi!.isPending(0)).toBe(false);
  });

  it('says the device is not attached before a server serves it', () => {
    const device = makeDevice();
    expect(() => device.dma).toThrow(/not attached/);
  });
});

describe('PciDevice.interrupt(): MSI (config space masks gate)', () => {
  async function msiReady(): Promise<Rig & { msi: number; fds: number[] }> {
    const rig = await serve();
    const msi = capAt(rig.device, CapId.MSI);
    await setCommand(rig.client, Command.MASTER);
    // Enable with 4 vectors granted (Multiple Message Enable = log2 4).
    await cfgWrite(rig.client, msi + MsiCap.FLAGS, 2, MsiFlags.ENABLE | (2 << 4));
    const fds = [eventfd(), eventfd(), eventfd(), eventfd()];
    expect(await setIrqs(rig.client, DATA_EVENTFD | ACTION_TRIGGER, PciIrq.MSI, 0, 4, fds)).toBe(0);
    return { ...rig, msi, fds };
  }

  it("signals the vector's eventfd", async () => {
    const { device, fds } = await msiReady();
    expect(device.msi!.enabledVectors).toBe(4);
    expect(device.interrupt(2)).toBe('delivered');
    expect(fds.map(drain)).toEqual([0, 0, 1, 0]);
  });

  it('keeps a vector masked in config space pending (visible in the Pending register) until unmasked', async () => {
    const { client, device, msi, fds } = await msiReady();
    // 64-bit layout with per-vector masking: mask at 0x10, pending at 0x14.
    await cfgWrite(client, msi + MsiCap.MASK_64, 4, 0b0100);
    expect(device.interrupt(2)).toBe('pending');
    expect(device.interrupt(1)).toBe('delivered');
    expect(fds.map(drain)).toEqual([0, 1, 0, 0]);
    expect(await cfgRead(client, msi + MsiCap.PENDING_64, 4)).toBe(0b0100);
    await cfgWrite(client, msi + MsiCap.MASK_64, 4, 0);
    expect(fds.map(drain)).toEqual([0, 0, 1, 0]);
    expect(await cfgRead(client, msi + MsiCap.PENDING_64, 4)).toBe(0);
  });

  it('keeps a vector without an eventfd pending and sends it when SET_IRQS hands one over', async () => {
    const { client, device, msi, fds } = await msiReady();
    expect(await setIrqs(client, DATA_EVENTFD | ACTION_TRIGGER, PciIrq.MSI, 3, 1)).toBe(0); // zero fds: de-assign
    expect(device.interrupt(3)).toBe('pending');
    expect(await cfgRead(client, msi + MsiCap.PENDING_64, 4)).toBe(0b1000);
    const fd = await giveEventfd(client, PciIrq.MSI, 3);
    expect(drain(fd)).toBe(1);
    expect(await cfgRead(client, msi + MsiCap.PENDING_64, 4)).toBe(0);
    expect(drain(fds[3]!)).toBe(0); // the de-assigned fd was not used
  });

  it('prefers MSI-X when the guest enabled both', async () => {
    const rig = await msiReady();
    const msixFd = await giveEventfd(rig.client, PciIrq.MSIX, 2);
    await msixControl(rig, MsixFlags.ENABLE);
    expect(rig.device.interrupt(2)).toBe('delivered');
    expect(drain(msixFd)).toBe(1);
    expect(rig.fds.map(drain)).toEqual([0, 0, 0, 0]);
  });
});

describe('PciDevice: INTx', () => {
  async function intxReady(): Promise<Rig & { fd: number }> {
    const rig = await serve();
    const fd = await giveEventfd(rig.client, PciIrq.INTX, 0);
    return { ...rig, fd };
  }

  const statusInterrupt = async (c: RawClient) => ((await cfgRead(c, Cfg.STATUS, 2)) & Status.INTERRUPT) !== 0;

  it('signals the eventfd on a rising edge only; STATUS.INTERRUPT mirrors the line', async () => {
    const { client, device, fd } = await intxReady();
    expect(await statusInterrupt(client)).toBe(false);
    device.setIntx(true);
    expect(drain(fd)).toBe(1);
    expect(await statusInterrupt(client)).toBe(true);
    device.setIntx(true); // still high: no edge
    expect(drain(fd)).toBe(0);
    device.setIntx(false);
    expect(drain(fd)).toBe(0);
    expect(await statusInterrupt(client)).toBe(false);
    device.setIntx(true);
    expect(drain(fd)).toBe(1);
    // The status bit is read-only to the guest (writing 1 does not clear it).
    await cfgWrite(client, Cfg.STATUS, 2, 0xffff);
    expect(await statusInterrupt(client)).toBe(true);
  });

  it('is suppressed by COMMAND.INTX_DISABLE, and delivered when the guest clears it with the line high', async () => {
    const { client, device, fd } = await intxReady();
    await setCommand(client, Command.INTX_DISABLE);
    device.setIntx(true);
    expect(drain(fd)).toBe(0);
    expect(await statusInterrupt(client)).toBe(true); // status still reports the line
    await setCommand(client, Command.INTX_DISABLE | Command.MEMORY); // still disabled
    expect(drain(fd)).toBe(0);
    await setCommand(client, Command.MEMORY);
    expect(drain(fd)).toBe(1);
  });

  it('does not re-signal when the guest rewrites COMMAND without touching INTX_DISABLE', async () => {
    const { client, device, fd } = await intxReady();
    device.setIntx(true);
    expect(drain(fd)).toBe(1);
    await setCommand(client, Command.MEMORY);
    await setCommand(client, Command.MEMORY | Command.MASTER);
    expect(drain(fd)).toBe(0);
  });

  it('re-signals on unmask (SET_IRQS NONE|UNMASK, index 0) while the line is still asserted', async () => {
    const { client, device, fd } = await intxReady();
    device.setIntx(true);
    expect(drain(fd)).toBe(1);
    expect(await setIrqs(client, DATA_NONE | ACTION_UNMASK, PciIrq.INTX, 0, 1)).toBe(0);
    expect(drain(fd)).toBe(1);
    // Deasserted: the end-of-interrupt unmask sends nothing.
    device.setIntx(false);
    expect(await setIrqs(client, DATA_NONE | ACTION_UNMASK, PciIrq.INTX, 0, 1)).toBe(0);
    expect(drain(fd)).toBe(0);
    // Masked by the client: the edge waits, and comes out on unmask.
    expect(await setIrqs(client, DATA_NONE | ACTION_MASK, PciIrq.INTX, 0, 1)).toBe(0);
    device.setIntx(true);
    expect(drain(fd)).toBe(0);
    expect(await setIrqs(client, DATA_NONE | ACTION_UNMASK, PciIrq.INTX, 0, 1)).toBe(0);
    expect(drain(fd)).toBeGreaterThanOrEqual(1);
  });

  it('signals a line already asserted when the client hands over its eventfd', async () => {
    const rig = await serve();
    rig.device.setIntx(true);
    const fd = await giveEventfd(rig.client, PciIrq.INTX, 0);
    expect(drain(fd)).toBe(1);
  });

  it('interrupt() pulses INTx when neither MSI nor MSI-X is enabled', async () => {
    const { client, device, fd } = await intxReady();
    expect(device.interrupt(0)).toBe('intx');
    expect(drain(fd)).toBe(1);
    expect(await statusInterrupt(client)).toBe(false);
  });

  it("interrupt() is 'disabled' on a function without an interrupt pin, which reports no INTx vector", () => {
    const device = makeDevice({ interruptPin: 0, msi: undefined, msix: undefined });
    expect(device.irqs[PciIrq.INTX]!.count).toBe(0);
    expect(device.interrupt(0)).toBe('disabled');
  });
});

// ---- resets -------------------------------------------------------------------------------------------

describe('PciDevice: reset', () => {
  /** Program the function the way a booted guest leaves it: decoding, mastering, MSI-X on, INTx high. */
  async function dirty(rig: Rig): Promise<{ intx: number; msix: number }> {
    const { client, device } = rig;
    await cfgWrite(client, 0x10, 4, 0xfe000000);
    await cfgWrite(client, 0x18, 4, 0xfd000000);
    await cfgWrite(client, Cfg.INTERRUPT_LINE, 1, 11);
    await setCommand(client, Command.MEMORY | Command.IO | Command.MASTER | Command.INTX_DISABLE);
    const intx = await giveEventfd(client, PciIrq.INTX, 0);
    const msix = await giveEventfd(client, PciIrq.MSIX, 1);
    await msixControl(rig, MsixFlags.ENABLE | MsixFlags.MASKALL);
    expect(device.interrupt(1)).toBe('pending');
    device.setIntx(true);
    expect(device.dma).toMatchObject({ enabled: true });
    expect(powerOnBytes(device).equals(rig.powerOn)).toBe(false);
    return { intx, msix };
  }

  function expectPowerOn(rig: Rig): void {
    const { device } = rig;
    expect(powerOnBytes(device).equals(rig.powerOn)).toBe(true);
    expect(device.msix!.enabled).toBe(false);
    expect(device.msix!.isPending(1)).toBe(false);
    expect(device.msix!.isMasked(1)).toBe(true);
    expect(device.config.busMaster).toBe(false);
  }

  it('DEVICE_RESET reaches onReset and restores power-on config, DMA off, INTx low (without a stray signal)', async () => {
    const rig = await serve();
    const { client, device } = rig;
    const { intx, msix } = await dirty(rig);
    expect(ok(await client.msg(Msg.DEVICE_RESET, null))).toHaveLength(0);
    expect(device.resets).toEqual(['client']);
    expectPowerOn(rig);
    expect(device.dma.enabled).toBe(false);
    expect(drain(intx)).toBe(0);
    expect(drain(msix)).toBe(0);
    expect((await cfgRead(client, Cfg.STATUS, 2)) & Status.INTERRUPT).toBe(0);
    // The client's eventfds survive a reset: after re-enabling, interrupts flow again.
    device.setIntx(true);
    expect(drain(intx)).toBe(1);
  });

  it('DEVICE_RESET with INTx high and enabled does not signal it either', async () => {
    const rig = await serve();
    const intx = await giveEventfd(rig.client, PciIrq.INTX, 0);
    await setCommand(rig.client, Command.MASTER);
    rig.device.setIntx(true);
    expect(drain(intx)).toBe(1);
    expect(ok(await rig.client.msg(Msg.DEVICE_RESET, null))).toHaveLength(0);
    expect(drain(intx)).toBe(0);
  });

  it('a PCIe Function Level Reset (Initiate FLR in Device Control) reaches onReset and restores power-on config', async () => {
    const rig = await serve();
    const { client, device } = rig;
    const exp = capAt(device, CapId.EXP);
    const { intx } = await dirty(rig);
    const devctl = await cfgRead(client, exp + ExpCap.DEVCTL, 2);
    await cfgWrite(client, exp + ExpCap.DEVCTL, 2, devctl | DevCtl.BCR_FLR);
    expect(device.resets).toEqual(['flr']);
    expectPowerOn(rig);
    expect(device.dma.enabled).toBe(false);
    expect(drain(intx)).toBe(0);
    expect(await cfgRead(client, exp + ExpCap.DEVCTL, 2)).toBe(devctl); // BCR_FLR reads 0
    // Writing Device Control without the bit is no reset.
    await cfgWrite(client, exp + ExpCap.DEVCTL, 2, devctl);
    expect(device.resets).toEqual(['flr']);
  });

  it('an FLR whose onReset fails reports it through onResetError (there is no reply to carry it)', async () => {
    const rig = await serve();
    const exp = capAt(rig.device, CapId.EXP);
    const boom = new Error('boom');
    rig.device.failResetWith = boom;
    await cfgWrite(rig.client, exp + ExpCap.DEVCTL, 2, DevCtl.BCR_FLR);
    await new Promise((resolve) => setImmediate(resolve));
    expect(rig.device.resets).toEqual(['flr']);
    expect(rig.device.resetErrors).toEqual([boom]);
  });

  it("a client hang-up resets the device ('lost-connection') and the next client finds it at power-on", async () => {
    const rig = await serve();
    const { device } = rig;
    await dirty(rig);
    const gone = rig.serverDisconnected();
    rig.client.close();
    await gone;
    expect(device.resets).toEqual(['lost-connection']);
    expectPowerOn(rig);
    expect(device.dma.enabled).toBe(false);
    // The server closed the eventfds it was given (the fd check after each test sees to that).
    const next = await rawClient(rig.socketPath);
    cleanups.push(() => next.close());
    expect(ok(await read(next, CONFIG, 0, 256))).toEqual(rig.powerOn.subarray(0, 256));
  });
});
