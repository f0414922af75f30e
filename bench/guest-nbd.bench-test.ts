/**
 * Guest benchmark on NBD: fio inside one Linux guest under QEMU 11.1 (TCG) reads one qemu-nbd
 * export through three NVMe controllers side by side:
 *
 * - ours, 4 connections: vfio-user-pci -> NvmeController -> NbdBackend (4 NBD connections);
 * - ours, 1 connection: the same with one NBD connection, as QEMU's own NBD client uses;
 * - ref: QEMU's in-process `-device nvme` on `-drive driver=nbd` to the same export.
 *
 * The export is a raw image on tmpfs filled with random bytes (so reads are real data, not holes),
 * served by Debian's qemu-nbd. Jobs: 4 KiB random reads at QD 32 and 1 MiB sequential reads at
 * QD 4; each job runs `BENCH_ROUNDS` times per device, the device order rotating every round, and
 * the medians are compared. Prints JSON (and writes it with BENCH_JSON_OUT=FILE).
 *
 *   npm run bench:guest -- bench/guest-nbd.bench-test.ts      (needs scripts/setup-interop.sh and qemu-utils)
 *   BENCH_SECONDS=5 BENCH_ROUNDS=5 npm run bench:guest -- bench/guest-nbd.bench-test.ts
 */
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect, it } from 'vitest';
import { NbdBackend } from '../lib/block';
import { NvmeController } from '../lib/devices/nvme/controller';
import { VfioUserServer } from '../lib/server/server';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable, waitForPathScript } from '../test/interop/harness';
import { qemuNbd, which } from '../test/block/nbd-servers';

const SIZE_MIB = 256;
const seconds = Number(process.env.BENCH_SECONDS ?? 4);
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);

const JOBS = [
  { name: 'randread-4k-qd32', rw: 'randread', bs: '4k', qd: 32 },
  { name: 'read-1m-qd4', rw: 'read', bs: '1m', qd: 4 },
];
const DEVICES = [
  { key: 'ours4', serial: 'ours4' },
  { key: 'ours1', serial: 'ours1' },
  { key: 'ref', serial: 'ref' },
];

function script(): string {
  const lines = [
    ...DEVICES.map((_, i) => waitForPathScript(`/dev/nvme${i}n1`, 20)),
    'for n in 0 1 2; do s=$(cat /sys/class/nvme/nvme$n/serial | tr -d " "); eval "DEV_$s=/dev/nvme${n}n1"; done',
    'echo "RESULT devices=$DEV_ours4,$DEV_ours1,$DEV_ref"',
  ];
  for (let round = 0; round < rounds; round++) {
    for (const job of JOBS) {
      for (let k = 0; k < DEVICES.length; k++) {
        const dev = DEVICES[(k + round) % DEVICES.length]!.key; // rotate the order every round
        lines.push(
          `out=$(fio --minimal --name=${job.name} --filename=$DEV_${dev} --size=${SIZE_MIB - 16}M --rw=${job.rw} --bs=${job.bs} ` +
            `--iodepth=${job.qd} --ioengine=libaio --direct=1 --runtime=${seconds} --time_based --group_reporting)`,
          // terse v3: read bandwidth KiB/s is field 7, read IOPS field 8
          `echo "RESULT ${job.name}_${dev}_${round}=$(echo "$out" | cut -d";" -f7,8)"`,
        );
      }
    }
  }
  return lines.join('\n');
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

it.skipIf(!interopAvailable().ok || which('qemu-nbd') === null)('guest fio on NBD: our NVMe (NbdBackend) vs QEMU -device nvme on -drive driver=nbd, same qemu-nbd export', async () => {
  const dir = fs.mkdtempSync(path.join('/dev/shm', 'vfio-user-nbd-bench-'));
  const image = path.join(dir, 'disk.raw');
  const chunk = Buffer.alloc(1 << 20);
  const fd = fs.openSync(image, 'w');
  for (let i = 0; i < SIZE_MIB; i++) fs.writeSync(fd, randomFillSync(chunk));
  fs.closeSync(fd);
  const nbd = qemuNbd(image, { socket: path.join(dir, 'nbd.sock') }, { format: 'raw' });
  await nbd.start();
  const servers: VfioUserServer[] = [];
  const load = { before: os.loadavg(), after: [] as number[] };
  try {
    const sockets: string[] = [];
    for (const [key, connections] of [['ours4', 4], ['ours1', 1]] as const) {
      const backend = await NbdBackend.open(nbd.uri, { connections });
      const socket = path.join(dir, `${key}.sock`);
      sockets.push(socket);
      servers.push(await VfioUserServer.listen(socket, new NvmeController({ backend, queues: 4, serial: key })));
    }
    const initramfs = await buildInitramfs({ modules: ['nvme'], withFio: true, script: script() });
    const r = await bootGuest({
      sockets,
      initramfs,
      cpus: 2,
      memoryMiB: 1024,
      timeoutMs: (rounds * JOBS.length * DEVICES.length * (seconds + 4) + 90) * 1000,
      extraQemuArgs: [
        '-drive', `driver=nbd,server.type=unix,server.path=${path.join(dir, 'nbd.sock')},export=disk,if=none,id=nbdref`,
        '-device', 'nvme,serial=ref,drive=nbdref',
      ],
    });
    load.after = os.loadavg();
    expect(r.scriptExitCode, describeBoot(r)).toBe(0);
    const results: Record<string, unknown> = {};
    for (const job of JOBS) {
      const per: Record<string, { runs: number[]; median: number }> = {};
      for (const d of DEVICES) {
        const runs = Array.from({ length: rounds }, (_, round) => {
          const [bwKiB, iops] = String(r.results[`${job.name}_${d.key}_${round}`]).split(';').map(Number);
          return job.bs === '4k' ? iops! : +(bwKiB! / 1024).toFixed(1);
        });
        per[d.key] = { runs, median: median(runs) };
      }
      results[job.name] = {
        unit: job.bs === '4k' ? 'IOPS' : 'MiB/s',
        ...per,
        ratioOurs4: +(per.ours4!.median / per.ref!.median).toFixed(3),
        ratioOurs1: +(per.ours1!.median / per.ref!.median).toFixed(3),
      };
    }
    const report = {
      bench: 'guest-nbd-fio',
      qemu: '11.1 (TCG, 2 vCPUs, 1 GiB)',
      guest: 'Debian 12 linux 6.1, fio libaio direct',
      export: `qemu-nbd ${SIZE_MIB} MiB raw image of random bytes on tmpfs, UNIX socket`,
      ours: 'vfio-user-pci -> NvmeController (4 queues, trap doorbells) -> NbdBackend (4 or 1 connections)',
      reference: 'QEMU -device nvme on -drive driver=nbd (one connection, in QEMU)',
      secondsPerRun: seconds,
      rounds,
      placement: `not pinned: QEMU (TCG vCPU threads), qemu-nbd and the Node server share the host's ${os.cpus().length} CPUs`,
      loadavg: load,
      results,
      note: 'TCG dominates guest-side speed: compare ratios in this run, not absolute numbers',
    };
    const json = JSON.stringify(report, null, 2);
    console.log(json);
    if (process.env.BENCH_JSON_OUT) fs.writeFileSync(process.env.BENCH_JSON_OUT, json + '\n');
  } finally {
    for (const s of servers) await s.close();
    await nbd.kill();
    cleanupInterop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
