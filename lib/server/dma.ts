/**
 * `DmaSpace`: the client's memory as the device sees it (reference §3.2, §3.3, §6.4).
 *
 * The client maps ranges of its DMA address space with DMA_MAP. Ranges that come with an fd are
 * mmap'd here and handed to device code as zero-copy Buffer views; ranges without one are reached
 * with DMA_READ/DMA_WRITE messages through a {@link DmaTransport}. Device I/O that outlives a
 * synchronous turn holds a reference ({@link DmaSpace.acquire}); DMA_UNMAP first makes the range
 * unreachable, then waits for those references, then detaches every view and munmaps. So no view
 * and no pending fs operation can ever touch memory the client has taken back.
 *
 * Trust (docs/architecture.md, "Trust model"): only regular files are mapped (memfd, /dev/shm,
 * hugetlbfs), at page-aligned offsets. A client that truncates a file it mapped here cannot end
 * the process: the addon's SIGBUS guard swaps the lost pages for zeros and poisons the mapping;
 * from then on every DMA to that map fails with EFAULT, and {@link DmaSpace.onPoison} is told once
 * (the server disconnects the client). Maps of files sealed against shrinking cannot be poisoned.
 */
import * as fs from 'node:fs';
import { binding } from '../native/binding';
import { Fd } from '../native/fd';
import { Mapping } from '../native/mapping';
import { isSealedAgainstShrinking } from '../native/memfd';
import { DmaMapFlags, Errno } from '../protocol/constants';

/** A dirty bitmap for `size` bytes at `pageSize` granularity (one bit per page). */
function newLog(size: number, pageSize: number): Uint8Array {
  return new Uint8Array(Math.ceil(size / pageSize / 8));
}

/** A device DMA that cannot be done: `errno` says why (ENOENT unmapped, EPERM permission...). */
export class DmaError extends Error {
  override readonly name = 'DmaError';
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

/** How DMA to ranges without an fd reaches the client (DMA_READ / DMA_WRITE messages). */
export interface DmaTransport {
  /** Largest transfer per message (the negotiated max_data_xfer_size). */
  readonly maxTransfer: number;
  read(iova: number, length: number): Promise<Buffer>;
  write(iova: number, data: Uint8Array): Promise<void>;
}

export interface DmaRegion {
  readonly iova: number;
  readonly size: number;
  /** {@link DmaMapFlags} READ / WRITE as the client granted. */
  readonly flags: number;
  /** The mmap of the client's fd, or null for a range reached by messages. */
  readonly mapping: Mapping | null;
  readonly fileOffset: bigint;
  /** Identity of the backing file (st_dev:st_ino), to recognise an identical re-map. */
  readonly fileId: string | null;
  /** The file is sealed against shrinking (F_SEAL_SHRINK): its mapping can never lose pages. */
  readonly sealed: boolean;
}

/** A referenced, zero-copy view of client memory. Call `release()` when the I/O is done. */
export interface DmaBuffer {
  readonly bytes: Buffer;
  release(): void;
}

/**
 * Told of the client's maps (the server sets it from the device's `dmaMapped` / `dmaUnmapped`):
 * `mapped` once a map is in place; `unmapped` once a map is no longer reachable for new DMA but
 * before its memory goes: release what you hold of it; the unmap waits for the promise.
 */
export interface DmaListener {
  mapped(region: DmaRegion): void;
  unmapped(region: DmaRegion): void | Promise<void>;
}

export interface DmaMapRequest {
  iova: bigint;
  size: bigint;
  offset: bigint;
  flags: number;
}

const PAGE = 4096;
/** Largest single map (libvfio-user's limit on 64-bit hosts): ENOSPC above. */
const MAX_MAP_SIZE = 2 ** 43;
/** Largest dirty-tracking page (a client's hint above it is lowered to it). */
const MAX_LOG_PAGE = 2 ** 30;
/** Largest dirty bitmap one DMA_LOGGING_REPORT may ask for. */
const MAX_REPORT_BITMAP = 64 * 1024 * 1024;
const MAX_IOVA = BigInt(Number.MAX_SAFE_INTEGER);
const ACCEPTED_MAP_FLAGS = DmaMapFlags.READ | DmaMapFlags.WRITE | DmaMapFlags.MMAP;

export class DmaSpace {
  /** Sorted by iova, never overlapping. */
  private regions: DmaRegion[] = [];
  /** False while the device may not master the bus (PCI COMMAND.MASTER clear). */
  enabled = true;
  transport: DmaTransport | null = null;
  private logPageSize = 0;
  private readonly dirty = new Map<DmaRegion, Uint8Array>();
  /** DMA_LOGGING_START's ranges (sorted, merged; empty = everything); pages outside are not logged. */
  private logRanges: { start: number; end: number }[] = [];
  /** Maps found poisoned (their file shrank), each reported to {@link onPoison} once. */
  private readonly poisoned = new WeakSet<DmaRegion>();
  /**
   * Called once per map whose file the client truncated under us (see the module doc). The map
   * stays in place, answering EFAULT, until the client unmaps it or goes away.
   */
  onPoison: ((region: DmaRegion) => void) | null = null;
  /** Told of every map added and removed (DMA_MAP, DMA_UNMAP, UNMAP ALL, a client leaving). */
  listener: DmaListener | null = null;

