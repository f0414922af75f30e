import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';

import { binding } from '../../lib/native/binding';
import { EventFd } from '../../lib/native/eventfd';
import { Fd } from '../../lib/native/fd';
import { isNonBlocking, isOpen, useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

describe('EventFd', () => {
  it('creates a non-blocking eventfd; signal and drain', () => {
    const e = EventFd.create();
    expect(isNonBlocking(e.fd.value)).toBe(true);
    expect(e.drain()).toBe(0);
    expect(e.signal()).toBe(true);
    expect(e.signal()).toBe(true);
    expect(e.drain()).toBe(2);
    e.close();
  });

  it('supports initval and semaphore mode', () => {
    const e = EventFd.create({ initval: 3, semaphore: true });
    expect([e.drain(), e.drain(), e.drain(), e.drain()]).toEqual([1, 1, 1, 0]);
    e.close();
  });

  it('watch() drains and reports each wake-up; unwatch() stops it', async () => {
    const e = EventFd.create();
    const counts: number[] = [];
    e.watch((count) => counts.push(count));
    expect(e.watching).toBe(true);
    e.signal();
    e.signal();
    await sleep(20);
    expect(counts).toEqual([2]);
    e.signal();
    await sleep(20);
    expect(counts).toEqual([2, 1]);
    e.unwatch();
    expect(e.watching).toBe(false);
    e.signal();
    await sleep(20);
    expect(counts).toEqual([2, 1]);
    expect(e.drain()).toBe(1);
    e.close();
  });

  it('watch() again replaces the listener', async () => {
    const e = EventFd.create();
    const first: number[] = [];
    const second: number[] = [];
    e.watch((c) => first.push(c));
    e.watch((c) => second.push(c));
    e.signal();
    await sleep(20);
    expect(first).toEqual([]);
    expect(second).toEqual([1]);
    e.close();
  });

  it('close() stops the watcher before closing the fd, and is idempotent', async () => {
    const e = EventFd.create();
    const raw = e.fd.value;
    const counts: number[] = [];
    e.watch((c) => counts.push(c));
    e.signal();
    e.close();
    expect(e.closed).toBe(true);
    expect(e.watching).toBe(false);
    expect(isOpen(raw)).toBe(false);
    e.close();
    await sleep(20);
    expect(counts).toEqual([]);
    expect(() => e.signal()).toThrow(expect.objectContaining({ code: 'EBADF' }));
    expect(() => e.watch(() => {})).toThrow(expect.objectContaining({ code: 'EBADF' }));
    // The number may be reused at once: a new poller on it must be possible (no stale watcher).
    const again = EventFd.create();
    again.watch(() => {});
    again.close();
  });

  it('adopts an eventfd created elsewhere (even a blocking one) without blocking', () => {
    const e = new EventFd(new Fd(binding.eventfd(0)));
    expect(isNonBlocking(e.fd.value)).toBe(false);
    expect(e.drain()).toBe(0);
    e.signal();
    expect(e.drain()).toBe(1);
    e.close();
  });
});
