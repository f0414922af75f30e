/**
 * A shared memory mapping of an fd, seen from JS as an ArrayBuffer (and a zero-copy Buffer).
 *
 * Lifetime rules (design.md, "Rules that keep it safe"): code that uses the memory across an
 * await (device I/O, a pending fs call) holds a reference with {@link Mapping.acquire} and drops it
 * with {@link Mapping.release}. {@link Mapping.unmap} refuses new references, waits until the count
 * is 0, then detaches the ArrayBuffer (every view of it reads as length 0) and unmaps, so no view
 * and no in-flight operation can touch unmapped memory. {@link Mapping.unmapNow} skips the wait.
 * A Mapping that is never unmapped is unmapped when its ArrayBuffer is garbage-collected.
 *
 * Size: one ArrayBuffer (and one Buffer) holds at most {@link Mapping.MAX_WINDOW} bytes (4 GiB, V8's
 * and Node's limit). A longer mapping is made of overlapping windows: window k maps
 * `[k * STRIDE, k * STRIDE + MAX_WINDOW)` with STRIDE = MAX_WINDOW / 2, so any range of up to
 * {@link Mapping.MAX_VIEW} bytes lies whole inside one window and {@link Mapping.view} is zero-copy
 * for it. The overlap costs address space only: both windows map the same pages of the file.
 *
 * Truncation: if the file shrinks under the mapping (a peer truncates memory it shared), touching
 * the lost pages would raise SIGBUS. The addon's guard replaces the mapping with zero pages
 * instead and marks it {@link Mapping.poisoned}: the access completes with garbage, and the
 * owner must treat the I/O that touched it as failed.
 */
import * as fs from 'node:fs';
import { markAsUntransferable } from 'node:worker_threads';

import { binding } from './binding';
import { Fd } from './fd';

export type MappingState = 'mapped' | 'unmapping' | 'unmapped';

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const MAX_WINDOW = 2 ** 32;
const STRIDE = MAX_WINDOW / 2;
/** The guard's counter for this thread's environment: changes whenever a mapping is poisoned. */
const faultEpoch = binding.faultEpoch;

export class Mapping {
  /** The most bytes one ArrayBuffer (window) of a mapping holds. */
  static readonly MAX_WINDOW = MAX_WINDOW;
  /** The longest range {@link Mapping.view} always returns as one zero-copy Buffer. */
  static readonly MAX_VIEW = STRIDE;

  /** Offset of the mapping in the file. */
  readonly offset: bigint;
  /** Length in bytes. */
  readonly length: number;
  /** The protection it was mapped with (`constants.PROT_*`). */
  readonly prot: number;

  /** Window k starts at byte k * STRIDE of the mapping. */
  #windows: ArrayBuffer[];
  #bytes: (Buffer | undefined)[];
  #epoch = faultEpoch[0]!;
  #poisoned = false;
  #refs = 0;
  #state: MappingState = 'mapped';
  #done: Promise<void> | undefined;
  #resolve: (() => void) | undefined;
  #reject: ((err: unknown) => void) | undefined;

