import * as fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { type IrqEvent } from '../../lib/client';
import { Command, Errno, IrqSetFlags, PciIrq } from '../../lib/protocol/constants';
import { ProtocolError, VfioUserError } from '../../lib/protocol/errors';
import { useFdLeakCheck } from '../helpers/fds';
import { startServer, TestDevice } from '../helpers/server';
import type { ServerOptions } from '../../lib/server/server';
import { rejection, connect, fakeServer, defer, useCleanup, tick, until, type FakeServer } from './fixtures';

useFdLeakCheck();

useCleanup();

async function ourServer(options: ServerOptions = {}) {
  const device = new TestDevice();
  const s = await startServer(device, options);
  defer(s.stop);
  const client = await connect(s.socketPath);
  return { s, device, client, irqs: s.server.irqs };
}

describe('interrupts: refusals', () => {
  it('throws RangeError for indexes and vectors the device does not have', async () => {
    const { client } = await ourServer();
    await expect(client.enableIrqs(5, 1)).rejects.toThrow(RangeError);
    await expect(client.enableIrqs(PciIrq.MSIX, 9)).rejects.toThrow(/8 vectors/);
    await expect(client.enableIrqs(PciIrq.MSIX, 2, 7)).rejects.toThrow(RangeError);
    await expect(client.enableIrqs(PciIrq.MSIX, 0)).rejects.toThrow(RangeError);
    await expect(client.maskIrqs(PciIrq.MSIX, 8)).rejects.toThrow(RangeError);
    expect(client.irqs.enabledVectors(PciIrq.MSIX)).toEqual([]);
  });

  it('closes the new eventfds and enables nothing when the server refuses', async () => {
    const fake = fakeServer({
      irqCounts: [1, 0, 4, 1, 0],
      overrides: { [Command.DEVICE_SET_IRQS]: (m, f) => (f.reply(m, undefined, { error: Errno.EINVAL }), true) },
    });
    const client = await connect(fake.path);
    const err = (await rejection(client.enableIrqs(PciIrq.MSIX, 4))) as VfioUserError;
    expect(err).toBeInstanceOf(VfioUserError);
    expect(err.errno).toBe(Errno.EINVAL);
    expect(client.irqs.enabledVectors(PciIrq.MSIX)).toEqual([]);
  });

  it('rejects a SET_IRQS reply with a payload', async () => {
    const fake = fakeServer({ overrides: { [Command.DEVICE_SET_IRQS]: (m, f) => (f.reply(m, Buffer.alloc(4)), true) } });
    const client = await connect(fake.path);
    expect(await rejection(client.enableIrqs(PciIrq.INTX, 1))).toBeInstanceOf(ProtocolError);
  });

  it('refuses eventfds to a server that accepts no fds', async () => {
    const fake = fakeServer({ versionJson: '{"capabilities":{"max_msg_fds":0}}' });
    const client = await connect(fake.path);
    await expect(client.enableIrqs(PciIrq.INTX, 1)).rejects.toThrow(/accepts no file descriptors/);
    await expect(client.allocateDma(4096)).rejects.toThrow(/mapWithoutFd/);
  });

  it('times out waiting for an interrupt that never comes', async () => {
    const { client } = await ourServer();
    await client.enableIrqs(PciIrq.INTX, 1);
    const err = (await rejection(client.waitForIrq(PciIrq.INTX, 0, 30))) as NodeJS.ErrnoException;
    expect(err.code).toBe('ETIMEDOUT');
  });
});

