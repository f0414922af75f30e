// The README's runnable examples keep running (they import the built package by its name).
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

const root = path.join(__dirname, '..', '..');
const run = (file: string, env: Record<string, string> = {}, ...args: string[]) =>
  spawnSync(process.execPath, [path.join(root, 'examples', file), ...args], { cwd: root, encoding: 'utf8', timeout: 20_000, env: { ...process.env, ...env } });

describe('examples/', () => {
  it('pci-device.mjs: serves a PciDevice and drives it with the client, MSI-X included', () => {
    const r = run('pci-device.mjs');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/device 1b36 5/);
    expect(r.stdout).toMatch(/read back deadbeef - MSI-X vector 0 received/);
  });

  it('gpio-server.mjs: prints the QEMU option for its socket', () => {
    const r = run('gpio-server.mjs', { EXAMPLE_ONESHOT: '1' }, '/tmp/vfio-user-example-gpio.sock');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('"path":"/tmp/vfio-user-example-gpio.sock"');
  });
});
