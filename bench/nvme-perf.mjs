// Host-side NVMe benchmark, no VM: `vfio-user nvme perf` (our driver over VfioUserClient) against
// `vfio-user serve nvme` (RAM backend), 4 KiB random reads at QD32 and QD1, with polled and with
// MSI-X completions, each run as separate processes exactly as a user would (server pinned to
// CPU 0, driver to CPU 1). Prints JSON.
//   npm run build:ts && node bench/nvme-perf.mjs [--time 5] [--json-out FILE]
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli', 'main.js');
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const time = Number(opt('--time', '5'));

const dir = mkdtempSync(join(tmpdir(), 'vfio-user-nvme-perf-'));
const socket = join(dir, 'nvme.sock');
// Server on CPU 0, driver on CPU 1: each side gets a core of the 2-vCPU machine.
const server = spawn('taskset', ['-c', '0', process.execPath, cli, 'serve', 'nvme', socket, '--size', '1G', '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
await new Promise((resolve, reject) => {
  createInterface({ input: server.stdout }).on('line', (l) => JSON.parse(l).event === 'ready' && resolve());
  server.on('exit', (code) => reject(new Error(`serve nvme exited with ${code}`)));
});

const results = {};
try {
  // Warm-up (discarded): the server's hot paths get optimized by V8 before anything is measured.
  spawnSync('taskset', ['-c', '1', process.execPath, cli, 'nvme', 'perf', socket, '--rw', 'randread', '--qd', '32', '--time', '2', '--json'], { stdio: 'ignore' });
  for (const qd of [32, 1]) {
    for (const completions of ['poll', 'irq']) {
      const extra = completions === 'irq' ? ['--irq'] : [];
      const r = spawnSync('taskset', ['-c', '1', process.execPath, cli, 'nvme', 'perf', socket, '--rw', 'randread', '--bs', '4096', '--qd', String(qd), '--time', String(time), '--json', ...extra], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      if (r.status !== 0) throw new Error(`nvme perf exited with ${r.status}`);
      const s = JSON.parse(r.stdout);
      results[`randread-4k-qd${qd}-${completions}`] = { iops: Math.round(s.iops), mbps: +s.mbps.toFixed(1), latencyUs: s.latencyUs, doorbells: s.doorbells };
    }
  }
} finally {
  server.kill('SIGTERM');
  await new Promise((r) => server.on('exit', r));
  rmSync(dir, { recursive: true, force: true });
}
const report = {
  bench: 'nvme-perf-host',
  node: process.version,
  timeSec: time,
  target: '>= 300k IOPS at QD32 (4 KiB randread)',
  results,
  // Polled completions are perf's default (as spdk_nvme_perf), what the plain command line measures.
  meetsTarget: results['randread-4k-qd32-poll'].iops >= 300_000,
};
console.log(JSON.stringify(report, null, 2));
const out = opt('--json-out', null);
if (out) writeFileSync(out, JSON.stringify(report, null, 2) + '\n');
