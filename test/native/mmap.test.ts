import * as fs from 'node:fs';
import { setImmediate as tick } from 'node:timers/promises';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { afterEach, describe, expect, it } from 'vitest';

import { binding } from '../../lib/native/binding';
import { isOpen, useFdLeakCheck } from '../helpers/fds';

const { PAGE_SIZE, PROT_READ, PROT_WRITE } = binding.constants;
const RW = PROT_READ | PROT_WRITE;

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

useFdLeakCheck();
let opened: number[] = [];
afterEach(() => {
  for (const fd of opened) if (isOpen(fd)) fs.closeSync(fd);
  opened = [];
});

let counter = 0;
/** A memfd of `size` bytes with a name unique to this test, to find it in /proc/self/maps. */
function memfd(size: number): { fd: number; name: string } {
  const name = `vfu-mmap-${process.pid}-${counter++}`;
  const fd = binding.memfdCreate(name);
  opened.push(fd);
  fs.ftruncateSync(fd, size);
  return { fd, name };
}

/** How many mappings of the memfd called `name` this process has. */
function mappingsOf(name: string): number {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((line) => line.includes(`/memfd:${name} `)).length;
}

async function collect(): Promise<void> {
  for (let i = 0; i < 4; i++) {
    gc();
    await tick(); // finalisers of external buffers run from the event loop
  }
}

