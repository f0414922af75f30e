/**
 * DMA_MAP from a client that behaves like a big production guest or like an attacker: maps larger
 * than 4 GiB (QEMU sends one per RAM block), file offsets and fds the spec does not allow, and
 * memory the client truncates after mapping it. None of it may end the process.
 */
import * as fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { binding } from '../../lib/native/binding';
import { createMemfd } from '../../lib/native/memfd';
import { Mapping } from '../../lib/native/mapping';
import { Command, DmaMapFlags, Errno } from '../../lib/protocol/constants';
import type { DmaRegion } from '../../lib/server/dma';

import { countOpenFds, useFdLeakCheck } from '../helpers/fds';
import { defer, dmaErrno, dmaMap, setup, useTeardown } from './support';
import { rawClient, regionAccess, type TestDevice } from '../helpers/server';

useFdLeakCheck();
useTeardown();

const RW = DmaMapFlags.READ | DmaMapFlags.WRITE;
const PAGE = 4096;
const GiB = 2 ** 30;

function dmaOf(device: TestDevice) {
  return device.ctx!.dma;
}

/** A sparse memfd of `size` bytes, closed at teardown. */
function sparse(name: string, size: number) {
  const fd = createMemfd(name, size);
  defer(() => fd.close());
  return fd;
}

describe('DMA_MAP: sizes real guests use', () => {
  it('maps 64 GiB in one DMA_MAP and reaches every part of it without a copy', async () => {
    const { client, device } = await setup();
    const fd = sparse('big', 64 * GiB);
    const iova = 4 * GiB; // RAM above the 4 GiB line, as QEMU maps it
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, iova, 64 * GiB), [fd.value])).toBeInstanceOf(Buffer);
    const dma = dmaOf(device);
    const probe = Mapping.map(fd, 0, 64 * GiB);
    defer(() => probe.unmapNow());
    for (const at of [0, 4 * GiB - 2, 37 * GiB + 5, 64 * GiB - 8]) {
      dma.view(iova + at, 8, true).write('abcdefgh', 'latin1');
      expect(probe.view(at, 8).toString('latin1')).toBe('abcdefgh');
    }
    // Copies and scatter lists split at window boundaries on their own.
    const big = Buffer.alloc(3 * PAGE, 0x5a);
    await dma.write(iova + 2 * GiB - PAGE, big);
    const back = Buffer.alloc(3 * PAGE);
    await dma.read(iova + 2 * GiB - PAGE, back);
    expect(back.equals(big)).toBe(true);
    const sgl = dma.acquireRange(iova, 5 * GiB, false);
    expect(sgl.bufs.reduce((n, b) => n + b.length, 0)).toBe(5 * GiB);
    sgl.release();
  });

  it('maps 5 GiB at a file offset past 4 GiB', async () => {
    const { client, device } = await setup();
    const fd = sparse('offset-big', 12 * GiB);
    fs.writeSync(fd.value, Buffer.from('far'), 0, 3, 10 * GiB);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, 5 * GiB, 6 * GiB), [fd.value])).toBeInstanceOf(Buffer);
    expect(dmaOf(device).view(4 * GiB, 3, false).toString()).toBe('far');
  });
});

describe('DMA_MAP: what the spec does not allow', () => {
  it('refuses a file offset that is not page aligned (EINVAL)', async () => {
    const { client, device } = await setup();
    const fd = sparse('unaligned', 4 * PAGE);
    for (const offset of [1, 512, PAGE + 8]) {
      expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE, offset), [fd.value])).toBe(Errno.EINVAL);
    }
    expect(dmaOf(device).count).toBe(0);
  });

  it('refuses fds that are not shareable memory, and closes them', async () => {
    const { client, device } = await setup();
    const zero = fs.openSync('/dev/zero', 'r+');
    const [pr, pw] = pipeFds();
    const [sa, sb] = binding.socketpair();
    const efd = binding.eventfd(0);
    const dir = fs.openSync('/tmp', 'r');
    defer(() => [zero, pr, pw, sa, sb, efd, dir].forEach((fd) => fs.closeSync(fd)));
    const fds = countOpenFds();
    for (const fd of [zero, pr, sa, efd, dir]) {
      expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, PAGE), [fd]), `fd ${fd}`).toBe(Errno.EINVAL);
    }
    expect(countOpenFds()).toBe(fds);
    expect(dmaOf(device).count).toBe(0);
  });
});

