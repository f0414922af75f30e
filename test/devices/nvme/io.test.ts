// NVM commands on I/O queues: negative cases first, then data integrity across PRP forms, queues
// and depths, flush, deallocate, write zeroes, compare, FUA, backend failures and the DMA rules.
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { RamBackend } from '../../../lib/block';
import { AdminOpcode, FeatureId, IoOpcode, Status } from '../../../lib/nvme/constants';
import { createMemfd } from '../../../lib/native/memfd';
import { Mapping } from '../../../lib/native/mapping';
import { DmaMapFlags } from '../../../lib/protocol/constants';
import { PAGE, Rig, gate, pattern, tick, wrapBackend } from './rig';
import { useFdLeakCheck } from '../../helpers/fds';


useFdLeakCheck();
let rig: Rig;
afterEach(async () => {
  await rig?.close();
});

const md5 = (b: Uint8Array) => createHash('md5').update(b).digest('hex');

async function setup(options: ConstructorParameters<typeof Rig>[0] = {}, pairs = 1, entries = 64): Promise<Rig> {
  rig = new Rig({ diskSize: 8 << 20, ...options });
  await rig.enable();
  for (let q = 1; q <= pairs; q++) await rig.createQueuePair(q, entries);
  return rig;
}

/** Write `data` at `lba` through queue 1 with a fresh buffer; returns the status. */
async function write(lba: number, data: Buffer, qid = 1, extra: { cdw12?: number } = {}): Promise<number> {
  const buf = rig.alloc(data.length);
  data.copy(rig.mem, buf);
  const blocks = data.length / 512;
  return (await rig.io(qid, { opcode: IoOpcode.WRITE, ...rig.prps(buf, data.length), cdw10: lba, cdw12: (blocks - 1) | (extra.cdw12 ?? 0) })).status;
}

async function read(lba: number, bytes: number, qid = 1): Promise<Buffer> {
  const buf = rig.alloc(bytes);
  const c = await rig.io(qid, { opcode: IoOpcode.READ, ...rig.prps(buf, bytes), cdw10: lba, cdw12: bytes / 512 - 1 });
  expect(c.status).toBe(0);
  return Buffer.from(rig.mem.subarray(buf, buf + bytes));
}

