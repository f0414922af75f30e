/**
 * Guest benchmark: fio inside one Linux guest under QEMU 11.1 (TCG, 2 vCPUs), against our NVMe
 * controller served the way a user serves it — a child process running
 * `vfio-user serve nvme SOCKET --size 256M --queues 4 --doorbells MODE --busy-poll US` (RAM
 * backend), attached with vfio-user-pci — and QEMU's own in-process `-device nvme` (same size,
 * 4 queue pairs, raw image on tmpfs, cache=unsafe: RAM on both sides), all in the same QEMU and
 * the same guest.
 *
 * Several variants of ours (each doorbell mode × each busy-poll window) run side by side as
 * separate serve processes, each its own NVMe controller in the guest: one guest and one reference
 * measured together, so every ratio compares runs taken minutes apart on the same machine state.
 * An idle controller costs next to nothing (trapped: asleep; mmap'd: a 10 ms poll timer).
 *
 * Every job runs BENCH_ROUNDS times per device; the device order rotates from round to round (with
 * two devices: alternates which goes first). Reported per job: each device's rounds and medians,
 * ours / QEMU of the medians, the server's CPU while its job ran, and the host load per round.
 * Prints JSON (and writes it with BENCH_JSON_OUT=FILE).
 *
 *   npx vitest run --config bench/vitest.bench.config.mts bench/guest-nvme.bench-test.ts
 *   BENCH_DOORBELLS=trap|mmap|both   (or a list: trap,mmap; default trap)
 *   BENCH_BUSY_POLL=0                (serve --busy-poll, µs; a list runs each: 0,50)
 *   BENCH_SECONDS=4 BENCH_ROUNDS=3 BENCH_JOBS=randwrite-4k-qd1,...
 *   BENCH_NODE_FLAGS='--cpu-prof --cpu-prof-dir=DIR'   (node flags for the serve processes)
 *   BENCH_REF_DRIVE='cache=unsafe'   (the reference's -drive options)
 *
 * Needs `bash scripts/setup-interop.sh` once, and `npm run build:ts` (the server runs dist/).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { expect, it } from 'vitest';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable, waitForPathScript } from '../test/interop/harness';

const SIZE_MIB = 256;
const QUEUES = 4;
const seconds = Number(process.env.BENCH_SECONDS ?? 4);
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const nodeFlags = (process.env.BENCH_NODE_FLAGS ?? '').split(' ').filter(Boolean);
/** QEMU's -drive options for the reference: page cache on tmpfs, flushes ignored (our RAM backend has nothing to flush either). */
const refDrive = process.env.BENCH_REF_DRIVE ?? 'cache=unsafe';
const cli = path.join(__dirname, '..', 'dist', 'cli', 'main.js');

interface Job {
  name: string;
  rw: 'randread' | 'randwrite' | 'read' | 'write';
  bs: string;
  bytes: number;
  qd: number;
}
const ALL_JOBS: Job[] = [
  { name: 'randread-4k-qd1', rw: 'randread', bs: '4k', bytes: 4096, qd: 1 },
  { name: 'randread-4k-qd32', rw: 'randread', bs: '4k', bytes: 4096, qd: 32 },
  { name: 'randwrite-4k-qd1', rw: 'randwrite', bs: '4k', bytes: 4096, qd: 1 },
  { name: 'randwrite-4k-qd32', rw: 'randwrite', bs: '4k', bytes: 4096, qd: 32 },
  { name: 'read-128k-qd8', rw: 'read', bs: '128k', bytes: 128 << 10, qd: 8 },
  { name: 'write-128k-qd8', rw: 'write', bs: '128k', bytes: 128 << 10, qd: 8 },
  { name: 'read-1m-qd8', rw: 'read', bs: '1m', bytes: 1 << 20, qd: 8 },
  { name: 'write-1m-qd8', rw: 'write', bs: '1m', bytes: 1 << 20, qd: 8 },
];
const JOBS = process.env.BENCH_JOBS ? ALL_JOBS.filter((j) => process.env.BENCH_JOBS!.split(',').includes(j.name)) : ALL_JOBS;

