// `vfio-user serve virtio-blk SOCKET --nbd URI` as a user runs it (the compiled CLI), driven by our
// own virtio driver over the socket (test/virtio/remote.ts): every request type round-trips into a
// qcow2 served by qemu-nbd (checked with qemu-img once the server stopped), a write waits while
// qemu-nbd is killed and completes when it is back, --read-only (and a read-only export) give a
// VIRTIO_BLK_F_RO disk, an export's minimum block size becomes blk_size, and bad combinations are
// refused. Skips without qemu-nbd and nbdkit, fails under VFIO_USER_REQUIRE_INTEROP=1.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BlkConfig, BlkFeature, BlkReqType, BlkStatus } from '../../lib/virtio/spec';
import { createQcow2, nbdToolsMissing, nbdkit, qemuNbd, type NbdServerProcess } from '../block/nbd-servers';
import { RemoteBlk } from '../virtio/remote';
import { BlkRig } from '../devices/virtio-blk/rig';
import { pattern } from '../virtio/rig';
import { runCli, startCli, type CliProcess } from './run';

const missing = nbdToolsMissing('qemu-nbd', 'qemu-img', 'nbdkit');
let dir: string;
const servers: NbdServerProcess[] = [];
const clis: CliProcess[] = [];
const drivers: RemoteBlk[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-nbd-'));
});
afterEach(async () => {
  for (const d of drivers.splice(0)) await d.close();
  for (const c of clis.splice(0)) {
    c.child.kill('SIGTERM');
    await c.exited;
  }
  for (const s of servers.splice(0)) await s.kill();
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function nbdServer(server: NbdServerProcess): Promise<NbdServerProcess> {
  servers.push(server);
  await server.start();
  return server;
}

async function serve(args: string[]): Promise<{ cli: CliProcess; ready: Record<string, unknown>; driver: RemoteBlk }> {
  const socket = path.join(dir, `vblk-${clis.length}-${Date.now()}.sock`);
  const cli = startCli(['serve', 'virtio-blk', socket, '--json', '--queues', '2', ...args]);
  clis.push(cli);
  const ready = JSON.parse(await cli.waitForLine(/"event":"ready"/)) as Record<string, unknown>;
  const driver = await RemoteBlk.connect(socket);
  drivers.push(driver);
  await driver.init();
  return { cli, ready, driver };
}

const SECTOR = 512;

describe.skipIf(missing !== null)('vfio-user serve virtio-blk --nbd', () => {
  it('every request type round-trips into a qcow2 on qemu-nbd; a write waits out a killed qemu-nbd; the image holds the data', { timeout: 60_000 }, async () => {
    const image = path.join(dir, 'disk.qcow2');
    createQcow2(image, '64M');
    const nbd = await nbdServer(qemuNbd(image, { socket: path.join(dir, 'qnbd.sock') }));
    const { cli, ready, driver } = await serve(['--nbd', nbd.uri, '--serial', 'nbd-vblk']);
    expect(ready).toMatchObject({ event: 'ready', device: 'virtio-blk', sizeBytes: 64 << 20, backing: `nbd ${nbd.uri}` });
    expect((await driver.config(BlkConfig.CAPACITY, 8)).readBigUInt64LE(0)).toBe(BigInt((64 << 20) / SECTOR));
    expect(driver.has(BlkFeature.RO)).toBe(false);
    expect(driver.has(BlkFeature.DISCARD) && driver.has(BlkFeature.WRITE_ZEROES) && driver.has(BlkFeature.FLUSH)).toBe(true);

    const id = await driver.request(BlkReqType.GET_ID, 0, { inLen: 20 });
    expect(id.status).toBe(BlkStatus.OK);
    expect(id.data.subarray(0, 8).toString('latin1')).toBe('nbd-vblk');

    // 64 KiB in 4 segments through an indirect table, read back in 3 plain ones.
    const data = pattern(64 << 10, 7);
    expect((await driver.request(BlkReqType.OUT, 8, { out: data, segments: 4, indirect: true })).status).toBe(BlkStatus.OK);
    const back = await driver.request(BlkReqType.IN, 8, { inLen: data.length, segments: 3 });
    expect(back.status).toBe(BlkStatus.OK);
    expect(back.len).toBe(data.length + 1);
    expect(back.data.equals(data)).toBe(true);

    // Write zeroes over the middle 16 KiB; discard elsewhere; flush.
    expect((await driver.request(BlkReqType.WRITE_ZEROES, 0, { out: BlkRig.ranges([{ sector: 8 + 32, sectors: 32 }]) })).status).toBe(BlkStatus.OK);
    const zeroed = await driver.request(BlkReqType.IN, 8, { inLen: data.length });
    expect(zeroed.data.subarray(32 * SECTOR, 64 * SECTOR).every((b) => b === 0)).toBe(true);
    expect(zeroed.data.subarray(0, 32 * SECTOR).equals(data.subarray(0, 32 * SECTOR))).toBe(true);
    expect((await driver.request(BlkReqType.DISCARD, 0, { out: BlkRig.ranges([{ sector: 8192, sectors: 2048 }]) })).status).toBe(BlkStatus.OK);
    expect((await driver.request(BlkReqType.FLUSH, 0)).status).toBe(BlkStatus.OK);
    // Past the end: IOERR for that request only.
    expect((await driver.request(BlkReqType.IN, (64 << 20) / SECTOR, { inLen: SECTOR })).status).toBe(BlkStatus.IOERR);

    // qemu-nbd dies; a write waits for it and completes once it is back.
    await nbd.kill();
    const later = pattern(32 << 10, 8);
    const pending = driver.request(BlkReqType.OUT, 2048, { out: later });
    await cli.waitForLine(/"event":"nbd-disconnect"/);
    await new Promise((res) => setTimeout(res, 300));
    await nbd.start();
    expect((await pending).status).toBe(BlkStatus.OK);
    await cli.waitForLine(/"event":"nbd-reconnect"/);
    expect((await driver.request(BlkReqType.IN, 2048, { inLen: later.length })).data.equals(later)).toBe(true);
    expect((await driver.request(BlkReqType.FLUSH, 0)).status).toBe(BlkStatus.OK);

    // Stopping flushes; qemu-img finds the data in the image.
    await driver.close();
    drivers.length = 0;
    cli.child.kill('SIGTERM');
    expect(await cli.exited).toBe(0);
    await nbd.kill('SIGTERM');
    const raw = path.join(dir, 'disk.raw');
    expect(spawnSync('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]).status).toBe(0);
    const disk = fs.readFileSync(raw);
    const expected = Buffer.from(data).fill(0, 32 * SECTOR, 64 * SECTOR);
    expect(disk.subarray(8 * SECTOR, 8 * SECTOR + data.length).equals(expected)).toBe(true);
    expect(disk.subarray(2048 * SECTOR, 2048 * SECTOR + later.length).equals(later)).toBe(true);
  });

  it('--read-only, or an export the server keeps read-only: VIRTIO_BLK_F_RO, writes fail, reads work', { timeout: 60_000 }, async () => {
    const mem = await nbdServer(nbdkit('memory', ['size=16M'], { socket: path.join(dir, 'mem.sock') }));
    const image = path.join(dir, 'ro.qcow2');
    createQcow2(image, '16M');
    const roExport = await nbdServer(qemuNbd(image, { socket: path.join(dir, 'ro.sock') }, { readOnly: true }));
    for (const args of [['--nbd', mem.uri, '--read-only'], ['--nbd', roExport.uri]]) {
      const { ready, driver } = await serve(args);
      expect(String(ready.backing), args.join(' ')).toMatch(/^nbd .*, read-only$/);
      expect(driver.has(BlkFeature.RO), args.join(' ')).toBe(true);
      expect(driver.has(BlkFeature.DISCARD) || driver.has(BlkFeature.WRITE_ZEROES)).toBe(false);
      expect((await driver.request(BlkReqType.OUT, 0, { out: Buffer.alloc(SECTOR, 1) })).status).toBe(BlkStatus.IOERR);
      const r = await driver.request(BlkReqType.IN, 0, { inLen: SECTOR });
      expect(r.status).toBe(BlkStatus.OK);
      expect(r.data.every((b) => b === 0)).toBe(true);
    }
  });

  it("an export's minimum block size becomes blk_size unless --block-size says less (refused)", { timeout: 60_000 }, async () => {
    const big = await nbdServer(nbdkit('memory', ['size=8M', 'blocksize-minimum=4096', 'blocksize-error-policy=error'], { socket: path.join(dir, 'bs.sock') }, ['--filter=blocksize-policy']));
    const { driver } = await serve(['--nbd', big.uri]);
    expect((await driver.config(BlkConfig.BLK_SIZE, 4)).readUInt32LE(0)).toBe(4096);
    const data = pattern(8192, 3);
    expect((await driver.request(BlkReqType.OUT, 8, { out: data })).status).toBe(BlkStatus.OK);
    expect((await driver.request(BlkReqType.IN, 8, { inLen: data.length })).data.equals(data)).toBe(true);
    const r = await runCli(['serve', 'virtio-blk', path.join(dir, 'bs2.sock'), '--nbd', big.uri, '--block-size', '512']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/vfio-user serve virtio-blk: the NBD export's minimum block size is 4096/);
  });

  it('refuses --nbd with --size or --file, bad URIs, unreachable servers and bad --nbd-connections (exit 2, with the reason)', { timeout: 60_000 }, async () => {
    const socket = path.join(dir, 'bad.sock');
    for (const [args, message] of [
      [['--nbd', 'nbd://127.0.0.1/x', '--size', '1G'], /neither --file nor --size/],
      [['--nbd', 'nbd://127.0.0.1/x', '--file', path.join(dir, 'f.img')], /neither --file nor --size/],
      [['--nbd', 'http://x/y'], /unsupported NBD URI scheme/],
      [['--nbd', 'nbd://127.0.0.1:1/x'], /ECONNREFUSED/],
      [['--nbd', 'nbd://127.0.0.1:1/x', '--nbd-connections', '0'], /--nbd-connections must be an integer from 1 to 16/],
    ] as const) {
      const r = await runCli(['serve', 'virtio-blk', socket, ...args]);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr, args.join(' ')).toMatch(message);
    }
    // A bad device option after the export is open: the NBD connections are closed and the command ends.
    const mem = await nbdServer(nbdkit('memory', ['size=1M'], { socket: path.join(dir, 'opt-mem.sock') }));
    const r = await runCli(['serve', 'virtio-blk', socket, '--nbd', mem.uri, '--serial', 'x'.repeat(21)], { timeoutMs: 15_000 });
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/serial/);
  });
});
