// `vfio-user serve nvme SOCKET --nbd URI` as a user runs it, driven by the host-side
// `vfio-user nvme write/read`: data round-trips into a qcow2 served by qemu-nbd (checked with
// qemu-img), I/O waits while qemu-nbd is killed and resumes when it is back, and --read-only
// write-protects any backend.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startCli, type CliProcess } from '../cli/run';
import { pattern } from '../devices/nvme/rig';
import { createQcow2, nbdToolsMissing, nbdkit, qemuNbd, type NbdServerProcess } from './nbd-servers';

const missing = nbdToolsMissing('qemu-nbd', 'qemu-img', 'nbdkit');
let dir: string;
const servers: NbdServerProcess[] = [];
const clis: CliProcess[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cli-'));
});
afterEach(async () => {
  for (const c of clis.splice(0)) {
    c.child.kill('SIGTERM');
    await c.exited;
  }
  for (const s of servers.splice(0)) await s.kill();
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function serveNvme(args: string[]): Promise<{ cli: CliProcess; socket: string; ready: Record<string, unknown> }> {
  const socket = path.join(dir, `nvme-${clis.length}-${Date.now()}.sock`);
  const cli = startCli(['serve', 'nvme', socket, '--json', '--queues', '2', ...args]);
  clis.push(cli);
  const ready = JSON.parse(await cli.waitForLine(/"event":"ready"/)) as Record<string, unknown>;
  return { cli, socket, ready };
}

describe.skipIf(missing !== null)('vfio-user serve nvme --nbd', () => {
  it('takes the size from the export; nvme write/read round-trip into the qcow2; I/O resumes after qemu-nbd is killed and restarted', { timeout: 60_000 }, async () => {
    const image = path.join(dir, 'disk.qcow2');
    createQcow2(image, '64M');
    const nbd = qemuNbd(image, { socket: path.join(dir, 'qnbd.sock') });
    servers.push(nbd);
    await nbd.start();
    const { cli, socket, ready } = await serveNvme(['--nbd', nbd.uri]);
    expect(ready.sizeBytes).toBe(64 << 20);
    expect(String(ready.backing)).toBe(`nbd ${nbd.uri}`);

    const data = pattern(16 * 512, 42);
    fs.writeFileSync(path.join(dir, 'in.bin'), data);
    const w = await runCli(['nvme', 'write', socket, '--lba', '8', '--count', '16', '--in', path.join(dir, 'in.bin')]);
    expect(w.code, w.stderr).toBe(0);
    const r = await runCli(['nvme', 'read', socket, '--lba', '8', '--count', '16', '--out', path.join(dir, 'out.bin')]);
    expect(r.code, r.stderr).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'out.bin')).equals(data)).toBe(true);

    // The NBD server dies; a write waits for it and completes once it is back.
    await nbd.kill();
    const data2 = pattern(16 * 512, 43);
    fs.writeFileSync(path.join(dir, 'in2.bin'), data2);
    const pending = runCli(['nvme', 'write', socket, '--lba', '1024', '--count', '16', '--in', path.join(dir, 'in2.bin')], { timeoutMs: 30_000 });
    await cli.waitForLine(/"event":"nbd-disconnect"/);
    await new Promise((res) => setTimeout(res, 500));
    await nbd.start();
    const w2 = await pending;
    expect(w2.code, w2.stderr).toBe(0);
    await cli.waitForLine(/"event":"nbd-reconnect"/);
    const r2 = await runCli(['nvme', 'read', socket, '--lba', '1024', '--count', '16', '--out', path.join(dir, 'out2.bin')]);
    expect(r2.code, r2.stderr).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'out2.bin')).equals(data2)).toBe(true);

    // Stopping flushes; qemu-img sees the data in the image.
    cli.child.kill('SIGTERM');
    expect(await cli.exited).toBe(0);
    clis.length = 0;
    await nbd.kill('SIGTERM');
    const raw = path.join(dir, 'disk.raw');
    expect(spawnSync('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]).status).toBe(0);
    const fd = fs.openSync(raw, 'r');
    const back = Buffer.alloc(data.length);
    fs.readSync(fd, back, 0, back.length, 8 * 512);
    const back2 = Buffer.alloc(data2.length);
    fs.readSync(fd, back2, 0, back2.length, 1024 * 512);
    fs.closeSync(fd);
    expect(back.equals(data)).toBe(true);
    expect(back2.equals(data2)).toBe(true);
  });

  it('--read-only write-protects an NBD, a RAM and a file namespace: writes fail, reads work', { timeout: 60_000 }, async () => {
    const mem = nbdkit('memory', ['size=16M'], { socket: path.join(dir, 'mem.sock') });
    servers.push(mem);
    await mem.start();
    const file = path.join(dir, 'ro.img');
    fs.writeFileSync(file, Buffer.alloc(1 << 20, 0x5a));
    for (const backing of [['--nbd', mem.uri], ['--size', '16M'], ['--file', file]]) {
      const { socket, ready } = await serveNvme([...backing, '--read-only']);
      expect(String(ready.backing)).toMatch(/read-only$/);
      fs.writeFileSync(path.join(dir, 'x.bin'), Buffer.alloc(512, 1));
      const w = await runCli(['nvme', 'write', socket, '--lba', '0', '--count', '1', '--in', path.join(dir, 'x.bin')]);
      expect(w.code, backing.join(' ')).not.toBe(0);
      const r = await runCli(['nvme', 'read', socket, '--lba', '0', '--count', '1', '--out', path.join(dir, 'x.out')]);
      expect(r.code, r.stderr).toBe(0);
    }
    expect(fs.readFileSync(file).every((x) => x === 0x5a)).toBe(true);
  });

  it('refuses --nbd with --size or --file, bad URIs and unreachable servers (exit 2, with the reason)', { timeout: 60_000 }, async () => {
    const socket = path.join(dir, 'bad.sock');
    for (const [args, message] of [
      [['--nbd', 'nbd://127.0.0.1/x', '--size', '1G'], /neither --file nor --size/],
      [['--nbd', 'http://x/y'], /unsupported NBD URI scheme/],
      [['--nbd', `nbd+unix:///x?socket=${dir}/none.sock`], /ENOENT|no such/i],
      [['--nbd', 'nbd://127.0.0.1:1/x'], /ECONNREFUSED/],
    ] as const) {
      const r = await runCli(['serve', 'nvme', socket, ...args]);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(message);
    }
    // A socket another server holds: the NBD connections are closed again and the command ends.
    const mem = nbdkit('memory', ['size=1M'], { socket: path.join(dir, 'busy-mem.sock') });
    servers.push(mem);
    await mem.start();
    const { socket: busy } = await serveNvme(['--size', '1M']);
    const r = await runCli(['serve', 'nvme', busy, '--nbd', mem.uri], { timeoutMs: 15_000 });
    expect(r.code, r.stderr).toBe(1);
  });
});