/** One of our controllers: a doorbell mode and a busy-poll window; the label is its NVMe serial. */
interface Variant {
  label: string;
  doorbells: string;
  busyPollUs: number;
}
const doorbellModes = (process.env.BENCH_DOORBELLS ?? 'trap').replace('both', 'trap,mmap').split(',');
const busyPolls = (process.env.BENCH_BUSY_POLL ?? '0').split(',').map(Number);
const VARIANTS: Variant[] = doorbellModes.flatMap((doorbells) => busyPolls.map((busyPollUs) => ({ label: `${doorbells}-bp${busyPollUs}`, doorbells, busyPollUs })));
const REF = 'ref';
/** Every device in the guest by NVMe serial: QEMU's first, then ours. */
const DEVICES = [REF, ...VARIANTS.map((v) => v.label)];

/** terse v3 fields (1-based; cut prints them in this order): bandwidth (KiB/s), IOPS, mean total latency (µs). */
const TERSE = { read: '7,8,40', write: '48,49,81' };

function shellVar(serial: string): string {
  return `D_${serial.replace(/-/g, '_')}`;
}

function script(): string {
  const lines = DEVICES.map((_, i) => waitForPathScript(`/dev/nvme${i}n1`, 30));
  for (const serial of DEVICES) {
    const v = shellVar(serial);
    lines.push(
      `${v}=; for c in /sys/class/nvme/nvme*; do [ "$(tr -d ' ' < $c/serial)" = ${serial} ] && ${v}=/dev/\${c##*/}n1; done`,
      `[ -n "$${v}" ] || { echo "RESULT missing=${serial}"; exit 1; }`,
      `echo "RESULT dev_${serial}=$${v}"`,
      // Precondition: the test area is written once, so reads hit written data on both sides.
      `dd if=/dev/zero of=$${v} bs=1M count=128 oflag=direct 2>/dev/null`,
    );
  }
  lines.push('echo "RESULT start=1"');
  for (let round = 0; round < rounds; round++) {
    const order = [...DEVICES.slice(round % DEVICES.length), ...DEVICES.slice(0, round % DEVICES.length)];
    for (const job of JOBS) {
      for (const serial of order) {
        const fields = job.rw.includes('write') ? TERSE.write : TERSE.read;
        lines.push(
          `out=$(fio --minimal --name=${job.name} --filename=$${shellVar(serial)} --size=128M --rw=${job.rw} --bs=${job.bs} ` +
            `--iodepth=${job.qd} --ioengine=libaio --direct=1 --runtime=${seconds} --time_based --group_reporting)`,
          `echo "RESULT r${round}_${job.name}_${serial}=$(echo "$out" | cut -d";" -f${fields})"`,
        );
      }
    }
  }
  return lines.join('\n');
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** CPU time (utime + stime) of a process in clock ticks, or NaN once it is gone. */
function cpuTicks(pid: number | undefined): number {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[11]) + Number(fields[12]);
  } catch {
    return NaN;
  }
}
const TICKS_PER_SECOND = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;

