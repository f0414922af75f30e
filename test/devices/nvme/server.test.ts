// The controller behind a real VfioUserServer, driven by a raw vfio-user client: DMA_MAP of a
// memfd, SET_IRQS with an MSI-X eventfd, config and BAR0 REGION_WRITEs, doorbells by message and
// through the mmap'd doorbell page the region info offers, DEVICE_RESET and disconnect.
import { afterEach, describe, expect, it } from 'vitest';
import { NvmeController } from '../../../lib/devices/nvme/controller';
import { RamBackend } from '../../../lib/block';
import { AdminOpcode, IoOpcode } from '../../../lib/nvme/constants';
import { Reg } from '../../../lib/nvme/registers';
import { binding } from '../../../lib/native/binding';
import { Fd } from '../../../lib/native/fd';
import { Mapping } from '../../../lib/native/mapping';
import { createMemfd } from '../../../lib/native/memfd';
import { Command, DmaMapFlags, IrqSetFlags, PciIrq, PciRegion, RegionInfoFlags } from '../../../lib/protocol/constants';
import { encodeDmaMapRequest } from '../../../lib/protocol/messages/dma';
import { encodeSetIrqsRequest } from '../../../lib/protocol/messages/irq';
import { decodeRegionInfoReply, encodeRegionInfoRequest } from '../../../lib/protocol/messages/region';
import { rawClient, regionAccess, startServer, type RawClient } from '../../helpers/server';
import { tick } from './rig';
import { useFdLeakCheck } from '../../helpers/fds';

const MEM = 4 << 20;

useFdLeakCheck();
const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function ok(p: Promise<Buffer | number>): Promise<Buffer> {
  const r = await p;
  if (typeof r === 'number') throw new Error(`errno ${r}`);
  return r;
}

/** A client-side NVMe driver speaking vfio-user messages. */
async function connect(doorbells: 'trap' | 'mmap') {
  const ctrl = new NvmeController({ backend: new RamBackend(1 << 20), queues: 2, doorbells, poll: { spinUs: 100, shortMs: 1, shortForMs: 20, longMs: 2 } });
  const server = await startServer(ctrl);
  cleanups.push(() => server.stop());
  const client: RawClient = await rawClient(server.socketPath);
  cleanups.push(() => client.close());
  const memFd = createMemfd('nvme-guest', MEM);
  const mem = Mapping.map(memFd, 0, MEM);
  cleanups.push(() => mem.unmapNow());
  await ok(client.msg(Command.DMA_MAP, encodeDmaMapRequest({ flags: DmaMapFlags.READ | DmaMapFlags.WRITE, address: 0n, size: BigInt(MEM) }), [memFd.value]));
  memFd.close();
  const irq = new Fd(binding.eventfd(0, binding.constants.EFD_NONBLOCK));
  cleanups.push(() => irq.close());
  await ok(client.msg(Command.DEVICE_SET_IRQS, encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, index: PciIrq.MSIX, start: 0, count: 1 }), [irq.value]));

  const write = (region: number, offset: number, data: Buffer) => ok(client.msg(Command.REGION_WRITE, regionAccess(region, offset, data.length, data)));
  const read = async (region: number, offset: number, count: number) => (await ok(client.msg(Command.REGION_READ, regionAccess(region, offset, count)))).subarray(16);
  const le32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v >>> 0);
    return b;
  };
  const bytes = mem.bytes;
  return { ctrl, server, client, mem: bytes, irq, write, read, le32 };
}

