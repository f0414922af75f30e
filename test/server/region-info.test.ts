/**
 * DEVICE_GET_REGION_INFO (reference §3.5, §6.7) and DEVICE_GET_REGION_IO_FDS (§3.6): negative cases
 * first, then the two-step argsz exchange for an mmap-able region (the first reply truncated and
 * without fd, the second with the capability chain and exactly one fd, as QEMU 11.1 requires).
 */
import * as fs from 'node:fs';
import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { Mapping } from '../../lib/native/mapping';
import { createMemfd } from '../../lib/native/memfd';
import { Fd } from '../../lib/native/fd';
import { Command, Errno, RegionInfoFlags } from '../../lib/protocol/constants';
import type { Reply } from '../../lib/transport/connection';
import { TestDevice, type RawClient } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { defer, regionInfo, setup, u32s, u64, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

const { READ, WRITE, MMAP, CAPS } = RegionInfoFlags;
const PAGE = 4096;

/**
 * TestDevice plus BAR2 (16 KiB, file offset 16 KiB of a memfd, areas at 0x1000 and 0x3000) and a
 * device-specific region 9 (one page, read-only, a type capability and one mappable area).
 */
class MappableDevice extends TestDevice {
  readonly memfd = createMemfd('bar2', 8 * PAGE);
  readonly memory = Mapping.map(this.memfd, 0, 8 * PAGE);

  constructor() {
    super();
    const mem = this.memory.bytes;
    this.regions[2] = {
      size: 4 * PAGE,
      flags: READ | WRITE,
      read: (offset, dst) => {
        mem.copy(dst, 0, 4 * PAGE + offset, 4 * PAGE + offset + dst.length);
      },
      write: (offset, src) => {
        src.copy(mem, 4 * PAGE + offset);
      },
      mmap: { fd: this.memfd, fileOffset: 4 * PAGE, areas: [{ offset: PAGE, size: PAGE }, { offset: 3 * PAGE, size: PAGE }] },
    };
    this.regions.push({
      size: PAGE,
      flags: READ,
      read: (offset, dst) => {
        mem.copy(dst, 0, offset, offset + dst.length);
      },
      mmap: { fd: this.memfd, fileOffset: 0, areas: [{ offset: 0, size: PAGE }] },
      type: { type: 0x8000_1234, subtype: 7 },
    });
  }

  close(): void {
    this.memory.unmapNow();
    this.memfd.close();
  }
}

/** The region info request as a Connection request, so the reply's fds can be counted. */
async function ask(client: RawClient, index: number, argsz: number): Promise<Reply> {
  const reply = await client.conn.request(Command.DEVICE_GET_REGION_INFO, regionInfo(index, argsz));
  defer(() => Fd.closeAll(reply.fds));
  return reply;
}

function fields(p: Buffer) {
  return {
    argsz: p.readUInt32LE(0),
    flags: p.readUInt32LE(4),
    index: p.readUInt32LE(8),
    capOffset: p.readUInt32LE(12),
    size: p.readBigUInt64LE(16),
    offset: p.readBigUInt64LE(24),
  };
}

describe('DEVICE_GET_REGION_INFO: refused', () => {
  it('refuses a payload that is not 32 bytes', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_REGION_INFO, regionInfo(7).subarray(0, 31))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_REGION_INFO, Buffer.concat([regionInfo(7), Buffer.alloc(1)]))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_REGION_INFO, null)).toBe(Errno.EINVAL);
  });

  it('refuses argsz below 32', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_REGION_INFO, regionInfo(7, 31))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_REGION_INFO, regionInfo(7, 0))).toBe(Errno.EINVAL);
  });

  it('refuses an index at or past num_regions', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_REGION_INFO, regionInfo(9))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_REGION_INFO, regionInfo(0xffff_ffff))).toBe(Errno.EINVAL);
  });
});

describe('DEVICE_GET_REGION_INFO: plain regions', () => {
  it('describes config space: READ | WRITE, 256 bytes, no capabilities', async () => {
    const { client } = await setup();
    const p = (await client.msg(Command.DEVICE_GET_REGION_INFO, regionInfo(7))) as Buffer;
    expect(p).toEqual(Buffer.concat([u32s(32, READ | WRITE, 7, 0), u64(256), u64(0)]));
  });

  it('reports an unimplemented region as size 0, flags 0', async () => {
    const { client } = await setup();
    for (const index of [1, 6, 8]) {
      const p = (await client.msg(Command.DEVICE_GET_REGION_INFO, regionInfo(index, 1024))) as Buffer;
      expect(p).toEqual(Buffer.concat([u32s(32, 0, index, 0), u64(0), u64(0)]));
    }
  });

  it('answers 32 bytes for a plain region whatever argsz allows', async () => {
    const { client } = await setup();
    const p = (await client.msg(Command.DEVICE_GET_REGION_INFO, regionInfo(0, 0xffff_ffff))) as Buffer;
    expect(fields(p)).toMatchObject({ argsz: 32, flags: READ | WRITE, size: 4096n });
    expect(p.length).toBe(32);
  });
});

