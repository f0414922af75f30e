/** {@link FileBackend}: a disk in a regular file or a block device. */
import * as fs from 'node:fs';
import { binding } from '../native/binding';
import { IoUring, uringConstants, URING_MAX_IOVECS } from '../native/uring';
import { checkRange, readOnlyError, RESOLVED, type BlockBackend } from './backend';

/** How a {@link FileBackend} reaches its file. */
export type FileEngine = 'io_uring' | 'threadpool' | 'sync';

/** Options of {@link FileBackend.open}. */
export interface FileBackendOptions {
  /** Capacity in bytes. Default: the file's size. A smaller file is extended (sparse). */
  size?: number;
  /** Create the file if it does not exist (needs `size`). Default true. */
  create?: boolean;
  /** Open read-only: writes fail with a media error. Default false. */
  readOnly?: boolean;
  /**
   * 'io_uring': one ring per backend, a system call per batch and no thread hand-off;
   * 'threadpool': Node's fs on libuv's worker threads; 'sync': preadv/pwritev on the event loop's
   * own thread, for files in memory (tmpfs, ramfs), where a read is a copy that never waits.
   * 'auto' (default): io_uring where the kernel allows it, else the thread pool (the reason in
   * {@link FileBackend.engineNote}); for a file in memory, small requests are done in place
   * (see {@link FileBackendOptions.inlineMax}).
   */
  engine?: FileEngine | 'auto';
  /**
   * A request of at most this many bytes that would be alone (nothing else with the engine, none
   * done in place yet this event-loop turn) is done synchronously on the calling thread instead
   * of by the engine. Default: {@link MEMORY_FILE_INLINE_MAX} for a file in memory under 'auto'
   * (the kernel's io_uring hands a tmpfs read to a worker thread: at queue depth 1 that hop costs
   * more than copying a few pages, while with company the workers' parallel copies win), else 0;
   * 'sync' does every request in place.
   */
  inlineMax?: number;
  /**
   * O_DIRECT: bypass the host page cache. A request the kernel refuses for its alignment (EINVAL)
   * is redone through a second, buffered descriptor. Default false.
   */
  direct?: boolean;
}

/** Most buffers per readv/writev call (IOV_MAX on Linux). */
const IOV_MAX = URING_MAX_IOVECS;
/** Zeroes written per call by writeZeroes (one shared, never-written buffer). */
const ZERO_CHUNK = 1 << 20;
let zeroChunk: Buffer | null = null;
/** Slots of each backend's ring: more requests than this wait in JS for a free one. */
const RING_ENTRIES = 256;
/** The requests a file in memory has done in place by default: up to 64 KiB. */
export const MEMORY_FILE_INLINE_MAX = 64 << 10;
/** statfs f_type of the file systems whose files are memory: tmpfs (and /dev/shm), ramfs. */
const MEMORY_FS_TYPES = new Map([
  [0x01021994, 'tmpfs'],
  [0x858458f6, 'ramfs'],
]);

/**
 * A file (or block device) used as the namespace's storage, with positional scatter/gather I/O
 * straight into the guest's memory views: no intermediate buffer, no copy.
 *
 * I/O goes through an io_uring (see {@link FileBackendOptions.engine}); where there is none, through
 * Node's fs and libuv's thread pool.
 *
 * Durability: writes land in the page cache (unless `direct`); `flush()` calls `fdatasync` and FUA
 * writes are `RWF_DSYNC` writes (io_uring) or a write and an `fdatasync` (thread pool). Discard
 * punches a hole (fallocate PUNCH_HOLE, freeing the blocks) where the file system can, and is a
 * no-op where it cannot; since that varies, Identify Namespace reports that deallocated blocks
 * read back "not reported". Write Zeroes is fallocate ZERO_RANGE where supported, else zero writes.
 */
