// Backends: RamBackend (memfd, outside the V8 heap) and FileBackend (positional scatter/gather
// straight from guest views, fdatasync for Flush/FUA), and persistence across controllers.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FileBackend, RamBackend } from '../../lib/block';
import { IoOpcode } from '../../lib/nvme/constants';
import { IdNs } from '../../lib/nvme/structs';
import { PAGE, Rig, pattern } from '../devices/nvme/rig';
import { useFdLeakCheck } from '../helpers/fds';


useFdLeakCheck();
let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvme-backend-'));
});
afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('RamBackend', () => {
  it('refuses a bad size and out-of-range accesses (RangeError), and is idempotent to close', async () => {
    expect(() => new RamBackend(0)).toThrow(RangeError);
    expect(() => new RamBackend(-1)).toThrow(RangeError);
    const ram = new RamBackend(4096);
    expect(() => ram.read(4000, Buffer.alloc(200))).toThrow(RangeError);
    expect(() => ram.write(-1, Buffer.alloc(1), false)).toThrow(RangeError);
    expect(() => ram.discard(0, 4097)).toThrow(RangeError);
    await ram.close();
    await ram.close();
    expect(() => ram.bytes).toThrow(/closed/);
  });

  it('reads, writes, scatters and gathers; discard and write zeroes read back as zeroes', async () => {
    const ram = new RamBackend(1 << 16);
    await ram.writev(100, [Buffer.from('abc'), Buffer.from('defg')], false);
    const a = Buffer.alloc(4);
    const b = Buffer.alloc(3);
    await ram.readv(100, [a, b]);
    expect(a.toString() + b.toString()).toBe('abcdefg');
    await ram.discard(101, 2);
    const c = Buffer.alloc(7);
    await ram.read(100, c);
    expect([...c]).toEqual([0x61, 0, 0, 0x64, 0x65, 0x66, 0x67]);
    expect(ram.discardZeroes).toBe(true);
    await ram.close();
  });
});

