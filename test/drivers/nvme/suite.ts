/**
 * The NVMe driver suite: everything the driver must do against *any* controller, through a real
 * vfio-user server and client. `runDriverSuite` runs it against a server factory, so the same
 * tests cover the scripted controller now and the real one (lib/devices/nvme) when it exists.
 *
 * Only what the NVMe specification promises is assumed: capabilities a controller may lack
 * (Write Zeroes, Dataset Management, an mmap'able doorbell page) are taken from Identify and
 * region info, and their tests say so when skipped.
 */
import { createHash, randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { VfioUserClient } from '../../../lib/client';
import { PciIrq, PciRegion } from '../../../lib/protocol/constants';
import {
  NvmeAbortedError,
  NvmeDriver,
  NvmeError,
  NvmeRequest,
  deallocate,
  dmaSlice,
  flush,
  read,
  readBlocks,
  runPerf,
  write,
  writeBlocks,
  writeZeroes,
  type NvmeDriverOptions,
  type PerfProgress,
  type QueuePair,
} from '../../../lib/drivers/nvme';
import { useFdLeakCheck } from '../../helpers/fds';
import type { MakeServer, NvmeTarget } from './fixtures';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** ONCS bits (NVM Express Base 1.4, Identify Controller byte 520). */
const ONCS_DSM = 1 << 2;
const ONCS_WRITE_ZEROES = 1 << 3;
/** OACS bit 8: Doorbell Buffer Config. */
const OACS_DBBUF = 1 << 8;

export interface Session {
  target: NvmeTarget;
  client: VfioUserClient;
  driver: NvmeDriver;
}

/** Registers the driver suite under `name`. */
export function runDriverSuite(name: string, makeServer: MakeServer): void {
  describe(`NVMe driver against ${name}`, () => {
    useFdLeakCheck();

    let cleanup: (() => unknown)[] = [];
    afterEach(async () => {
      for (const c of cleanup.reverse()) await c();
      cleanup = [];
    });

    async function session(options: NvmeDriverOptions = {}): Promise<Session> {
      const target = await makeServer();
      cleanup.push(() => target.stop());
      const client = await VfioUserClient.connect(target.socketPath);
      cleanup.push(() => client.close());
      const driver = await NvmeDriver.open(client, options);
      cleanup.push(() => driver.close());
      return { target, client, driver };
    }

    /** Writes random data to random LBAs through every queue pair, reads it back, compares. */
    async function verifyRandomIo(driver: NvmeDriver, qps: QueuePair[], qd: number, perQueue: number): Promise<void> {
      const ns = driver.namespace(1);
      const maxBlocks = Math.max(1, Math.min(8, Math.floor(driver.maxTransferSize / ns.blockSize)));
      const slots = qps.length * qd;
      // Disjoint extents so concurrent writes never overlap.
      const extent = Math.floor(ns.nsze / (slots * perQueue));
      expect(extent).toBeGreaterThanOrEqual(maxBlocks);
      const buf = await driver.allocateBuffer(slots * maxBlocks * ns.blockSize * 2);
      const expected = new Map<number, { count: number; hash: string }>();
      let job = 0;
      const worker = async (qp: QueuePair, slot: number) => {
        const wbuf = dmaSlice(buf, slot * 2 * maxBlocks * ns.blockSize, maxBlocks * ns.blockSize);
        const rbuf = dmaSlice(buf, (slot * 2 + 1) * maxBlocks * ns.blockSize, maxBlocks * ns.blockSize);
        for (let i = 0; i < perQueue; i++) {
          const n = job++;
          const count = 1 + Math.floor(Math.random() * maxBlocks);
          const lba = n * extent + Math.floor(Math.random() * (extent - count + 1));
          const data = randomBytes(count * ns.blockSize);
          wbuf.bytes.set(data);
          await write(qp, ns, lba, count, wbuf);
          expected.set(lba, { count, hash: sha(data) });
          rbuf.bytes.fill(0);
          await read(qp, ns, lba, count, rbuf);
          expect(sha(rbuf.bytes.subarray(0, count * ns.blockSize))).toBe(sha(data));
        }
      };
      const workers: Promise<void>[] = [];
      qps.forEach((qp, q) => {
        for (let s = 0; s < qd; s++) workers.push(worker(qp, q * qd + s));
      });
      await Promise.all(workers);
      // Everything again, after all writes: nothing overwrote anything else.
      const check = Buffer.alloc(maxBlocks * ns.blockSize);
      for (const [lba, { count, hash }] of expected) {
        await readBlocks(driver, qps[0]!, ns, lba, count, check);
        expect(sha(check.subarray(0, count * ns.blockSize))).toBe(hash);
      }
      await driver.freeBuffer(buf);
    }

    it('brings the controller up and identifies controller and namespace', async () => {
      const { driver } = await session();
      expect(driver.open).toBe(true);
      expect(driver.cap.maxQueueEntries).toBeGreaterThanOrEqual(2);
      expect(driver.cap.doorbellStride).toBeGreaterThanOrEqual(4);
      expect(driver.version.major).toBeGreaterThanOrEqual(1);
      const c = driver.controller;
      expect(c.model.length).toBeGreaterThan(0);
      expect(c.serial.length).toBeGreaterThan(0);
      expect(c.nn).toBeGreaterThanOrEqual(1);
      expect(driver.namespaces.size).toBeGreaterThanOrEqual(1);
      const ns = driver.namespace(1);
      expect([512, 4096]).toContain(ns.blockSize);
      expect(ns.nsze).toBeGreaterThan(0);
      expect(ns.capacity).toBe(ns.nsze * ns.blockSize);
      expect(driver.maxTransferSize).toBeGreaterThanOrEqual(4096);
      expect(() => driver.namespace(999)).toThrow(RangeError);
      // The same answers from a fresh Identify.
      const again = await driver.identifyController();
      expect(again.serial).toBe(c.serial);
      expect((await driver.identifyNamespace(1))?.nsze).toBe(ns.nsze);
    });

    it('sets the number of queues and creates, deletes and recreates I/O queue pairs', async () => {
      const { driver } = await session({ ioQueues: 4 });
      expect(driver.ioQueuesGranted).toBeGreaterThanOrEqual(1);
      expect(driver.ioQueuesGranted).toBeLessThanOrEqual(4);
      const a = await driver.createIoQueuePair({ depth: 16 });
      expect(a.qid).toBe(1);
      expect(a.depth).toBe(16);
      await driver.deleteIoQueuePair(a);
      expect(a.closed).toBe(true);
      const b = await driver.createIoQueuePair({ depth: 4 });
      expect(b.qid).toBe(1);
      // The largest queue the controller allows (bounded to keep memory small).
      const entries = Math.min(driver.maxQueueEntries, 1024);
      if (driver.ioQueuesGranted > 1) {
        const big = await driver.createIoQueuePair({ entries });
        expect(big.depth).toBe(entries - 1);
      }
      await expect(driver.createIoQueuePair({ entries: driver.maxQueueEntries + 1 })).rejects.toThrow(RangeError);
      // Concurrent creation hands out distinct qids.
      await driver.deleteIoQueuePair(b);
      for (const qp of [...driver.ioQueues.values()]) await driver.deleteIoQueuePair(qp);
      const n = Math.min(3, driver.ioQueuesGranted);
      const pairs = await Promise.all(Array.from({ length: n }, () => driver.createIoQueuePair({ depth: 2 })));
      expect(new Set(pairs.map((p) => p.qid)).size).toBe(n);
      if (driver.ioQueuesGranted === n) await expect(driver.createIoQueuePair()).rejects.toThrow(/in use/);
    });

    it('uses every queue slot: queue depth up to the ring size minus one', async () => {
      const { driver } = await session();
      const ns = driver.namespace(1);
      const qp = await driver.createIoQueuePair({ entries: 8 });
      const buf = await driver.allocateBuffer(ns.blockSize * 16);
      // 16 commands on a 7-deep queue: 7 in flight, 9 waiting for slots, all complete.
      const all = Array.from({ length: 16 }, (_, i) => read(qp, ns, i, 1, dmaSlice(buf, i * ns.blockSize, ns.blockSize)));
      expect(qp.outstanding).toBe(7);
      expect(qp.waiting).toBe(9);
      await Promise.all(all);
      expect(qp.outstanding).toBe(0);
      expect(qp.completed).toBe(16);
    });

    for (const [queues, qd] of [
      [1, 1],
      [1, 8],
      [2, 16],
      [4, 32],
    ] as const) {
      it(`writes and reads back random data: ${String(queues)} queue(s) x QD ${String(qd)}`, async () => {
        const { driver } = await session({ ioQueues: queues });
        if (driver.ioQueuesGranted < queues) return;
        const qps: QueuePair[] = [];
        for (let q = 0; q < queues; q++) qps.push(await driver.createIoQueuePair({ depth: qd }));
        await verifyRandomIo(driver, qps, qd, qd >= 16 ? 2 : 6);
      });
    }

    it('builds PRPs for every shape: one page, two pages, lists, unaligned starts', async () => {
      const { driver } = await session();
      const ns = driver.namespace(1);
      const qp = await driver.createIoQueuePair({ depth: 4 });
      const max = driver.maxTransferSize;
      const mem = await driver.allocateBuffer(max + 4096);
      const sizes = [ns.blockSize, 4096, 8192, 3 * 4096, 16 * 4096, max].filter((s) => s <= max && s % ns.blockSize === 0);
      for (const size of sizes) {
        for (const offset of [0, ns.blockSize === 512 ? 512 : 0, 4096 - 512].filter((o, i, a) => a.indexOf(o) === i && o % 4 === 0)) {
          if (offset + size > mem.size) continue;
          const count = size / ns.blockSize;
          const data = randomBytes(size);
          const slice = dmaSlice(mem, offset, size);
          slice.bytes.set(data);
          await write(qp, ns, 0, count, slice);
          slice.bytes.fill(0);
          await read(qp, ns, 0, count, slice);
          expect(sha(slice.bytes), `size ${String(size)} at offset ${String(offset)}`).toBe(sha(data));
        }
      }
      await expect(read(qp, ns, 0, (max + ns.blockSize) / ns.blockSize, dmaSlice(mem, 0, max + ns.blockSize))).rejects.toThrow(RangeError);
    });

    it('moves long ranges through a bounce buffer (readBlocks / writeBlocks)', async () => {
      const { driver } = await session();
      const ns = driver.namespace(1);
      const qp = await driver.createIoQueuePair({ depth: 8 });
      const count = Math.min(ns.nsze - 7, Math.ceil((3 * driver.maxTransferSize) / ns.blockSize) + 5);
      const data = randomBytes(count * ns.blockSize);
      await writeBlocks(driver, qp, ns, 7, count, data, { inflight: 3 });
      const back = Buffer.alloc(data.length);
      await readBlocks(driver, qp, ns, 7, count, back, { inflight: 2 });
      expect(sha(back)).toBe(sha(data));
      expect(driver.client.dmaMaps.length).toBeGreaterThan(0);
    });

    it('flushes', async () => {
      const { driver } = await session();
      const qp = await driver.createIoQueuePair();
      await expect(flush(qp, 1)).resolves.toMatchObject({ cid: expect.any(Number) as number });
      if ((driver.controller.vwc & 1) !== 0) await flush(qp, 0xffffffff).catch((err: unknown) => expect(err).toBeInstanceOf(NvmeError));
    });

    it('writes zeroes and deallocates, when the controller supports them', async () => {
      const { driver } = await session();
      const ns = driver.namespace(1);
      const qp = await driver.createIoQueuePair();
      const buf = await driver.allocateBuffer(8 * ns.blockSize);
      const slice = dmaSlice(buf, 0, 8 * ns.blockSize);
      const oncs = driver.controller.oncs;
      if ((oncs & ONCS_WRITE_ZEROES) !== 0) {
        slice.bytes.fill(0xa5);
        await write(qp, ns, 100, 8, slice);
        await writeZeroes(qp, ns, 102, 3);
        await read(qp, ns, 100, 8, slice);
        expect(slice.bytes.subarray(0, 2 * ns.blockSize).every((b) => b === 0xa5)).toBe(true);
        expect(slice.bytes.subarray(2 * ns.blockSize, 5 * ns.blockSize).every((b) => b === 0)).toBe(true);
        expect(slice.bytes.subarray(5 * ns.blockSize).every((b) => b === 0xa5)).toBe(true);
      }
      if ((oncs & ONCS_DSM) !== 0) {
        slice.bytes.fill(0x5a);
        await write(qp, ns, 200, 8, slice);
        await deallocate(qp, ns, [
          { lba: 200, count: 2 },
          { lba: 206, count: 2 },
        ]);
        // Deallocated blocks read as zeroes only if DLFEAT says so.
        if ((ns.dlfeat & 0x7) === 1) {
          await read(qp, ns, 200, 8, slice);
          expect(slice.bytes.subarray(0, 2 * ns.blockSize).every((b) => b === 0)).toBe(true);
          expect(slice.bytes.subarray(2 * ns.blockSize, 6 * ns.blockSize).every((b) => b === 0x5a)).toBe(true);
          expect(slice.bytes.subarray(6 * ns.blockSize).every((b) => b === 0)).toBe(true);
        }
      }
    });

    it('reports errors as typed NvmeErrors with SCT/SC', async () => {
      const { driver } = await session();
      const ns = driver.namespace(1);
      const qp = await driver.createIoQueuePair();
      const buf = await driver.allocateBuffer(ns.blockSize * 2);
      const slice = dmaSlice(buf);
      const lba = await read(qp, ns, ns.nsze - 1, 2, slice).catch((e: unknown) => e);
      expect(lba).toBeInstanceOf(NvmeError);
      expect(lba).toMatchObject({ sct: 0, sc: 0x80, code: 'LBA_RANGE', qid: qp.qid, opcode: 0x02 });
      expect((lba as NvmeError).isLbaRange).toBe(true);
      expect((lba as NvmeError).message).toMatch(/LBA_RANGE/);

      const badNs = await read(qp, { ...ns, nsid: 0x1234 }, 0, 1, slice).catch((e: unknown) => e);
      expect(badNs).toMatchObject({ name: 'NvmeError', sct: 0, sc: 0x0b, code: 'INVALID_NS' });

      const opcode = await qp.submit({ opcode: 0x7e, nsid: 1 }).catch((e: unknown) => e);
      expect(opcode).toMatchObject({ sct: 0, sc: 0x01, code: 'INVALID_OPCODE' });

      // Admin: a queue id beyond what Set Features granted.
      const qid = await driver.adminCommand({ opcode: 0x05, prp1: qp.cqIova, cdw10: (0xfff0 | (1 << 16)) >>> 0, cdw11: 1 }).catch((e: unknown) => e);
      expect(qid).toMatchObject({ sct: 1, code: 'QID_INVALID', qid: 0 });

      // The queue still works after errors.
      await expect(read(qp, ns, 0, 1, slice)).resolves.toBeDefined();
    });

    it('completes through MSI-X eventfds', async () => {
      const { driver, client } = await session({ completions: 'msix' });
      expect(driver.completions).toBe('msix');
      expect(driver.vectors).toBeGreaterThanOrEqual(1);
      expect(client.irqs.enabledVectors(PciIrq.MSIX).length).toBe(driver.vectors);
      const qp = await driver.createIoQueuePair({ depth: 8 });
      expect(qp.mode).toBe('msix');
      const before = client.irqs.received(PciIrq.MSIX, qp.vector);
      await verifyRandomIo(driver, [qp], 8, 2);
      expect(client.irqs.received(PciIrq.MSIX, qp.vector)).toBeGreaterThan(before);
    });

    it('completes by polling, without interrupts', async () => {
      const { driver, client } = await session({ completions: 'poll' });
      expect(driver.completions).toBe('poll');
      expect(driver.vectors).toBe(0);
      expect(client.irqs.enabledVectors(PciIrq.MSIX)).toEqual([]);
      const qp = await driver.createIoQueuePair({ depth: 8 });
      expect(qp.mode).toBe('poll');
      await verifyRandomIo(driver, [qp], 8, 2);
    });

    it('mixes polled and interrupt-driven queue pairs', async () => {
      const { driver } = await session({ ioQueues: 2 });
      if (driver.ioQueuesGranted < 2 || driver.completions !== 'msix') return;
      const a = await driver.createIoQueuePair({ depth: 4, completions: 'poll' });
      const b = await driver.createIoQueuePair({ depth: 4 });
      expect([a.mode, b.mode]).toEqual(['poll', 'msix']);
      await verifyRandomIo(driver, [a, b], 4, 2);
    });

    it('writes doorbells as messages, and through the mmap’d doorbell page when offered', async () => {
      const first = await session({ doorbells: 'message' });
      expect(first.driver.doorbellKind).toBe('message');
      await verifyRandomIo(first.driver, [await first.driver.createIoQueuePair({ depth: 4 })], 4, 2);
      if (!first.client.region(PciRegion.BAR0).mappable) return;
      const second = await session({ doorbells: 'mmap' });
      expect(second.driver.doorbellKind).toBe('mmap');
      await verifyRandomIo(second.driver, [await second.driver.createIoQueuePair({ depth: 4 })], 4, 2);
    });

    it('uses shadow doorbells when the controller offers Doorbell Buffer Config', async () => {
      const { driver } = await session({ doorbells: 'message' });
      const offered = (driver.controller.oacs & OACS_DBBUF) !== 0;
      expect(driver.shadowDoorbells !== null).toBe(offered);
      if (!offered) return;
      const shadow = driver.shadowDoorbells!;
      for (let round = 0; round < 2; round++) {
        // Deleting and creating the pair again starts its shadows from 0.
        const qp = await driver.createIoQueuePair({ depth: 16 });
        await verifyRandomIo(driver, [qp], 16, 4);
        await driver.deleteIoQueuePair(qp);
      }
      expect(shadow.counts.rung + shadow.counts.shadowed).toBeGreaterThan(0);
      const off = await session({ doorbells: 'message', shadowDoorbells: false });
      expect(off.driver.shadowDoorbells).toBeNull();
      await verifyRandomIo(off.driver, [await off.driver.createIoQueuePair({ depth: 4 })], 4, 2);
    });

    it('resets the controller: outstanding queues fail, I/O works again on new ones', async () => {
      const { driver } = await session();
      const ns = driver.namespace(1);
      const qp = await driver.createIoQueuePair({ depth: 4 });
      const buf = await driver.allocateBuffer(ns.blockSize);
      buf.bytes.fill(0x42);
      await write(qp, ns, 3, 1, dmaSlice(buf));
      await driver.reset();
      expect(qp.closed).toBe(true);
      await expect(read(qp, ns, 3, 1, dmaSlice(buf))).rejects.toMatchObject({ name: 'NvmeAbortedError', code: 'ECANCELED' });
      expect(driver.ioQueues.size).toBe(0);
      const again = await driver.createIoQueuePair({ depth: 4 });
      buf.bytes.fill(0);
      await read(again, ns, 3, 1, dmaSlice(buf));
      expect(buf.bytes.subarray(0, ns.blockSize).every((b) => b === 0x42)).toBe(true);
    });

    it('runs the perf engine with live progress and a latency summary', async () => {
      const { driver } = await session({ ioQueues: 2 });
      const progress: PerfProgress[] = [];
      const summary = await runPerf(driver, {
        rw: 'randrw',
        bs: 4096,
        qd: 8,
        timeSec: 0.6,
        queues: Math.min(2, driver.ioQueuesGranted),
        progressIntervalMs: 100,
        onProgress: (p) => progress.push(p),
        seed: 42,
      });
      expect(summary.errors).toBe(0);
      expect(summary.ios).toBeGreaterThan(0);
      expect(summary.read.ios + summary.write.ios).toBe(summary.ios);
      expect(summary.read.ios).toBeGreaterThan(0);
      expect(summary.write.ios).toBeGreaterThan(0);
      expect(summary.iops).toBeGreaterThan(0);
      expect(summary.mbps).toBeCloseTo((summary.iops * 4096) / 1e6, 0);
      const l = summary.latencyUs;
      expect(l.min).toBeGreaterThan(0);
      expect(l.min).toBeLessThanOrEqual(l.p50);
      expect(l.p50).toBeLessThanOrEqual(l.p90);
      expect(l.p90).toBeLessThanOrEqual(l.p99);
      expect(l.p99).toBeLessThanOrEqual(l.p999);
      expect(l.p999).toBeLessThanOrEqual(l.max);
      expect(progress.length).toBeGreaterThanOrEqual(3);
      expect(progress.some((p) => p.iops > 0)).toBe(true);
      // The engine deleted its queues and freed its buffers.
      expect(driver.ioQueues.size).toBe(0);
      for (const rw of ['read', 'write', 'randread', 'randwrite'] as const) {
        const s = await runPerf(driver, { rw, bs: driver.namespace(1).blockSize, qd: 4, timeSec: 0.1 });
        expect(s.errors).toBe(0);
        expect(rw.includes('read') ? s.read.ios : s.write.ios).toBe(s.ios);
      }
    });

    it('fails commands with ECONNRESET once the connection ends', async () => {
      const { driver, target } = await session();
      const ns = driver.namespace(1);
      const qp = await driver.createIoQueuePair({ depth: 4 });
      const buf = await driver.allocateBuffer(ns.blockSize);
      // In flight while the server goes away: completes, or fails with ECONNRESET.
      const racing = read(qp, ns, 0, 1, dmaSlice(buf)).then(
        () => 'completed',
        (err: unknown) => err,
      );
      await target.stop();
      const raced = await racing;
      if (raced !== 'completed') expect(raced).toMatchObject({ name: 'NvmeAbortedError', code: 'ECONNRESET' });
      await new Promise((r) => setTimeout(r, 50));
      expect(driver.open).toBe(false);
      const req = new NvmeRequest();
      const settled = new Promise<NvmeRequest>((resolve) => {
        req.onComplete = resolve;
      });
      qp.submitRequest(req.set({ opcode: 0x02, nsid: ns.nsid }));
      const done = await settled;
      expect(done.error).toBeInstanceOf(NvmeAbortedError);
      expect(done.error).toMatchObject({ code: 'ECONNRESET' });
      await expect(driver.createIoQueuePair()).rejects.toMatchObject({ code: 'ECONNRESET' });
    });

    it('releases every fd, mapping and DMA range on close', async () => {
      const target = await makeServer();
      cleanup.push(() => target.stop());
      const client = await VfioUserClient.connect(target.socketPath);
      cleanup.push(() => client.close());
      const mappable = client.region(PciRegion.BAR0).mappable;
      const driver = await NvmeDriver.open(client, { ioQueues: 2, doorbells: mappable ? 'mmap' : 'message' });
      await driver.createIoQueuePair({ depth: 8 });
      await driver.createIoQueuePair({ depth: 8, completions: 'poll' }).catch(() => undefined);
      await driver.allocateBuffer(65536);
      expect(client.dmaMaps.length).toBeGreaterThanOrEqual(3);
      await driver.close();
      expect(driver.open).toBe(false);
      expect(client.dmaMaps.length).toBe(0);
      expect(client.irqs.enabledVectors(PciIrq.MSIX)).toEqual([]);
      // The controller was shut down: CSTS.SHST reports complete.
      expect(((await client.readUint(PciRegion.BAR0, 0x1c, 4)) >>> 2) & 0x3).toBe(2);
      await driver.close(); // idempotent
      // The client stays usable, and a new driver can take the controller again.
      const again = await NvmeDriver.open(client);
      await again.close();
    });
  });
}
