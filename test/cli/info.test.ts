import { describe, it, expect } from 'vitest';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Idio16Device } from '../../lib/devices/gpio/idio16';
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
      expect(report.pci.bars).toEqual([{ index: 2, kind: 'memory', is64: false, prefetchable: false, size: '0x100' }]);

      const text = await run('info', socket);
      expect(text.code).toBe(0);
      expect(text.stdout).toMatch(/PCI 0x494f:0x0dc8/);
      expect(text.stdout).toMatch(/BAR2: memory size 0x100/);
    } finally {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
