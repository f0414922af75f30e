import * as fs from 'node:fs';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { describe, expect, it } from 'vitest';

import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { Mapping } from '../../lib/native/mapping';
import { createMemfd } from '../../lib/native/memfd';
import { countOpenFds, isCloexec, useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

const { PAGE_SIZE, PROT_READ } = binding.constants;

let counter = 0;
function memfd(size = 2 * PAGE_SIZE): { fd: Fd; name: string } {
  const name = `vfu-mapping-${process.pid}-${counter++}`;
  return { fd: createMemfd(name, size), name };
}

function mappingsOf(name: string): number {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((line) => line.includes(`/memfd:${name} `)).length;
}

describe('createMemfd', () => {
  it('makes a zero-filled, close-on-exec memfd of the given size', () => {
    const { fd } = memfd(3 * PAGE_SIZE + 5);
    expect(fs.fstatSync(fd.value).size).toBe(3 * PAGE_SIZE + 5);
    expect(isCloexec(fd.value)).toBe(true);
    const probe = Buffer.alloc(16, 1);
    fs.readSync(fd.value, probe, 0, 16, PAGE_SIZE);
    expect(probe.equals(Buffer.alloc(16))).toBe(true);
    fd.close();
  });

  it('accepts allowSealing and closes the fd again when sizing fails', () => {
    createMemfd('sealable', 1, { allowSealing: true }).close();
    // ftruncate of a memfd practically never fails: inject the failure through node:fs.
    const cjsFs = createRequire(__filename)('node:fs') as typeof fs;
    const original = cjsFs.ftruncateSync;
    const efbig = Object.assign(new Error('EFBIG: file too large, ftruncate'), { code: 'EFBIG', syscall: 'ftruncate' });
    cjsFs.ftruncateSync = () => {
      throw efbig;
    };
    syncBuiltinESMExports();
    const before = countOpenFds();
    try {
      expect(() => createMemfd('huge', 1)).toThrow(efbig);
    } finally {
      cjsFs.ftruncateSync = original;
      syncBuiltinESMExports();
    }
    expect(countOpenFds()).toBe(before);
    expect(() => createMemfd('neg', -1)).toThrow(RangeError);
  });
});

describe('Mapping', () => {
  it('maps an Fd or a number; bytes is a zero-copy Buffer over buffer', () => {
    const { fd, name } = memfd();
    const m = Mapping.map(fd, PAGE_SIZE + 3, 100);
    const n = Mapping.map(fd.value, BigInt(PAGE_SIZE), 200);
    fd.close(); // mappings keep the file alive
    expect(m.offset).toBe(BigInt(PAGE_SIZE + 3));
    expect(m.length).toBe(100);
    expect(m.bytes.buffer).toBe(m.buffer);
    expect(m.bytes.length).toBe(100);
    m.bytes.write('shared');
    expect(n.bytes.toString('utf8', 3, 9)).toBe('shared');
    expect(mappingsOf(name)).toBe(2);
    m.unmapNow();
    n.unmapNow();
    expect(mappingsOf(name)).toBe(0);
  });

  it('refuses a range past the end of the file (SIGBUS territory)', () => {
    const { fd } = memfd(PAGE_SIZE);
    expect(() => Mapping.map(fd, 0, PAGE_SIZE + 1)).toThrow(RangeError);
    expect(() => Mapping.map(fd, BigInt(PAGE_SIZE), 1)).toThrow(RangeError);
    expect(() => Mapping.map(fd, 0, 0)).toThrow(RangeError);
    expect(() => Mapping.map(fd, -1, 1)).toThrow(RangeError);
    expect(() => Mapping.map(fd, '0' as unknown as number, 1)).toThrow(TypeError);
    Mapping.map(fd, PAGE_SIZE - 1, 1).unmapNow();
    fd.close();
    expect(() => Mapping.map(fd, 0, 1)).toThrow(expect.objectContaining({ code: 'EBADF' }));
  });

  it('unmap() with no references unmaps at once and detaches every view', async () => {
    const { fd, name } = memfd();
    const m = Mapping.map(fd, 0, PAGE_SIZE);
    fd.close();
    const bytes = m.bytes;
    const buffer = m.buffer;
    const done = m.unmap();
    expect(m.state).toBe('unmapped');
    expect(mappingsOf(name)).toBe(0);
    expect(buffer.byteLength).toBe(0);
    expect(bytes.length).toBe(0);
    await done;
    expect(() => m.buffer).toThrow(expect.objectContaining({ code: 'ERR_MAPPING_UNMAPPED' }));
    expect(() => m.bytes).toThrow(expect.objectContaining({ code: 'ERR_MAPPING_UNMAPPED' }));
  });

  it('unmap() waits for references, refuses new ones, and is idempotent', async () => {
    const { fd, name } = memfd();
    const m = Mapping.map(fd, 0, PAGE_SIZE);
    fd.close();
    m.acquire().acquire();
    expect(m.refs).toBe(2);
    let settled = false;
    const done = m.unmap().then(() => (settled = true));
    expect(m.unmap()).toBe(m.unmap());
    expect(m.state).toBe('unmapping');
    expect(() => m.acquire()).toThrow(expect.objectContaining({ code: 'ERR_MAPPING_UNMAPPED' }));

    // in-flight users still reach the memory
    m.bytes[0] = 5;
    m.release();
    await new Promise((resolve) => setImmediate(resolve));
    expect(settled).toBe(false);
    expect(mappingsOf(name)).toBe(1);
    expect(m.bytes[0]).toBe(5);

    m.release();
    expect(m.state).toBe('unmapped');
    expect(mappingsOf(name)).toBe(0);
    await done;
    expect(settled).toBe(true);
    await m.unmap(); // still fine
    expect(() => m.release()).toThrow(/without a matching acquire/);
  });

  it('unmapNow() does not wait, and completes a pending unmap()', async () => {
    const { fd, name } = memfd();
    const m = Mapping.map(fd, 0, PAGE_SIZE);
    fd.close();
    const view = m.acquire().bytes;
    const pending = m.unmap();
    m.unmapNow();
    await pending;
    expect(view.length).toBe(0);
    expect(mappingsOf(name)).toBe(0);
    m.release(); // the in-flight user finishing later is harmless
    expect(() => m.unmapNow()).not.toThrow();
  });

  it('a read-only Mapping reads the file', () => {
    const { fd } = memfd(PAGE_SIZE);
    fs.writeSync(fd.value, 'ro', 0);
    const m = Mapping.map(fd, 0, 2, PROT_READ);
    expect(m.prot).toBe(PROT_READ);
    expect(m.bytes.toString()).toBe('ro');
    m.unmapNow();
    fd.close();
  });

  it('its buffer cannot be transferred to another thread', () => {
    const { fd } = memfd(PAGE_SIZE);
    const m = Mapping.map(fd, 0, PAGE_SIZE);
    fd.close();
    m.bytes.write('mine');
    // Node 20 copies an untransferable buffer instead of moving it; Node >= 21 throws.
    try {
      const copy = structuredClone(m.buffer, { transfer: [m.buffer] });
      expect(copy).not.toBe(m.buffer);
      expect(Buffer.from(copy).toString('utf8', 0, 4)).toBe('mine');
    } catch (err) {
      expect((err as Error).name).toBe('DataCloneError');
    }
    expect(m.buffer.byteLength).toBe(PAGE_SIZE);
    expect(m.bytes.toString('utf8', 0, 4)).toBe('mine');
    m.unmapNow();
  });
});

describe('Mapping over 4 GiB', () => {
  const GiB = 2 ** 30;

  it('maps 64 GiB as overlapping windows; any view up to MAX_VIEW is zero-copy', () => {
    const { fd, name } = memfd(64 * GiB); // sparse
    const m = Mapping.map(fd, 0, 64 * GiB);
    fd.close();
    expect(m.length).toBe(64 * GiB);
    expect(mappingsOf(name)).toBe(31); // windows of 4 GiB every 2 GiB
    expect(() => m.bytes).toThrow(RangeError);
    expect(() => m.buffer).toThrow(RangeError);

    // A view straddling a window boundary, and one at the very end.
    const across = m.view(4 * GiB - 8, 16);
    across.write('0123456789abcdef');
    expect(m.view(4 * GiB, 8).toString()).toBe('89abcdef');
    expect(m.view(2 * GiB, 2 * GiB).length).toBe(2 * GiB);
    m.view(64 * GiB - 4, 4).write('tail');
    expect(m.view(62 * GiB, 2 * GiB).toString('latin1', 2 * GiB - 4)).toBe('tail');

    expect(() => m.view(64 * GiB - 4, 5)).toThrow(RangeError);
    expect(() => m.view(-1, 1)).toThrow(RangeError);
    expect(() => m.view(GiB, 4 * GiB)).toThrow(/spans two windows/);
    m.unmapNow();
    expect(mappingsOf(name)).toBe(0);
    expect(() => m.view(0, 1)).toThrow(expect.objectContaining({ code: 'ERR_MAPPING_UNMAPPED' }));
  });

  it('keeps a single window, and bytes, up to exactly 4 GiB', () => {
    const { fd } = memfd(4 * GiB);
    const m = Mapping.map(fd, 0, 4 * GiB);
    fd.close();
    expect(m.bytes.length).toBe(4 * GiB);
    expect(m.view(4 * GiB - 1, 1).buffer).toBe(m.buffer);
    m.unmapNow();
  });

  it('maps a long range at a file offset past 4 GiB', () => {
    const { fd } = memfd(12 * GiB);
    fs.writeSync(fd.value, Buffer.from('deep'), 0, 4, 11 * GiB);
    const m = Mapping.map(fd, 5 * GiB, 7 * GiB);
    fd.close();
    expect(m.view(6 * GiB, 4).toString()).toBe('deep');
    m.unmapNow();
  });
});
