import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { binding } from '../../lib/native/binding';
import { SIZE_SEALS, createMemfd, isSealedAgainstShrinking } from '../../lib/native/memfd';
import { type ClientOptions } from '../../lib/client';
import { Command, DmaMapFlags, DmaUnmapFlags, Errno, HeaderFlags } from '../../lib/protocol/constants';
import { ProtocolError, VfioUserError } from '../../lib/protocol/errors';
import { useFdLeakCheck } from '../helpers/fds';
import { startServer, TestDevice } from '../helpers/server';
import { rejection, connect, fakeServer, defer, useCleanup, lvuHandler, type RawMessage } from './fixtures';

useFdLeakCheck();

useCleanup();

function dmaReq(address: bigint, count: bigint | number, data?: Buffer): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64LE(address, 0);
  b.writeBigUInt64LE(BigInt(count), 8);
  return data ? Buffer.concat([b, data]) : b;
}

const errnoOf = (m: RawMessage): number => ((m.flags & HeaderFlags.ERROR) !== 0 ? m.error : 0);

describe('server DMA commands: refusals', () => {
  async function setup(options: ClientOptions = {}) {
    const fake = fakeServer();
    const client = await connect(fake.path, options);
    const rw = await client.mapWithoutFd(Buffer.alloc(0x2000, 0x11), { iova: 0x10000 });
    const ro = await client.mapWithoutFd(Buffer.alloc(0x1000, 0x22), { iova: 0x20000, readOnly: true });
    return { fake, client, rw, ro };
  }

  it('answers EFAULT for addresses outside every range, including ranges that run past one', async () => {
    const { fake } = await setup();
    expect(errnoOf(await fake.command(Command.DMA_READ, dmaReq(0x0n, 4)))).toBe(Errno.EFAULT);
    expect(errnoOf(await fake.command(Command.DMA_READ, dmaReq(0x11ffen, 4)))).toBe(Errno.EFAULT);
    expect(errnoOf(await fake.command(Command.DMA_READ, dmaReq(0xffff_ffff_ffff_fff0n, 4)))).toBe(Errno.EFAULT);
    expect(errnoOf(await fake.command(Command.DMA_WRITE, dmaReq(0x30000n, 2, Buffer.alloc(2))))).toBe(Errno.EFAULT);
  });

  it('answers EPERM for a write to a read-only range', async () => {
    const { fake, ro } = await setup();
    expect(errnoOf(await fake.command(Command.DMA_WRITE, dmaReq(0x20000n, 2, Buffer.from([9, 9]))))).toBe(Errno.EPERM);
    expect(ro.bytes[0]).toBe(0x22);
  });

  it('answers E2BIG above our max_data_xfer_size, and EINVAL for malformed payloads or fds', async () => {
    const { fake, rw } = await setup({ maxDataXferSize: 4096 });
    expect(errnoOf(await fake.command(Command.DMA_READ, dmaReq(0x10000n, 4097)))).toBe(Errno.E2BIG);
    expect(errnoOf(await fake.command(Command.DMA_READ, dmaReq(0x10000n, 4).subarray(0, 10)))).toBe(Errno.EINVAL);
    // 16 + 2 bytes for count 8 fits neither the spec layout (24) nor QEMU's (20).
    expect(errnoOf(await fake.command(Command.DMA_WRITE, dmaReq(0x10000n, 8, Buffer.alloc(2))))).toBe(Errno.EINVAL);
    const fd = createMemfd('stray', 4096);
    const withFd = await fake.command(Command.DMA_WRITE, dmaReq(0x10000n, 1, Buffer.from([0x77])), [fd.value]);
    fd.close();
    expect(errnoOf(withFd)).toBe(Errno.EINVAL);
    expect(rw.bytes[0]).toBe(0x11);
  });

  it('answers ENOSYS to commands a server may not send', async () => {
    const { fake } = await setup();
    expect(errnoOf(await fake.command(Command.REGION_READ, Buffer.alloc(16)))).toBe(Errno.ENOSYS);
    expect(errnoOf(await fake.command(Command.VERSION, Buffer.alloc(4)))).toBe(Errno.ENOSYS);
  });

  it('stops serving a range once it is unmapped', async () => {
    const { fake, rw } = await setup();
    await rw.unmap();
    expect(errnoOf(await fake.command(Command.DMA_READ, dmaReq(0x10000n, 4)))).toBe(Errno.EFAULT);
  });
});

