import * as fs from 'node:fs';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';

import { binding, PACKAGE_ROOT } from '../../lib/native/binding';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

const script = path.join(__dirname, 'fixtures', 'worker.cjs');

function run(id: number, linger = false): { worker: Worker; result: Promise<Record<string, unknown>>; exit: Promise<number> } {
  // trackUnmanagedFds off: the fds here come from the addon, not fs.open, and a Worker that tracks
  // fds warns "closed but not opened in unmanaged mode" for each one fs.closeSync closes.
  const worker = new Worker(script, { workerData: { root: PACKAGE_ROOT, id, linger }, trackUnmanagedFds: false });
  const result = new Promise<Record<string, unknown>>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  const exit = new Promise<number>((resolve) => worker.once('exit', resolve));
  return { worker, result, exit };
}

function mappingsOfWorkerMemfd(): number {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((line) => line.includes('/memfd:worker ')).length;
}

describe('worker_threads', () => {
  it('loads and works in a Worker, which then exits cleanly', async () => {
    const { result, exit } = run(1);
    expect(await result).toEqual({
      n: 2,
      fds: 1,
      text: 'hello from worker 1',
      status: 0,
      events: binding.pollEvents.READABLE,
      count: 1,
      detached: true,
    });
    expect(await exit).toBe(0);
  });

  it('runs in two Workers at once, alongside the main thread', async () => {
    const one = run(1);
    const two = run(2);
    const [a, b] = binding.socketpair(); // the main environment keeps working meanwhile
    binding.sendmsg(a, [Buffer.from('main')]);
    const [r1, r2] = await Promise.all([one.result, two.result]);
    expect(r1.text).toBe('hello from worker 1');
    expect(r2.text).toBe('hello from worker 2');
    expect(await Promise.all([one.exit, two.exit])).toEqual([0, 0]);
    const buf = Buffer.alloc(4);
    expect(binding.recvmsg(b, buf, 0, 4, new Int32Array(1))).toBe(4);
    fs.closeSync(a);
    fs.closeSync(b);
  });

  it('terminating a Worker with a started Poller and a live mapping does not crash', async () => {
    const { worker, result, exit } = run(3, true);
    const reply = await result;
    expect(reply.text).toBe('hello from worker 3');
    expect(mappingsOfWorkerMemfd()).toBe(1);
    await worker.terminate();
    expect(await exit).toBe(1);
    // The worker's environment teardown ran the mapping's finaliser.
    expect(mappingsOfWorkerMemfd()).toBe(0);
    for (const fd of reply.fdsToClose as number[]) fs.closeSync(fd);
    // The process is still healthy: the addon keeps working here.
    const fd = binding.eventfd(0);
    expect(binding.eventfdSignal(fd)).toBe(true);
    fs.closeSync(fd);
  });
});
