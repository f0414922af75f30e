import { describe, expect, it } from 'vitest';
import { type IrqEvent } from '../../lib/client';
import { Command, Errno, IrqSetFlags, PciIrq } from '../../lib/protocol/constants';
import { ProtocolError, VfioUserError } from '../../lib/protocol/errors';
import { useFdLeakCheck } from '../helpers/fds';
import { startServer, TestDevice } from '../helpers/server';
import type { ServerOptions } from '../../lib/server/server';
import { rejection, connect, fakeServer, defer, useCleanup, tick, until } from './fixtures';

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