  constructor(readonly maxMaps = 65535) {}

  get count(): number {
    return this.regions.length;
  }

  /** The current maps, in address order. */
  list(): readonly DmaRegion[] {
    return this.regions;
  }

  /**
   * DMA_MAP. Takes ownership of `fd` (closed on every path: a mapping keeps the file alive by
   * itself). Returns 0 or an errno: EINVAL for bad flags, alignment (iova, size and file offset
   * page-aligned), an fd that is not a regular file (shareable memory: memfd, /dev/shm,
   * hugetlbfs; not /dev/zero, a socket or a pipe) or a range past the file's end; EEXIST for an
   * overlap (an identical re-map is accepted as a no-op); ENOSPC past the map limit.
   */
  add(req: DmaMapRequest, fd: Fd | null): number {
    try {
      return this.addOwned(req, fd);
    } finally {
      fd?.close();
    }
  }

  private addOwned(req: DmaMapRequest, fd: Fd | null): number {
    if ((req.flags & ~ACCEPTED_MAP_FLAGS) !== 0 || (req.flags & (DmaMapFlags.READ | DmaMapFlags.WRITE)) === 0) return Errno.EINVAL;
    if ((req.flags & DmaMapFlags.MMAP) !== 0 && fd === null) return Errno.EINVAL;
    if (req.size === 0n || req.iova + req.size > MAX_IOVA) return Errno.EINVAL;
    if (req.size > BigInt(MAX_MAP_SIZE)) return Errno.ENOSPC;
    const iova = Number(req.iova);
    const size = Number(req.size);
    if (iova % PAGE !== 0 || size % PAGE !== 0) return Errno.EINVAL;
    const flags = req.flags & (DmaMapFlags.READ | DmaMapFlags.WRITE);

    let fileId: string | null = null;
    if (fd !== null) {
      if (req.offset % BigInt(PAGE) !== 0n) return Errno.EINVAL;
      const st = fs.fstatSync(fd.value, { bigint: true });
      if (!st.isFile()) return Errno.EINVAL;
      fileId = `${st.dev}:${st.ino}`;
    }
    const at = this.lowerBound(iova);
    const clash = [this.regions[at - 1], this.regions[at]].find((r) => r !== undefined && r.iova < iova + size && iova < r.iova + r.size);
    if (clash !== undefined) {
      const identical = clash.iova === iova && clash.size === size && clash.flags === flags && clash.fileId === fileId && (fd === null || clash.fileOffset === req.offset);
      return identical ? 0 : Errno.EEXIST;
    }
    if (this.regions.length >= this.maxMaps) return Errno.ENOSPC;

    let mapping: Mapping | null = null;
    if (fd !== null) {
      const prot = (flags & DmaMapFlags.READ ? binding.constants.PROT_READ : 0) | (flags & DmaMapFlags.WRITE ? binding.constants.PROT_WRITE : 0);
      try {
        mapping = Mapping.map(fd, req.offset, size, prot);
      } catch {
        // Past the end of the file, or a file that cannot be mapped with these permissions.
        return Errno.EINVAL;
      }
    }
    const sealed = fd !== null && isSealedAgainstShrinking(fd);
    const region: DmaRegion = { iova, size, flags, mapping, fileOffset: fd === null ? 0n : req.offset, fileId, sealed };
    // Only shared maps are logged: writes to message-only maps went through the client.
    if (this.logPageSize > 0 && mapping !== null && this.inLoggedRange(region)) this.dirty.set(region, newLog(size, this.logPageSize));
    this.regions.splice(at, 0, region);
    this.listener?.mapped(region);
    return 0;
  }

