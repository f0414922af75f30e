import { describe, it, expect } from 'vitest';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Idio16Device } from '../../lib/devices/gpio/idio16';
import { PciDevice } from '../../lib/pci/device';
import { VfioUserServer } from '../../lib/server/server';
import { tempSocketPath } from '../helpers/server';

const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');

/** Runs the CLI asynchronously (the server under test lives in this process's event loop). */
function run(...args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('vfio-user info', () => {
  it('fails with exit code 1 and a message when nothing listens', async () => {
    const r = await run('info', '/tmp/vfio-user-no-such.sock');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/no-such\.sock/);
  });

  it('describes a device: version, capabilities, regions, IRQs, decoded config space (--json and text)', async () => {
    const { dir, path: socket } = tempSocketPath();
    const server = await VfioUserServer.listen(socket, new Idio16Device());
    try {
      const r = await run('info', socket, '--json');
      expect(r.code, r.stderr).toBe(0);
      const report = JSON.parse(r.stdout);
      expect(report.version).toEqual({ major: 0, minor: 2 });
      expect(report.capabilities).toMatchObject({ max_msg_fds: 16, max_data_xfer_size: 1048576, write_multiple: true });
      expect(report.device).toEqual({ flags: ['RESET', 'PCI'], numRegions: 9, numIrqs: 5 });
      expect(report.regions.find((g: { index: number }) => g.index === 2)).toMatchObject({ name: 'BAR2', size: 256, flags: ['READ', 'WRITE'] });
      expect(report.irqs[0]).toMatchObject({ name: 'INTx', count: 1 });
      expect(report.pci).toMatchObject({ vendorId: '0x494f', deviceId: '0x0dc8', classCode: '0x118000', interruptPin: 1 });
      expect(report.pci.bars).toEqual([{ index: 2, kind: 'memory', is64: false, prefetchable: false, size: '0x100', address: '0x0', assigned: false }]);

      const text = await run('info', socket);
      expect(text.code).toBe(0);
      expect(text.stdout).toMatch(/PCI 0x494f:0x0dc8/);
      expect(text.stdout).toMatch(/BAR2: memory size 0x100 unassigned/);
    } finally {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("shows each BAR's address, and the ROM's, as the server has them", async () => {
    const { dir, path: socket } = tempSocketPath();
    const device = new PciDevice({
      vendorId: 0x1b36,
      deviceId: 0x0042,
      classCode: 0x058000,
      bars: { 0: { size: 0x4000, is64: true, prefetchable: true }, 2: { size: 0x1000 }, 4: { size: 0x20, kind: 'io' } },
      rom: Buffer.alloc(0x800),
    });
    // As firmware left it: BAR0 high, BAR4 in I/O space, the ROM placed but not enabled; BAR2 not.
    // (Again before each run: a client's disconnect resets the device.)
    const program = () => {
      device.config.write(0x10, Buffer.from([0x0c, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00]));
      device.config.write(0x20, Buffer.from([0x01, 0xc0, 0x00, 0x00]));
      device.config.write(0x30, Buffer.from([0x00, 0x00, 0x01, 0xc0]));
    };
    program();
    const server = await VfioUserServer.listen(socket, device);
    try {
      const r = await run('info', socket, '--json');
      expect(r.code, r.stderr).toBe(0);
      const report = JSON.parse(r.stdout);
      expect(report.pci.bars).toEqual([
        { index: 0, kind: 'memory', is64: true, prefetchable: true, size: '0x4000', address: '0x8000000000', assigned: true },
        { index: 2, kind: 'memory', is64: false, prefetchable: false, size: '0x1000', address: '0x0', assigned: false },
        { index: 4, kind: 'io', is64: false, prefetchable: false, size: '0x20', address: '0xc000', assigned: true },
      ]);
      expect(report.pci.rom).toEqual({ size: '0x800', address: '0xc0010000', assigned: true, enabled: false });

      // The server resets the device when that client leaves; program it again for the next.
      while (device.config.barAddress(0) !== 0n) await new Promise((resolve) => setTimeout(resolve, 5));
      program();
      const text = await run('info', socket);
      expect(text.code).toBe(0);
      expect(text.stdout).toContain('BAR0: memory 64-bit prefetchable size 0x4000 at 0x8000000000');
      expect(text.stdout).toContain('BAR2: memory size 0x1000 unassigned');
      expect(text.stdout).toContain('BAR4: io size 0x20 at 0xc000');
      expect(text.stdout).toContain('ROM: size 0x800 at 0xc0010000');
    } finally {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
