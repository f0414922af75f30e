// An NVMe guest (or the client behind it) that takes memory back: data buffers truncated under the
// controller fail their command with Data Transfer Error instead of killing the process, and the
// doorbell page the controller shares cannot be truncated at all.
import * as fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { IoOpcode, Status } from '../../../lib/nvme/constants';
import { createMemfd } from '../../../lib/native/memfd';
import { DmaMapFlags, PciRegion } from '../../../lib/protocol/constants';
import type { DmaRegion } from '../../../lib/server/dma';
import { PAGE, Rig, sc } from './rig';
import { useFdLeakCheck } from '../../helpers/fds';

useFdLeakCheck();
let rig: Rig;
afterEach(async () => {
  await rig?.close();
});

const DATA_IOVA = 0x4000_0000;

/** A second guest memfd mapped at DATA_IOVA, that the test truncates. */
function dataMemory(pages: number) {
  const fd = createMemfd('nvme-test-data', pages * PAGE);
  const keep = fs.openSync(`/proc/self/fd/${fd.value}`, 'r+');
  const errno = rig.dma.add({ iova: BigInt(DATA_IOVA), size: BigInt(pages * PAGE), offset: 0n, flags: DmaMapFlags.READ | DmaMapFlags.WRITE }, fd);
  expect(errno).toBe(0);
  return { fd: keep, close: () => fs.closeSync(keep) };
}

describe('guest memory truncated under the controller', () => {
  for (const opcode of [IoOpcode.READ, IoOpcode.WRITE]) {
    it(`${opcode === IoOpcode.READ ? 'Read' : 'Write'} into it completes with Data Transfer Error; the controller carries on`, async () => {
      rig = new Rig({ queues: 1 });
      await rig.enable();
      await rig.createQueuePair(1, 16);
      const poisoned: DmaRegion[] = [];
      rig.dma.onPoison = (r) => poisoned.push(r);
      const data = dataMemory(8);
      fs.ftruncateSync(data.fd, 0);

      const bad = await rig.io(1, { opcode, prp1: DATA_IOVA, cdw12: 7 }); // 8 blocks of 512
      expect(sc(bad)).toBe(Status.DATA_XFER_ERROR & 0x7ff);
      expect(poisoned.map((r) => r.iova)).toEqual([DATA_IOVA]);
      // Later commands on the poisoned map fail before touching it; healthy memory still works.
      expect(sc(await rig.io(1, { opcode, prp1: DATA_IOVA + PAGE, cdw12: 0 }))).toBe(Status.DATA_XFER_ERROR & 0x7ff);
      const good = rig.alloc(PAGE);
      expect((await rig.io(1, { opcode, prp1: good, cdw12: 0 })).status).toBe(0);
      data.close();
    });
  }
});

describe('the shared doorbell page', () => {
  it('is sealed: a client cannot shrink or grow it', async () => {
    rig = new Rig({ queues: 1, doorbells: 'mmap' });
    const shared = rig.ctrl.regions[PciRegion.BAR0]!.mmap!;
    expect(() => fs.ftruncateSync(shared.fd.value, 0)).toThrow(expect.objectContaining({ code: 'EPERM' }));
    expect(() => fs.ftruncateSync(shared.fd.value, 1 << 30)).toThrow(expect.objectContaining({ code: 'EPERM' }));
  });
});
