/**
 * DMA_MAP (reference §3.2, §6.4) and the device's view of client memory through DmaSpace:
 * negative cases first, then zero-copy fd-backed maps and message-only maps (DMA_READ/DMA_WRITE).
 */
import { describe, it, expect } from 'vitest';
import { Command, DmaMapFlags, Errno } from '../../lib/protocol/constants';
import type { IncomingMessage, Connection } from '../../lib/transport/connection';
import { TestDevice } from '../helpers/server';
import { countOpenFds, useFdLeakCheck } from '../helpers/fds';
import { connect, defer, dmaErrno, dmaMap, guestMemory, mappingsOf, serve, setup, u64, useTeardown, versionPayload } from './support';

useFdLeakCheck();
useTeardown();

const RW = DmaMapFlags.READ | DmaMapFlags.WRITE;
const R = DmaMapFlags.READ;
const PAGE = 4096;

function dmaOf(device: TestDevice) {
  return device.ctx!.dma;
}

describe('DMA_MAP: refused', () => {
  it('refuses a payload that is not 32 bytes', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE).subarray(0, 31))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, Buffer.concat([dmaMap(RW, 0, PAGE), Buffer.alloc(1)]))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, null)).toBe(Errno.EINVAL);
  });

  it('refuses argsz other than 32', async () => {
    const { client, device } = await setup();
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE, 0, 24))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE, 0, 48))).toBe(Errno.EINVAL);
    expect(dmaOf(device).count).toBe(0);
  });

  it('refuses no permission, unknown flag bits, FILE_IO, and MMAP without an fd', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('flags', 4 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(0, 0, PAGE), [mem.fd.value])).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW | 0x100, 0, PAGE), [mem.fd.value])).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW | DmaMapFlags.FILE_IO, 0, PAGE), [mem.fd.value])).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW | DmaMapFlags.MMAP, 0, PAGE))).toBe(Errno.EINVAL);
    expect(dmaOf(device).count).toBe(0);
  });

  it('refuses unaligned addresses and sizes, and size 0', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('align', 4 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x1001, PAGE), [mem.fd.value])).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE + 1), [mem.fd.value])).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, 0), [mem.fd.value])).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x800, 0x800))).toBe(Errno.EINVAL);
    expect(dmaOf(device).count).toBe(0);
  });

  it('refuses ranges that wrap or leave the addressable space', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0xffff_ffff_ffff_f000n, 2 * PAGE))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x0020_0000_0000_0000n, PAGE))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, 0xffff_ffff_ffff_f000n))).toBe(Errno.EINVAL);
  });

  it('refuses a map larger than its file, and leaks neither the fd nor a mapping', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('small', 4 * PAGE);
    const before = mappingsOf('small');
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, 8 * PAGE), [mem.fd.value])).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, 4 * PAGE, PAGE), [mem.fd.value])).toBe(Errno.EINVAL);
    expect(mappingsOf('small')).toBe(before);
    expect(dmaOf(device).count).toBe(0);
  });

  it('refuses a map with two fds (and closes both)', async () => {
    const { client, device } = await setup();
    const a = guestMemory('two-a', PAGE);
    const b = guestMemory('two-b', PAGE);
    const fds = countOpenFds();
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE), [a.fd.value, b.fd.value])).toBe(Errno.EINVAL);
    expect(countOpenFds()).toBe(fds);
    expect(dmaOf(device).count).toBe(0);
  });

  it('refuses overlaps with EEXIST, closing the new fd', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('overlap', 64 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x10000, 0x10000), [mem.fd.value])).toBeInstanceOf(Buffer);
    const fds = countOpenFds();
    for (const [address, size] of [
      [0x18000, 0x10000], // tail
      [0x8000, 0x10000], // head
      [0x0, 0x40000], // around
      [0x14000, 0x1000], // inside
      [0x1f000, 0x1000], // last page
    ] as const) {
      expect(await client.msg(Command.DMA_MAP, dmaMap(RW, address, size), [mem.fd.value]), `0x${address.toString(16)}`).toBe(Errno.EEXIST);
      expect(await client.msg(Command.DMA_MAP, dmaMap(RW, address, size)), `0x${address.toString(16)} without fd`).toBe(Errno.EEXIST);
    }
    expect(countOpenFds()).toBe(fds);
    // Neighbours that only touch it are fine.
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x20000, 0x1000), [mem.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0xf000, 0x1000), [mem.fd.value])).toBeInstanceOf(Buffer);
    expect(dmaOf(device).count).toBe(3);
  });

  it('refuses a same-range map that differs in offset, file or permissions', async () => {
    const { client } = await setup();
    const mem = guestMemory('differs', 4 * PAGE);
    const other = guestMemory('differs-2', 4 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE, PAGE), [mem.fd.value])).toBe(Errno.EEXIST);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE), [other.fd.value])).toBe(Errno.EEXIST);
    expect(await client.msg(Command.DMA_MAP, dmaMap(R, 0, PAGE), [mem.fd.value])).toBe(Errno.EEXIST);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE))).toBe(Errno.EEXIST);
  });

  it('enforces max_dma_maps (ENOSPC) and accepts again after an unmap', async () => {
    const { client, device } = await setup(undefined, { maxDmaMaps: 2 });
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, PAGE, PAGE))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 2 * PAGE, PAGE))).toBe(Errno.ENOSPC);
    expect(dmaOf(device).count).toBe(2);
    const unmap = Buffer.concat([Buffer.from([24, 0, 0, 0, 0, 0, 0, 0]), u64(0), u64(PAGE)]);
    expect(await client.msg(Command.DMA_UNMAP, unmap)).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 2 * PAGE, PAGE))).toBeInstanceOf(Buffer);
  });
});

