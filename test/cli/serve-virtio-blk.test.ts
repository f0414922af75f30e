/**
 * `vfio-user serve virtio-blk` as a user runs it (the compiled CLI; npm test builds dist/ first):
 * option errors, the ready line (the same fields as `serve nvme`), what `vfio-user info` sees, a
 * clean SIGTERM.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { describe, expect, it } from 'vitest';
import { tempSocketPath } from '../helpers/server';

const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
const run = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 10_000 });

describe('vfio-user serve virtio-blk', () => {
  it('lists the device and its options in --help', () => {
    const r = run('serve', '--help');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/virtio-blk +virtio 1\.2 block device/);
    for (const option of ['--read-only', '--notify MODE']) expect(r.stdout).toContain(option);
  });

  it('refuses bad options with exit code 2 and a reason', () => {
    const { dir, path: socket } = tempSocketPath('vblk.sock');
    try {
      for (const args of [['--size', '1X'], ['--block-size', '1000'], ['--queues', '0'], ['--queues', '65'], ['--notify', 'smoke'], ['--serial', 'x'.repeat(21)], ['--size', '100']]) {
        const r = run('serve', 'virtio-blk', socket, ...args);
        expect(r.status, args.join(' ')).toBe(2);
        expect(r.stderr, args.join(' ')).toMatch(/vfio-user serve virtio-blk: /);
      }
      // A read-only file that does not exist is an error too, not an empty disk.
      const r = run('serve', 'virtio-blk', socket, '--file', path.join(dir, 'missing.img'), '--read-only');
      expect(r.status).toBe(2);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('serves: JSON ready line, info shows a virtio block function, SIGTERM stops cleanly', async () => {
    const { dir, path: socket } = tempSocketPath('vblk.sock');
    const file = path.join(dir, 'disk.img');
    const child = spawn(process.execPath, [cli, 'serve', 'virtio-blk', socket, '--file', file, '--size', '64M', '--queues', '3', '--aio', 'sync', '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const lines = readline.createInterface({ input: child.stdout! });
    const seen: Record<string, unknown>[] = [];
    const ready = new Promise<Record<string, unknown>>((res) =>
      lines.on('line', (l) => {
        const v = JSON.parse(l) as Record<string, unknown>;
        seen.push(v);
        if (v.event === 'ready') res(v);
      }),
    );
    try {
      const r = await ready;
      expect(r).toMatchObject({ event: 'ready', device: 'virtio-blk', socket, sizeBytes: 64 << 20, backing: `file ${file}` });
      // How the file is read (--aio): its own field, so `backing` keeps its form.
      expect(r.fileIo).toEqual({ engine: 'sync', direct: false });
      expect(String(r.qemu)).toContain('"driver":"vfio-user-pci"');
      expect(fs.statSync(file).size).toBe(64 << 20);
      const info = spawnSync(process.execPath, [cli, 'info', socket, '--json'], { encoding: 'utf8', timeout: 10_000 });
      expect(info.status, info.stderr).toBe(0);
      const pci = JSON.parse(info.stdout).pci;
      expect(pci).toMatchObject({ vendorId: '0x1af4', deviceId: '0x1042', classCode: '0x010000', revision: 1, subsystemId: '0x0040' });
      expect(pci.msix.tableSize).toBe(4);
    } finally {
      child.kill('SIGTERM');
      expect(await new Promise((res) => child.on('exit', res))).toBe(0);
      expect(seen.some((e) => e.event === 'stopped')).toBe(true);
      expect(fs.existsSync(socket)).toBe(false);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