  /**
   * DMA_UNMAP of exactly one existing range (ENOENT otherwise). The range is unreachable at once;
   * the promise settles after in-flight references are released and the memory is unmapped.
   */
  async remove(iova: bigint, size: bigint): Promise<number> {
    const i = this.regions.findIndex((r) => BigInt(r.iova) === iova && BigInt(r.size) === size);
    if (i < 0) return Errno.ENOENT;
    const [region] = this.regions.splice(i, 1);
    this.dirty.delete(region!);
    await this.listener?.unmapped(region!);
    await region!.mapping?.unmap();
    return 0;
  }

  /** Unmap everything (DMA_UNMAP ALL, or the client went away). */
  async removeAll(): Promise<void> {
    const all = this.regions;
    this.regions = [];
    this.dirty.clear();
    await Promise.all(
      all.map(async (r) => {
        await this.listener?.unmapped(r);
        await r.mapping?.unmap();
      }),
    );
  }

  /** The region containing `iova`, or null. */
  find(iova: number): DmaRegion | null {
    const r = this.regions[this.lowerBound(iova + 1) - 1];
    return r !== undefined && iova < r.iova + r.size ? r : null;
  }

  /**
   * A zero-copy view of `[iova, iova + length)` for use *now* (no reference is held: do not keep
   * it across an await). Throws {@link DmaError}: EPERM while bus mastering is off or for a
   * permission the client did not grant, ENOENT outside every fd-backed range.
   *
   * Dirty logging: a view for writing is used synchronously, so its pages are logged now (no
   * DMA_LOGGING_REPORT can run before the writes land). I/O that writes later, through a view
   * kept across an await, must say so when it is done: {@link DmaSpace.written}, or the release of
   * {@link DmaSpace.acquire} / {@link DmaSpace.acquireRange}, which do it.
   */
  view(iova: number, length: number, write: boolean): Buffer {
    const region = this.check(iova, length, write);
    if (region.mapping === null) throw new DmaError(Errno.ENOENT, `DMA range 0x${iova.toString(16)}+${length} has no shared memory (message-only map)`);
    if (region.mapping.poisoned) throw this.poisonError(region);
    if (write && this.logPageSize > 0) this.markDirty(region, iova, length);
    return region.mapping.view(iova - region.iova, length);
  }

  /**
   * True if the file behind the map holding `iova` shrank under us (see the module doc): data the
   * device moved through views of it since then is garbage, so the I/O must fail. Reports the map
   * to {@link onPoison} the first time. Cheap while nothing is poisoned (one compare).
   */
  isPoisoned(iova: number): boolean {
    const region = this.find(iova);
    if (region === null || region.mapping === null || !region.mapping.poisoned) return false;
    this.reportPoison(region);
    return true;
  }

  private poisonError(region: DmaRegion): DmaError {
    this.reportPoison(region);
    return new DmaError(Errno.EFAULT, `DMA map 0x${region.iova.toString(16)}+${region.size} lost its memory: the client truncated the file it shared`);
  }

  private reportPoison(region: DmaRegion): void {
    if (this.poisoned.has(region)) return;
    this.poisoned.add(region);
    this.onPoison?.(region);
  }

  /**
   * Like {@link DmaSpace.view}, but holds the range mapped until `release()` (async device I/O).
   * With `write`, the pages are logged dirty again at `release()`: the device's writes land
   * between the two, so a dirty-page report taken meanwhile cannot lose them.
   */
  acquire(iova: number, length: number, write: boolean): DmaBuffer {
    const bytes = this.view(iova, length, write);
    const mapping = this.find(iova)!.mapping!.acquire();
    let released = false;
    return {
      bytes,
      release: () => {
        if (released) return;
        released = true;
        if (write) this.written(iova, length);
        mapping.release();
      },
    };
  }

