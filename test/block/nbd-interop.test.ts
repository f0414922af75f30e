// NbdBackend against real NBD servers (Debian's qemu-nbd and nbdkit): qcow2 images over UNIX and
// TCP (127.0.0.1 only), read-only exports, nbdkit's memory plugin with several connections, server
// errors, an NVMe controller on an export, and the server killed and restarted under verified I/O.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdBackend, NbdFlags } from '../../lib/block';
import { IoOpcode, Status, statusCode } from '../../lib/nvme/constants';
import { IdNs } from '../../lib/nvme/structs';
import { PAGE, Rig, pattern } from '../devices/nvme/rig';
import { createQcow2, freePort, nbdToolsMissing, nbdkit, qemuNbd, qemuStorageDaemon, storageDaemonRun, type NbdServerProcess } from './nbd-servers';

const missing = nbdToolsMissing('qemu-nbd', 'qemu-img', 'nbdkit');
const qsd = storageDaemonRun();
if (qsd === null) nbdToolsMissing('qemu-storage-daemon'); // fails in CI, skips elsewhere
let dir: string;
const running: NbdServerProcess[] = [];
const backends: NbdBackend[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-interop-'));
});
afterEach(async () => {
  for (const b of backends.splice(0)) await b.close().catch(() => {});
  for (const s of running.splice(0)) await s.kill();
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function serve(s: NbdServerProcess): Promise<NbdServerProcess> {
  running.push(s);
  await s.start();
  return s;
}

async function open(uri: string, options: Parameters<typeof NbdBackend.open>[1] = {}): Promise<NbdBackend> {
  const b = await NbdBackend.open(uri, { backoffMs: 20, maxBackoffMs: 200, ...options });
  backends.push(b);
  return b;
}

/** The guest-visible bytes of a qcow2 image, read by qemu-img (not by us). */
function rawBytes(image: string, offset: number, length: number): Buffer {
  const raw = `${image}.raw`;
  const r = spawnSync('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img convert: ${r.stderr}`);
  const fd = fs.openSync(raw, 'r');
  const b = Buffer.alloc(length);
  fs.readSync(fd, b, 0, length, offset);
  fs.closeSync(fd);
  fs.rmSync(raw);
  return b;
}

describe.skipIf(missing !== null)('qemu-nbd', () => {
  it('serves a qcow2 over a UNIX socket: negotiated limits, writes qemu-img reads back, trim and zeroes', async () => {
    const image = path.join(dir, 'a.qcow2');
    createQcow2(image, '64M');
    const s = await serve(qemuNbd(image, { socket: path.join(dir, 'a.sock') }));
    const b = await open(s.uri);
    expect(b.size).toBe(64 << 20);
    expect(b.readOnly).toBe(false);
    expect(b.flags & NbdFlags.SEND_FLUSH).not.toBe(0);
    expect(b.maxPayload).toBeGreaterThanOrEqual(1 << 20);
    const data = pattern(1 << 20, 1);
    await b.write(3 << 20, data, true);
    await b.writev(8 << 20, [data.subarray(0, 4096), data.subarray(4096, 65536)], false);
    await b.flush();
    const back = Buffer.alloc(1 << 20);
    await b.read(3 << 20, back);
    expect(back.equals(data)).toBe(true);
    await b.zeroes(3 << 20, 65536, { noHole: true });
    await b.discard((3 << 20) + 65536, 65536);
    await b.flush();
    await b.close();
    const raw = rawBytes(image, 3 << 20, 1 << 20);
    expect(raw.subarray(0, 65536).every((x) => x === 0)).toBe(true);
    expect(raw.subarray(131072).equals(data.subarray(131072))).toBe(true);
    expect(rawBytes(image, 8 << 20, 65536).equals(data.subarray(0, 65536))).toBe(true);
  });

  it('serves over TCP on 127.0.0.1; a read-only export refuses writes with EROFS', async () => {
    const image = path.join(dir, 'b.qcow2');
    createQcow2(image, '16M');
    const port = await freePort();
    const s = await serve(qemuNbd(image, { port }));
    const b = await open(s.uri, { connections: 2 });
    await b.write(0, pattern(65536, 2), true);
    await b.close();
    await s.kill();
    const ro = await serve(qemuNbd(image, { port }, { readOnly: true }));
    const r = await open(ro.uri);
    expect(r.readOnly).toBe(true);
    const back = Buffer.alloc(65536);
    await r.read(0, back);
    expect(back.equals(pattern(65536, 2))).toBe(true);
    await expect(r.write(0, back, false)).rejects.toMatchObject({ code: 'EROFS' });
  });

  it('killed (SIGKILL) and restarted three times under verified FUA writes and reads: no error, nothing acknowledged is lost', { timeout: 60_000 }, async () => {
    const image = path.join(dir, 'c.qcow2');
    createQcow2(image, '32M');
    const s = await serve(qemuNbd(image, { socket: path.join(dir, 'c.sock') }));
    const b = await open(s.uri, { connections: 2, reconnectTimeoutMs: 30_000 });
    const blocks = 512;
    const expected = new Map<number, number>();
    const errors: Error[] = [];
    let stop = false;
    let ops = 0;
    const worker = async (id: number) => {
      for (let n = 0; !stop; n++) {
        const blk = ((n * 17) % 85) * 6 + id; // each worker owns its blocks
        const tag = ((id << 6) + n) & 0xff || 1;
        const buf = Buffer.alloc(16384, tag);
        try {
          await b.write(blk * 16384, buf, true); // FUA: durable once acknowledged
          expected.set(blk, tag);
          const back = Buffer.alloc(16384);
          await b.read(blk * 16384, back);
          if (back[0] !== expected.get(blk) || back[16383] !== back[0]) throw new Error(`block ${blk} read back ${back[0]}`);
          ops++;
        } catch (err) {
          errors.push(err as Error);
        }
      }
    };
    const workers = [0, 1, 2, 3, 4, 5].map(worker);
    for (let i = 0; i < 3; i++) {
      await new Promise((r) => setTimeout(r, 300));
      await s.kill('SIGKILL');
      await new Promise((r) => setTimeout(r, 200));
      await s.start();
    }
    await new Promise((r) => setTimeout(r, 300));
    stop = true;
    await Promise.all(workers);
    expect(errors.map((e) => `${(e as NodeJS.ErrnoException).code}: ${e.message}`).slice(0, 5)).toEqual([]);
    expect(ops).toBeGreaterThan(0);
    expect(b.stats.reconnects).toBeGreaterThanOrEqual(3);
    await b.close();
    await s.kill();
    const raw = rawBytes(image, 0, blocks * 16384);
    for (const [blk, tag] of expected) expect(raw[blk * 16384 + 100], `block ${blk}`).toBe(tag);
  });

  it('an NVMe controller on a read-only qemu-nbd export reports write protection', async () => {
    const image = path.join(dir, 'd.qcow2');
    createQcow2(image, '8M');
    const s = await serve(qemuNbd(image, { socket: path.join(dir, 'd.sock') }, { readOnly: true }));
    const rig = new Rig({ backend: await NbdBackend.open(s.uri) });
    await rig.enable();
    await rig.createQueuePair(1, 16);
    const id = rig.alloc(PAGE);
    await rig.admin({ opcode: 0x06, nsid: 1, prp1: id, cdw10: 0 });
    expect(rig.mem[id + IdNs.NSATTR]! & 1).toBe(1);
    const buf = rig.alloc(PAGE);
    const w = await rig.io(1, { opcode: IoOpcode.WRITE, nsid: 1, ...rig.prps(buf, PAGE), cdw12: 7 });
    expect(statusCode(w.status)).toBe(statusCode(Status.NS_WRITE_PROTECTED));
    expect((await rig.io(1, { opcode: IoOpcode.READ, nsid: 1, ...rig.prps(buf, PAGE), cdw12: 7 })).status).toBe(0);
    await rig.close();
  });
});

describe.skipIf(missing !== null)('nbdkit', () => {
  it('memory plugin over UNIX and TCP: four connections, 256 concurrent verified I/Os spread over them', async () => {
    for (const where of [{ socket: path.join(dir, 'm.sock') }, { port: await freePort() }]) {
      const s = await serve(nbdkit('memory', ['size=64M'], where));
      const b = await open(s.uri, { connections: 4 });
      expect(b.flags & NbdFlags.CAN_MULTI_CONN).not.toBe(0);
      expect(b.stats.connections).toBe(4);
      const ios = Array.from({ length: 256 }, (_, i) => pattern(8192, i + 1));
      await Promise.all(ios.map((d, i) => b.write(i * 8192, d, false)));
      await b.flush();
      const back = ios.map(() => Buffer.alloc(8192));
      await Promise.all(back.map((d, i) => b.read(i * 8192, d)));
      back.forEach((d, i) => expect(d.equals(ios[i]!)).toBe(true));
      await b.zeroes(0, 8192, { fast: true }).catch((err: NodeJS.ErrnoException) => expect(err.code).toBe('ENOTSUP'));
      await b.close();
      backends.length = 0;
      await s.kill();
    }
  });

  it("the server's I/O errors (error filter) are clean rejections; the connection stays usable", async () => {
    const s = await serve(nbdkit('memory', ['size=16M', 'error-pread-rate=1', 'error=EIO'], { socket: path.join(dir, 'e.sock') }, ['--filter=error']));
    const b = await open(s.uri, { connections: 1 });
    await b.write(0, Buffer.alloc(4096, 1), false);
    await expect(b.read(0, Buffer.alloc(4096))).rejects.toMatchObject({ code: 'EIO' });
    await b.write(4096, Buffer.alloc(4096, 2), false);
    expect(b.stats.connections).toBe(1);
  });

  it('an NVMe controller on nbdkit memory: guest writes and reads through PRPs round-trip', async () => {
    const s = await serve(nbdkit('memory', ['size=32M'], { socket: path.join(dir, 'n.sock') }));
    const rig = new Rig({ backend: await NbdBackend.open(s.uri) });
    await rig.enable();
    await rig.createQueuePair(1, 32);
    const size = 128 * 1024;
    const src = rig.alloc(size);
    const dst = rig.alloc(size);
    pattern(size, 9).copy(rig.mem, src);
    expect((await rig.io(1, { opcode: IoOpcode.WRITE, nsid: 1, ...rig.prps(src, size), cdw10: 64, cdw12: size / 512 - 1 })).status).toBe(0);
    expect((await rig.io(1, { opcode: IoOpcode.FLUSH, nsid: 1 })).status).toBe(0);
    expect((await rig.io(1, { opcode: IoOpcode.READ, nsid: 1, ...rig.prps(dst, size), cdw10: 64, cdw12: size / 512 - 1 })).status).toBe(0);
    expect(rig.mem.subarray(dst, dst + size).equals(pattern(size, 9))).toBe(true);
    await rig.close();
  });
});

describe.skipIf(missing !== null || qsd === null)('qemu-storage-daemon', () => {
  it('exports a qcow2 over a UNIX socket: round trip, FUA, trim, and a restart under I/O', async () => {
    const image = path.join(dir, 'q.qcow2');
    createQcow2(image, '32M');
    const s = await serve(qemuStorageDaemon(image, path.join(dir, 'qsd.sock'), qsd!));
    const b = await open(s.uri, { connections: 2 });
    expect(b.size).toBe(32 << 20);
    const data = pattern(256 * 1024, 5);
    await b.write(1 << 20, data, true);
    await b.discard(4 << 20, 1 << 20);
    const pending = b.write(2 << 20, data, true);
    await s.kill();
    await s.start();
    await pending;
    const back = Buffer.alloc(data.length);
    await b.read(2 << 20, back);
    expect(back.equals(data)).toBe(true);
    await b.read(1 << 20, back);
    expect(back.equals(data)).toBe(true);
    // The trim was acknowledged, not flushed, when the server died: the next flush says so.
    await expect(b.flush()).rejects.toMatchObject({ code: 'EIO', message: /may be lost/ });
    await b.close();
    await s.kill('SIGTERM');
    expect(rawBytes(image, 1 << 20, data.length).equals(data)).toBe(true);
  });
});