  private constructor(windows: ArrayBuffer[], offset: bigint, length: number, prot: number) {
    this.#windows = windows;
    this.#bytes = new Array<Buffer | undefined>(windows.length);
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
   * crash). A file that shrinks after it was mapped poisons the mapping ({@link Mapping.poisoned});
   * seal memfds against shrinking (F_SEAL_SHRINK) so that it cannot happen.
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
    const windows: ArrayBuffer[] = [];
    try {
      for (let at = 0; ; at += STRIDE) {
        const size = Math.min(MAX_WINDOW, length - at);
        const where = start + BigInt(at);
        // The addon takes a Number offset only while it is exact; larger ones go as BigInt.
        const buffer = binding.mmap(raw, where <= MAX_SAFE ? Number(where) : where, size, prot);
        // An external buffer moved to another thread would outlive this Mapping's bookkeeping.
        markAsUntransferable(buffer);
        windows.push(buffer);
        if (at + size === length) break;
      }
    } catch (err) {
      for (const w of windows) binding.munmap(w);
      throw err;
    }
    return new Mapping(windows, start, length, prot);
  }

  /** The mapped memory, for a mapping of at most {@link Mapping.MAX_WINDOW} bytes. Throws once unmapped. */
  get buffer(): ArrayBuffer {
    this.#assertUsable();
    this.#assertOneWindow();
    return this.#windows[0]!;
  }

  /**
   * A Buffer over the whole mapping (zero-copy, created once), for a mapping of at most
   * {@link Mapping.MAX_WINDOW} bytes (use {@link Mapping.view} for longer ones). Throws once unmapped.
   */
  get bytes(): Buffer {
    this.#assertUsable();
    this.#assertOneWindow();
    return this.window(0);
  }

  /**
   * A zero-copy Buffer over `[start, start + length)` of the mapping. Any range of at most
   * {@link Mapping.MAX_VIEW} bytes works whatever the mapping's size; a longer one only within one
   * window (RangeError otherwise: split it). Throws once unmapped, RangeError outside the mapping.
   */
  view(start: number, length: number): Buffer {
    const k = this.locate(start, length);
    const base = k * STRIDE;
    return this.window(k).subarray(start - base, start - base + length);
  }

  /**
   * The window holding all of `[start, start + length)`: its bytes are {@link Mapping.window}(k),
   * starting at byte `k * MAX_VIEW` of the mapping. For copies on hot paths that take offsets and
   * so need no subarray. Same rules and errors as {@link Mapping.view}.
   */
  locate(start: number, length: number): number {
    this.#assertUsable();
    if (!(start >= 0 && length >= 0 && start + length <= this.length)) {
      throw new RangeError(`range [${start}, ${start + length}) is outside the mapping (${this.length} bytes)`);
    }
    const k = Math.min(Math.floor(start / STRIDE), this.#windows.length - 1);
    if (start + length - k * STRIDE > this.#windows[k]!.byteLength) {
      throw new RangeError(`range [${start}, ${start + length}) spans two windows; split it at ${STRIDE}-byte boundaries`);
    }
    return k;
  }

  /** Window `k` as a Buffer (zero-copy, created once); see {@link Mapping.locate}. */
  window(k: number): Buffer {
    this.#assertUsable();
    return (this.#bytes[k] ??= Buffer.from(this.#windows[k]!));
  }

  /**
   * True once the file shrank under the mapping and the SIGBUS guard replaced its pages with zeros
   * (reads of it since then saw zeros; writes went nowhere). Cheap while nothing was poisoned
   * anywhere in this thread: one integer compare.
   */
  get poisoned(): boolean {
    if (this.#poisoned || this.#epoch === faultEpoch[0]) return this.#poisoned;
    this.#epoch = faultEpoch[0]!;
    if (this.#state !== 'unmapped') this.#poisoned = this.#windows.some((w) => binding.mmapPoisoned(w));
    return this.#poisoned;
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
    this.#bytes.fill(undefined);
    let failure: unknown = null;
    for (const w of this.#windows) {
      try {
        binding.munmap(w);
      } catch (err) {
        failure ??= err;
      }
    }
    if (failure !== null) {
      if (!this.#reject) throw failure;
      this.#reject(failure);
      return;
    }
    this.#resolve?.();
  }

  #assertOneWindow(): void {
    if (this.#windows.length > 1) {
      throw new RangeError(`a mapping of ${this.length} bytes has no single Buffer (the most is ${MAX_WINDOW}): use view()`);
    }
  }

  #assertUsable(): void {
    if (this.#state === 'unmapped') {
      throw Object.assign(new Error('the mapping is unmapped'), { code: 'ERR_MAPPING_UNMAPPED' });
    }
  }
}
