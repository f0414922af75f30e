/**
 * REGION_WRITE_MULTI (reference §3.15): negative cases first, then batched writes executed in
 * array order, stopping at the first failure, posted or not.
 */
import { describe, it, expect } from 'vitest';
import { Command, Errno, HeaderFlags, RegionInfoFlags } from '../../lib/protocol/constants';
import { regionAccess, TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { message, negotiatedRawSocket, serve, setup, u64, useTeardown, writeMulti } from './support';

useFdLeakCheck();
useTeardown();

describe('REGION_WRITE_MULTI: refused', () => {
  it('refuses it when write_multiple is off', async () => {
    const { client, device } = await setup(undefined, { writeMultiple: false });
    expect(await client.msg(Command.REGION_WRITE_MULTI, writeMulti([{ offset: 0, region: 0, data: [1] }]))).toBe(Errno.EINVAL);
    expect(device.calls).toEqual([]);
  });

  it('refuses a payload shorter than wr_cnt', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.REGION_WRITE_MULTI, Buffer.alloc(7))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_WRITE_MULTI, null)).toBe(Errno.EINVAL);
  });

  it('refuses wr_cnt that disagrees with the entries present', async () => {
    const { client, device } = await setup();
    const two = [
      { offset: 0, region: 0, data: [1] },
      { offset: 1, region: 0, data: [2] },
    ];
    expect(await client.msg(Command.REGION_WRITE_MULTI, writeMulti(two, 3))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_WRITE_MULTI, writeMulti(two, 1))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_WRITE_MULTI, writeMulti(two).subarray(0, 8 + 24 + 23))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_WRITE_MULTI, Buffer.concat([u64(0xffff_ffff_ffffn), Buffer.alloc(24)]))).toBe(Errno.EINVAL);
    expect(device.calls).toEqual([]);
  });

  it('refuses an entry count of 0 or above 8 before writing anything', async () => {
    const { client, device } = await setup();
    for (const count of [0, 9, 0xffff_ffff]) {
      const p = writeMulti([
        { offset: 0, region: 0, data: [1] },
        { offset: 0, region: 0, data: [1], count },
      ]);
      expect(await client.msg(Command.REGION_WRITE_MULTI, p), `count ${count}`).toBe(Errno.EINVAL);
    }
    expect(device.calls).toEqual([]);
  });

  it('stops at the first bad write: earlier ones done, later ones not', async () => {
    const { client, device } = await setup();
    for (const bad of [
      { offset: 0, region: 9, data: [2] }, // no such region
      { offset: 0, region: 1, data: [2] }, // unimplemented
      { offset: 255, region: 7, data: [2, 2] }, // past the end
      { offset: 0xffff_ffff_ffff, region: 7, data: [2] }, // far past the end
    ]) {
      device.calls.length = 0;
      const p = writeMulti([{ offset: 0x10, region: 0, data: [1] }, bad, { offset: 0x20, region: 0, data: [3] }]);
      expect(await client.msg(Command.REGION_WRITE_MULTI, p)).toBe(Errno.EINVAL);
      expect(device.calls).toEqual(['bar0 write 16 1']);
    }
    expect(device.bar0[0x20]).toBe(0);
  });

  it('refuses a write to a region without WRITE', async () => {
    const device = new TestDevice();
    const writes: number[] = [];
    device.regions[2] = { size: 16, flags: RegionInfoFlags.READ, read: () => {}, write: (o) => void writes.push(o) };
    const { client } = await setup(device);
    expect(await client.msg(Command.REGION_WRITE_MULTI, writeMulti([{ offset: 0, region: 2, data: [1] }]))).toBe(Errno.EINVAL);
    expect(writes).toEqual([]);
  });

  it("passes the device's errno on", async () => {
    const device = new TestDevice();
    device.regions[2] = { size: 16, flags: RegionInfoFlags.WRITE, write: async () => Errno.EIO };
    const { client } = await setup(device);
    const p = writeMulti([
      { offset: 0, region: 0, data: [1] },
      { offset: 0, region: 2, data: [1] },
    ]);
    expect(await client.msg(Command.REGION_WRITE_MULTI, p)).toBe(Errno.EIO);
    expect(device.calls).toEqual(['bar0 write 0 1']);
  });
});

