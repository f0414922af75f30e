import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { createMemfd } from '../../lib/native/memfd';
import { Command, Errno, HeaderFlags, RegionInfoFlags } from '../../lib/protocol/constants';
import { ProtocolError, VfioUserError } from '../../lib/protocol/errors';
import { sparseMmapCap } from '../../lib/protocol/messages/region';
import { decodeRegionWriteMultiRequest } from '../../lib/protocol/messages/access';
import { useFdLeakCheck } from '../helpers/fds';
import { startServer, TestDevice } from '../helpers/server';
import { rejection, connect, fakeServer, defer, useCleanup, FakeServer, MmapDevice, lvuConfig, lvuRegions, type FakeRegion, type RawMessage } from './fixtures';

useFdLeakCheck();

useCleanup();

/** Config space whose BAR0 is a 32-bit memory BAR and BAR2 an I/O BAR. */
function memBarConfig(): Buffer {
  const c = lvuConfig();
  c.writeUInt32LE(0x0000_0000, 0x10);
  c.writeUInt32LE(0x0000_0001, 0x18);
  return c;
}

/** Regions: BAR0 64 KiB memory, BAR2 256 bytes I/O, config 256. */
function memBarRegions(): (FakeRegion | null)[] {
  const r = lvuRegions();
  r[0] = { flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE, size: 0x10000 };
  return r;
}

const regionInfoReply = (m: RawMessage) => m.command === Command.DEVICE_GET_REGION_INFO;

/** A raw region-info reply payload. */
function rawRegionInfo(fields: { argsz: number; flags: number; index: number; capOffset?: number; size: bigint }, tail = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(32);
  b.writeUInt32LE(fields.argsz, 0);
  b.writeUInt32LE(fields.flags, 4);
  b.writeUInt32LE(fields.index, 8);
  b.writeUInt32LE(fields.capOffset ?? 0, 12);
  b.writeBigUInt64LE(fields.size, 16);
  return Buffer.concat([b, tail]);
}

/** Override region-info answers for one index. */
function regionInfoOverride(index: number, answer: (m: RawMessage, f: FakeServer, argsz: number) => void) {
  return (m: RawMessage, f: FakeServer) => {
    if (m.payload.readUInt32LE(8) !== index) return false;
    answer(m, f, m.payload.readUInt32LE(0));
    return true;
  };
}