function allowedCpus(pid: number | undefined): string {
  try {
    return /Cpus_allowed_list:\s*(\S+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? '?';
  } catch {
    return '?';
  }
}

function uptime(): string {
  return spawnSync('uptime', { encoding: 'utf8' }).stdout.trim();
}

interface Served {
  variant: Variant;
  child: ChildProcess;
  ready: Record<string, unknown>;
  stop: () => Promise<void>;
}

/** Starts `vfio-user serve nvme` for one variant and resolves on its --json ready line. */
async function serve(variant: Variant, socket: string): Promise<Served> {
  const args = [
    ...nodeFlags, cli, 'serve', 'nvme', socket, '--size', `${SIZE_MIB}M`, '--queues', String(QUEUES),
    '--doorbells', variant.doorbells, '--busy-poll', String(variant.busyPollUs), '--serial', variant.label, '--json',
  ];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const ready = await new Promise<Record<string, unknown>>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve ${variant.label}: no ready line in 15 s\n${stderr}`)), 15_000);
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      let event: Record<string, unknown>;
      try {
        event = JSON.parse(line) as Record<string, unknown>;
      } catch {
        return; // not one of the --json lines (e.g. a node flag's own message)
      }
      if (event.event !== 'ready') return;
      clearTimeout(timer);
      resolve(event);
    });
    void exited.then(() => {
      clearTimeout(timer);
      reject(new Error(`serve ${variant.label} exited with ${child.exitCode}\n${stderr}`));
    });
  });
  return {
    variant,
    child,
    ready,
    stop: async () => {
      if (child.exitCode !== null) return;
      child.kill('SIGTERM'); // a clean exit also lets --cpu-prof write its profile
      const killer = setTimeout(() => child.kill('SIGKILL'), 20_000);
      await exited;
      clearTimeout(killer);
    },
  };
}

/** Each fio run's CPU use, attributed when its RESULT line arrives: the interval since the previous one. */
class CpuSampler {
  private last: { at: number; ticks: Map<string, number> } | null = null;
  readonly perRun = new Map<string, { serverPct: number; qemuPct: number }>();
  readonly loadByRound = new Map<number, number[]>();

  private qemuPid: number | undefined;

  constructor(private readonly pids: Map<string, number | undefined>) {}

  setQemu(pid: number | undefined): void {
    this.qemuPid = pid;
  }

  onLine(line: string): void {
    const m = /RESULT (r(\d+)_\S+?_([a-z0-9-]+))=/.exec(line);
    if (m === null && !line.includes('RESULT start=')) return;
    const now = { at: performance.now(), ticks: new Map([...this.pids].map(([k, pid]) => [k, cpuTicks(pid)])) };
    now.ticks.set('qemu', cpuTicks(this.qemuPid));
    if (m !== null && this.last !== null) {
      const seconds = (now.at - this.last.at) / 1000;
      const pct = (key: string) => Math.round((100 * (now.ticks.get(key)! - this.last!.ticks.get(key)!)) / TICKS_PER_SECOND / seconds);
      this.perRun.set(m[1]!, { serverPct: m[3] === REF ? 0 : pct(m[3]!), qemuPct: pct('qemu') });
      const round = Number(m[2]);
      this.loadByRound.set(round, [...(this.loadByRound.get(round) ?? []), os.loadavg()[0]!]);
    }
    this.last = now;
  }
}

function usable(): boolean {
  return interopAvailable().ok && fs.existsSync(cli);
}

const perRunSeconds = seconds + 4; // fio's own start-up under TCG is a few seconds
const bootBudgetMs = (rounds * JOBS.length * DEVICES.length * perRunSeconds + 120 + 20 * DEVICES.length) * 1000;

it.skipIf(!usable())('guest fio: our NVMe (vfio-user serve, child process) vs QEMU -device nvme', async () => {
  const dir = fs.mkdtempSync(path.join('/dev/shm', 'vfio-user-bench-'));
  const served: Served[] = [];
  const uptimeStart = uptime();
  try {
    for (const v of VARIANTS) served.push(await serve(v, path.join(dir, `${v.label}.sock`)));
    const sampler = new CpuSampler(new Map(served.map((s) => [s.variant.label, s.child.pid])));
    const initramfs = await buildInitramfs({ modules: ['nvme'], withFio: true, script: script() });
    let qemuCpus = '?';
    const r = await bootGuest({
      sockets: served.map((s) => String(s.ready.socket)),
      initramfs,
      cpus: 2,
      memoryMiB: 1024,
      timeoutMs: bootBudgetMs,
      qemuNvme: { sizeMiB: SIZE_MIB, driveOptions: refDrive, deviceOptions: `max_ioqpairs=${QUEUES}` },
      onSpawn: (child) => {
        sampler.setQemu(child.pid);
        qemuCpus = allowedCpus(child.pid);
      },
      onLine: (line) => sampler.onLine(line),
    });
    const uptimeEnd = uptime();
    expect(r.scriptExitCode, describeBoot(r)).toBe(0);

    const run = (round: number, job: Job, serial: string) => {
      const key = `r${round}_${job.name}_${serial}`;
      const [kib, iops, latUs] = (r.results[key] ?? 'NaN;NaN;NaN').split(';').map(Number);
      return { iops: iops!, mibs: +(kib! / 1024).toFixed(1), latUs: +latUs!.toFixed(1), ...(sampler.perRun.get(key) ?? {}) };
    };
    const results: Record<string, unknown> = {};
    const table: string[] = [];
    for (const job of JOBS) {
      const roundsOf = (serial: string) => Array.from({ length: rounds }, (_, k) => run(k, job, serial));
      const summary = (serial: string) => {
        const all = roundsOf(serial);
        return {
          iops: median(all.map((x) => x.iops)),
          mibs: +median(all.map((x) => x.mibs)).toFixed(1),
          latUs: +median(all.map((x) => x.latUs)).toFixed(1),
          ...(serial === REF ? {} : { serverCpuPct: median(all.map((x) => x.serverPct ?? NaN)) }),
          qemuCpuPct: median(all.map((x) => x.qemuPct ?? NaN)),
          rounds: all,
        };
      };
      const ref = summary(REF);
      const ours: Record<string, unknown> = {};
      const cells: string[] = [];
      for (const v of VARIANTS) {
        const s = summary(v.label);
        const ratio = +(s.iops / ref.iops).toFixed(3);
        const roundRatios = s.rounds.map((x, k) => +(x.iops / ref.rounds[k]!.iops).toFixed(2));
        ours[v.label] = { ...s, ratio, roundRatios };
        cells.push(`${v.label} ${s.iops}/${ref.iops}=${ratio.toFixed(2)} [${roundRatios.join(' ')}]`);
      }
      results[job.name] = { unit: 'IOPS (median of rounds)', qemu: ref, ours };
      table.push(`${job.name.padEnd(18)} ${cells.join(' | ')}`);
    }
    const loadByRound = Object.fromEntries([...sampler.loadByRound].map(([k, xs]) => [`round${k}`, { min: Math.min(...xs), max: Math.max(...xs) }]));
    const report = {
      bench: 'guest-nvme-fio',
      qemu: '11.1 (TCG, 2 vCPUs, 1 GiB)',
      guest: 'Debian 12 linux 6.1, fio libaio O_DIRECT, 128 MiB of each 256 MiB namespace, written once first',
      secondsPerJob: seconds,
      rounds,
      order: 'device order rotates each round (two devices: alternate); rounds are the outer loop',
      ours: Object.fromEntries(served.map((s) => [s.variant.label, `vfio-user serve nvme --size ${SIZE_MIB}M --queues ${QUEUES} --doorbells ${s.variant.doorbells} --busy-poll ${s.variant.busyPollUs} (${String(s.ready.backing)}), own process, node ${process.version}${nodeFlags.length ? ' ' + nodeFlags.join(' ') : ''}`])),
      reference: `QEMU -device nvme,max_ioqpairs=${QUEUES} (mdts 7 = 512 KiB, as ours; shadow doorbells on, as ours) on -drive raw image in /dev/shm, ${refDrive}, aio=threads unless given`,
      placement: {
        cpus: `${os.cpus().length} × ${os.cpus()[0]?.model ?? '?'}`,
        pinning: 'none: QEMU (2 TCG vCPU threads, main loop, I/O threads) and every serve process share all CPUs',
        qemuAllowed: qemuCpus,
        servers: Object.fromEntries(served.map((s) => [s.variant.label, { pid: s.child.pid, allowed: allowedCpus(s.child.pid) }])),
      },
      load: { start: uptimeStart, end: uptimeEnd, oneMinuteByRound: loadByRound },
      cpuNote: 'serverCpuPct / qemuCpuPct: % of one CPU used by that process from the previous fio run\'s end to this one\'s (includes fio start-up in the guest)',
      results,
      note: 'TCG dominates absolute guest numbers: compare ratios (ours / QEMU of the medians), not IOPS',
    };
    const json = JSON.stringify(report, null, 2);
    console.log(json);
    console.log(`load: ${uptimeStart} -> ${uptimeEnd}\n${table.join('\n')}`);
    if (process.env.BENCH_JSON_OUT) fs.writeFileSync(process.env.BENCH_JSON_OUT, json + '\n');
  } finally {
    await Promise.all(served.map((s) => s.stop()));
    cleanupInterop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}, bootBudgetMs + 60_000);