describe('NVMe controller served over vfio-user', () => {
  for (const doorbells of ['trap', 'mmap'] as const) {
    it(`bring-up, Identify and I/O through messages; MSI-X through the eventfd (${doorbells})`, async () => {
      const { ctrl, client, mem, irq, write, read, le32 } = await connect(doorbells);
      // Config space: memory + bus master, MSI-X enable (QEMU emulates the table itself).
      await write(PciRegion.CONFIG, 0x04, Buffer.from([0x06, 0x00]));
      const cfg = await read(PciRegion.CONFIG, 0, 256);
      let cap = cfg[0x34]!;
      while (cap !== 0 && cfg[cap] !== 0x11) cap = cfg[cap + 1]!;
      expect(cfg[cap]).toBe(0x11);
      await write(PciRegion.CONFIG, cap + 2, Buffer.from([0x00, 0x80]));
      // Admin queues at 64 KiB (SQ) and 68 KiB (CQ), 16 entries each.
      await write(PciRegion.BAR0, Reg.AQA, le32(0x000f000f));
      await write(PciRegion.BAR0, Reg.ASQ, Buffer.concat([le32(0x10000), le32(0)]));
      await write(PciRegion.BAR0, Reg.ACQ, Buffer.concat([le32(0x11000), le32(0)]));
      await write(PciRegion.BAR0, Reg.CC, le32((4 << 20) | (6 << 16) | 1));
      expect((await read(PciRegion.BAR0, Reg.CSTS, 4)).readUInt32LE(0)).toBe(1);
      expect((await read(PciRegion.BAR0, Reg.VS, 4)).readUInt32LE(0)).toBe(0x00010400);

      // Identify Controller into 128 KiB, doorbell by REGION_WRITE.
      const sqe = mem.subarray(0x10000, 0x10040);
      sqe[0] = AdminOpcode.IDENTIFY;
      sqe.writeUInt16LE(7, 2);
      sqe.writeBigUInt64LE(0x20000n, 24);
      sqe.writeUInt32LE(1, 40);
      await write(PciRegion.BAR0, 0x1000, le32(1));
      const cqeDone = () => ((mem.readUInt32LE(0x11000 + 12) >>> 16) & 1) === 1;
      for (let i = 0; i < 200 && !cqeDone(); i++) await tick();
      expect(cqeDone()).toBe(true);
      expect(mem.readUInt32LE(0x11000 + 12) >>> 17).toBe(0); // success
      expect(mem.readUInt16LE(0x11000 + 12)).toBe(7); // cid
      expect(mem.readUInt16LE(0x20000)).toBe(0x4e58); // VID
      expect(binding.eventfdDrain(irq.value)).toBeGreaterThanOrEqual(1);
      await write(PciRegion.BAR0, 0x1004, le32(1)); // CQ head

      if (doorbells === 'mmap') {
        // The region info offers the doorbell page: one fd, one sparse area.
        const reply = await regionInfo(client, PciRegion.BAR0);
        expect(reply.info.flags & RegionInfoFlags.MMAP).toBe(RegionInfoFlags.MMAP);
        const sparse = reply.info.capabilities.find((c) => c.kind === 'sparse-mmap');
        expect(sparse && 'areas' in sparse ? sparse.areas : []).toEqual([{ offset: 0x1000n, size: 0x1000n }]);
        expect(reply.fds.length).toBe(1);
        const page = Mapping.map(reply.fds[0]!, Number(reply.info.offset) + 0x1000, 0x1000);
        reply.fds.forEach((fd) => fd.close());
        cleanups.push(() => page.unmapNow());
        const words = new Uint32Array(page.buffer, 0, 1024);
        expect(words[0]).toBe(1); // our REGION_WRITE landed in the same memory
        // Next command through the mapped page: no message at all.
        const sqe2 = mem.subarray(0x10040, 0x10080);
        sqe2[0] = AdminOpcode.GET_FEATURES;
        sqe2.writeUInt16LE(8, 2);
        sqe2.writeUInt32LE(0x07, 40);
        words[0] = 2;
        const done2 = () => ((mem.readUInt32LE(0x11010 + 12) >>> 16) & 1) === 1;
        for (let i = 0; i < 500 && !done2(); i++) await tick();
        expect(done2()).toBe(true);
        expect(mem.readUInt32LE(0x11010)).toBe((1 << 16) | 1); // 2 queue pairs, 0's based
        expect(ctrl.doorbellCounts.mapped).toBeGreaterThanOrEqual(1);
      }
      // DEVICE_RESET: back to power-on.
      expect(await client.msg(Command.DEVICE_RESET, null)).toEqual(Buffer.alloc(0));
      expect((await read(PciRegion.BAR0, Reg.CSTS, 4)).readUInt32LE(0)).toBe(0);
      expect((await read(PciRegion.BAR0, Reg.CC, 4)).readUInt32LE(0)).toBe(0);
      expect(ctrl.ready).toBe(false);

    });
  }

  it('a client that goes away mid-I/O: the controller resets, the next client starts clean', async () => {
    const { ctrl, client, mem, write, le32 } = await connect('trap');
    await write(PciRegion.CONFIG, 0x04, Buffer.from([0x06, 0x00]));
    await write(PciRegion.BAR0, Reg.AQA, le32(0x000f000f));
    await write(PciRegion.BAR0, Reg.ASQ, Buffer.concat([le32(0x10000), le32(0)]));
    await write(PciRegion.BAR0, Reg.ACQ, Buffer.concat([le32(0x11000), le32(0)]));
    await write(PciRegion.BAR0, Reg.CC, le32((4 << 20) | (6 << 16) | 1));
    // Create an I/O queue pair and submit reads, then hang up without waiting.
    const admin = (i: number, opcode: number, prp1: number, cdw10: number, cdw11: number) => {
      const e = mem.subarray(0x10000 + i * 64, 0x10000 + i * 64 + 64);
      e[0] = opcode;
      e.writeUInt16LE(i, 2);
      e.writeBigUInt64LE(BigInt(prp1), 24);
      e.writeUInt32LE(cdw10, 40);
      e.writeUInt32LE(cdw11, 44);
    };
    admin(0, AdminOpcode.CREATE_CQ, 0x30000, (15 << 16) | 1, 1);
    admin(1, AdminOpcode.CREATE_SQ, 0x31000, (15 << 16) | 1, (1 << 16) | 1);
    await write(PciRegion.BAR0, 0x1000, le32(2));
    for (let i = 0; i < 8; i++) {
      const e = mem.subarray(0x31000 + i * 64, 0x31000 + i * 64 + 64);
      e[0] = IoOpcode.READ;
      e.writeUInt32LE(1, 4);
      e.writeBigUInt64LE(BigInt(0x40000 + i * 4096), 24);
      e.writeUInt32LE(7, 48);
    }
    await write(PciRegion.BAR0, 0x1008, le32(8));
    expect(ctrl.sq(1)).not.toBeNull();
    client.close();
    for (let i = 0; i < 200 && ctrl.ready; i++) await tick();
    expect(ctrl.ready).toBe(false);
    expect(ctrl.sq(1)).toBeNull();
    expect(ctrl.health().unsafeShutdowns).toBe(1);
  });
});

/** GET_REGION_INFO the way QEMU does it: ask, then ask again with the full argsz (fds come then). */
async function regionInfo(client: RawClient, index: number) {
  const first = await client.conn.request(Command.DEVICE_GET_REGION_INFO, encodeRegionInfoRequest({ index }));
  Fd.closeAll(first.fds);
  const argsz = decodeRegionInfoReply(first.payload).argsz;
  const full = await client.conn.request(Command.DEVICE_GET_REGION_INFO, encodeRegionInfoRequest({ index, argsz }));
  return { info: decodeRegionInfoReply(full.payload), fds: full.fds };
}
