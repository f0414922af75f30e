import * as fs from 'node:fs';
import { describe, expect, it } from 'vitest';

import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { isOpen, useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

function newFd(): Fd {
  return new Fd(binding.eventfd(0));
}

describe('Fd', () => {
  it('owns a number until closed; close() is idempotent', () => {
    const fd = newFd();
    const raw = fd.value;
    expect(fd.closed).toBe(false);
    expect(isOpen(raw)).toBe(true);
    fd.close();
    expect(fd.closed).toBe(true);
    expect(isOpen(raw)).toBe(false);
    expect(() => fd.close()).not.toThrow();
    expect(String(fd)).toBe('Fd(closed)');
  });

  it('value throws EBADF once closed', () => {
    const fd = newFd();
    fd.close();
    expect(() => fd.value).toThrow(expect.objectContaining({ code: 'EBADF', errno: 9 }));
  });

  it('take() and release() hand the number on without closing it', () => {
    const fd = newFd();
    const raw = fd.value;
    expect(fd.take()).toBe(raw);
    expect(fd.closed).toBe(true);
    fd.close(); // owns nothing: must not close the number now owned elsewhere
    expect(isOpen(raw)).toBe(true);
    expect(() => fd.take()).toThrow(expect.objectContaining({ code: 'EBADF' }));
    const next = new Fd(raw);
    expect(next.release()).toBe(raw);
    expect(isOpen(raw)).toBe(true);
    fs.closeSync(raw);
  });

  it('rejects what is not a descriptor', () => {
    for (const bad of [-1, 1.5, NaN, 2 ** 31, '3', null]) {
      expect(() => new Fd(bad as number)).toThrow(/^Expected first argument to be a file descriptor/);
    }
  });

  it('closeAll closes Fds and numbers, skips null, and throws the first error after closing the rest', () => {
    const a = newFd();
    const b = binding.eventfd(0);
    const c = newFd();
    const cRaw = c.value;
    const dead = binding.eventfd(0);
    fs.closeSync(dead);
    expect(() => Fd.closeAll([a, null, dead, b, undefined, c])).toThrow(
      expect.objectContaining({ code: 'EBADF', syscall: 'close' }),
    );
    expect(a.closed && c.closed).toBe(true);
    expect(isOpen(b)).toBe(false);
    expect(isOpen(cRaw)).toBe(false);
    expect(() => Fd.closeAll([a, c])).not.toThrow(); // already closed Fds are fine
  });
});
