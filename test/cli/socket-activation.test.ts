/**
 * Socket activation, as a supervisor does it: the listening socket is made here (with the
 * package's native unixListen) and handed to `vfio-user serve` as an inherited fd — with --fd N,
 * or as systemd does (fd 3, LISTEN_FDS=1, LISTEN_PID = the server's pid, set through `exec` so the
 * pid is known). The server serves it, never removes the socket file, and refuses an fd that is
 * not a listening socket. Over an inherited socket, `serve nvme --doorbells ioeventfd` and
 * `nvme perf --doorbells ioeventfd` run with ioeventfd doorbells.
 */
import { describe, it, expect } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as readline from 'node:readline';
import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { VfioUserClient } from '../../lib/client/client';
import { tempSocketPath } from '../helpers/server';
import { cli, runCli } from './run';

interface Served {
  child: ChildProcess;
  ready: Promise<Record<string, unknown>>;
  exited: Promise<number | null>;
  stderr: () => string;
}

/** `vfio-user serve ...` with `listener` as fd 3 (and whatever `env` says). */
function serveWith(listener: Fd, args: string[], env: NodeJS.ProcessEnv = {}, viaExec = false): Served {
  const argv = [cli, 'serve', ...args, '--json'];
  const child = viaExec
    ? // LISTEN_PID must be the server's own pid: sh sets it to $$ and execs node, which keeps it.
      spawn('/bin/sh', ['-c', `LISTEN_PID=$$ exec "$0" "$@"`, process.execPath, ...argv], { stdio: ['ignore', 'pipe', 'pipe', listener.value], env: { ...process.env, ...env } })
    : spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'pipe', listener.value], env: { ...process.env, ...env } });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const lines = readline.createInterface({ input: child.stdout! });
  const ready = new Promise<Record<string, unknown>>((resolve, reject) => {
    lines.on('line', (l) => {
      const j = JSON.parse(l) as Record<string, unknown>;
      if (j.event === 'ready') resolve(j);
    });
    child.on('exit', (code) => reject(new Error(`serve exited with ${String(code)}: ${err}`)));
  });
  ready.catch(() => undefined); // awaited only by the tests that expect it to start
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, ready, exited, stderr: () => err };
}

function listener(): { fd: Fd; socket: string; dir: string } {
  const { dir, path: socket } = tempSocketPath('activated.sock');
  return { fd: new Fd(binding.unixListen(socket, 16, 0o600)), socket, dir };
}

describe('vfio-user serve: socket activation', () => {
  it('serves the socket inherited as --fd 3 (SOCKET left out) and leaves its file in place', async () => {
    const l = listener();
    const s = serveWith(l.fd, ['gpio', '--fd', '3']);
    try {
      l.fd.close(); // the server holds its own copy now
      const ready = await s.ready;
      expect(ready.socket).toBe(l.socket);
      const client = await VfioUserClient.connect(l.socket);
      expect((await client.read(7, 0, 2)).readUInt16LE(0)).toBe(0x494f); // ACCES vendor ID
      client.close();
      s.child.kill('SIGTERM');
      expect(await s.exited).toBe(0);
      expect(fs.existsSync(l.socket)).toBe(true);
    } finally {
      s.child.kill('SIGKILL');
      l.fd.close();
      fs.rmSync(l.dir, { recursive: true, force: true });
    }
  });

  it('serves what systemd passes: fd 3 with LISTEN_FDS=1 and LISTEN_PID', async () => {
    const l = listener();
    const s = serveWith(l.fd, ['gpio', l.socket], { LISTEN_FDS: '1' }, true);
    try {
      l.fd.close();
      const ready = await s.ready;
      expect(ready.socket).toBe(l.socket);
      // The socket is served without being bound again (a bind would fail: the file exists and
      // a live server listens on it).
      const client = await VfioUserClient.connect(l.socket);
      expect((await client.read(7, 0, 2)).readUInt16LE(0)).toBe(0x494f);
      client.close();
    } finally {
      s.child.kill('SIGTERM');
      await s.exited;
      l.fd.close();
      fs.rmSync(l.dir, { recursive: true, force: true });
    }
  });

  it('refuses an fd that is not a listening socket, several systemd sockets, and another SOCKET', async () => {
    // runCli's stdin is a connected socket (Node's pipes are socketpairs), not a listening one.
    const notListening = await runCli(['serve', 'gpio', '--fd', '0']);
    expect(notListening.code).toBe(2);
    expect(notListening.stderr).toMatch(/fd 0 is a UNIX stream socket that is not listening/);
    const closed = await runCli(['serve', 'gpio', '--fd', '99']);
    expect(closed.code).toBe(2);
    expect(closed.stderr).toMatch(/fd 99 is not open/);
    const bad = await runCli(['serve', 'gpio', '--fd', 'three']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--fd must be a file descriptor number/);
    const l = listener();
    try {
      const two = serveWith(l.fd, ['gpio'], { LISTEN_FDS: '2' }, true);
      expect(await two.exited).toBe(2);
      expect(two.stderr()).toMatch(/systemd passed 2 sockets/);
      const other = serveWith(l.fd, ['gpio', '/tmp/elsewhere.sock', '--fd', '3']);
      expect(await other.exited).toBe(2);
      expect(other.stderr()).toMatch(/listens on .*activated\.sock, not on \/tmp\/elsewhere\.sock/);
    } finally {
      l.fd.close();
      fs.rmSync(l.dir, { recursive: true, force: true });
    }
  });

  it('serve nvme --doorbells ioeventfd on an inherited socket; nvme perf rings through the eventfd', async () => {
    const l = listener();
    const s = serveWith(l.fd, ['nvme', '--fd', '3', '--size', '16M', '--queues', '2', '--doorbells', 'ioeventfd']);
    try {
      l.fd.close();
      await s.ready;
      const perf = await runCli(['nvme', 'perf', l.socket, '--rw', 'randread', '--qd', '4', '--time', '0.3', '--doorbells', 'ioeventfd', '--json'], { timeoutMs: 30_000 });
      expect(perf.code, perf.stderr).toBe(0);
      const summary = JSON.parse(perf.stdout) as { ios: number; errors: number; doorbells: string };
      expect(summary.doorbells).toBe('ioeventfd');
      expect(summary.errors).toBe(0);
      expect(summary.ios).toBeGreaterThan(0);
    } finally {
      s.child.kill('SIGTERM');
      await s.exited;
      l.fd.close();
      fs.rmSync(l.dir, { recursive: true, force: true });
    }
  }, 60_000);
});
