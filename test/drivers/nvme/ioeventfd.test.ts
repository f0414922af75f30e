/**
 * ioeventfd doorbells, end to end: `NvmeController({ doorbells: 'ioeventfd' })` offers one shadow
 * ioeventfd per doorbell (sharing one eventfd), `NvmeDriver` with doorbells 'ioeventfd' (or
 * 'auto') writes each doorbell as a shadow store plus an eventfd signal, and the controller wakes
 * on the eventfd and reads the values from the page. A client that does not use them still works
 * with REGION_WRITE; a departed client's copies reach nothing; a stopped controller takes the
 * values when it runs again.
 */
import { describe, expect, it } from 'vitest';
import { VfioUserClient } from '../../../lib/client';
import { NvmeDriver, dmaSlice, read, runPerf } from '../../../lib/drivers/nvme';
import { Fd } from '../../../lib/native/fd';
import { binding } from '../../../lib/native/binding';
import { Command, MigState } from '../../../lib/protocol/constants';
import { decodeRegionIoFdsReply } from '../../../lib/protocol/messages/region';
import { useFdLeakCheck } from '../../helpers/fds';
import { rawClient, startServer } from '../../helpers/server';
import { NvmeController } from '../../../lib/devices/nvme';
import { RamBackend } from '../../../lib/block';
import { controllerServer } from './fixtures';
import { runDriverSuite } from './suite';

runDriverSuite('NvmeController (RAM, ioeventfd doorbells)', () => controllerServer({ doorbells: 'ioeventfd' }));

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function eventually(check: () => void, ms = 2000): Promise<void> {
  const until = Date.now() + ms;
  for (;;) {
    try {
      check();
      return;
    } catch (err) {
      if (Date.now() > until) throw err;
      await sleep(5);
    }
  }
}

