import * as fs from 'node:fs';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';

import { binding, PACKAGE_ROOT, RECV_NONE, RecvState, type Poller } from '../../lib/native/binding';
import { isOpen, useFdLeakCheck } from '../helpers/fds';

const { READABLE, WRITABLE, DISCONNECT } = binding.pollEvents;
const { EFD_NONBLOCK, EFD_SEMAPHORE } = binding.constants;
const { OFFSET, LENGTH, RESULT, FDS } = RecvState;

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

// ---- the fused receive (receiveInto) and busy polling (busyPoll) ----

function pair(): [number, number] {
  const [a, b] = binding.socketpair();
  opened.push(a, b);
  return [a, b];
}

/** A state array for `fds` fds, armed to receive `length` bytes at `offset`. */
function state(offset: number, length: number, fds = 4): Int32Array {
  const st = new Int32Array(FDS + 1 + fds);
  st[OFFSET] = offset;
  st[LENGTH] = length;
  st[RESULT] = RECV_NONE;
  return st;
}

/** Resolves with what the state held at the next callback, then resets it. */
function fusedPoller(fd: number, buffer: Uint8Array, st: Int32Array) {
  const seen: Array<{ result: number; fds: number[]; events: number }> = [];
  let wake: (() => void) | undefined;
  const poller = new binding.Poller(fd, (_status, events) => {
    const fds = Array.from(st.subarray(FDS + 1, FDS + 1 + st[FDS]!));
    seen.push({ result: st[RESULT]!, fds, events });
    st[RESULT] = RECV_NONE;
    st[FDS] = 0;
    wake?.();
  });
  pollers.push(poller);
  poller.receiveInto(buffer, st);
  const next = async () => {
    const count = seen.length;
    while (seen.length === count) await new Promise<void>((resolve) => (wake = resolve));
    return seen[seen.length - 1]!;
  };
  return { poller, seen, next };
}

describe('Poller fused receive', () => {
  it('receives at the offset before calling back, with the fds', async () => {
    const [a, b] = pair();
    const buffer = Buffer.alloc(64);
    const st = state(8, 32);
    const { poller, next } = fusedPoller(b, buffer, st);
    poller.start(READABLE);
    const memfd = binding.memfdCreate('fused');
    opened.push(memfd);
    binding.sendmsg(a, [Buffer.from('hello')], [memfd]);
    const got = await next();
    expect(got.result).toBe(5);
    expect(buffer.subarray(8, 13).toString()).toBe('hello');
    expect(got.fds).toHaveLength(1);
    opened.push(got.fds[0]!);
    expect(fs.readlinkSync(`/proc/self/fd/${got.fds[0]}`)).toContain('memfd:fused');
  });

  it('reports end of stream as 0, and a receive it did not make as RECV_NONE', async () => {
    const [a, b] = pair();
    const buffer = Buffer.alloc(16);
    const st = state(0, 16);
    const { poller, next } = fusedPoller(b, buffer, st);
    st[LENGTH] = 0; // paused: the callback reads for itself
    poller.start(READABLE | DISCONNECT);
    binding.sendmsg(a, [Buffer.from('x')]);
    expect((await next()).result).toBe(RECV_NONE);
    expect(binding.recvmsg(b, Buffer.alloc(4), 0, 4, new Int32Array(1))).toBe(1);
    st[LENGTH] = 16;
    fs.closeSync(a);
    opened = opened.filter((fd) => fd !== a);
    expect((await next()).result).toBe(0);
  });

  it('makes no receive while the last result is unconsumed, nor outside the buffer', async () => {
    const [a, b] = pair();
    const buffer = Buffer.alloc(16);
    const st = state(0, 16);
    let calls = 0;
    const poller = new binding.Poller(b, () => {
      calls++;
      poller.stop();
    });
    pollers.push(poller);
    poller.receiveInto(buffer, st);
    st[RESULT] = 7; // as if the callback had not taken the last one
    poller.start(READABLE);
    binding.sendmsg(a, [Buffer.from('abc')]);
    await sleep(20);
    expect(calls).toBe(1);
    expect(st[RESULT]).toBe(7);
    st[RESULT] = RECV_NONE;
    st[OFFSET] = 10; // 10 + 16 > 16: refused, nothing written
    poller.start(READABLE);
    await sleep(20);
    expect(calls).toBe(2);
    expect(st[RESULT]).toBe(RECV_NONE);
    expect(buffer.every((x) => x === 0)).toBe(true);
  });

  it('receiveInto(null) disarms it; bad arguments throw', async () => {
    const [a, b] = pair();
    const buffer = Buffer.alloc(16);
    const st = state(0, 16);
    const { poller, next } = fusedPoller(b, buffer, st);
    poller.receiveInto(null);
    poller.start(READABLE);
    binding.sendmsg(a, [Buffer.from('abc')]);
    expect((await next()).result).toBe(RECV_NONE);
    expect(() => poller.receiveInto(new Uint16Array(4) as unknown as Uint8Array, st)).toThrow(TypeError);
    expect(() => poller.receiveInto(buffer, new Int32Array(3))).toThrow(TypeError);
    expect(() => poller.busyPoll(-1)).toThrow(RangeError);
    expect(() => poller.busyPoll(10001)).toThrow(RangeError);
    poller.close();
    expect(() => poller.receiveInto(buffer, st)).toThrow('Poller is closed');
  });
});

