/**
 * Dirty logging (DMA_LOGGING_*) as the device writes: a page is logged when the write is done (a
 * view's synchronous use, an acquired range's release, an NVMe transfer's release after the
 * backend filled it), so a report taken while the write is still on its way cannot lose it; and
 * only START's ranges are logged.
 */
import { describe, expect, it } from 'vitest';
import { DmaSpace } from '../../lib/server/dma';
import { createMemfd } from '../../lib/native/memfd';
import { DmaMapFlags } from '../../lib/protocol/constants';
import { Segments, Transfer } from '../../lib/devices/nvme/prp';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();
const RW = DmaMapFlags.READ | DmaMapFlags.WRITE;
const PAGE = 4096;
const IOVA = 0x100000;

function space(pages = 16): DmaSpace {
  const dma = new DmaSpace();
  expect(dma.add({ iova: BigInt(IOVA), size: BigInt(pages * PAGE), offset: 0n, flags: RW }, createMemfd('dirty', pages * PAGE))).toBe(0);
  return dma;
}

/** The dirty pages of the map at IOVA (read-and-clear). */
function report(dma: DmaSpace, pages = 16): number[] {
  const r = dma.report(IOVA, pages * PAGE, PAGE);
  expect(r).toBeInstanceOf(Buffer);
  const out: number[] = [];
  for (let k = 0; k < pages; k++) if (((r as Buffer)[k >> 3]! >> (k & 7)) & 1) out.push(k);
  return out;
}

describe('dirty logging: when a write is logged', () => {
  it('an acquired range written after a report is logged again at release', async () => {
    const dma = space();
    dma.startLogging(PAGE);
    const io = dma.acquire(IOVA + 5 * PAGE, 2 * PAGE, true);
    expect(report(dma)).toEqual([5, 6]); // logged when taken...
    io.bytes.fill(7); // ...the write lands after that report...
    io.release(); // ...and is logged again when it is done.
    expect(report(dma)).toEqual([5, 6]);
    expect(report(dma)).toEqual([]);
    // A read is never logged.
    dma.acquire(IOVA, PAGE, false).release();
    expect(report(dma)).toEqual([]);
    await dma.removeAll();
  });

  it('a scatter/gather list is logged at release too', async () => {
    const dma = space();
    dma.startLogging(PAGE);
    const sgl = dma.acquireRange(IOVA + 3 * PAGE + 100, PAGE, true);
    expect(report(dma)).toEqual([3, 4]);
    sgl.release();
    sgl.release(); // idempotent, logs once
    expect(report(dma)).toEqual([3, 4]);
    await dma.removeAll();
  });

  it("an NVMe transfer into guest memory (a Read) is logged when released, after the backend's write", async () => {
    const dma = space();
    const segs = new Segments();
    segs.push(IOVA + 8 * PAGE, PAGE);
    segs.push(IOVA + 12 * PAGE, 512);
    const xfer = new Transfer();
    expect(xfer.acquire(dma, segs, true)).toBe(0);
    dma.startLogging(PAGE); // logging starts while the backend is still reading
    expect(report(dma)).toEqual([]);
    xfer.bufs[0]!.fill(1);
    xfer.release();
    expect(report(dma)).toEqual([8, 12]);
    // A Write (the device reads guest memory) logs nothing.
    expect(xfer.acquire(dma, segs, false)).toBe(0);
    xfer.release();
    expect(report(dma)).toEqual([]);
    await dma.removeAll();
  });

  it('written() logs ranges across maps and ignores what is outside them', async () => {
    const dma = space(4);
    expect(dma.add({ iova: BigInt(IOVA + 4 * PAGE), size: BigInt(4 * PAGE), offset: 0n, flags: RW }, createMemfd('b', 4 * PAGE))).toBe(0);
    dma.startLogging(PAGE);
    dma.written(IOVA + 3 * PAGE, 2 * PAGE);
    dma.written(0, PAGE);
    expect(report(dma, 4)).toEqual([3]);
    const second = dma.report(IOVA + 4 * PAGE, 4 * PAGE, PAGE) as Buffer;
    expect(second[0]).toBe(0b1);
    await dma.removeAll();
  });
});

describe("dirty logging: START's ranges", () => {
  it('logs only pages inside the ranges, in every map, and maps added later', async () => {
    const dma = space();
    dma.startLogging(PAGE, [
      { iova: IOVA + 4 * PAGE, length: 4 * PAGE },
      { iova: IOVA + 6 * PAGE, length: 4 * PAGE }, // overlaps: merged into pages 4..9
      { iova: 0x900000, length: PAGE },
    ]);
    dma.view(IOVA + 2 * PAGE, PAGE, true);
    dma.view(IOVA + 3 * PAGE, 3 * PAGE, true); // pages 3..5: only 4 and 5 are in range
    dma.view(IOVA + 9 * PAGE, PAGE, true);
    dma.view(IOVA + 10 * PAGE, PAGE, true);
    expect(report(dma)).toEqual([4, 5, 9]);
    // A map outside every range is not logged at all; one inside is.
    expect(dma.add({ iova: 0x800000n, size: BigInt(PAGE), offset: 0n, flags: RW }, createMemfd('c', PAGE))).toBe(0);
    expect(dma.add({ iova: 0x900000n, size: BigInt(2 * PAGE), offset: 0n, flags: RW }, createMemfd('d', 2 * PAGE))).toBe(0);
    dma.view(0x800000, 8, true);
    dma.view(0x900000, 2 * PAGE, true);
    expect((dma.report(0x800000, PAGE, PAGE) as Buffer)[0]).toBe(0);
    expect((dma.report(0x900000, 2 * PAGE, PAGE) as Buffer)[0]).toBe(0b01);
    // STOP forgets the ranges: the next session logs everything.
    dma.stopLogging();
    dma.startLogging(PAGE);
    dma.view(IOVA + 2 * PAGE, PAGE, true);
    expect(report(dma)).toEqual([2]);
    await dma.removeAll();
  });
});
