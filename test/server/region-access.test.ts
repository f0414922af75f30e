import { describe, it, expect } from 'vitest';
import { Command, Errno, HeaderFlags, RegionInfoFlags } from '../../lib/protocol/constants';
import { regionAccess, TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { dmaMap, guestMemory, message, negotiatedRawSocket, serve, setup as serverSetup, sleep, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

async function setup(device = new TestDevice()) {
  return serverSetup(device);
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

describe('REGION_READ / REGION_WRITE: more refusals', () => {
  it('refuses a read whose payload is longer than 16 bytes', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.REGION_READ, Buffer.concat([regionAccess(7, 0, 4), Buffer.alloc(4)]))).toBe(Errno.EINVAL);
  });

  it('refuses a write to a read-only region and a read of a write-only one', async () => {
    const device = new TestDevice();
    device.regions[2] = { size: 16, flags: RegionInfoFlags.READ, read: () => {}, write: () => {} };
    device.regions[3] = { size: 16, flags: RegionInfoFlags.WRITE, read: () => {}, write: () => {} };
    const { client } = await setup(device);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(2, 0, 1, Buffer.from([1])))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_READ, regionAccess(3, 0, 1))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_READ, regionAccess(2, 0, 1))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(3, 0, 1, Buffer.from([1])))).toBeInstanceOf(Buffer);
  });

  it('refuses an access the region has no callback for', async () => {
    const device = new TestDevice();
    device.regions[2] = { size: 16, flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE };
    const { client } = await setup(device);
    expect(await client.msg(Command.REGION_READ, regionAccess(2, 0, 4))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(2, 0, 1, Buffer.from([1])))).toBe(Errno.EINVAL);
  });

  it("passes the device's errno on, synchronous or not", async () => {
    const device = new TestDevice();
    device.regions[2] = { size: 16, flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE, read: () => Errno.EIO, write: async () => Errno.EPERM };
    const { client } = await setup(device);
    expect(await client.msg(Command.REGION_READ, regionAccess(2, 0, 4))).toBe(Errno.EIO);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(2, 0, 1, Buffer.from([1])))).toBe(Errno.EPERM);
  });

  it('answers EINVAL when the device throws, reports it, and keeps serving', async () => {
    const device = new TestDevice();
    device.regions[2] = {
      size: 16,
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
      read: () => {
        throw new Error('model bug (sync)');
      },
      write: async () => {
        throw new Error('model bug (async)');
      },
    };
    const { client, server } = await setup(device);
    const errors: unknown[] = [];
    server.on('error', (e) => errors.push(e));
    expect(await client.msg(Command.REGION_READ, regionAccess(2, 0, 4))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(2, 0, 1, Buffer.from([1])))).toBe(Errno.EINVAL);
    expect(errors.map((e) => (e as Error).message)).toEqual(['model bug (sync)', 'model bug (async)']);
    expect(await client.msg(Command.REGION_READ, regionAccess(7, 0, 4))).toBeInstanceOf(Buffer);
  });

  it('keeps serving when the device throws and nobody listens for errors', async () => {
    const device = new TestDevice();
    device.regions[2] = {
      size: 16,
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
      read: () => {
        throw new Error('model bug (sync)');
      },
      write: async () => {
        throw new Error('model bug (async)');
      },
    };
    const { client } = await setup(device);
    expect(await client.msg(Command.REGION_READ, regionAccess(2, 0, 4))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(2, 0, 1, Buffer.from([1])))).toBe(Errno.EINVAL);
    expect(client.conn.state).toBe('open');
    expect(await client.msg(Command.REGION_READ, regionAccess(7, 0, 4))).toBeInstanceOf(Buffer);
  });
});

