import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { binding, WOULD_BLOCK } from '../../lib/native/binding';
import { isCloexec, isNonBlocking, isOpen, useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

let dir = '';
let opened: number[] = [];
function track(fd: number): number {
  opened.push(fd);
  return fd;
}
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfu-socket-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});
afterEach(() => {
  for (const fd of opened) if (isOpen(fd)) fs.closeSync(fd);
  opened = [];
});

let counter = 0;
function socketPath(): string {
  return path.join(dir, `s${counter++}.sock`);
}

describe('unix sockets', () => {
  it('listen, connect and accept make a working, non-blocking, close-on-exec pair', () => {
    const where = socketPath();
    const listener = track(binding.unixListen(where, 4));
    expect(fs.statSync(where).isSocket()).toBe(true);
    expect(binding.unixAccept(listener)).toBe(WOULD_BLOCK);

    const client = track(binding.unixConnect(where));
    const server = track(binding.unixAccept(listener));
    expect(server).toBeGreaterThanOrEqual(0);
    expect(binding.unixAccept(listener)).toBe(WOULD_BLOCK);

    for (const fd of [listener, client, server]) {
      expect(isNonBlocking(fd)).toBe(true);
      expect(isCloexec(fd)).toBe(true);
    }
    expect(binding.sendmsg(client, [Buffer.from('ping')])).toBe(4);
    const buf = Buffer.alloc(8);
    expect(binding.recvmsg(server, buf, 0, 8, new Int32Array(1))).toBe(4);
    expect(buf.subarray(0, 4).toString()).toBe('ping');
  });

  it('accepts several queued connections in order', () => {
    const where = socketPath();
    const listener = track(binding.unixListen(where, 8));
    const clients = [0, 1, 2].map(() => track(binding.unixConnect(where)));
    clients.forEach((fd, i) => binding.sendmsg(fd, [Buffer.from(String(i))]));
    const seen: string[] = [];
    for (let fd; (fd = binding.unixAccept(listener)) !== WOULD_BLOCK; ) {
      track(fd);
      const buf = Buffer.alloc(1);
      binding.recvmsg(fd, buf, 0, 1, new Int32Array(1));
      seen.push(buf.toString());
    }
    expect(seen).toEqual(['0', '1', '2']);
  });

  it('does not remove an existing file: bind fails with EADDRINUSE', () => {
    const where = socketPath();
    fs.writeFileSync(where, '');
    expect(() => binding.unixListen(where, 1)).toThrow(
      expect.objectContaining({ code: 'EADDRINUSE', errno: os.constants.errno.EADDRINUSE, syscall: 'bind' }),
    );
  });

  it('connect reports ENOENT for a missing path and ECONNREFUSED for a dead socket', () => {
    expect(() => binding.unixConnect(path.join(dir, 'missing.sock'))).toThrow(
      expect.objectContaining({ code: 'ENOENT', errno: os.constants.errno.ENOENT, syscall: 'connect' }),
    );
    const where = socketPath();
    fs.closeSync(binding.unixListen(where, 1)); // the socket file stays, nobody listens
    expect(() => binding.unixConnect(where)).toThrow(
      expect.objectContaining({ code: 'ECONNREFUSED', syscall: 'connect' }),
    );
  });

  it('rejects a path longer than sun_path with ENAMETOOLONG', () => {
    const long = path.join(dir, 'x'.repeat(120));
    expect(() => binding.unixListen(long, 1)).toThrow(
      expect.objectContaining({ code: 'ENAMETOOLONG', errno: os.constants.errno.ENAMETOOLONG, syscall: 'bind' }),
    );
    expect(() => binding.unixConnect(long)).toThrow(
      expect.objectContaining({ code: 'ENAMETOOLONG', syscall: 'connect' }),
    );
    // 107 bytes is the longest that fits (plus the NUL)
    const longest = '/tmp/' + 'y'.repeat(107 - '/tmp/'.length);
    expect(longest).toHaveLength(107);
    try {
      track(binding.unixListen(longest, 1));
    } finally {
      fs.rmSync(longest, { force: true });
    }
  });

  it('creates the socket file with the mode asked for less the umask, never wider (fchmod before bind)', () => {
    const old = process.umask(0);
    try {
      for (const mode of [0o600, 0o660, 0o700, 0o777, 0]) {
        const where = socketPath();
        track(binding.unixListen(where, 1, mode));
        expect((fs.statSync(where).mode & 0o777).toString(8)).toBe(mode.toString(8));
      }
      process.umask(0o077);
      const where = socketPath();
      track(binding.unixListen(where, 1, 0o666));
      expect(fs.statSync(where).mode & 0o777).toBe(0o600);
      // Without a mode, the umask alone decides (as before).
      const plain = socketPath();
      track(binding.unixListen(plain, 1));
      expect(fs.statSync(plain).mode & 0o777).toBe(0o700);
    } finally {
      process.umask(old);
    }
  });

  it('refuses a mode that is not a permission mask, creating nothing', () => {
    const where = socketPath();
    expect(() => binding.unixListen(where, 1, 0o1000)).toThrow(RangeError);
    expect(() => binding.unixListen(where, 1, -1)).toThrow(RangeError);
    expect(() => binding.unixListen(where, 1, '600' as unknown as number)).toThrow(TypeError);
    expect(fs.existsSync(where)).toBe(false);
  });

  it('queues a burst of connects up to the backlog; past it, a non-blocking connect gets EAGAIN', () => {
    const where = socketPath();
    const listener = track(binding.unixListen(where, 511));
    for (let i = 0; i < 64; i++) track(binding.unixConnect(where));
    const small = socketPath();
    track(binding.unixListen(small, 2));
    expect(() => {
      for (let i = 0; i < 8; i++) track(binding.unixConnect(small));
    }).toThrow(expect.objectContaining({ code: 'EAGAIN', syscall: 'connect' }));
    let accepted = 0;
    for (let fd; (fd = binding.unixAccept(listener)) !== WOULD_BLOCK; accepted++) track(fd);
    expect(accepted).toBe(64);
  });

  it('accept on a socket that is not listening throws EINVAL', () => {
    const [a, b] = binding.socketpair().map(track);
    expect(() => binding.unixAccept(a!)).toThrow(
      expect.objectContaining({ code: 'EINVAL', syscall: 'accept4' }),
    );
    expect(isOpen(b!)).toBe(true);
  });
});