describe('DEVICE_GET_REGION_INFO: mappable regions', () => {
  it('first reply (argsz 32): truncated, MMAP without CAPS, the needed argsz, no fd', async () => {
    const { client } = await setup(new MappableDevice());
    const r = await ask(client, 2, 32);
    expect(r.payload.length).toBe(32);
    expect(fields(r.payload)).toEqual({ argsz: 80, flags: READ | WRITE | MMAP, index: 2, capOffset: 0, size: BigInt(4 * PAGE), offset: BigInt(4 * PAGE) });
    expect(r.fds).toHaveLength(0);
  });

  it('second reply (argsz 80): the sparse-mmap chain and exactly one fd', async () => {
    const { client } = await setup(new MappableDevice());
    const r = await ask(client, 2, 80);
    expect(r.payload.length).toBe(80);
    expect(fields(r.payload)).toEqual({ argsz: 80, flags: READ | WRITE | MMAP | CAPS, index: 2, capOffset: 32, size: BigInt(4 * PAGE), offset: BigInt(4 * PAGE) });
    // Capability at 32: id 1 (SPARSE_MMAP), version 1, next 0; nr_areas 2; the areas.
    const cap = r.payload.subarray(32);
    expect([cap.readUInt16LE(0), cap.readUInt16LE(2), cap.readUInt32LE(4), cap.readUInt32LE(8), cap.readUInt32LE(12)]).toEqual([1, 1, 0, 2, 0]);
    expect([cap.readBigUInt64LE(16), cap.readBigUInt64LE(24), cap.readBigUInt64LE(32), cap.readBigUInt64LE(40)]).toEqual([
      BigInt(PAGE),
      BigInt(PAGE),
      BigInt(3 * PAGE),
      BigInt(PAGE),
    ]);
    expect(r.fds).toHaveLength(1);
  });

  it('sends the region file itself: an area mapped by the client is the device memory', async () => {
    const device = new MappableDevice();
    const { client } = await setup(device);
    const r = await ask(client, 2, 4096);
    expect(r.payload.length).toBe(80);
    expect(r.fds).toHaveLength(1);
    const received = fs.fstatSync(r.fds[0]!.value);
    const original = fs.fstatSync(device.memfd.value);
    expect([received.dev, received.ino]).toEqual([original.dev, original.ino]);
    // Map area 1 the way a client does: file offset = region offset + area offset.
    const area = Mapping.map(r.fds[0]!, 4 * PAGE + 3 * PAGE, PAGE);
    defer(() => area.unmapNow());
    area.bytes.write('doorbell', 8);
    const read = (await client.msg(Command.REGION_READ, Buffer.concat([u64(3 * PAGE + 8), u32s(2, 8)]))) as Buffer;
    expect(read.subarray(16).toString()).toBe('doorbell');
  });

  it('puts the type capability first, then the sparse-mmap capability', async () => {
    const { client } = await setup(new MappableDevice());
    const first = await ask(client, 9, 32);
    expect(fields(first.payload)).toMatchObject({ argsz: 80, flags: READ | MMAP, capOffset: 0 });
    expect(first.fds).toHaveLength(0);
    const r = await ask(client, 9, 80);
    const p = r.payload;
    expect(fields(p)).toMatchObject({ argsz: 80, flags: READ | MMAP | CAPS, capOffset: 32 });
    // Type capability: id 2, version 1, next 48, type, subtype.
    expect([p.readUInt16LE(32), p.readUInt16LE(34), p.readUInt32LE(36), p.readUInt32LE(40), p.readUInt32LE(44)]).toEqual([2, 1, 48, 0x8000_1234, 7]);
    // Sparse capability: id 1, next 0, one area [0, PAGE).
    expect([p.readUInt16LE(48), p.readUInt32LE(52), p.readUInt32LE(56), p.readBigUInt64LE(64), p.readBigUInt64LE(72)]).toEqual([1, 0, 1, 0n, BigInt(PAGE)]);
    expect(r.fds).toHaveLength(1);
  });

  it('never replies longer than argsz, and sends the fd only with the chain', async () => {
    const { client } = await setup(new MappableDevice());
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 32, max: 200 }), fc.constantFrom(2, 9), async (argsz, index) => {
        const r = await client.conn.request(Command.DEVICE_GET_REGION_INFO, regionInfo(index, argsz));
        const n = r.fds.length;
        Fd.closeAll(r.fds);
        expect(r.payload.length).toBeLessThanOrEqual(argsz);
        expect(r.payload.readUInt32LE(0)).toBe(80);
        if (argsz < 80) {
          expect([r.payload.length, n]).toEqual([32, 0]);
        } else {
          expect([r.payload.length, n]).toEqual([80, 1]);
        }
      }),
      { numRuns: 60 },
    );
  });
});

describe('DEVICE_GET_REGION_IO_FDS', () => {
  it('refuses a short payload, argsz below 16 and an unknown region', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_REGION_IO_FDS, u32s(16, 0, 0))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_REGION_IO_FDS, u32s(15, 0, 0, 0))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_REGION_IO_FDS, u32s(16, 0, 9, 0))).toBe(Errno.EINVAL);
  });

  it('offers no ioeventfds: 16 bytes, count 0, no fd', async () => {
    const { client } = await setup();
    const r = await client.conn.request(Command.DEVICE_GET_REGION_IO_FDS, u32s(1024, 0, 0, 0));
    expect(r.fds).toHaveLength(0);
    expect(r.payload).toEqual(u32s(16, 0, 0, 0));
  });
});
