// The main job, end to end as a user runs it: `vfio-user serve nvme` (the compiled CLI) serves a
// file-backed namespace; a Linux guest under QEMU 11.1's vfio-user-pci binds its nvme driver,
// writes a pattern with checksums and runs a short fio job with verification, then powers off.
// The server is stopped (SIGTERM: flush, socket removed) and started again on the same file; a
// second guest finds every byte the first one wrote.
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { afterAll, describe, expect, it } from 'vitest';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable, waitForPathScript } from './harness';

const available = interopAvailable();
if (!available.ok) console.warn(`[interop] skipping: ${available.reason}`);

const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
const SIZE_MIB = 128;

/** Start `vfio-user serve nvme` and wait for its JSON ready line. */
async function serve(socket: string, file: string, trace: string): Promise<{ child: ChildProcess; stop: () => Promise<number | null> }> {
  const args = ['serve', 'nvme', socket, '--file', file, '--size', `${SIZE_MIB}M`, '--queues', '4', '--trace', trace, '--json'];
  const child = spawn(process.execPath, [cli, ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = readline.createInterface({ input: child.stdout! });
  const events: Record<string, unknown>[] = [];
  await new Promise<void>((resolve, reject) => {
    lines.on('line', (l) => {
      const e = JSON.parse(l) as Record<string, unknown>;
      events.push(e);
      if (e.event === 'ready') resolve();
    });
    child.on('exit', (code) => reject(new Error(`serve nvme exited early with ${code}`)));
  });
  return {
    child,
    stop: async () => {
      child.kill('SIGTERM');
      const code = await new Promise<number | null>((res) => child.on('exit', res));
      expect(events.some((e) => e.event === 'stopped')).toBe(true);
      return code;
    },
  };
}

const WRITE_SCRIPT = [
  waitForPathScript('/dev/nvme0n1', 15),
  'echo "RESULT sectors=$(cat /sys/block/nvme0n1/size) queues=$(ls /sys/block/nvme0n1/mq | wc -l)"',
  // A 4 MiB random pattern at 16 MiB, written with O_DIRECT, read back after dropping caches.
  'dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null',
  'dd if=/tmp/pattern of=/dev/nvme0n1 bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null || echo "RESULT write=failed"',
  'echo 3 > /proc/sys/vm/drop_caches',
  'dd if=/dev/nvme0n1 of=/tmp/back bs=1M skip=16 count=4 iflag=direct 2>/dev/null || echo "RESULT read=failed"',
  'echo "RESULT sum=$(md5sum < /tmp/pattern | cut -d" " -f1) readsum=$(md5sum < /tmp/back | cut -d" " -f1)"',
  // fio: random writes with crc32c verification over the first 8 MiB, then a timed random read.
  'fio --minimal --name=verify --filename=/dev/nvme0n1 --size=8M --rw=randwrite --bs=4k --iodepth=8 ' +
    '--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 > /tmp/fio1 2>&1; echo "RESULT fio_verify_rc=$?"',
  'out=$(fio --minimal --name=rr --filename=/dev/nvme0n1 --offset=32M --size=32M --rw=randread --bs=4k --iodepth=16 ' +
    '--ioengine=libaio --direct=1 --runtime=1 --time_based); echo "RESULT fio_rr_rc=$? iops=$(echo "$out" | cut -d";" -f8)"',
  'cat /tmp/fio1 | head -c 600',
  'sync',
].join('\n');

const READ_SCRIPT = [
  waitForPathScript('/dev/nvme0n1', 15),
  'dd if=/dev/nvme0n1 of=/tmp/back bs=1M skip=16 count=4 iflag=direct 2>/dev/null || echo "RESULT read=failed"',
  'echo "RESULT readsum=$(md5sum < /tmp/back | cut -d" " -f1)"',
].join('\n');

describe.skipIf(!available.ok)('vfio-user serve nvme with a Linux guest (QEMU 11.1 vfio-user-pci)', () => {
  afterAll(() => cleanupInterop());

  it('binds, round-trips a checksummed pattern, passes a verifying fio job, and keeps the data across a server restart', async () => {
    const dir = fs.mkdtempSync(path.join('/dev/shm', 'vfio-user-nvme-cli-'));
    const socket = path.join(dir, 'nvme.sock');
    const file = path.join(dir, 'disk.img');
    const trace = path.join(dir, 'trace.log');
    try {
      const first = await serve(socket, file, trace);
      let written: Record<string, string>;
      try {
        const initramfs = await buildInitramfs({ modules: ['nvme'], withFio: true, script: WRITE_SCRIPT });
        const r = await bootGuest({ sockets: [socket], initramfs, timeoutMs: 60_000, cpus: 2 });
        const info = describeBoot(r, 60);
        expect(r.timedOut, info).toBe(false);
        expect(r.scriptExitCode, info).toBe(0);
        written = r.results;
        expect(written.sectors, info).toBe(String((SIZE_MIB << 20) / 512));
        expect(written.write, info).toBeUndefined();
        expect(written.read, info).toBeUndefined();
        expect(written.readsum, info).toBe(written.sum);
        expect(written.fio_verify_rc, info).toBe('0');
        expect(written.fio_rr_rc, info).toBe('0');
        expect(Number(written.iops), info).toBeGreaterThan(0);
      } finally {
        expect(await first.stop()).toBe(0);
      }
      expect(fs.existsSync(socket)).toBe(false);
      // The guest's power-off ran the nvme driver's shutdown: CC.SHN, flush, SHST complete.
      const events = fs.readFileSync(trace, 'utf8');
      expect(events).toMatch(/normal shutdown/);
      expect(events).toMatch(/shutdown complete/);

      const second = await serve(socket, file, trace);
      try {
        const initramfs = await buildInitramfs({ modules: ['nvme'], script: READ_SCRIPT });
        const r = await bootGuest({ sockets: [socket], initramfs, timeoutMs: 40_000 });
        const info = describeBoot(r, 40);
        expect(r.scriptExitCode, info).toBe(0);
        expect(r.results.readsum, info).toBe(written.sum);
      } finally {
        expect(await second.stop()).toBe(0);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 180_000);
});