describe('errors are statuses', () => {
  it('unknown and unsupported I/O opcodes are Invalid Opcode', async () => {
    await setup();
    for (const opcode of [0x03, IoOpcode.WRITE_UNCOR, IoOpcode.VERIFY, IoOpcode.RESV_REGISTER, 0x7f, 0x80, 0xff]) {
      expect((await rig.io(1, { opcode })).status, `opcode ${opcode}`).toBe(Status.INVALID_OPCODE);
    }
  });

  it('a namespace other than 1 is Invalid Namespace (Flush also takes FFFFFFFFh)', async () => {
    await setup();
    const buf = rig.alloc(PAGE);
    for (const nsid of [0, 2, 0xffffffff]) {
      expect((await rig.io(1, { opcode: IoOpcode.READ, nsid, prp1: buf })).status).toBe(Status.INVALID_NS);
      expect((await rig.io(1, { opcode: IoOpcode.WRITE, nsid, prp1: buf })).status).toBe(Status.INVALID_NS);
      expect((await rig.io(1, { opcode: IoOpcode.DSM, nsid, prp1: buf })).status).toBe(Status.INVALID_NS);
    }
    expect((await rig.io(1, { opcode: IoOpcode.FLUSH, nsid: 2 })).status).toBe(Status.INVALID_NS);
    expect((await rig.io(1, { opcode: IoOpcode.FLUSH, nsid: 0xffffffff })).status).toBe(0);
  });

  it('LBA ranges past the end are LBA Out of Range', async () => {
    await setup();
    const blocks = (8 << 20) / 512;
    const buf = rig.alloc(PAGE);
    const cases = [
      { cdw10: blocks, cdw12: 0 },
      { cdw10: blocks - 1, cdw12: 1 },
      { cdw10: 0, cdw11: 1, cdw12: 0 },
      { cdw10: 0xffffffff, cdw11: 0xffffffff, cdw12: 0 },
    ];
    for (const c of cases) {
      expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: buf, ...c })).status).toBe(Status.LBA_RANGE);
      expect((await rig.io(1, { opcode: IoOpcode.WRITE, prp1: buf, ...c })).status).toBe(Status.LBA_RANGE);
      expect((await rig.io(1, { opcode: IoOpcode.WRITE_ZEROES, ...c })).status).toBe(Status.LBA_RANGE);
      expect((await rig.io(1, { opcode: IoOpcode.COMPARE, prp1: buf, ...c })).status).toBe(Status.LBA_RANGE);
    }
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: buf, cdw10: blocks - 1, cdw12: 0 })).status).toBe(0);
  });

  it('a transfer larger than MDTS is Invalid Field', async () => {
    await setup({ mdts: 2 }); // 16 KiB
    const buf = rig.alloc(32 * 1024);
    const ok = await rig.io(1, { opcode: IoOpcode.READ, ...rig.prps(buf, 16384), cdw12: 31 });
    expect(ok.status).toBe(0);
    const big = await rig.io(1, { opcode: IoOpcode.READ, ...rig.prps(buf, 16896), cdw12: 32 });
    expect(big.status).toBe(Status.INVALID_FIELD);
  });

  it('SGL data pointers and fused operations are Invalid Field', async () => {
    await setup();
    const buf = rig.alloc(PAGE);
    expect((await rig.io(1, { opcode: IoOpcode.READ, flags: 0x40, prp1: buf })).status).toBe(Status.INVALID_FIELD);
    expect((await rig.io(1, { opcode: IoOpcode.COMPARE, flags: 0x01, prp1: buf })).status).toBe(Status.INVALID_FIELD);
  });

  it('PRPs outside the DMA maps are Data Transfer Error: PRP1, PRP2, a list entry, the list itself', async () => {
    await setup();
    const far = 0x7000_0000;
    const buf = rig.alloc(4 * PAGE);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: far, cdw12: 7 })).status).toBe(Status.DATA_XFER_ERROR);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: buf, prp2: far, cdw12: 15 })).status).toBe(Status.DATA_XFER_ERROR);
    const list = rig.prpList([buf + PAGE, far, buf + 3 * PAGE]);
    expect((await rig.io(1, { opcode: IoOpcode.WRITE, prp1: buf, prp2: list, cdw12: 31 })).status).toBe(Status.DATA_XFER_ERROR);
    expect((await rig.io(1, { opcode: IoOpcode.WRITE, prp1: buf, prp2: far, cdw12: 31 })).status).toBe(Status.DATA_XFER_ERROR);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: 0xffff_ffff_ffff_f000n, cdw12: 0 })).status).toBe(Status.DATA_XFER_ERROR);
  });

  it('misaligned PRP entries are PRP Offset Invalid', async () => {
    await setup();
    const buf = rig.alloc(4 * PAGE);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: buf + 1, cdw12: 0 })).status).toBe(Status.PRP_INVALID_OFFSET);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: buf, prp2: buf + PAGE + 512, cdw12: 15 })).status).toBe(Status.PRP_INVALID_OFFSET);
    const list = rig.prpList([buf + PAGE, buf + 2 * PAGE + 8, buf + 3 * PAGE]);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: buf, prp2: list, cdw12: 31 })).status).toBe(Status.PRP_INVALID_OFFSET);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: buf, prp2: list + 4, cdw12: 31 })).status).toBe(Status.PRP_INVALID_OFFSET);
  });

  it('a Read into a read-only map is Data Transfer Error, and nothing is written there', async () => {
    await setup();
    const fd = createMemfd('ro', 1 << 20);
    const view = Mapping.map(fd, 0, 1 << 20);
    expect(rig.dma.add({ iova: 0x4000_0000n, size: BigInt(1 << 20), offset: 0n, flags: DmaMapFlags.READ }, fd)).toBe(0);
    expect(await write(0, pattern(PAGE, 3))).toBe(0);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: 0x4000_0000, cdw12: 7 })).status).toBe(Status.DATA_XFER_ERROR);
    expect(view.bytes.subarray(0, PAGE).every((b) => b === 0)).toBe(true);
    // The other direction is fine: a Write from read-only memory.
    expect((await rig.io(1, { opcode: IoOpcode.WRITE, prp1: 0x4000_0000, cdw12: 7 })).status).toBe(0);
    view.unmapNow();
  });

  it('backend failures are media errors (Unrecovered Read Error, Write Fault) and count in SMART', async () => {
    const ram = new RamBackend(1 << 20);
    const boom = () => Promise.reject(Object.assign(new Error('EIO'), { code: 'EIO' }));
    await setup({ backend: wrapBackend(ram, { read: boom, write: boom, flush: boom }) });
    const buf = rig.alloc(PAGE);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 7 })).status).toBe(Status.READ_ERROR);
    expect((await rig.io(1, { opcode: IoOpcode.WRITE, prp1: buf, cdw12: 7 })).status).toBe(Status.WRITE_FAULT);
    expect((await rig.io(1, { opcode: IoOpcode.FLUSH })).status).toBe(Status.WRITE_FAULT);
    expect(rig.ctrl.health().mediaErrors).toBe(3);
  });
});