describe('REGION_WRITE_MULTI: writes', () => {
  it('writes every entry in order and answers wr_cnt', async () => {
    const { client, device } = await setup();
    const p = writeMulti([
      { offset: 0x100, region: 0, data: [1, 2, 3, 4, 5, 6, 7, 8] },
      { offset: 0x40, region: 7, data: [0xaa, 0xbb] },
      { offset: 0x100, region: 0, data: [9] },
    ]);
    expect(await client.msg(Command.REGION_WRITE_MULTI, p)).toEqual(u64(3));
    expect(device.calls).toEqual(['bar0 write 256 8', 'config write 64 2', 'bar0 write 256 1']);
    expect([...device.bar0.subarray(0x100, 0x108)]).toEqual([9, 2, 3, 4, 5, 6, 7, 8]);
    expect([...device.config.subarray(0x40, 0x43)]).toEqual([0xaa, 0xbb, 0]);
  });

  it('ignores the data bytes beyond count', async () => {
    const { client, device } = await setup();
    const p = writeMulti([{ offset: 0, region: 0, data: [1, 2, 3, 4, 5, 6, 7, 8], count: 2 }]);
    expect(await client.msg(Command.REGION_WRITE_MULTI, p)).toEqual(u64(1));
    expect([...device.bar0.subarray(0, 4)]).toEqual([1, 2, 0, 0]);
  });

  it('accepts an empty batch', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.REGION_WRITE_MULTI, u64(0))).toEqual(u64(0));
  });

  it('executes a posted batch (as QEMU sends it) and answers nothing, even on failure', async () => {
    const { socketPath, device } = await serve();
    const raw = await negotiatedRawSocket(socketPath);
    raw.send(message(1, Command.REGION_WRITE_MULTI, writeMulti([{ offset: 4, region: 0, data: [4] }, { offset: 5, region: 0, data: [5] }]), HeaderFlags.NO_REPLY));
    raw.send(message(2, Command.REGION_WRITE_MULTI, writeMulti([{ offset: 0, region: 9, data: [1] }]), HeaderFlags.NO_REPLY));
    raw.send(message(3, Command.REGION_READ, regionAccess(0, 4, 2)));
    const reply = await raw.next();
    expect(reply).toMatchObject({ msgId: 3, flags: 1 });
    expect([...reply!.payload.subarray(16)]).toEqual([4, 5]);
    await raw.expectSilence();
    expect(device.calls).toEqual(['bar0 write 4 1', 'bar0 write 5 1']);
  });
});

describe('REGION_WRITE_MULTI: a client that hangs up in the middle', () => {
  it('finishes the batch before the device is reset (never writes after the reset)', async () => {
    const device = new TestDevice();
    const bar0 = device.regions[0]!;
    // Each write takes a while, as a device callback that waits on its backend would.
    (device.regions as typeof device.regions)[0] = {
      ...bar0,
      write: async (offset, src) => {
        await new Promise((resolve) => setTimeout(resolve, 20));
        return bar0.write!(offset, src);
      },
    };
    const { client, server } = await setup(device);
    const gone = new Promise((resolve) => server.once('disconnect', resolve));
    const batch = [0, 1, 2].map((i) => ({ offset: i, region: 0, data: [i + 1] }));
    void client.msg(Command.REGION_WRITE_MULTI, writeMulti(batch)).catch(() => undefined);
    await new Promise((resolve) => setTimeout(resolve, 5)); // the first write is under way
    client.close();
    await gone;
    expect(device.calls).toEqual(['bar0 write 0 1', 'bar0 write 1 1', 'bar0 write 2 1', 'reset lost-connection']);
  });
});
