/**
 * Guest benchmark, file namespaces: fio inside one Linux guest under QEMU 11.1 (TCG) against our
 * `vfio-user serve nvme SOCK --file IMAGE` (a separate process built from dist/, FileBackend on
 * io_uring unless BENCH_AIO=threads) and QEMU's in-process `-device nvme` on
 * `-drive file=IMAGE,aio=io_uring,cache=writeback`: the same image file (ext4 under /var/tmp, in
 * the host page cache), the same guest, 4 I/O queues each. Jobs: 4K random read and write at QD1
 * and QD32. Every job runs BENCH_ROUNDS times per device, alternating which goes first; medians
 * are reported with CPU placement and load. Prints JSON (and writes it with BENCH_JSON_OUT=FILE).
 *
 *   npm run build:ts && npx vitest run --config bench/vitest.bench.config.mts bench/guest-nvme-file.bench-test.ts
 *   BENCH_SECONDS=4 BENCH_ROUNDS=3 BENCH_AIO=io_uring|threads BENCH_DOORBELLS=trap|mmap|ioeventfd BENCH_DIR=/var/tmp
 *   BENCH_PIN_SERVER=1 BENCH_PIN_QEMU=0   (taskset CPU lists; default: unpinned)
 *
 * Needs `bash scripts/setup-interop.sh` once.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { expect, it } from 'vitest';
import { loadSince, placement, publish } from './guest-report';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable, waitForPathScript } from '../test/interop/harness';

const SIZE_MIB = 256;
const QUEUES = 4;
const seconds = Number(process.env.BENCH_SECONDS ?? 4);
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const aio = process.env.BENCH_AIO ?? 'io_uring';
const doorbells = process.env.BENCH_DOORBELLS ?? 'trap';
const pinServer = process.env.BENCH_PIN_SERVER;
const pinQemu = process.env.BENCH_PIN_QEMU;
const cli = path.join(__dirname, '..', 'dist', 'cli', 'main.js');

/** The guest: 2 vCPUs, 1 GiB; the time every run of every job may take, plus booting. */
const GUEST = { cpus: 2, memoryMiB: 1024 };
const JOBS = [
  { name: 'randread-4k-qd1', rw: 'randread', qd: 1 },
  { name: 'randread-4k-qd32', rw: 'randread', qd: 32 },
  { name: 'randwrite-4k-qd1', rw: 'randwrite', qd: 1 },
  { name: 'randwrite-4k-qd32', rw: 'randwrite', qd: 32 },
];

const guestTimeoutMs = (JOBS.length * 2 * rounds * (seconds + 3) + 90) * 1000;

function guestScript(): string {
  const lines = [
    waitForPathScript('/dev/nvme0n1', 20),
    waitForPathScript('/dev/nvme1n1', 20),
    // Which namespace is which: QEMU's controller has serial "ref".
    'for n in 0 1; do if [ "$(cat /sys/class/nvme/nvme$n/serial | tr -d " ")" = ref ]; then REF=/dev/nvme${n}n1; else OURS=/dev/nvme${n}n1; fi; done',
    'echo "RESULT ours=$OURS ref=$REF"',
  ];
  for (let round = 0; round < rounds; round++) {
    for (const job of JOBS) {
      for (const dev of round % 2 === 0 ? ['OURS', 'REF'] : ['REF', 'OURS']) {
        lines.push(
          `out=$(fio --minimal --name=${job.name} --filename=$${dev} --size=128M --rw=${job.rw} --bs=4k --iodepth=${job.qd} ` +
            `--ioengine=libaio --direct=1 --runtime=${seconds} --time_based --group_reporting)`,
          // terse v3: read IOPS is field 8, write IOPS field 49
          `echo "RESULT ${job.name}_${dev.toLowerCase()}_${round}=$(echo "$out" | cut -d";" -f${job.rw === 'randwrite' ? 49 : 8})"`,
        );
      }
    }
  }
  return lines.join('\n');
}

