// Live migration of an NVMe controller between two `vfio-user serve nvme` processes, with the host
// driver (NvmeDriver, this process) moving along inside the downtime. Two scenarios, alternated
// run by run, medians reported (JSON on stdout):
//
//   file   a file namespace both servers open (shared storage, flushed at STOP) under a random
//          4 KiB read/write workload at QD 32, unthrottled.      Goal: downtime <= 50 ms.
//   ram    a 256 MiB RAM namespace, every block written first, taking ~10 MiB/s of random 4 KiB
//          writes during the migration.          Goal: PRE_COPY converges, downtime <= 200 ms.
//
// Downtime = the source asked to stop (STOP_COPY) -> the destination answered RUNNING, as
// migrate() measures it; the breakdown says where it went.
//
//   npm run build:ts && node bench/migrate.mjs [--runs 5] [--placement spread|same|none] [--json-out FILE]
//
// Placement (taskset): spread (default) = source server on CPU 0, destination on CPU 1, this
// process (driver, workload, migration) unpinned; same = everything on CPU 0; none = unpinned.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { VfioUserClient, NvmeDriver, migrate, nvmeDriver } from '../dist/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'dist', 'cli', 'main.js');
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const runs = Number(opt('--runs', '5'));
const placement = opt('--placement', 'spread');
const jsonOut = opt('--json-out', null);
const BLOCK = 4096;
const MiB = 1024 * 1024;

function pinned(cpu, argv) {
  if (placement === 'none' || cpu === null) return [process.execPath, argv];
  return ['taskset', ['-c', placement === 'same' ? '0' : String(cpu), process.execPath, ...argv]];
}

async function serve(dir, name, cpu, extra) {
  const socket = join(dir, `${name}.sock`);
  const [cmd, argv] = pinned(cpu, [cli, 'serve', 'nvme', socket, '--queues', '4', '--serial', 'MIGRATE-BENCH', '--json', ...extra]);
  const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`serve nvme (${name}) exited with ${code}`)));
    createInterface({ input: child.stdout }).on('line', (line) => {
      if (line.includes('"ready"')) resolve();
    });
  });
  return { socket, child };
}

const stopChild = (c) => (c.exitCode !== null ? null : new Promise((r) => (c.once('exit', r), c.kill('SIGTERM'))));

/**
 * One migration: servers started, driver opened on the source, `prepare(driver, qp, ns, memory)`
 * (fill) then `load` (the workload: returns { stop() -> stats }), migration with the driver moving,
 * a little more I/O on the destination, workload stopped and checked.
 */