export class FileBackend implements BlockBackend {
  readonly discardZeroes = false;
  /** How I/O reaches the file. */
  readonly engine: FileEngine;
  /** Under 'auto': why the engine is not io_uring, and whether small requests are done in place (one line); else undefined. */
  readonly engineNote: string | undefined;
  #fd: number;
  /** With `direct`: a buffered descriptor for requests O_DIRECT refuses; else the same fd. */
  #bufferedFd: number;
  readonly #ring: IoUring | null;
  /**
   * A request of at most this many bytes that would be alone is done before its call returns
   * (Infinity with the 'sync' engine: every request; 0: none). See {@link FileBackendOptions.inlineMax}.
   */
  readonly inlineMax: number;
  /** Requests with the engine now (see #inPlace). */
  #handedOff = 0;
  #inPlaceThisTurn = false;
  readonly #newTurn = (): void => {
    this.#inPlaceThisTurn = false;
  };
  #closing: Promise<void> | null = null;

  private constructor(
    fd: number,
    bufferedFd: number,
    engine: FileEngine,
    inlineMax: number,
    ring: IoUring | null,
    engineNote: string | undefined,
    readonly size: number,
    readonly path: string,
    readonly readOnly: boolean,
  ) {
    this.#fd = fd;
    this.#bufferedFd = bufferedFd;
    this.#ring = ring;
    this.inlineMax = inlineMax;
    this.engine = engine;
    this.engineNote = engineNote;
  }

  /** Opens (and if needed creates or extends) `path`. Throws the `fs` error if it cannot. */
  static open(path: string, options: FileBackendOptions = {}): FileBackend {
    const readOnly = options.readOnly ?? false;
    const create = (options.create ?? true) && !readOnly;
    const flags = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR | (create ? fs.constants.O_CREAT : 0);
    const direct = options.direct ?? false;
    // libuv opens every file with O_CLOEXEC.
    const fd = fs.openSync(path, flags, 0o600);
    const opened = [fd];
    try {
      const st = fs.fstatSync(fd);
      let size = options.size ?? st.size;
      if (st.isBlockDevice() && options.size === undefined) {
        // fstat reports 0 for block devices; the end offset is the device size.
        size = blockDeviceSize(fd);
      }
      if (!Number.isSafeInteger(size) || size <= 0) throw new RangeError(`${path}: a FileBackend needs a size > 0 (got ${size})`);
      if (st.isFile() && st.size < size) {
        if (readOnly) throw new RangeError(`${path}: the file has ${st.size} bytes, fewer than the size asked for (${size})`);
        fs.ftruncateSync(fd, size);
      }
      let directFd = fd;
      if (direct) {
        // The file exists now; a file system without O_DIRECT (tmpfs before 6.6) says EINVAL.
        directFd = fs.openSync(path, (flags & ~fs.constants.O_CREAT) | fs.constants.O_DIRECT);
        opened.push(directFd);
      }
      const engine = options.engine ?? 'auto';
      let inlineMax = options.inlineMax ?? 0;
      if (!(inlineMax >= 0)) throw new RangeError(`inlineMax must be a byte count >= 0, got ${String(options.inlineMax)}`);
      const memoryFs = engine === 'auto' && options.inlineMax === undefined && st.isFile() ? MEMORY_FS_TYPES.get(fs.statfsSync(path).type) : undefined;
      if (memoryFs !== undefined) inlineMax = MEMORY_FILE_INLINE_MAX;
      if (engine === 'sync') inlineMax = Infinity;
      // The ring comes last: nothing after it can fail.
      let ring: IoUring | null = null;
      let note: string | undefined;
      if (engine === 'io_uring' || engine === 'auto') {
        try {
          ring = IoUring.open(RING_ENTRIES);
        } catch (err) {
          if (engine === 'io_uring') throw err;
          note = IoUring.unavailableReason(err);
        }
      }
      const chosen: FileEngine = ring !== null ? 'io_uring' : engine === 'sync' ? 'sync' : 'threadpool';
      if (memoryFs !== undefined) {
        const inPlace = `a file on ${memoryFs}: a lone request up to ${MEMORY_FILE_INLINE_MAX >> 10} KiB is copied in place`;
        note = note === undefined ? inPlace : `${note}; ${inPlace}`;
      }
      return new FileBackend(directFd, fd, chosen, inlineMax, ring, note, size, path, readOnly);
    } catch (err) {
      for (const f of opened) fs.closeSync(f);
      throw err;
    }
  }

  get fd(): number {
    if (this.#fd < 0) throw new Error('FileBackend is closed');
    return this.#fd;
  }

  /** Opened with O_DIRECT (see {@link FileBackendOptions.direct}). */
  get direct(): boolean {
    return this.#bufferedFd !== this.#fd;
  }

  read(offset: number, dst: Buffer): Promise<void> {
    if (!this.#inPlace(dst.length)) return this.#readChecked(offset, dst);
    try {
      checkRange(this.size, offset, dst.length);
      this.#readInline(offset, dst);
      return RESOLVED;
    } catch (err) {
      return Promise.reject(err as Error);
    }
  }

  readv(offset: number, dsts: readonly Buffer[]): Promise<void> {
    const length = this.inlineMax > 0 && dsts.length <= IOV_MAX ? totalLength(dsts) : Infinity;
    if (!this.#inPlace(length)) return this.#readvChunked(offset, dsts);
    try {
      checkRange(this.size, offset, length);
      this.#readInline(offset, dsts);
      return RESOLVED;
    } catch (err) {
      return Promise.reject(err as Error);
    }
  }

  write(offset: number, src: Buffer, fua: boolean): Promise<void> {
    if (!this.#inPlace(src.length)) return this.#writeChecked(offset, src, fua);
    try {
      checkRange(this.size, offset, src.length);
      this.#writeInline(offset, src);
      return fua ? this.flush() : RESOLVED;
    } catch (err) {
      return Promise.reject(err as Error);
    }
  }

  writev(offset: number, srcs: readonly Buffer[], fua: boolean): Promise<void> {
    const length = this.inlineMax > 0 && srcs.length <= IOV_MAX ? totalLength(srcs) : Infinity;
    if (!this.#inPlace(length)) return this.#writevChunked(offset, srcs, fua);
    try {
      checkRange(this.size, offset, length);
      this.#writeInline(offset, srcs);
      return fua ? this.flush() : RESOLVED;
    } catch (err) {
      return Promise.reject(err as Error);
    }
  }

  /**
   * Whether a request of `length` bytes is done in place: with the 'sync' engine, every one; else
   * one at most `inlineMax` bytes that would be alone, i.e. with nothing handed to the engine and
   * none done in place yet this event-loop turn. With company, the engine's workers copy in
   * parallel with this thread, which beats copying one after the other here.
   */
  #inPlace(length: number): boolean {
    if (length > this.inlineMax) return false;
    if (this.engine === 'sync') return true;
    if (this.#handedOff > 0 || this.#inPlaceThisTurn) return false;
    this.#inPlaceThisTurn = true;
    setImmediate(this.#newTurn);
    return true;
  }

  async #readChecked(offset: number, dst: Buffer): Promise<void> {
    checkRange(this.size, offset, dst.length);
    this.#handedOff++;
    try {
      await this.#read(offset, dst, dst.length);
    } finally {
      this.#handedOff--;
    }
  }

  async #readvChunked(offset: number, dsts: readonly Buffer[]): Promise<void> {
    this.#handedOff++;
    try {
      let at = offset;
      for (let i = 0; i < dsts.length; i += IOV_MAX) {
        const part = dsts.length <= IOV_MAX ? dsts : dsts.slice(i, i + IOV_MAX);
        const length = totalLength(part);
        checkRange(this.size, at, length);
        await this.#read(at, part, length);
        at += length;
      }
    } finally {
      this.#handedOff--;
    }
  }

  async #writeChecked(offset: number, src: Buffer, fua: boolean): Promise<void> {
    checkRange(this.size, offset, src.length);
    this.#handedOff++;
    try {
      await this.#write(offset, src, src.length, fua);
    } finally {
      this.#handedOff--;
    }
  }

  async #writevChunked(offset: number, srcs: readonly Buffer[], fua: boolean): Promise<void> {
    this.#handedOff++;
    try {
      let at = offset;
      for (let i = 0; i < srcs.length; i += IOV_MAX) {
        const part = srcs.length <= IOV_MAX ? srcs : srcs.slice(i, i + IOV_MAX);
        const length = totalLength(part);
        checkRange(this.size, at, length);
        // FUA on every part: each is durable before the next is written, as one write would be.
        await this.#write(at, part, length, fua);
        at += length;
      }
    } finally {
      this.#handedOff--;
    }
  }

  async flush(): Promise<void> {
    const fd = this.fd;
    if (this.engine === 'sync') {
      fs.fdatasyncSync(fd);
      return;
    }
    const ring = this.#liveRing();
    if (ring !== null) {
      await ring.fsync(fd, true);
      return;
    }
    await new Promise<void>((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
  }

  async discard(offset: number, length: number): Promise<void> {
    checkRange(this.size, offset, length);
    if (this.readOnly || length === 0) return;
    const { FALLOC_FL_PUNCH_HOLE, FALLOC_FL_KEEP_SIZE } = uringConstants;
    try {
      const ring = this.#liveRing();
      if (ring !== null) await ring.fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
      else binding.punchHole(this.fd, offset, length);
    } catch (err) {
      // A hint: a file system without hole punching keeps the data, which is allowed.
      if ((err as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') throw err;
    }
  }

  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    if (this.readOnly) throw readOnlyError(this.path);
    checkRange(this.size, offset, length);
    if (length === 0) return;
    const ring = this.#liveRing();
    if (ring !== null && (await this.#zeroRange(ring, offset, length))) {
      if (fua) await this.flush();
      return;
    }
    zeroChunk ??= Buffer.alloc(ZERO_CHUNK);
    for (let done = 0; done < length; ) {
      const n = Math.min(ZERO_CHUNK, length - done);
      await this.#write(offset + done, zeroChunk.subarray(0, n), n, false);
      done += n;
    }
    if (fua) await this.flush();
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#fd < 0) return;
      try {
        if (!this.readOnly) await this.flush();
      } finally {
        // The ring waits for whatever is still in flight before it goes.
        await this.#ring?.close();
        const fd = this.#fd;
        const buffered = this.#bufferedFd;
        this.#fd = -1;
        this.#bufferedFd = -1;
        fs.closeSync(fd);
        if (buffered !== fd) fs.closeSync(buffered);
      }
    })();
    return this.#closing;
  }

  /** Reads `length` bytes into `bufs`; past the end of the file reads as zeroes. */
  async #read(offset: number, bufs: Buffer | readonly Buffer[], length: number): Promise<void> {
    if (this.engine === 'sync') return this.#readInline(offset, bufs);
    const ring = this.#liveRing();
    try {
      if (ring === null) return await readAll(this.fd, offset, asList(bufs));
      const n = await ring.read(this.fd, offset, bufs);
      // Short (end of file, or a signal): the rest the simple way.
      if (n < length) await readAll(this.fd, offset + n, advance(asList(bufs), n)!);
    } catch (err) {
      if (!this.#refusedDirect(err)) throw err;
      await readAll(this.#bufferedFd, offset, asList(bufs));
    }
  }

  /** Writes all `length` bytes of `bufs`, durably with `fua`. */
  async #write(offset: number, bufs: Buffer | readonly Buffer[], length: number, fua: boolean): Promise<void> {
    if (this.engine === 'sync') {
      this.#writeInline(offset, bufs);
      if (fua) await this.flush();
      return;
    }
    if (this.readOnly) throw readOnlyError(this.path);
    const ring = this.#liveRing();
    let fd = this.fd;
    try {
      if (ring === null) {
        await writeAll(fd, offset, asList(bufs), this.path);
      } else {
        const n = await ring.write(fd, offset, bufs, fua ? uringConstants.RWF_DSYNC : 0);
        if (n === length) return;
        await writeAll(fd, offset + n, advance(asList(bufs), n)!, this.path);
      }
    } catch (err) {
      if (!this.#refusedDirect(err)) throw err;
      fd = this.#bufferedFd;
      await writeAll(fd, offset, asList(bufs), this.path);
    }
    if (fua) await this.flush();
  }

  /** A read done in place: complete when it returns. */
  #readInline(offset: number, bufs: Buffer | readonly Buffer[]): void {
    try {
      readAllSync(this.fd, offset, bufs);
    } catch (err) {
      if (!this.#refusedDirect(err)) throw err;
      readAllSync(this.#bufferedFd, offset, bufs);
    }
  }

  /** A write done in place: complete (not yet durable) when it returns. */
  #writeInline(offset: number, bufs: Buffer | readonly Buffer[]): void {
    if (this.readOnly) throw readOnlyError(this.path);
    try {
      writeAllSync(this.fd, offset, bufs, this.path);
    } catch (err) {
      if (!this.#refusedDirect(err)) throw err;
      writeAllSync(this.#bufferedFd, offset, bufs, this.path);
    }
  }

  /** fallocate ZERO_RANGE on the ring; false where the file system cannot (then write zeroes). */
  async #zeroRange(ring: IoUring, offset: number, length: number): Promise<boolean> {
    const { FALLOC_FL_ZERO_RANGE, FALLOC_FL_KEEP_SIZE } = uringConstants;
    try {
      await ring.fallocate(this.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
      return true;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EOPNOTSUPP' || code === 'EINVAL' || code === 'ENODEV') return false;
      throw err;
    }
  }

  /**
   * The ring, or null if there is none or it failed: then requests go to the thread pool (a
   * failed ring still finishes what the kernel took; see IoUring).
   */
  #liveRing(): IoUring | null {
    const ring = this.#ring;
    return ring !== null && ring.failure === null ? ring : null;
  }

  /** An O_DIRECT request refused for its buffers' alignment (redo it buffered). */
  #refusedDirect(err: unknown): boolean {
    return this.#bufferedFd !== this.#fd && (err as NodeJS.ErrnoException | null)?.code === 'EINVAL';
  }
}

function asList(bufs: Buffer | readonly Buffer[]): readonly Buffer[] {
  return Buffer.isBuffer(bufs) ? [bufs] : bufs;
}

function totalLength(bufs: readonly Buffer[]): number {
  let n = 0;
  for (const b of bufs) n += b.length;
  return n;
}

/** readv until every buffer is full; past the end of the file reads as zeroes. */
async function readAll(fd: number, offset: number, bufs: readonly Buffer[]): Promise<void> {
  let list = bufs;
  let at = offset;
  for (;;) {
    const n = await new Promise<number>((resolve, reject) =>
      fs.readv(fd, list as Buffer[], at, (err, bytes) => (err ? reject(err) : resolve(bytes))),
    );
    const rest = advance(list, n);
    if (rest === null) return;
    if (n === 0) {
      for (const b of rest) b.fill(0); // end of file: the sparse tail
      return;
    }
    list = rest;
    at += n;
  }
}

/** readAll on the calling thread; a single buffer takes pread (no array). */
function readAllSync(fd: number, offset: number, bufs: Buffer | readonly Buffer[]): void {
  if (Buffer.isBuffer(bufs)) {
    const n = fs.readSync(fd, bufs, 0, bufs.length, offset);
    if (n === bufs.length) return;
    return readAllSync(fd, offset + n, [bufs.subarray(n)]);
  }
  let list = bufs;
  let at = offset;
  for (;;) {
    const n = fs.readvSync(fd, list as Buffer[], at);
    const rest = n === 0 ? zeroFill(list) : advance(list, n);
    if (rest === null) return;
    list = rest;
    at += n;
  }
}

/** End of file: the sparse tail reads as zeroes. */
function zeroFill(bufs: readonly Buffer[]): null {
  for (const b of bufs) b.fill(0);
  return null;
}

/** writeAll on the calling thread; a single buffer takes pwrite (no array). */
function writeAllSync(fd: number, offset: number, bufs: Buffer | readonly Buffer[], what: string): void {
  let list: readonly Buffer[] | null = Buffer.isBuffer(bufs) ? null : bufs;
  let at = offset;
  if (list === null) {
    const src = bufs as Buffer;
    const n = fs.writeSync(fd, src, 0, src.length, at);
    if (n === src.length) return;
    if (n === 0) throw Object.assign(new Error(`${what}: short write`), { code: 'EIO' });
    list = [src.subarray(n)];
    at += n;
  }
  for (;;) {
    const n = fs.writevSync(fd, list as Buffer[], at);
    const rest = advance(list, n);
    if (rest === null) return;
    if (n === 0) throw Object.assign(new Error(`${what}: short write`), { code: 'EIO' });
    list = rest;
    at += n;
  }
}

/** writev until every byte is written. */
async function writeAll(fd: number, offset: number, bufs: readonly Buffer[], what: string): Promise<void> {
  let list = bufs;
  let at = offset;
  for (;;) {
    const n = await new Promise<number>((resolve, reject) =>
      fs.writev(fd, list as Buffer[], at, (err, bytes) => (err ? reject(err) : resolve(bytes))),
    );
    const rest = advance(list, n);
    if (rest === null) return;
    if (n === 0) throw Object.assign(new Error(`${what}: short write`), { code: 'EIO' });
    list = rest;
    at += n;
  }
}

/** The buffers left after `n` bytes were transferred, or null if all were. */
function advance(bufs: readonly Buffer[], n: number): Buffer[] | null {
  let skip = n;
  let i = 0;
  while (i < bufs.length && skip >= bufs[i]!.length) {
    skip -= bufs[i]!.length;
    i++;
  }
  if (i === bufs.length) return null;
  const rest = bufs.slice(i);
  if (skip > 0) rest[0] = rest[0]!.subarray(skip);
  return rest;
}

/** Size of a block device (fstat says 0 and Node has no lseek): from sysfs, in 512-byte sectors. */
function blockDeviceSize(fd: number): number {
  const dev = fs.readlinkSync(`/proc/self/fd/${fd}`);
  const name = dev.replace(/^\/dev\//, '');
  const sectors = Number(fs.readFileSync(`/sys/class/block/${name}/size`, 'utf8').trim());
  return sectors * 512;
}
