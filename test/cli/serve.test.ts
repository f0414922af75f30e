/**
 * The `vfio-user` command as a user runs it: the compiled CLI (npm test builds dist/ first).
 */
import { describe, it, expect } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { rawClient, regionAccess, tempSocketPath } from '../helpers/server';
import { Command } from '../../lib/protocol/constants';

const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
const run = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 10_000 });

describe('vfio-user (CLI)', () => {
  it('refuses an unknown command with usage and exit code 2', () => {
    const r = run('frobnicate');
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/unknown command 'frobnicate'/);
  });

  it('refuses an unknown device and a missing socket with exit code 2', () => {
    expect(run('serve', 'toaster', '/tmp/x.sock').status).toBe(2);
    expect(run('serve', 'gpio').status).toBe(2);
    expect(run('serve', 'gpio', '/tmp/x.sock', '--bogus').status).toBe(2);
  });

  it('has --help for the program and for serve', () => {
    const top = run('--help');
    expect(top.status).toBe(0);
    expect(top.stdout).toMatch(/serve/);
    const serve = run('serve', '--help');
    expect(serve.status).toBe(0);
    for (const option of ['--size', '--file', '--queues', '--block-size', '--serial', '--model', '--trace', '--json']) {
      expect(serve.stdout).toContain(option);
    }
  });

  it('refuses bad deadline options with exit code 2 and a reason', () => {
    for (const args of [['--version-timeout', '1.5'], ['--message-timeout', 'soon']]) {
      const r = run('serve', 'gpio', '/tmp/gpio-test.sock', ...args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(/vfio-user serve: --(version|message)-timeout must be an integer/);
    }
  });

  it('serve --version-timeout: a client that says nothing is dropped, with a line saying why', async () => {
    const { dir, path: socket } = tempSocketPath('gpio.sock');
    const child = spawn(process.execPath, [cli, 'serve', 'gpio', socket, '--version-timeout', '200', '--message-timeout', '200'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const lines = readline.createInterface({ input: child.stdout! });
    const seen: string[] = [];
    const saw = (re: RegExp) => new Promise<void>((res) => {
      const check = () => {
        if (seen.some((l) => re.test(l))) res();
      };
      lines.on('line', (l) => {
        seen.push(l);
        check();
      });
      check();
    });
    try {
      await saw(/^attach with/);
      const silent = await rawClient(socket, false);
      await saw(/^client disconnected: no VERSION within 200 ms$/);
      silent.close();
    } finally {
      child.kill('SIGTERM');
      expect(await new Promise((res) => child.on('exit', res))).toBe(0);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses bad nvme options with exit code 2 and a reason', () => {
    for (const args of [['--size', '1X'], ['--block-size', '1024'], ['--queues', '65'], ['--doorbells', 'magic'], ['--size', '1000']]) {
      const r = run('serve', 'nvme', '/tmp/nvme-test.sock', ...args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(/vfio-user serve nvme: /);
    }
  });

  it('serves nvme: JSON ready line, info shows an NVMe controller, SIGTERM stops cleanly', async () => {
    const { dir, path: socket } = tempSocketPath('nvme.sock');
    const child = spawn(process.execPath, [cli, 'serve', 'nvme', socket, '--size', '64M', '--queues', '2', '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const lines = readline.createInterface({ input: child.stdout! });
    const seen: Record<string, unknown>[] = [];
    const ready = new Promise<Record<string, unknown>>((res) => lines.on('line', (l) => {
      const v = JSON.parse(l) as Record<string, unknown>;
      seen.push(v);
      if (v.event === 'ready') res(v);
    }));
    try {
      expect(await ready).toMatchObject({ event: 'ready', device: 'nvme', socket, sizeBytes: 64 << 20, backing: 'RAM' });
      const info = spawnSync(process.execPath, [cli, 'info', socket, '--json'], { encoding: 'utf8', timeout: 10_000 });
      expect(info.status, info.stderr).toBe(0);
      const report = JSON.parse(info.stdout);
      expect(report.pci.classCode).toBe('0x010802');
      expect(report.pci.msix.tableSize).toBe(3);
    } finally {
      child.kill('SIGTERM');
      expect(await new Promise((res) => child.on('exit', res))).toBe(0);
      expect(seen.some((e) => e.event === 'stopped')).toBe(true);
      expect(fs.existsSync(socket)).toBe(false);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('serves gpio: JSON ready line, stdin control, region access from a client, clean SIGTERM', async () => {
    const { dir, path: socket } = tempSocketPath('gpio.sock');
    const child = spawn(process.execPath, [cli, 'serve', 'gpio', socket, '--json'], { stdio: ['pipe', 'pipe', 'inherit'] });
    const lines = readline.createInterface({ input: child.stdout! });
    const queue: Record<string, unknown>[] = [];
    const waiters: ((v: Record<string, unknown>) => void)[] = [];
    lines.on('line', (l) => {
      const v = JSON.parse(l) as Record<string, unknown>;
      const w = waiters.shift();
      if (w) w(v);
      else queue.push(v);
    });
    const next = () => new Promise<Record<string, unknown>>((res) => (queue.length ? res(queue.shift()!) : waiters.push(res)));
    try {
      const ready = await next();
      expect(ready).toMatchObject({ event: 'ready', device: 'gpio', socket });
      expect(String(ready.qemu)).toContain('"driver":"vfio-user-pci"');
      expect(fs.statSync(socket).mode & 0o777).toBe(0o600);

      child.stdin!.write('{"inputs": 4660}\n');
      expect(await next()).toEqual({ inputs: 4660 });

      const client = await rawClient(socket);
      expect(await next()).toEqual({ event: 'connect' });
      // BAR2 offset 1 / 5: inputs 0-7 and 8-15 as the guest would read them.
      const r = (await client.msg(Command.REGION_READ, regionAccess(2, 1, 1))) as Buffer;
      expect(r[16]).toBe(4660 & 0xff);
      await client.msg(Command.REGION_WRITE, regionAccess(2, 4, 1, Buffer.from([0x81])));
      expect(await next()).toEqual({ event: 'outputs', value: 0x8100 });
      client.close();
      // The hang-up resets the card (outputs back to 0), then the disconnect is reported.
      expect(await next()).toEqual({ event: 'outputs', value: 0 });
      expect(await next()).toMatchObject({ event: 'disconnect' });

      child.stdin!.write('{"get": "state"}\n');
      expect(await next()).toMatchObject({ inputs: 4660, outputs: 0 });
      child.stdin!.write('not json\n');
      expect(await next()).toEqual({ error: 'not JSON' });
    } finally {
      child.kill('SIGTERM');
      const code = await new Promise<number | null>((res) => child.on('exit', res));
      expect(code).toBe(0);
      expect(fs.existsSync(socket)).toBe(false);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
