/**
 * Guest benchmark: fio inside one Linux guest under QEMU 11.1 (TCG), against our virtio-blk
 * (`VirtioBlkDevice` served in a separate Node process, through vfio-user-pci) and QEMU's own in-process
 * `virtio-blk-pci`, both reading the same raw image (on tmpfs, filled with data first), side by
 * side in the same QEMU and the same guest. Jobs: 4K random read at QD1 and QD32, 1M sequential
 * read at QD8. Every job runs `BENCH_ROUNDS` times per device, alternating ours and QEMU's;
 * medians are reported, with the load and placement at the time. Prints JSON (and writes it with
 * BENCH_JSON_OUT=FILE).
 *
 *   npx vitest run --config bench/vitest.bench.config.mts bench/guest-virtio-blk.bench-test.ts
 *   BENCH_SECONDS=4 BENCH_ROUNDS=3 BENCH_NOTIFY=trap|mmap BENCH_SPIN_US=0 BENCH_BUSY_POLL=0 BENCH_QUEUES=2 BENCH_BACKEND=file|ram BENCH_FILE_ENGINE=auto
 *   BENCH_JOBS=randread-4k-qd1,... BENCH_NODE_FLAGS='--cpu-prof --cpu-prof-dir=DIR'
 *   BENCH_PIN_SERVER=1 BENCH_PIN_QEMU=0,1   (taskset CPU lists; default: unpinned)
 *
 * Needs `bash scripts/setup-interop.sh` once, and `npm run build:ts` (the server runs dist/).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { expect, it } from 'vitest';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable, resolveModules, waitForPathScript } from '../test/interop/harness';

const SIZE_MIB = 256;
const seconds = Number(process.env.BENCH_SECONDS ?? 4);
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const notify = process.env.BENCH_NOTIFY ?? 'trap';
const queues = Number(process.env.BENCH_QUEUES ?? 2);
const pinServer = process.env.BENCH_PIN_SERVER;
const pinQemu = process.env.BENCH_PIN_QEMU;
const dist = path.join(__dirname, '..', 'dist', 'index.js');

const ALL_JOBS = [
  { name: 'randread-4k-qd1', rw: 'randread', bs: '4k', qd: 1 },
  { name: 'randread-4k-qd32', rw: 'randread', bs: '4k', qd: 32 },
  { name: 'read-1m-qd8', rw: 'read', bs: '1m', qd: 8 },
];
/** BENCH_JOBS=name,name runs a subset; BENCH_NODE_FLAGS adds node flags to the server (e.g. --cpu-prof). */
const JOBS = process.env.BENCH_JOBS ? ALL_JOBS.filter((j) => process.env.BENCH_JOBS!.split(',').includes(j.name)) : ALL_JOBS;
const nodeFlags = (process.env.BENCH_NODE_FLAGS ?? '').split(' ').filter(Boolean);
/** BENCH_BACKEND=ram: our device serves a RamBackend loaded from the image (isolates the file I/O path). */
const backendKind = process.env.BENCH_BACKEND ?? 'file';
/** BENCH_SPIN_US: trapped notifications with polling for this long after activity (0: off). */
const spinUs = Number(process.env.BENCH_SPIN_US ?? 0);
/** BENCH_BUSY_POLL: the server busy-polls QEMU's socket this long after its messages (serve --busy-poll). */
const busyPollUs = Number(process.env.BENCH_BUSY_POLL ?? 0);
/** BENCH_FILE_ENGINE=auto|io_uring|threadpool: the FileBackend's I/O engine (serve --aio). */
const fileEngine = process.env.BENCH_FILE_ENGINE ?? 'auto';
/**
 * Our server, a separate process built from the library in dist/: the image as a FileBackend (what
 * `vfio-user serve virtio-blk --file IMAGE --read-only` does) or copied into a RamBackend.
 */
