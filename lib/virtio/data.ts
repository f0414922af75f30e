/**
 * {@link ElementData}: zero-copy views of part of a descriptor chain's buffers, for device I/O.
 *
 * A device asks for a byte range of the chain's device-readable or device-writable part (a block
 * request's data, say: everything between its header and its status byte). The range becomes one
 * Buffer view per piece of guest memory (a buffer, or the part of it inside one DMA map), each
 * map held referenced until {@link ElementData.release}, so a DMA_UNMAP waits for the backend to
 * finish with the memory. Pieces in a map without shared memory (served by DMA_READ/DMA_WRITE
 * messages) make the whole range go through a bounce buffer instead ({@link ElementData.bounced}).
 *
 * Reused across requests (one per pooled element): only the views themselves are new objects.
 * The arrays keep their capacity (V8 reallocates an array whose length was set to 0), so a
 * request with one data buffer allocates nothing here but its view.
 *
 * @packageDocumentation
 */
import { Mapping } from '../native/mapping';
import { DmaMapFlags } from '../protocol/constants';
import type { DmaSpace } from '../server/dma';
import { usable } from './memory';
import type { VirtqElement } from './virtqueue';

const EMPTY = Buffer.alloc(0);

export class ElementData {
  /** The views, in order: the first {@link count} entries (none when bounced). */
  readonly views: Buffer[] = [];
  count = 0;
  /** The guest ranges the data covers (merged where contiguous): addresses and lengths. */
  readonly iova: number[] = [];
  readonly lens: number[] = [];
  ranges = 0;
  /** Total bytes. */
  length = 0;
  /** True when the data must be copied with {@link gather}/{@link scatter} (a message-only map). */
  bounced = false;
  /** The maps the views hold a reference on: the first {@link heldCount} entries. */
  private readonly held: (Mapping | null)[] = [];
  private heldCount = 0;

  /**
   * Maps bytes `[from, from + length)` of `e`'s device-writable part (`writable`) or
   * device-readable part. False (holding nothing) if the range runs past the part, or some of it
   * is outside every map, lacks the access the device needs, or lost its memory.
   */
  map(dma: DmaSpace, e: VirtqElement, writable: boolean, from: number, length: number): boolean {
    this.release();
    this.length = length;
    if (length === 0) return true;
    let i = e.seek(writable, from);
    if (i < 0) return false;
    const end = writable ? e.count : e.readableCount;
    let off = e.segOff;
    let rest = length;
    while (rest > 0) {
      if (i >= end) return this.fail();
      const n = Math.min(e.len[i]! - off, rest);
      if (n > 0) {
        const addr = e.addr[i]!;
        if (addr < 0) return this.fail();
        this.addRange(addr + off, n);
      }
      rest -= n;
      off = 0;
      i++;
    }
    for (let r = 0; r < this.ranges; r++) {
      let at = this.iova[r]!;
      let left = this.lens[r]!;
      while (left > 0) {
        const region = dma.find(at);
        if (region === null) return this.fail();
        if (region.mapping === null) return this.checkBounce(dma, writable);
        const n = Math.min(left, region.iova + region.size - at, Mapping.MAX_VIEW);
        if (!usable(region, at, n, writable)) return this.fail();
        let view: Buffer;
        try {
          view = dma.view(at, n, writable);
          region.mapping.acquire();
        } catch {
          return this.fail();
        }
        this.views[this.count++] = view;
        this.held[this.heldCount++] = region.mapping;
        at += n;
        left -= n;
      }
    }
    return true;
  }

  /** The views as an array of their own (for scatter/gather backends; allocates). */
  list(): Buffer[] {
    return this.views.slice(0, this.count);
  }

  /** True if a map the views use lost its memory since (the data moved is garbage). */
  poisoned(dma: DmaSpace): boolean {
    let hit = false;
    for (let i = 0; i < this.heldCount; i++) if (this.held[i]!.poisoned) hit = true;
    if (hit) for (let r = 0; r < this.ranges; r++) dma.isPoisoned(this.iova[r]!);
    return hit;
  }

  /** Copies the guest data into `dst` (bounced reads of device-readable data). */
  async gather(dma: DmaSpace, dst: Buffer): Promise<void> {
    let done = 0;
    for (let r = 0; r < this.ranges; r++) {
      const n = this.lens[r]!;
      await dma.read(this.iova[r]!, dst.subarray(done, done + n));
      done += n;
    }
  }

  /** Copies `src` into the guest ranges (bounced writes of device-writable data). */
  async scatter(dma: DmaSpace, src: Buffer): Promise<void> {
    let done = 0;
    for (let r = 0; r < this.ranges; r++) {
      const n = this.lens[r]!;
      await dma.write(this.iova[r]!, src.subarray(done, done + n));
      done += n;
    }
  }

  /** Drops every view and reference (idempotent). */
  release(): void {
    this.dropHeld();
    this.ranges = 0;
    this.bounced = false;
  }

  private dropHeld(): void {
    for (let i = 0; i < this.heldCount; i++) {
      try {
        this.held[i]!.release();
      } catch {
        // already released by a forced unmap
      }
      this.held[i] = null;
    }
    for (let i = 0; i < this.count; i++) this.views[i] = EMPTY;
    this.heldCount = 0;
    this.count = 0;
  }

  private addRange(iova: number, n: number): void {
    const r = this.ranges;
    if (r > 0 && this.iova[r - 1]! + this.lens[r - 1]! === iova) {
      this.lens[r - 1]! += n;
      return;
    }
    this.iova[r] = iova;
    this.lens[r] = n;
    this.ranges = r + 1;
  }

  private fail(): boolean {
    this.release();
    return false;
  }

  /** Some data is in a message-only map: check every piece is mapped with the access, then bounce. */
  private checkBounce(dma: DmaSpace, writable: boolean): boolean {
    const ranges = this.ranges;
    this.dropHeld();
    if (!dma.enabled) return this.fail();
    for (let r = 0; r < ranges; r++) {
      let at = this.iova[r]!;
      const end = at + this.lens[r]!;
      while (at < end) {
        const region = dma.find(at);
        if (region === null) return this.fail();
        const n = Math.min(end, region.iova + region.size) - at;
        if (region.mapping === null ? (region.flags & (writable ? DmaMapFlags.WRITE : DmaMapFlags.READ)) === 0 : !usable(region, at, n, writable)) return this.fail();
        at += n;
      }
    }
    this.bounced = true;
    return true;
  }
}
