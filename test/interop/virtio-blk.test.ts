// virtio-blk end to end, as a user runs it: `vfio-user serve virtio-blk` (the compiled CLI) serves a
// file-backed disk; a Linux guest under QEMU 11.1's vfio-user-pci binds its own virtio_pci and
// virtio_blk drivers (SeaBIOS drives the device first), writes a checksummed pattern, runs a
// verifying fio job, discards a range, and powers off. The server is stopped (SIGTERM:
// flush, socket removed) and started again on the same file, read-only: a second guest finds every
// byte the first one wrote, and its writes fail. Then the same on an NBD export (`--nbd`, qemu-nbd
// serving a qcow2): the pattern and a verifying fio job, and qemu-img finds the pattern in the image.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { afterAll, describe, expect, it } from 'vitest';
import { createQcow2, nbdToolsMissing, qemuNbd } from '../block/nbd-servers';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable, resolveModules, waitForPathScript } from './harness';

/** The interop cache predates virtio: say so (and how to fix it) instead of failing. */
function virtioModules(): { ok: boolean; reason?: string } {
  const base = interopAvailable();
  if (!base.ok) return base;
  try {
    resolveModules(['virtio_pci', 'virtio_blk']);
    return { ok: true };
  } catch (err) {
    const reason = `${(err as Error).message.split(';')[0]}: rerun scripts/setup-interop.sh (its module set now includes virtio)`;
    if (process.env.VFIO_USER_REQUIRE_INTEROP === '1') throw new Error(reason);
    return { ok: false, reason };
  }
}

const available = virtioModules();
if (!available.ok) console.warn(`[interop] skipping: ${available.reason}`);
const nbdMissing = available.ok ? nbdToolsMissing('qemu-nbd', 'qemu-img') : null;

const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
const SIZE_MIB = 128;
const MODULES = ['virtio_pci', 'virtio_blk'];

/** Start `vfio-user serve virtio-blk` on `backing` (`--file F --size S`, `--nbd URI`) and wait for its JSON ready line. */
async function serve(socket: string, backing: string[], trace: string, extra: string[] = []): Promise<{ child: ChildProcess; ready: Record<string, unknown>; stop: () => Promise<number | null> }> {
  const args = ['serve', 'virtio-blk', socket, ...backing, '--queues', '2', '--serial', 'vfio-user-vblk', '--trace', trace, '--json', ...extra];
  const child = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = readline.createInterface({ input: child.stdout! });
  const events: Record<string, unknown>[] = [];
  const ready = await new Promise<Record<string, unknown>>((resolve, reject) => {
    lines.on('line', (l) => {
      const e = JSON.parse(l) as Record<string, unknown>;
      events.push(e);
      if (e.event === 'ready') resolve(e);
    });
    child.on('exit', (code) => reject(new Error(`serve virtio-blk exited early with ${code}`)));
  });
  return {
    child,
    ready,
    stop: async () => {
      child.kill('SIGTERM');
      const code = await new Promise<number | null>((res) => child.on('exit', res));
      expect(events.some((e) => e.event === 'stopped')).toBe(true);
      return code;
    },
  };
}

/** A 4 MiB random pattern at 16 MiB, written with O_DIRECT, read back after dropping caches. */
const PATTERN_SCRIPT = [
  'dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null',
  'dd if=/tmp/pattern of=/dev/vda bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null || echo "RESULT write=failed"',
  'echo 3 > /proc/sys/vm/drop_caches',
  'dd if=/dev/vda of=/tmp/back bs=1M skip=16 count=4 iflag=direct 2>/dev/null || echo "RESULT read=failed"',
  'echo "RESULT sum=$(md5sum < /tmp/pattern | cut -d" " -f1) readsum=$(md5sum < /tmp/back | cut -d" " -f1)"',
];

/** Random writes with crc32c verification over 8 MiB. */
const FIO_VERIFY_SCRIPT =
  'fio --minimal --name=verify --filename=/dev/vda --size=8M --rw=randwrite --bs=4k --iodepth=8 ' +
  '--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 > /tmp/fio1 2>&1; echo "RESULT fio_verify_rc=$?"';