describe('NVMe ioeventfd doorbells', () => {
  useFdLeakCheck();

  it('offers one shadow ioeventfd per doorbell, all on one eventfd, in 48-byte entries', async () => {
    const target = await controllerServer({ doorbells: 'ioeventfd', queues: 4 });
    const raw = await rawClient(target.socketPath);
    try {
      const r = await raw.conn.request(Command.DEVICE_GET_REGION_IO_FDS, Buffer.from(new Uint32Array([4096, 0, 0, 0]).buffer));
      const reply = decodeRegionIoFdsReply(r.payload);
      Fd.closeAll(r.fds);
      expect(reply.entrySize).toBe(48);
      expect(reply.count).toBe(2 * (4 + 1));
      expect(r.fds).toHaveLength(2);
      expect(reply.subRegions.map((s) => Number(s.offset))).toEqual(Array.from({ length: 10 }, (_, i) => 0x1000 + 4 * i));
      expect(reply.subRegions.every((s) => s.type === 2 && s.size === 4n && s.fdIndex === 0 && s.shadowMemFdIndex === 1 && s.shadowOffset === s.offset)).toBe(true);
      // BAR0 is not offered for mmap in this mode.
      const info = await raw.conn.request(Command.DEVICE_GET_REGION_INFO, Buffer.concat([Buffer.from(new Uint32Array([32, 0, 0, 0]).buffer), Buffer.alloc(16)]));
      Fd.closeAll(info.fds);
      expect(info.payload.readUInt32LE(4) & 0x4).toBe(0);
    } finally {
      raw.close();
      await target.stop();
    }
  });

  it('carries every doorbell of a perf run through the eventfd (auto picks them), none as messages', async () => {
    const target = await controllerServer({ doorbells: 'ioeventfd' });
    const client = await VfioUserClient.connect(target.socketPath);
    const driver = await NvmeDriver.open(client, { ioQueues: 1 });
    try {
      expect(driver.doorbellKind).toBe('ioeventfd');
      expect(driver.shadowDoorbells).toBeNull();
      const before = { ...target.device.doorbellCounts };
      const rings = target.device['doorbellPage'].rings as number;
      const summary = await runPerf(driver, { rw: 'randrw', bs: 4096, qd: 8, timeSec: 0.3, seed: 3 });
      expect(summary.errors).toBe(0);
      expect(summary.ios).toBeGreaterThan(0);
      expect(target.device.doorbellCounts.trapped - before.trapped).toBe(0);
      expect(target.device.doorbellCounts.mapped - before.mapped).toBeGreaterThan(0);
      expect((target.device['doorbellPage'].rings as number) - rings).toBeGreaterThan(0);
    } finally {
      await driver.close();
      await client.close();
      await target.stop();
    }
  });

  it('still serves a client that writes doorbells as messages', async () => {
    const target = await controllerServer({ doorbells: 'ioeventfd' });
    const client = await VfioUserClient.connect(target.socketPath);
    const driver = await NvmeDriver.open(client, { ioQueues: 1, doorbells: 'message', shadowDoorbells: false });
    try {
      expect(driver.doorbellKind).toBe('message');
      const summary = await runPerf(driver, { rw: 'randread', bs: 4096, qd: 4, timeSec: 0.2, seed: 5 });
      expect(summary.errors).toBe(0);
      expect(target.device.doorbellCounts.trapped).toBeGreaterThan(0);
      expect(target.device['doorbellPage'].rings).toBe(0);
    } finally {
      await driver.close();
      await client.close();
      await target.stop();
    }
  });

  it("refuses doorbells 'ioeventfd' against a controller that offers none (ENODEV)", async () => {
    const target = await controllerServer();
    const client = await VfioUserClient.connect(target.socketPath);
    try {
      await expect(NvmeDriver.open(client, { doorbells: 'ioeventfd' })).rejects.toMatchObject({ code: 'ENODEV' });
    } finally {
      await client.close();
      await target.stop();
    }
  });

  it.each([false, true])('gives each client a fresh eventfd and memory: a departed client rings nothing (keepState %s)', async (keepState) => {
    const device = new NvmeController({ doorbells: 'ioeventfd', queues: 1, backend: new RamBackend(1 << 20) });
    const target = await startServer(device, { keepState });
    const page = device['doorbellPage'];
    // The first client keeps copies of the eventfd (as a hostile client would) and leaves.
    const raw = await rawClient(target.socketPath);
    const r = await raw.conn.request(Command.DEVICE_GET_REGION_IO_FDS, Buffer.from(new Uint32Array([4096, 0, 0, 0]).buffer));
    const kept = r.fds;
    try {
      expect(binding.eventfdSignal(kept[0]!.value)).toBe(true);
      await eventually(() => expect(page.rings).toBe(1));
      const gone = new Promise((resolve) => target.server.once('disconnect', resolve));
      raw.close();
      await gone;
      // The next client works, and the old copy reaches nothing.
      const client = await VfioUserClient.connect(target.socketPath);
      const driver = await NvmeDriver.open(client, { ioQueues: 1 });
      try {
        expect(driver.doorbellKind).toBe('ioeventfd');
        await sleep(50); // the driver's last doorbells after bring-up
        const ringsNow = page.rings;
        expect(binding.eventfdSignal(kept[0]!.value)).toBe(true);
        await sleep(30);
        expect(page.rings).toBe(ringsNow);
        const summary = await runPerf(driver, { rw: 'randread', bs: 4096, qd: 2, timeSec: 0.1, seed: 9 });
        expect(summary.errors).toBe(0);
      } finally {
        await driver.close();
        await client.close();
      }
    } finally {
      Fd.closeAll(kept);
      await target.stop();
    }
  });

  it('takes doorbells rung while stopped (migration STOP) and runs them when resumed', async () => {
    const target = await controllerServer({ doorbells: 'ioeventfd', queues: 1 });
    const client = await VfioUserClient.connect(target.socketPath);
    const driver = await NvmeDriver.open(client, { ioQueues: 1, completions: 'poll' });
    try {
      const qp = await driver.createIoQueuePair({ depth: 4 });
      const ns = driver.namespace(1);
      const buf = await driver.allocateBuffer(ns.blockSize);
      expect(await client.setMigrationState(MigState.STOP)).toBe(MigState.STOP);
      let done = false;
      const pending = read(qp, ns, 0, 1, dmaSlice(buf, 0, ns.blockSize)).then(() => (done = true));
      await sleep(50);
      expect(done).toBe(false);
      expect(await client.setMigrationState(MigState.RUNNING)).toBe(MigState.RUNNING);
      await pending;
      expect(done).toBe(true);
    } finally {
      await driver.close();
      await client.close();
      await target.stop();
    }
  });
});