describe('data integrity', () => {
  it('round-trips data for every PRP shape: one page, offset start, two pages, list, chained lists', async () => {
    await setup({ mdts: 0, diskSize: 16 << 20 });
    const sizes = [512, 4096, 8192, 12288, 65536, 128 * 1024, 3 << 20];
    let lba = 0;
    for (const size of sizes) {
      const data = pattern(size, size);
      expect(await write(lba, data), `write ${size}`).toBe(0);
      expect(md5(await read(lba, size)), `read ${size}`).toBe(md5(data));
      lba += size / 512;
    }
    // A buffer starting mid-page: PRP1 has an offset, the rest is a list.
    const data = pattern(5 * PAGE, 77);
    const buf = rig.alloc(6 * PAGE) + 1024;
    data.copy(rig.mem, buf);
    expect((await rig.io(1, { opcode: IoOpcode.WRITE, ...rig.prps(buf, data.length), cdw10: 9000, cdw12: data.length / 512 - 1 })).status).toBe(0);
    const back = rig.alloc(6 * PAGE) + 512;
    expect((await rig.io(1, { opcode: IoOpcode.READ, ...rig.prps(back, data.length), cdw10: 9000, cdw12: data.length / 512 - 1 })).status).toBe(0);
    expect(md5(rig.mem.subarray(back, back + data.length))).toBe(md5(data));
  });

  it('4 KiB logical blocks', async () => {
    await setup({ blockSize: 4096 });
    const data = pattern(3 * PAGE, 5);
    const buf = rig.alloc(data.length);
    data.copy(rig.mem, buf);
    expect((await rig.io(1, { opcode: IoOpcode.WRITE, ...rig.prps(buf, data.length), cdw10: 7, cdw12: 2 })).status).toBe(0);
    const back = rig.alloc(data.length);
    expect((await rig.io(1, { opcode: IoOpcode.READ, ...rig.prps(back, data.length), cdw10: 7, cdw12: 2 })).status).toBe(0);
    expect(rig.mem.subarray(back, back + data.length).equals(data)).toBe(true);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: back, cdw10: (8 << 20) / 4096, cdw12: 0 })).status).toBe(Status.LBA_RANGE);
  });

  it('many queues at depth: every write lands, every read returns it (checksums)', async () => {
    await setup({ queues: 4, diskSize: 16 << 20 }, 4, 32);
    const depth = 24;
    const size = 8192;
    const expected = new Map<number, string>();
    const bufs = new Map<string, number>();
    for (let q = 1; q <= 4; q++) {
      for (let i = 0; i < depth; i++) {
        const lba = (q * depth + i) * (size / 512);
        const data = pattern(size, lba + 1);
        const buf = rig.alloc(size);
        data.copy(rig.mem, buf);
        expected.set(lba, md5(data));
        const cid = rig.place(q, { opcode: IoOpcode.WRITE, nsid: 1, ...rig.prps(buf, size), cdw10: lba, cdw12: size / 512 - 1 });
        bufs.set(`${q}:${cid}`, buf);
      }
      rig.ring(q);
    }
    for (let q = 1; q <= 4; q++) {
      for (const key of bufs.keys()) {
        const [qq, cid] = key.split(':').map(Number) as [number, number];
        if (qq === q) expect((await rig.wait(q, cid)).status).toBe(0);
      }
    }
    // Read everything back at depth, across queues in the other order.
    const reads: { q: number; cid: number; lba: number; buf: number }[] = [];
    for (const lba of expected.keys()) {
      const q = 4 - (reads.length % 4);
      const buf = rig.alloc(size);
      const cid = rig.place(q, { opcode: IoOpcode.READ, nsid: 1, ...rig.prps(buf, size), cdw10: lba, cdw12: size / 512 - 1 });
      reads.push({ q, cid, lba, buf });
      if (reads.length % 20 === 0) for (let r = 1; r <= 4; r++) rig.ring(r);
    }
    for (let r = 1; r <= 4; r++) rig.ring(r);
    for (const r of reads) {
      expect((await rig.wait(r.q, r.cid)).status).toBe(0);
      expect(md5(rig.mem.subarray(r.buf, r.buf + size))).toBe(expected.get(r.lba));
    }
  });

  it('completions wait for room when the CQ is full and are posted in order as the head moves', async () => {
    rig = new Rig();
    await rig.enable();
    const cq = rig.alloc(4 * 16);
    const sq = rig.alloc(16 * 64);
    expect((await rig.admin({ opcode: AdminOpcode.CREATE_CQ, prp1: cq, cdw10: (3 << 16) | 1, cdw11: 1 })).status).toBe(0);
    expect((await rig.admin({ opcode: AdminOpcode.CREATE_SQ, prp1: sq, cdw10: (15 << 16) | 1, cdw11: (1 << 16) | 1 })).status).toBe(0);
    const { HostQueue } = await import('./rig');
    rig.queues.set(1, new HostQueue(1, sq, 16, cq, 4));
    const buf = rig.alloc(PAGE);
    const cids = Array.from({ length: 10 }, () => rig.place(1, { opcode: IoOpcode.READ, nsid: 1, prp1: buf, cdw12: 0 }));
    rig.ring(1);
    await rig.waitFor(() => rig.ctrl.inFlight === 0, 'backend done');
    await tick();
    const first = rig.reap(1, false);
    expect(first.length).toBe(3); // a 4-entry CQ holds 3
    const got = [...first];
    while (got.length < 10) {
      rig.write32(0x1000 + 3 * 4, rig.queue(1).cqHead); // CQ 1 head doorbell
      await tick();
      got.push(...rig.reap(1, false));
    }
    expect(got.map((c) => c.cid)).toEqual(cids);
    expect(got.every((c) => c.status === 0 && c.sqid === 1)).toBe(true);
    expect(got.at(-1)!.sqhd).toBe(10);
  });
});

