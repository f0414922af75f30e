// End-to-end checks of the interop harness itself: the guest boots and reports, QEMU's
// vfio-user-pci client connects and speaks VERSION, and QEMU's own NVMe reference device works.
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  bootGuest, buildInitramfs, cleanupInterop, CpioWriter, describeBoot, interopAvailable, parseResults,
  resolveModules, waitForPathScript,
} from './harness';

const available = interopAvailable();
if (!available.ok) console.warn(`[interop] skipping: ${available.reason}`);

describe('harness helpers (no QEMU)', () => {
  it('parses RESULT lines', () => {
    expect(parseResults(['noise', 'RESULT a=1 b=two', '[  1.0] RESULT c="x y" a=3', 'NORESULT z=1'])).toEqual({
      a: '3', b: 'two', c: 'x y',
    });
  });

  it('writes newc entries with 4-byte alignment and a trailer', () => {
    const buf = Buffer.concat(new CpioWriter().file('a/b', 'hello').finish());
    expect(buf.length % 4).toBe(0);
    expect(buf.subarray(0, 6).toString()).toBe('070701');
    expect(buf.includes(Buffer.from('a/b\0'))).toBe(true);
    expect(buf.includes(Buffer.from('TRAILER!!!\0'))).toBe(true);
    // Entry "a" (the implied parent directory) comes first.
    expect(buf.subarray(110, 112).toString()).toBe('a\0');
  });
});

