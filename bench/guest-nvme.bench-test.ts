/**
 * Guest benchmark: fio inside one Linux guest under QEMU 11.1 (TCG), against our NVMe controller
 * (vfio-user-pci -> `NvmeController`, RAM backend) and QEMU's own in-process `-device nvme` on a
 * RAM-backed image of the same size, side by side in the same QEMU and the same guest. Jobs
 * alternate between the two devices. Prints JSON (and writes it with BENCH_JSON_OUT=FILE).
 *
 *   npm run bench:guest            (needs `bash scripts/setup-interop.sh` once)
 *   BENCH_SECONDS=5 BENCH_DOORBELLS=trap|mmap npm run bench:guest
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect, it } from 'vitest';
import { NvmeController } from '../lib/devices/nvme/controller';
import { RamBackend } from '../lib/block';
import { VfioUserServer } from '../lib/server/server';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable, waitForPathScript } from '../test/interop/harness';

const SIZE_MIB = 256;
const seconds = Number(process.env.BENCH_SECONDS ?? 4);
const doorbells = (process.env.BENCH_DOORBELLS ?? 'trap') as 'trap' | 'mmap';

const JOBS = [
  { name: 'randread-4k-qd1', rw: 'randread', bs: '4k', qd: 1 },
  { name: 'randread-4k-qd32', rw: 'randread', bs: '4k', qd: 32 },
  { name: 'randwrite-4k-qd1', rw: 'randwrite', bs: '4k', qd: 1 },
  { name: 'randwrite-4k-qd32', rw: 'randwrite', bs: '4k', qd: 32 },
  { name: 'read-128k-qd8', rw: 'read', bs: '128k', qd: 8 },
];

function script(): string {
  const lines = [
    waitForPathScript('/dev/nvme0n1', 20),
    waitForPathScript('/dev/nvme1n1', 20),
    // Which namespace is which: QEMU's device has serial "ref".
    'for n in 0 1; do if [ "$(cat /sys/class/nvme/nvme$n/serial | tr -d " ")" = ref ]; then REF=/dev/nvme${n}n1; else OURS=/dev/nvme${n}n1; fi; done',
    'echo "RESULT ours=$OURS ref=$REF"',
    // Precondition: write the whole test area once on both, so reads hit written data.
    'for d in $OURS $REF; do dd if=/dev/zero of=$d bs=1M count=128 oflag=direct 2>/dev/null; done',
  ];
  for (const job of JOBS) {
    for (const dev of ['OURS', 'REF']) {
      lines.push(
        `out=$(fio --minimal --name=${job.name} --filename=$${dev} --size=128M --rw=${job.rw} --bs=${job.bs} --iodepth=${job.qd} ` +
          `--ioengine=libaio --direct=1 --runtime=${seconds} --time_based --group_reporting)`,
        // terse v3: read IOPS is field 8, write IOPS field 49
        `echo "RESULT ${job.name}_${dev.toLowerCase()}=$(echo "$out" | cut -d";" -f${job.rw.includes('write') ? 49 : 8})"`,
      );
    }
  }
  return lines.join('\n');
}

it.skipIf(!interopAvailable().ok)('guest fio: our NVMe over vfio-user vs QEMU -device nvme', async () => {
  const dir = fs.mkdtempSync(path.join('/dev/shm', 'vfio-user-bench-'));
  const socket = path.join(dir, 'nvme.sock');
  const ctrl = new NvmeController({ backend: new RamBackend(SIZE_MIB << 20), queues: 4, doorbells, serial: 'vfio-user-node' });
  const server = await VfioUserServer.listen(socket, ctrl);
  try {
    const initramfs = await buildInitramfs({ modules: ['nvme'], withFio: true, script: script() });
    const r = await bootGuest({
      sockets: [socket],
      initramfs,
      cpus: 2,
      memoryMiB: 1024,
      timeoutMs: (JOBS.length * 2 * (seconds + 3) + 60) * 1000,
      qemuNvme: { sizeMiB: SIZE_MIB, driveOptions: 'cache=unsafe' },
    });
    expect(r.scriptExitCode, describeBoot(r)).toBe(0);
    const results: Record<string, { ours: number; qemu: number; ratio: number }> = {};
    for (const job of JOBS) {
      const ours = Number(r.results[`${job.name}_ours`]);
      const qemu = Number(r.results[`${job.name}_ref`]);
      results[job.name] = { ours, qemu, ratio: +(ours / qemu).toFixed(3) };
    }
    const report = {
      bench: 'guest-nvme-fio',
      qemu: '11.1 (TCG, 2 vCPUs)',
      guest: 'Debian 12 linux 6.1, fio libaio direct',
      secondsPerJob: seconds,
      ours: `vfio-user-pci -> NvmeController (RAM backend, ${doorbells} doorbells, 4 queues)`,
      reference: `QEMU -device nvme, raw image on tmpfs (cache=unsafe)`,
      iops: results,
      note: 'TCG dominates guest-side speed: compare ratios, not absolute IOPS',
    };
    const json = JSON.stringify(report, null, 2);
    console.log(json);
    if (process.env.BENCH_JSON_OUT) fs.writeFileSync(process.env.BENCH_JSON_OUT, json + '\n');
  } finally {
    await server.close();
    cleanupInterop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