/** Random bytes, written and read back once so that the whole image sits in the page cache. */
function writeImage(file: string): void {
  const chunk = Buffer.alloc(1 << 20);
  const fd = fs.openSync(file, 'w');
  for (let i = 0; i < SIZE_MIB; i++) fs.writeSync(fd, randomFillSync(chunk));
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const rfd = fs.openSync(file, 'r');
  while (fs.readSync(rfd, chunk) > 0);
  fs.closeSync(rfd);
}

async function startServer(socket: string, image: string): Promise<{ backing: string; stop: () => Promise<void> }> {
  const args = [cli, 'serve', 'nvme', socket, '--file', image, '--queues', String(QUEUES), '--aio', aio, '--doorbells', doorbells, '--serial', 'ours', '--json'];
  const child: ChildProcess = pinServer
    ? spawn('taskset', ['-c', pinServer, process.execPath, ...args], { stdio: ['ignore', 'pipe', 'inherit'] })
    : spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  const backing = await new Promise<string>((resolve, reject) => {
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      const event = JSON.parse(line) as { event?: string; backing?: string };
      if (event.event === 'ready') resolve(event.backing ?? '');
    });
    child.on('exit', (code) => reject(new Error(`serve nvme exited early with ${code}`)));
  });
  return {
    backing,
    stop: async () => {
      child.kill('SIGTERM');
      await new Promise((resolve) => child.on('exit', resolve));
    },
  };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

it.skipIf(!interopAvailable().ok || !fs.existsSync(cli))('guest fio: serve nvme --file vs QEMU -device nvme (aio=io_uring), same image', async () => {
  const dir = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? '/var/tmp', 'vfio-user-nvme-file-bench-'));
  const socket = path.join(dir, 'nvme.sock');
  const image = path.join(dir, 'disk.img');
  writeImage(image);
  const server = await startServer(socket, image);
  const loadBefore = os.loadavg();
  try {
    const initramfs = await buildInitramfs({ modules: ['nvme'], withFio: true, script: guestScript() });
    const r = await bootGuest({
      ...GUEST,
      sockets: [socket],
      initramfs,
      timeoutMs: guestTimeoutMs,
      extraQemuArgs: [
        '-drive', `file=${image},if=none,id=ref,format=raw,aio=io_uring,cache=writeback`,
        '-device', `nvme,serial=ref,drive=ref,max_ioqpairs=${QUEUES}`,
      ],
      onSpawn: (child) => {
        if (pinQemu && child.pid !== undefined) spawnSync('taskset', ['-a', '-c', '-p', pinQemu, String(child.pid)], { stdio: 'ignore' });
      },
    });
    expect(r.scriptExitCode, describeBoot(r)).toBe(0);
    const results: Record<string, { ours: number; qemu: number; ratio: number; oursRuns: number[]; qemuRuns: number[] }> = {};
    for (const job of JOBS) {
      const runs = (dev: string) => Array.from({ length: rounds }, (_, k) => Number(r.results[`${job.name}_${dev}_${k}`] ?? 0));
      const oursRuns = runs('ours');
      const qemuRuns = runs('ref');
      const ours = median(oursRuns);
      const qemu = median(qemuRuns);
      results[job.name] = { ours, qemu, ratio: +(ours / qemu).toFixed(3), oursRuns, qemuRuns };
    }
    const report = {
      bench: 'guest-nvme-file-fio',
      qemu: '11.1 (TCG, 2 vCPUs)',
      guest: 'Debian 12 linux 6.1, fio libaio direct, 128 MiB of a 256 MiB image',
      secondsPerJob: seconds,
      rounds,
      ours: `vfio-user-pci -> serve nvme --file (${server.backing}), ${QUEUES} queues, ${doorbells} doorbells, separate process`,
      reference: `QEMU -device nvme (max_ioqpairs=${QUEUES}) on -drive aio=io_uring,cache=writeback, the same image`,
      placement: placement(pinServer, pinQemu),
      loadavg: loadSince(loadBefore),
      unit: 'IOPS',
      results,
      note: 'medians of alternated runs; TCG dominates guest-side speed: compare ratios, not absolute numbers',
    };
    publish(report);
  } finally {
    await server.stop();
    cleanupInterop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
