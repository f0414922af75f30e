/**
 * Malformed input at the framing and dispatch level (reference §1.4-§1.6, §1.9, §6.9): unknown and
 * wrong-direction commands, impossible and lying sizes, oversized messages, messages that arrive
 * in pieces, fds that come with anything broken, and a fuzz run. The server must answer or hang
 * up, never crash, never leak an fd, and serve the next client.
 */
import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { EventFd } from '../../lib/native/eventfd';
import { Command, Errno, HeaderFlags, IrqSetFlags, PciIrq } from '../../lib/protocol/constants';
import type { VfioUserServer } from '../../lib/server/server';
import { regionAccess, TestDevice } from '../helpers/server';
import { countOpenFds, useFdLeakCheck } from '../helpers/fds';
import {
  connect,
  defer,
  deviceInfo,
  dmaMap,
  dmaUnmap,
  eventually,
  feature,
  guestMemory,
  message,
  negotiatedRawSocket,
  RawSocket,
  serve,
  setIrqs,
  setup,
  sleep,
  u32s,
  useTeardown,
  versionPayload,
} from './support';

useFdLeakCheck();
useTeardown();

function eventfds(n: number): number[] {
  const list = Array.from({ length: n }, () => EventFd.create());
  defer(() => list.forEach((e) => e.close()));
  return list.map((e) => e.fd.value);
}

const disconnected = (server: VfioUserServer) => new Promise<Error | null>((resolve) => server.once('disconnect', resolve));

/** The server still serves: a new client negotiates and reads config space. */
async function stillServes(socketPath: string): Promise<void> {
  const client = await connect(socketPath);
  const r = (await client.msg(Command.REGION_READ, regionAccess(7, 0, 4))) as Buffer;
  expect(r.readUInt32LE(16)).toBe(0x56781234);
  client.close();
}

describe('commands the server does not take', () => {
  it('answers unknown command numbers with EINVAL and carries on', async () => {
    const { client } = await setup();
    for (const command of [0, 14, 19, 20, 999, 0xffff]) {
      expect(await client.msg(command, Buffer.alloc(8)), `command ${command}`).toBe(Errno.EINVAL);
      expect(await client.msg(command, null), `command ${command} without payload`).toBe(Errno.EINVAL);
    }
    expect(client.conn.state).toBe('open');
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
  });

  it('answers DMA_READ and DMA_WRITE sent by the client (wrong direction) with EINVAL', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DMA_READ, Buffer.concat([Buffer.alloc(8), Buffer.from([4, 0, 0, 0, 0, 0, 0, 0])]))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_WRITE, Buffer.alloc(20))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
  });

  it('answers commands whose sizes lie with EINVAL', async () => {
    const { client, device } = await setup();
    const cases: [number, Buffer][] = [
      [Command.REGION_WRITE, regionAccess(0, 0, 8, Buffer.alloc(4))], // count 8, 4 bytes
      [Command.REGION_WRITE, regionAccess(0, 0, 2, Buffer.alloc(4))], // count 2, 4 bytes
      [Command.REGION_READ, regionAccess(0, 0, 0xffff_ffff)], // count beyond any limit
      [Command.DEVICE_SET_IRQS, setIrqs(IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER, PciIrq.MSIX, 0, 4, [1, 1])],
      [Command.DEVICE_SET_IRQS, setIrqs(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, PciIrq.MSIX, 0, 1, [], 36)],
      [Command.DMA_UNMAP, dmaUnmap(0, 0, 4096, 8)],
      [Command.DMA_MAP, dmaMap(3, 0, 4096, 0, 0xffff_ffff)],
      [Command.DEVICE_GET_REGION_INFO, u32s(8, 0, 7, 0, 0, 0, 0, 0)],
      [Command.DEVICE_FEATURE, feature(4, 0x10001)],
      [Command.REGION_WRITE_MULTI, Buffer.concat([u32s(2, 0), Buffer.alloc(24)])],
      [Command.MIG_DATA_WRITE, u32s(16, 8)],
    ];
    for (const [command, payload] of cases) {
      expect(await client.msg(command, payload), `command ${command}`).toBe(Errno.EINVAL);
    }
    expect(device.calls).toEqual([]);
  });
});

