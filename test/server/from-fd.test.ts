/**
 * Socket activation, library side: `VfioUserServer.fromFd` serves a listening socket made by
 * someone else (systemd, a supervisor), checks what it is given, never removes the socket file,
 * and closes the fd when it closes. `systemdListenFds` reads LISTEN_PID / LISTEN_FDS.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, it, expect } from 'vitest';
import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { createMemfd } from '../../lib/native/memfd';
import { VfioUserServer } from '../../lib/server/server';
import { listeningSocket, systemdListenFds } from '../../lib/server/listen-fd';
import { VfioUserClient } from '../../lib/client/client';
import { TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { defer, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

function tempSocket(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-fromfd-'));
  defer(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, 'dev.sock');
}

describe('VfioUserServer.fromFd', () => {
  it('serves an inherited listening socket, one client after another, and leaves its file alone', async () => {
    const socket = tempSocket();
    const fd = binding.unixListen(socket, 16, 0o600);
    const device = new TestDevice();
    const server = VfioUserServer.fromFd(fd, device);
    defer(() => server.close());
    expect(server.path).toBe(socket);
    for (let round = 0; round < 2; round++) {
      const client = await VfioUserClient.connect(socket);
      expect((await client.read(7, 0, 2)).readUInt16LE(0)).toBe(0x1234);
      const gone = new Promise((r) => server.once('disconnect', r));
      client.close();
      await gone;
    }
    await server.close();
    expect(fs.existsSync(socket)).toBe(true); // not ours to remove
    expect(() => fs.fstatSync(fd)).toThrow(); // but the fd was ours to close
  });

  it('takes an Fd too', async () => {
    const socket = tempSocket();
    const fd = new Fd(binding.unixListen(socket, 16, 0o600));
    const server = VfioUserServer.fromFd(fd, new TestDevice());
    defer(() => server.close());
    const client = await VfioUserClient.connect(socket);
    client.close();
    await server.close();
    expect(fd.closed).toBe(true);
  });

  it('refuses what is not a listening UNIX stream socket, taking nothing', () => {
    const memfd = createMemfd('not-a-socket', 4096);
    defer(() => memfd.close());
    expect(() => VfioUserServer.fromFd(memfd.value, new TestDevice())).toThrow(expect.objectContaining({ code: 'ENOTSOCK' }));
    expect(memfd.closed).toBe(false);
    const [a, b] = binding.socketpair();
    defer(() => Fd.closeAll([a, b]));
    expect(() => VfioUserServer.fromFd(a, new TestDevice())).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    expect(() => fs.fstatSync(a)).not.toThrow();
    expect(() => VfioUserServer.fromFd(99999, new TestDevice())).toThrow(expect.objectContaining({ code: 'EBADF' }));
    expect(() => VfioUserServer.fromFd(-1, new TestDevice())).toThrow(TypeError);
  });

  it('finds where a listening socket is bound', () => {
    const socket = tempSocket();
    const fd = new Fd(binding.unixListen(socket, 4, 0o600));
    defer(() => fd.close());
    expect(listeningSocket(fd.value)).toEqual({ path: socket });
  });
});

describe('systemdListenFds', () => {
  it('reads LISTEN_PID and LISTEN_FDS (fds from 3), and unsets them when asked', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: String(process.pid), LISTEN_FDS: '2', LISTEN_FDNAMES: 'a:b' };
    expect(systemdListenFds(env)).toEqual([3, 4]);
    expect(env.LISTEN_FDS).toBe('2');
    expect(systemdListenFds(env, true)).toEqual([3, 4]);
    expect(env).toEqual({});
  });

  it('ignores fds meant for another process, and nonsense', () => {
    expect(systemdListenFds({ LISTEN_PID: String(process.pid + 1), LISTEN_FDS: '1' })).toEqual([]);
    expect(systemdListenFds({ LISTEN_PID: String(process.pid), LISTEN_FDS: 'x' })).toEqual([]);
    expect(systemdListenFds({ LISTEN_FDS: '1' })).toEqual([]);
    expect(systemdListenFds({})).toEqual([]);
  });
});
