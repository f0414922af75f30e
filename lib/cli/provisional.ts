/**
 * The files `vfio-user serve` makes before its server is up (the `--file` backing store, the
 * `--trace` log), kept track of so that a start that fails — a bad option found late, a socket
 * that cannot be bound — leaves nothing behind: a file it created is removed, a file it grew is
 * cut back to its old size.
 */
import * as fs from 'node:fs';
import { FileBackend, type FileBackendOptions } from '../block';

export class Provisional {
  #created: string[] = [];
  #grown: { path: string; size: number }[] = [];

  /** Opens `file` for appending trace lines. */
  openTrace(file: string): number {
    const existed = fs.existsSync(file);
    const fd = fs.openSync(file, 'a');
    if (!existed) this.#created.push(file);
    return fd;
  }

  /**
   * Opens `file` as the backing store of a disk of `size` bytes (undefined: the file's own size,
   * for an existing file or block device). Creating a file needs a size; the size must be a whole
   * number of `blockSize` blocks.
   */
  openBacking(file: string, options: { size: number | undefined; blockSize: number; readOnly?: boolean } & Pick<FileBackendOptions, 'engine' | 'direct'>): FileBackend {
    const { size, blockSize, readOnly = false, engine, direct } = options;
    let before: fs.Stats | null = null;
    try {
      before = fs.statSync(file);
    } catch {
      // Created below, if --size says how large.
    }
    if (size === undefined && before === null) throw new Error(`--file ${file} does not exist: give --size to create it`);
    if (size === undefined && before !== null && before.isFile() && before.size === 0) throw new Error(`--file ${file} is empty: give --size to size it`);
    if (size !== undefined) checkBlockMultiple(`--size ${String(size)}`, size, blockSize);
    let backend: FileBackend;
    try {
      backend = FileBackend.open(file, { ...(size === undefined ? {} : { size }), readOnly, ...(engine !== undefined ? { engine } : {}), ...(direct !== undefined ? { direct } : {}) });
    } catch (err) {
      if (before === null) fs.rmSync(file, { force: true });
      throw err;
    }
    if (before === null) this.#created.push(file);
    else if (before.isFile() && before.size < backend.size) this.#grown.push({ path: file, size: before.size });
    try {
      if (size === undefined) checkBlockMultiple(`the size of ${file} (${String(backend.size)} bytes)`, backend.size, blockSize);
    } catch (err) {
      void backend.close();
      throw err;
    }
    return backend;
  }

  /** The start failed: undo what was made. Best effort; never throws. */
  rollback(): void {
    for (const file of this.#created.splice(0)) fs.rmSync(file, { force: true });
    for (const { path, size } of this.#grown.splice(0)) {
      try {
        fs.truncateSync(path, size);
      } catch {
        // Left as it is: nothing more to do.
      }
    }
  }
}

/** Throws a message naming the block size when `size` is not a whole number of blocks. */
export function checkBlockMultiple(what: string, size: number, blockSize: number): void {
  if (size % blockSize !== 0) {
    const down = size - (size % blockSize);
    const hint = down > 0 ? ` (${String(down)} or ${String(down + blockSize)} would do)` : '';
    throw new Error(`${what} is not a multiple of the block size, ${String(blockSize)} bytes${hint}`);
  }
}
