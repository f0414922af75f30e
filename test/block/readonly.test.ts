// Read-only namespaces for every backend: the backend refuses writes (EROFS); the NVMe controller
// reports write protection (Identify Namespace NSATTR bit 0, and in the I/O Command Set
// independent structure) and fails writes, Write Zeroes and Deallocate with Namespace is Write
// Protected before they reach the backend.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { FileBackend, RamBackend, type BlockBackend } from '../../lib/block';
import { IoOpcode, Status, statusCode } from '../../lib/nvme/constants';
import { IdNs, IdNsIndep } from '../../lib/nvme/structs';
import { PAGE, Rig, pattern } from '../devices/nvme/rig';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

describe('RamBackend readOnly', () => {
  it('refuses writes and zeroing with EROFS; discard is a no-op; reads see what view() put there', async () => {
    const ram = new RamBackend(1 << 16, { readOnly: true, name: 'ro-test' });
    expect(ram.readOnly).toBe(true);
    pattern(4096, 5).copy(ram.view(0, 4096));
    await expect(ram.write(0, Buffer.alloc(512), false)).rejects.toMatchObject({ code: 'EROFS' });
    await expect(ram.writev(0, [Buffer.alloc(512)], false)).rejects.toMatchObject({ code: 'EROFS' });
    await expect(ram.writeZeroes(0, 512, false)).rejects.toMatchObject({ code: 'EROFS' });
    await ram.discard(0, 4096);
    const back = Buffer.alloc(4096);
    await ram.read(0, back);
    expect(back).toEqual(pattern(4096, 5));
    expect(new RamBackend(4096, 'named').readOnly).toBe(false);
    await ram.close();
  });
});

describe('NVMe on a read-only backend', () => {
  const backends: [string, () => BlockBackend][] = [
    ['RamBackend', () => new RamBackend(8 << 20, { readOnly: true })],
    [
      'FileBackend',
      () => {
        const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nvme-ro-'));
        dirs.push(dir);
        const p = path.join(dir, 'ro.img');
        fs.writeFileSync(p, Buffer.alloc(8 << 20));
        return FileBackend.open(p, { readOnly: true });
      },
    ],
  ];

  for (const [name, make] of backends) {
    it(`${name}: NSATTR says write-protected; writes fail with Namespace is Write Protected; reads and flush work`, async () => {
      const rig = new Rig({ backend: make() });
      await rig.enable();
      await rig.createQueuePair(1, 16);
      const id = rig.alloc(PAGE);
      expect((await rig.admin({ opcode: 0x06, nsid: 1, prp1: id, cdw10: 0 })).status).toBe(0);
      expect(rig.mem[id + IdNs.NSATTR]! & 1).toBe(1);
      expect((await rig.admin({ opcode: 0x06, nsid: 1, prp1: id, cdw10: 0x08 })).status).toBe(0);
      expect(rig.mem[id + IdNsIndep.NSATTR]! & 1).toBe(1);

      const buf = rig.alloc(PAGE);
      const write = await rig.io(1, { opcode: IoOpcode.WRITE, nsid: 1, ...rig.prps(buf, PAGE), cdw10: 0, cdw12: 7 });
      expect(statusCode(write.status)).toBe(statusCode(Status.NS_WRITE_PROTECTED));
      expect(write.status & 0x4000).not.toBe(0); // DNR: do not retry
      const zeroes = await rig.io(1, { opcode: IoOpcode.WRITE_ZEROES, nsid: 1, cdw10: 0, cdw12: 7 });
      expect(statusCode(zeroes.status)).toBe(statusCode(Status.NS_WRITE_PROTECTED));
      const range = rig.alloc(PAGE);
      rig.mem.writeUInt32LE(8, range + 4);
      const dsm = await rig.io(1, { opcode: IoOpcode.DSM, nsid: 1, prp1: range, cdw10: 0, cdw11: 1 << 2 });
      expect(statusCode(dsm.status)).toBe(statusCode(Status.NS_WRITE_PROTECTED));
      expect((await rig.io(1, { opcode: IoOpcode.READ, nsid: 1, ...rig.prps(buf, PAGE), cdw10: 0, cdw12: 7 })).status).toBe(0);
      expect((await rig.io(1, { opcode: IoOpcode.FLUSH, nsid: 1 })).status).toBe(0);
      expect(rig.ctrl.health().mediaErrors).toBe(0); // a policy refusal, not a media error
      await rig.close();
    });
  }

  it('a writable namespace reports NSATTR 0', async () => {
    const rig = new Rig({});
    await rig.enable();
    const id = rig.alloc(PAGE);
    await rig.admin({ opcode: 0x06, nsid: 1, prp1: id, cdw10: 0 });
    expect(rig.mem[id + IdNs.NSATTR]).toBe(0);
    await rig.close();
  });
});