describe('DMA maps: refusals', () => {
  it('refuses overlaps, misalignment and bad sizes locally', async () => {
    const fake = fakeServer();
    const client = await connect(fake.path);
    const a = await client.allocateDma(0x2000, { iova: 0x100000 });
    await expect(client.allocateDma(0x1000, { iova: 0x101000 })).rejects.toThrow(/overlaps/);
    await expect(client.allocateDma(0x1000, { iova: 0x100800 })).rejects.toThrow(/multiple of the 4096/);
    await expect(client.allocateDma(0)).rejects.toThrow(RangeError);
    await expect(client.mapWithoutFd(Buffer.alloc(100))).rejects.toThrow(/multiple/);
    await expect(client.allocateDma(0x1000, { iova: -4096 })).rejects.toThrow(RangeError);
    await expect(client.allocateDma(0x1000, { iova: 1n << 60n })).rejects.toThrow(RangeError);
    expect(client.dmaMaps).toEqual([a]);
    // Nothing but the first map reached the server.
    expect(fake.received.filter((m) => m.command === Command.DMA_MAP)).toHaveLength(1);
  });

  it('releases the memory when the server refuses the map', async () => {
    const fake = fakeServer({ overrides: { [Command.DMA_MAP]: (m, f) => (f.reply(m, undefined, { error: Errno.ENOSPC }), true) } });
    const client = await connect(fake.path);
    const err = (await rejection(client.allocateDma(4096))) as VfioUserError;
    expect(err).toBeInstanceOf(VfioUserError);
    expect(err.errno).toBe(Errno.ENOSPC);
    expect(client.dmaMaps).toHaveLength(0);
  });

  it('rejects a DMA_MAP reply with a payload, and a DMA_UNMAP reply echoing another range', async () => {
    const fake = fakeServer({
      overrides: {
        [Command.DMA_MAP]: (m, f) => (f.reply(m, Buffer.alloc(8)), true),
        [Command.DMA_UNMAP]: (m, f) => {
          const echo = Buffer.from(m.payload);
          echo.writeBigUInt64LE(0x999000n, 8);
          f.reply(m, echo);
          return true;
        },
      },
    });
    const client = await connect(fake.path);
    expect(await rejection(client.allocateDma(4096))).toBeInstanceOf(ProtocolError);
    fake.handler = lvuHandler({
      overrides: {
        [Command.DMA_UNMAP]: (m, f) => {
          const echo = Buffer.from(m.payload);
          echo.writeBigUInt64LE(0x999000n, 8);
          f.reply(m, echo);
          return true;
        },
      },
    });
    const mem = await client.allocateDma(4096);
    const err = await rejection(mem.unmap());
    expect(err).toBeInstanceOf(ProtocolError);
    expect(mem.mapped).toBe(false);
  });

  it('reports libvfio-user\'s ENOENT for an unknown range but still releases it locally', async () => {
    const fake = fakeServer({ overrides: { [Command.DMA_UNMAP]: (m, f) => (f.reply(m, undefined, { error: Errno.ENOENT }), true) } });
    const client = await connect(fake.path);
    const mem = await client.allocateDma(4096);
    const view = mem.bytes;
    const err = (await rejection(mem.unmap())) as VfioUserError;
    expect(err.errno).toBe(Errno.ENOENT);
    expect(err.command).toBe(Command.DMA_UNMAP);
    expect(mem.mapped).toBe(false);
    expect(view.length).toBe(0);
    expect(client.dmaMaps).toHaveLength(0);
    // Idempotent: the same outcome again, no second message.
    expect(await rejection(mem.unmap())).toBe(err);
    expect(fake.received.filter((m) => m.command === Command.DMA_UNMAP)).toHaveLength(1);
  });
});

