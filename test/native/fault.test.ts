/**
 * What a peer can do to memory it shared with us, and what it cannot do to the process: the
 * addon's 4 GiB buffer limit (a longer mmap used to abort the process with a double free), the
 * SIGBUS guard (a file truncated under a mapping used to kill the process), and memfd seals.
 */
import * as fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';

import { binding } from '../../lib/native/binding';
import { Mapping } from '../../lib/native/mapping';
import { createMemfd, isSealedAgainstShrinking, SIZE_SEALS } from '../../lib/native/memfd';
import { isOpen, useFdLeakCheck } from '../helpers/fds';

const { PAGE_SIZE, PROT_READ, PROT_WRITE, MFD_ALLOW_SEALING, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL } = binding.constants;
const RW = PROT_READ | PROT_WRITE;
const GiB = 2 ** 30;

useFdLeakCheck();
let opened: number[] = [];
afterEach(() => {
  for (const fd of opened) if (isOpen(fd)) fs.closeSync(fd);
  opened = [];
});

function memfd(size: number, flags = 0): number {
  const fd = binding.memfdCreate(`vfu-fault-${process.pid}`, flags);
  opened.push(fd);
  fs.ftruncateSync(fd, size);
  return fd;
}

describe('mmap length limit', () => {
  it('refuses one buffer over 4 GiB with a RangeError instead of aborting the process', () => {
    const fd = memfd(6 * GiB); // sparse: costs nothing
    expect(() => binding.mmap(fd, 0, 5 * GiB, RW)).toThrow(RangeError);
    expect(() => binding.mmap(fd, 0, 4 * GiB + PAGE_SIZE, RW)).toThrow(RangeError);
    const four = binding.mmap(fd, 0, 4 * GiB, RW);
    expect(four.byteLength).toBe(4 * GiB);
    binding.munmap(four);
  });
});

describe('SIGBUS guard', () => {
  it('poisons a mapping whose file was truncated, instead of killing the process', () => {
    const fd = memfd(4 * PAGE_SIZE);
    const buffer = binding.mmap(fd, 0, 4 * PAGE_SIZE, RW);
    const bytes = Buffer.from(buffer);
    bytes.fill(0xab);
    const epoch = binding.faultEpoch[0]!;
    expect(binding.mmapPoisoned(buffer)).toBe(false);

    fs.ftruncateSync(fd, PAGE_SIZE); // the peer takes three pages back
    expect(bytes[3 * PAGE_SIZE]).toBe(0); // this touch raised SIGBUS; the guard answered zeros
    expect(binding.faultEpoch[0]).toBe(epoch + 1);
    expect(binding.mmapPoisoned(buffer)).toBe(true);
    // The whole mapping is replaced (the surviving page too: the map as a whole is lost), and
    // the process keeps going: writes land in private zero pages, not in the file.
    expect(bytes[0]).toBe(0);
    bytes[1] = 7;
    expect(bytes[1]).toBe(7);
    const file = Buffer.alloc(2);
    fs.readSync(fd, file, 0, 2, 0);
    expect([...file]).toEqual([0xab, 0xab]);

    binding.munmap(buffer);
    expect(binding.mmapPoisoned(buffer)).toBe(false); // detached
  });

  it('guards a read-only mapping and the windows of a long Mapping alike', () => {
    const fd = memfd(5 * GiB);
    const m = Mapping.map(fd, 0, 5 * GiB);
    const ro = Mapping.map(fd, 0, PAGE_SIZE, PROT_READ);
    m.view(5 * GiB - PAGE_SIZE, PAGE_SIZE)[0] = 1;
    expect(m.poisoned).toBe(false);
    fs.ftruncateSync(fd, 0);
    expect(ro.bytes[0]).toBe(0);
    expect(ro.poisoned).toBe(true);
    expect(m.view(5 * GiB - PAGE_SIZE, PAGE_SIZE)[0]).toBe(0);
    expect(m.poisoned).toBe(true);
    m.unmapNow();
    ro.unmapNow();
  });

  it('survives truncation in a child process that does nothing but touch the lost pages', async () => {
    // The same in a fresh process with no test runner around it: the exit code is the verdict.
    const { spawnSync } = await import('node:child_process');
    const script = `
      const binding = require('node-gyp-build')(${JSON.stringify(require('node:path').join(__dirname, '..', '..'))});
      const fs = require('node:fs');
      const fd = binding.memfdCreate('child', 0);
      fs.ftruncateSync(fd, 1 << 20);
      const views = [];
      for (let i = 0; i < 8; i++) views.push(Buffer.from(binding.mmap(fd, 0, 1 << 20, 3)));
      fs.ftruncateSync(fd, 0);
      let sum = 0;
      for (const v of views) for (let at = 0; at < v.length; at += 4096) sum += v[at];
      process.stdout.write(JSON.stringify({ sum, poisoned: binding.faultEpoch[0] }));
    `;
    const run = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', cwd: __dirname });
    expect(run.signal).toBeNull();
    expect(run.status).toBe(0);
    expect(JSON.parse(run.stdout)).toEqual({ sum: 0, poisoned: 8 });
  });
});

describe('memfd seals', () => {
  it('createMemfd({ sealSize }) fixes the size: the peer can neither shrink nor grow it', () => {
    const fd = createMemfd('sealed', 2 * PAGE_SIZE, { sealSize: true });
    expect(binding.getSeals(fd.value) & SIZE_SEALS).toBe(SIZE_SEALS);
    expect(isSealedAgainstShrinking(fd)).toBe(true);
    expect(() => fs.ftruncateSync(fd.value, 0)).toThrow(expect.objectContaining({ code: 'EPERM' }));
    expect(() => fs.ftruncateSync(fd.value, 4 * PAGE_SIZE)).toThrow(expect.objectContaining({ code: 'EPERM' }));
    fd.close();
  });

  it('reports seals, and refuses to add them where they cannot be', () => {
    const plain = memfd(PAGE_SIZE);
    expect(binding.getSeals(plain)).toBe(F_SEAL_SEAL); // made without MFD_ALLOW_SEALING
    expect(() => binding.addSeals(plain, F_SEAL_SHRINK)).toThrow(expect.objectContaining({ code: 'EPERM', syscall: 'fcntl' }));
    expect(isSealedAgainstShrinking(plain)).toBe(false);
    const sealable = memfd(PAGE_SIZE, MFD_ALLOW_SEALING);
    expect(binding.getSeals(sealable)).toBe(0);
    binding.addSeals(sealable, F_SEAL_GROW);
    expect(binding.getSeals(sealable)).toBe(F_SEAL_GROW);
    const [a, b] = binding.socketpair();
    opened.push(a, b);
    expect(() => binding.getSeals(a)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    expect(isSealedAgainstShrinking(a)).toBe(false);
    expect(() => binding.getSeals(-1)).toThrow(RangeError);
  });
});
