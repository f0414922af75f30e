/**
 * DMA_UNMAP (reference §3.3, §6.4): negative cases first; then exact unmaps, ALL, and the quiesce
 * rule: the reply comes only after every device reference to the memory is gone and it is unmapped.
 */
import { describe, it, expect } from 'vitest';
import { Command, DmaMapFlags, DmaUnmapFlags, Errno } from '../../lib/protocol/constants';
import { regionAccess, TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { dmaErrno, dmaMap, dmaUnmap, guestMemory, mappingsOf, setup, sleep, tracked, useTeardown } from './support';
import type { RawClient } from '../helpers/server';

useFdLeakCheck();
useTeardown();

const RW = DmaMapFlags.READ | DmaMapFlags.WRITE;
const PAGE = 4096;

/** A server with fd-backed maps at 0x10000 (4 pages) and 0x20000 (2 pages) of one memfd. */
async function mapped(name: string): Promise<{ client: RawClient; device: TestDevice; bytes: Buffer }> {
  const { client, device } = await setup();
  const mem = guestMemory(name, 8 * PAGE);
  expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x10000, 4 * PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
  expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x20000, 2 * PAGE, 4 * PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
  return { client, device, bytes: mem.bytes };
}

describe('DMA_UNMAP: refused', () => {
  it('refuses a payload that is not 24 bytes', async () => {
    const { client, device } = await mapped('short');
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(0, 0x10000, 4 * PAGE).subarray(0, 23))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_UNMAP, Buffer.concat([dmaUnmap(0, 0x10000, 4 * PAGE), Buffer.alloc(8)]))).toBe(Errno.EINVAL);
    expect(device.ctx!.dma.count).toBe(2);
  });

  it('refuses argsz below the 24-byte reply', async () => {
    const { client, device } = await mapped('argsz');
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(0, 0x10000, 4 * PAGE, 23))).toBe(Errno.EINVAL);
    expect(device.ctx!.dma.count).toBe(2);
  });

  it('refuses unknown flags, the legacy dirty bitmap, and ALL with a range', async () => {
    const { client, device } = await mapped('flags');
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(0x4, 0x10000, 4 * PAGE))).toBe(Errno.EINVAL);
    const bitmap = Buffer.concat([dmaUnmap(DmaUnmapFlags.GET_DIRTY_BITMAP, 0x10000, 4 * PAGE, 48), Buffer.alloc(16)]);
    bitmap.writeBigUInt64LE(4096n, 24);
    bitmap.writeBigUInt64LE(8n, 32);
    expect(await client.msg(Command.DMA_UNMAP, bitmap)).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(DmaUnmapFlags.ALL, 0x10000, 4 * PAGE))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(DmaUnmapFlags.ALL, 0, PAGE))).toBe(Errno.EINVAL);
    expect(device.ctx!.dma.count).toBe(2);
  });

  it('refuses unknown, partial and spanning ranges with ENOENT', async () => {
    const { client, device } = await mapped('enoent');
    for (const [address, size] of [
      [0x30000, PAGE], // nothing there
      [0x10000, PAGE], // first page only
      [0x11000, 3 * PAGE], // the tail
      [0x10000, 8 * PAGE], // larger than the map
      [0x10000, 0x12000], // both maps and the gap
      [0, 0], // nothing
    ] as const) {
      expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(0, address, size)), `0x${address.toString(16)}+0x${size.toString(16)}`).toBe(Errno.ENOENT);
    }
    expect(device.ctx!.dma.count).toBe(2);
    expect(device.ctx!.dma.view(0x10000, 4 * PAGE, false).length).toBe(4 * PAGE);
  });

  it('refuses a second unmap of the same range', async () => {
    const { client } = await mapped('twice');
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(0, 0x20000, 2 * PAGE))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(0, 0x20000, 2 * PAGE))).toBe(Errno.ENOENT);
  });
});

