// Host-side NVMe benchmark, no VM: `vfio-user nvme perf` (our driver over VfioUserClient, on
// CPU 1) against `vfio-user serve nvme --size 1G` (RAM, CPU 0), each a process started exactly as
// a user would. The RAM disk is sparse: a sequential pass first allocates all of it (a first
// touch costs a page fault and a page clear, which is not what a steady random read costs), then
// a discarded warm-up. 4 KiB random reads in alternated rounds (medians):
//   - QD 32 on 1 queue, and on 2 queues (--queues 2 must not be slower), polled completions.
//     `nvme perf --qd` is per queue, so 2 queues are measured at QD 16 each (the same 32
//     commands outstanding) and at QD 32 each (the tool's semantics: 64 outstanding);
//   - QD 32 with MSI-X completions (--irq);
//   - QD 1, polled, with its p50 latency set against two floors measured in the same run on the
//     same CPUs: the raw socket floor (a C client against the C echo server, one 4-byte region read
//     per round trip: what one message each way costs) and the shared-memory floor (two Node
//     processes bouncing a word through a shared page, bench/shm-floor.cjs: what a polled queue
//     pair costs at best).
// Beside them, the RAM disk's copy floor (bench/ram-copy-floor.cjs on the server's CPU): what one
// random 4 KiB read out of the 1 GiB disk costs with no NVMe around it, a ceiling on the server.
// Goal (issue "Performance"): QD 32 >= 450k IOPS sustained over 10 s. Prints JSON.
//   npm run build:ts && node bench/nvme-perf.mjs [--time 10] [--rounds 3] [--doorbells trap|mmap]
//                                                [--busy-poll US] [--json-out FILE]
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { runClient, startEcho } from './c-floor.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli', 'main.js');
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const time = Number(opt('--time', '10'));
const rounds = Number(opt('--rounds', '3'));
const doorbells = opt('--doorbells', 'trap');
const busyPoll = opt('--busy-poll', '0');
const GOAL = 450_000;
const SERVER_CPU = 0;
const DRIVER_CPU = 1;
const load = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).map(Number);

const dir = mkdtempSync(join(tmpdir(), 'vfio-user-nvme-perf-'));
const socket = join(dir, 'nvme.sock');

function startServer() {
  const server = spawn('taskset', ['-c', String(SERVER_CPU), process.execPath, cli, 'serve', 'nvme', socket, '--size', '1G', '--queues', '4', '--doorbells', doorbells, '--busy-poll', busyPoll, '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    createInterface({ input: server.stdout }).on('line', (l) => JSON.parse(l).event === 'ready' && resolve(server));
    server.on('exit', (code) => reject(new Error(`serve nvme exited with ${code}`)));
  });
}

/** One `nvme perf` run; live IOPS go to stderr as the command prints them. */
function perf(config) {
  const extra = [...(config.irq ? ['--irq'] : []), '--queues', String(config.queues)];
  const rw = config.rw ?? 'randread';
  const bs = config.bs ?? 4096;
  const r = spawnSync('taskset', ['-c', String(DRIVER_CPU), process.execPath, cli, 'nvme', 'perf', socket, '--rw', rw, '--bs', String(bs), '--qd', String(config.qd), '--time', String(config.time ?? time), '--json', ...extra], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  if (r.status !== 0) throw new Error(`nvme perf exited with ${r.status}`);
  const s = JSON.parse(r.stdout);
  return { iops: Math.round(s.iops), ios: s.ios, p50Us: s.latencyUs.p50, p99Us: s.latencyUs.p99, doorbells: s.doorbells };
}

const CONFIGS = {
  'qd32-q1-poll': { qd: 32, queues: 1 },
  'qd16-q2-poll': { qd: 16, queues: 2 },
  'qd32-q2-poll': { qd: 32, queues: 2 },
  'qd32-q1-irq': { qd: 32, queues: 1, irq: true },
  'qd1-q1-poll': { qd: 1, queues: 1 },
};
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];

async function socketFloor() {
  const sock = join(dir, 'echo.sock');
  const echo = await startEcho(sock, { cpu: SERVER_CPU });
  try {
    return await runClient(sock, { seconds: 2, cpu: DRIVER_CPU });
  } finally {
    await echo.stop();
  }
}

/** Allocates every page of the 1 GiB RAM disk: one sequential run of 128 KiB reads over all of it. */
function prefill() {
  const DISK = 1 << 30;
  const BS = 128 << 10;
  // Each run starts again at LBA 0: lengthen the run until one covers the disk.
  for (let seconds = 2; seconds <= 32; seconds *= 2) {
    if (perf({ rw: 'read', bs: BS, qd: 8, queues: 1, time: seconds }).ios * BS >= DISK) return;
  }
  throw new Error('could not read the whole RAM disk once in 32 s');
}

