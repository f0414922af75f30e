import { describe, it, expect, afterEach } from 'vitest';
import { Command, Errno } from '../../lib/protocol/constants';
import { rawClient, regionAccess, startServer, TestDevice, type RawClient } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

let cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanup.reverse()) await c();
  cleanup = [];
});

async function setup(): Promise<{ client: RawClient; device: TestDevice }> {
  const device = new TestDevice();
  const s = await startServer(device);
  const client = await rawClient(s.socketPath);
  cleanup.push(s.stop, async () => client.close());
  return { client, device };
}

describe('REGION_READ / REGION_WRITE', () => {
  it('refuses a short request', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.REGION_READ, Buffer.alloc(15))).toBe(Errno.EINVAL);
  });

  it('refuses an unknown region index and an unimplemented region', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.REGION_READ, regionAccess(9, 0, 4))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_READ, regionAccess(1, 0, 4))).toBe(Errno.EINVAL);
  });

  it('refuses an access past the end, including offset overflow', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.REGION_READ, regionAccess(7, 253, 4))).toBe(Errno.EINVAL);
    const huge = regionAccess(7, 0, 4);
    huge.writeBigUInt64LE(0xffff_ffff_ffff_fffen, 0);
    expect(await client.msg(Command.REGION_READ, huge)).toBe(Errno.EINVAL);
  });

  it('refuses a write whose data length disagrees with count', async () => {
    const { client, device } = await setup();
    const bad = regionAccess(0, 0, 8, Buffer.alloc(4, 0xaa));
    expect(await client.msg(Command.REGION_WRITE, bad)).toBe(Errno.EINVAL);
    expect(device.bar0.subarray(0, 8).equals(Buffer.alloc(8))).toBe(true);
  });

  it('reads config space and echoes offset, region and count', async () => {
    const { client } = await setup();
    const reply = (await client.msg(Command.REGION_READ, regionAccess(7, 0, 4))) as Buffer;
    expect(reply.length).toBe(20);
    expect(reply.readUInt32LE(8)).toBe(7);
    expect(reply.readUInt32LE(12)).toBe(4);
    expect(reply.readUInt32LE(16)).toBe(0x56781234);
  });

  it('writes then reads back BAR0 at odd offsets and sizes', async () => {
    const { client } = await setup();
    const data = Buffer.from([1, 2, 3, 4, 5, 6, 7]);
    const w = (await client.msg(Command.REGION_WRITE, regionAccess(0, 0x101, 7, data))) as Buffer;
    expect(w.length).toBe(16);
    expect(w.readUInt32LE(12)).toBe(7);
    const r = (await client.msg(Command.REGION_READ, regionAccess(0, 0x101, 7))) as Buffer;
    expect(r.subarray(16).equals(data)).toBe(true);
  });

  it('serves a large read in one reply', async () => {
    const { client, device } = await setup();
    device.bar0.fill(0x5a);
    const r = (await client.msg(Command.REGION_READ, regionAccess(0, 0, 4096))) as Buffer;
    expect(r.length).toBe(16 + 4096);
    expect(r.subarray(16).every((b) => b === 0x5a)).toBe(true);
  });
});