const WRITE_SCRIPT = [
  waitForPathScript('/dev/vda', 15),
  'd=/sys/block/vda',
  'echo "RESULT sectors=$(cat $d/size) queues=$(ls $d/mq | wc -l) ro=$(cat $d/ro) serial=$(cat $d/serial)"',
  'echo "RESULT driver=$(basename $(readlink $d/device/driver)) pcidriver=$(basename $(readlink $d/device/../driver))"',
  'echo "RESULT cache=$(cat $d/queue/write_cache | tr " " _) discard=$(cat $d/queue/discard_max_bytes) wzeroes=$(cat $d/queue/write_zeroes_max_bytes)"',
  'echo "RESULT features=$(cat $d/device/features)"',
  ...PATTERN_SCRIPT,
  // fio: verified random writes, then a timed random read.
  FIO_VERIFY_SCRIPT,
  'out=$(fio --minimal --name=rr --filename=/dev/vda --offset=32M --size=32M --rw=randread --bs=4k --iodepth=16 ' +
    '--ioengine=libaio --direct=1 --runtime=1 --time_based); echo "RESULT fio_rr_rc=$? iops=$(echo "$out" | cut -d";" -f8)"',
  'head -c 600 /tmp/fio1; echo',
  // Discard a written range at 64 MiB: the file backend punches a hole, which reads back as zeroes.
  // (Busybox's blkdiscard has no -z; WRITE_ZEROES is covered by the unit tests.)
  'dd if=/dev/urandom of=/dev/vda bs=1M seek=64 count=1 oflag=direct 2>/dev/null',
  'blkdiscard -o $((64 << 20)) -l $((1 << 20)) /dev/vda; echo "RESULT discard_rc=$?"',
  'echo 3 > /proc/sys/vm/drop_caches',
  'echo "RESULT nonzero=$(dd if=/dev/vda bs=1M skip=64 count=1 iflag=direct 2>/dev/null | od -An -v -tx1 | tr -d " \\n0" | wc -c)"',
  'sync',
].join('\n');

const READ_SCRIPT = [
  waitForPathScript('/dev/vda', 15),
  'echo "RESULT ro=$(cat /sys/block/vda/ro)"',
  'dd if=/dev/vda of=/tmp/back bs=1M skip=16 count=4 iflag=direct 2>/dev/null || echo "RESULT read=failed"',
  'echo "RESULT readsum=$(md5sum < /tmp/back | cut -d" " -f1)"',
  'dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=4096 oflag=direct 2>/dev/null; echo "RESULT write_rc=$?"',
].join('\n');