describe('Flush, FUA, Write Zeroes, Dataset Management, Compare', () => {
  it('Flush and FUA reach the backend; with the write cache off every write is FUA', async () => {
    const ram = new RamBackend(1 << 20);
    const seen: string[] = [];
    await setup({
      backend: wrapBackend(ram, {
        write: (o, s, fua) => {
          seen.push(`write fua=${fua}`);
          return ram.write(o, s, fua);
        },
        flush: () => {
          seen.push('flush');
          return ram.flush();
        },
      }),
    });
    expect(await write(0, pattern(512, 1))).toBe(0);
    expect(await write(1, pattern(512, 2), 1, { cdw12: 1 << 30 })).toBe(0);
    expect((await rig.io(1, { opcode: IoOpcode.FLUSH })).status).toBe(0);
    expect((await rig.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.VOLATILE_WC, cdw11: 0 })).status).toBe(0);
    expect(await write(2, pattern(512, 3))).toBe(0);
    expect(seen).toEqual(['write fua=false', 'write fua=true', 'flush', 'write fua=true']);
  });

  it('Write Zeroes zeroes the range (and only it)', async () => {
    await setup();
    expect(await write(0, pattern(8 * 512, 9))).toBe(0);
    expect((await rig.io(1, { opcode: IoOpcode.WRITE_ZEROES, cdw10: 2, cdw12: 3 })).status).toBe(0);
    const back = await read(0, 8 * 512);
    expect(back.subarray(0, 1024)).toEqual(pattern(8 * 512, 9).subarray(0, 1024));
    expect(back.subarray(1024, 3072).every((b) => b === 0)).toBe(true);
    expect(back.subarray(3072)).toEqual(pattern(8 * 512, 9).subarray(3072));
  });

  it('Dataset Management: deallocate reads back zeroes; ranges are checked; other attributes are hints', async () => {
    await setup();
    expect(await write(0, pattern(64 * 512, 4))).toBe(0);
    const list = rig.alloc(PAGE);
    const range = (i: number, slba: number, nlb: number) => {
      rig.mem.writeUInt32LE(0, list + i * 16);
      rig.mem.writeUInt32LE(nlb, list + i * 16 + 4);
      rig.mem.writeBigUInt64LE(BigInt(slba), list + i * 16 + 8);
    };
    range(0, 8, 8);
    range(1, 40, 0); // empty: ignored
    range(2, 48, 4);
    // Integral dataset for read/write only: nothing changes.
    expect((await rig.io(1, { opcode: IoOpcode.DSM, prp1: list, cdw10: 2, cdw11: 0x3 })).status).toBe(0);
    expect(await read(0, 64 * 512)).toEqual(pattern(64 * 512, 4));
    expect((await rig.io(1, { opcode: IoOpcode.DSM, prp1: list, cdw10: 2, cdw11: 0x4 })).status).toBe(0);
    const back = await read(0, 64 * 512);
    const want = Buffer.from(pattern(64 * 512, 4));
    want.fill(0, 8 * 512, 16 * 512);
    want.fill(0, 48 * 512, 52 * 512);
    expect(back).toEqual(want);
    range(3, (8 << 20) / 512 - 1, 2);
    expect((await rig.io(1, { opcode: IoOpcode.DSM, prp1: list, cdw10: 3, cdw11: 0x4 })).status).toBe(Status.LBA_RANGE);
    expect((await rig.io(1, { opcode: IoOpcode.DSM, prp1: 0x7000_0000, cdw10: 0, cdw11: 0x4 })).status).toBe(Status.DATA_XFER_ERROR);
  });

  it('Compare: equal data succeeds, a different byte is Compare Failure (media error type)', async () => {
    await setup();
    const data = pattern(3 * PAGE, 12);
    expect(await write(100, data)).toBe(0);
    const buf = rig.alloc(3 * PAGE);
    data.copy(rig.mem, buf);
    const cmd = { opcode: IoOpcode.COMPARE, ...rig.prps(buf, data.length), cdw10: 100, cdw12: data.length / 512 - 1 };
    expect((await rig.io(1, cmd)).status).toBe(0);
    rig.mem[buf + 2 * PAGE + 17] ^= 0xff;
    const c = await rig.io(1, cmd);
    expect(c.status).toBe(Status.COMPARE_FAILED);
    expect((c.status >>> 8) & 0x7).toBe(2);
  });
});

