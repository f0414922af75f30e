/**
 * What a user sees when something is wrong: every usage error says why in one line (then the
 * usage) on standard error with exit code 2; every failure names what failed and why, in words a
 * user can act on, with exit code 1.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Idio16Device } from '../../lib/devices/gpio/idio16';
import { VfioUserClient } from '../../lib/client/client';
import { VfioUserServer } from '../../lib/server/server';
import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { tempSocketPath } from '../helpers/server';
import { runCli, startCli } from './run';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-cli-msg-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** The first line of standard error: the reason, before any usage text. */
const reason = (stderr: string) => stderr.split('\n')[0]!;

describe('vfio-user (program)', () => {
  it('with no arguments: the reason and the help on standard error, exit code 2', async () => {
    const r = await runCli([]);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(reason(r.stderr)).toBe('vfio-user: a command is required');
    expect(r.stderr).toContain('Usage: vfio-user <command> [options]');
  });

  it('--help on standard output, naming --version; --version prints the package version', async () => {
    const help = await runCli(['--help']);
    expect(help.code).toBe(0);
    expect(help.stderr).toBe('');
    expect(help.stdout).toContain('--version');
    const version = await runCli(['--version']);
    expect(version.code).toBe(0);
    expect(version.stdout.trim()).toBe((JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string }).version);
  });

  it('usage errors go to standard error only', async () => {
    for (const args of [['frobnicate'], ['--frobnicate'], ['info', '--bogus', '/tmp/x.sock'], ['nvme', 'identify']]) {
      const r = await runCli(args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stdout, args.join(' ')).toBe('');
      expect(r.stderr, args.join(' ')).toMatch(/^vfio-user[^\n]*: \S/);
    }
    expect(reason((await runCli(['--frobnicate'])).stderr)).toBe("vfio-user: unknown option '--frobnicate'");
  });
});

