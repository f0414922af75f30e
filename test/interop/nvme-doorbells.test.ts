// SeaBIOS and then a Linux 6.1 guest drive our NVMe controller through QEMU 11.1's vfio-user-pci
// in one boot: the kernel's nvme driver binds, creates I/O queues (MSI-X, shadow doorbells),
// and the guest writes and reads back data that the Node side then finds in the backend.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { NvmeController } from '../../lib/devices/nvme/controller';
import { FileBackend, RamBackend } from '../../lib/block';
import { VfioUserServer } from '../../lib/server/server';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable, waitForPathScript } from './harness';

const available = interopAvailable();
if (!available.ok) console.warn(`[nvme guest] skipping: ${available.reason}`);

const SCRIPT = [
  waitForPathScript('/dev/nvme0n1', 15),
  'echo "RESULT sectors=$(cat /sys/block/nvme0n1/size) model=\\"$(cat /sys/class/nvme/nvme0/model)\\" lbs=$(cat /sys/block/nvme0n1/queue/logical_block_size)"',
  'echo "RESULT queues=$(ls /sys/block/nvme0n1/mq | wc -l)"',
  'printf "vfio-user-nvme-guest" > /tmp/pattern',
  'dd if=/tmp/pattern of=/dev/nvme0n1 bs=4096 count=1 seek=3 conv=sync,fsync 2>/dev/null || echo "RESULT write=failed"',
  'dd if=/dev/urandom of=/tmp/big bs=65536 count=16 2>/dev/null',
  'dd if=/tmp/big of=/dev/nvme0n1 bs=65536 seek=10 oflag=direct 2>/dev/null || echo "RESULT bigwrite=failed"',
  'dd if=/dev/nvme0n1 of=/tmp/big2 bs=65536 skip=10 count=16 iflag=direct 2>/dev/null || echo "RESULT bigread=failed"',
  'echo "RESULT bigsum=$(md5sum < /tmp/big | cut -d" " -f1) bigsum2=$(md5sum < /tmp/big2 | cut -d" " -f1)"',
  'echo 3 > /proc/sys/vm/drop_caches',
  'echo "RESULT readback=$(dd if=/dev/nvme0n1 bs=4096 skip=3 count=1 2>/dev/null | head -c 20)"',
  'blkdiscard -o 1048576 -l 1048576 /dev/nvme0n1 2>/dev/null && echo "RESULT discard=ok" || echo "RESULT discard=failed"',
  'echo "RESULT irqs=\\"$(grep -c nvme /proc/interrupts)\\""',
  'dmesg | grep -i nvme | tail -n 20',
].join('\n');

describe.skipIf(!available.ok)('NVMe controller in a Linux guest (QEMU 11.1 vfio-user-pci)', () => {
  afterAll(() => cleanupInterop());

  // ioeventfd: QEMU never asks for ioeventfds, so its doorbells are trapped REGION_WRITEs, which
  // that mode must still serve.
  for (const doorbells of ['trap', 'mmap', 'ioeventfd'] as const) {
    it(`SeaBIOS then Linux bind, create queues and round-trip data (${doorbells} doorbells)`, async () => {
      const dir = fs.mkdtempSync(path.join('/dev/shm', 'vfio-user-nvme-'));
      const socket = path.join(dir, 'nvme.sock');
      const trace: string[] = [];
      const backend = doorbells === 'trap' ? FileBackend.open(path.join(dir, 'disk.img'), { size: 64 << 20 }) : new RamBackend(64 << 20);
      const ctrl = new NvmeController({ backend, queues: 4, serial: `guest-${doorbells}`, doorbells, trace: (l) => trace.push(l) });
      const server = await VfioUserServer.listen(socket, ctrl);
      try {
        const initramfs = await buildInitramfs({ modules: ['nvme'], script: SCRIPT });
        const r = await bootGuest({ sockets: [socket], initramfs, timeoutMs: 40_000, cpus: 2 });
        const info = `${describeBoot(r, 60)}\n--- controller trace (tail) ---\n${trace.slice(-60).join('\n')}`;
        expect(r.timedOut, info).toBe(false);
        expect(r.scriptExitCode, info).toBe(0);
        expect(r.results, info).toMatchObject({
          sectors: String((64 << 20) / 512),
          lbs: '512',
          readback: 'vfio-user-nvme-guest',
          discard: 'ok',
        });
        expect(r.results['bigsum'], info).toBe(r.results['bigsum2']);
        expect(Number(r.results['queues']), info).toBeGreaterThanOrEqual(1);
        // SeaBIOS used the controller before Linux reset it: two enables.
        expect(trace.filter((l) => l.includes('nvme: ready')).length, info).toBeGreaterThanOrEqual(2);
        if (doorbells === 'ioeventfd') expect(ctrl.doorbellCounts.trapped, info).toBeGreaterThan(0);
        fs.writeFileSync(`/tmp/nvme-trace-${doorbells}.txt`, trace.join('\n') + '\n' + r.output);
        console.info(`[nvme guest] ${doorbells}: boot ${r.durationMs} ms; doorbells ${JSON.stringify(ctrl.doorbellCounts)}; poller ${JSON.stringify(ctrl.poller.counts)}; ${JSON.stringify(r.results)}`);
      } finally {
        await server.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }, 60_000);
  }
});
