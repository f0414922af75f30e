// IoUring (lib/native/uring.ts over native/uring.cc): batched submission, completions as
// results, errors shaped like Node's, slots reused, more requests than slots, teardown.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { binding } from '../../lib/native/binding';
import { IoUring, uringConstants } from '../../lib/native/uring';
import { openFds, useFdLeakCheck } from '../helpers/fds';

function ringOrSkip(): IoUring | null {
  try {
    return IoUring.open(8);
  } catch {
    return null;
  }
}
const probe = ringOrSkip();
void probe?.close();

useFdLeakCheck();
let dir: string;
let fd: number;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'uring-'));
  fd = fs.openSync(path.join(dir, 'f'), 'w+');
  fs.ftruncateSync(fd, 1 << 20);
});
afterEach(() => {
  fs.closeSync(fd);
  fs.rmSync(dir, { recursive: true, force: true });
});

describe.skipIf(probe === null)('IoUring', () => {
  it('writes and reads in place, single and vectored, and resolves with the byte counts', async () => {
    const ring = IoUring.open(8);
    expect(ring.entries).toBe(8);
    const a = Buffer.alloc(4096, 0xa1);
    const b = [Buffer.alloc(100, 1), Buffer.alloc(3996, 2)];
    const [wa, wb] = await Promise.all([ring.write(fd, 0, a), ring.write(fd, 4096, b, uringConstants.RWF_DSYNC)]);
    expect([wa, wb]).toEqual([4096, 4096]);
    const back = Buffer.alloc(8192);
    expect(await ring.read(fd, 0, [back.subarray(0, 10), back.subarray(10)])).toBe(8192);
    expect(back).toEqual(Buffer.concat([a, ...b]));
    // Past the end of the file: a short read, reported as such.
    expect(await ring.read(fd, (1 << 20) - 100, Buffer.alloc(4096))).toBe(100);
    expect(await ring.fsync(fd)).toBe(0);
    await ring.close();
  });

  it('takes more requests than it has slots (the rest wait) and reuses every slot', async () => {
    const ring = IoUring.open(4);
    const bufs = Array.from({ length: 100 }, (_, i) => Buffer.alloc(512, i));
    const wrote = await Promise.all(bufs.map((buf, i) => ring.write(fd, i * 512, buf)));
    expect(wrote.every((n) => n === 512)).toBe(true);
    const backs = Array.from({ length: 100 }, () => Buffer.alloc(512));
    await Promise.all(backs.map((buf, i) => ring.read(fd, i * 512, buf)));
    for (let i = 0; i < 100; i++) expect(backs[i]![0]).toBe(i);
    expect(ring.inFlight).toBe(0);
    await ring.close();
  });

  it('rejects failed requests with code, errno and syscall, and keeps working', async () => {
    const ring = IoUring.open(8);
    const ro = fs.openSync(path.join(dir, 'f'), 'r');
    const err = await ring.write(ro, 0, Buffer.alloc(512)).catch((e: unknown) => e as NodeJS.ErrnoException);
    expect(err).toMatchObject({ code: 'EBADF', errno: 9, syscall: 'write' });
    expect((err as Error).message).toMatch(/^EBADF: .*, write$/);
    fs.closeSync(ro);
    const bad = await ring.fallocate(fd, 0xffff, 0, 4096).catch((e: unknown) => e as NodeJS.ErrnoException);
    expect(bad).toMatchObject({ syscall: 'fallocate' });
    expect(await ring.read(fd, 0, Buffer.alloc(512))).toBe(512);
    await ring.close();
  });

  it('argument mistakes throw synchronously and free the slot', async () => {
    const ring = IoUring.open(2);
    expect(() => ring.read(fd, -1, Buffer.alloc(1))).toThrow(RangeError);
    expect(() => ring.read(fd, 0, [] as Buffer[])).toThrow(RangeError);
    expect(() => ring.read(fd, 0, 'x' as unknown as Buffer)).toThrow(TypeError);
    expect(() => ring.read(fd, 0, [new Uint16Array(2) as unknown as Buffer])).toThrow(TypeError);
    await Promise.all([ring.read(fd, 0, Buffer.alloc(1)), ring.read(fd, 0, Buffer.alloc(1)), ring.read(fd, 0, Buffer.alloc(1))]);
    await ring.close();
  });

  it('close waits for requests in flight, is idempotent, and later requests throw', async () => {
    const ring = IoUring.open(8);
    let done = false;
    void ring.write(fd, 0, Buffer.alloc(65536, 3)).then(() => (done = true));
    await ring.close();
    expect(done).toBe(true);
    await ring.close();
    expect(() => ring.read(fd, 0, Buffer.alloc(1))).toThrow(/closed/);
  });

  it('completes writes the kernel finishes later (poll watcher), and the loop still turns', async () => {
    const ring = IoUring.open(8);
    // Allocating writes to a sparse file go to the kernel's workers on most file systems.
    const big = fs.openSync(path.join(dir, 'sparse'), 'w+');
    let timerRan = false;
    const timer = setTimeout(() => (timerRan = true), 1);
    const writes: Promise<number>[] = [];
    for (let i = 0; i < 64; i++) writes.push(ring.write(big, i * (1 << 20), Buffer.alloc(4096, i)));
    await Promise.all(writes);
    // A reader looping on page-cache hits (completed inside the submit) lets timers run.
    const b = Buffer.alloc(4096);
    const until = Date.now() + 50;
    while (!timerRan && Date.now() < until) await ring.read(big, 0, b);
    clearTimeout(timer);
    expect(timerRan).toBe(true);
    await ring.close();
    fs.closeSync(big);
  });

  it('a failed ring rejects what the kernel never took, and keeps what it took pending until it completes', async () => {
    // A FIFO read stays with the kernel until someone writes: the request in flight at the failure.
    const fifo = path.join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    const pipe = fs.openSync(fifo, fs.constants.O_RDWR);
    const ring = IoUring.open(4);
    const ringFd = [...openFds()].find(([, target]) => target === 'anon_inode:[io_uring]')![0];
    const taken = Buffer.alloc(16);
    let first: unknown = 'pending';
    const firstDone = ring.read(pipe, 0, taken).then((n) => (first = n), (e: Error) => (first = e));
    await new Promise((r) => setTimeout(r, 20));
    expect(ring.inFlight).toBe(1);
    // Break the ring: its fd number now names /dev/null, so the next io_uring_enter fails.
    fs.closeSync(ringFd);
    const stand = fs.openSync('/dev/null', 'r');
    expect(stand).toBe(ringFd); // closed by ring.close() below, as the ring's fd
    await expect(ring.read(pipe, 0, Buffer.alloc(4))).rejects.toMatchObject({ code: 'EOPNOTSUPP', syscall: 'io_uring_enter' });
    expect(() => ring.read(pipe, 0, Buffer.alloc(4))).toThrow(/closed/);
    await new Promise((r) => setTimeout(r, 20));
    // The kernel still holds the first read's buffer: it must not be reported done before it is.
    expect(first).toBe('pending');
    let closed = false;
    const closing = ring.close().then(() => (closed = true));
    await new Promise((r) => setTimeout(r, 10));
    expect(closed).toBe(false);
    fs.writeSync(pipe, Buffer.from('after the failure'));
    await firstDone;
    expect(first).toBe(16);
    expect(taken.toString('latin1')).toBe('after the failur');
    await closing;
    fs.closeSync(pipe);
  });

  it('the native object checks `this` and refuses use after close', () => {
    const native = new (binding as unknown as { IoUring: new (n: number) => { close(): void; submit(): number; reap(o: Int32Array): number } }).IoUring(2);
    const { submit } = native;
    expect(() => submit.call({})).toThrow(TypeError);
    expect(() => native.reap(new Uint8Array(4) as unknown as Int32Array)).toThrow(TypeError);
    native.close();
    native.close();
    expect(() => native.submit()).toThrow(/closed/);
  });

  it('words why io_uring is unavailable', () => {
    expect(IoUring.unavailableReason(Object.assign(new Error('x'), { code: 'ENOSYS' }))).toMatch(/no io_uring/);
    expect(IoUring.unavailableReason(Object.assign(new Error('x'), { code: 'EPERM' }))).toMatch(/^io_uring unavailable: .*\(EPERM\)$/);
  });
});