describe('DMA_UNMAP: unmapping', () => {
  it('echoes the 24-byte request, argsz included, and removes exactly that map', async () => {
    const { client, device } = await mapped('exact');
    const request = dmaUnmap(0, 0x10000, 4 * PAGE, 4096);
    const reply = await client.msg(Command.DMA_UNMAP, request);
    expect(reply).toEqual(request);
    const dma = device.ctx!.dma;
    expect(dma.count).toBe(1);
    expect(await dmaErrno(() => dma.view(0x10000, 1, false))).toBe(Errno.ENOENT);
    expect(dma.view(0x20000, 1, false).length).toBe(1);
  });

  it('munmaps the memory before replying', async () => {
    const { client } = await mapped('munmap');
    // The client's own mapping, plus the server's two.
    expect(mappingsOf('munmap')).toBe(3);
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(0, 0x10000, 4 * PAGE))).toBeInstanceOf(Buffer);
    expect(mappingsOf('munmap')).toBe(2);
  });

  it('detaches views the device still holds', async () => {
    const { client, device } = await mapped('detach');
    const view = device.ctx!.dma.view(0x10000, PAGE, true);
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(0, 0x10000, 4 * PAGE))).toBeInstanceOf(Buffer);
    expect(view.length).toBe(0);
  });

  it('unmaps everything with ALL', async () => {
    const { client, device } = await mapped('all');
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x100000, PAGE))).toBeInstanceOf(Buffer); // no fd
    const request = dmaUnmap(DmaUnmapFlags.ALL, 0, 0);
    expect(await client.msg(Command.DMA_UNMAP, request)).toEqual(request);
    expect(device.ctx!.dma.count).toBe(0);
    expect(mappingsOf('all')).toBe(1);
    // And the space is free again.
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x10000, PAGE))).toBeInstanceOf(Buffer);
  });

  it('unmaps a map without an fd', async () => {
    const { client, device } = await setup();
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x100000, PAGE))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_UNMAP, dmaUnmap(0, 0x100000, PAGE))).toBeInstanceOf(Buffer);
    expect(await dmaErrno(() => device.ctx!.dma.read(0x100000, Buffer.alloc(1)))).toBe(Errno.ENOENT);
  });

  it('waits for the device to release an acquired range before replying', async () => {
    const { client, device } = await mapped('quiesce');
    const dma = device.ctx!.dma;
    const io = dma.acquire(0x10000 + PAGE, 16, true);
    const unmap = tracked(client.msg(Command.DMA_UNMAP, dmaUnmap(0, 0x10000, 4 * PAGE)));
    // A later command waits behind the unmap (in-order execution).
    const later = tracked(client.msg(Command.REGION_READ, regionAccess(7, 0, 4)));
    await sleep(50);
    expect(unmap.done()).toBe(false);
    expect(later.done()).toBe(false);
    // The range is already unreachable for new device I/O...
    expect(await dmaErrno(() => dma.view(0x10000, 1, false))).toBe(Errno.ENOENT);
    // ...but the held reference still works and the memory is still mapped.
    io.bytes.write('still mapped');
    expect(mappingsOf('quiesce')).toBe(3);
    io.release();
    expect(await unmap.promise).toBeInstanceOf(Buffer);
    expect(await later.promise).toBeInstanceOf(Buffer);
    expect(io.bytes.length).toBe(0);
    expect(mappingsOf('quiesce')).toBe(2);
  });

  it('waits for the device in an unmap ALL too', async () => {
    const { client, device } = await mapped('quiesce-all');
    const io = device.ctx!.dma.acquire(0x20000, 16, false);
    const unmap = tracked(client.msg(Command.DMA_UNMAP, dmaUnmap(DmaUnmapFlags.ALL, 0, 0)));
    await sleep(50);
    expect(unmap.done()).toBe(false);
    io.release();
    io.release(); // idempotent
    expect(await unmap.promise).toBeInstanceOf(Buffer);
    expect(mappingsOf('quiesce-all')).toBe(1);
  });
});
