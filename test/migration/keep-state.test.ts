/**
 * Surviving a VMM restart: a server with `keepState` suspends the device when its client goes
 * away instead of resetting it; a reconnectable client (same maps, same eventfds) comes back and
 * the NVMe driver carries on with its queues; commands submitted before the disconnect complete
 * exactly once. A plain client that resets the device finds a fresh one.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { PciFunction, VfioUserClient } from '../../lib/client';
import { NvmeController } from '../../lib/devices/nvme/controller';
import { Idio16Device, IDIO16_BAR } from '../../lib/devices/gpio/idio16';
import { RamBackend } from '../../lib/block';
import { NvmeDriver } from '../../lib/drivers/nvme/controller';
import { read, write } from '../../lib/drivers/nvme/io';
import { StopReason } from '../../lib/pci/device';
import type { VfioUserDevice } from '../../lib/server/device';
import type { ServerOptions } from '../../lib/server/server';
import { useFdLeakCheck } from '../helpers/fds';
import { startServer } from '../helpers/server';
import { BLOCK, Workload, pattern } from './workload';

const MiB = 1024 * 1024;

useFdLeakCheck();
const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function serve<D extends VfioUserDevice>(device: D, options: ServerOptions = { keepState: true }) {
  const s = await startServer(device, options);
  cleanups.push(() => s.stop());
  return s as typeof s & { device: D };
}

async function connect(path: string, reconnect = true): Promise<VfioUserClient> {
  const c = await VfioUserClient.connect(path, { timeoutMs: 10_000, reconnect });
  cleanups.push(() => c.close());
  return c;
}

const disconnected = (server: { once(e: 'disconnect', f: () => void): unknown }) => new Promise<void>((r) => server.once('disconnect', () => r()));

describe('keepState: NVMe controller across a reconnect', () => {
  for (const doorbells of ['trap', 'mmap'] as const) {
    it(`the driver carries on during I/O (doorbells ${doorbells}); every command completes once`, async () => {
      const s = await serve(new NvmeController({ backend: new RamBackend(16 * MiB), queues: 2, doorbells }));
      const client = await connect(s.socketPath);
      const driver = await NvmeDriver.open(client, { ioQueues: 1 });
      const qp = await driver.createIoQueuePair({ depth: 16 });
      const buffers = await driver.allocateBuffer(16 * BLOCK);
      const work = new Workload(driver, qp, driver.namespace(1), (16 * MiB) / BLOCK, buffers);
      work.start(16);
      await new Promise((r) => setTimeout(r, 100));
      const before = work.ops;
      const completedBefore = qp.completed;
      const gone = disconnected(s.server);
      await client.reconnect();
      await gone;
      await driver.reattached;
      await new Promise((r) => setTimeout(r, 100));
      await work.stop();
      expect(work.ioErrors).toBe(0);
      expect(work.mismatches).toEqual([]);
      expect(work.ops).toBeGreaterThan(before);
      expect(qp.completed).toBeGreaterThan(completedBefore);
      expect(qp.spuriousCompletions).toBe(0);
      expect(qp.outstanding).toBe(0);
      expect(s.device.ready).toBe(true);
      expect(s.device.stats.unsafeShutdowns).toBe(0);
      expect(await work.verifyAll()).toBe(work.blocks);
      expect(work.mismatches).toEqual([]);
      await driver.close();
    });
  }

  it('commands submitted while the client is gone wait in the rings and complete once it is back', async () => {
    const s = await serve(new NvmeController({ backend: new RamBackend(4 * MiB), queues: 2 }));
    const client = await connect(s.socketPath);
    const driver = await NvmeDriver.open(client, { ioQueues: 1 });
    const qp = await driver.createIoQueuePair({ depth: 16 });
    const mem = await driver.allocateBuffer(8 * BLOCK);
    const ns = driver.namespace(1);
    const per = BLOCK / ns.blockSize;
    // Drop the connection (as a crashed VMM would), then submit 8 writes: their doorbells go nowhere.
    const gone = disconnected(s.server);
    client.disconnect();
    expect(client.disconnected).toBe(true);
    await gone;
    expect(s.device.stopReasons & StopReason.DETACHED).toBe(StopReason.DETACHED);
    const writes: Promise<unknown>[] = [];
    for (let i = 0; i < 8; i++) {
      pattern(mem.bytes.subarray(i * BLOCK, (i + 1) * BLOCK), i, 3);
      writes.push(write(qp, ns, i * per, per, { iova: mem.iovaOf(i * BLOCK), length: BLOCK }));
    }
    await new Promise((r) => setTimeout(r, 50));
    expect(qp.outstanding).toBe(8);
    await client.reconnect();
    await driver.reattached;
    const settled = await Promise.allSettled(writes);
    expect(settled.every((r) => r.status === 'fulfilled')).toBe(true);
    expect(s.device.stopped).toBe(false);
    expect(qp.spuriousCompletions).toBe(0);
    const check = Buffer.alloc(BLOCK);
    for (let i = 0; i < 8; i++) {
      await read(qp, ns, i * per, per, { iova: mem.iovaOf(0), length: BLOCK });
      pattern(check, i, 3);
      expect(mem.bytes.subarray(0, BLOCK).equals(check), `block ${i}`).toBe(true);
    }
    await driver.close();
  });

  it('a plain client (no reconnect) finds the device suspended; its reset gives it a fresh one', async () => {
    const s = await serve(new NvmeController({ backend: new RamBackend(4 * MiB), queues: 2 }));
    const first = await connect(s.socketPath, false);
    const d1 = await NvmeDriver.open(first, { ioQueues: 1 });
    await d1.createIoQueuePair({ depth: 4 });
    const gone = disconnected(s.server);
    await first.close();
    await gone;
    expect(s.device.stopped).toBe(true);
    expect(s.device.hasIoQueues).toBe(true);
    // NvmeDriver.open disables and re-enables the controller, as any new driver does.
    const second = await connect(s.socketPath, false);
    const d2 = await NvmeDriver.open(second, { ioQueues: 1 });
    const qp = await d2.createIoQueuePair({ depth: 4 });
    const buf = await d2.allocateBuffer(BLOCK);
    await read(qp, d2.namespace(1), 0, BLOCK / d2.namespace(1).blockSize, { iova: buf.iova, length: BLOCK });
    expect(s.device.stopped).toBe(false);
    await d2.close();
  });

  it('a restarted server (state lost): the driver fails what was outstanding with ECONNRESET', async () => {
    const s = await serve(new NvmeController({ backend: new RamBackend(4 * MiB), queues: 2 }), {});
    const client = await connect(s.socketPath);
    const driver = await NvmeDriver.open(client, { ioQueues: 1 });
    await driver.createIoQueuePair({ depth: 4 });
    await client.reconnect(); // without keepState the device was reset when we left
    await expect(driver.reattached).rejects.toMatchObject({ code: 'ECONNRESET' });
    await driver.close();
  });
});

describe('keepState: GPIO card', () => {
  it('keeps outputs and interrupt state for the next client; without keepState they reset', async () => {
    for (const keepState of [true, false]) {
      const s = await serve(new Idio16Device(), { keepState });
      const first = await connect(s.socketPath, false);
      await (await PciFunction.open(first)).enable();
      await first.write(IDIO16_BAR, 0, Buffer.from([0x77]), { posted: false });
      await first.read(IDIO16_BAR, 2, 1);
      const gone = disconnected(s.server);
      await first.close();
      await gone;
      const next = await connect(s.socketPath, false);
      expect((await next.read(IDIO16_BAR, 0, 1))[0]).toBe(keepState ? 0x77 : 0);
      expect(s.device.interruptEnabled).toBe(keepState);
      expect(s.device.stopped).toBe(false);
    }
  });
});