  /**
   * A scatter/gather list for `[iova, iova + length)`: one zero-copy view per map the range
   * crosses, every map held until `release()`. Throws {@link DmaError} like {@link view} (and
   * ENOENT for a range that touches a message-only map or a gap), holding nothing then.
   */
  acquireRange(iova: number, length: number, write: boolean): { bufs: Buffer[]; release(): void } {
    const bufs: Buffer[] = [];
    const held: Mapping[] = [];
    const release = () => {
      if (held.length === 0) return;
      // Written pages are logged when the writes are done (see acquire()).
      if (write) this.written(iova, length);
      for (const m of held.splice(0)) m.release();
    };
    try {
      for (let at = iova, rest = length; rest > 0; ) {
        const region = this.find(at);
        const n = region === null ? rest : Math.min(rest, region.iova + region.size - at, Mapping.MAX_VIEW);
        bufs.push(this.view(at, n, write));
        held.push(region!.mapping!.acquire());
        at += n;
        rest -= n;
      }
    } catch (err) {
      release();
      throw err;
    }
    return { bufs, release };
  }

  /** True if `[iova, iova + length)` is inside one fd-backed range (so {@link view} works). */
  isShared(iova: number, length: number): boolean {
    const r = this.find(iova);
    return r !== null && r.mapping !== null && iova + length <= r.iova + r.size;
  }

  /** Copy client memory into `dst`, across ranges, by view or by DMA_READ messages. */
  async read(iova: number, dst: Uint8Array): Promise<void> {
    await this.copy(iova, dst, false);
  }

  /** Copy `src` into client memory, across ranges, by view or by DMA_WRITE messages. */
  async write(iova: number, src: Uint8Array): Promise<void> {
    await this.copy(iova, src, true);
  }