const SERVER = `
const fs = require('node:fs');
const { VfioUserServer, VirtioBlkDevice, RamBackend, FileBackend } = require(process.argv[1]);
const [socket, image, kind, queues, notify, spinUs, busyPollUs, engine] = process.argv.slice(2);
let backend;
if (kind === 'ram') {
  const size = fs.statSync(image).size;
  backend = new RamBackend(size);
  const fd = fs.openSync(image, 'r');
  fs.readSync(fd, backend.bytes, 0, size, 0);
  fs.closeSync(fd);
} else backend = FileBackend.open(image, { readOnly: true, engine });
const disk = new VirtioBlkDevice({ backend, queues: Number(queues), notify, spinUs: Number(spinUs), readOnly: true, serial: 'ours' });
VfioUserServer.listen(socket, disk, { busyPollUs: Number(busyPollUs) }).then((server) => {
  console.log(JSON.stringify({ event: 'ready', engine: backend.engine }));
  process.once('SIGTERM', () => server.close().then(() => process.exit(0)));
});
`;

function usable(): boolean {
  if (!interopAvailable().ok || !fs.existsSync(dist)) return false;
  try {
    resolveModules(['virtio_pci', 'virtio_blk']);
    return true;
  } catch {
    return false;
  }
}

function script(): string {
  const lines = [
    waitForPathScript('/dev/vda', 20),
    waitForPathScript('/dev/vdb', 20),
    // Which disk is which: QEMU's has serial "ref".
    'for n in a b; do if [ "$(cat /sys/block/vd$n/serial)" = ref ]; then REF=/dev/vd$n; else OURS=/dev/vd$n; fi; done',
    'echo "RESULT ours=$OURS ref=$REF"',
    // Warm both paths once (page cache on the host side is shared: the same image).
    'for d in $OURS $REF; do dd if=$d of=/dev/null bs=1M count=128 iflag=direct 2>/dev/null; done',
  ];
  for (let round = 0; round < rounds; round++) {
    for (const job of JOBS) {
      // Alternate which device goes first from round to round.
      const order = round % 2 === 0 ? ['OURS', 'REF'] : ['REF', 'OURS'];
      for (const dev of order) {
        lines.push(
          `out=$(fio --minimal --name=${job.name} --filename=$${dev} --size=128M --rw=${job.rw} --bs=${job.bs} --iodepth=${job.qd} ` +
            `--ioengine=libaio --direct=1 --readonly --runtime=${seconds} --time_based --group_reporting)`,
          // terse v3: read bandwidth (KiB/s) is field 7, read IOPS field 8
          `echo "RESULT ${job.name}_${dev.toLowerCase()}_${round}=$(echo "$out" | cut -d";" -f8),$(echo "$out" | cut -d";" -f7)"`,
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

/** Fills the image with pseudo-random data (so both devices read real pages, not holes). */
function makeImage(file: string): void {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(1 << 20);
  let x = 0x9e3779b9;
  for (let i = 0; i < chunk.length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    chunk.writeUInt32LE(x >>> 0, i);
  }
  for (let m = 0; m < SIZE_MIB; m++) {
    chunk.writeUInt32LE(m, 0);
    fs.writeSync(fd, chunk);
  }
  fs.closeSync(fd);
}

async function serve(socket: string, image: string): Promise<{ child: ChildProcess; engine: string | undefined; stop: () => Promise<void> }> {
  const args = [...nodeFlags, '-e', SERVER, dist, socket, image, backendKind, String(queues), notify, String(spinUs), String(busyPollUs), fileEngine];
  const child = pinServer ? spawn('taskset', ['-c', pinServer, process.execPath, ...args], { stdio: ['ignore', 'pipe', 'inherit'] }) : spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = readline.createInterface({ input: child.stdout! });
  // The FileBackend's engine as chosen (BENCH_FILE_ENGINE=auto resolves by the image's file system).
  const engine = await new Promise<string | undefined>((resolve, reject) => {
    lines.on('line', (l) => {
      const event = JSON.parse(l) as { event?: string; engine?: string };
      if (event.event === 'ready') resolve(event.engine);
    });
    child.on('exit', (code) => reject(new Error(`the virtio-blk server exited early with ${code}`)));
  });
  return {
    child,
    engine,
    stop: async () => {
      child.kill('SIGTERM');
      await new Promise((res) => child.on('exit', res));
    },
  };
}

it.skipIf(!usable())('guest fio: our virtio-blk over vfio-user vs QEMU virtio-blk-pci', async () => {
  const dir = fs.mkdtempSync(path.join('/dev/shm', 'vfio-user-vblk-bench-'));
  const socket = path.join(dir, 'vblk.sock');
  const image = path.join(dir, 'disk.img');
  makeImage(image);
  const server = await serve(socket, image);
  const loadBefore = os.loadavg();
  try {
    const initramfs = await buildInitramfs({ modules: ['virtio_pci', 'virtio_blk'], withFio: true, script: script() });
    const r = await bootGuest({
      sockets: [socket],
      initramfs,
      cpus: 2,
      memoryMiB: 1024,
      timeoutMs: (JOBS.length * 2 * rounds * (seconds + 3) + 90) * 1000,
      extraQemuArgs: [
        '-drive', `file=${image},if=none,id=ref,format=raw,read-only=on`,
        '-device', `virtio-blk-pci,drive=ref,serial=ref,num-queues=${queues}`,
      ],
      onSpawn: (child) => {
        if (pinQemu && child.pid !== undefined) spawnSync('taskset', ['-a', '-c', '-p', pinQemu, String(child.pid)], { stdio: 'ignore' });
      },
    });
    expect(r.scriptExitCode, describeBoot(r)).toBe(0);
    const results: Record<string, { ours: number; qemu: number; ratio: number; unit: string; oursRuns: number[]; qemuRuns: number[] }> = {};
    for (const job of JOBS) {
      const pick = (dev: string) =>
        Array.from({ length: rounds }, (_, k) => {
          const [iops, kib] = (r.results[`${job.name}_${dev}_${k}`] ?? '0,0').split(',').map(Number);
          return job.bs === '1m' ? Math.round(kib! / 1024) : iops!;
        });
      const oursRuns = pick('ours');
      const qemuRuns = pick('ref');
      const ours = median(oursRuns);
      const qemu = median(qemuRuns);
      results[job.name] = { ours, qemu, ratio: +(ours / qemu).toFixed(3), unit: job.bs === '1m' ? 'MiB/s' : 'IOPS', oursRuns, qemuRuns };
    }
    const report = {
      bench: 'guest-virtio-blk-fio',
      qemu: '11.1 (TCG, 2 vCPUs)',
      guest: 'Debian 12 linux 6.1, fio libaio direct, 128 MiB of a 256 MiB image',
      secondsPerJob: seconds,
      rounds,
      ours: `vfio-user-pci -> VirtioBlkDevice (${backendKind === 'ram' ? 'RamBackend loaded from the image' : `FileBackend on the image (engine ${server.engine ?? '?'}${fileEngine === 'auto' ? ', chosen by auto' : ''})`}, ${notify} notify${spinUs > 0 ? `, polling ${spinUs} µs after activity` : ''}${busyPollUs > 0 ? `, socket busy-polled ${busyPollUs} µs` : ''}, ${queues} queues), separate process`,
      reference: `QEMU -device virtio-blk-pci (num-queues=${queues}), same raw image on tmpfs, aio=threads`,
      placement: `${os.cpus().length} CPUs; server ${pinServer ? `pinned to ${pinServer}` : 'unpinned'}; QEMU ${pinQemu ? `pinned to ${pinQemu}` : 'unpinned'}`,
      loadavg: { before: loadBefore.map((x) => +x.toFixed(2)), after: os.loadavg().map((x) => +x.toFixed(2)) },
      results,
      note: 'medians of alternated runs; TCG dominates guest-side speed: compare ratios, not absolute numbers',
    };
    const json = JSON.stringify(report, null, 2);
    console.log(json);
    if (process.env.BENCH_JSON_OUT) fs.writeFileSync(process.env.BENCH_JSON_OUT, json + '\n');
  } finally {
    await server.stop();
    cleanupInterop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