describe('region info: refusals', () => {
  it('refuses a second step that is still truncated although its argsz was granted', async () => {
    const fake = fakeServer({
      overrides: {
        [Command.DEVICE_GET_REGION_INFO]: regionInfoOverride(0, (m, f) =>
          f.reply(m, rawRegionInfo({ argsz: 80, flags: RegionInfoFlags.READ | RegionInfoFlags.MMAP, index: 0, size: 0x1000n })),
        ),
      },
    });
    const err = await rejection(connect(fake.path));
    expect(err).toBeInstanceOf(ProtocolError);
    expect((err as Error).message).toMatch(/fitted the request/);
    expect(fake.received.filter(regionInfoReply).filter((m) => m.payload.readUInt32LE(8) === 0).map((m) => m.payload.readUInt32LE(0))).toEqual([32, 80]);
  });

  it('refuses an argsz beyond 64 KiB and a reply longer than the argsz asked for', async () => {
    const huge = fakeServer({
      overrides: {
        [Command.DEVICE_GET_REGION_INFO]: regionInfoOverride(0, (m, f) => f.reply(m, rawRegionInfo({ argsz: 1 << 20, flags: 0, index: 0, size: 0n }))),
      },
    });
    expect(((await rejection(connect(huge.path))) as Error).message).toMatch(/exceeds 65536/);
    const long = fakeServer({
      overrides: {
        [Command.DEVICE_GET_REGION_INFO]: regionInfoOverride(0, (m, f) =>
          f.reply(m, rawRegionInfo({ argsz: 48, flags: RegionInfoFlags.READ | RegionInfoFlags.CAPS, index: 0, capOffset: 32, size: 0x1000n }, Buffer.alloc(16))),
        ),
      },
    });
    expect(((await rejection(connect(long.path))) as Error).message).toMatch(/exceed the argsz 32/);
  });

  it('refuses an answer for another index, a sparse area outside the region, and a capability loop', async () => {
    const other = fakeServer({
      overrides: { [Command.DEVICE_GET_REGION_INFO]: regionInfoOverride(3, (m, f) => f.reply(m, rawRegionInfo({ argsz: 32, flags: 0, index: 4, size: 0n }))) },
    });
    expect(((await rejection(connect(other.path))) as Error).message).toMatch(/index 4 answers a query for 3/);

    const sparse = Buffer.alloc(32);
    sparse.writeUInt16LE(1, 0); // SPARSE_MMAP
    sparse.writeUInt16LE(1, 2);
    sparse.writeUInt32LE(1, 8); // one area
    sparse.writeBigUInt64LE(0x800n, 16);
    sparse.writeBigUInt64LE(0x1000n, 24); // ends at 0x1800 > 0x1000
    const outside = fakeServer({
      overrides: {
        [Command.DEVICE_GET_REGION_INFO]: regionInfoOverride(0, (m, f, argsz) => {
          const full = rawRegionInfo({ argsz: 64, flags: 0xf, index: 0, capOffset: 32, size: 0x1000n }, sparse);
          f.reply(m, argsz >= 64 ? full : rawRegionInfo({ argsz: 64, flags: 0x7, index: 0, size: 0x1000n }));
        }),
      },
    });
    const e2 = await rejection(connect(outside.path));
    expect(e2).toBeInstanceOf(ProtocolError);
    expect((e2 as Error).message).toMatch(/outside/);

    const loop = Buffer.alloc(16);
    loop.writeUInt16LE(7, 0); // an unknown capability...
    loop.writeUInt32LE(32, 4); // ...whose next points back at itself
    const looping = fakeServer({
      overrides: {
        [Command.DEVICE_GET_REGION_INFO]: regionInfoOverride(0, (m, f, argsz) => {
          f.reply(m, argsz >= 48 ? rawRegionInfo({ argsz: 48, flags: 0xb, index: 0, capOffset: 32, size: 0x1000n }, loop) : rawRegionInfo({ argsz: 48, flags: 3, index: 0, size: 0x1000n }));
        }),
      },
    });
    expect(((await rejection(connect(looping.path))) as Error).message).toMatch(/loop/);
  });

  it('reports an MMAP region whose fds cannot be attributed as unmappable, closing them', async () => {
    const regions = lvuRegions();
    const areas = [{ offset: 0n, size: 0x1000n }];
    regions[0] = {
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP,
      size: 0x2000,
      capabilities: [sparseMmapCap(areas)],
      fds: () => {
        const a = createMemfd('a', 0x2000);
        const b = createMemfd('b', 0x2000);
        const raw = [a.value, b.value];
        setImmediate(() => {
          a.close();
          b.close();
        });
        return raw;
      },
    };
    regions[1] = { flags: RegionInfoFlags.READ | RegionInfoFlags.MMAP, size: 0x1000, capabilities: [sparseMmapCap(areas)] };
    const fake = fakeServer({ regions });
    const client = await connect(fake.path);
    expect(client.region(0)).toMatchObject({ mmapFlag: true, mappable: false, mmapUnavailable: 'the reply carried 2 file descriptors for 1 areas' });
    expect(client.region(1)).toMatchObject({ mmapFlag: true, mappable: false, mmapUnavailable: 'the reply carried no file descriptor' });
    expect(() => client.mmapRegion(0)).toThrow(ProtocolError);
    expect(() => client.mmapRegion(2)).toThrow(RangeError);
    // A device with an MMAP region posts nothing, mappable or not.
    expect(client.postedWrites).toBe(false);
  });

  it('closes an fd sent for a region without MMAP, and refuses to map areas past the end of the file', async () => {
    const regions = lvuRegions();
    regions[0] = {
      flags: RegionInfoFlags.READ,
      size: 0x1000,
      capabilities: [{ kind: 'type', version: 1, type: 1, subtype: 1 }],
      fds: () => {
        const a = createMemfd('stray', 0x1000);
        setImmediate(() => a.close());
        return [a.value];
      },
    };
    regions[1] = {
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP,
      size: 0x4000,
      capabilities: [sparseMmapCap([{ offset: 0x2000n, size: 0x2000n }])],
      fds: () => {
        const a = createMemfd('short', 0x1000); // the area needs 0x4000 bytes of file
        setImmediate(() => a.close());
        return [a.value];
      },
    };
    const fake = fakeServer({ regions });
    const client = await connect(fake.path);
    expect(client.region(0)).toMatchObject({ mmapFlag: false, mappable: false, type: { type: 1, subtype: 1 } });
    expect(client.region(1).mappable).toBe(true);
    const err = (() => {
      try {
        client.mmapRegion(1);
        return null;
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(ProtocolError);
    expect((err as Error).message).toMatch(/past the end of the file/);
  });
});

describe('region access: refusals', () => {
  it('throws RangeError/TypeError for accesses the device does not have', async () => {
    const fake = fakeServer();
    const client = await connect(fake.path);
    await expect(client.read(9, 0, 4)).rejects.toThrow(RangeError);
    await expect(client.read(0, 0, 4)).rejects.toThrow(/not implemented/);
    await expect(client.read(7, 254, 4)).rejects.toThrow(/outside region 7/);
    await expect(client.read(7, -1, 1)).rejects.toThrow(RangeError);
    await expect(client.read(7, 0.5, 1)).rejects.toThrow(TypeError);
    await expect(client.write(7, 0, 'x' as unknown as Buffer)).rejects.toThrow(TypeError);
    await expect(client.readUint(7, 0, 3 as 4)).rejects.toThrow(RangeError);
  });

  it.each([
    ['a count above the request', (p: Buffer) => Buffer.concat([p.subarray(0, 12), Buffer.from([8, 0, 0, 0]), Buffer.alloc(8)]), /count 8 for a read of 4/],
    ['a short count', (p: Buffer) => Buffer.concat([p.subarray(0, 12), Buffer.from([2, 0, 0, 0]), Buffer.alloc(2)]), /count 2 for a read of 4/],
    ['a header-only reply', () => Buffer.alloc(0), /count 0 for a read of 4/],
    ['data that disagrees with count', (p: Buffer) => Buffer.concat([p, Buffer.alloc(2)]), /disagrees/],
    ['another offset echoed', (p: Buffer) => Buffer.concat([Buffer.from([8, 0, 0, 0, 0, 0, 0, 0]), p.subarray(8), Buffer.alloc(4)]), /echoes/],
  ])('rejects a REGION_READ reply with %s and stays usable', async (_name, build, match) => {
    let lie = true;
    const fake = fakeServer({
      overrides: {
        [Command.REGION_READ]: (m, f) => {
          if (!lie || m.payload.readUInt32LE(12) !== 4) return false;
          lie = false;
          f.reply(m, build(m.payload));
          return true;
        },
      },
    });
    const client = await connect(fake.path);
    const err = await rejection(client.read(7, 0, 4));
    expect(err).toBeInstanceOf(ProtocolError);
    expect((err as Error).message).toMatch(match);
    expect((await client.read(7, 0, 4)).readUInt16LE(0)).toBe(0x494f);
  });

  it('rejects (and closes) an fd on a REGION_READ reply', async () => {
    const fake = fakeServer({
      overrides: {
        [Command.REGION_READ]: (m, f) => {
          if (m.payload.readUInt32LE(12) !== 2) return false;
          const fd = createMemfd('stray', 4096);
          f.reply(m, Buffer.concat([m.payload, Buffer.alloc(2)]), { fds: [fd.value] });
          fd.close();
          return true;
        },
      },
    });
    const client = await connect(fake.path);
    const err = await rejection(client.read(7, 0, 2));
    expect(err).toBeInstanceOf(ProtocolError);
    expect((err as Error).message).toMatch(/unexpected fds/);
  });

  it('rejects a REGION_WRITE reply echoing another count', async () => {
    const fake = fakeServer({
      overrides: {
        [Command.REGION_WRITE]: (m, f) => {
          const echo = Buffer.from(m.payload.subarray(0, 16));
          echo.writeUInt32LE(1, 12);
          f.reply(m, echo);
          return true;
        },
      },
    });
    const client = await connect(fake.path);
    expect(((await rejection(client.write(7, 4, Buffer.from([1, 2])))) as Error).message).toMatch(/count 1/);
  });

  it('reports the errno of an error reply, and ETIMEDOUT for silence, then goes on', async () => {
    let mode: 'error' | 'silent' | 'ok' = 'error';
    const fake = fakeServer({
      overrides: {
        [Command.REGION_READ]: (m, f) => {
          if (m.payload.readUInt32LE(12) !== 1) return false;
          if (mode === 'error') f.reply(m, undefined, { error: Errno.EIO });
          return mode !== 'ok';
        },
      },
    });
    const client = await connect(fake.path);
    const e1 = (await rejection(client.read(7, 0, 1))) as VfioUserError;
    expect(e1).toBeInstanceOf(VfioUserError);
    expect(e1.errno).toBe(Errno.EIO);
    expect(e1.command).toBe(Command.REGION_READ);
    mode = 'silent';
    const e2 = (await rejection(client.read(7, 0, 1, { timeoutMs: 50 }))) as VfioUserError;
    expect(e2.errno).toBe(Errno.ETIMEDOUT);
    mode = 'ok';
    expect((await client.read(7, 0, 1))[0]).toBe(0x4f);
  });
});

describe('region access', () => {
  it('splits reads and writes by the negotiated max_data_xfer_size and pipelines them', async () => {
    const fake = fakeServer({
      versionJson: '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":4096}}',
      config: memBarConfig(),
      regions: memBarRegions(),
    });
    const client = await connect(fake.path);
    expect(client.negotiated.maxDataXferSize).toBe(4096);
    const data = Buffer.alloc(10000);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    await client.write(0, 100, data, { posted: false });
    const writes = fake.received.filter((m) => m.command === Command.REGION_WRITE);
    expect(writes.map((m) => [Number(m.payload.readBigUInt64LE(0)), m.payload.readUInt32LE(12)])).toEqual([
      [100, 4096],
      [4196, 4096],
      [8292, 1808],
    ]);
    expect(writes.every((m) => (m.flags & HeaderFlags.NO_REPLY) === 0)).toBe(true);
    const back = await client.read(0, 100, 10000);
    expect(back.equals(data)).toBe(true);
    expect(fake.received.filter((m) => m.command === Command.REGION_READ && m.payload.readUInt32LE(8) === 0).map((m) => m.payload.readUInt32LE(12))).toEqual([
      4096, 4096, 1808,
    ]);
  });

  it('posts writes to memory BARs only (never config space or I/O BARs), in writeChunkSize pieces', async () => {
    const fake = fakeServer({ config: memBarConfig(), regions: memBarRegions() });
    const client = await connect(fake.path, { writeChunkSize: 1024 });
    expect(client.postedWrites).toBe(true);
    await client.write(0, 0, Buffer.alloc(2500, 1));
    await client.write(2, 0, Buffer.alloc(4, 2));
    await client.write(7, 0x40, Buffer.alloc(4, 3));
    await client.flush();
    const w = fake.received.filter((m) => m.command === Command.REGION_WRITE);
    expect(w.map((m) => [m.payload.readUInt32LE(8), m.payload.readUInt32LE(12), (m.flags & HeaderFlags.NO_REPLY) !== 0])).toEqual([
      [0, 1024, true],
      [0, 1024, true],
      [0, 452, true],
      [2, 4, false],
      [7, 4, false],
    ]);
    // posted: false waits for the reply even on a memory BAR.
    await client.write(0, 0, Buffer.alloc(4), { posted: false });
    expect((fake.received.at(-1)!.flags & HeaderFlags.NO_REPLY) === 0).toBe(true);
  });

  it('does not post when postedWrites is off', async () => {
    const fake = fakeServer({ config: memBarConfig(), regions: memBarRegions() });
    const client = await connect(fake.path, { postedWrites: false });
    expect(client.postedWrites).toBe(false);
    await client.writeUint(0, 0, 4, 0x12345678);
    expect(fake.received.at(-1)!.flags & HeaderFlags.NO_REPLY).toBe(0);
  });

  it('reads and writes our server, posted writes included, and accepts count-0 accesses', async () => {
    const device = new TestDevice();
    const s = await startServer(device);
    defer(s.stop);
    const client = await connect(s.socketPath);
    await client.writeUint(0, 8, 4, 0xdeadbeef);
    await client.writeUint64(0, 16, 0x0123456789abcdefn);
    await client.flush();
    expect(device.bar0.readUInt32LE(8)).toBe(0xdeadbeef);
    expect(await client.readUint(0, 8, 4)).toBe(0xdeadbeef);
    expect(await client.readUint64(0, 16)).toBe(0x0123456789abcdefn);
    expect(await client.readUint(7, 0, 2)).toBe(0x1234);
    expect((await client.read(0, 0, 0)).length).toBe(0);
    await client.write(0, 0, Buffer.alloc(0));
  });

  it('accepts libvfio-user\'s bare-header reply to a count-0 read', async () => {
    const fake = fakeServer();
    const client = await connect(fake.path);
    expect((await client.read(7, 0, 0)).length).toBe(0);
    const last = fake.received.at(-1)!;
    expect(last.command).toBe(Command.REGION_READ);
    expect(last.payload.readUInt32LE(12)).toBe(0);
  });

  it('coalesces small posted writes into REGION_WRITE_MULTI while congested, keeping their order', async () => {
    const bar = Buffer.alloc(0x10000);
    const order: number[] = [];
    const apply = (offset: number, data: Buffer) => {
      data.copy(bar, offset);
      order.push(data.readUInt32LE(0));
    };
    const fake = fakeServer({
      versionJson: '{"capabilities":{"max_msg_fds":8,"write_multiple":true}}',
      config: memBarConfig(),
      regions: memBarRegions(),
      overrides: {
        [Command.REGION_WRITE]: (m) => {
          if (m.payload.readUInt32LE(8) !== 0) return false;
          apply(Number(m.payload.readBigUInt64LE(0)), m.payload.subarray(16));
          return true;
        },
        [Command.REGION_WRITE_MULTI]: (m) => {
          for (const w of decodeRegionWriteMultiRequest(m.payload).wrs) apply(Number(w.offset), Buffer.from(w.data));
          return true;
        },
      },
    });
    const client = await connect(fake.path, { congestionThreshold: 16 * 1024 });
    expect(client.negotiated.writeMultiple).toBe(true);
    fake.pause();
    const n = 20000;
    const v = Buffer.alloc(4);
    for (let i = 0; i < n; i++) {
      v.writeUInt32LE(i);
      void client.write(0, (i % 0x4000) * 4, v);
    }
    const barrier = client.read(7, 0, 4);
    fake.resume();
    await barrier;
    expect(order).toEqual(Array.from({ length: n }, (_, i) => i));
    const multi = fake.received.filter((m) => m.command === Command.REGION_WRITE_MULTI);
    expect(multi.length).toBeGreaterThan(0);
    expect(multi.every((m) => (m.flags & HeaderFlags.NO_REPLY) !== 0)).toBe(true);
    expect(Math.max(...multi.map((m) => decodeRegionWriteMultiRequest(m.payload).wrCnt))).toBeLessThanOrEqual(200);
    for (let i = 0; i < 0x4000; i++) {
      const last = n - 1 - ((n - 1 - i) % 0x4000);
      expect(bar.readUInt32LE(i * 4)).toBe(last);
    }
  });

  it('floods our server with posted writes (WRITE_MULTI when congested) and ends consistent', async () => {
    const device = new TestDevice();
    const s = await startServer(device);
    defer(s.stop);
    const client = await connect(s.socketPath, { congestionThreshold: 8 * 1024 });
    expect(client.negotiated.writeMultiple).toBe(true);
    const n = 30000;
    const v = Buffer.alloc(4);
    for (let i = 0; i < n; i++) {
      v.writeUInt32LE(i);
      void client.write(0, (i % 1024) * 4, v);
    }
    await client.flush();
    for (let i = 0; i < 1024; i++) expect(device.bar0.readUInt32LE(i * 4)).toBe(n - 1 - ((n - 1 - i) % 1024));
  });
  it('round-trips any write through reads of any split (property)', async () => {
    const device = new TestDevice();
    const s = await startServer(device, { maxDataXferSize: 512 });
    defer(s.stop);
    const client = await connect(s.socketPath, { writeChunkSize: 300 });
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 0, max: 4095 }).chain((offset) =>
          fc.tuple(fc.constant(offset), fc.uint8Array({ minLength: 0, maxLength: 4096 - offset }), fc.boolean()),
        ),
        async ([offset, bytes, posted]) => {
          const data = Buffer.from(bytes);
          await client.write(0, offset, data, { posted });
          expect((await client.read(0, offset, data.length)).equals(data)).toBe(true);
          expect(device.bar0.subarray(offset, offset + data.length).equals(data)).toBe(true);
        },
      ),
      { numRuns: 60 },
    );
  });
});

