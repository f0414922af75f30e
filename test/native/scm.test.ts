import * as fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';

import { binding, WOULD_BLOCK } from '../../lib/native/binding';
import { fdFlags, isCloexec, isOpen, useFdLeakCheck } from '../helpers/fds';

const { SCM_MAX_FD } = binding.constants;

// Registered first: vitest runs afterEach hooks in reverse order, so the check runs last.
useFdLeakCheck();

// Every fd a test opens goes here and is closed after it (before the leak check compares).
let opened: number[] = [];
function track<T extends number | number[]>(fds: T): T {
  opened.push(...(Array.isArray(fds) ? fds : [fds]));
  return fds;
}
afterEach(() => {
  for (const fd of opened) if (isOpen(fd)) fs.closeSync(fd);
  opened = [];
});

function pair(): [number, number] {
  return track(binding.socketpair());
}

function memfd(text: string): number {
  const fd = track(binding.memfdCreate('scm-test'));
  fs.writeSync(fd, text);
  return fd;
}

/** Reads `fd`'s contents from the start (pread, so the shared file offset is untouched). */
function contents(fd: number): string {
  const buf = Buffer.alloc(64);
  return buf.subarray(0, fs.readSync(fd, buf, 0, buf.length, 0)).toString();
}

function fdsOf(out: Int32Array): number[] {
  return track(Array.from(out.subarray(1, 1 + out[0]!)));
}