describe('framing', () => {
  it('hangs up on a message size below 16, then serves the next client', async () => {
    for (const size of [0, 8, 15]) {
      const { socketPath, server } = await serve();
      const raw = await negotiatedRawSocket(socketPath);
      const gone = disconnected(server);
      raw.send(message(1, Command.DEVICE_GET_INFO, deviceInfo(), 0, size));
      await raw.expectClosed();
      expect(await gone).toBeInstanceOf(Error);
      await stillServes(socketPath);
    }
  });

  it('hangs up on a bad size even before VERSION', async () => {
    const { socketPath } = await serve();
    const raw = new RawSocket(socketPath);
    raw.send(message(0, Command.VERSION, Buffer.alloc(0), 0, 4));
    await raw.expectClosed();
    await stillServes(socketPath);
  });

  it('hangs up on a message that is neither command nor reply', async () => {
    const { socketPath } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    raw.send(message(1, Command.DEVICE_GET_INFO, deviceInfo(), 2));
    await raw.expectClosed();
    await stillServes(socketPath);
  });

  it('hangs up on a reply to a request the server never sent', async () => {
    const { socketPath } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    raw.send(message(7, Command.DMA_READ, Buffer.alloc(16), HeaderFlags.TYPE_REPLY));
    await raw.expectClosed();
    await stillServes(socketPath);
  });

  it('answers an oversized message with EINVAL at once, without waiting for (or keeping) its body', async () => {
    const { socketPath } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    const size = 2 * 1024 * 1024;
    raw.send(message(1, Command.REGION_WRITE, regionAccess(0, 0, size - 32), 0, size).subarray(0, 32));
    // The reply comes before the body was sent: nothing is buffered for it.
    expect(await raw.next()).toMatchObject({ msgId: 1, command: Command.REGION_WRITE, flags: HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, error: Errno.EINVAL });
    await raw.sendAll(Buffer.alloc(size - 32, 0x5a));
    // The body was skipped, not taken for messages: the next one is understood.
    raw.send(message(2, Command.REGION_READ, regionAccess(7, 0, 4)));
    expect(await raw.next()).toMatchObject({ msgId: 2, flags: HeaderFlags.TYPE_REPLY, error: 0 });
  });

  it('waits for a late body without blocking anything, then answers it', async () => {
    const { socketPath, server } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    const whole = message(5, Command.REGION_READ, regionAccess(7, 0, 4));
    raw.send(whole.subarray(0, 20));
    // Meanwhile the server (and this process) keep running: another client is turned away.
    const rejected = new Promise((resolve) => server.once('reject', resolve));
    const other = await connect(socketPath, false);
    expect(await other.msg(Command.VERSION, versionPayload(0, 0, '{}'))).toBe(Errno.EBUSY);
    await rejected;
    await raw.expectSilence(50);
    raw.send(whole.subarray(20));
    const reply = await raw.next();
    expect(reply).toMatchObject({ msgId: 5, flags: HeaderFlags.TYPE_REPLY, error: 0 });
    expect(reply!.payload.readUInt32LE(16)).toBe(0x56781234);
  });

  it('reassembles a header that arrives in pieces', async () => {
    const { socketPath } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    const whole = message(6, Command.DEVICE_GET_INFO, deviceInfo());
    for (const [from, to] of [
      [0, 3],
      [3, 9],
      [9, 17],
      [17, whole.length],
    ] as const) {
      raw.send(whole.subarray(from, to));
      await sleep(10);
    }
    expect(await raw.next()).toMatchObject({ msgId: 6, flags: HeaderFlags.TYPE_REPLY, error: 0 });
  });

  it('answers many messages sent in one piece, in order', async () => {
    const { socketPath } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    const batch = Buffer.concat(Array.from({ length: 200 }, (_, i) => message(i + 1, i % 3 === 0 ? 999 : Command.REGION_READ, regionAccess(7, i % 252, 4))));
    raw.send(batch);
    for (let i = 0; i < 200; i++) {
      const r = await raw.next();
      expect(r).toMatchObject({ msgId: i + 1, error: i % 3 === 0 ? Errno.EINVAL : 0 });
    }
  });
});

