/** {@link FileBackend}: a disk in a regular file or a block device. */
import * as fs from 'node:fs';
import { binding } from '../native/binding';
import { checkRange, readOnlyError, RESOLVED, type BlockBackend } from './backend';

/** Options of {@link FileBackend.open}. */
export interface FileBackendOptions {
  /** Capacity in bytes. Default: the file's size. A smaller file is extended (sparse). */
  size?: number;
  /** Create the file if it does not exist (needs `size`). Default true. */
  create?: boolean;
  /** Open read-only: writes fail with a media error. Default false. */
  readOnly?: boolean;
}

/** Most buffers per readv/writev call (IOV_MAX on Linux). */
const IOV_MAX = 1024;
/** Zeroes written per call by writeZeroes (one shared, never-written buffer). */
const ZERO_CHUNK = 1 << 20;
let zeroChunk: Buffer | null = null;

/**
 * A file (or block device) used as the namespace's storage, with positional scatter/gather I/O
 * straight into the guest's memory views: no intermediate buffer, no copy.
 *
 * Durability: writes land in the page cache; `flush()` and FUA writes call `fdatasync`. Discard
 * punches a hole (fallocate PUNCH_HOLE, freeing the blocks) where the file system can, and is a
 * no-op where it cannot; since that varies, Identify Namespace reports that deallocated blocks
 * read back "not reported".
 */
export class FileBackend implements BlockBackend {
  readonly discardZeroes = false;
  #fd: number;
  #closing: Promise<void> | null = null;

  private constructor(
    fd: number,
    readonly size: number,
    readonly path: string,
    readonly readOnly: boolean,
  ) {
    this.#fd = fd;
  }

  /** Opens (and if needed creates or extends) `path`. Throws the `fs` error if it cannot. */
  static open(path: string, options: FileBackendOptions = {}): FileBackend {
    const readOnly = options.readOnly ?? false;
    const create = (options.create ?? true) && !readOnly;
    const flags = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR | (create ? fs.constants.O_CREAT : 0);
    // libuv opens every file with O_CLOEXEC.
    const fd = fs.openSync(path, flags, 0o600);
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
      return new FileBackend(fd, size, path, readOnly);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  get fd(): number {
    if (this.#fd < 0) throw new Error('FileBackend is closed');
    return this.#fd;
  }

  async read(offset: number, dst: Buffer): Promise<void> {
    checkRange(this.size, offset, dst.length);
    await this.readAll(offset, [dst]);
  }

  async readv(offset: number, dsts: readonly Buffer[]): Promise<void> {
    let at = offset;
    for (let i = 0; i < dsts.length; i += IOV_MAX) {
      const part = dsts.length <= IOV_MAX ? dsts : dsts.slice(i, i + IOV_MAX);
      const length = part.reduce((n, b) => n + b.length, 0);
      checkRange(this.size, at, length);
      await this.readAll(at, part);
      at += length;
    }
  }

  async write(offset: number, src: Buffer, fua: boolean): Promise<void> {
    checkRange(this.size, offset, src.length);
    await this.writeAll(offset, [src]);
    if (fua) await this.flush();
  }

  async writev(offset: number, srcs: readonly Buffer[], fua: boolean): Promise<void> {
    let at = offset;
    for (let i = 0; i < srcs.length; i += IOV_MAX) {
      const part = srcs.length <= IOV_MAX ? srcs : srcs.slice(i, i + IOV_MAX);
      const length = part.reduce((n, b) => n + b.length, 0);
      checkRange(this.size, at, length);
      await this.writeAll(at, part);
      at += length;
    }
    if (fua) await this.flush();
  }

  flush(): Promise<void> {
    const fd = this.fd;
    return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
  }

  discard(offset: number, length: number): Promise<void> {
    checkRange(this.size, offset, length);
    if (this.readOnly || length === 0) return RESOLVED;
    try {
      binding.punchHole(this.fd, offset, length);
    } catch (err) {
      // A hint: a file system without hole punching keeps the data, which is allowed.
      if ((err as NodeJS.ErrnoException).code !== 'EOPNOTSUPP') return Promise.reject(err);
    }
    return RESOLVED;
  }

  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    if (this.readOnly) throw readOnlyError(this.path);
    checkRange(this.size, offset, length);
    zeroChunk ??= Buffer.alloc(ZERO_CHUNK);
    for (let done = 0; done < length; ) {
      const n = Math.min(ZERO_CHUNK, length - done);
      await this.writeAll(offset + done, [zeroChunk.subarray(0, n)]);
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
        const fd = this.#fd;
        this.#fd = -1;
        fs.closeSync(fd);
      }
    })();
    return this.#closing;
  }

  /** readv until every buffer is full; past the end of the file reads as zeroes. */
  private async readAll(offset: number, bufs: readonly Buffer[]): Promise<void> {
    const fd = this.fd;
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

  /** writev until every byte is written. */
  private async writeAll(offset: number, bufs: readonly Buffer[]): Promise<void> {
    const fd = this.fd;
    if (this.readOnly) throw readOnlyError(this.path);
    let list = bufs;
    let at = offset;
    for (;;) {
      const n = await new Promise<number>((resolve, reject) =>
        fs.writev(fd, list as Buffer[], at, (err, bytes) => (err ? reject(err) : resolve(bytes))),
      );
      const rest = advance(list, n);
      if (rest === null) return;
      if (n === 0) throw Object.assign(new Error(`${this.path}: short write`), { code: 'EIO' });
      list = rest;
      at += n;
    }
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
