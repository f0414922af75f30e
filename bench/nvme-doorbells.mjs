// NVMe doorbell modes compared, host side, no VM: `vfio-user nvme perf` (our driver) against
// `vfio-user serve nvme --doorbells trap|mmap|ioeventfd` (RAM backend), 4 KiB random reads,
// polled completions. Configurations, run alternately round after round (medians reported):
//   trap       trap server, driver --doorbells message: a posted REGION_WRITE per doorbell
//   shadow     trap server, driver --doorbells shadow: Doorbell Buffer Config, EventIdx
//   mmap       mmap server: stores into the mapped doorbell page, the controller polls it
//   ioeventfd  ioeventfd server: a shadow store and an eventfd signal per doorbell
// Placements: server on CPU 0 and driver on CPU 1 ("split"), and both on CPU 0 ("same").
// Prints JSON (each sample, medians, the server's CPU use during the run, the load average before
// and after).
//   npm run build:ts && node bench/nvme-doorbells.mjs [--time 3] [--rounds 3] [--qd 1,32]
//     [--placements split,same] [--configs trap,shadow,mmap,ioeventfd] [--json-out FILE]
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli', 'main.js');
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const time = Number(opt('--time', '3'));
const rounds = Number(opt('--rounds', '3'));
const depths = opt('--qd', '1,32').split(',').map(Number);
const placements = opt('--placements', 'split,same').split(',');
const CONFIGS = {
  trap: { server: 'trap', driver: 'message' },
  shadow: { server: 'trap', driver: 'shadow' },
  mmap: { server: 'mmap', driver: 'mmap' },
  ioeventfd: { server: 'ioeventfd', driver: 'ioeventfd' },
};
const configs = opt('--configs', Object.keys(CONFIGS).join(',')).split(',');
const CPUS = { split: { server: '0', driver: '1' }, same: { server: '0', driver: '0' } };

const dir = mkdtempSync(join(tmpdir(), 'vfio-user-doorbells-'));

async function startServer(mode, cpu) {
  const socket = join(dir, `${mode}.sock`);
  const proc = spawn('taskset', ['-c', cpu, process.execPath, cli, 'serve', 'nvme', socket, '--size', '256M', '--queues', '2', '--doorbells', mode, '--json'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise((resolve, reject) => {
    createInterface({ input: proc.stdout }).on('line', (l) => {
      try {
        if (JSON.parse(l).event === 'ready') resolve();
      } catch {
        // not JSON
      }
    });
    proc.on('exit', (code) => reject(new Error(`serve nvme --doorbells ${mode} exited with ${code}`)));
  });
  return { socket, proc };
}

function perf(socket, cpu, doorbells, qd, seconds) {
  const r = spawnSync('taskset', ['-c', cpu, process.execPath, cli, 'nvme', 'perf', socket, '--rw', 'randread', '--bs', '4096', '--qd', String(qd), '--time', String(seconds), '--doorbells', doorbells, '--json'], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  if (r.status !== 0) throw new Error(`nvme perf --doorbells ${doorbells} exited with ${r.status}: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

/** CPU seconds (user + system) the process `pid` used so far (taskset execs, so it is the server). */
function cpuSeconds(pid) {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

const report = {
  bench: 'nvme-doorbells',
  node: process.version,
  machine: { cpus: cpus().length, model: cpus()[0]?.model },
  loadavgBefore: loadavg(),
  timeSec: time,
  rounds,
  workload: '4 KiB randread, 1 I/O queue pair, polled completions, RAM namespace (256 MiB)',
  placements: {},
};

try {
  for (const placement of placements) {
    const cpu = CPUS[placement];
    const servers = {};
    for (const mode of new Set(configs.map((c) => CONFIGS[c].server))) servers[mode] = await startServer(mode, cpu.server);
    try {
      // Warm-up (discarded): V8 optimizes both sides' hot paths first.
      for (const c of configs) perf(servers[CONFIGS[c].server].socket, cpu.driver, CONFIGS[c].driver, 8, 1);
      const samples = {};
      for (const qd of depths) {
        samples[qd] = Object.fromEntries(configs.map((c) => [c, []]));
        for (let round = 0; round < rounds; round++) {
          // Alternate, and rotate who goes first, so drifting load hits every configuration alike.
          const order = configs.map((_, i) => configs[(i + round) % configs.length]);
          for (const c of order) {
            const server = servers[CONFIGS[c].server];
            const cpu0 = cpuSeconds(server.proc.pid);
            const t0 = performance.now();
            const s = perf(server.socket, cpu.driver, CONFIGS[c].driver, qd, time);
            // The server's CPU while the run (with the driver's start-up and teardown) lasted.
            const serverCpuPct = Math.round(((cpuSeconds(server.proc.pid) - cpu0) / ((performance.now() - t0) / 1000)) * 100);
            if (s.errors > 0) throw new Error(`${c}: ${s.errors} I/O errors`);
            samples[qd][c].push({ iops: Math.round(s.iops), p50Us: s.latencyUs?.p50, p99Us: s.latencyUs?.p99, serverCpuPct, doorbells: s.doorbells });
            console.error(`nvme-doorbells: ${placement} qd${qd} ${c}: ${Math.round(s.iops)} IOPS (${s.doorbells}), server CPU ${serverCpuPct} %`);
          }
        }
      }
      const result = {};
      for (const qd of depths) {
        result[`qd${qd}`] = Object.fromEntries(
          configs.map((c) => {
            const list = samples[qd][c];
            return [c, { medianIops: median(list.map((x) => x.iops)), medianP50Us: median(list.map((x) => x.p50Us ?? 0)), medianServerCpuPct: median(list.map((x) => x.serverCpuPct)), samples: list }];
          }),
        );
      }
      report.placements[placement] = { serverCpu: cpu.server, driverCpu: cpu.driver, ...result };
    } finally {
      for (const s of Object.values(servers)) {
        s.proc.kill('SIGTERM');
        await new Promise((r) => s.proc.on('exit', r));
      }
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
report.loadavgAfter = loadavg();
const text = JSON.stringify(report, null, 2) + '\n';
const out = opt('--json-out', null);
if (out) writeFileSync(out, text);
process.stdout.write(text);
