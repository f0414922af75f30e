// A Linux guest under QEMU 11.1's vfio-user-pci runs verifying fio jobs on three of our NVMe
// controllers, each on an NBD export: qemu-nbd serving a qcow2, nbdkit's memory plugin, and
// qemu-storage-daemon exporting a qcow2 over a UNIX socket. Then, while fio writes and verifies
// on the qemu-nbd namespace, qemu-nbd is killed and started again: I/O waits, resumes, verifies,
// and the guest sees no I/O error.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { NbdBackend } from '../../lib/block';
import { NvmeController } from '../../lib/devices/nvme/controller';
import { VfioUserServer } from '../../lib/server/server';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable, waitForPathScript } from '../interop/harness';
import { createQcow2, nbdToolsMissing, nbdkit, qemuNbd, qemuStorageDaemon, storageDaemonRun, type NbdServerProcess } from './nbd-servers';

const available = interopAvailable();
const missing = nbdToolsMissing('qemu-nbd', 'qemu-img', 'nbdkit');
const qsd = storageDaemonRun();
if (qsd === null) nbdToolsMissing('qemu-storage-daemon');

const DEVICES = [
  { serial: 'nbd-qemu-nbd', name: 'QNBD' },
  { serial: 'nbd-nbdkit', name: 'NBDKIT' },
  { serial: 'nbd-qsd', name: 'QSD' },
];

function script(): string {
  const fio = (dev: string, name: string, extra: string) =>
    `fio --minimal --name=${name} --filename=$${dev} --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 ${extra} > /tmp/${name} 2>&1; ` +
    `echo "RESULT ${name}_rc=$?"; head -c 400 /tmp/${name}; echo`;
  return [
    ...DEVICES.map((_, i) => waitForPathScript(`/dev/nvme${i}n1`, 20)),
    // Which namespace is which: by serial.
    'for n in 0 1 2; do s=$(cat /sys/class/nvme/nvme$n/serial | tr -d " "); case $s in ' +
      DEVICES.map((d) => `${d.serial}) ${d.name}=/dev/nvme\${n}n1;;`).join(' ') +
      ' esac; done',
    'echo "RESULT devices=$QNBD,$NBDKIT,$QSD"',
    // (a)(b)(c): verifying random writes on each export.
    ...DEVICES.map((d) => fio(d.name, `verify_${d.name.toLowerCase()}`, '--rw=randwrite --bs=4k --iodepth=16 --size=16M')),
    // qemu-nbd killed (SIGKILL) and restarted while this job writes and verifies (the host watches
    // for the marker). The writes are O_SYNC, so each is durable when it completes (FUA from the
    // guest down to NBD_CMD_FLAG_FUA): a crash may lose what a server caches, never those.
    'echo NBD-KILL-WINDOW',
    fio('QNBD', 'restart', '--rw=randwrite --bs=16k --iodepth=8 --size=96M --sync=1 --verify_backlog=256'),
    'echo "RESULT io_errors=$(dmesg | grep -c -i "i/o error")"',
  ].join('\n');
}

describe.skipIf(!available.ok || missing !== null || qsd === null)('Linux guest on NBD-backed NVMe namespaces', () => {
  const servers: NbdServerProcess[] = [];
  const dir = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : '/tmp', 'nbd-guest-'));
  afterAll(async () => {
    for (const s of servers) await s.kill();
    cleanupInterop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('fio verifies on qemu-nbd (qcow2), nbdkit memory and qemu-storage-daemon (qcow2); qemu-nbd killed and restarted under fio: I/O resumes, verify passes', { timeout: 300_000 }, async () => {
    createQcow2(path.join(dir, 'qnbd.qcow2'), '128M');
    createQcow2(path.join(dir, 'qsd.qcow2'), '128M');
    const qnbd = qemuNbd(path.join(dir, 'qnbd.qcow2'), { socket: path.join(dir, 'qnbd.sock') });
    const kit = nbdkit('memory', ['size=128M'], { socket: path.join(dir, 'kit.sock') });
    const daemon = qemuStorageDaemon(path.join(dir, 'qsd.qcow2'), path.join(dir, 'qsd.sock'), qsd!);
    for (const s of [qnbd, kit, daemon]) {
      servers.push(s);
      await s.start();
    }
    const exports = [qnbd, kit, daemon];
    const vfio: VfioUserServer[] = [];
    const backends: NbdBackend[] = [];
    const sockets: string[] = [];
    for (let i = 0; i < DEVICES.length; i++) {
      const backend = await NbdBackend.open(exports[i]!.uri, { reconnectTimeoutMs: 20_000 });
      backends.push(backend);
      const socket = path.join(dir, `nvme${i}.sock`);
      sockets.push(socket);
      vfio.push(await VfioUserServer.listen(socket, new NvmeController({ backend, queues: 2, serial: DEVICES[i]!.serial })));
    }
    let killedAt = 0;
    let fioEndedAt = 0;
    let restarted: Promise<void> | null = null;
    try {
      const initramfs = await buildInitramfs({ modules: ['nvme'], withFio: true, script: script() });
      const r = await bootGuest({
        sockets,
        initramfs,
        cpus: 2,
        memoryMiB: 768,
        timeoutMs: 240_000,
        onLine: (line) => {
          if (line.includes('RESULT restart_rc=')) fioEndedAt = Date.now();
          if (line.includes('NBD-KILL-WINDOW') && restarted === null) {
            restarted = (async () => {
              await new Promise((res) => setTimeout(res, 500));
              await qnbd.kill('SIGKILL');
              killedAt = Date.now();
              await new Promise((res) => setTimeout(res, 1500));
              await qnbd.start();
            })();
          }
        },
      });
      await restarted;
      const info = describeBoot(r);
      expect(r.scriptExitCode, info).toBe(0);
      for (const d of DEVICES) expect(r.results[`verify_${d.name.toLowerCase()}_rc`], `${d.name}\n${info}`).toBe('0');
      expect(killedAt, 'qemu-nbd was killed while fio ran').toBeGreaterThan(0);
      expect(killedAt).toBeLessThan(fioEndedAt);
      expect(r.results.restart_rc, info).toBe('0');
      expect(r.results.io_errors, info).toBe('0');
      expect(backends[0]!.stats.reconnects).toBeGreaterThanOrEqual(1);
    } finally {
      for (const s of vfio) await s.close();
    }
  });
});
