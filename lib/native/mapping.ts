/**
 * A shared memory mapping of an fd, seen from JS as an ArrayBuffer (and a zero-copy Buffer).
 *
 * Lifetime rules (design.md, "Rules that keep it safe"): code that uses the memory across an
 * await (device I/O, a pending fs call) holds a reference with {@link Mapping.acquire} and drops it
 * with {@link Mapping.release}. {@link Mapping.unmap} refuses new references, waits until the count
 * is 0, then detaches the ArrayBuffer (every view of it reads as length 0) and unmaps, so no view
 * and no in-flight operation can touch unmapped memory. {@link Mapping.unmapNow} skips the wait.
 * A Mapping that is never unmapped is unmapped when its ArrayBuffer is garbage-collected.
 */
import * as fs from 'node:fs';
import { markAsUntransferable } from 'node:worker_threads';

import { binding } from './binding';
import { Fd } from './fd';

export type MappingState = 'mapped' | 'unmapping' | 'unmapped';

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

export class Mapping {
  /** Offset of the mapping in the file. */
  readonly offset: bigint;
  /** Length in bytes. */
  readonly length: number;
  /** The protection it was mapped with (`constants.PROT_*`). */
  readonly prot: number;

  #buffer: ArrayBuffer;
  #bytes: Buffer | undefined;
  #refs = 0;
  #state: MappingState = 'mapped';
  #done: Promise<void> | undefined;
  #resolve: (() => void) | undefined;
  #reject: ((err: unknown) => void) | undefined;

  private constructor(buffer: ArrayBuffer, offset: bigint, length: number, prot: number) {
    this.#buffer = buffer;
    this.offset = offset;
    this.length = length;
    this.prot = prot;
  }

  /**
   * Maps `length` bytes of `fd` starting at `offset` (any offset; it need not be page aligned),
   * `MAP_SHARED`. The mapping keeps the file alive by itself: `fd` may be closed afterwards.
   *
   * Throws RangeError if the range ends past the end of a regular file (memfd included), since
   * touching such pages would kill the process with SIGBUS; errors of fstat/mmap (EBADF, EACCES,
   * ENODEV, ...) carry `code`, `errno` and `syscall`.
   *
   * Note: a mapping without PROT_WRITE must not be written through its views (the process would
   * crash), and a peer that shrinks a file after it was mapped can still cause SIGBUS; seal
   * memfds against shrinking (F_SEAL_SHRINK) where that matters.
   */
  static map(
    fd: Fd | number,
    offset: bigint | number,
    length: number,
    prot: number = binding.constants.PROT_READ | binding.constants.PROT_WRITE,
  ): Mapping {
    const raw = fd instanceof Fd ? fd.value : fd;
    if (typeof offset === 'number') {
      if (!Number.isSafeInteger(offset) || offset < 0) {
        throw new RangeError('Expected second argument to be an offset (a Number or BigInt >= 0)');
      }
    } else if (typeof offset !== 'bigint') {
      throw new TypeError('Expected second argument to be an offset (a Number or BigInt >= 0)');
    } else if (offset < 0n) {
      throw new RangeError('Expected second argument to be an offset (a Number or BigInt >= 0)');
    }
    if (typeof length !== 'number') {
      throw new TypeError('Expected third argument to be a length (an integer >= 1)');
    }
    if (!Number.isSafeInteger(length) || length < 1) {
      throw new RangeError('Expected third argument to be a length (an integer >= 1)');
    }
    const start = BigInt(offset);
    const stat = fs.fstatSync(raw, { bigint: true });
    if (stat.isFile() && start + BigInt(length) > stat.size) {
      throw new RangeError(
        `mapping [${start}, ${start + BigInt(length)}) ends past the end of the file (${stat.size} bytes)`,
      );
    }
    // The addon takes a Number offset only while it is exact; larger ones go as BigInt.
    const buffer = binding.mmap(raw, start <= MAX_SAFE ? Number(start) : start, length, prot);
    // An external buffer moved to another thread would outlive this Mapping's bookkeeping.
    markAsUntransferable(buffer);
    return new Mapping(buffer, start, length, prot);
  }

  /** The mapped memory. Throws once unmapped. */
  get buffer(): ArrayBuffer {
    this.#assertUsable();
    return this.#buffer;
  }

  /** A Buffer over the whole mapping (zero-copy, created once). Throws once unmapped. */
  get bytes(): Buffer {
    this.#assertUsable();
    this.#bytes ??= Buffer.from(this.#buffer, 0, this.length);
    return this.#bytes;
  }

  get state(): MappingState {
    return this.#state;
  }

  /** References currently held. */
  get refs(): number {
    return this.#refs;
  }

  /** Takes a reference; the memory stays mapped until it is released. Throws after unmap(). */
  acquire(): this {
    if (this.#state !== 'mapped') {
      throw Object.assign(new Error(`cannot acquire a mapping that is ${this.#state}`), {
        code: 'ERR_MAPPING_UNMAPPED',
      });
    }
    this.#refs++;
    return this;
  }

  /** Drops a reference taken by {@link Mapping.acquire}; the last one completes a pending unmap. */
  release(): void {
    if (this.#refs === 0) throw new Error('Mapping.release() without a matching acquire()');
    this.#refs--;
    if (this.#refs === 0 && this.#state === 'unmapping') this.#finish();
  }

  /**
   * Unmaps once every reference is released. New references are refused from now on.
   * Idempotent: every call returns the same promise.
   */
  unmap(): Promise<void> {
    if (this.#done) return this.#done;
    if (this.#state === 'unmapped') return (this.#done = Promise.resolve());
    this.#done = new Promise<void>((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.#state = 'unmapping';
    if (this.#refs === 0) this.#finish();
    return this.#done;
  }

  /**
   * Unmaps at once, references or not (views held by their owners read as length 0 afterwards).
   * For teardown paths that cannot wait. Idempotent; completes a pending {@link Mapping.unmap}.
   */
  unmapNow(): void {
    if (this.#state === 'unmapped') return;
    this.#finish();
  }

  #finish(): void {
    this.#state = 'unmapped';
    try {
      binding.munmap(this.#buffer);
    } catch (err) {
      if (!this.#reject) throw err;
      this.#reject(err);
      return;
    } finally {
      this.#bytes = undefined;
    }
    this.#resolve?.();
  }

  #assertUsable(): void {
    if (this.#state === 'unmapped') {
      throw Object.assign(new Error('the mapping is unmapped'), { code: 'ERR_MAPPING_UNMAPPED' });
    }
  }
}