describe('DMA_MAP: fd-backed maps are zero-copy', () => {
  it('replies with a bare header', async () => {
    const { client } = await setup();
    const mem = guestMemory('bare', PAGE);
    const reply = (await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE), [mem.fd.value])) as Buffer;
    expect(reply.length).toBe(0);
  });

  it('shows the device the bytes the client writes, and the client what the device writes', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('zero-copy', 16 * PAGE);
    const iova = 0x1_0000_0000; // above 4 GiB
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, iova, 16 * PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    const dma = dmaOf(device);
    // Written by the client after the map: the device's view must show it (no copy at map time).
    mem.bytes.write('written by the client', 3 * PAGE + 7);
    expect(dma.view(iova + 3 * PAGE + 7, 21, false).toString()).toBe('written by the client');
    // And the other way round, through a writable view.
    dma.view(iova + 15 * PAGE, 6, true).write('device');
    expect(mem.bytes.subarray(15 * PAGE, 15 * PAGE + 6).toString()).toBe('device');
    // A view is the same memory, not a copy taken when view() was called.
    const v = dma.view(iova, 4, false);
    mem.bytes.writeUInt32LE(0xdeadbeef, 0);
    expect(v.readUInt32LE(0)).toBe(0xdeadbeef);
  });

  it('maps at the file offset the client names', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('offset', 8 * PAGE);
    mem.bytes.write('page five', 5 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x200000, 2 * PAGE, 4 * PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    expect(dmaOf(device).view(0x200000 + PAGE, 9, false).toString()).toBe('page five');
  });

  it("accepts libvfio-user's MMAP flag with an fd", async () => {
    const { client, device } = await setup();
    const mem = guestMemory('mmap-flag', PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW | DmaMapFlags.MMAP, 0, PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    expect(dmaOf(device).isShared(0, PAGE)).toBe(true);
  });

  it('accepts an identical re-map as a no-op and closes the new fd', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('remap', 4 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, 4 * PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    const fds = countOpenFds();
    const maps = mappingsOf('remap');
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, 4 * PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    expect(countOpenFds()).toBe(fds);
    expect(mappingsOf('remap')).toBe(maps);
    expect(dmaOf(device).count).toBe(1);
    // The same holds for message-only maps.
    expect(await client.msg(Command.DMA_MAP, dmaMap(R, 0x100000, PAGE))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(R, 0x100000, PAGE))).toBeInstanceOf(Buffer);
    expect(dmaOf(device).count).toBe(2);
  });

  it('does not let the device write a read-only map (EPERM)', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('ro', PAGE);
    mem.bytes.write('rom');
    expect(await client.msg(Command.DMA_MAP, dmaMap(R, 0xf0000, PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    const dma = dmaOf(device);
    expect(dma.view(0xf0000, 3, false).toString()).toBe('rom');
    expect(await dmaErrno(() => dma.view(0xf0000, 3, true))).toBe(Errno.EPERM);
    expect(await dmaErrno(() => dma.acquire(0xf0000, 3, true))).toBe(Errno.EPERM);
    expect(await dmaErrno(() => dma.write(0xf0000, Buffer.from('x')))).toBe(Errno.EPERM);
    expect(mem.bytes.subarray(0, 3).toString()).toBe('rom');
  });

  it('fails DMA outside every map with ENOENT, also for a range running past a map', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('outside', 2 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x10000, 2 * PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    const dma = dmaOf(device);
    expect(await dmaErrno(() => dma.view(0x0, 4, false))).toBe(Errno.ENOENT);
    expect(await dmaErrno(() => dma.view(0x12000, 4, false))).toBe(Errno.ENOENT);
    expect(await dmaErrno(() => dma.view(0x11ffe, 4, false))).toBe(Errno.ENOENT);
    expect(await dmaErrno(() => dma.read(0x11000, Buffer.alloc(2 * PAGE)))).toBe(Errno.ENOENT);
    expect(await dmaErrno(() => dma.write(0x9000, Buffer.alloc(1)))).toBe(Errno.ENOENT);
  });

  it('refuses all DMA while bus mastering is off (EPERM)', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('master', PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    const dma = dmaOf(device);
    dma.enabled = false;
    defer(() => (dma.enabled = true));
    expect(await dmaErrno(() => dma.view(0, 4, false))).toBe(Errno.EPERM);
  });
});

