/**
 * An owned file descriptor.
 *
 * Every fd in this package has exactly one owner, which closes it exactly once. Ownership is
 * explicit: wrap a number in an `Fd` the moment it is created or received, pass the `Fd` around,
 * and hand the number on with {@link Fd.take} when someone else (another `Fd`, a peer via
 * SCM_RIGHTS after the send completed, Node's `fs`) becomes responsible for it. There is no
 * garbage-collection safety net: an `Fd` that is dropped without `close()` leaks its fd.
 */
import * as fs from 'node:fs';
import { constants as osConstants } from 'node:os';

export class Fd {
  #fd: number;

  /** Takes ownership of `fd` (a non-negative integer). */
  constructor(fd: number) {
    if (!Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) {
      throw new TypeError(`Expected first argument to be a file descriptor (an integer >= 0), got ${String(fd)}`);
    }
    this.#fd = fd;
  }

  /** The fd number. Throws if this object no longer owns it (closed or taken). */
  get value(): number {
    if (this.#fd < 0) throw closedError();
    return this.#fd;
  }

  /** True once closed or taken: this object then owns nothing. */
  get closed(): boolean {
    return this.#fd < 0;
  }

  /**
   * Closes the fd. Idempotent: closing a closed or taken `Fd` does nothing. This object owns
   * nothing afterwards even if `close(2)` reports an error (which is then thrown).
   */
  close(): void {
    const fd = this.#fd;
    if (fd < 0) return;
    this.#fd = -1;
    fs.closeSync(fd);
  }

  /** Transfers ownership: returns the number and leaves this object closed. Throws if closed. */
  take(): number {
    const fd = this.value;
    this.#fd = -1;
    return fd;
  }

  /** Same as {@link Fd.take}: gives up ownership and returns the number. */
  release(): number {
    return this.take();
  }

  toString(): string {
    return this.#fd < 0 ? 'Fd(closed)' : `Fd(${this.#fd})`;
  }

  /**
   * Closes every entry (an `Fd`, a raw fd number, or null/undefined to skip). All are closed even
   * if some fail; the first error is thrown afterwards.
   */
  static closeAll(list: Iterable<Fd | number | null | undefined>): void {
    let first: unknown;
    let failed = false;
    for (const entry of list) {
      if (entry === null || entry === undefined) continue;
      try {
        if (typeof entry === 'number') fs.closeSync(entry);
        else entry.close();
      } catch (err) {
        if (!failed) first = err;
        failed = true;
      }
    }
    if (failed) throw first;
  }
}

function closedError(): Error {
  return Object.assign(new Error('EBADF: this Fd is closed or its fd was taken'), {
    code: 'EBADF',
    errno: osConstants.errno.EBADF,
  });
}
