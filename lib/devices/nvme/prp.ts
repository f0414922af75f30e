/**
 * Physical Region Page (PRP) data pointers (NVMe Base 1.4, 4.3): walking PRP1/PRP2 and PRP lists
 * into guest-memory segments, then turning the segments into zero-copy views of the client's
 * memory that stay mapped while a backend works on them.
 *
 * Rules enforced, each a status in the completion rather than an exception:
 * - PRP1 may point anywhere dword aligned; its offset limits the first segment to the rest of its
 *   memory page (the page size is CC.MPS).
 * - A transfer that ends within the second page uses PRP2 as a data pointer, which must be page
 *   aligned. A longer transfer uses PRP2 as a PRP list pointer (qword aligned, any offset); every
 *   entry of a list is a page-aligned data pointer, except that the last entry of a list page is
 *   the (page-aligned) pointer to the next list page when more than one page remains.
 * - Misaligned entries: PRP Offset Invalid. A list or data page outside the client's DMA maps, or
 *   without the access the transfer needs: Data Transfer Error.
 *
 * Entries are u64 in guest memory. IOVAs above 2^53 cannot be in any map (DmaSpace works with
 * Numbers), so they are treated as unmapped.
 *
 * @packageDocumentation
 */
import type { DmaSpace } from '../../server/dma';
import type { Mapping } from '../../native/mapping';
import { DmaMapFlags } from '../../protocol/constants';
import { Status } from '../../nvme/constants';

const TWO_32 = 0x1_0000_0000;
/** Highest u32 "high half" that keeps a u64 exact in a Number. */
const MAX_SAFE_HI = 0x1f_ffff;

/** Reads a little-endian u64 as a Number; -1 if it is above 2^53 (cannot be a mapped IOVA). */
export function readU64(buf: Uint8Array, offset: number): number {
  const lo = buf[offset]! | (buf[offset + 1]! << 8) | (buf[offset + 2]! << 16) | (buf[offset + 3]! << 24);
  const hi = buf[offset + 4]! | (buf[offset + 5]! << 8) | (buf[offset + 6]! << 16) | (buf[offset + 7]! << 24);
  return joinU64(lo, hi);
}

/** A u64 from its two 32-bit halves (either sign) as a Number; -1 if it is above 2^53. */
export function joinU64(lo: number, hi: number): number {
  const h = hi >>> 0;
  if (h > MAX_SAFE_HI) return -1;
  return h * TWO_32 + (lo >>> 0);
}

/**
 * The guest-memory segments of one command's data, merged where contiguous. Reused across
 * commands (arrays keep their capacity).
 */
export class Segments {
  count = 0;
  total = 0;
  readonly iova: number[] = [];
  readonly length: number[] = [];

  reset(): void {
    this.count = 0;
    this.total = 0;
  }

  push(iova: number, length: number): void {
    const n = this.count;
    if (n > 0 && this.iova[n - 1]! + this.length[n - 1]! === iova) {
      this.length[n - 1]! += length;
    } else {
      this.iova[n] = iova;
      this.length[n] = length;
      this.count = n + 1;
    }
    this.total += length;
  }
}

/**
 * Walks PRP1/PRP2 for a transfer of `length` bytes (> 0) into `out`. Returns a status:
 * SUCCESS, PRP_INVALID_OFFSET, or DATA_XFER_ERROR (a PRP list outside the maps).
 */
