/**
 * Allocation-free access to small structures in the client's memory: virtqueue rings, descriptor
 * tables, request headers and status bytes.
 *
 * {@link DmaSpace.view} returns a new Buffer per call; the virtqueue hot path instead points into
 * the mapping's window Buffer (created once per window) at an offset, so reading a descriptor or
 * writing a status byte allocates nothing. The checks `view()` makes are made here too: bus
 * mastering on, inside one fd-backed map, the access the client granted, not poisoned. While dirty
 * logging is on (migration) writes go through `view()`, which marks the pages dirty.
 *
 * Nothing here throws for a bad address: `locate` answers false, and the caller turns that into a
 * request error or DEVICE_NEEDS_RESET.
 *
 * @packageDocumentation
 */
import { Mapping } from '../native/mapping';
import { DmaMapFlags } from '../protocol/constants';
import type { DmaRegion, DmaSpace } from '../server/dma';

const EMPTY = Buffer.alloc(0);

/** A cursor into guest memory: after a successful {@link GuestMemory.locate}, `buf[off..]`. */
export class GuestMemory {
  buf: Buffer = EMPTY;
  off = 0;

  constructor(readonly dma: DmaSpace) {}

  /**
   * Points {@link buf}/{@link off} at `[iova, iova + length)`. False (and nothing changes) when the
   * range is not inside one shared map with the access (`write`) the client granted, bus
   * mastering is off, the map lost its memory, or `iova` is negative (an address above 2^53).
   */
  locate(iova: number, length: number, write: boolean): boolean {
    const dma = this.dma;
    if (!dma.enabled || iova < 0) return false;
    const region = dma.find(iova);
    if (region === null || !usable(region, iova, length, write)) return false;
    const mapping = region.mapping!;
    if (mapping.poisoned) {
      dma.isPoisoned(iova);
      return false;
    }
    const rel = iova - region.iova;
    try {
      if (write && dma.logging) {
        this.buf = dma.view(iova, length, true);
        this.off = 0;
        return true;
      }
      const k = mapping.locate(rel, length);
      this.buf = mapping.window(k);
      this.off = rel - k * Mapping.MAX_VIEW;
      return true;
    } catch {
      return false;
    }
  }

  /** Copies `[iova, iova + dst.length)` into `dst`; false if unreachable (see {@link locate}). */
  read(iova: number, dst: Uint8Array): boolean {
    if (!this.locate(iova, dst.length, false)) return false;
    dst.set(this.buf.subarray(this.off, this.off + dst.length));
    return true;
  }
}

/** True if `[iova, iova + length)` lies in `region`, which has shared memory and the access. */
export function usable(region: DmaRegion, iova: number, length: number, write: boolean): boolean {
  if (region.mapping === null) return false;
  if ((region.flags & (write ? DmaMapFlags.WRITE : DmaMapFlags.READ)) === 0) return false;
  return length >= 0 && iova + length <= region.iova + region.size;
}

/**
 * A cached view of one ring (descriptor table, available or used ring) that lies whole in one
 * shared map: a Buffer plus a Uint16Array over it for the ordered index accesses. Revalidated on
 * each use with an identity check of the map (one lookup), so a DMA_UNMAP or re-map is noticed
 * and nothing is held between uses. Returns null while the ring cannot be cached (outside the maps,
 * no permission, bus mastering off, dirty logging on); callers then go through {@link GuestMemory}.
 */
export class RingView {
  private region: DmaRegion | null = null;
  private bytes: Buffer | null = null;
  /** 16-bit words over the ring while the cache is valid (null: not 2-byte aligned). */
  u16: Uint16Array | null = null;

  constructor(
    private readonly dma: DmaSpace,
    readonly iova: number,
    readonly length: number,
    private readonly write: boolean,
  ) {}

  /** The ring's bytes, or null if it cannot be cached now. */
  get(): Buffer | null {
    const dma = this.dma;
    if (!dma.enabled || (this.write && dma.logging)) return null;
    const cached = this.bytes;
    if (cached !== null && cached.length !== 0 && dma.find(this.iova) === this.region && !this.region!.mapping!.poisoned) return cached;
    return this.refresh();
  }

  private refresh(): Buffer | null {
    const dma = this.dma;
    this.bytes = null;
    this.u16 = null;
    this.region = null;
    if (this.iova < 0) return null;
    const region = dma.find(this.iova);
    if (region === null || !usable(region, this.iova, this.length, this.write) || region.mapping!.poisoned) return null;
    let view: Buffer;
    try {
      view = dma.view(this.iova, this.length, this.write);
    } catch {
      return null;
    }
    this.region = region;
    this.bytes = view;
    this.u16 = view.byteOffset % 2 === 0 ? new Uint16Array(view.buffer, view.byteOffset, view.length >> 1) : null;
    return view;
  }

  /** Drops the cache (the queue was reset or reconfigured). */
  clear(): void {
    this.region = null;
    this.bytes = null;
    this.u16 = null;
  }
}
