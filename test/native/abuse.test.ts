// Abuse without crashing: every entry point gets wrong types, wrong values, closed fds and the
// wrong `this`, and must throw a JS error (never abort or segfault the process).
import * as fs from 'node:fs';
import { describe, expect, it } from 'vitest';

import { binding } from '../../lib/native/binding';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

const { PROT_READ } = binding.constants;
const { READABLE } = binding.pollEvents;
const any = binding as unknown as Record<string, (...args: unknown[]) => unknown>;

/** A descriptor number that is certainly not open right now. */
function closedFd(): number {
  const fd = binding.eventfd(0);
  fs.closeSync(fd);
  return fd;
}

const bad = [undefined, null, true, 'x', {}, [], () => 1, Symbol('s'), 1n];
const badNumbers = [-1, 1.5, NaN, Infinity, 2 ** 31];

describe('wrong argument types and values', () => {
  const buf = Buffer.alloc(8);
  const out = new Int32Array(2);

  // [function, arguments with X at the abused position, values of X that are in fact valid there]
  const cases: Array<[string, (x: unknown) => unknown[], unknown[]?]> = [
    ['unixListen', (x) => [x, 1], ['x']],
    ['unixListen', (x) => ['/nonexistent/dir/s', x]],
    ['unixAccept', (x) => [x]],
    ['unixConnect', (x) => [x], ['x']],
    ['sendmsg', (x) => [x, [buf]]],
    ['sendmsg', (x) => [0, x]],
    ['recvmsg', (x) => [x, buf, 0, 8, out]],
    ['recvmsg', (x) => [0, x, 0, 8, out]],
    ['recvmsg', (x) => [0, buf, x, 8, out]],
    ['recvmsg', (x) => [0, buf, 0, x, out]],
    ['recvmsg', (x) => [0, buf, 0, 8, x]],
    ['mmap', (x) => [x, 0, 8, PROT_READ]],
    ['mmap', (x) => [0, x, 8, PROT_READ], [1n, 2 ** 31]],
    ['mmap', (x) => [0, 0, x, PROT_READ], [2 ** 31]],
    ['mmap', (x) => [0, 0, 8, x]],
    ['munmap', (x) => [x]],
    ['mmapPoisoned', (x) => [x]],
    ['memfdCreate', (x) => [x], ['x']],
    ['getSeals', (x) => [x]],
    ['addSeals', (x) => [x, 0]],
    ['addSeals', (x) => [0, x], [undefined]],
    ['eventfd', (x) => [x], [2 ** 31]],
    ['eventfdSignal', (x) => [x]],
    ['eventfdDrain', (x) => [x]],
  ];

  for (const [name, args, valid = []] of cases) {
    it(`${name}(${args('X').map(String).join(', ')}) rejects bad X`, () => {
      for (const x of [...bad, ...badNumbers]) {
        if (valid.includes(x)) continue;
        let error: unknown;
        try {
          any[name]!(...args(x));
        } catch (err) {
          error = err;
        }
        expect(error, `${name} with ${String(x)}`).toBeDefined();
        expect([TypeError, RangeError]).toContain((error as Error).constructor);
        expect((error as Error).message).toMatch(/^Expected (first|second|third|fourth|fifth) argument to be /);
      }
    });
  }

  it('optional flags reject bad values but accept undefined', () => {
    const fd = binding.eventfd(0, undefined);
    fs.closeSync(fd);
    for (const x of [null, 'x', -1, 1.5]) {
      expect(() => binding.eventfd(0, x as number)).toThrow(/^Expected second argument/);
      expect(() => binding.memfdCreate('m', x as number)).toThrow(/^Expected second argument/);
    }
  });

  it('sendmsg rejects bad iov entries, bad fd lists and too many iovecs', () => {
    const [a, b] = binding.socketpair();
    try {
      expect(() => binding.sendmsg(a, [buf, 'x' as unknown as Uint8Array])).toThrow(TypeError);
      expect(() => binding.sendmsg(a, [new Uint16Array(4) as unknown as Uint8Array])).toThrow(TypeError);
      expect(() => binding.sendmsg(a, [])).toThrow(RangeError);
      expect(() => binding.sendmsg(a, [Buffer.alloc(0)])).toThrow(RangeError);
      expect(() => binding.sendmsg(a, new Array(65).fill(buf))).toThrow(RangeError);
      expect(() => binding.sendmsg(a, [buf], [-1])).toThrow(TypeError);
      expect(() => binding.sendmsg(a, [buf], ['3' as unknown as number])).toThrow(TypeError);
      expect(() => binding.sendmsg(a, [buf], 3 as unknown as number[])).toThrow(TypeError);
      expect(() => binding.sendmsg(a, [buf], { length: 1, 0: 3 })).toThrow(TypeError);
      const throwing = [0];
      Object.defineProperty(throwing, 0, { get: () => { throw new Error('getter'); } });
      expect(() => binding.sendmsg(a, [buf], throwing)).toThrow('getter');
      const lying = new Int32Array(1);
      Object.defineProperty(lying, 'length', { value: 'many' });
      expect(() => binding.sendmsg(a, [buf], lying)).toThrow(TypeError);
      // sending an fd number that is not open: the kernel says EBADF
      expect(() => binding.sendmsg(a, [buf], [closedFd()])).toThrow(
        expect.objectContaining({ code: 'EBADF', syscall: 'sendmsg' }),
      );
      // nothing was sent by any of the above
      expect(binding.recvmsg(b, Buffer.alloc(8), 0, 8, new Int32Array(1))).toBe(-1);
    } finally {
      fs.closeSync(a);
      fs.closeSync(b);
    }
  });

  it('recvmsg rejects ranges outside the buffer, empty fdsOut and wrong typed arrays', () => {
    const [a, b] = binding.socketpair();
    try {
      expect(() => binding.recvmsg(b, buf, 4, 5, out)).toThrow(RangeError);
      expect(() => binding.recvmsg(b, buf, 9, 1, out)).toThrow(RangeError);
      expect(() => binding.recvmsg(b, buf, 0, 0, out)).toThrow(RangeError);
      expect(() => binding.recvmsg(b, buf, 0, 8, new Int32Array(0))).toThrow(TypeError);
      expect(() => binding.recvmsg(b, buf, 0, 8, new Uint32Array(2) as unknown as Int32Array)).toThrow(TypeError);
      expect(() => binding.recvmsg(b, new Uint16Array(8) as unknown as Uint8Array, 0, 8, out)).toThrow(TypeError);
      const detached = new Uint8Array(8);
      structuredClone(detached.buffer, { transfer: [detached.buffer] });
      expect(() => binding.recvmsg(b, detached, 0, 8, out)).toThrow(RangeError);
      expect(binding.sendmsg(a, [detached, buf])).toBe(8); // a detached iovec is empty
    } finally {
      fs.closeSync(a);
      fs.closeSync(b);
    }
  });

  it('socket paths must be non-empty strings without NUL', () => {
    expect(() => binding.unixListen('', 1)).toThrow(TypeError);
    expect(() => binding.unixConnect('/tmp/a\0b')).toThrow(TypeError);
    expect(() => binding.memfdCreate('a\0b')).toThrow(TypeError);
  });
});