describe('vfio-user info: the socket argument and the socket', () => {
  it('says what is wrong with the arguments in one line before the usage', async () => {
    const none = await runCli(['info']);
    expect(none.code).toBe(2);
    expect(reason(none.stderr)).toBe('vfio-user info: SOCKET is required');
    const two = await runCli(['info', '/tmp/a.sock', '/tmp/b.sock']);
    expect(two.code).toBe(2);
    expect(reason(two.stderr)).toBe("vfio-user info: unexpected argument '/tmp/b.sock' (info takes one SOCKET)");
  });

  it('names the path and says "not a socket" for a regular file or a directory', async () => {
    const file = path.join(dir, 'plain.txt');
    fs.writeFileSync(file, 'x');
    const r = await runCli(['info', file]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(`vfio-user info: ${file}: not a socket: it is a regular file`);
    const d = await runCli(['info', dir]);
    expect(d.stderr.trim()).toBe(`vfio-user info: ${dir}: not a socket: it is a directory`);
  });

  it('tells a missing socket from a missing directory, and a stale socket from a live one', async () => {
    const missing = await runCli(['info', path.join(dir, 'nobody.sock')]);
    expect(missing.code).toBe(1);
    expect(missing.stderr.trim()).toBe(`vfio-user info: ${path.join(dir, 'nobody.sock')}: no such socket (is the server running?)`);
    const noDir = await runCli(['info', path.join(dir, 'no-such-dir', 'x.sock')]);
    expect(noDir.stderr.trim()).toBe(`vfio-user info: ${path.join(dir, 'no-such-dir', 'x.sock')}: no such socket: the directory ${path.join(dir, 'no-such-dir')} does not exist`);

    // A socket file nobody listens on (a server that crashed leaves one behind).
    const { dir: sdir, path: stale } = tempSocketPath('stale.sock');
    new Fd(binding.unixListen(stale, 1, 0o600)).close();
    try {
      const r = await runCli(['info', stale]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/nothing is listening on this socket/);
    } finally {
      fs.rmSync(sdir, { recursive: true, force: true });
    }
  });

  it('says how long a UNIX socket path may be', async () => {
    const long = path.join(dir, 'x'.repeat(120) + '.sock');
    const r = await runCli(['info', long]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`vfio-user info: ${long}: the path is ${String(Buffer.byteLength(long))} bytes; a UNIX socket path holds at most 107`);
  });

  it('says the device is serving another client (info and nvme)', async () => {
    const { dir: sdir, path: socket } = tempSocketPath('busy.sock');
    const server = await VfioUserServer.listen(socket, new Idio16Device());
    const first = await VfioUserClient.connect(socket);
    try {
      for (const args of [['info', socket], ['nvme', 'identify', socket]]) {
        const r = await runCli(args);
        expect(r.code, args[0]).toBe(1);
        expect(r.stderr.trim(), args[0]).toBe(
          `vfio-user ${args[0] === 'info' ? 'info' : 'nvme identify'}: ${socket}: the device is serving another client (a vfio-user server serves one at a time); try again once it disconnects`,
        );
      }
    } finally {
      await first.close();
      await server.close();
      fs.rmSync(sdir, { recursive: true, force: true });
    }
  });
});

describe('vfio-user nvme: messages', () => {
  it('names the socket in connection failures', async () => {
    const file = path.join(dir, 'not-a-socket');
    fs.writeFileSync(file, '');
    for (const args of [['identify', file], ['read', file, '--lba', '0', '--count', '1', '--out', path.join(dir, 'o.bin')], ['perf', file, '--rw', 'read', '--time', '1']]) {
      const r = await runCli(['nvme', ...args]);
      expect(r.code, args[0]).toBe(1);
      expect(r.stderr.trim(), args[0]).toBe(`vfio-user nvme ${args[0]!}: ${file}: not a socket: it is a regular file`);
    }
  });

  it('says a negative --lba must be non-negative', async () => {
    const r = await runCli(['nvme', 'read', '/tmp/x.sock', '--lba=-1', '--count', '1']);
    expect(r.code).toBe(2);
    expect(reason(r.stderr)).toBe("vfio-user nvme read: --lba must be a non-negative integer, got '-1'");
  });

  it('gives a reason for a missing subcommand or socket and an extra argument', async () => {
    expect(reason((await runCli(['nvme'])).stderr)).toBe('vfio-user nvme: a subcommand is required (identify, read, write, perf)');
    expect(reason((await runCli(['nvme', 'identify'])).stderr)).toBe('vfio-user nvme identify: SOCKET is required');
    expect(reason((await runCli(['nvme', 'identify', '/tmp/a.sock', 'b'])).stderr)).toBe("vfio-user nvme identify: unexpected argument 'b'");
  });
});

describe('vfio-user nvme read/write against a served controller', () => {
  let server: ReturnType<typeof startCli>;
  let socket: string;

  beforeAll(async () => {
    socket = path.join(dir, 'nvme.sock');
    server = startCli(['serve', 'nvme', socket, '--size', '1M']);
    await server.waitForLine(/^attach with/);
  });
  afterAll(async () => {
    server.child.kill('SIGTERM');
    await server.exited;
  });

  it('write --in refuses a file longer than --count blocks (and one shorter)', async () => {
    const data = path.join(dir, 'long.bin');
    fs.writeFileSync(data, Buffer.alloc(5000, 1));
    const r = await runCli(['nvme', 'write', socket, '--lba', '0', '--count', '8', '--in', data]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(`vfio-user nvme write: ${data} holds 5000 bytes, more than --count 8 blocks of 512 bytes (4096); refusing to write only the start of it (it is not a whole number of 512-byte blocks)`);
    fs.writeFileSync(data, Buffer.alloc(8192, 1));
    const whole = await runCli(['nvme', 'write', socket, '--lba', '0', '--count', '8', '--in', data]);
    expect(whole.stderr).toContain('(--count 16 writes all of it)');
    const stdin = await runCli(['nvme', 'write', socket, '--lba', '0', '--count', '1', '--in', '-'], { input: Buffer.alloc(1024) });
    expect(stdin.code).toBe(1);
    expect(stdin.stderr).toContain('standard input holds 1024 bytes, more than --count 1 block of 512 bytes (512)');
    const short = await runCli(['nvme', 'write', socket, '--lba', '0', '--count', '32', '--in', data]);
    expect(short.stderr.trim()).toBe(`vfio-user nvme write: ${data} holds 8192 bytes, less than --count 32 blocks of 512 bytes (16384)`);
    // Nothing was written by the refused commands.
    const back = await runCli(['nvme', 'read', socket, '--lba', '0', '--count', '1']);
    expect(back.code, back.stderr).toBe(0);
    expect(Buffer.from(back.stdout, 'latin1').equals(Buffer.alloc(512))).toBe(true);
  });

  it('read --out leaves FILE as it was when the read fails, and replaces it when it succeeds', async () => {
    const out = path.join(dir, 'keep.bin');
    fs.writeFileSync(out, 'precious');
    fs.chmodSync(out, 0o640);
    const past = await runCli(['nvme', 'read', socket, '--lba', '2047', '--count', '2', '--out', out]);
    expect(past.code).toBe(1);
    expect(past.stderr.trim()).toBe(`vfio-user nvme read: ${socket}: blocks 2047..2048 are outside namespace 1 (2048 blocks)`);
    const inactive = await runCli(['nvme', 'read', socket, '--lba', '0', '--count', '1', '--nsid', '2', '--out', out]);
    expect(inactive.code).toBe(1);
    expect(fs.readFileSync(out, 'utf8')).toBe('precious');
    expect(fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);

    const ok = await runCli(['nvme', 'read', socket, '--lba', '0', '--count', '2', '--out', out]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(fs.statSync(out).size).toBe(1024);
    expect(fs.statSync(out).mode & 0o777).toBe(0o640);
    expect(fs.readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
    // A device is written in place, not replaced.
    const devNull = await runCli(['nvme', 'read', socket, '--lba', '0', '--count', '1', '--out', '/dev/null']);
    expect(devNull.code, devNull.stderr).toBe(0);
    expect(fs.statSync('/dev/null').isCharacterDevice()).toBe(true);
  });
});

describe('vfio-user nvme perf when the server goes away', () => {
  it('says the server closed the connection, and the summary keeps the doorbell mode of the run', async () => {
    const socket = path.join(dir, 'perf.sock');
    const server = startCli(['serve', 'nvme', socket, '--size', '16M']);
    await server.waitForLine(/^attach with/);
    const perf = runCli(['nvme', 'perf', socket, '--rw', 'randread', '--qd', '8', '--time', '10']);
    await new Promise((resolve) => setTimeout(resolve, 1500));
    server.child.kill('SIGKILL');
    await server.exited;
    const r = await perf;
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^vfio-user nvme perf: randread, .* polled completions, shadow doorbells$/m);
    expect(r.stdout).toMatch(/^errors: \d+ \(first: the server closed the connection\)$/m);
    expect(r.stderr).toMatch(new RegExp(`^vfio-user nvme perf: ${socket.replace(/[.]/g, '\\.')}: the server closed the connection after [0-9.]+ s; the summary covers the I/O completed until then$`, 'm'));
    expect(r.stderr).not.toMatch(/poll error/);
  });
});