describe('DMA_MAP: memory the client truncates', () => {
  it('poisons the map: DMA fails with EFAULT, the process lives, the server is told once', async () => {
    const { client, device, server } = await setup();
    const fd = sparse('shrinks', 16 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x100000, 16 * PAGE), [fd.value])).toBeInstanceOf(Buffer);
    const dma = dmaOf(device);
    const poisoned: DmaRegion[] = [];
    const previous = dma.onPoison;
    dma.onPoison = (r) => poisoned.push(r);
    defer(() => (dma.onPoison = previous));
    const held = dma.acquire(0x100000 + 8 * PAGE, PAGE, true); // in-flight device I/O
    held.bytes.fill(1);

    fs.ftruncateSync(fd.value, 0);
    held.bytes.fill(2); // would have been SIGBUS
    held.release();
    expect(dma.isPoisoned(0x100000)).toBe(true);
    expect(await dmaErrno(() => dma.view(0x100000, 4, false))).toBe(Errno.EFAULT);
    expect(await dmaErrno(() => dma.read(0x100000, Buffer.alloc(8)))).toBe(Errno.EFAULT);
    expect(await dmaErrno(() => dma.acquireRange(0x100000, PAGE, true))).toBe(Errno.EFAULT);
    expect(poisoned.map((r) => r.iova)).toEqual([0x100000]);
    expect(server.dma).toBe(dma);
  });

  it('disconnects the client that truncated its memory, resets the device, and serves the next', async () => {
    const { client, device, server, socketPath } = await setup();
    const fd = sparse('liar', 4 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, 4 * PAGE), [fd.value])).toBeInstanceOf(Buffer);
    const gone = new Promise<Error | null>((resolve) => server.once('disconnect', resolve));
    const view = dmaOf(device).view(0, PAGE, true);
    fs.ftruncateSync(fd.value, 0);
    view.fill(9); // the device's DMA lands after the truncation
    expect(dmaOf(device).isPoisoned(0)).toBe(true);
    const error = await gone;
    expect(error).toMatchObject({ errno: Errno.EFAULT });
    expect(String(error?.message)).toMatch(/truncated the memory of DMA map 0x0\+0x4000/);
    expect(device.calls).toContain('reset lost-connection');
    expect(dmaOf(device).count).toBe(0);
    const next = await rawClient(socketPath);
    defer(() => next.close());
    expect(await next.msg(Command.REGION_READ, regionAccess(7, 0, 4))).toBeInstanceOf(Buffer);
  });

  it('records whether a map is sealed against shrinking (such maps cannot be poisoned)', async () => {
    const { client, device } = await setup();
    const sealed = createMemfd('sealed', 4 * PAGE, { sealSize: true });
    defer(() => sealed.close());
    const plain = sparse('plain', 4 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0, 4 * PAGE), [sealed.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(RW, 0x10000, 4 * PAGE), [plain.value])).toBeInstanceOf(Buffer);
    expect(dmaOf(device).list().map((r) => r.sealed)).toEqual([true, false]);
    expect(() => fs.ftruncateSync(sealed.value, 0)).toThrow(expect.objectContaining({ code: 'EPERM' }));
  });
});

function pipeFds(): [number, number] {
  // Node has no pipe(2); a FIFO opened both ways is the same kind of file for fstat.
  const path = `/tmp/vfu-pipe-${process.pid}-${Date.now()}`;
  require('node:child_process').execFileSync('mkfifo', [path]);
  const r = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const w = fs.openSync(path, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  fs.unlinkSync(path);
  return [r, w];
}