function copyFloor() {
  const r = spawnSync('taskset', ['-c', String(SERVER_CPU), process.execPath, join(root, 'bench', 'ram-copy-floor.cjs'), '--seconds', '1'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  if (r.status !== 0) throw new Error(`ram-copy-floor exited with ${r.status}`);
  return JSON.parse(r.stdout);
}

function shmFloor() {
  const r = spawnSync('taskset', ['-c', String(DRIVER_CPU), process.execPath, join(root, 'bench', 'shm-floor.cjs'), '--seconds', '2', '--cpus', `${DRIVER_CPU},${SERVER_CPU}`], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  if (r.status !== 0) throw new Error(`shm-floor exited with ${r.status}`);
  return JSON.parse(r.stdout);
}

const loadBefore = load();
const runs = Object.fromEntries(Object.keys(CONFIGS).map((k) => [k, []]));
const floors = { socketP50Us: [], shmP50Us: [], copyNsPerRead: [] };
const server = await startServer();
try {
  prefill();
  perf({ qd: 32, queues: 1, time: 2 }); // warm-up (discarded): V8 optimises the hot paths first
  const names = Object.keys(CONFIGS);
  for (let round = 0; round < rounds; round++) {
    // Rotate the order each round so no configuration always runs first or last.
    for (let i = 0; i < names.length; i++) {
      const name = names[(i + round) % names.length];
      const r = perf(CONFIGS[name]);
      runs[name].push(r);
      process.stderr.write(`round ${round + 1} ${name}: ${r.iops} IOPS, p50 ${r.p50Us} us (${r.doorbells})\n`);
    }
    floors.socketP50Us.push((await socketFloor()).p50Us);
    floors.shmP50Us.push(shmFloor().p50Us);
    floors.copyNsPerRead.push(copyFloor().nsPerRead);
  }
} finally {
  server.kill('SIGTERM');
  await new Promise((r) => server.on('exit', r));
  rmSync(dir, { recursive: true, force: true });
}

const results = {};
for (const [name, list] of Object.entries(runs)) {
  results[name] = { iops: median(list.map((r) => r.iops)), p50Us: median(list.map((r) => r.p50Us)), p99Us: median(list.map((r) => r.p99Us)), doorbells: list[0].doorbells, rounds: list.map((r) => r.iops) };
}
const copyNs = median(floors.copyNsPerRead);
const socketP50 = median(floors.socketP50Us);
const shmP50 = median(floors.shmP50Us);
const report = {
  bench: 'nvme-perf-host',
  node: process.version,
  placement: { server: `CPU ${SERVER_CPU}`, driver: `CPU ${DRIVER_CPU}` },
  server: `serve nvme --size 1G --queues 4 --doorbells ${doorbells} --busy-poll ${busyPoll}`,
  load: { before: loadBefore, after: load() },
  timeSec: time,
  rounds,
  results,
  qd1Floors: {
    socketRoundTripP50Us: socketP50,
    sharedMemoryRoundTripP50Us: shmP50,
    oursP50Us: results['qd1-q1-poll'].p50Us,
    oursOverSocketFloor: +(results['qd1-q1-poll'].p50Us / socketP50).toFixed(2),
    oursOverSharedMemoryFloor: +(results['qd1-q1-poll'].p50Us / shmP50).toFixed(2),
  },
  ramCopyFloor: {
    nsPer4kRead: copyNs,
    serverCeilingIops: Math.round(1e9 / copyNs),
    qd32OverCeiling: +(results['qd32-q1-poll'].iops / (1e9 / copyNs)).toFixed(2),
  },
  qdSemantics: '--qd is per queue: qd16-q2 keeps the same 32 commands outstanding as qd32-q1, qd32-q2 keeps 64',
  goal: `QD32 >= ${GOAL} IOPS over ${time} s; --queues 2 not slower than --queues 1`,
  meetsGoal: results['qd32-q1-poll'].iops >= GOAL,
  queues2NotSlower: {
    sameOutstanding: results['qd16-q2-poll'].iops >= results['qd32-q1-poll'].iops,
    qd32PerQueue: results['qd32-q2-poll'].iops >= results['qd32-q1-poll'].iops,
  },
};
console.log(JSON.stringify(report, null, 2));
const out = opt('--json-out', null);
if (out) writeFileSync(out, JSON.stringify(report, null, 2) + '\n');