describe('zero-copy DMA', () => {
  it('the backend reads straight into guest memory (no intermediate buffer)', async () => {
    const ram = new RamBackend(1 << 20);
    let sawGuestMemory = false;
    await setup({
      backend: wrapBackend(ram, {
        read: async (o, dst) => {
          await ram.read(o, dst);
          // The guest already sees the bytes, before the command completes.
          sawGuestMemory = rig.mem.subarray(target, target + dst.length).equals(dst) && dst.length > 0;
        },
      }),
    });
    expect(await write(0, pattern(PAGE, 8))).toBe(0);
    const target = rig.alloc(PAGE);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: target, cdw12: 7 })).status).toBe(0);
    expect(sawGuestMemory).toBe(true);
  });

  it('holds the DMA map across the backend await: DMA_UNMAP waits for the I/O to finish', async () => {
    const ram = new RamBackend(1 << 20);
    const g = gate();
    await setup({ backend: wrapBackend(ram, { read: async (o, d) => (await g.promise, ram.read(o, d)) }) });
    const fd = createMemfd('data', 1 << 20);
    expect(rig.dma.add({ iova: 0x4000_0000n, size: BigInt(1 << 20), offset: 0n, flags: DmaMapFlags.READ | DmaMapFlags.WRITE }, fd)).toBe(0);
    const cid = rig.submit(1, { opcode: IoOpcode.READ, nsid: 1, prp1: 0x4000_0000, cdw12: 7 });
    await rig.waitFor(() => rig.ctrl.inFlight === 1, 'in flight');
    let unmapped = false;
    const unmap = rig.dma.remove(0x4000_0000n, BigInt(1 << 20)).then(() => (unmapped = true));
    await tick();
    expect(unmapped).toBe(false);
    g.open();
    expect((await rig.wait(1, cid)).status).toBe(0);
    await unmap;
    expect(unmapped).toBe(true);
  });

  it('the client unmaps and re-maps guest memory under running queues: rings are looked up again', async () => {
    await setup();
    const data = pattern(PAGE, 44);
    expect(await write(10, data)).toBe(0);
    await rig.remapMemory();
    expect(await read(10, PAGE)).toEqual(data);
    // Unmapped altogether: the next command cannot be fetched, a fatal error rather than a crash.
    await rig.dma.removeAll();
    rig.submit(1, { opcode: IoOpcode.FLUSH, nsid: 1 });
    expect(rig.ctrl.fatal).toBe(true);
  });

  it('a map without shared memory (message-based DMA) still works through a bounce buffer', async () => {
    await setup();
    const remote = Buffer.alloc(1 << 20);
    rig.dma.transport = {
      maxTransfer: 4096,
      read: async (iova, length) => Buffer.from(remote.subarray(iova - 0x5000_0000, iova - 0x5000_0000 + length)),
      write: async (iova, data) => {
        remote.set(data, iova - 0x5000_0000);
      },
    };
    expect(rig.dma.add({ iova: 0x5000_0000n, size: BigInt(1 << 20), offset: 0n, flags: DmaMapFlags.READ | DmaMapFlags.WRITE }, null)).toBe(0);
    const data = pattern(3 * PAGE, 31);
    data.copy(remote, 0);
    const list = rig.prpList([0x5000_0000 + PAGE, 0x5000_0000 + 2 * PAGE]);
    expect((await rig.io(1, { opcode: IoOpcode.WRITE, prp1: 0x5000_0000, prp2: list, cdw10: 50, cdw12: 23 })).status).toBe(0);
    expect(await read(50, 3 * PAGE)).toEqual(data);
    remote.fill(0);
    expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: 0x5000_0000, prp2: list, cdw10: 50, cdw12: 23 })).status).toBe(0);
    expect(remote.subarray(0, 3 * PAGE)).toEqual(data);
    // Identify into message-only memory too.
    expect((await rig.admin({ opcode: AdminOpcode.IDENTIFY, prp1: 0x5000_0000 + 8 * PAGE, cdw10: 1 })).status).toBe(0);
    expect(remote.readUInt16LE(8 * PAGE)).toBe(0x4e58);
  });
});
