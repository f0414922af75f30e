/**
 * The client's migration calls and reconnection: DirtyBitmap decoding, DMA logging against our
 * server (ranges on the wire, pages the device wrote), and reconnect() re-granting every DMA range
 * (memfd and caller fd alike) at the same address and every eventfd.
 */
import { describe, expect, it } from 'vitest';
import { DirtyBitmap, VfioUserClient } from '../../lib/client';
import { createMemfd } from '../../lib/native/memfd';
import { DmaMapFlags, MigState, PciIrq } from '../../lib/protocol/constants';
import type { MigrationHooks } from '../../lib/server/migration';
import type { ServerOptions } from '../../lib/server/server';
import { useFdLeakCheck } from '../helpers/fds';
import { startServer, TestDevice } from '../helpers/server';
import { defer, useCleanup } from './fixtures';

useFdLeakCheck();
useCleanup();

class Migratable extends TestDevice {
  readonly migration: MigrationHooks = { setRunning: () => undefined, save: () => Buffer.from('state'), load: () => undefined };
}

async function served<D extends TestDevice>(device: D, options: ServerOptions = {}) {
  const s = await startServer(device, options);
  defer(() => s.stop());
  return s as typeof s & { device: D };
}

describe('DirtyBitmap', () => {
  it('counts, tests and merges dirty pages into ranges clipped to the range', () => {
    const bitmap = Buffer.alloc(16);
    bitmap[0] = 0b1100_0110; // pages 1, 2, 6, 7
    bitmap[1] = 0b0000_0001; // page 8
    bitmap[8] = 0b0000_0001; // page 64: beyond a 66-page range? no: 66 pages -> page 64 is inside
    const b = new DirtyBitmap(0x10000, 66 * 4096 - 100, 4096, bitmap);
    expect(b.pages).toBe(66);
    expect(b.count).toBe(6);
    expect([1, 2, 6, 7, 8, 64].every((k) => b.isDirty(k))).toBe(true);
    expect(b.isDirty(0) || b.isDirty(65) || b.isDirty(-1) || b.isDirty(66)).toBe(false);
    expect([...b.ranges()]).toEqual([
      { iova: 0x10000 + 4096, length: 2 * 4096 },
      { iova: 0x10000 + 6 * 4096, length: 3 * 4096 },
      { iova: 0x10000 + 64 * 4096, length: 4096 },
    ]);
  });
});

describe('client migration calls against our server', () => {
  it('probe, state, logging with ranges, decoded reports', async () => {
    const s = await served(new Migratable());
    const client = await VfioUserClient.connect(s.socketPath);
    defer(() => client.close());
    expect(await client.migrationSupport()).toEqual({ flags: 1n, stopCopy: true, preCopy: false });
    expect(await client.migrationState()).toBe(MigState.RUNNING);
    const mem = await client.allocateDma(16 * 4096, { iova: 0x100000 });
    expect(await client.startDirtyLogging({ pageSize: 1000, ranges: [{ iova: 0x100000 + 8 * 4096, length: 8 * 4096 }] })).toBe(4096);
    const dma = s.device.ctx!.dma;
    dma.view(0x100000 + 2 * 4096, 8, true); // outside the range: not logged
    dma.view(0x100000 + 9 * 4096, 8, true);
    const pages = await client.dirtyPages(mem.iova, mem.size);
    expect(pages.count).toBe(1);
    expect(pages.isDirty(9)).toBe(true);
    expect((await client.dirtyPages(mem.iova, mem.size)).count).toBe(0);
    await client.stopDirtyLogging();
    await expect(client.dirtyPages(mem.iova, mem.size)).rejects.toMatchObject({ code: 'EINVAL' });
    // The whole blob of a STOP_COPY-only device.
    await client.setMigrationState(MigState.STOP_COPY);
    expect((await client.readMigrationData()).toString()).toBe('state');
    expect((await client.readMigrationData()).length).toBe(0);
    await client.setMigrationState(MigState.RUNNING);
  });

  it('a device without migration: the probe says null', async () => {
    const s = await served(new TestDevice());
    const client = await VfioUserClient.connect(s.socketPath);
    defer(() => client.close());
    expect(await client.migrationSupport()).toBeNull();
  });
});

describe('reconnect()', () => {
  it('re-grants memfd and caller-fd ranges at the same addresses and hands over the same eventfds', async () => {
    const s = await served(new TestDevice(), { keepState: true });
    const client = await VfioUserClient.connect(s.socketPath, { reconnect: true });
    defer(() => client.close());
    const mem = await client.allocateDma(8192, { iova: 0x200000 });
    const file = createMemfd('caller', 3 * 4096);
    const own = await client.mapFd(file, 2 * 4096, { fileOffset: 4096, iova: 0x400000, readOnly: true });
    file.close(); // the range keeps its own fd
    await client.enableIrqs(PciIrq.MSIX, 3);
    const events: string[] = [];
    client.on('disconnect', () => events.push('disconnect'));
    client.on('reconnect', () => events.push('reconnect'));
    const gone = new Promise((r) => s.server.once('disconnect', r));
    client.disconnect();
    await gone;
    expect(client.disconnected).toBe(true);
    expect(s.server.dma.count).toBe(0);
    await expect(client.read(7, 0, 4)).rejects.toMatchObject({ code: 'ECONNRESET' });
    mem.bytes.write('kept', 0);
    await client.reconnect();
    expect(events).toEqual(['disconnect', 'reconnect']);
    expect(s.server.dma.list().map((r) => [r.iova, r.size, r.flags, r.fileOffset])).toEqual([
      [0x200000, 8192, DmaMapFlags.READ | DmaMapFlags.WRITE, 0n],
      [0x400000, 8192, DmaMapFlags.READ, 4096n],
    ]);
    // The server sees the same memory: what we wrote while disconnected.
    expect(s.device.ctx!.dma.view(0x200000, 4, false).toString()).toBe('kept');
    expect(s.server.irqs.eventfdCount(PciIrq.MSIX)).toBe(3);
    s.server.irqs.trigger(PciIrq.MSIX, 2);
    expect((await client.waitForIrq(PciIrq.MSIX, 2, 2000)).vector).toBe(2);
    expect(own.mapped).toBe(true);
  });

  it('another device behind the socket: reconnect fails and the client stays disconnected', async () => {
    const s = await served(new TestDevice());
    const client = await VfioUserClient.connect(s.socketPath, { reconnect: true });
    defer(() => client.close());
    await s.stop();
    const other = new TestDevice();
    (other as unknown as { irqs: unknown }).irqs = [{ count: 1 }];
    const s2 = await startServer(other);
    defer(() => s2.stop());
    await expect(client.reconnect({ path: s2.socketPath })).rejects.toThrow(/IRQ indexes/);
    expect(client.disconnected).toBe(true);
    expect(client.closed).toBe(false);
  });
});
