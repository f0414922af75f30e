import * as fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { afterEach, describe, expect, it } from 'vitest';

import { binding, type Poller } from '../../lib/native/binding';
import { isOpen, useFdLeakCheck } from '../helpers/fds';

const { READABLE, WRITABLE, DISCONNECT } = binding.pollEvents;
const { EFD_NONBLOCK, EFD_SEMAPHORE } = binding.constants;

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

useFdLeakCheck();
let opened: number[] = [];
let pollers: Poller[] = [];
afterEach(() => {
  for (const p of pollers) p.close();
  pollers = [];
  for (const fd of opened) if (isOpen(fd)) fs.closeSync(fd);
  opened = [];
});

function eventfd(flags = EFD_NONBLOCK, initval = 0): number {
  const fd = binding.eventfd(initval, flags);
  opened.push(fd);
  return fd;
}

/** A Poller whose callback records every (status, events) it gets. */
function recordingPoller(fd: number): { poller: Poller; calls: Array<[number, number]>; next: () => Promise<[number, number]> } {
  const calls: Array<[number, number]> = [];
  let wake: (() => void) | undefined;
  const poller = new binding.Poller(fd, (status, events) => {
    calls.push([status, events]);
    wake?.();
  });
  pollers.push(poller);
  const next = async (): Promise<[number, number]> => {
    const seen = calls.length;
    while (calls.length === seen) await new Promise<void>((resolve) => (wake = resolve));
    return calls[calls.length - 1]!;
  };
  return { poller, calls, next };
}

describe('eventfd', () => {
  it('signal adds 1, drain returns the count and resets it', () => {
    const fd = eventfd();
    expect(binding.eventfdDrain(fd)).toBe(0);
    expect(binding.eventfdSignal(fd)).toBe(true);
    expect(binding.eventfdSignal(fd)).toBe(true);
    expect(binding.eventfdSignal(fd)).toBe(true);
    expect(binding.eventfdDrain(fd)).toBe(3);
    expect(binding.eventfdDrain(fd)).toBe(0);
  });

  it('honours initval and EFD_SEMAPHORE', () => {
    const fd = eventfd(EFD_NONBLOCK | EFD_SEMAPHORE, 2);
    expect(binding.eventfdDrain(fd)).toBe(1);
    expect(binding.eventfdDrain(fd)).toBe(1);
    expect(binding.eventfdDrain(fd)).toBe(0);
  });

  it('is the same counter as an 8-byte read/write through fs', () => {
    const fd = eventfd();
    const eight = Buffer.alloc(8);
    eight.writeBigUInt64LE(41n);
    fs.writeSync(fd, eight);
    binding.eventfdSignal(fd);
    expect(binding.eventfdDrain(fd)).toBe(42);
  });

  it('signal returns false when the counter is full', () => {
    const fd = eventfd();
    const max = Buffer.alloc(8);
    max.writeBigUInt64LE(0xffff_ffff_ffff_fffen);
    fs.writeSync(fd, max);
    expect(binding.eventfdSignal(fd)).toBe(false);
    expect(binding.eventfdDrain(fd)).toBe(2 ** 64 - 2); // as a Number: rounded
    expect(binding.eventfdSignal(fd)).toBe(true);
  });

  it('never blocks, even on an eventfd without EFD_NONBLOCK', () => {
    const fd = eventfd(0);
    expect(binding.eventfdDrain(fd)).toBe(0); // a plain read(2) would hang here
    const max = Buffer.alloc(8);
    max.writeBigUInt64LE(0xffff_ffff_ffff_fffen);
    fs.writeSync(fd, max);
    expect(binding.eventfdSignal(fd)).toBe(false); // a plain write(2) would hang here
  });
});