describe('DMA maps', () => {
  it('shares memfd-backed memory with our server both ways, and unmaps it', async () => {
    const device = new TestDevice();
    const s = await startServer(device);
    defer(s.stop);
    const client = await connect(s.socketPath);
    const mem = await client.allocateDma(10000, { iova: 0x200000 });
    expect(mem).toMatchObject({ iova: 0x200000, size: 12288, shared: true, writable: true });
    expect(mem.iovaOf(0x10)).toBe(0x200010);
    const dma = s.server.dma;
    expect(dma.count).toBe(1);
    expect(dma.isShared(0x200000, 12288)).toBe(true);
    // The device writes: we see it at once, no message involved.
    dma.view(0x200100, 4, true).writeUInt32LE(0xfeedface);
    expect(mem.bytes.readUInt32LE(0x100)).toBe(0xfeedface);
    // We write: the device sees it.
    mem.bytes.write('hello', 0x2000);
    expect(dma.view(0x202000, 5, false).toString()).toBe('hello');
    await mem.unmap();
    expect(dma.count).toBe(0);
    expect(mem.mapped).toBe(false);
    expect(() => mem.bytes).toThrow();
  });

  it('places maps without an iova at free page-aligned addresses', async () => {
    const s = await startServer(new TestDevice());
    defer(s.stop);
    const client = await connect(s.socketPath);
    const a = await client.allocateDma(4096);
    const b = await client.allocateDma(8192);
    const c = await client.mapWithoutFd(Buffer.alloc(4096));
    expect([a.iova, b.iova, c.iova]).toEqual([0x100000, 0x101000, 0x103000]);
    await b.unmap();
    const d = await client.allocateDma(4096);
    expect(d.iova).toBe(0x101000);
    expect(s.server.dma.list().map((r) => r.iova)).toEqual([0x100000, 0x101000, 0x103000]);
  });

  it('seals the memfds it creates against shrinking and growing', async () => {
    const fake = fakeServer();
    const client = await connect(fake.path);
    const mem = await client.allocateDma(0x3000);
    const fd = fake.received.find((m) => m.command === Command.DMA_MAP)!.fds[0]!;
    expect(binding.getSeals(fd) & SIZE_SEALS).toBe(SIZE_SEALS);
    expect(isSealedAgainstShrinking(fd)).toBe(true);
    expect(fs.fstatSync(fd).size).toBe(0x3000);
    expect(() => fs.ftruncateSync(fd, 0x1000)).toThrow(/EPERM/);
    expect(() => fs.ftruncateSync(fd, 0x4000)).toThrow(/EPERM/);
    // Still writable memory.
    mem.bytes[0] = 1;
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, 0);
    expect(b[0]).toBe(1);
  });

  it('grants read-only memory without WRITE', async () => {
    const fake = fakeServer();
    const client = await connect(fake.path);
    await client.allocateDma(4096, { readOnly: true, iova: 0x7000 });
    const map = fake.received.find((m) => m.command === Command.DMA_MAP)!;
    expect(map.payload.readUInt32LE(4)).toBe(DmaMapFlags.READ);
    expect(map.fds).toHaveLength(1);
    expect(map.payload.readBigUInt64LE(16)).toBe(0x7000n);
  });

  it('serves our server\'s DMA_READ/DMA_WRITE for memory mapped without an fd, split by the limit', async () => {
    const s = await startServer(new TestDevice(), { maxDataXferSize: 4096 });
    defer(s.stop);
    const client = await connect(s.socketPath, { maxDataXferSize: 4096 });
    const buffer = Buffer.alloc(0x4000);
    const mem = await client.mapWithoutFd(buffer, { iova: 0x300000 });
    expect(mem.shared).toBe(false);
    const dma = s.server.dma;
    expect(dma.isShared(0x300000, 16)).toBe(false);
    const src = Buffer.alloc(10000);
    for (let i = 0; i < src.length; i++) src[i] = (i * 13) & 0xff;
    await dma.write(0x300010, src);
    expect(buffer.subarray(0x10, 0x10 + 10000).equals(src)).toBe(true);
    buffer.fill(0x5c, 0x3000, 0x4000);
    const dst = Buffer.alloc(0x1000);
    await dma.read(0x303000, dst);
    expect(dst.every((b) => b === 0x5c)).toBe(true);
    await mem.unmap();
  });

  it('answers libvfio-user-style DMA commands (ids from 1) with spec-layout replies', async () => {
    const fake = fakeServer();
    const client = await connect(fake.path);
    const buffer = Buffer.alloc(0x1000);
    await client.mapWithoutFd(buffer, { iova: 0xa000 });
    const w = await fake.command(Command.DMA_WRITE, dmaReq(0xa008n, 3, Buffer.from([1, 2, 3])));
    expect(w.msgId).toBe(1);
    expect(errnoOf(w)).toBe(0);
    // libvfio-user checks the 16-byte echo of address and count.
    expect(w.payload).toEqual(dmaReq(0xa008n, 3));
    expect(buffer.subarray(8, 11)).toEqual(Buffer.from([1, 2, 3]));
    const r = await fake.command(Command.DMA_READ, dmaReq(0xa008n, 3));
    expect(r.msgId).toBe(2);
    expect(r.payload).toEqual(Buffer.concat([dmaReq(0xa008n, 3), Buffer.from([1, 2, 3])]));
    // QEMU's layout (u32 count, data at 12) is understood; the reply is the spec's.
    const q = Buffer.alloc(12);
    q.writeBigUInt64LE(0xa009n, 0);
    q.writeUInt32LE(2, 8);
    const r2 = await fake.command(Command.DMA_READ, q);
    expect(r2.payload).toEqual(Buffer.concat([dmaReq(0xa009n, 2), Buffer.from([2, 3])]));
    // A zero-count read is fine.
    expect((await fake.command(Command.DMA_READ, dmaReq(0xa000n, 0))).payload).toEqual(dmaReq(0xa000n, 0));
  });

  it('serves DMA while waiting for its own reply (single socket, interleaved)', async () => {
    const fake = fakeServer({
      overrides: {
        [Command.REGION_READ]: (m, f) => {
          if (m.payload.readUInt32LE(12) !== 2) return false;
          // Like libvfio-user: a DMA_READ goes out before the reply to the client's command.
          void f.command(Command.DMA_READ, dmaReq(0xb000n, 2)).then((r) => {
            f.reply(m, Buffer.concat([m.payload, r.payload.subarray(16, 18)]));
          });
          return true;
        },
      },
    });
    const client = await connect(fake.path);
    await client.mapWithoutFd(Buffer.from(Buffer.alloc(0x1000, 0xab)), { iova: 0xb000 });
    expect(await client.read(7, 0, 2)).toEqual(Buffer.from([0xab, 0xab]));
  });
});