export function mapPrp(dma: DmaSpace, prp1: number, prp2: number, length: number, pageSize: number, out: Segments): number {
  out.reset();
  if (length <= 0) return Status.SUCCESS;
  if (prp1 < 0) return Status.DATA_XFER_ERROR;
  if (prp1 % 4 !== 0) return Status.PRP_INVALID_OFFSET;
  const first = Math.min(length, pageSize - (prp1 % pageSize));
  out.push(prp1, first);
  let remaining = length - first;
  if (remaining === 0) return Status.SUCCESS;
  if (prp2 < 0) return Status.DATA_XFER_ERROR;
  if (remaining <= pageSize) {
    if (prp2 % pageSize !== 0) return Status.PRP_INVALID_OFFSET;
    out.push(prp2, remaining);
    return Status.SUCCESS;
  }
  // PRP2 points to a PRP list.
  if (prp2 % 8 !== 0) return Status.PRP_INVALID_OFFSET;
  let list = prp2;
  for (;;) {
    const slots = (pageSize - (list % pageSize)) / 8;
    const pagesLeft = Math.ceil(remaining / pageSize);
    // All remaining pages fit in this list page, or the last slot chains to the next list page.
    const chained = pagesLeft > slots;
    const entries = chained ? slots : pagesLeft;
    let bytes: Buffer;
    try {
      bytes = dma.view(list, entries * 8, false);
    } catch {
      return Status.DATA_XFER_ERROR;
    }
    const data = chained ? entries - 1 : entries;
    for (let i = 0; i < data; i++) {
      const entry = readU64(bytes, i * 8);
      if (entry < 0) return Status.DATA_XFER_ERROR;
      if (entry % pageSize !== 0) return Status.PRP_INVALID_OFFSET;
      const n = Math.min(remaining, pageSize);
      out.push(entry, n);
      remaining -= n;
    }
    if (!chained) return Status.SUCCESS;
    const next = readU64(bytes, (entries - 1) * 8);
    if (next < 0) return Status.DATA_XFER_ERROR;
    if (next % pageSize !== 0) return Status.PRP_INVALID_OFFSET;
    list = next;
  }
}

/**
 * Views of guest memory for one transfer, each holding its map's {@link Mapping} referenced so
 * that a DMA_UNMAP waits until the I/O is done. Reused across commands.
 *
 * If some segment lies in a map that has no shared memory (the client serves it with DMA_READ /
 * DMA_WRITE messages), the transfer goes through a bounce buffer instead ({@link Transfer.bounced}).
 */
export class Transfer {
  readonly bufs: Buffer[] = [];
  private readonly held: Mapping[] = [];
  /** True when the data must be copied through {@link DmaSpace.read}/{@link DmaSpace.write}. */
  bounced = false;
  /** For dirty logging at release: where the device wrote guest memory (a Read command). */
  private dma: DmaSpace | null = null;
  private segs: Segments | null = null;

  /**
   * Views of every segment; `toGuest`: the device writes guest memory (a Read command).
   * Returns SUCCESS or DATA_XFER_ERROR (outside the maps, or a permission the client did not grant).
   */
  acquire(dma: DmaSpace, segs: Segments, toGuest: boolean): number {
    this.release();
    if (toGuest) {
      this.dma = dma;
      this.segs = segs;
    }
    for (let s = 0; s < segs.count; s++) {
      let at = segs.iova[s]!;
      let rest = segs.length[s]!;
      while (rest > 0) {
        const region = dma.find(at);
        if (region === null) return this.fail();
        if (region.mapping === null) {
          // Message-only map: check reachability and permissions, then go through a bounce buffer.
          this.release();
          return this.checkBounce(dma, segs, toGuest);
        }
        const n = Math.min(rest, region.iova + region.size - at);
        let view: Buffer;
        try {
          view = dma.view(at, n, toGuest);
          region.mapping.acquire();
        } catch {
          return this.fail();
        }
        this.bufs.push(view);
        this.held.push(region.mapping);
        at += n;
        rest -= n;
      }
    }
    return Status.SUCCESS;
  }

  /**
   * True if a map this transfer used lost its memory since (the client truncated the file it
   * shared): the data moved is garbage and the command must fail. Reports the maps to `dma`.
   */
  poisoned(dma: DmaSpace, segs: Segments): boolean {
    let hit = false;
    for (const m of this.held) if (m.poisoned) hit = true;
    if (hit) for (let s = 0; s < segs.count; s++) dma.isPoisoned(segs.iova[s]!);
    return hit;
  }