describe('mappable regions', () => {
  it('maps sparse areas shared with the server and turns posted writes off', async () => {
    const device = new MmapDevice();
    const s = await startServer(device);
    defer(s.stop);
    const client = await connect(s.socketPath);
    const info = client.region(0);
    expect(info).toMatchObject({ size: 16384, mmapFlag: true, mappable: true, mmapUnavailable: null, areas: [{ offset: 0x1000, size: 0x2000 }] });
    expect(client.postedWrites).toBe(false);
    const mapped = client.mmapRegion(0);
    expect(client.mmapRegion(0)).toBe(mapped);
    expect(mapped.areas).toHaveLength(1);
    // Our store through the mapping is the device's memory, and what messages read.
    const view = mapped.view(0x1800, 8)!;
    view.writeUInt32LE(0xcafef00d, 0);
    expect(device.mapping.bytes.readUInt32LE(0x1800)).toBe(0xcafef00d);
    expect(await client.readUint(0, 0x1800, 4)).toBe(0xcafef00d);
    // The device's store is visible through the mapping.
    device.mapping.bytes.writeUInt32LE(0x11223344, 0x2ffc);
    expect(mapped.view(0x2ffc, 4)!.readUInt32LE(0)).toBe(0x11223344);
    // Outside the areas: messages only; writes wait for their reply (no posting).
    expect(mapped.view(0x0, 4)).toBeNull();
    expect(mapped.view(0x2ffc, 8)).toBeNull();
    await client.writeUint(2, 0, 4, 7);
    expect(device.bar2.readUInt32LE(0)).toBe(7);
    mapped.unmap();
    expect(view.length).toBe(0);
    expect(mapped.view(0x1800, 4)).toBeNull();
    // Mapping again works after an unmap.
    const again = client.mmapRegion(0);
    expect(again).not.toBe(mapped);
    expect(again.view(0x1800, 4)!.readUInt32LE(0)).toBe(0xcafef00d);
  });

  it('maps libvfio-user 2022\'s one-fd-per-area regions (peer-traces: BAR1 with 2 fds)', async () => {
    const files = [createMemfd('area0', 0x3000), createMemfd('area1', 0x3000)];
    defer(() => files.forEach((f) => f.close()));
    const regions = lvuRegions();
    regions[1] = {
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP,
      size: 0x3000,
      capabilities: [
        sparseMmapCap([
          { offset: 0x0n, size: 0x1000n },
          { offset: 0x2000n, size: 0x1000n },
        ]),
      ],
      fds: () => files.map((f) => f.value),
    };
    const fake = fakeServer({ regions });
    const client = await connect(fake.path);
    // Two-step exchange: 32, then the full argsz (32 + 16 + 2 * 16 = 80), as in the trace.
    const asks = fake.received.filter((m) => m.command === Command.DEVICE_GET_REGION_INFO && m.payload.readUInt32LE(8) === 1);
    expect(asks.map((m) => m.payload.readUInt32LE(0))).toEqual([32, 80]);
    const mapped = client.mmapRegion(1);
    mapped.view(0x0, 4)!.writeUInt32LE(0xaaaa);
    mapped.view(0x2000, 4)!.writeUInt32LE(0xbbbb);
    const { Mapping } = await import('../../lib/native/mapping');
    const m0 = Mapping.map(files[0]!, 0, 0x3000);
    const m1 = Mapping.map(files[1]!, 0, 0x3000);
    expect(m0.bytes.readUInt32LE(0)).toBe(0xaaaa);
    expect(m1.bytes.readUInt32LE(0x2000)).toBe(0xbbbb);
    m0.unmapNow();
    m1.unmapNow();
  });
});
