import { describe, it, expect, afterEach } from 'vitest';
import { Command, DeviceFlags, Errno, RegionInfoFlags } from '../../lib/protocol/constants';
import { encodeVersion } from '../../lib/protocol/messages/version';
import { encodeRegionInfoRequest, decodeRegionInfoReply } from '../../lib/protocol/messages/region';
import { createMemfd } from '../../lib/native/memfd';
import { rawClient, startServer, TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();
let stops: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const s of stops.splice(0)) await s();
});

describe('what the device and the client can do', () => {
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