  /**
   * Drops every reference (idempotent). A transfer into guest memory logs its pages dirty here,
   * once the backend has written them (and before the maps may go).
   */
  release(): void {
    const dma = this.dma;
    if (dma !== null) {
      this.dma = null;
      const segs = this.segs!;
      this.segs = null;
      if (dma.logging && this.held.length > 0) for (let s = 0; s < segs.count; s++) dma.written(segs.iova[s]!, segs.length[s]!);
    }
    // Emptied by pops: setting `length` is a runtime call that also shrinks the backing store,
    // which the next command's push grows again.
    const held = this.held;
    while (held.length > 0) {
      try {
        held.pop()!.release();
      } catch {
        // already released by a forced unmap; nothing to do
      }
    }
    const bufs = this.bufs;
    while (bufs.length > 0) bufs.pop();
    this.bounced = false;
  }

  private fail(): number {
    this.release();
    return Status.DATA_XFER_ERROR;
  }

  private checkBounce(dma: DmaSpace, segs: Segments, toGuest: boolean): number {
    for (let s = 0; s < segs.count; s++) {
      let at = segs.iova[s]!;
      const end = at + segs.length[s]!;
      while (at < end) {
        const region = dma.find(at);
        if (region === null || !dma.enabled) return Status.DATA_XFER_ERROR;
        if ((region.flags & (toGuest ? DmaMapFlags.WRITE : DmaMapFlags.READ)) === 0) return Status.DATA_XFER_ERROR;
        at = Math.min(end, region.iova + region.size);
      }
    }
    this.bounced = true;
    return Status.SUCCESS;
  }
}

/** Copies `src` into the guest segments (admin data such as Identify). DATA_XFER_ERROR on failure. */
export async function copyToGuest(dma: DmaSpace, segs: Segments, src: Uint8Array): Promise<number> {
  let done = 0;
  try {
    for (let s = 0; s < segs.count && done < src.length; s++) {
      const n = Math.min(segs.length[s]!, src.length - done);
      await dma.write(segs.iova[s]!, src.subarray(done, done + n));
      done += n;
    }
  } catch {
    return Status.DATA_XFER_ERROR;
  }
  return Status.SUCCESS;
}

/** Copies the guest segments into `dst` (e.g. a DSM range list). DATA_XFER_ERROR on failure. */
export async function copyFromGuest(dma: DmaSpace, segs: Segments, dst: Uint8Array): Promise<number> {
  let done = 0;
  try {
    for (let s = 0; s < segs.count && done < dst.length; s++) {
      const n = Math.min(segs.length[s]!, dst.length - done);
      await dma.read(segs.iova[s]!, dst.subarray(done, done + n));
      done += n;
    }
  } catch {
    return Status.DATA_XFER_ERROR;
  }
  return Status.SUCCESS;
}

/** Synchronous {@link copyToGuest} for segments in shared memory; null if some segment is not. */
export function copyToGuestSync(dma: DmaSpace, segs: Segments, src: Uint8Array): number | null {
  for (let s = 0; s < segs.count; s++) if (!dma.isShared(segs.iova[s]!, segs.length[s]!)) return null;
  let done = 0;
  try {
    for (let s = 0; s < segs.count && done < src.length; s++) {
      const n = Math.min(segs.length[s]!, src.length - done);
      dma.view(segs.iova[s]!, n, true).set(src.subarray(done, done + n));
      done += n;
    }
  } catch {
    return Status.DATA_XFER_ERROR;
  }
  return Status.SUCCESS;
}

/** Synchronous {@link copyFromGuest} for segments in shared memory; null if some segment is not. */
export function copyFromGuestSync(dma: DmaSpace, segs: Segments, dst: Uint8Array): number | null {
  for (let s = 0; s < segs.count; s++) if (!dma.isShared(segs.iova[s]!, segs.length[s]!)) return null;
  let done = 0;
  try {
    for (let s = 0; s < segs.count && done < dst.length; s++) {
      const n = Math.min(segs.length[s]!, dst.length - done);
      dst.set(dma.view(segs.iova[s]!, n, false), done);
      done += n;
    }
  } catch {
    return Status.DATA_XFER_ERROR;
  }
  return Status.SUCCESS;
}
