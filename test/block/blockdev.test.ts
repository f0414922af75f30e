// FileBackend on a raw block device: a loop device over a sparse file, when this machine allows
// one (root and /dev/loop-control). The size comes from sysfs, data round-trips with fdatasync,
// discard punches a hole through the device into the backing file, read-only refuses writes, and
// an NVMe controller runs on it.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileBackend } from '../../lib/block';
import { IoOpcode } from '../../lib/nvme/constants';
import { Rig, pattern } from '../devices/nvme/rig';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockdev-'));
const backing = path.join(dir, 'backing.img');
let device: string | null = null;
let why = '';

beforeAll(() => {
  fs.writeFileSync(backing, '');
  fs.truncateSync(backing, 32 << 20);
  const r = spawnSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' });
  if (r.status === 0 && r.stdout.trim().startsWith('/dev/')) device = r.stdout.trim();
  else why = `no loop device here: ${r.error?.message ?? r.stderr.trim()}`;
});
afterAll(() => {
  if (device !== null) spawnSync('losetup', ['-d', device]);
  fs.rmSync(dir, { recursive: true, force: true });
});

const allowed = spawnSync('losetup', ['--version']).status === 0 && fs.existsSync('/dev/loop-control') && process.getuid?.() === 0;

describe.skipIf(!allowed)('FileBackend on a loop device', () => {
  it('takes its size from the device, round-trips data, punches holes through to the backing file', async () => {
    expect(device, why).not.toBeNull();
    const disk = FileBackend.open(device!);
    expect(disk.size).toBe(32 << 20);
    const data = pattern(1 << 20, 3);
    await disk.write(4 << 20, data, true);
    const back = Buffer.alloc(data.length);
    await disk.read(4 << 20, back);
    expect(back.equals(data)).toBe(true);
    const used = () => fs.statSync(backing).blocks * 512;
    const before = used();
    expect(before).toBeGreaterThanOrEqual(1 << 20);
    await disk.discard(4 << 20, 1 << 20);
    await disk.flush();
    await disk.read(4 << 20, back);
    expect(back.every((x) => x === 0)).toBe(true);
    expect(used()).toBeLessThan(before);
    await disk.close();

    const ro = FileBackend.open(device!, { readOnly: true });
    await expect(ro.write(0, Buffer.alloc(512), false)).rejects.toMatchObject({ code: 'EROFS' });
    await ro.close();
  });

  it('an NVMe controller on the device: writes reach the backing file', async () => {
    expect(device, why).not.toBeNull();
    const rig = new Rig({ backend: FileBackend.open(device!) });
    await rig.enable();
    await rig.createQueuePair(1, 16);
    const buf = rig.alloc(65536);
    pattern(65536, 8).copy(rig.mem, buf);
    expect((await rig.io(1, { opcode: IoOpcode.WRITE, nsid: 1, ...rig.prps(buf, 65536), cdw10: 2048, cdw12: 127 })).status).toBe(0);
    expect((await rig.io(1, { opcode: IoOpcode.FLUSH, nsid: 1 })).status).toBe(0);
    await rig.close();
    const fd = fs.openSync(backing, 'r');
    const b = Buffer.alloc(65536);
    fs.readSync(fd, b, 0, b.length, 2048 * 512);
    fs.closeSync(fd);
    expect(b.equals(pattern(65536, 8))).toBe(true);
  });
});
