import { describe, it, expect } from 'vitest';
import { DmaSpace, DmaError } from '../../lib/server/dma';
import { createMemfd } from '../../lib/native/memfd';
import { Mapping } from '../../lib/native/mapping';
import { DmaMapFlags, Errno } from '../../lib/protocol/constants';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();
const RW = DmaMapFlags.READ | DmaMapFlags.WRITE;

describe('DmaSpace.acquireRange (scatter/gather across maps)', () => {
  it('returns one zero-copy view per map crossed, holds them until release, and refuses gaps', async () => {
    const dma = new DmaSpace();
    const fdA = createMemfd('a', 8192);
    const fdB = createMemfd('b', 8192);
    const mirrorA = Mapping.map(fdA, 0, 8192);
    const mirrorB = Mapping.map(fdB, 0, 8192);
    expect(dma.add({ iova: 0x10000n, size: 8192n, offset: 0n, flags: RW }, fdA)).toBe(0);
    expect(dma.add({ iova: 0x12000n, size: 8192n, offset: 0n, flags: RW }, fdB)).toBe(0);
    // 0x11800..0x12800 crosses from map A into map B.
    const sgl = dma.acquireRange(0x11800, 0x1000, true);
    expect(sgl.bufs.map((b) => b.length)).toEqual([0x800, 0x800]);
    sgl.bufs[0]!.fill(0xaa);
    sgl.bufs[1]!.fill(0xbb);
    expect(mirrorA.bytes[0x1800]).toBe(0xaa); // the views are the client's memory itself
    expect(mirrorB.bytes[0x7ff]).toBe(0xbb);
    // Unmapping B waits for the held reference.
    let unmapped = false;
    const removal = dma.remove(0x12000n, 8192n).then(() => (unmapped = true));
    await new Promise((r) => setTimeout(r, 10));
    expect(unmapped).toBe(false);
    sgl.release();
    await removal;
    expect(unmapped).toBe(true);
    // A range running into the gap where B was: ENOENT, nothing held.
    expect(() => dma.acquireRange(0x11800, 0x1000, false)).toThrow(DmaError);
    try {
      dma.acquireRange(0x11800, 0x1000, false);
    } catch (err) {
      expect((err as DmaError).errno).toBe(Errno.ENOENT);
    }
    await dma.removeAll();
    mirrorA.unmapNow();
    mirrorB.unmapNow();
  });
});