describe('Poller fused receive in a Worker that goes away', () => {
  it('closes the fds a receive brought that JS never took', async () => {
    const [a, b] = binding.socketpair();
    opened.push(a, b);
    const worker = new Worker(path.join(__dirname, 'fixtures', 'untaken-fds-worker.cjs'), {
      workerData: { root: PACKAGE_ROOT, fd: b },
      trackUnmanagedFds: false,
    });
    const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
    const messages: unknown[] = [];
    let next: (() => void) | null = null;
    worker.on('message', (m: unknown) => {
      messages.push(m);
      next?.();
    });
    const message = async (): Promise<unknown> => {
      while (messages.length === 0) await new Promise<void>((resolve) => (next = resolve));
      return messages.shift();
    };
    expect(await message()).toBe('ready');
    const sent = [eventfd(), eventfd()];
    expect(binding.sendmsg(a, [Buffer.from('fds')], sent)).toBe(3);
    for (const fd of sent) fs.closeSync(fd);
    const got = (await message()) as { result: number; fds: number[] };
    expect(got.result).toBe(3);
    expect(got.fds).toHaveLength(2);
    // The Worker's copies, open until it goes.
    for (const fd of got.fds) expect(isOpen(fd)).toBe(true);
    await worker.terminate();
    await exited;
    for (const fd of got.fds) expect(isOpen(fd)).toBe(false);
  });
});

describe('Poller busy polling', () => {
  /**
   * Ping-pong with an echoing Worker; counts the callbacks between consecutive event-loop turns
   * (a setImmediate runs once per turn). Without busy polling the poll phase calls back at most
   * once per turn; with it, answers that come within the window are taken in the same turn.
   */
  async function pingPong(busyUs: number, rounds: number, returnValue: boolean) {
    const [a, b] = binding.socketpair();
    opened.push(a);
    const worker = new Worker(path.join(__dirname, 'fixtures', 'echo-worker.cjs'), {
      workerData: { root: PACKAGE_ROOT, fd: b },
      trackUnmanagedFds: false,
    });
    const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
    const buffer = Buffer.alloc(64);
    const st = state(0, 64);
    let inTurn = 0;
    let mostInTurn = 0;
    let done = 0;
    let turns = 0;
    const tick = (): void => {
      turns++;
      inTurn = 0;
      if (done < rounds) setImmediate(tick);
    };
    setImmediate(tick);
    let timerFired = 0;
    const timer = setInterval(() => timerFired++, 2);
    const finished = new Promise<void>((resolve) => {
      const poller = new binding.Poller(a, () => {
        if (st[RESULT]! > 0) {
          st[RESULT] = RECV_NONE;
          done++;
          mostInTurn = Math.max(mostInTurn, ++inTurn);
          if (done === rounds) {
            poller.busyPoll(0);
            resolve();
            return false;
          }
          binding.sendmsg(a, [Buffer.from('ping')]);
          return returnValue;
        }
        st[RESULT] = RECV_NONE;
        return false;
      });
      pollers.push(poller);
      poller.receiveInto(buffer, st);
      poller.busyPoll(busyUs);
      poller.start(READABLE);
    });
    binding.sendmsg(a, [Buffer.from('ping')]);
    await finished;
    clearInterval(timer);
    fs.closeSync(a); // the worker sees EOF and closes its end
    opened = opened.filter((fd) => fd !== a);
    await exited;
    return { mostInTurn, turns, timerFired };
  }

  it('off: one callback per event-loop turn', async () => {
    const r = await pingPong(0, 200, true);
    expect(r.mostInTurn).toBe(1);
  });

  it('on: answers within the window are taken in the same turn, and timers still run', async () => {
    const r = await pingPong(10000, 2000, true);
    expect(r.mostInTurn).toBeGreaterThan(1);
    // A turn is bounded (1 ms), so a 2 ms interval keeps firing while traffic never stops.
    expect(r.timerFired).toBeGreaterThan(0);
  });

  it('on, but the callback does not return true: no busy polling', async () => {
    const r = await pingPong(10000, 200, false);
    expect(r.mostInTurn).toBe(1);
  });
});