  private async copy(iova: number, buf: Uint8Array, write: boolean): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const at = iova + done;
      const region = this.check(at, 1, write);
      const n = Math.min(buf.length - done, region.iova + region.size - at, Mapping.MAX_VIEW);
      const part = buf.subarray(done, done + n);
      if (region.mapping !== null) {
        const view = this.view(at, n, write);
        if (write) view.set(part);
        else part.set(view);
      } else {
        await this.viaMessages(at, part, write);
      }
      done += n;
    }
  }

  private async viaMessages(iova: number, part: Uint8Array, write: boolean): Promise<void> {
    const t = this.transport;
    if (t === null) throw new DmaError(Errno.ENOENT, 'no client connection for message-based DMA');
    for (let off = 0; off < part.length; off += t.maxTransfer) {
      const chunk = part.subarray(off, Math.min(part.length, off + t.maxTransfer));
      if (write) await t.write(iova + off, chunk);
      else {
        const data = await t.read(iova + off, chunk.length);
        if (data.length !== chunk.length) throw new DmaError(Errno.EIO, `DMA_READ returned ${data.length} of ${chunk.length} bytes`);
        chunk.set(data);
      }
    }
  }

  private check(iova: number, length: number, write: boolean): DmaRegion {
    if (!this.enabled) throw new DmaError(Errno.EPERM, 'DMA while bus mastering is disabled');
    if (!Number.isSafeInteger(iova) || iova < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new DmaError(Errno.EINVAL, `bad DMA range 0x${iova.toString(16)}+${length}`);
    }
    const region = this.find(iova);
    if (region === null) throw new DmaError(Errno.ENOENT, `DMA address 0x${iova.toString(16)} is outside every map`);
    if ((region.flags & (write ? DmaMapFlags.WRITE : DmaMapFlags.READ)) === 0) {
      throw new DmaError(Errno.EPERM, `DMA ${write ? 'write to read-only' : 'read from write-only'} map at 0x${iova.toString(16)}`);
    }
    // Only copy() splits a transfer at map boundaries; a view must lie inside one map.
    if (iova + length > region.iova + region.size) {
      throw new DmaError(Errno.ENOENT, `DMA range 0x${iova.toString(16)}+${length} runs past the end of its map`);
    }
    return region;
  }

  /** Index of the first region whose iova is >= `iova`. */
  private lowerBound(iova: number): number {
    let lo = 0;
    let hi = this.regions.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.regions[mid]!.iova < iova) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  // ---- dirty page logging (DEVICE_FEATURE DMA_LOGGING_*, reference §3.16, §5.5) ----

  get logging(): boolean {
    return this.logPageSize > 0;
  }

  /**
   * Start logging pages the device writes through shared memory, in `ranges` only (DMA_LOGGING_START's
   * ranges; none = all memory). Returns the page size used.
   */
  startLogging(pageSize: number, ranges: readonly { iova: number; length: number }[] = []): number {
    const size = Math.min(MAX_LOG_PAGE, Math.max(PAGE, 2 ** Math.ceil(Math.log2(Math.max(pageSize, 1)))));
    this.logPageSize = size;
    this.logRanges = mergeRanges(ranges);
    this.dirty.clear();
    for (const r of this.regions) if (r.mapping !== null && this.inLoggedRange(r)) this.dirty.set(r, newLog(r.size, size));
    return size;
  }

  stopLogging(): void {
    this.logPageSize = 0;
    this.logRanges = [];
    this.dirty.clear();
  }

  /**
   * The device finished writing `[iova, iova + length)` (through views it kept across awaits):
   * log its pages dirty. Cheap when not logging; ranges outside the maps are ignored.
   */
  written(iova: number, length: number): void {
    if (this.logPageSize === 0 || length <= 0) return;
    for (let at = iova, end = iova + length; at < end; ) {
      const region = this.find(at);
      if (region === null) return;
      const n = Math.min(end, region.iova + region.size) - at;
      this.markDirty(region, at, n);
      at += n;
    }
  }

  /** True if some of `region` lies in the logged ranges. */
  private inLoggedRange(region: DmaRegion): boolean {
    if (this.logRanges.length === 0) return true;
    return this.logRanges.some((r) => r.start < region.iova + region.size && region.iova < r.end);
  }

  /**
   * Read and clear the dirty bitmap of `[iova, iova + length)`, which must be exactly one map,
   * at `pageSize` granularity: u64 little-endian words, bit k = page k. Message-only maps report
   * nothing dirty (their writes went through the client, which saw them).
   */
  report(iova: number, length: number, pageSize: number): Buffer | number {
    if (!this.logging) return Errno.EINVAL;
    if (!Number.isSafeInteger(pageSize) || pageSize < 1 || 2 ** Math.round(Math.log2(pageSize)) !== pageSize) return Errno.EINVAL;
    const region = this.find(iova);
    if (region === null || region.iova !== iova || region.size !== length) return Errno.EINVAL;
    const pages = Math.ceil(length / pageSize);
    const bytes = Math.ceil(pages / 64) * 8;
    if (bytes > MAX_REPORT_BITMAP) return Errno.EINVAL;
    const out = Buffer.alloc(bytes);
    const log = this.dirty.get(region);
    if (log === undefined) return out;
    const logPages = Math.ceil(length / this.logPageSize);
    for (let p = 0; p < logPages; p++) {
      // Clean bytes (8 pages) are skipped whole: dirty logs are usually sparse.
      if ((p & 7) === 0 && log[p >> 3] === 0) {
        p += 7;
        continue;
      }
      if ((log[p >> 3]! & (1 << (p & 7))) === 0) continue;
      const first = Math.floor((p * this.logPageSize) / pageSize);
      const last = Math.floor((Math.min(length, (p + 1) * this.logPageSize) - 1) / pageSize);
      for (let k = first; k <= last; k++) out[k >> 3] = out[k >> 3]! | (1 << (k & 7));
    }
    log.fill(0);
    return out;
  }

  private markDirty(region: DmaRegion, iova: number, length: number): void {
    const log = this.dirty.get(region);
    if (log === undefined || length === 0) return;
    const ranges = this.logRanges;
    if (ranges.length === 0) {
      this.markPages(log, region, iova, iova + length);
      return;
    }
    // Only the parts inside START's ranges.
    for (const r of ranges) {
      const start = Math.max(iova, r.start);
      const end = Math.min(iova + length, r.end);
      if (start < end) this.markPages(log, region, start, end);
    }
  }

  private markPages(log: Uint8Array, region: DmaRegion, start: number, end: number): void {
    const first = Math.floor((start - region.iova) / this.logPageSize);
    const last = Math.floor((end - 1 - region.iova) / this.logPageSize);
    for (let p = first; p <= last; p++) log[p >> 3] = log[p >> 3]! | (1 << (p & 7));
  }
}

/** Sorted, merged, non-empty ranges as [start, end). */
function mergeRanges(ranges: readonly { iova: number; length: number }[]): { start: number; end: number }[] {
  const sorted = ranges
    .filter((r) => r.length > 0)
    .map((r) => ({ start: r.iova, end: r.iova + r.length }))
    .sort((a, b) => a.start - b.start);
  const out: { start: number; end: number }[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && r.start <= last.end) last.end = Math.max(last.end, r.end);
    else out.push({ ...r });
  }
  return out;
}