describe('mmap', () => {
  it('shares memory with the file both ways', () => {
    const { fd, name } = memfd(PAGE_SIZE);
    const buffer = binding.mmap(fd, 0, PAGE_SIZE, RW);
    expect(buffer).toBeInstanceOf(ArrayBuffer);
    expect(buffer.byteLength).toBe(PAGE_SIZE);
    expect(mappingsOf(name)).toBe(1);

    fs.writeSync(fd, Buffer.from('from the file'), 0, 13, 100);
    expect(Buffer.from(buffer, 100, 13).toString()).toBe('from the file');

    Buffer.from(buffer).write('from the map', 200);
    const back = Buffer.alloc(12);
    fs.readSync(fd, back, 0, 12, 200);
    expect(back.toString()).toBe('from the map');
    binding.munmap(buffer);
    expect(mappingsOf(name)).toBe(0);
  });

  it('two mappings of one file see each other', () => {
    const { fd } = memfd(2 * PAGE_SIZE);
    const a = new Uint8Array(binding.mmap(fd, 0, 2 * PAGE_SIZE, RW));
    const b = new Uint8Array(binding.mmap(fd, PAGE_SIZE, PAGE_SIZE, RW));
    a[PAGE_SIZE + 5] = 0xab;
    expect(b[5]).toBe(0xab);
    binding.munmap(a.buffer as ArrayBuffer);
    binding.munmap(b.buffer as ArrayBuffer);
  });

  it('maps from an unaligned offset: the view starts exactly there (Number and BigInt)', () => {
    const { fd } = memfd(3 * PAGE_SIZE);
    const pattern = Buffer.alloc(3 * PAGE_SIZE);
    for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7) & 0xff;
    fs.writeSync(fd, pattern, 0, pattern.length, 0);
    for (const offset of [1, PAGE_SIZE - 1, PAGE_SIZE + 123, BigInt(2 * PAGE_SIZE + 5)]) {
      const start = Number(offset);
      const length = 3 * PAGE_SIZE - start;
      const buffer = binding.mmap(fd, offset, length, PROT_READ);
      expect(buffer.byteLength).toBe(length);
      expect(Buffer.from(buffer).equals(pattern.subarray(start))).toBe(true);
      binding.munmap(buffer);
    }
  });

  it('a read-only mapping can be read', () => {
    const { fd } = memfd(PAGE_SIZE);
    fs.writeSync(fd, 'ro', 0);
    const buffer = binding.mmap(fd, 0, 2, PROT_READ);
    expect(Buffer.from(buffer).toString()).toBe('ro');
    binding.munmap(buffer);
  });

  it('munmap detaches: the ArrayBuffer and every view read as length 0', () => {
    const { fd, name } = memfd(PAGE_SIZE);
    const buffer = binding.mmap(fd, 16, 64, RW);
    const u8 = new Uint8Array(buffer);
    const view = Buffer.from(buffer, 8, 32);
    const dv = new DataView(buffer);
    u8[0] = 1;
    binding.munmap(buffer);
    expect(buffer.byteLength).toBe(0);
    expect(u8.length).toBe(0);
    expect(view.length).toBe(0);
    expect(u8[0]).toBeUndefined();
    expect(view[3]).toBeUndefined();
    expect(() => dv.getUint8(0)).toThrow(TypeError);
    expect(mappingsOf(name)).toBe(0);
  });

  it('munmap is idempotent', () => {
    const { fd, name } = memfd(PAGE_SIZE);
    const buffer = binding.mmap(fd, 0, PAGE_SIZE, RW);
    binding.munmap(buffer);
    expect(() => binding.munmap(buffer)).not.toThrow();
    expect(() => binding.munmap(buffer)).not.toThrow();
    expect(mappingsOf(name)).toBe(0);
  });

  it('munmap of an ArrayBuffer that mmap did not make is a TypeError', () => {
    expect(() => binding.munmap(new ArrayBuffer(8))).toThrow(TypeError);
    expect(() => binding.munmap(new ArrayBuffer(0))).not.toThrow(); // nothing mapped: no-op
    expect(() => binding.munmap(Buffer.alloc(8).buffer as ArrayBuffer)).toThrow(TypeError);
    // A view is not the buffer
    const { fd } = memfd(PAGE_SIZE);
    const buffer = binding.mmap(fd, 0, PAGE_SIZE, RW);
    expect(() => binding.munmap(new Uint8Array(buffer) as unknown as ArrayBuffer)).toThrow(TypeError);
    binding.munmap(buffer);
  });

  it('the mapping outlives its fd', () => {
    const { fd } = memfd(PAGE_SIZE);
    const buffer = binding.mmap(fd, 0, PAGE_SIZE, RW);
    fs.closeSync(fd);
    new Uint8Array(buffer)[10] = 42;
    expect(new Uint8Array(buffer)[10]).toBe(42);
    binding.munmap(buffer);
  });

  it('the finaliser unmaps a buffer that is garbage-collected', async () => {
    const { fd, name } = memfd(PAGE_SIZE);
    (() => {
      new Uint8Array(binding.mmap(fd, 0, PAGE_SIZE, RW))[0] = 1;
    })();
    expect(mappingsOf(name)).toBe(1);
    await collect();
    expect(mappingsOf(name)).toBe(0);
  });

  it('address reuse: an old buffer never unmaps the new mapping at its address', async () => {
    const first = memfd(PAGE_SIZE);
    const second = memfd(PAGE_SIZE);
    let old: ArrayBuffer | undefined = binding.mmap(first.fd, 0, PAGE_SIZE, RW);
    binding.munmap(old);
    // The kernel usually hands out the address just freed; the test holds either way.
    const fresh = binding.mmap(second.fd, 0, PAGE_SIZE, RW);
    binding.munmap(old); // detached: must be a no-op, not an unmap of `fresh`
    old = undefined;
    await collect(); // the old buffer's finaliser must not unmap `fresh` either
    expect(mappingsOf(second.name)).toBe(1);
    new Uint8Array(fresh)[0] = 7; // would crash the process had `fresh` been unmapped
    fs.writeSync(second.fd, Buffer.from([9]), 0, 1, 1);
    expect(new Uint8Array(fresh)[1]).toBe(9);
    binding.munmap(fresh);
    expect(mappingsOf(second.name)).toBe(0);
  });

  it('rejects bad offsets, lengths and protections', () => {
    const { fd } = memfd(PAGE_SIZE);
    expect(() => binding.mmap(fd, 0, 0, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, -1, 1, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, -1n, 1, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 1.5, 1, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 2 ** 53, 1, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 2n ** 63n, 1, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 2n ** 64n, 1, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 0, -1, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 0, 2 ** 53, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 0, 1, PROT_WRITE)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 0, 1, 0)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 0, 1, PROT_READ | 4 /* PROT_EXEC */)).toThrow(RangeError);
    expect(() => binding.mmap(fd, '0' as unknown as number, 1, RW)).toThrow(TypeError);
  });

  it('reports mmap errors with code, errno and syscall', () => {
    const { fd } = memfd(PAGE_SIZE);
    // PROT_WRITE on an fd opened read-only
    const ro = fs.openSync(`/proc/self/fd/${fd}`, 'r');
    opened.push(ro);
    expect(() => binding.mmap(ro, 0, PAGE_SIZE, RW)).toThrow(
      expect.objectContaining({ code: 'EACCES', errno: 13, syscall: 'mmap' }),
    );
    const [a, b] = binding.socketpair();
    opened.push(a, b);
    expect(() => binding.mmap(a, 0, PAGE_SIZE, RW)).toThrow(
      expect.objectContaining({ code: 'ENODEV', syscall: 'mmap' }),
    );
  });
});