describe('Poller', () => {
  it('an eventfd signal wakes it with READABLE', async () => {
    const fd = eventfd();
    const { poller, next } = recordingPoller(fd);
    poller.start(READABLE);
    setTimeout(() => binding.eventfdSignal(fd), 5);
    expect(await next()).toEqual([0, READABLE]);
    expect(binding.eventfdDrain(fd)).toBe(1);
  });

  it('reports WRITABLE, and READABLE | DISCONNECT when the peer closes', async () => {
    const [a, b] = binding.socketpair();
    opened.push(a, b);
    const { poller, next } = recordingPoller(a);
    poller.start(WRITABLE);
    expect(await next()).toEqual([0, WRITABLE]);
    poller.start(READABLE | DISCONNECT); // changes the mask of a started poller
    fs.closeSync(b);
    const [status, events] = await next();
    expect(status).toBe(0);
    expect(events & DISCONNECT).toBe(DISCONNECT);
  });

  it('stop() silences it; start() again resumes', async () => {
    const fd = eventfd();
    const { poller, calls, next } = recordingPoller(fd);
    poller.start(READABLE);
    poller.stop();
    binding.eventfdSignal(fd);
    await sleep(30);
    expect(calls).toEqual([]);
    poller.start(READABLE);
    expect(await next()).toEqual([0, READABLE]);
  });

  it('close() is idempotent and later start/stop throw', async () => {
    const fd = eventfd();
    const { poller, calls } = recordingPoller(fd);
    poller.start(READABLE);
    poller.close();
    poller.close();
    binding.eventfdSignal(fd);
    await sleep(20);
    expect(calls).toEqual([]);
    expect(() => poller.start(READABLE)).toThrow('Poller is closed');
    expect(() => poller.stop()).toThrow('Poller is closed');
  });

  it('may close itself from its own callback', async () => {
    const fd = eventfd();
    let calls = 0;
    const closed = new Promise<void>((resolve) => {
      const poller = new binding.Poller(fd, () => {
        calls++;
        poller.close();
        resolve();
      });
      poller.start(READABLE);
    });
    binding.eventfdSignal(fd); // never drained: would fire again and again if still open
    await closed;
    await sleep(20);
    expect(calls).toBe(1);
  });

  it('keeps a started poller alive without a strong JS reference, and fires it', async () => {
    const fd = eventfd();
    let fired = 0;
    const weak = (() => {
      const poller = new binding.Poller(fd, () => {
        fired++;
        binding.eventfdDrain(fd);
      });
      poller.start(READABLE);
      return new WeakRef(poller);
    })();
    for (let i = 0; i < 3; i++) {
      gc();
      await sleep(1);
    }
    expect(weak.deref()).toBeDefined();
    binding.eventfdSignal(fd);
    await sleep(30);
    expect(fired).toBe(1);
    weak.deref()!.close(); // a poller must be closed before its fd
  });

  it('a stopped poller is collectable again', async () => {
    const fd = eventfd();
    const weak = (() => {
      const poller = new binding.Poller(fd, () => {});
      poller.start(READABLE);
      poller.stop();
      return new WeakRef(poller);
    })();
    // deref() keeps the target alive until the end of the current job, so collect in fresh jobs.
    for (let i = 0; i < 3; i++) {
      await sleep(1);
      gc();
    }
    await sleep(1);
    expect(weak.deref()).toBeUndefined();
  });

  it('a garbage-collected, never-started poller releases its handle without crashing', async () => {
    const fd = eventfd();
    for (let i = 0; i < 100; i++) new binding.Poller(fd, () => {});
    for (let i = 0; i < 3; i++) {
      gc();
      await sleep(1);
    }
    // Watching the fd again works: nothing stale is registered for it.
    const { poller, next } = recordingPoller(fd);
    poller.start(READABLE);
    binding.eventfdSignal(fd);
    expect(await next()).toEqual([0, READABLE]);
  });

  it('rejects an fd libuv cannot poll, and a closed fd', () => {
    const file = fs.openSync(__filename, 'r'); // regular files cannot be epolled
    opened.push(file);
    expect(() => new binding.Poller(file, () => {})).toThrow(
      expect.objectContaining({ code: 'EPERM', syscall: 'uv_poll_init' }),
    );
    const fd = eventfd();
    fs.closeSync(fd);
    expect(() => new binding.Poller(fd, () => {})).toThrow(
      expect.objectContaining({ code: 'EBADF', errno: 9, syscall: 'uv_poll_init' }),
    );
  });

  it('rejects bad event masks', () => {
    const fd = eventfd();
    const { poller } = recordingPoller(fd);
    expect(() => poller.start(0)).toThrow(RangeError);
    expect(() => poller.start(8)).toThrow(RangeError);
    expect(() => poller.start(-1)).toThrow(RangeError);
    expect(() => poller.start('1' as unknown as number)).toThrow(TypeError);
  });
});