describe('REGION_WRITE: posted (No_reply)', () => {
  it('executes a posted write and sends nothing back', async () => {
    const { socketPath, device } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    raw.send(message(1, Command.REGION_WRITE, regionAccess(0, 8, 4, Buffer.from([1, 2, 3, 4])), HeaderFlags.NO_REPLY));
    await raw.expectSilence();
    expect([...device.bar0.subarray(8, 12)]).toEqual([1, 2, 3, 4]);
  });

  it('sends nothing back for a posted write that fails', async () => {
    const device = new TestDevice();
    device.regions[2] = { size: 16, flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE, read: () => {}, write: async () => Errno.EIO };
    const { socketPath } = await serve(device);
    const raw = await negotiatedRawSocket(socketPath);
    const posted = HeaderFlags.NO_REPLY;
    raw.send(message(1, Command.REGION_WRITE, regionAccess(9, 0, 1, Buffer.from([1])), posted)); // no such region
    raw.send(message(2, Command.REGION_WRITE, regionAccess(0, 0, 8, Buffer.from([1])), posted)); // count lies
    raw.send(message(3, Command.REGION_WRITE, regionAccess(2, 0, 1, Buffer.from([1])), posted)); // device EIO
    raw.send(message(4, Command.REGION_WRITE, Buffer.alloc(3), posted)); // short
    raw.send(message(5, 99, Buffer.alloc(3), posted)); // unknown command
    raw.send(message(6, Command.REGION_READ, regionAccess(7, 0, 2)));
    const reply = await raw.next();
    expect(reply).toMatchObject({ msgId: 6, command: Command.REGION_READ, flags: 1 });
    await raw.expectSilence();
  });
});

/** TestDevice whose BAR0 reads take `delayMs` and are logged when they start and end. */
class SlowDevice extends TestDevice {
  constructor(delayMs: number) {
    super();
    const bar0 = this.regions[0]!;
    this.regions[0] = {
      ...bar0,
      read: async (offset, dst) => {
        this.calls.push(`bar0 read ${offset} start`);
        await sleep(delayMs);
        this.bar0.copy(dst, 0, offset, offset + dst.length);
        this.calls.push(`bar0 read ${offset} end`);
      },
    };
  }
}

describe('REGION_READ / REGION_WRITE: in-order execution', () => {
  it('holds later commands behind a slow access, and replies in order', async () => {
    const device = new SlowDevice(60);
    device.bar0.write('slow', 0);
    const { socketPath } = await serve(device);
    const raw = await negotiatedRawSocket(socketPath);
    // Three commands in one sendmsg, then one more a little later.
    raw.send(
      Buffer.concat([
        message(1, Command.REGION_READ, regionAccess(0, 0, 4)),
        message(2, Command.REGION_WRITE, regionAccess(7, 0x40, 1, Buffer.from([0x77]))),
        message(3, Command.REGION_WRITE, regionAccess(0, 0, 4, Buffer.from('fast')), HeaderFlags.NO_REPLY),
      ]),
    );
    await sleep(20);
    raw.send(message(4, Command.REGION_READ, regionAccess(0, 0, 4)));
    expect(device.calls).toEqual(['bar0 read 0 start']);
    const replies = [await raw.next(), await raw.next(), await raw.next()];
    expect(replies.map((r) => r!.msgId)).toEqual([1, 2, 4]);
    expect(replies[0]!.payload.subarray(16).toString()).toBe('slow');
    expect(replies[2]!.payload.subarray(16).toString()).toBe('fast');
    expect(device.calls).toEqual(['bar0 read 0 start', 'bar0 read 0 end', 'config write 64 1', 'bar0 write 0 4', 'bar0 read 0 start', 'bar0 read 0 end']);
  });

  it('holds a DMA_MAP with its fd behind a slow access', async () => {
    const device = new SlowDevice(40);
    const { client } = await setup(device);
    const mem = guestMemory('queued', 4096);
    const read = client.msg(Command.REGION_READ, regionAccess(0, 0, 4));
    const map = client.msg(Command.DMA_MAP, dmaMap(3, 0, 4096), [mem.fd.value]);
    await sleep(10);
    expect(device.ctx!.dma.count).toBe(0);
    expect(await read).toBeInstanceOf(Buffer);
    expect(await map).toEqual(Buffer.alloc(0));
    mem.bytes.write('mapped');
    expect(device.ctx!.dma.view(0, 6, false).toString()).toBe('mapped');
  });
});
