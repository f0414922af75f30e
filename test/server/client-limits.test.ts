import { describe, it, expect, afterEach } from 'vitest';
import { Command, DeviceFlags, Errno, IrqSetFlags, RegionInfoFlags } from '../../lib/protocol/constants';
import { encodeVersion } from '../../lib/protocol/messages/version';
import { encodeRegionInfoRequest, decodeRegionInfoReply } from '../../lib/protocol/messages/region';
import { createMemfd } from '../../lib/native/memfd';
import { rawClient, regionAccess, startServer, TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();
let stops: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const s of stops.splice(0)) await s();
});

describe('what the device and the client can do', () => {
  it('answers a command the connection refuses (too large) in its turn, after earlier slow ones', async () => {
    const device = new TestDevice();
    const slowRead = device.regions[0]!.read!;
    Object.assign(device.regions[0]!, {
      read: (offset: number, dst: Buffer) => new Promise<void>((r) => setTimeout(() => r(slowRead(offset, dst) as void), 50)),
    });
    const s = await startServer(device);
    stops.push(s.stop);
    const client = await rawClient(s.socketPath);
    const order: string[] = [];
    const slow = client.msg(Command.REGION_READ, regionAccess(0, 0, 4)).then((r) => order.push(`read:${typeof r}`));
    const huge = Buffer.alloc(16 + (2 << 20)); // above max_data_xfer_size + slack: refused unread
    huge.writeUInt32LE(0, 8);
    huge.writeUInt32LE(2 << 20, 12);
    const big = client.msg(Command.REGION_WRITE, huge).then((r) => order.push(`big:${String(r)}`));
    await Promise.all([slow, big]);
    expect(order).toEqual(['read:object', `big:${Errno.EINVAL}`]);
    client.close();
  });


  it('refuses SET_IRQS EVENTFD with an fd that is not an eventfd (and closes it)', async () => {
    const s = await startServer(new TestDevice());
    stops.push(s.stop);
    const client = await rawClient(s.socketPath);
    const notEventfd = createMemfd('not-an-eventfd', 4096);
    const req = Buffer.alloc(20);
    req.writeUInt32LE(20, 0); // argsz
    req.writeUInt32LE(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 4);
    req.writeUInt32LE(2, 8); // MSI-X
    req.writeUInt32LE(0, 12); // start
    req.writeUInt32LE(1, 16); // count
    expect(await client.msg(Command.DEVICE_SET_IRQS, req, [notEventfd.value])).toBe(Errno.EINVAL);
    notEventfd.close();
    client.close();
    // useFdLeakCheck: the server's received copy was closed.
  });

  it('refuses DEVICE_RESET for a device that does not report RESET', async () => {
    const device = new TestDevice();
    (device as { flags: number }).flags = DeviceFlags.PCI;
    const s = await startServer(device);
    stops.push(s.stop);
    const client = await rawClient(s.socketPath);
    expect(await client.msg(Command.DEVICE_RESET)).toBe(Errno.EINVAL);
    expect(device.calls.filter((c) => c.startsWith('reset'))).toEqual([]);
    client.close();
  });

  it('describes an mmap-able region as message-only to a client that accepts no fds', async () => {
    const device = new TestDevice();
    const memfd = createMemfd('bar0', 4096);
    Object.assign(device.regions[0]!, { mmap: { fd: memfd, fileOffset: 0, areas: [{ offset: 0, size: 4096 }] } });
    const s = await startServer(device);
    stops.push(async () => {
      await s.stop();
      memfd.close();
    });
    const client = await rawClient(s.socketPath, false);
    const version = encodeVersion({ major: 0, minor: 0, capabilities: { maxMsgFds: 0 } });
    expect(typeof (await client.msg(Command.VERSION, version))).not.toBe('number');
    const reply = await client.conn.request(Command.DEVICE_GET_REGION_INFO, encodeRegionInfoRequest({ index: 0, argsz: 1024 }));
    expect(reply.fds).toHaveLength(0);
    const info = decodeRegionInfoReply(reply.payload);
    expect(info.flags & RegionInfoFlags.MMAP).toBe(0);
    expect(info.size).toBe(4096n);
    client.close();
  });
});
