/**
 * NVMe controller migration with the host driver moving along: a 256 MiB RAM namespace taking
 * writes during PRE_COPY (iterative rounds, blocks written since a round re-sent), a file
 * namespace as shared storage (no data in the stream), and the controller state a driver can
 * observe on the destination: an outstanding Asynchronous Event Request, features, SMART counts.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { VfioUserClient, migrate, type MigrationProgress } from '../../lib/client';
import { NvmeController } from '../../lib/devices/nvme/controller';
import { AdminOpcode, AerType, FeatureId, LogId } from '../../lib/nvme/constants';
import { FileBackend, RamBackend } from '../../lib/block';
import { NvmeDriver } from '../../lib/drivers/nvme/controller';
import { useFdLeakCheck } from '../helpers/fds';
import { useServing } from './serving';
import { BLOCK, Workload, pattern } from './workload';

const MiB = 1024 * 1024;

useFdLeakCheck();
const { cleanups, serve } = useServing();

async function connect(p: string): Promise<VfioUserClient> {
  const c = await VfioUserClient.connect(p, { timeoutMs: 20_000 });
  cleanups.push(() => c.close());
  return c;
}

/** A source and destination controller, a driver on the source with one queue pair and buffers. */
async function pair(make: () => NvmeController, depth = 16) {
  const a = await serve(make());
  const b = await serve(make());
  const src = await connect(a.socketPath);
  const dst = await connect(b.socketPath);
  const driver = await NvmeDriver.open(src, { ioQueues: 2 });
  cleanups.push(() => driver.close());
  const qp = await driver.createIoQueuePair({ depth });
  const buffers = await driver.allocateBuffer(depth * BLOCK);
  return { a, b, src, dst, driver, qp, buffers, ns: driver.namespace(1) };
}

describe('NVMe migration: RAM namespace', () => {
  it('256 MiB under ~10 MiB/s of writes: PRE_COPY converges, the rest moves in STOP_COPY, every block arrives', async () => {
    const size = 256 * MiB;
    const { a, b, src, dst, driver, qp, buffers, ns } = await pair(() => new NvmeController({ backend: new RamBackend(size), queues: 2, serial: 'RAM-256' }));
    const work = new Workload(driver, qp, ns, size / BLOCK, buffers);
    // Every block holds data (written straight into the source's disk), so round 1 moves 256 MiB.
    const disk = (a.device.backend as RamBackend).bytes;
    for (let block = 0; block < work.blocks; block++) {
      pattern(disk.subarray(block * BLOCK, (block + 1) * BLOCK), block, 1);
      work.versions[block] = 1;
    }
    work.start(16, 0.5, 5000);
    await new Promise((r) => setTimeout(r, 200));
    await driver.prepareMove(dst);
    const progress: MigrationProgress[] = [];
    const result = await migrate(src, dst, { beforeResume: () => driver.completeMove(), onProgress: (p) => progress.push(p) });
    await new Promise((r) => setTimeout(r, 200));
    await work.stop();

    const rounds = progress.filter((p) => p.phase === 'precopy');
    expect(result.converged).toBe(true);
    expect(result.precopyRounds).toBeGreaterThanOrEqual(2);
    expect(rounds[0]!.roundBytes).toBeGreaterThan(size);
    // Later rounds carry only what was written meanwhile: far less than the disk.
    expect(rounds.at(-1)!.roundBytes).toBeLessThan(8 * MiB);
    expect(result.stopCopyBytes).toBeLessThan(8 * MiB);
    // The device wrote into our memory (reads, completions): dirty pages were reported.
    expect(result.dirtyPages).toBeGreaterThan(0);
    expect(work.ioErrors).toBe(0);
    expect(work.mismatches).toEqual([]);
    expect(work.writes).toBeGreaterThan(100);
    expect(driver.client).toBe(dst);
    await src.close();
    // Every block, through the driver on the destination and straight from its disk.
    expect(await work.verifyAll()).toBe(work.blocks);
    expect(work.mismatches).toEqual([]);
    expect(work.verifyBytes((b.device.backend as RamBackend).bytes)).toBe(0);
  }, 120_000);

  it('blocks zeroed by Write Zeroes and Dataset Management (deallocate) during PRE_COPY arrive as zeroes', async () => {
    const size = 8 * MiB;
    const { a, b, src, dst, driver, qp, buffers, ns } = await pair(() => new NvmeController({ backend: new RamBackend(size), queues: 2, serial: 'RAM-8' }));
    const disk = (a.device.backend as RamBackend).bytes;
    disk.fill(0xee);
    const per = BLOCK / ns.blockSize;
    await src.setMigrationState(6); // PRE_COPY: tracking starts
    await dst.setMigrationState(4); // RESUMING
    for (;;) {
      const chunk = await src.readMigrationData();
      if (chunk.length === 0) break;
      await dst.writeMigrationData(chunk);
    }
    // Round 1 is done; now change blocks 3 (write zeroes) and 10..11 (deallocate).
    await qp.submit({ opcode: 0x08, nsid: 1, cdw10: 3 * per, cdw12: per - 1 });
    const ranges = buffers.bytes.subarray(0, 16);
    ranges.fill(0);
    ranges.writeUInt32LE(2 * per, 4);
    ranges.writeUInt32LE(10 * per, 8);
    await qp.submit({ opcode: 0x09, nsid: 1, cdw10: 0, cdw11: 1 << 2 }, { data: { iova: buffers.iova, length: 4096 } });
    await driver.prepareMove(dst);
    const { migrate: _unused } = { migrate };
    void _unused;
    await src.setMigrationState(3); // STOP_COPY: the final round carries the dirty blocks
    for (;;) {
      const chunk = await src.readMigrationData();
      if (chunk.length === 0) break;
      await dst.writeMigrationData(chunk);
    }
    await dst.setMigrationState(1);
    driver.completeMove();
    await dst.setMigrationState(2);
    const dstDisk = (b.device.backend as RamBackend).bytes;
    expect(dstDisk.subarray(3 * BLOCK, 4 * BLOCK).every((x) => x === 0)).toBe(true);
    expect(dstDisk.subarray(10 * BLOCK, 12 * BLOCK).every((x) => x === 0)).toBe(true);
    expect(dstDisk.subarray(0, 3 * BLOCK).every((x) => x === 0xee)).toBe(true);
    expect(dstDisk.subarray(12 * BLOCK).every((x) => x === 0xee)).toBe(true);
  });
});

