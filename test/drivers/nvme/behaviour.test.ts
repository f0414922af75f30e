/**
 * Driver behaviour that needs a controller shaped on purpose (the scripted one): slow CSTS.RDY,
 * a controller that never gets ready, commands that never complete, a doorbell stride above 4,
 * a full completion queue, and a device that is not an NVMe controller.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { VfioUserClient } from '../../../lib/client';
import { NvmeDriver, NvmeRequest, NvmeTimeoutError, dmaSlice, read, write } from '../../../lib/drivers/nvme';
import { PciRegion } from '../../../lib/protocol/constants';
import { useFdLeakCheck } from '../../helpers/fds';
import { startServer } from '../../helpers/server';
import { scriptedServer } from './fixtures';
import type { ScriptedNvmeOptions } from './scripted-device';

useFdLeakCheck();

let cleanup: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanup.reverse()) await c();
  cleanup = [];
});

async function connect(options: ScriptedNvmeOptions = {}) {
  const target = await scriptedServer(options);
  cleanup.push(() => target.stop());
  const client = await VfioUserClient.connect(target.socketPath);
  cleanup.push(() => client.close());
  return { target, client, device: target.device };
}

describe('NVMe driver: controller handshakes', () => {
  it('waits for a slow CSTS.RDY, within CAP.TO', async () => {
    const { client, device } = await connect({ readyDelayMs: 120, timeoutUnits: 2 });
    const start = Date.now();
    const driver = await NvmeDriver.open(client);
    cleanup.push(() => driver.close());
    expect(Date.now() - start).toBeGreaterThanOrEqual(100);
    expect(device.registers.csts & 1).toBe(1);
    // A second driver finds the controller enabled and resets it first (waits for RDY 0 too).
    await driver.close({ shutdown: false });
    const again = await NvmeDriver.open(client);
    cleanup.push(() => again.close());
    expect(again.controller.serial).toBe('SCRIPTED0001');
  });

  it('gives up with ETIMEDOUT when CSTS.RDY never follows CC.EN', async () => {
    const { client, device } = await connect({ readyDelayMs: 60_000 });
    const err = await NvmeDriver.open(client, { readyTimeoutMs: 200 }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ETIMEDOUT' });
    expect((err as Error).message).toMatch(/CSTS.RDY to become 1/);
    // Nothing of the failed driver is left behind.
    expect(client.dmaMaps.length).toBe(0);
    expect(device.registers.cc & 1).toBe(1);
  });

  it('refuses a device that is not an NVMe controller (ENODEV)', async () => {
    const s = await startServer();
    cleanup.push(() => s.stop());
    const client = await VfioUserClient.connect(s.socketPath);
    cleanup.push(() => client.close());
    await expect(NvmeDriver.open(client)).rejects.toMatchObject({ code: 'ENODEV' });
  });

  it('honours CAP.DSTRD: doorbells 16 bytes apart, as messages and mmap’d', async () => {
    for (const mmapDoorbells of [false, true]) {
      const { client, device } = await connect({ doorbellStride: 16, mmapDoorbells });
      const driver = await NvmeDriver.open(client, { ioQueues: 3 });
      cleanup.push(() => driver.close());
      expect(driver.cap.doorbellStride).toBe(16);
      expect(driver.doorbellKind).toBe(mmapDoorbells ? 'mmap' : 'message');
      const ns = driver.namespace(1);
      const buf = await driver.allocateBuffer(ns.blockSize);
      for (let q = 0; q < 3; q++) {
        const qp = await driver.createIoQueuePair({ depth: 4 });
        buf.bytes.fill(q + 1, 0, ns.blockSize);
        await write(qp, ns, q, 1, dmaSlice(buf, 0, ns.blockSize));
        expect(device.storage[q * ns.blockSize]).toBe(q + 1);
      }
    }
  });
});

describe('NVMe driver: commands that do not complete', () => {
  it('times a command out with NvmeTimeoutError and keeps its CID reserved', async () => {
    const { client, device } = await connect();
    const driver = await NvmeDriver.open(client, { ioTimeoutMs: 150 });
    cleanup.push(() => driver.close());
    const ns = driver.namespace(1);
    const qp = await driver.createIoQueuePair({ entries: 3 });
    const buf = await driver.allocateBuffer(ns.blockSize);
    device.swallow = (qid, opcode) => qid === qp.qid && opcode === 0x02;
    const err = await read(qp, ns, 0, 1, dmaSlice(buf, 0, ns.blockSize)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NvmeTimeoutError);
    expect(err).toMatchObject({ code: 'ETIMEDOUT', qid: qp.qid, opcode: 0x02 });
    expect(device.stats.swallowed).toBe(1);
    device.swallow = null;
    // One CID is still reserved for the lost command; the other keeps working.
    expect(qp.outstanding).toBe(0);
    await read(qp, ns, 0, 1, dmaSlice(buf, 0, ns.blockSize));
    await read(qp, ns, 0, 1, dmaSlice(buf, 0, ns.blockSize));
  });

  it('close() stops waiting for a lost command and cancels it', async () => {
    const { client, device } = await connect();
    const driver = await NvmeDriver.open(client, { ioTimeoutMs: 0 });
    const ns = driver.namespace(1);
    const qp = await driver.createIoQueuePair({ depth: 2 });
    const buf = await driver.allocateBuffer(ns.blockSize);
    device.swallow = (_qid, opcode) => opcode === 0x01;
    const req = new NvmeRequest();
    const settled = new Promise<NvmeRequest>((resolve) => {
      req.onComplete = resolve;
    });
    req.set({ opcode: 0x01, nsid: 1, cdw12: 0 });
    req.dataIova = buf.iova;
    req.dataLength = ns.blockSize;
    qp.submitRequest(req);
    const start = Date.now();
    await driver.close({ drainTimeoutMs: 100 });
    expect(Date.now() - start).toBeLessThan(2000);
    expect((await settled).error).toMatchObject({ name: 'NvmeAbortedError', code: 'ECANCELED' });
    expect(client.dmaMaps.length).toBe(0);
  });
});

describe('NVMe driver: flow control', () => {
  it('keeps a 2-entry queue busy: one command at a time, the rest wait their turn', async () => {
    const { client } = await connect();
    const driver = await NvmeDriver.open(client);
    cleanup.push(() => driver.close());
    const ns = driver.namespace(1);
    const qp = await driver.createIoQueuePair({ entries: 2 });
    expect(qp.depth).toBe(1);
    const buf = await driver.allocateBuffer(ns.blockSize * 8);
    await Promise.all(Array.from({ length: 8 }, (_, i) => read(qp, ns, i, 1, dmaSlice(buf, i * ns.blockSize, ns.blockSize))));
    expect(qp.completed).toBe(8);
    // The phase tag flipped several times; the queue still lines up with the controller.
    expect(qp.pointers.sqTail).toBe(qp.pointers.sqHead);
  });

  it('offers the doorbell page only when asked for mmap and it exists', async () => {
    const { client } = await connect();
    expect(client.region(PciRegion.BAR0).mappable).toBe(false);
    await expect(NvmeDriver.open(client, { doorbells: 'mmap' })).rejects.toMatchObject({ code: 'ENODEV' });
  });
});