describe('FileBackend', () => {
  it('refuses a missing size, a missing file without create, and a short read-only file', () => {
    const p = path.join(dir, 'x.img');
    expect(() => FileBackend.open(p)).toThrow(RangeError);
    expect(fs.existsSync(p)).toBe(true); // created empty, then refused
    expect(() => FileBackend.open(path.join(dir, 'none.img'), { create: false, size: 4096 })).toThrow(/ENOENT/);
    fs.writeFileSync(path.join(dir, 'short.img'), Buffer.alloc(100));
    expect(() => FileBackend.open(path.join(dir, 'short.img'), { readOnly: true, size: 4096 })).toThrow(RangeError);
  });

  it('creates and extends sparse files; reads past the data are zeroes; writev/readv round-trip', async () => {
    const p = path.join(dir, 'disk.img');
    const file = FileBackend.open(p, { size: 1 << 20 });
    expect(fs.statSync(p).size).toBe(1 << 20);
    const z = Buffer.alloc(4096, 0xff);
    await file.read(8192, z);
    expect(z.every((x) => x === 0)).toBe(true);
    const parts = [pattern(1000, 1), pattern(3000, 2), pattern(96, 3)];
    await file.writev(4096, parts, true);
    const back = [Buffer.alloc(96), Buffer.alloc(4000)];
    await file.readv(4096, back);
    expect(Buffer.concat(back)).toEqual(Buffer.concat(parts));
    await file.writeZeroes(4096, 2000, false);
    const after = Buffer.alloc(4096);
    await file.read(4096, after);
    expect(after.subarray(0, 2000).every((x) => x === 0)).toBe(true);
    expect(after.subarray(2000)).toEqual(Buffer.concat(parts).subarray(2000));
    await file.close();
    await file.close();
  });

  it('a read-only file fails writes (a media error for the guest), reads work', async () => {
    const p = path.join(dir, 'ro.img');
    fs.writeFileSync(p, pattern(8192, 4));
    const file = FileBackend.open(p, { readOnly: true });
    const b = Buffer.alloc(8192);
    await file.read(0, b);
    expect(b).toEqual(pattern(8192, 4));
    await expect(file.write(0, Buffer.alloc(512), false)).rejects.toThrow(/read-only/);
    await file.close();
  });

  it('data a guest wrote survives the controller: a new controller on the same file reads it', async () => {
    const p = path.join(dir, 'persist.img');
    const data = pattern(64 * 1024, 99);
    {
      const rig = new Rig({ backend: FileBackend.open(p, { size: 4 << 20 }), serial: 'P1' });
      await rig.enable();
      await rig.createQueuePair(1, 16);
      const buf = rig.alloc(data.length);
      data.copy(rig.mem, buf);
      expect((await rig.io(1, { opcode: IoOpcode.WRITE, ...rig.prps(buf, data.length), cdw10: 2048, cdw12: data.length / 512 - 1 })).status).toBe(0);
      expect((await rig.io(1, { opcode: IoOpcode.FLUSH })).status).toBe(0);
      await rig.close(); // closes the backend
    }
    expect(fs.readFileSync(p).subarray(2048 * 512, 2048 * 512 + data.length)).toEqual(data);
    {
      const rig = new Rig({ backend: FileBackend.open(p), serial: 'P1' });
      await rig.enable();
      await rig.createQueuePair(1, 16);
      const buf = rig.alloc(data.length);
      expect((await rig.io(1, { opcode: IoOpcode.READ, ...rig.prps(buf, data.length), cdw10: 2048, cdw12: data.length / 512 - 1 })).status).toBe(0);
      expect(rig.mem.subarray(buf, buf + data.length)).toEqual(data);
      // Deallocate is a hint here: the namespace says so, and the data stays.
      const id = rig.alloc(PAGE);
      await rig.admin({ opcode: 0x06, nsid: 1, prp1: id, cdw10: 0 });
      expect(rig.mem[id + IdNs.DLFEAT]! & 0x7).toBe(0);
      await rig.close();
    }
  });

  it('the same serial gives the same namespace IDs; another serial gives others', async () => {
    const ids = async (serial: string) => {
      const rig = new Rig({ serial });
      await rig.enable();
      const buf = rig.alloc(PAGE);
      await rig.admin({ opcode: 0x06, nsid: 1, prp1: buf, cdw10: 0 });
      const nguid = Buffer.from(rig.mem.subarray(buf + IdNs.NGUID, buf + IdNs.NGUID + 24)).toString('hex');
      await rig.close();
      return nguid;
    };
    const a = await ids('S1');
    expect(await ids('S1')).toBe(a);
    expect(await ids('S2')).not.toBe(a);
  });
});

describe('discard gives storage back', () => {
  it('RamBackend: a discarded range is a hole in the memfd (memory freed), even on a 64 GiB disk', async () => {
    const ram = new RamBackend(2 ** 36);
    const chunk = Buffer.alloc(1 << 20, 0xee);
    for (let i = 0; i < 16; i++) await ram.write(2 ** 35 + i * chunk.length, chunk, false);
    const used = () => Number(fs.fstatSync(ram.fd.value, { bigint: true }).blocks) * 512;
    expect(used()).toBeGreaterThanOrEqual(16 << 20);
    await ram.discard(0, 2 ** 36); // what mkfs does to a whole disk
    expect(used()).toBe(0);
    const back = Buffer.alloc(4096, 1);
    await ram.read(2 ** 35, back);
    expect(back.equals(Buffer.alloc(4096))).toBe(true);
    await ram.writeZeroes(0, 4096, false);
    await ram.close();
  });

  it('FileBackend: discard punches a hole where the file system can, and reads back zeros there', async () => {
    const p = path.join(dir, 'punch.img');
    const file = FileBackend.open(p, { size: 1 << 20 });
    await file.write(0, Buffer.alloc(1 << 20, 0x33), false);
    await file.flush();
    await file.discard(4096, 8192);
    const back = Buffer.alloc(3 * 4096);
    await file.read(0, back);
    expect(back.subarray(0, 4096).every((b) => b === 0x33)).toBe(true);
    expect(back.subarray(4096).every((b) => b === 0)).toBe(true);
    await file.close();
    const ro = FileBackend.open(p, { readOnly: true });
    await ro.discard(0, 4096); // a hint: a read-only disk keeps its data
    const first = Buffer.alloc(4);
    await ro.read(0, first);
    expect([...first]).toEqual([0x33, 0x33, 0x33, 0x33]);
    await ro.close();
  });
});