describe('NVMe migration: file namespace (shared storage)', () => {
  it('both servers open the same file; the stream carries no data; QD 32 writes survive the move', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-mig-file-'));
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, 'disk.img');
    const size = 16 * MiB;
    const { a, src, dst, driver, qp, buffers, ns } = await pair(() => new NvmeController({ backend: FileBackend.open(file, { size }), queues: 2, serial: 'FILE-16' }), 32);
    const work = new Workload(driver, qp, ns, size / BLOCK, buffers);
    work.start(32, 0.7);
    await new Promise((r) => setTimeout(r, 300));
    await driver.prepareMove(dst);
    const result = await migrate(src, dst, { beforeResume: () => driver.completeMove() });
    await new Promise((r) => setTimeout(r, 300));
    await work.stop();
    expect(work.ioErrors).toBe(0);
    expect(work.mismatches).toEqual([]);
    // Only the controller's state: no block data.
    expect(result.bytes).toBeLessThan(64 * 1024);
    expect(a.device.stopped).toBe(true);
    await src.close();
    expect(await work.verifyAll()).toBe(work.blocks);
    expect(work.mismatches).toEqual([]);
    // And the file itself holds every block.
    expect(work.verifyBytes(fs.readFileSync(file))).toBe(0);
  }, 60_000);

  it('a RAM destination refuses a file source (and the other way round)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-mig-file-'));
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const a = await serve(new NvmeController({ backend: FileBackend.open(path.join(dir, 'd.img'), { size: 4 * MiB }), queues: 2, serial: 'S' }));
    const b = await serve(new NvmeController({ backend: new RamBackend(4 * MiB), queues: 2, serial: 'S' }));
    const src = await connect(a.socketPath);
    const dst = await connect(b.socketPath);
    await expect(migrate(src, dst)).rejects.toThrow(/migration failed/);
    expect(b.server.migration!.lastError!.message).toMatch(/storage "shared" \(here: "ram"\)/);
  });
});

describe('NVMe migration: controller state the driver sees on the destination', () => {
  it('an outstanding AER completes once, on the destination; features and SMART counts came along', async () => {
    const { b, src, dst, driver, qp, buffers, ns } = await pair(() => new NvmeController({ backend: new RamBackend(4 * MiB), queues: 2, serial: 'AER' }));
    // SMART: some writes; features: coalescing and the asynchronous event configuration.
    for (let i = 0; i < 5; i++) await qp.submit({ opcode: 0x01, nsid: 1, cdw10: i * 8, cdw12: 7 }, { data: { iova: buffers.iova, length: 4096 } });
    await driver.setFeatures(FeatureId.IRQ_COALESCE, 0x0a03);
    await driver.setFeatures(FeatureId.ASYNC_EVENT, 0x02); // temperature warnings
    let completions = 0;
    const aer = driver.adminCommand({ opcode: AdminOpcode.ASYNC_EVENT }, { timeoutMs: 0 }).then((c) => {
      completions++;
      return c;
    });
    await new Promise((r) => setTimeout(r, 20));
    await driver.prepareMove(dst);
    await migrate(src, dst, { beforeResume: () => driver.completeMove() });
    expect(await driver.getFeatures(FeatureId.IRQ_COALESCE)).toBe(0x0a03);
    expect(b.device.stats.hostWrites).toBe(5);
    // A temperature threshold below the current temperature raises the event on the destination.
    await driver.setFeatures(FeatureId.TEMP_THRESH, 300);
    const c = await aer;
    expect(c.dw0 & 0x7).toBe(AerType.SMART);
    expect((c.dw0 >>> 16) & 0xff).toBe(LogId.SMART);
    await new Promise((r) => setTimeout(r, 20));
    expect(completions).toBe(1);
    void ns;
  });
});