describe('sendmsg/recvmsg', () => {
  it('moves bytes without fds; fdsOut[0] is 0', () => {
    const [a, b] = pair();
    expect(binding.sendmsg(a, [Buffer.from('hello')])).toBe(5);
    expect(binding.sendmsg(a, [Buffer.from('!')], null)).toBe(1);
    expect(binding.sendmsg(a, [Buffer.from('?')], [])).toBe(1);
    const buf = Buffer.alloc(16);
    const out = new Int32Array(4).fill(99);
    expect(binding.recvmsg(b, buf, 0, 16, out)).toBe(7);
    expect(buf.subarray(0, 7).toString()).toBe('hello!?');
    expect(out[0]).toBe(0);
  });

  it('sends the concatenation of several iovecs in one call', () => {
    const [a, b] = pair();
    const parts = ['head', '', 'er-', 'body'].map((s) => Buffer.from(s));
    const u8 = new Uint8Array([0x21, 0x22]);
    expect(binding.sendmsg(a, [...parts, u8])).toBe(13);
    const buf = Buffer.alloc(32);
    expect(binding.recvmsg(b, buf, 0, 32, new Int32Array(1))).toBe(13);
    expect(buf.subarray(0, 13).toString()).toBe('header-body!"');
  });

  it('takes up to 64 iovecs in one call', () => {
    const [a, b] = pair();
    const views = Array.from({ length: 64 }, (_, i) => Buffer.from([i]));
    expect(binding.sendmsg(a, views)).toBe(64);
    const buf = Buffer.alloc(128);
    expect(binding.recvmsg(b, buf, 0, 128, new Int32Array(1))).toBe(64);
    expect([...buf.subarray(0, 64)]).toEqual(views.map((v) => v[0]));
  });

  it('reads into buf at offset and never past offset + length', () => {
    const [a, b] = pair();
    binding.sendmsg(a, [Buffer.from('abcdefgh')]);
    const buf = Buffer.alloc(10, '.');
    expect(binding.recvmsg(b, buf, 3, 4, new Int32Array(1))).toBe(4);
    expect(buf.toString()).toBe('...abcd...');
    expect(binding.recvmsg(b, buf, 0, 10, new Int32Array(1))).toBe(4);
    expect(buf.subarray(0, 4).toString()).toBe('efgh');
  });

  it('passes one fd: a new close-on-exec fd for the same file', () => {
    const [a, b] = pair();
    const file = memfd('one');
    expect(binding.sendmsg(a, [Buffer.from('x')], [file])).toBe(1);
    const out = new Int32Array(4);
    expect(binding.recvmsg(b, Buffer.alloc(4), 0, 4, out)).toBe(1);
    expect(out[0]).toBe(1);
    const [got] = fdsOf(out);
    expect(got).not.toBe(file);
    expect(isCloexec(got!)).toBe(true);
    expect(fs.fstatSync(got!).ino).toBe(fs.fstatSync(file).ino);
    expect(contents(got!)).toBe('one');
    // the sender still owns its fd
    expect(isOpen(file)).toBe(true);
  });

  it('passes many fds, in order, up to SCM_MAX_FD', () => {
    const [a, b] = pair();
    const files = Array.from({ length: 3 }, (_, i) => memfd(`file${i}`));
    const many = Array.from({ length: SCM_MAX_FD }, (_, i) => files[i % 3]!);
    expect(binding.sendmsg(a, [Buffer.from('m')], Int32Array.from(many))).toBe(1);
    const out = new Int32Array(SCM_MAX_FD + 1);
    expect(binding.recvmsg(b, Buffer.alloc(4), 0, 4, out)).toBe(1);
    expect(out[0]).toBe(SCM_MAX_FD);
    const got = fdsOf(out);
    expect(new Set(got).size).toBe(SCM_MAX_FD);
    got.forEach((fd, i) => expect(contents(fd)).toBe(`file${i % 3}`));
  });

  it('rejects more than SCM_MAX_FD fds before sending anything', () => {
    const [a, b] = pair();
    const file = memfd('x');
    const tooMany = new Array<number>(SCM_MAX_FD + 1).fill(file);
    expect(() => binding.sendmsg(a, [Buffer.from('x')], tooMany)).toThrow(RangeError);
    expect(binding.recvmsg(b, Buffer.alloc(4), 0, 4, new Int32Array(2))).toBe(WOULD_BLOCK);
  });

  it('batches: one recvmsg reads what several sendmsgs wrote', () => {
    const [a, b] = pair();
    for (let i = 0; i < 10; i++) expect(binding.sendmsg(a, [Buffer.from(`<${i}>`)])).toBe(3);
    const buf = Buffer.alloc(100);
    expect(binding.recvmsg(b, buf, 0, 100, new Int32Array(1))).toBe(30);
    expect(buf.subarray(0, 30).toString()).toBe('<0><1><2><3><4><5><6><7><8><9>');
  });

  it("batches: a read stops after the fds of one sender's message (Appendix C)", () => {
    const [a, b] = pair();
    const f1 = memfd('f1');
    const f2 = memfd('f2');
    binding.sendmsg(a, [Buffer.from('plain')]);
    binding.sendmsg(a, [Buffer.from('first')], [f1]);
    binding.sendmsg(a, [Buffer.from('second')], [f2]);
    const buf = Buffer.alloc(100);
    const out = new Int32Array(8);
    const n1 = binding.recvmsg(b, buf, 0, 100, out);
    expect(buf.subarray(0, n1).toString()).toBe('plainfirst');
    expect(fdsOf(out).map(contents)).toEqual(['f1']);
    const n2 = binding.recvmsg(b, buf, 0, 100, out);
    expect(buf.subarray(0, n2).toString()).toBe('second');
    expect(fdsOf(out).map(contents)).toEqual(['f2']);
  });

  it('control truncation: closes the fds that arrived and throws EMSGSIZE', () => {
    const [a, b] = pair();
    const file = memfd('t');
    // Count after the setup, so that every fd that arrives must have been closed again.
    const fdCount = fs.readdirSync('/proc/self/fd').length;
    expect(binding.sendmsg(a, [Buffer.from('trunc')], [file, file, file, file, file])).toBe(5);
    const out = new Int32Array(3); // room for 2
    let error: NodeJS.ErrnoException | undefined;
    try {
      binding.recvmsg(b, Buffer.alloc(8), 0, 8, out);
    } catch (err) {
      error = err as NodeJS.ErrnoException;
    }
    expect(error).toBeInstanceOf(Error);
    expect(error).toMatchObject({ code: 'EMSGSIZE', errno: 90, syscall: 'recvmsg' });
    expect(out[0]).toBe(0);
    expect(fs.readdirSync('/proc/self/fd').length).toBe(fdCount);
  });

  it('control truncation with no room at all (fdsOut of length 1)', () => {
    const [a, b] = pair();
    const file = memfd('t');
    const fdCount = fs.readdirSync('/proc/self/fd').length;
    binding.sendmsg(a, [Buffer.from('x')], [file]);
    expect(() => binding.recvmsg(b, Buffer.alloc(8), 0, 8, new Int32Array(1))).toThrow(
      expect.objectContaining({ code: 'EMSGSIZE' }),
    );
    expect(fs.readdirSync('/proc/self/fd').length).toBe(fdCount);
  });

  it('an odd fd capacity is exact (no extra fd squeezed into CMSG_SPACE padding)', () => {
    const [a, b] = pair();
    const file = memfd('p');
    const fdCount = fs.readdirSync('/proc/self/fd').length;
    binding.sendmsg(a, [Buffer.from('x')], [file, file]);
    // fdsOut has room for 1; two were sent: must be truncation, not two fds written past the end
    const out = new Int32Array(2);
    expect(() => binding.recvmsg(b, Buffer.alloc(8), 0, 8, out)).toThrow(
      expect.objectContaining({ code: 'EMSGSIZE' }),
    );
    expect(fs.readdirSync('/proc/self/fd').length).toBe(fdCount);
  });

  it('recvmsg returns -1 when nothing is available', () => {
    const [, b] = pair();
    const out = new Int32Array(2).fill(7);
    expect(binding.recvmsg(b, Buffer.alloc(8), 0, 8, out)).toBe(WOULD_BLOCK);
    expect(out[0]).toBe(0);
  });

  it('sendmsg returns -1 once the socket is full, and partial counts before that', () => {
    const [a, b] = pair();
    const chunk = Buffer.alloc(64 * 1024, 1);
    let total = 0;
    let partial = false;
    for (let i = 0; i < 10_000; i++) {
      const n = binding.sendmsg(a, [chunk]);
      if (n === WOULD_BLOCK) break;
      expect(n).toBeGreaterThan(0);
      if (n < chunk.length) partial = true;
      total += n;
    }
    expect(binding.sendmsg(a, [chunk])).toBe(WOULD_BLOCK);
    expect(total).toBeGreaterThan(0);
    expect(partial || total % chunk.length === 0).toBe(true);
    // draining makes room again
    const buf = Buffer.alloc(256 * 1024);
    let drained = 0;
    for (let n; (n = binding.recvmsg(b, buf, 0, buf.length, new Int32Array(1))) > 0; ) drained += n;
    expect(drained).toBe(total);
    expect(binding.sendmsg(a, [chunk])).toBeGreaterThan(0);
  });

  it('recvmsg returns 0 at end of stream', () => {
    const [a, b] = pair();
    binding.sendmsg(a, [Buffer.from('last')]);
    fs.closeSync(a);
    const buf = Buffer.alloc(8);
    expect(binding.recvmsg(b, buf, 0, 8, new Int32Array(1))).toBe(4);
    expect(binding.recvmsg(b, buf, 0, 8, new Int32Array(1))).toBe(0);
    expect(binding.recvmsg(b, buf, 0, 8, new Int32Array(1))).toBe(0);
  });

  it('sendmsg to a closed peer throws EPIPE without killing the process (MSG_NOSIGNAL)', () => {
    const [a, b] = pair();
    fs.closeSync(b);
    expect(() => binding.sendmsg(a, [Buffer.from('x')])).toThrow(
      expect.objectContaining({ code: 'EPIPE', errno: 32, syscall: 'sendmsg' }),
    );
  });

  it('socketpair fds are non-blocking and close-on-exec', () => {
    const [a, b] = pair();
    for (const fd of [a, b]) {
      expect(fdFlags(fd) & 0o4000).toBe(0o4000);
      expect(isCloexec(fd)).toBe(true);
    }
  });
});