/** Serve DMA_READ/DMA_WRITE on the client's connection from `memory` at `base`; log the requests. */
function serveDma(conn: Connection, memory: Buffer, base: number) {
  const log: string[] = [];
  conn.onRequest = (msg: IncomingMessage, c: Connection) => {
    const p = msg.payload;
    const address = Number(p.readBigUInt64LE(0));
    const count = Number(p.readBigUInt64LE(8));
    log.push(`${msg.command === Command.DMA_READ ? 'read' : 'write'} 0x${address.toString(16)} ${count}`);
    const at = address - base;
    if (at < 0 || at + count > memory.length) {
      c.replyError(msg, Errno.EFAULT);
    } else if (msg.command === Command.DMA_READ && p.length === 16) {
      c.reply(msg, [p.subarray(0, 16), memory.subarray(at, at + count)]);
    } else if (msg.command === Command.DMA_WRITE && p.length === 16 + count) {
      p.copy(memory, at, 16);
      c.reply(msg, p.subarray(0, 16));
    } else {
      c.replyError(msg, Errno.EINVAL);
    }
  };
  return log;
}

describe('DMA_MAP: maps without an fd go through DMA_READ / DMA_WRITE', () => {
  it('is not a shared view (ENOENT) but reads and writes by messages', async () => {
    const { client, device } = await setup();
    const memory = Buffer.alloc(4 * PAGE);
    memory.write('client memory', 100);
    const log = serveDma(client.conn, memory, 0x40000);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x40000, 4 * PAGE))).toBeInstanceOf(Buffer);
    const dma = dmaOf(device);
    expect(dma.isShared(0x40000, 1)).toBe(false);
    expect(await dmaErrno(() => dma.view(0x40000, 1, false))).toBe(Errno.ENOENT);

    const dst = Buffer.alloc(13);
    await dma.read(0x40000 + 100, dst);
    expect(dst.toString()).toBe('client memory');
    await dma.write(0x40000 + 2 * PAGE, Buffer.from('from the device'));
    expect(memory.subarray(2 * PAGE, 2 * PAGE + 15).toString()).toBe('from the device');
    expect(log).toEqual(['read 0x40064 13', 'write 0x42000 15']);
  });

  it("splits transfers at the client's max_data_xfer_size and at map boundaries", async () => {
    const { socketPath, device } = await serve();
    const client = await connect(socketPath, false);
    const v = await client.msg(Command.VERSION, versionPayload(0, 0, '{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":4096}}'));
    expect(v).toBeInstanceOf(Buffer);
    const shared = guestMemory('split', 2 * PAGE);
    const memory = Buffer.alloc(4 * PAGE);
    for (let i = 0; i < memory.length; i++) memory[i] = i & 0xff;
    shared.bytes.fill(0xaa);
    const log = serveDma(client.conn, memory, 0x10000);
    // [0x0e000, 0x10000) shared by fd, [0x10000, 0x14000) by messages.
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0xe000, 2 * PAGE), [shared.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x10000, 4 * PAGE))).toBeInstanceOf(Buffer);

    const dst = Buffer.alloc(PAGE + 10000);
    await dmaOf(device).read(0xf000, dst);
    expect(dst.subarray(0, PAGE).every((b) => b === 0xaa)).toBe(true);
    expect(dst.subarray(PAGE).equals(memory.subarray(0, 10000))).toBe(true);
    expect(log).toEqual(['read 0x10000 4096', 'read 0x11000 4096', 'read 0x12000 1808']);
  });

  it('fails a write to a read-only message map with EPERM without sending anything', async () => {
    const { client, device } = await setup();
    const log = serveDma(client.conn, Buffer.alloc(PAGE), 0);
    expect(await client.msg(Command.DMA_MAP, dmaMap(R, 0, PAGE))).toBeInstanceOf(Buffer);
    expect(await dmaErrno(() => dmaOf(device).write(0, Buffer.from('x')))).toBe(Errno.EPERM);
    expect(log).toEqual([]);
  });

  it("passes the client's error reply on to the device", async () => {
    const { client, device } = await setup();
    serveDma(client.conn, Buffer.alloc(PAGE), 0x1000); // answers EFAULT below 0x1000
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE))).toBeInstanceOf(Buffer);
    expect(await dmaErrno(() => dmaOf(device).read(0, Buffer.alloc(4)))).toBe(Errno.EFAULT);
    expect(await dmaErrno(() => dmaOf(device).write(0, Buffer.alloc(4)))).toBe(Errno.EFAULT);
  });

  it('refuses DMA_READ replies that do not match the request (EIO)', async () => {
    const { client, device } = await setup();
    let reply: (p: Buffer) => Buffer[] = (p) => [p.subarray(0, 16), Buffer.alloc(2)]; // count says 4
    client.conn.onRequest = (msg, c) => c.reply(msg, reply(msg.payload));
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE))).toBeInstanceOf(Buffer);
    expect(await dmaErrno(() => dmaOf(device).read(0, Buffer.alloc(4)))).toBe(Errno.EIO);
    reply = () => [u64(8), u64(4), Buffer.alloc(4)]; // another address
    expect(await dmaErrno(() => dmaOf(device).read(0, Buffer.alloc(4)))).toBe(Errno.EIO);
    reply = (p) => [p.subarray(0, 8), u64(2), Buffer.alloc(2)]; // fewer bytes
    expect(await dmaErrno(() => dmaOf(device).read(0, Buffer.alloc(4)))).toBe(Errno.EIO);
  });

  it('closes fds the client attaches to a DMA_READ reply', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('stray', PAGE);
    client.conn.onRequest = (msg, c) => c.reply(msg, [msg.payload.subarray(0, 16), Buffer.alloc(4)], [mem.fd.value]);
    client.conn.maxSendFds = 1;
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE))).toBeInstanceOf(Buffer);
    const fds = countOpenFds();
    await dmaOf(device).read(0, Buffer.alloc(4));
    expect(countOpenFds()).toBe(fds);
  });
});
