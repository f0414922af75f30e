// Host-side FileBackend benchmark, no VM, no device: 4 KiB random reads and writes at QD 1 and
// QD 32 straight on a FileBackend over a page-cached file (ext4 under /var/tmp by default), with
// the io_uring engine against the libuv thread-pool engine (the reference). Each run is a fresh
// process; runs alternate between the engines, and medians of `--rounds` are compared. Prints JSON.
//   npm run build:ts && node bench/file-backend.mjs [--time 3] [--rounds 3] [--dir /var/tmp]
//     [--cpu 0] (taskset CPU list for the runs; default unpinned) [--json-out FILE]
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const SIZE = 256 << 20;
const BS = 4096;

if (args[0] === '--run') await run(args[1], args[2], args[3], Number(args[4]), Number(args[5]));
else await main();

/** One measurement: `qd` lanes each doing one 4 KiB request after another for `seconds`. */
async function run(image, engine, rw, qd, seconds) {
  const { FileBackend } = await import(join(root, 'dist', 'index.js'));
  const backend = FileBackend.open(image, { engine });
  const blocks = SIZE / BS;
  let ops = 0;
  let stop = false;
  const lane = async (seed) => {
    const buf = Buffer.alloc(BS, seed);
    let x = seed * 2654435761 >>> 0 || 1;
    while (!stop) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      const offset = ((x >>> 0) % blocks) * BS;
      if (rw === 'randread') await backend.read(offset, buf);
      else await backend.write(offset, buf, false);
      ops++;
    }
  };
  const warm = Date.now() + 300;
  const lanes = Array.from({ length: qd }, (_, i) => lane(i + 1));
  while (Date.now() < warm) await new Promise((r) => setTimeout(r, 50));
  ops = 0;
  const t0 = process.hrtime.bigint();
  const cpu0 = process.cpuUsage();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  stop = true;
  const elapsed = Number(process.hrtime.bigint() - t0) / 1e9;
  const done = ops;
  const cpu = process.cpuUsage(cpu0);
  await Promise.all(lanes);
  await backend.close();
  const cpuPerOpUs = (cpu.user + cpu.system) / done;
  console.log(JSON.stringify({ engine: backend.engine, iops: Math.round(done / elapsed), cpuPerOpUs: +cpuPerOpUs.toFixed(2) }));
}

async function main() {
  const seconds = Number(opt('--time', '3'));
  const rounds = Number(opt('--rounds', '3'));
  const cpu = opt('--cpu', undefined);
  const dir = mkdtempSync(join(opt('--dir', '/var/tmp'), 'vfio-user-file-bench-'));
  const image = join(dir, 'disk.img');
  try {
    const chunk = Buffer.alloc(1 << 20);
    const fd = openSync(image, 'w');
    for (let i = 0; i < SIZE >> 20; i++) writeSync(fd, randomFillSync(chunk));
    closeSync(fd);
    // Into the page cache before the first run.
    const rfd = openSync(image, 'r');
    while (readSync(rfd, chunk) > 0);
    closeSync(rfd);

    const jobs = [
      { rw: 'randread', qd: 1 },
      { rw: 'randread', qd: 32 },
      { rw: 'randwrite', qd: 1 },
      { rw: 'randwrite', qd: 32 },
    ];
    const engines = ['io_uring', 'threadpool'];
    const loadBefore = loadavg();
    const runs = {};
    for (let round = 0; round < rounds; round++) {
      for (const job of jobs) {
        const name = `${job.rw}-4k-qd${job.qd}`;
        runs[name] ??= { io_uring: [], threadpool: [] };
        const order = round % 2 === 0 ? engines : [...engines].reverse();
        for (const engine of order) {
          const child = [process.execPath, fileURLToPath(import.meta.url), '--run', image, engine, job.rw, String(job.qd), String(seconds)];
          const r = cpu ? spawnSync('taskset', ['-c', cpu, ...child], { encoding: 'utf8' }) : spawnSync(child[0], child.slice(1), { encoding: 'utf8' });
          if (r.status !== 0) throw new Error(`run failed: ${r.stderr}`);
          const out = JSON.parse(r.stdout.trim().split('\n').at(-1));
          if (out.engine !== engine) throw new Error(`asked for ${engine}, ran ${out.engine}`);
          runs[name][engine].push(out);
        }
      }
    }
    const median = (xs) => {
      const s = [...xs].sort((a, b) => a - b);
      const m = s.length >> 1;
      return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
    };
    const results = {};
    for (const [name, r] of Object.entries(runs)) {
      const uring = median(r.io_uring.map((x) => x.iops));
      const pool = median(r.threadpool.map((x) => x.iops));
      results[name] = {
        io_uring: { iops: uring, cpuPerOpUs: median(r.io_uring.map((x) => x.cpuPerOpUs)), runs: r.io_uring.map((x) => x.iops) },
        threadpool: { iops: pool, cpuPerOpUs: median(r.threadpool.map((x) => x.cpuPerOpUs)), runs: r.threadpool.map((x) => x.iops) },
        ratio: +(uring / pool).toFixed(3),
      };
    }
    const report = {
      bench: 'file-backend',
      file: `${SIZE >> 20} MiB, page cache warm, under ${opt('--dir', '/var/tmp')}`,
      secondsPerRun: seconds,
      rounds,
      placement: `${cpus().length} CPUs; runs ${cpu ? `pinned to ${cpu} (taskset)` : 'unpinned'}`,
      loadavg: { before: loadBefore.map((x) => +x.toFixed(2)), after: loadavg().map((x) => +x.toFixed(2)) },
      reference: 'FileBackend engine threadpool (fs.readv/writev on libuv workers, UV_THREADPOOL_SIZE default 4)',
      results,
      note: 'ratio = io_uring / threadpool IOPS, medians of alternated runs; cpuPerOpUs is the whole process CPU time (libuv workers and io-wq threads included) per request',
    };
    const json = JSON.stringify(report, null, 2);
    console.log(json);
    const out = opt('--json-out', undefined);
    if (out) writeFileSync(out, json + '\n');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
