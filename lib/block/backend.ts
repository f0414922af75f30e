/**
 * Where a disk's blocks live, for every storage device (NVMe namespaces, virtio-blk): a backend
 * knows nothing of the device in front of it. Devices move data straight between a backend and
 * guest memory: `dst`/`src` buffers handed to a backend are zero-copy views of the client's memory
 * (held mapped for the duration of the call), so a backend should read into / write from them
 * directly and must not keep them after its promise settles.
 *
 * - {@link RamBackend}: a memfd of `size` bytes mapped into this process (outside the V8 heap).
 * - {@link FileBackend}: a regular file or block device, positional `readv`/`writev` straight
 *   into and out of the guest views; Flush and FUA writes end in `fdatasync`, so data the guest
 *   was told is durable survives a restart of the server (and of the host, for what the file
 *   system guarantees).
 * - {@link NbdBackend}: an NBD export (qemu-nbd, qemu-storage-daemon, nbdkit), over TCP or a UNIX
 *   socket, with several connections, zero-copy reads and reconnection.
 *
 * Read-only: a backend with `readOnly` rejects writes and zeroing with code EROFS (discard, a
 * hint, does nothing); devices report the disk as write-protected and refuse writes themselves.
 *
 * Errors: a backend rejects with an Error (an `errno`/`code` is welcome); the device turns it into
 * a media error for the command (NVMe: Unrecovered Read Error / Write Fault, counted in the SMART
 * log). It never crashes the device.
 *
 * @packageDocumentation
 */

/** Storage behind a disk. Offsets and lengths are in bytes and always inside `size`. */
export interface BlockBackend {
  /** Capacity in bytes (the disk is `floor(size / blockSize)` blocks). */
  readonly size: number;
  /** Fill `dst` with the bytes at `offset`. */
  read(offset: number, dst: Buffer): Promise<void>;
  /** Store `src` at `offset`; with `fua`, durably before the promise resolves. */
  write(offset: number, src: Buffer, fua: boolean): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  /** The range is no longer needed (a hint; see {@link BlockBackend.discardZeroes}). */
  discard(offset: number, length: number): Promise<void>;
  /** Store zeroes over the range (default: the controller writes zero buffers). */
  writeZeroes?(offset: number, length: number, fua: boolean): Promise<void>;
  /** Scatter read: `dsts` filled back to back from `offset` (default: one read per buffer). */
  readv?(offset: number, dsts: readonly Buffer[]): Promise<void>;
  /** Gather write (default: one write per buffer). */
  writev?(offset: number, srcs: readonly Buffer[], fua: boolean): Promise<void>;
  /** Writes are refused (EROFS); devices report write protection. Default false. */
  readonly readOnly?: boolean;
  /** True if a discarded range reads back as zeroes (reported in Identify Namespace DLFEAT). */
  readonly discardZeroes?: boolean;
  /** Flush and release the storage. Idempotent. */
  close(): Promise<void>;
}

/** An already-settled success, shared by synchronous backends. */
export const RESOLVED: Promise<void> = Promise.resolve();

/** The rejection of a write to a read-only backend. */
export function readOnlyError(what: string): Error {
  return Object.assign(new Error(`${what} is read-only`), { code: 'EROFS' });
}

/** RangeError unless `[offset, offset + length)` lies inside `0..size`. */
export function checkRange(size: number, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new RangeError(`backend range ${offset}+${length} is outside 0..${size}`);
  }
}

/** Zeroes written per call by {@link zeroRange} (one shared buffer that is never written). */
const ZERO_CHUNK = 1 << 20;
let zeroes: Buffer | null = null;

/**
 * Stores zeroes over `[offset, offset + length)`: the backend's own `writeZeroes` when it has
 * one, else plain writes of a shared zero buffer (`fua` on the last of them).
 */
export async function zeroRange(backend: BlockBackend, offset: number, length: number, fua: boolean): Promise<void> {
  if (backend.writeZeroes) return backend.writeZeroes(offset, length, fua);
  zeroes ??= Buffer.alloc(ZERO_CHUNK);
  for (let done = 0; done < length; done += ZERO_CHUNK) {
    const n = Math.min(ZERO_CHUNK, length - done);
    await backend.write(offset + done, zeroes.subarray(0, n), fua && done + n >= length);
  }
}