describe.skipIf(!available.ok)('interop harness (QEMU 11.1, Debian 12 guest)', () => {
  afterAll(() => cleanupInterop());

  it('resolves module dependencies in load order', () => {
    const order = resolveModules(['nvme', 'gpio-pci-idio-16']).map((m) => path.basename(m));
    expect(order.at(-2)).toBe('nvme.ko');
    expect(order.indexOf('nvme-core.ko')).toBeLessThan(order.indexOf('nvme.ko'));
    expect(order.indexOf('t10-pi.ko')).toBeLessThan(order.indexOf('nvme-core.ko'));
    expect(order.at(-1)).toBe('gpio-pci-idio-16.ko');
    expect(() => resolveModules(['no-such-module'])).toThrow(/not in the interop cache/);
  });

  it('boots a guest without devices, runs the script and powers off', async () => {
    const initramfs = await buildInitramfs({
      modules: ['gpio-pci-idio-16'],
      script: [
        'head -n1 /proc/cpuinfo',
        'echo "RESULT ok=1 kernel=$(uname -r) idio=$(test -d /sys/module/gpio_pci_idio_16 && echo loaded)"',
        'echo "RESULT extra=$(cat /etc/hello)"',
      ].join('\n'),
      extraFiles: { '/etc/hello': 'world\n' },
    });
    const r = await bootGuest({ initramfs, timeoutMs: 20_000 });
    expect(r.timedOut, describeBoot(r)).toBe(false);
    expect(r.exitCode, describeBoot(r)).toBe(0);
    expect(r.scriptExitCode, describeBoot(r)).toBe(0);
    expect(r.insmodFailures).toEqual([]);
    expect(r.results).toMatchObject({ ok: '1', idio: 'loaded', extra: 'world' });
    expect(r.results['kernel']).toMatch(/-amd64$/);
    expect(r.lines.some((l) => l.startsWith('processor'))).toBe(true);
    console.info(`[interop] plain boot: ${r.durationMs} ms`);
  });

  it('QEMU vfio-user-pci connects to the socket and sends VERSION 0.0', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-sock-'));
    const sockPath = path.join(dir, 'dev.sock');
    let first: Buffer | undefined;
    const got = new Promise<Buffer>((resolve) => {
      const server = net.createServer((conn) => {
        let buf = Buffer.alloc(0);
        conn.on('data', (d) => {
          buf = Buffer.concat([buf, d]);
          if (buf.length >= 8 && buf.length >= buf.readUInt32LE(4)) {
            first = buf.subarray(0, buf.readUInt32LE(4));
            conn.destroy(); // no reply: QEMU fails to realize the device and exits
            server.close();
            resolve(first);
          }
        });
        conn.on('error', () => {});
      });
      server.listen(sockPath);
    });
    const initramfs = await buildInitramfs({ modules: [], script: 'echo RESULT unexpected=1' });
    // QEMU waits x-msg-timeout (5 s by default) for a reply even after EOF; keep the test short.
    const r = await bootGuest({ initramfs, sockets: [{ path: sockPath, props: { 'x-msg-timeout': 500 } }], timeoutMs: 20_000 });
    fs.rmSync(dir, { recursive: true, force: true });

    expect(r.timedOut, describeBoot(r)).toBe(false);
    expect(r.exitCode, describeBoot(r)).not.toBe(0); // realize failed: the guest never ran
    expect(r.results['unexpected']).toBeUndefined();
    const msg = await got;
    expect(msg.readUInt16LE(0)).toBe(0); // msg_id
    expect(msg.readUInt16LE(2)).toBe(1); // VFIO_USER_VERSION
    expect(msg.readUInt32LE(4)).toBe(msg.length); // msg_size
    expect(msg.readUInt32LE(8)).toBe(0); // flags: command
    expect(msg.readUInt32LE(12)).toBe(0); // error
    expect(msg.readUInt16LE(16)).toBe(0); // major
    expect(msg.readUInt16LE(18)).toBe(0); // minor
    expect(msg[msg.length - 1]).toBe(0); // JSON is NUL-terminated
    const json = JSON.parse(msg.subarray(20, msg.length - 1).toString('utf8'));
    expect(json).toHaveProperty('capabilities');
    expect(json.capabilities).toHaveProperty('max_msg_fds');
    console.info(`[interop] QEMU VERSION: ${JSON.stringify(json)}; qemu stderr: ${r.stderr.trim()}`);
  });

  it("QEMU's own -device nvme appears in the guest as /dev/nvme0n1 and round-trips data", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-img-'));
    const image = path.join(dir, 'ref.img');
    const initramfs = await buildInitramfs({
      modules: ['nvme'],
      script: [
        'set -e',
        waitForPathScript('/dev/nvme0n1'),
        'echo "RESULT dev=$(ls /dev/nvme0n1) sectors=$(cat /sys/block/nvme0n1/size) serial=$(cat /sys/class/nvme/nvme0/serial)"',
        'printf "vfio-user-harness" > /tmp/pattern',
        'dd if=/tmp/pattern of=/dev/nvme0n1 bs=512 count=1 conv=sync,fsync 2>/dev/null',
        'echo 3 > /proc/sys/vm/drop_caches',
        'echo "RESULT readback=$(dd if=/dev/nvme0n1 bs=17 count=1 2>/dev/null)"',
      ].join('\n'),
    });
    const r = await bootGuest({ initramfs, qemuNvme: { sizeMiB: 64, image }, timeoutMs: 20_000 });
    const head = fs.readFileSync(image).subarray(0, 17).toString();
    fs.rmSync(dir, { recursive: true, force: true });

    expect(r.timedOut, describeBoot(r)).toBe(false);
    expect(r.scriptExitCode, describeBoot(r)).toBe(0);
    expect(r.insmodFailures).toEqual([]);
    expect(r.results).toMatchObject({
      dev: '/dev/nvme0n1', sectors: String((64 * 1024 * 1024) / 512), serial: 'ref', readback: 'vfio-user-harness',
    });
    expect(head).toBe('vfio-user-harness'); // the guest's write reached the host image
    console.info(`[interop] qemu nvme boot: ${r.durationMs} ms`);
  });

  it('runs fio in the guest against the reference NVMe device', async () => {
    const t0 = Date.now();
    const initramfs = await buildInitramfs({
      modules: ['nvme'],
      withFio: true,
      script: [
        'set -e',
        'echo "RESULT fio=$(fio --version)"',
        waitForPathScript('/dev/nvme0n1'),
        // terse v3: field 8 is read IOPS
        'out=$(fio --minimal --name=qd1 --filename=/dev/nvme0n1 --rw=randread --bs=4k --iodepth=1 ' +
          '--ioengine=libaio --direct=1 --runtime=1 --time_based)',
        'echo "RESULT iops=$(echo "$out" | cut -d";" -f8)"',
      ].join('\n'),
    });
    const built = Date.now() - t0;
    const r = await bootGuest({ initramfs, qemuNvme: { sizeMiB: 64 }, timeoutMs: 30_000 });
    expect(r.scriptExitCode, describeBoot(r)).toBe(0);
    expect(r.results['fio']).toMatch(/^fio-\d/);
    expect(Number(r.results['iops'])).toBeGreaterThan(0);
    console.info(`[interop] fio initramfs ${(fs.statSync(initramfs).size / 1e6).toFixed(1)} MB built in ${built} ms, ` +
      `boot ${r.durationMs} ms, qemu nvme 4k randread QD1 ${r.results['iops']} IOPS (TCG)`);
  }, 60_000);
});
