// Host-side NBD benchmark, no VM: `vfio-user nvme perf` against two `vfio-user serve nvme`
// servers on the same raw image (random bytes, on tmpfs): one with `--file IMAGE` (FileBackend:
// preadv into guest memory), one with `--nbd` to Debian's qemu-nbd serving that image (NbdBackend,
// 4 connections). 4 KiB random reads at QD 32 and 512 KiB sequential reads at QD 8, runs alternating
// between the two, medians compared. Placement: both servers and qemu-nbd on CPU 0, the driver on
// CPU 1 (taskset). Prints JSON.
//   npm run build:ts && node bench/nbd-perf.mjs [--time 5] [--rounds 3] [--json-out FILE]
import { spawn, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { createConnection } from 'node:net';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli', 'main.js');
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const time = Number(opt('--time', '5'));
const rounds = Number(opt('--rounds', '3'));
const SIZE_MIB = 256;

const dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'vfio-user-nbd-perf-'));
const image = join(dir, 'disk.raw');
const chunk = Buffer.alloc(1 << 20);
const fd = openSync(image, 'w');
for (let i = 0; i < SIZE_MIB; i++) writeSync(fd, randomFillSync(chunk));
closeSync(fd);

const children = [];
const nbdSock = join(dir, 'qemu-nbd.sock');
const qemuNbd = spawn('taskset', ['-c', '0', 'qemu-nbd', '-f', 'raw', '-x', 'disk', '-t', '--shared=16', '--cache=writeback', '--aio=threads', '-k', nbdSock, image], { stdio: 'inherit' });
children.push(qemuNbd);
for (let i = 0; i < 100 && !(await canConnect(nbdSock)); i++) await new Promise((r) => setTimeout(r, 50));

async function canConnect(path) {
  return new Promise((resolve) => {
    const s = createConnection({ path }, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

async function serve(name, backing) {
  const socket = join(dir, `${name}.sock`);
  const server = spawn('taskset', ['-c', '0', process.execPath, cli, 'serve', 'nvme', socket, '--json', '--queues', '4', ...backing], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(server);
  await new Promise((resolve, reject) => {
    createInterface({ input: server.stdout }).on('line', (l) => JSON.parse(l).event === 'ready' && resolve());
    server.on('exit', (code) => reject(new Error(`serve nvme ${backing.join(' ')} exited with ${code}`)));
  });
  return socket;
}

const JOBS = [
  { name: 'randread-4k-qd32', rw: 'randread', bs: 4096, qd: 32 },
  // perf's largest transfer is the controller's MDTS (512 KiB): 512 KiB at QD 8 keeps 4 MiB in flight.
  { name: 'read-512k-qd8', rw: 'read', bs: 512 << 10, qd: 8 },
];
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

const load = { before: loadavg() };
const results = {};
try {
  const targets = {
    file: await serve('file', ['--file', image]),
    nbd: await serve('nbd', ['--nbd', `nbd+unix:///disk?socket=${nbdSock}`]),
  };
  const perf = (socket, job, t) => {
    const r = spawnSync('taskset', ['-c', '1', process.execPath, cli, 'nvme', 'perf', socket, '--rw', job.rw, '--bs', String(job.bs), '--qd', String(job.qd), '--time', String(t), '--json'], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    if (r.status !== 0) throw new Error(`nvme perf exited with ${r.status}`);
    return JSON.parse(r.stdout);
  };
  // Warm-up (discarded): V8 optimizes the servers' hot paths; the page cache holds the image.
  for (const socket of Object.values(targets)) for (const job of JOBS) perf(socket, job, 1);
  for (const job of JOBS) {
    const runs = { file: [], nbd: [] };
    for (let round = 0; round < rounds; round++) {
      const order = round % 2 === 0 ? ['file', 'nbd'] : ['nbd', 'file'];
      for (const which of order) {
        const s = perf(targets[which], job, time);
        runs[which].push(job.bs === 4096 ? Math.round(s.iops) : +(s.mbps / 1.048576).toFixed(1));
      }
    }
    results[job.name] = {
      unit: job.bs === 4096 ? 'IOPS' : 'MiB/s',
      file: { runs: runs.file, median: median(runs.file) },
      nbd: { runs: runs.nbd, median: median(runs.nbd) },
      ratio: +(median(runs.nbd) / median(runs.file)).toFixed(3),
    };
  }
} finally {
  for (const c of children.reverse()) {
    c.kill('SIGTERM');
    await new Promise((r) => (c.exitCode !== null || c.signalCode !== null ? r() : c.on('exit', r)));
  }
  rmSync(dir, { recursive: true, force: true });
}
load.after = loadavg();
const report = {
  bench: 'nbd-perf-host',
  node: process.version,
  timeSec: time,
  rounds,
  image: `${SIZE_MIB} MiB raw image of random bytes on tmpfs`,
  file: 'serve nvme --file IMAGE (FileBackend, 4 queues)',
  nbd: 'serve nvme --nbd to qemu-nbd -f raw on the same image (NbdBackend, 4 connections, 4 queues)',
  placement: `servers and qemu-nbd pinned to CPU 0, the driver (nvme perf, polled) to CPU 1, of ${cpus().length}`,
  loadavg: load,
  results,
};
console.log(JSON.stringify(report, null, 2));
const out = opt('--json-out', null);
if (out) writeFileSync(out, JSON.stringify(report, null, 2) + '\n');