describe('interrupts', () => {
  it('hands the server one eventfd per vector and reports each signal as an irq event', async () => {
    const { client, irqs } = await ourServer();
    const seen: [number, number, number][] = [];
    client.on('irq', (index, vector, count) => seen.push([index, vector, count]));
    await client.enableIrqs(PciIrq.MSIX, 8);
    expect(irqs.eventfdCount(PciIrq.MSIX)).toBe(8);
    expect(client.irqs.enabledVectors(PciIrq.MSIX)).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    const next = client.waitForIrq(PciIrq.MSIX, 3);
    expect(irqs.trigger(PciIrq.MSIX, 3)).toBe(true);
    expect(await next).toEqual({ index: PciIrq.MSIX, vector: 3, count: 1 });
    irqs.trigger(PciIrq.MSIX, 7);
    await until(() => seen.length === 2);
    expect(seen).toEqual([
      [2, 3, 1],
      [2, 7, 1],
    ]);
    expect(client.irqs.received(PciIrq.MSIX, 7)).toBe(1);
  });

  it('splits SET_IRQS by the server\'s max_msg_fds, as QEMU does', async () => {
    const fake = fakeServer({ irqCounts: [1, 0, 20, 1, 0] });
    const client = await connect(fake.path);
    await client.enableIrqs(PciIrq.MSIX, 20);
    const sets = fake.received.filter((m) => m.command === Command.DEVICE_SET_IRQS);
    expect(
      sets.map((m) => ({
        argsz: m.payload.readUInt32LE(0),
        flags: m.payload.readUInt32LE(4),
        index: m.payload.readUInt32LE(8),
        start: m.payload.readUInt32LE(12),
        count: m.payload.readUInt32LE(16),
        fds: m.fds.length,
      })),
    ).toEqual([
      { argsz: 20, flags: 0x24, index: 2, start: 0, count: 8, fds: 8 },
      { argsz: 20, flags: 0x24, index: 2, start: 8, count: 8, fds: 8 },
      { argsz: 20, flags: 0x24, index: 2, start: 16, count: 4, fds: 4 },
    ]);
  });

  it('delivers to vectors enabled in several messages on our server', async () => {
    const { client, irqs } = await ourServer({ maxMsgFds: 3 });
    expect(client.negotiated.maxSendFds).toBe(3);
    await client.enableIrqs(PciIrq.MSIX, 8);
    expect(irqs.eventfdCount(PciIrq.MSIX)).toBe(8);
    for (const v of [0, 3, 7]) {
      const next = client.waitForIrq(PciIrq.MSIX, v);
      irqs.trigger(PciIrq.MSIX, v);
      expect((await next).vector).toBe(v);
    }
  });

  it('iterates events, coalescing what was not consumed yet, and ends when the client closes', async () => {
    const { client, irqs } = await ourServer();
    await client.enableIrqs(PciIrq.MSI, 4);
    const events = client.irqs.events({ index: PciIrq.MSI });
    irqs.trigger(PciIrq.MSI, 1);
    await until(() => client.irqs.received(PciIrq.MSI, 1) === 1);
    irqs.trigger(PciIrq.MSI, 1);
    await until(() => client.irqs.received(PciIrq.MSI, 1) === 2);
    irqs.trigger(PciIrq.MSI, 2);
    await until(() => client.irqs.received(PciIrq.MSI, 2) === 1);
    expect((await events.next()).value).toEqual({ index: 1, vector: 1, count: 2 });
    expect((await events.next()).value).toEqual({ index: 1, vector: 2, count: 1 });
    const collected: IrqEvent[] = [];
    const loop = (async () => {
      for await (const e of events) collected.push(e);
    })();
    irqs.trigger(PciIrq.MSI, 0);
    await until(() => collected.length === 1);
    await client.close();
    await loop;
    expect(collected).toEqual([{ index: 1, vector: 0, count: 1 }]);
    expect((await events.next()).done).toBe(true);
  });

  it('masks and unmasks through the server: a masked vector fires on unmask', async () => {
    const { client, irqs } = await ourServer();
    await client.enableIrqs(PciIrq.MSIX, 4);
    await client.maskIrqs(PciIrq.MSIX, 2);
    expect(irqs.trigger(PciIrq.MSIX, 2)).toBe(false);
    await tick(20);
    expect(client.irqs.received(PciIrq.MSIX, 2)).toBe(0);
    const next = client.waitForIrq(PciIrq.MSIX, 2);
    await client.unmaskIrqs(PciIrq.MSIX, 2);
    expect(await next).toMatchObject({ vector: 2 });
  });

  it('asks the server to trigger vectors itself (NONE | TRIGGER, count >= 1)', async () => {
    const { client } = await ourServer();
    await client.enableIrqs(PciIrq.MSIX, 4);
    const next = client.waitForIrq(PciIrq.MSIX, 1);
    await client.irqs.trigger(PciIrq.MSIX, 1, 1);
    expect((await next).vector).toBe(1);
  });

  it('disables an index (count 0, NONE | TRIGGER) and closes its eventfds; re-enabling replaces them', async () => {
    const fake = fakeServer({ irqCounts: [1, 0, 4, 1, 0] });
    const client = await connect(fake.path);
    await client.enableIrqs(PciIrq.MSIX, 4);
    await client.enableIrqs(PciIrq.MSIX, 2, 1);
    expect(client.irqs.enabledVectors(PciIrq.MSIX)).toEqual([0, 1, 2, 3]);
    await client.irqs.disable(PciIrq.MSIX, { start: 3, count: 1 });
    expect(client.irqs.enabledVectors(PciIrq.MSIX)).toEqual([0, 1, 2]);
    await client.disableIrqs(PciIrq.MSIX);
    expect(client.irqs.enabledVectors(PciIrq.MSIX)).toEqual([]);
    const sets = fake.received.filter((m) => m.command === Command.DEVICE_SET_IRQS).slice(-2);
    expect(sets.map((m) => [m.payload.readUInt32LE(4), m.payload.readUInt32LE(12), m.payload.readUInt32LE(16), m.fds.length])).toEqual([
      [IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 3, 1, 0],
      [IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0, 0],
    ]);
  });

  it('replays QEMU\'s INTx sequence against our server', async () => {
    const { client, irqs } = await ourServer();
    await client.enableIrqs(PciIrq.INTX, 1);
    await client.maskIrqs(PciIrq.INTX);
    await client.unmaskIrqs(PciIrq.INTX);
    await client.enableIrqs(PciIrq.ERR, 1);
    const next = client.waitForIrq(PciIrq.INTX, 0);
    irqs.trigger(PciIrq.INTX, 0);
    await next;
    await client.disableIrqs(PciIrq.INTX);
    expect(irqs.eventfdCount(PciIrq.INTX)).toBe(0);
    expect(irqs.eventfdCount(PciIrq.ERR)).toBe(1);
  });
});

