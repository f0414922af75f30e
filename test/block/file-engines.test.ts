// FileBackend's engines: io_uring, the libuv thread pool and synchronous calls give the same results; O_DIRECT with
// buffers it refuses falls back to a buffered descriptor; every fd is closed exactly once.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FileBackend, MEMORY_FILE_INLINE_MAX, type FileEngine } from '../../lib/block';
import { binding, createMemfd, IoUring } from '../../lib/native';
import { pattern } from '../devices/nvme/rig';
import { openFds, useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();
let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'file-engines-'));
});
afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

const uring = (() => {
  try {
    // Nothing in flight: the ring goes at once, before any fd accounting starts.
    void IoUring.open(2).close();
    return true;
  } catch {
    return false;
  }
})();

describe.each<FileEngine>(['io_uring', 'threadpool', 'sync'])('FileBackend engine %s', (engine) => {
  it.skipIf(engine === 'io_uring' && !uring)('reads, writes (FUA too), scatters, zeroes, discards and flushes', async () => {
    const p = path.join(dir, 'disk.img');
    const file = FileBackend.open(p, { size: 1 << 20, engine });
    expect(file.engine).toBe(engine);
    expect(file.engineNote).toBeUndefined();
    expect(file.inlineMax).toBe(engine === 'sync' ? Infinity : 0);
    expect(file.direct).toBe(false);
    const parts = [pattern(512, 1), pattern(3584, 2)];
    await Promise.all([file.writev(0, parts, false), file.write(8192, pattern(4096, 3), true)]);
    const back = [Buffer.alloc(1000), Buffer.alloc(3096)];
    await file.readv(0, back);
    expect(Buffer.concat(back)).toEqual(Buffer.concat(parts));
    const three = Buffer.alloc(4096);
    await file.read(8192, three);
    expect(three).toEqual(pattern(4096, 3));
    await file.writeZeroes(8192 + 512, 1024, true);
    await file.read(8192, three);
    expect(three.subarray(512, 1536).every((x) => x === 0)).toBe(true);
    expect(three.subarray(1536)).toEqual(pattern(4096, 3).subarray(1536));
    await file.discard(0, 4096);
    await file.flush();
    // Many at once: more than the ring's slots.
    const many = Array.from({ length: 600 }, (_, i) => file.write(i * 1024, Buffer.alloc(1024, i & 0xff), false));
    await Promise.all(many);
    const check = Buffer.alloc(1024);
    await file.read(599 * 1024, check);
    expect(check.every((x) => x === (599 & 0xff))).toBe(true);
    await file.close();
    await file.close();
    expect(() => file.fd).toThrow(/closed/);
    expect(fs.readFileSync(p).subarray(599 * 1024, 600 * 1024)).toEqual(check);
  });

  it.skipIf(engine === 'io_uring' && !uring)('a read past the end of a shorter file reads zeroes; a read-only file refuses writes', async () => {
    const p = path.join(dir, 'ro.img');
    fs.writeFileSync(p, pattern(6000, 7));
    const file = FileBackend.open(p, { readOnly: true, engine });
    const b = Buffer.alloc(4096, 0xee);
    await file.read(4096, b.subarray(0, 1904));
    expect(b.subarray(0, 1904)).toEqual(pattern(6000, 7).subarray(4096));
    await expect(file.write(0, Buffer.alloc(512), false)).rejects.toMatchObject({ code: 'EROFS' });
    await file.close();
  });

  it.skipIf(engine === 'io_uring' && !uring)('I/O errors reject with code, errno and syscall', async () => {
    const p = path.join(dir, 'dir-is-not-a-file');
    fs.mkdirSync(p);
    // A directory opens read-only but cannot be read: EISDIR from the kernel.
    const file = FileBackend.open(p, { readOnly: true, size: 4096, engine });
    const err = await file.read(0, Buffer.alloc(512)).catch((e: unknown) => e as NodeJS.ErrnoException);
    expect(err).toMatchObject({ code: 'EISDIR', syscall: 'read' });
    await file.close();
  });
});

/** A tmpfs mount to put a file on (Debian mounts one at /dev/shm), or null. */
const tmpfs = (() => {
  for (const dir of ['/dev/shm', '/run/shm']) {
    try {
      if (fs.statfsSync(dir).type === 0x01021994) return dir;
    } catch {
      // not mounted here
    }
  }
  return null;
})();