describe('closed fds throw EBADF with code, errno and syscall', () => {
  const buf = Buffer.alloc(8);
  const cases: Array<[string, (fd: number) => unknown, string]> = [
    ['unixAccept', (fd) => binding.unixAccept(fd), 'accept4'],
    ['sendmsg', (fd) => binding.sendmsg(fd, [buf]), 'sendmsg'],
    ['recvmsg', (fd) => binding.recvmsg(fd, buf, 0, 8, new Int32Array(2)), 'recvmsg'],
    ['mmap', (fd) => binding.mmap(fd, 0, 8, PROT_READ), 'mmap'],
    ['eventfdSignal', (fd) => binding.eventfdSignal(fd), 'write'],
    ['eventfdDrain', (fd) => binding.eventfdDrain(fd), 'read'],
    ['getSeals', (fd) => binding.getSeals(fd), 'fcntl'],
    ['addSeals', (fd) => binding.addSeals(fd, 0), 'fcntl'],
    ['Poller', (fd) => new binding.Poller(fd, () => {}), 'uv_poll_init'],
  ];
  for (const [name, call, syscall] of cases) {
    it(name, () => {
      for (const fd of [closedFd(), 0x7fffffff]) {
        let error: NodeJS.ErrnoException | undefined;
        try {
          call(fd);
        } catch (err) {
          error = err as NodeJS.ErrnoException;
        }
        expect(error).toBeInstanceOf(Error);
        expect(error).toMatchObject({ code: 'EBADF', errno: 9, syscall });
        expect(error!.message).toBe(`EBADF: Bad file descriptor, ${syscall}`);
      }
    });
  }
});

describe('Poller abuse', () => {
  it('needs new, an fd and a function', () => {
    const P = binding.Poller as unknown as (...args: unknown[]) => unknown;
    expect(() => P(0, () => {})).toThrow(TypeError);
    const fd = binding.eventfd(0);
    try {
      for (const x of bad) {
        expect(() => new binding.Poller(x as number, () => {})).toThrow(TypeError);
        if (typeof x !== 'function') {
          expect(() => new binding.Poller(fd, x as () => void)).toThrow(/^Expected second argument/);
        }
      }
      expect(() => new binding.Poller(-1, () => {})).toThrow(RangeError);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('methods reject a foreign this', () => {
    const { start, stop, close } = binding.Poller.prototype as unknown as Record<string, (...a: unknown[]) => unknown>;
    for (const self of [undefined, null, 1, {}, Object.create(binding.Poller.prototype), new Map()]) {
      for (const method of [start, stop, close]) {
        expect(() => method!.call(self, READABLE)).toThrow('Expected this to be a Poller');
      }
    }
  });

  it('start/stop after close throw; close stays idempotent', () => {
    const fd = binding.eventfd(0);
    const poller = new binding.Poller(fd, () => {});
    poller.start(READABLE);
    poller.close();
    expect(() => poller.start(READABLE)).toThrow(Error);
    expect(() => poller.stop()).toThrow('Poller is closed');
    expect(() => poller.close()).not.toThrow();
    fs.closeSync(fd);
  });

  it('a second poller on a started fd is refused (EEXIST), not corrupting the first', () => {
    const fd = binding.eventfd(0, binding.constants.EFD_NONBLOCK);
    const first = new binding.Poller(fd, () => {});
    first.start(READABLE);
    expect(() => new binding.Poller(fd, () => {})).toThrow(expect.objectContaining({ code: 'EEXIST' }));
    first.close();
    fs.closeSync(fd);
  });
});