describe('fds that come with the wrong message', () => {
  it('closes fds sent with commands that take none, or with malformed commands', async () => {
    const { client } = await setup();
    const fds = eventfds(2);
    const before = countOpenFds();
    expect(await client.msg(Command.REGION_READ, regionAccess(7, 0, 4), fds)).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo(), fds)).toBeInstanceOf(Buffer);
    expect(await client.msg(999, null, fds)).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(3, 0, 4096, 0, 31), fds.slice(0, 1))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(IrqSetFlags.DATA_EVENTFD, PciIrq.MSIX, 0, 2), fds)).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_RESET, null, fds)).toBeInstanceOf(Buffer);
    expect(countOpenFds()).toBe(before);
  });

  it('refuses more fds than max_msg_fds and closes them all', async () => {
    const { socketPath, device } = await serve(undefined, { maxMsgFds: 4 });
    const raw = await negotiatedRawSocket(socketPath);
    const fds = eventfds(5);
    const before = countOpenFds();
    const trigger = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER;
    raw.send(message(1, Command.DEVICE_SET_IRQS, setIrqs(trigger, PciIrq.MSIX, 0, 5)), fds);
    expect(await raw.next()).toMatchObject({ msgId: 1, error: Errno.EINVAL });
    expect(countOpenFds()).toBe(before);
    expect(device.ctx!.irqs.eventfdCount(PciIrq.MSIX)).toBe(0);
    // Within the limit it works.
    raw.send(message(2, Command.DEVICE_SET_IRQS, setIrqs(trigger, PciIrq.MSIX, 0, 4)), fds.slice(0, 4));
    expect(await raw.next()).toMatchObject({ msgId: 2, error: 0 });
    expect(device.ctx!.irqs.eventfdCount(PciIrq.MSIX)).toBe(4);
  });

  it('closes fds of posted and oversized commands', async () => {
    const { socketPath } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    const fds = eventfds(2);
    const before = countOpenFds();
    raw.send(message(1, Command.REGION_WRITE, regionAccess(9, 0, 1, Buffer.from([1])), HeaderFlags.NO_REPLY), fds);
    raw.send(message(2, Command.REGION_WRITE, regionAccess(0, 0, 1, Buffer.from([1])), HeaderFlags.NO_REPLY), fds);
    raw.send(message(3, Command.REGION_WRITE, Buffer.alloc(16), 0, 4 * 1024 * 1024), fds);
    expect(await raw.next()).toMatchObject({ msgId: 3, error: Errno.EINVAL });
    await eventually(() => expect(countOpenFds()).toBe(before));
  });

  it('closes fds that arrive with bytes in which no message starts', async () => {
    const { socketPath } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    const fds = eventfds(1);
    const before = countOpenFds();
    const whole = message(1, Command.REGION_READ, regionAccess(7, 0, 4));
    raw.send(whole.subarray(0, 16));
    await sleep(10);
    raw.send(whole.subarray(16), fds); // the fd rides on the body only
    expect(await raw.next()).toMatchObject({ msgId: 1, error: 0 });
    expect(countOpenFds()).toBe(before);
  });

  it('closes fds sent with a message that breaks the stream', async () => {
    const { socketPath, server } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    const fds = eventfds(3);
    const before = countOpenFds();
    const gone = disconnected(server);
    raw.send(message(1, Command.DEVICE_GET_INFO, deviceInfo(), 0, 8), fds);
    await raw.expectClosed();
    await gone;
    raw.close();
    expect(countOpenFds()).toBe(before - 2); // minus both ends of the connection
  });

  it('closes fds of commands still queued when the client hangs up', async () => {
    let finish: () => void = () => {};
    const device = new TestDevice();
    device.regions[2] = { size: 16, flags: 3, read: () => new Promise<void>((resolve) => (finish = resolve)), write: () => {} };
    const { socketPath, server } = await serve(device);
    const raw = await negotiatedRawSocket(socketPath);
    const mem = guestMemory('queued-fd', 4096);
    const efds = eventfds(2);
    const before = countOpenFds();
    raw.send(message(1, Command.REGION_READ, regionAccess(2, 0, 4)));
    raw.send(message(2, Command.DMA_MAP, dmaMap(3, 0, 4096)), [mem.fd.value]);
    raw.send(message(3, Command.DEVICE_SET_IRQS, setIrqs(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, PciIrq.MSI, 0, 2)), efds);
    await sleep(20);
    expect(countOpenFds()).toBe(before + 3);
    const gone = disconnected(server);
    raw.close();
    await gone;
    finish();
    expect(countOpenFds()).toBe(before - 2); // all fds sent, and both ends of the connection
    expect(device.ctx!.dma.count).toBe(0);
  });
});

describe('fuzz', () => {
  it('answers or hangs up on any command with any payload, and keeps serving', async () => {
    const { socketPath } = await serve();
    const fds = eventfds(2);
    const before = countOpenFds();
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 0, max: 20 }),
        fc.constantFrom(0, HeaderFlags.NO_REPLY, 0x40, HeaderFlags.ERROR),
        fc.uint8Array({ maxLength: 80 }),
        fc.integer({ min: 0, max: 2 }),
        async (command, flags, payload, nfds) => {
          const raw = await negotiatedRawSocket(socketPath);
          raw.send(message(1, command, payload, flags), fds.slice(0, nfds));
          raw.send(message(2, Command.DEVICE_GET_INFO, deviceInfo()));
          // Whatever happened to message 1, the probe is answered or the connection ends.
          for (;;) {
            const m = await raw.next();
            if (m === null || m.msgId === 2) break;
            expect(m.msgId).toBe(1);
          }
          raw.close();
        },
      ),
      { numRuns: 150 },
    );
    await stillServes(socketPath);
    await eventually(() => expect(countOpenFds()).toBe(before));
  });
});