describe('FileBackend engine auto', () => {
  it.skipIf(tmpfs === null)('a file on tmpfs has a small request done in place when it is alone, the rest by the engine', async () => {
    const p = path.join(tmpfs!, `file-engines-${process.pid}.img`);
    const file = FileBackend.open(p, { size: 1 << 20 });
    const nextTurn = () => new Promise((r) => setImmediate(r));
    const inFile = (at: number, length: number) => fs.readFileSync(p).subarray(at, at + length);
    try {
      expect(file.engine).toBe(uring ? 'io_uring' : 'threadpool');
      expect(file.inlineMax).toBe(MEMORY_FILE_INLINE_MAX);
      expect(file.engineNote).toMatch(/tmpfs: a lone request up to 64 KiB is copied in place/);
      const src = pattern(8192, 9);
      // Alone: done before the call returns, the bytes in the file before the promise is awaited.
      const written = file.writev(4096, [src.subarray(0, 100), src.subarray(100)], true);
      expect(inFile(4096, 8192)).toEqual(src);
      await written;
      await nextTurn();
      const into = Buffer.alloc(8192);
      const read = file.read(4096, into);
      expect(into).toEqual(src);
      await read;
      await nextTurn();
      // Two in one turn: the first in place, the second with the engine (not done on return).
      const a = pattern(4096, 1);
      const b = pattern(4096, 2);
      const both = [file.write(0, a, false), file.write(16384, b, false)];
      expect(inFile(0, 4096)).toEqual(a);
      expect(inFile(16384, 4096)).not.toEqual(b);
      await Promise.all(both);
      expect(inFile(16384, 4096)).toEqual(b);
      await nextTurn();
      // Above the limit: the engine's, even alone.
      const big = pattern(MEMORY_FILE_INLINE_MAX + 4096, 4);
      const bigWrite = file.write(65536, big, false);
      expect(inFile(65536, big.length)).not.toEqual(big);
      // While it is with the engine, a small request is not alone either.
      await nextTurn();
      const c = pattern(512, 3);
      const small = file.write(32768, c, false);
      expect(inFile(32768, 512)).not.toEqual(c);
      await Promise.all([bigWrite, small]);
      expect(inFile(65536, big.length)).toEqual(big);
      expect(inFile(32768, 512)).toEqual(c);
      await expect(file.read(1 << 20, Buffer.alloc(1))).rejects.toThrow(RangeError);
    } finally {
      await file.close();
      fs.rmSync(p, { force: true });
    }
  });

  it.skipIf(!uring || fs.statfsSync(os.tmpdir()).type === 0x01021994)('a file on another file system goes through io_uring', async () => {
    const file = FileBackend.open(path.join(dir, 'auto.img'), { size: 1 << 20 });
    expect(file.engine).toBe('io_uring');
    expect(file.engineNote).toBeUndefined();
    await file.close();
  });
});

describe.skipIf(!uring)('FileBackend direct', () => {
  it('O_DIRECT I/O on aligned guest memory; unaligned buffers go through the buffered fd', async () => {
    const p = path.join(dir, 'direct.img');
    let file: FileBackend;
    try {
      file = FileBackend.open(p, { size: 1 << 20, direct: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EINVAL') return; // no O_DIRECT on this file system
      throw err;
    }
    // Guest memory: page-aligned, as DMA views are.
    expect(file.direct).toBe(true);
    const memfd = createMemfd('guest', 1 << 16);
    const { PROT_READ, PROT_WRITE } = binding.constants;
    const memory = binding.mmap(memfd.value, 0, 1 << 16, PROT_READ | PROT_WRITE);
    try {
      const aligned = Buffer.from(memory, 0, 8192);
      aligned.set(pattern(8192, 5));
      await file.write(0, aligned, true);
      const odd = Buffer.alloc(1000);
      await file.read(3, odd);
      expect(odd).toEqual(pattern(8192, 5).subarray(3, 1003));
      await file.write(5, Buffer.from('hello'), false);
      const into = Buffer.from(memory, 16384, 4096);
      await file.read(0, into);
      expect(into.subarray(5, 10).toString()).toBe('hello');
    } finally {
      binding.munmap(memory);
      memfd.close();
      await file.close();
    }
  });
});

describe.skipIf(!uring)('FileBackend after its ring fails', () => {
  it('fails the request that met the failure, then carries on through the thread pool', async () => {
    const p = path.join(dir, 'disk.img');
    const file = FileBackend.open(p, { size: 1 << 20, engine: 'io_uring' });
    await file.write(0, pattern(4096, 7), false);
    // Break the ring: its fd number now names /dev/null, so the next io_uring_enter fails.
    const ringFd = [...openFds()].find(([, target]) => target === 'anon_inode:[io_uring]')![0];
    fs.closeSync(ringFd);
    expect(fs.openSync('/dev/null', 'r')).toBe(ringFd); // closed by file.close(), as the ring's fd
    await expect(file.read(0, Buffer.alloc(4096))).rejects.toMatchObject({ syscall: 'io_uring_enter' });
    const back = Buffer.alloc(4096);
    await file.read(0, back);
    expect(back).toEqual(pattern(4096, 7));
    await file.write(4096, pattern(4096, 8), true);
    await file.writeZeroes(0, 512, false);
    await file.discard(8192, 4096);
    await file.read(0, back);
    expect(back.subarray(0, 512).every((x) => x === 0)).toBe(true);
    expect(back.subarray(512)).toEqual(pattern(4096, 7).subarray(512));
    await file.read(4096, back);
    expect(back).toEqual(pattern(4096, 8));
    await file.close();
  });
});