describe.skipIf(!available.ok)('vfio-user serve virtio-blk with a Linux guest (QEMU 11.1 vfio-user-pci)', () => {
  afterAll(() => cleanupInterop());

  it('binds virtio_blk, round-trips a pattern, passes a verifying fio job, and keeps the data across a server restart', async () => {
    const dir = fs.mkdtempSync(path.join('/dev/shm', 'vfio-user-vblk-cli-'));
    const socket = path.join(dir, 'vblk.sock');
    const file = path.join(dir, 'disk.img');
    const trace = path.join(dir, 'trace.log');
    try {
      const first = await serve(socket, ['--file', file, '--size', `${SIZE_MIB}M`], trace);
      expect(first.ready).toMatchObject({ device: 'virtio-blk', sizeBytes: SIZE_MIB << 20 });
      let written: Record<string, string>;
      try {
        const initramfs = await buildInitramfs({ modules: MODULES, withFio: true, script: WRITE_SCRIPT });
        const r = await bootGuest({ sockets: [socket], initramfs, timeoutMs: 90_000, cpus: 2 });
        const info = describeBoot(r, 60);
        expect(r.timedOut, info).toBe(false);
        expect(r.insmodFailures, info).toEqual([]);
        expect(r.scriptExitCode, info).toBe(0);
        written = r.results;
        expect(written.sectors, info).toBe(String((SIZE_MIB << 20) / 512));
        expect(written.driver, info).toBe('virtio_blk');
        expect(written.pcidriver, info).toBe('virtio-pci');
        expect(written.serial, info).toBe('vfio-user-vblk');
        expect(written.ro, info).toBe('0');
        expect(Number(written.queues), info).toBe(2);
        expect(written.cache, info).toBe('write_back');
        expect(Number(written.discard), info).toBeGreaterThan(0);
        expect(Number(written.wzeroes), info).toBeGreaterThan(0);
        // Negotiated: VERSION_1 (bit 32), EVENT_IDX (29), INDIRECT_DESC (28).
        expect(written.features?.[32], info).toBe('1');
        expect(written.features?.[29], info).toBe('1');
        expect(written.features?.[28], info).toBe('1');
        expect(written.write, info).toBeUndefined();
        expect(written.read, info).toBeUndefined();
        expect(written.readsum, info).toBe(written.sum);
        expect(written.fio_verify_rc, info).toBe('0');
        expect(written.fio_rr_rc, info).toBe('0');
        expect(Number(written.iops), info).toBeGreaterThan(0);
        expect(written.discard_rc, info).toBe('0');
        expect(written.nonzero, info).toBe('0');
      } finally {
        expect(await first.stop()).toBe(0);
      }
      expect(fs.existsSync(socket)).toBe(false);
      const events = fs.readFileSync(trace, 'utf8');
      expect(events).toMatch(/status 0xb -> 0xf/); // the driver got to DRIVER_OK
      expect(events).not.toMatch(/DEVICE_NEEDS_RESET/);

      const second = await serve(socket, ['--file', file, '--size', `${SIZE_MIB}M`], trace, ['--read-only']);
      try {
        const initramfs = await buildInitramfs({ modules: MODULES, script: READ_SCRIPT });
        const r = await bootGuest({ sockets: [socket], initramfs, timeoutMs: 40_000 });
        const info = describeBoot(r, 40);
        expect(r.scriptExitCode, info).toBe(0);
        expect(r.results.ro, info).toBe('1');
        expect(r.results.readsum, info).toBe(written.sum);
        expect(r.results.write_rc, info).not.toBe('0');
      } finally {
        expect(await second.stop()).toBe(0);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 240_000);

  it.skipIf(nbdMissing !== null)('on an NBD export (qemu-nbd, qcow2): the pattern round-trips, fio verifies, and the image holds the pattern', async () => {
    const dir = fs.mkdtempSync(path.join('/dev/shm', 'vfio-user-vblk-nbd-'));
    const socket = path.join(dir, 'vblk.sock');
    const image = path.join(dir, 'disk.qcow2');
    createQcow2(image, `${SIZE_MIB}M`);
    const nbd = qemuNbd(image, { socket: path.join(dir, 'qnbd.sock') });
    try {
      await nbd.start();
      const server = await serve(socket, ['--nbd', nbd.uri], path.join(dir, 'trace.log'));
      expect(server.ready).toMatchObject({ sizeBytes: SIZE_MIB << 20, backing: `nbd ${nbd.uri}` });
      let r: Awaited<ReturnType<typeof bootGuest>>;
      try {
        const script = [waitForPathScript('/dev/vda', 15), 'echo "RESULT sectors=$(cat /sys/block/vda/size)"', ...PATTERN_SCRIPT, FIO_VERIFY_SCRIPT, 'head -c 600 /tmp/fio1; echo', 'sync'].join('\n');
        const initramfs = await buildInitramfs({ modules: MODULES, withFio: true, script });
        r = await bootGuest({ sockets: [socket], initramfs, timeoutMs: 90_000, cpus: 2 });
      } finally {
        expect(await server.stop()).toBe(0);
      }
      const info = describeBoot(r, 60);
      expect(r.scriptExitCode, info).toBe(0);
      expect(r.results.sectors, info).toBe(String((SIZE_MIB << 20) / 512));
      expect(r.results.write, info).toBeUndefined();
      expect(r.results.readsum, info).toBe(r.results.sum);
      expect(r.results.fio_verify_rc, info).toBe('0');
      await nbd.kill('SIGTERM');
      const raw = path.join(dir, 'disk.raw');
      expect(spawnSync('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]).status).toBe(0);
      const pattern = fs.readFileSync(raw).subarray(16 << 20, 20 << 20);
      expect(createHash('md5').update(pattern).digest('hex')).toBe(r.results.sum);
    } finally {
      await nbd.kill();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 180_000);
});