async function once(kind) {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-migrate-bench-'));
  const extra = kind === 'file' ? ['--file', join(dir, 'disk.img'), '--size', '256M'] : ['--size', '256M'];
  const servers = [];
  try {
    servers.push(await serve(dir, 'source', 0, extra));
    servers.push(await serve(dir, 'destination', 1, extra));
    const [src, dst] = await Promise.all(servers.map((s) => VfioUserClient.connect(s.socket, { timeoutMs: 30_000 })));
    const depth = kind === 'file' ? 32 : 16;
    const driver = await NvmeDriver.open(src, { ioQueues: 1 });
    const qp = await driver.createIoQueuePair({ depth });
    const ns = driver.namespace(1);
    const per = BLOCK / ns.blockSize;
    const blocks = Math.floor((ns.nsze * ns.blockSize) / BLOCK);
    const memory = await driver.allocateBuffer(depth * BLOCK);
    const slot = (i) => ({ bytes: memory.bytes.subarray(i * BLOCK, (i + 1) * BLOCK), ref: { iova: memory.iovaOf(i * BLOCK), length: BLOCK } });
    if (kind === 'ram') {
      // Every block holds data: the first PRE_COPY round moves 256 MiB.
      let next = 0;
      await Promise.all(
        Array.from({ length: depth }, async (_, i) => {
          const { bytes, ref } = slot(i);
          while (next < blocks) {
            const b = next++;
            bytes.fill(b & 0xff);
            bytes.writeUInt32LE(b, 0);
            await nvmeDriver.write(qp, ns, b * per, per, ref);
          }
        }),
      );
    }
    // The workload: file = QD 32 random 50/50 as fast as it goes; ram = ~10 MiB/s of 4 KiB writes.
    const stats = { reads: 0, writes: 0, errors: 0 };
    let running = true;
    let seed = 12345;
    const rnd = (n) => {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return (seed >>> 0) % n;
    };
    const writesPerSecond = (10 * MiB) / BLOCK;
    let credits = 0;
    let last = performance.now();
    const worker = async (i) => {
      const { bytes, ref } = slot(i);
      while (running) {
        if (kind === 'ram') {
          const now = performance.now();
          credits = Math.min(depth, credits + ((now - last) * writesPerSecond) / 1000);
          last = now;
          if (credits < 1) {
            await sleep(2);
            continue;
          }
          credits -= 1;
        }
        const b = rnd(blocks);
        try {
          if (kind === 'ram' || rnd(2) === 0) {
            bytes.writeUInt32LE(b, 0);
            await nvmeDriver.write(qp, ns, b * per, per, ref);
            stats.writes++;
          } else {
            await nvmeDriver.read(qp, ns, b * per, per, ref);
            stats.reads++;
          }
        } catch {
          stats.errors++;
        }
      }
    };
    const workers = Array.from({ length: depth }, (_, i) => worker(i));
    await sleep(500);
    await driver.prepareMove(dst);
    const before = { ...stats };
    const t0 = performance.now();
    const result = await migrate(src, dst, { beforeResume: () => driver.completeMove() });
    const migrationMs = performance.now() - t0;
    await sleep(300);
    running = false;
    await Promise.all(workers);
    const ops = stats.reads + stats.writes - before.reads - before.writes;
    await driver.close();
    await src.close();
    await dst.close();
    return {
      downtimeMs: result.downtimeMs,
      breakdown: result.downtime,
      precopyRounds: result.precopyRounds,
      converged: result.converged,
      bytes: result.bytes,
      stopCopyBytes: result.stopCopyBytes,
      dirtyPages: result.dirtyPages,
      totalMs: result.totalMs,
      ioErrors: stats.errors,
      iops: Math.round((ops / (migrationMs + 300)) * 1000),
    };
  } finally {
    await Promise.all(servers.map((s) => stopChild(s.child)));
    rmSync(dir, { recursive: true, force: true });
  }
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

const load = { before: loadavg().map((x) => +x.toFixed(2)) };
const samples = { file: [], ram: [] };
// One discarded warm-up of each, then alternated runs.
for (const kind of ['file', 'ram']) await once(kind);
for (let i = 0; i < runs; i++) {
  for (const kind of i % 2 === 0 ? ['file', 'ram'] : ['ram', 'file']) {
    const r = await once(kind);
    samples[kind].push(r);
    process.stderr.write(`${kind} run ${samples[kind].length}: downtime ${r.downtimeMs.toFixed(1)} ms, ${r.precopyRounds} rounds, ${(r.bytes / MiB).toFixed(1)} MiB\n`);
  }
}
load.after = loadavg().map((x) => +x.toFixed(2));

const summarize = (list, goalMs) => {
  const keys = Object.keys(list[0].breakdown);
  return {
    downtimeMs: { median: +median(list.map((r) => r.downtimeMs)).toFixed(2), min: +Math.min(...list.map((r) => r.downtimeMs)).toFixed(2), max: +Math.max(...list.map((r) => r.downtimeMs)).toFixed(2) },
    goalMs,
    met: median(list.map((r) => r.downtimeMs)) <= goalMs && list.every((r) => r.converged && r.ioErrors === 0),
    breakdownMs: Object.fromEntries(keys.map((k) => [k, +median(list.map((r) => r.breakdown[k])).toFixed(2)])),
    precopyRounds: median(list.map((r) => r.precopyRounds)),
    converged: list.every((r) => r.converged),
    bytesMiB: +(median(list.map((r) => r.bytes)) / MiB).toFixed(1),
    stopCopyKiB: +(median(list.map((r) => r.stopCopyBytes)) / 1024).toFixed(1),
    totalMs: Math.round(median(list.map((r) => r.totalMs))),
    ioErrors: list.reduce((n, r) => n + r.ioErrors, 0),
    iopsDuringMigration: Math.round(median(list.map((r) => r.iops))),
  };
};

const report = {
  bench: 'migrate-nvme',
  node: process.version,
  cpus: cpus().length,
  cpu: cpus()[0]?.model,
  placement: placement === 'spread' ? 'source server CPU 0, destination CPU 1, driver/migration unpinned' : placement === 'same' ? 'all on CPU 0' : 'unpinned',
  loadavg: load,
  runs,
  file: { scenario: 'file namespace (shared, 256 MiB), random 4 KiB 50/50 at QD 32', ...summarize(samples.file, 50) },
  ram: { scenario: '256 MiB RAM namespace, all blocks written, ~10 MiB/s of 4 KiB writes at QD <= 16', ...summarize(samples.ram, 200) },
};
const text = JSON.stringify(report, null, 2);
if (jsonOut) writeFileSync(jsonOut, text);
console.log(text);
