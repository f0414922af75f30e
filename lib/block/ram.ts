/** {@link RamBackend}: a disk in a sparse memfd mapped into this process. */
import { binding } from '../native/binding';
import { createMemfd } from '../native/memfd';
import { Mapping } from '../native/mapping';
import type { Fd } from '../native/fd';
import { checkRange, readOnlyError, RESOLVED, type BlockBackend } from './backend';

/** Options of {@link RamBackend}. */
export interface RamBackendOptions {
  /** Name of the memfd (shown in /proc/PID/fd). */
  name?: string;
  /** Refuse writes (EROFS); fill the disk through {@link RamBackend.view} first. Default false. */
  readOnly?: boolean;
}

/**
 * A RAM disk: a memfd of `size` bytes mapped shared into this process, so the data lives outside
 * the V8 heap (and could be handed to another process by fd). Every operation completes
 * synchronously and returns an already-resolved promise; flush is a no-op; discarded and zeroed
 * ranges are holes: they read back as zeroes and take no memory.
 */
export class RamBackend implements BlockBackend {
  readonly size: number;
  readonly discardZeroes = true;
  readonly readOnly: boolean;
  #fd: Fd | null;
  #mapping: Mapping | null;

  /**
   * `size` may be anything the address space allows (`--size 1T` works): the memfd is sparse, so
   * only blocks written take memory, and a mapping over 4 GiB is reached through windows.
   */
  constructor(size: number, options: string | RamBackendOptions = {}) {
    if (!Number.isSafeInteger(size) || size <= 0) throw new RangeError(`Expected a RAM backend size > 0, got ${size}`);
    const { name = 'vfio-user-nvme-ram', readOnly = false } = typeof options === 'string' ? { name: options } : options;
    this.size = size;
    this.readOnly = readOnly;
    this.#fd = createMemfd(name, size);
    try {
      this.#mapping = Mapping.map(this.#fd, 0, size);
    } catch (err) {
      this.#fd.close();
      throw err;
    }
  }

  /** The memfd (still owned by the backend), e.g. to inspect or share the disk's bytes. */
  get fd(): Fd {
    if (this.#fd === null) throw new Error('RamBackend is closed');
    return this.#fd;
  }

  /** The whole disk as a Buffer view, for disks of at most 4 GiB (for tests and tools; valid until close). */
  get bytes(): Buffer {
    return this.#live().bytes;
  }

  /** The disk's bytes `[offset, offset + length)` as a zero-copy Buffer (length up to 2 GiB). */
  view(offset: number, length: number): Buffer {
    checkRange(this.size, offset, length);
    return this.#live().view(offset, length);
  }

  read(offset: number, dst: Buffer): Promise<void> {
    checkRange(this.size, offset, dst.length);
    this.#copyOut(offset, dst);
    return RESOLVED;
  }

  readv(offset: number, dsts: readonly Buffer[]): Promise<void> {
    let at = offset;
    for (const dst of dsts) {
      checkRange(this.size, at, dst.length);
      this.#copyOut(at, dst);
      at += dst.length;
    }
    return RESOLVED;
  }

  write(offset: number, src: Buffer, _fua: boolean): Promise<void> {
    if (this.readOnly) return Promise.reject(readOnlyError('the RAM disk'));
    checkRange(this.size, offset, src.length);
    this.#copyIn(offset, src);
    return RESOLVED;
  }

  writev(offset: number, srcs: readonly Buffer[], _fua: boolean): Promise<void> {
    if (this.readOnly) return Promise.reject(readOnlyError('the RAM disk'));
    let at = offset;
    for (const src of srcs) {
      checkRange(this.size, at, src.length);
      this.#copyIn(at, src);
      at += src.length;
    }
    return RESOLVED;
  }

  flush(): Promise<void> {
    return RESOLVED;
  }

  discard(offset: number, length: number): Promise<void> {
    if (this.readOnly) {
      checkRange(this.size, offset, length);
      return RESOLVED; // a hint
    }
    return this.writeZeroes(offset, length, false);
  }

  /**
   * Punches a hole in the memfd: the range reads back as zeros and its memory is given back, so a
   * guest that discards a whole `--size 1T` disk (mkfs does) frees memory instead of filling it.
   */
  writeZeroes(offset: number, length: number, _fua: boolean): Promise<void> {
    if (this.readOnly) return Promise.reject(readOnlyError('the RAM disk'));
    checkRange(this.size, offset, length);
    this.#live();
    if (length > 0) binding.punchHole(this.#fd!.value, offset, length);
    return RESOLVED;
  }

  close(): Promise<void> {
    this.#mapping?.unmapNow();
    this.#mapping = null;
    this.#fd?.close();
    this.#fd = null;
    return RESOLVED;
  }

  #live(): Mapping {
    if (this.#mapping === null) throw new Error('RamBackend is closed');
    return this.#mapping;
  }

  // Copies go through the window holding the range, by offsets: no view is made per I/O.
  #copyOut(offset: number, dst: Buffer): void {
    const m = this.#live();
    for (let done = 0; done < dst.length; ) {
      const n = Math.min(dst.length - done, Mapping.MAX_VIEW);
      const k = m.locate(offset + done, n);
      const at = offset + done - k * Mapping.MAX_VIEW;
      m.window(k).copy(dst, done, at, at + n);
      done += n;
    }
  }

  #copyIn(offset: number, src: Buffer): void {
    const m = this.#live();
    for (let done = 0; done < src.length; ) {
      const n = Math.min(src.length - done, Mapping.MAX_VIEW);
      const k = m.locate(offset + done, n);
      src.copy(m.window(k), offset + done - k * Mapping.MAX_VIEW, done, done + n);
      done += n;
    }
  }
}
