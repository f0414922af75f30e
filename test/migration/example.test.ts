// examples/migrate-nvme.mjs keeps working: two `vfio-user serve nvme` processes, a verifying
// workload at QD 16 through NvmeDriver, a live migration, every block checked (npm test runs it).
import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import * as path from 'node:path';

const root = path.join(__dirname, '..', '..');

function run(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(root, 'examples', 'migrate-nvme.mjs'), ...args], { cwd: root });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 90_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

describe('examples/migrate-nvme.mjs', () => {
  it('migrates a RAM namespace under a verifying QD 16 workload and prints one JSON line', async () => {
    const r = await run(['--size', '32M', '--seconds', '0.5']);
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trim().split('\n');
    expect(lines).toHaveLength(1);
    const result = JSON.parse(lines[0]!) as Record<string, unknown>;
    expect(result).toMatchObject({ verified: true, ioErrors: 0, mismatches: 0, blocks: 8192 });
    expect(result.precopyRounds).toBeGreaterThanOrEqual(1);
    expect(result.bytes).toBeGreaterThan(32 * 1024 * 1024 * 0.9);
    expect(typeof result.downtimeMs).toBe('number');
  }, 120_000);
});
