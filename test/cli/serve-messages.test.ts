/**
 * `vfio-user serve` when something is in the way: a reason in one line that names the path, exit
 * code 2 for usage errors and 1 for failures, and nothing left behind by a start that failed.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Idio16Device } from '../../lib/devices/gpio/idio16';
import { VfioUserServer } from '../../lib/server/server';
import { runCli, startCli } from './run';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-serve-msg-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

const reason = (stderr: string) => stderr.split('\n')[0]!;

describe('vfio-user serve: arguments', () => {
  it('gives a one-line reason for a missing device or socket and for an extra argument', async () => {
    const cases: [string[], string][] = [
      [['serve'], 'vfio-user serve: a device and a SOCKET are required'],
      [['serve', 'gpio'], 'vfio-user serve: SOCKET is required'],
      [['serve', 'gpio', '/tmp/a.sock', 'b'], "vfio-user serve: unexpected argument 'b'"],
    ];
    for (const [args, line] of cases) {
      const r = await runCli(args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(reason(r.stderr)).toBe(line);
      expect(r.stderr).toContain('Usage: vfio-user serve <device> SOCKET [options]');
    }
  });

  it('serve gpio refuses the options of the storage devices', async () => {
    for (const [option, value] of [['--size', '1G'], ['--queues', '4'], ['--file', 'x.img'], ['--doorbells', 'mmap']] as const) {
      const r = await runCli(['serve', 'gpio', path.join(dir, 'gpio.sock'), option, value]);
      expect(r.code, option).toBe(2);
      expect(reason(r.stderr)).toMatch(new RegExp(`^vfio-user serve gpio: ${option} does not apply to gpio \\(only to [a-z, -]+\\)$`));
    }
    expect(fs.existsSync(path.join(dir, 'x.img'))).toBe(false);
    // And nvme refuses what only virtio-blk takes.
    const r = await runCli(['serve', 'nvme', path.join(dir, 'nvme.sock'), '--notify', 'mmap']);
    expect(r.code).toBe(2);
    expect(reason(r.stderr)).toBe('vfio-user serve nvme: --notify does not apply to nvme (only to virtio-blk)');
  });

  it('--size that is not a whole number of blocks says the block size', async () => {
    const r = await runCli(['serve', 'nvme', path.join(dir, 'nvme.sock'), '--size', '1000']);
    expect(r.code).toBe(2);
    expect(reason(r.stderr)).toBe('vfio-user serve nvme: --size 1000 is not a multiple of the block size, 512 bytes (512 or 1024 would do)');
    const big = await runCli(['serve', 'nvme', path.join(dir, 'nvme.sock'), '--size', '6K', '--block-size', '4096']);
    expect(reason(big.stderr)).toBe('vfio-user serve nvme: --size 6144 is not a multiple of the block size, 4096 bytes (4096 or 8192 would do)');
  });
});

describe('vfio-user serve: files are made only for a server that starts', () => {
  it('--file that does not exist needs --size, and is not created without it (nor is --trace)', async () => {
    const img = path.join(dir, 'new.img');
    const trace = path.join(dir, 'trace.log');
    for (const device of ['nvme', 'virtio-blk']) {
      const r = await runCli(['serve', device, path.join(dir, 'd.sock'), '--file', img, '--trace', trace]);
      expect(r.code, device).toBe(2);
      expect(reason(r.stderr)).toBe(`vfio-user serve ${device}: --file ${img} does not exist: give --size to create it`);
      expect(fs.existsSync(img)).toBe(false);
      expect(fs.existsSync(trace)).toBe(false);
    }
    fs.writeFileSync(img, '');
    const empty = await runCli(['serve', 'nvme', path.join(dir, 'd.sock'), '--file', img]);
    expect(reason(empty.stderr)).toBe(`vfio-user serve nvme: --file ${img} is empty: give --size to size it`);
    fs.rmSync(img);
  });

  it('a socket that cannot be bound leaves no new --file or --trace behind, and an old file its size', async () => {
    const img = path.join(dir, 'disk.img');
    const trace = path.join(dir, 'disk-trace.log');
    const missingDir = path.join(dir, 'no-such-dir', 'nvme.sock');
    const r = await runCli(['serve', 'nvme', missingDir, '--file', img, '--size', '1M', '--trace', trace]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(`vfio-user serve nvme: ${missingDir}: cannot create the socket: the directory ${path.dirname(missingDir)} does not exist`);
    expect(fs.existsSync(img)).toBe(false);
    expect(fs.existsSync(trace)).toBe(false);

    // A live server on the socket: found only when binding, after the files were made.
    const socket = path.join(dir, 'live.sock');
    const live = await VfioUserServer.listen(socket, new Idio16Device());
    try {
      fs.writeFileSync(img, Buffer.alloc(4096, 7));
      const busy = await runCli(['serve', 'nvme', socket, '--file', img, '--size', '1M', '--trace', trace]);
      expect(busy.code).toBe(1);
      expect(busy.stderr.trim()).toBe(`vfio-user serve nvme: ${socket}: a live server is listening on it`);
      expect(fs.statSync(img).size).toBe(4096);
      expect(fs.existsSync(trace)).toBe(false);
    } finally {
      await live.close();
      fs.rmSync(img, { force: true });
    }
  });

  it('names the path and the 107-byte limit for a socket path too long, and what is in the way', async () => {
    const long = path.join(dir, 'y'.repeat(110) + '.sock');
    const r = await runCli(['serve', 'gpio', long]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(`vfio-user serve gpio: ${long}: the path is ${String(Buffer.byteLength(long))} bytes; a UNIX socket path holds at most 107 (choose a shorter one, e.g. in /tmp or /run)`);
    const file = path.join(dir, 'plain-file');
    fs.writeFileSync(file, 'keep me');
    const inTheWay = await runCli(['serve', 'gpio', file]);
    expect(inTheWay.code).toBe(1);
    expect(inTheWay.stderr.trim()).toBe(`vfio-user serve gpio: ${file}: a regular file is in the way; refusing to replace it with a socket`);
    expect(fs.readFileSync(file, 'utf8')).toBe('keep me');
  });
});

describe('vfio-user serve gpio: shutdown', () => {
  it('prints a stopped line (text and JSON) and removes the socket', async () => {
    for (const json of [false, true]) {
      const socket = path.join(dir, `gpio-${String(json)}.sock`);
      const server = startCli(['serve', 'gpio', socket, ...(json ? ['--json'] : [])]);
      await server.waitForLine(json ? /"event":"ready"/ : /^attach with/);
      server.child.kill('SIGTERM');
      expect(await server.exited, `json ${String(json)}: ${server.stderr()} ${server.lines.join("|")}`).toBe(0);
      expect(server.lines.at(-1)).toBe(json ? '{"event":"stopped"}' : 'stopped: socket removed');
      expect(fs.existsSync(socket)).toBe(false);
    }
  });
});