describe('interrupts: BOOL data and MASK/UNMASK eventfds', () => {
  const sets = (fake: FakeServer) =>
    fake.received
      .filter((m) => m.command === Command.DEVICE_SET_IRQS)
      .map((m) => ({
        argsz: m.payload.readUInt32LE(0),
        flags: m.payload.readUInt32LE(4),
        index: m.payload.readUInt32LE(8),
        start: m.payload.readUInt32LE(12),
        count: m.payload.readUInt32LE(16),
        data: [...m.payload.subarray(20)],
        fds: m.fds.length,
      }));

  it('sends MASK, UNMASK and TRIGGER with one BOOL byte per vector', async () => {
    const fake = fakeServer({ irqCounts: [1, 0, 8, 1, 0] });
    const client = await connect(fake.path);
    await client.maskIrqs(PciIrq.MSIX, 2, [true, false, true]);
    await client.unmaskIrqs(PciIrq.MSIX, 4, [false, true]);
    await client.triggerIrqs(PciIrq.MSIX, 0, [false, false, false, false, false, false, false, true]);
    await client.triggerIrqs(PciIrq.INTX);
    expect(sets(fake)).toEqual([
      { argsz: 23, flags: IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, index: 2, start: 2, count: 3, data: [1, 0, 1], fds: 0 },
      { argsz: 22, flags: IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_UNMASK, index: 2, start: 4, count: 2, data: [0, 1], fds: 0 },
      { argsz: 28, flags: IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER, index: 2, start: 0, count: 8, data: [0, 0, 0, 0, 0, 0, 0, 1], fds: 0 },
      { argsz: 20, flags: IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, index: 0, start: 0, count: 1, data: [], fds: 0 },
    ]);
    await expect(client.maskIrqs(PciIrq.MSIX, 6, [true, true, true])).rejects.toThrow(RangeError);
    await expect(client.maskIrqs(PciIrq.MSIX, 0, [])).rejects.toThrow(RangeError);
    await expect(client.triggerIrqs(PciIrq.MSIX, 0, [1, 0] as unknown as boolean[])).rejects.toThrow(TypeError);
    expect(sets(fake)).toHaveLength(4);
  });

  it('masks, unmasks and triggers exactly the selected vectors on our server', async () => {
    const { client, irqs } = await ourServer();
    await client.enableIrqs(PciIrq.MSIX, 4);
    await client.maskIrqs(PciIrq.MSIX, 0, [true, false, true, false]);
    for (const v of [0, 1, 2, 3]) irqs.trigger(PciIrq.MSIX, v);
    await until(() => client.irqs.received(PciIrq.MSIX, 1) === 1 && client.irqs.received(PciIrq.MSIX, 3) === 1);
    await tick(20);
    expect([0, 1, 2, 3].map((v) => client.irqs.received(PciIrq.MSIX, v))).toEqual([0, 1, 0, 1]);
    // Unmask only vector 2: its pending interrupt arrives, vector 0 stays masked.
    await client.unmaskIrqs(PciIrq.MSIX, 0, [false, false, true]);
    await until(() => client.irqs.received(PciIrq.MSIX, 2) === 1);
    expect(client.irqs.received(PciIrq.MSIX, 0)).toBe(0);
    // Software trigger of vectors 1 and 3 only.
    await client.triggerIrqs(PciIrq.MSIX, 1, [true, false, true]);
    await until(() => client.irqs.received(PciIrq.MSIX, 1) === 2 && client.irqs.received(PciIrq.MSIX, 3) === 2);
    await tick(20);
    expect([0, 1, 2, 3].map((v) => client.irqs.received(PciIrq.MSIX, v))).toEqual([0, 2, 1, 2]);
  });

  it('hands the server MASK/UNMASK eventfds (the INTx resample fd) that the client signals', async () => {
    const fake = fakeServer({ irqCounts: [1, 0, 4, 1, 0] });
    const client = await connect(fake.path);
    await client.enableIrqs(PciIrq.INTX, 1);
    const [resample] = await client.irqs.setActionEventfds(PciIrq.INTX, 'unmask');
    const masks = await client.irqs.setActionEventfds(PciIrq.MSIX, 'mask', 1, 2);
    expect(masks).toHaveLength(2);
    expect(client.irqs.actionEventfd(PciIrq.INTX, 'unmask', 0)).toBe(resample);
    expect(client.irqs.actionEventfd(PciIrq.MSIX, 'mask', 2)).toBe(masks[1]);
    expect(client.irqs.actionEventfd(PciIrq.MSIX, 'mask', 0)).toBeNull();
    expect(sets(fake).slice(1)).toEqual([
      { argsz: 20, flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_UNMASK, index: 0, start: 0, count: 1, data: [], fds: 1 },
      { argsz: 20, flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_MASK, index: 2, start: 1, count: 2, data: [], fds: 2 },
    ]);
    // The server holds the same eventfd: a signal from the client is what it reads.
    const serverCopy = fake.received.filter((m) => m.command === Command.DEVICE_SET_IRQS)[1]!.fds[0]!;
    expect(fs.readlinkSync(`/proc/self/fd/${serverCopy}`)).toBe('anon_inode:[eventfd]');
    resample!.signal();
    const counter = Buffer.alloc(8);
    expect(fs.readSync(serverCopy, counter, 0, 8, null)).toBe(8);
    expect(counter.readBigUInt64LE(0)).toBe(1n);

    // Withdrawn: EVENTFD with no fds; ours closed.
    await client.irqs.clearActionEventfds(PciIrq.INTX, 'unmask');
    expect(resample!.closed).toBe(true);
    expect(client.irqs.actionEventfd(PciIrq.INTX, 'unmask', 0)).toBeNull();
    expect(sets(fake).at(-1)).toEqual({ argsz: 20, flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_UNMASK, index: 0, start: 0, count: 1, data: [], fds: 0 });
    await expect(client.irqs.setActionEventfds(PciIrq.INTX, 'resample' as 'mask')).rejects.toThrow(TypeError);
    // The rest close with the client.
    await client.close();
    expect(masks.every((m) => m.closed)).toBe(true);
  });

  it('closes the new MASK/UNMASK eventfds when the server refuses them', async () => {
    const fake = fakeServer({ overrides: { [Command.DEVICE_SET_IRQS]: (m, f) => (f.reply(m, undefined, { error: Errno.EINVAL }), true) } });
    const client = await connect(fake.path);
    expect(await rejection(client.irqs.setActionEventfds(PciIrq.INTX, 'unmask'))).toMatchObject({ errno: Errno.EINVAL });
    expect(client.irqs.actionEventfd(PciIrq.INTX, 'unmask', 0)).toBeNull();
  });

  it('registers a resample eventfd with our server for INTx', async () => {
    const { client, s } = await ourServer();
    await client.enableIrqs(PciIrq.INTX, 1);
    const [resample] = await client.irqs.setActionEventfds(PciIrq.INTX, 'unmask');
    expect(resample!.closed).toBe(false);
    expect(s.server.irqs.info(PciIrq.INTX)).not.toBeNull();
    await client.irqs.clearActionEventfds(PciIrq.INTX, 'unmask');
  });
});