describe('DMA with caller-provided memory', () => {
  it('grants a memfd at an offset: the server maps the same pages, the fd stays ours', async () => {
    const s = await startServer(new TestDevice());
    defer(s.stop);
    const client = await connect(s.socketPath);
    const fd = createMemfd('guest-ram', 0x10000);
    defer(() => fd.close());
    fs.writeSync(fd.value, Buffer.from('at 0x4000'), 0, 9, 0x4000);
    const mem = await client.mapFd(fd, 0x2000, { fileOffset: 0x4000, iova: 0x40_0000 });
    expect(mem).toMatchObject({ iova: 0x40_0000, size: 0x2000, shared: true, writable: true, fileOffset: 0x4000n });
    const dma = s.server.dma;
    expect(dma.isShared(0x40_0000, 0x2000)).toBe(true);
    expect(dma.view(0x40_0000, 9, false).toString()).toBe('at 0x4000');
    dma.view(0x40_1000, 4, true).writeUInt32LE(0xc0ffee);
    expect(mem.bytes.readUInt32LE(0x1000)).toBe(0xc0ffee);
    const back = Buffer.alloc(4);
    fs.readSync(fd.value, back, 0, 4, 0x5000);
    expect(back.readUInt32LE(0)).toBe(0xc0ffee);
    await mem.unmap();
    expect(dma.count).toBe(0);
    // Still open and still ours.
    expect(fs.fstatSync(fd.value).size).toBe(0x10000);
  });

  it('grants a /dev/shm file read-only (opened read-only): the device reads it, may not write it', async () => {
    const s = await startServer(new TestDevice());
    defer(s.stop);
    const client = await connect(s.socketPath);
    const file = path.join('/dev/shm', `vfio-user-test-rom-${process.pid}-${Date.now()}`);
    fs.writeFileSync(file, Buffer.alloc(0x3000, 0xee));
    defer(() => fs.rmSync(file, { force: true }));
    const fd = fs.openSync(file, 'r');
    defer(() => fs.closeSync(fd));
    const rom = await client.mapFd(fd, 0x1000, { fileOffset: 0x2000, iova: 0xf_0000, readOnly: true });
    expect(rom.writable).toBe(false);
    const map = s.server.dma.list()[0]!;
    expect(map.flags).toBe(DmaMapFlags.READ);
    expect(s.server.dma.view(0xf_0000, 2, false)).toEqual(Buffer.from([0xee, 0xee]));
    expect(() => s.server.dma.view(0xf_0000, 2, true)).toThrow();
    expect(rom.bytes[0]).toBe(0xee);
  });

  it('sends DMA_MAP with the fd and the file offset; refuses bad sizes and offsets locally', async () => {
    const fake = fakeServer();
    const client = await connect(fake.path);
    const fd = createMemfd('guest-ram', 0x4000);
    defer(() => fd.close());
    await client.mapFd(fd.value, 0x1000, { fileOffset: 0x3000, iova: 0x9000, readOnly: true });
    const map = fake.received.find((m) => m.command === Command.DMA_MAP)!;
    expect(map.fds).toHaveLength(1);
    expect(map.payload.readUInt32LE(4)).toBe(DmaMapFlags.READ);
    expect(map.payload.readBigUInt64LE(8)).toBe(0x3000n);
    expect(map.payload.readBigUInt64LE(16)).toBe(0x9000n);
    expect(map.payload.readBigUInt64LE(24)).toBe(0x1000n);
    await expect(client.mapFd(fd, 100)).rejects.toThrow(/multiple/);
    await expect(client.mapFd(fd, 0x1000, { fileOffset: 0x800 })).rejects.toThrow(/fileOffset/);
    await expect(client.mapFd(fd, 0x2000, { fileOffset: 0x3000 })).rejects.toThrow(/past the end/);
    await expect(client.mapFd(-1, 0x1000)).rejects.toThrow(TypeError);
    expect(fake.received.filter((m) => m.command === Command.DMA_MAP)).toHaveLength(1);
  });

  it('withdraws every range with one DMA_UNMAP ALL', async () => {
    const s = await startServer(new TestDevice());
    defer(s.stop);
    const client = await connect(s.socketPath);
    const fd = createMemfd('guest-ram', 0x4000);
    defer(() => fd.close());
    const a = await client.allocateDma(0x1000);
    const b = await client.mapFd(fd, 0x4000);
    const c = await client.mapWithoutFd(Buffer.alloc(0x1000));
    const view = a.bytes;
    expect(s.server.dma.count).toBe(3);
    await client.unmapAllDma();
    expect(s.server.dma.count).toBe(0);
    expect([a, b, c].map((m) => m.mapped)).toEqual([false, false, false]);
    expect(client.dmaMaps).toEqual([]);
    expect(view.length).toBe(0);
    await a.unmap(); // nothing left to do
    // Ranges can be granted again.
    const d = await client.allocateDma(0x1000);
    expect(s.server.dma.count).toBe(1);
    await d.unmap();
  });

  it('sends ALL with address and size 0, and releases everything even when the server refuses', async () => {
    const fake = fakeServer({ overrides: { [Command.DMA_UNMAP]: (m, f) => (f.reply(m, undefined, { error: Errno.EINVAL }), true) } });
    const client = await connect(fake.path);
    const a = await client.allocateDma(0x1000);
    const err = (await rejection(client.unmapAllDma())) as VfioUserError;
    expect(err.errno).toBe(Errno.EINVAL);
    expect(a.mapped).toBe(false);
    expect(client.dmaMaps).toEqual([]);
    const unmap = fake.received.find((m) => m.command === Command.DMA_UNMAP)!;
    expect(unmap.payload.readUInt32LE(4)).toBe(DmaUnmapFlags.ALL);
    expect(unmap.payload.readBigUInt64LE(8)).toBe(0n);
    expect(unmap.payload.readBigUInt64LE(16)).toBe(0n);
  });
});
