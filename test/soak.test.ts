// The standing soak (bench/soak.mjs), short: about 50,000 mutated and random messages against
// `vfio-user serve gpio`, `serve nvme --size 64M`, `serve nvme --size 64M --doorbells mmap` and `serve virtio-blk`,
// each a child process started through the CLI from dist/ (npm test builds it first). A fresh
// client must be answered after every connection; no server may exit, and each must end with the
// fds it had before the first hostile client. The full run is `npm run soak` (README: Soak).
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, expect, it } from 'vitest';

const ROOT = path.resolve(__dirname, '..');
const SOAK = path.join(ROOT, 'bench', 'soak.mjs');
const MESSAGES = 50_000;
/**
 * RSS may grow by what the NVMe servers' 64 MiB RAM namespace gets written (its pages are touched
 * only when written) plus heap and allocator slack; a leak of even 1 KiB per message would exceed it.
 */
const RSS_GROWTH_KIB = 96 * 1024;

interface ServerReport {
  name: string;
  messages: number;
  connections: number;
  restarts: number;
  fds: { before: number | null; after: number | null };
  rssKiB: { before: number | null; after: number | null };
}

interface SoakReport {
  messages: number;
  connections: number;
  crashes: number;
  hangs: number;
  seed: number;
  servers: ServerReport[];
  crashDetails: unknown[];
  hangDetails: unknown[];
}

let running: ChildProcess | null = null;
afterAll(() => {
  // A timed-out run must not leave the soak (and its servers) behind: it stops them on SIGTERM.
  if (running !== null && running.exitCode === null) running.kill('SIGTERM');
});

function runSoak(args: string[]): Promise<{ code: number | null; report: SoakReport | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [SOAK, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    running = child;
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr = (stderr + s).slice(-20_000)));
    child.on('error', reject);
    child.on('close', (code) => {
      let report: SoakReport | null = null;
      try {
        report = JSON.parse(stdout) as SoakReport;
      } catch {
        // reported below with the output
      }
      resolve({ code, report, stdout, stderr });
    });
  });
}

it(`${MESSAGES} hostile messages: no server crashes or hangs, fds back to baseline, RSS bounded`, async () => {
  expect(fs.existsSync(path.join(ROOT, 'dist', 'cli', 'main.js')), 'dist/ is built (npm run build:ts)').toBe(true);
  const { code, report, stdout, stderr } = await runSoak(['--messages', String(MESSAGES), '--json', '--quiet']);
  expect(report, `no JSON report; stdout:\n${stdout}\nstderr:\n${stderr}`).not.toBeNull();
  const r = report!;
  const context = `seed ${r.seed} (repeat with: npm run soak -- --messages ${MESSAGES} --seed ${r.seed})`;
  expect(r.crashDetails, `crashes, ${context}`).toEqual([]);
  expect(r.hangDetails, `hangs, ${context}`).toEqual([]);
  expect(r.messages).toBeGreaterThanOrEqual(MESSAGES);
  expect(r.servers.map((s) => s.name)).toEqual(['gpio', 'nvme', 'nvme-mmap', 'virtio-blk']);
  for (const s of r.servers) {
    expect(s.connections, s.name).toBeGreaterThan(10);
    expect(s.restarts, s.name).toBe(0);
    // Exactly: every fd a client made the server open (maps, IRQ eventfds, sockets) is closed.
    expect(s.fds.before, s.name).not.toBeNull();
    expect(s.fds.after, `${s.name} fds, ${context}`).toBe(s.fds.before);
    expect(s.rssKiB.after! - s.rssKiB.before!, `${s.name} RSS growth in KiB, ${context}`).toBeLessThan(RSS_GROWTH_KIB);
  }
  expect(code).toBe(0);
}, 180_000);
