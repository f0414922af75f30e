/**
 * {@link IoUring}: positional file I/O through one io_uring, for block backends.
 *
 * Requests go into preallocated slots (the slot index is the kernel's user_data); every request
 * prepared in one turn of the event loop is submitted with a single io_uring_enter from a
 * setImmediate, so a device that handles a whole poll phase's worth of doorbells costs one system
 * call. (Not a microtask: page-cache hits complete inside the submit, and a caller that reads in a
 * loop would then never let the event loop turn.)
 * Completions are reaped right after the submit (page-cache hits complete inline) and, for what
 * the kernel finishes later, when the ring fd turns readable (a libuv poll watcher, started only
 * while requests are in flight so an idle ring never keeps the process alive).
 *
 * Buffers are written to or read from in place, with no copy; the ring holds a reference to them
 * until their completion, and the caller must keep the memory mapped that long.
 */
import * as fs from 'node:fs';
import { binding, systemError, type NativeConstants, type NativeIoUring, type Poller } from './binding';

/** fallocate and pwritev2 flags for {@link IoUring.fallocate} and {@link IoUring.write}. */
export const uringConstants: Pick<NativeConstants, 'RWF_DSYNC' | 'FALLOC_FL_KEEP_SIZE' | 'FALLOC_FL_PUNCH_HOLE' | 'FALLOC_FL_ZERO_RANGE'> = binding.constants;

/** Most buffers one vectored request takes (IOV_MAX). */
export const URING_MAX_IOVECS = 1024;

/** One request's state, allocated once per slot and reused. */
class Slot {
  resolve: (result: number) => void = noop;
  reject: (err: Error) => void = noop;
  /** The buffers the kernel reads or writes, referenced until the completion. */
  hold: unknown = null;
  syscall = '';
  /** The Promise executor, bound once so that starting a request allocates no closure. */
  readonly capture = (resolve: (result: number) => void, reject: (err: Error) => void): void => {
    this.resolve = resolve;
    this.reject = reject;
  };
}

function noop(): void {}

/** How often a failed ring's CQ is read for the requests the kernel still had. */
const ORPHAN_REAP_MS = 1;

export class IoUring {
  readonly #ring: NativeIoUring;
  readonly #slots: Slot[];
  /** Free slot indexes, a stack. */
  readonly #free: Int32Array;
  #freeCount: number;
  /** (slot, result) pairs filled by reap. */
  readonly #completions: Int32Array;
  /** Requests waiting for a free slot (only when more than `entries` are in flight). */
  readonly #waiting: Array<(err?: Error) => void> = [];
  #inFlight = 0;
  /** Slots prepared and not yet taken by the kernel, oldest first: a FIFO of `#unsubmitted` from `#queueHead`. */
  readonly #queue: Int32Array;
  #queueHead = 0;
  #unsubmitted = 0;
  /** After a ring failure: reads the requests the kernel still had off the CQ ring until none are left. */
  #orphanReaper: NodeJS.Timeout | null = null;
  #failure: Error | null = null;
  #submitScheduled = false;
  #poller: Poller | null = null;
  #polling = false;
  #closed = false;
  #closing: Promise<void> | null = null;
  #drained: (() => void) | null = null;
  readonly #submitBound = (): void => this.#submit();

  private constructor(ring: NativeIoUring) {
    this.#ring = ring;
    const n = ring.entries;
    this.#slots = Array.from({ length: n }, () => new Slot());
    this.#free = Int32Array.from({ length: n }, (_, i) => n - 1 - i);
    this.#freeCount = n;
    this.#completions = new Int32Array(4 * n);
    this.#queue = new Int32Array(n);
  }

  /**
   * A new ring of `entries` slots (rounded up to a power of two by the kernel). Throws the
   * io_uring_setup error (ENOSYS: no io_uring in this kernel; EPERM: disabled by
   * kernel.io_uring_disabled or a seccomp filter); {@link IoUring.unavailableReason} words it.
   */
  static open(entries = 256): IoUring {
    return new IoUring(new binding.IoUring(entries));
  }

  /** A one-line reason io_uring cannot be used, from the error {@link IoUring.open} threw. */
  static unavailableReason(err: unknown): string {
    const e = err as NodeJS.ErrnoException;
    if (e?.code === 'ENOSYS') return 'io_uring unavailable: the kernel has no io_uring (ENOSYS)';
    if (e?.code === 'EPERM' || e?.code === 'EACCES') {
      let sysctl = '';
      try {
        sysctl = fs.readFileSync('/proc/sys/kernel/io_uring_disabled', 'utf8').trim();
      } catch {
        // Older kernels have no such sysctl: then a seccomp filter or an LSM refused.
      }
      const why = sysctl !== '' && sysctl !== '0' ? `kernel.io_uring_disabled=${sysctl}` : 'refused by the kernel (seccomp or LSM)';
      return `io_uring unavailable: ${why} (${e.code})`;
    }
    return `io_uring unavailable: ${e?.message ?? String(err)}`;
  }

  /** Slots: at most this many requests are with the kernel at once (more wait their turn). */
  get entries(): number {
    return this.#ring.entries;
  }

  /**
   * The error the ring failed with (it then takes no requests; see the failure handling in the
   * source), or null while it works. Users fall back to another engine.
   */
  get failure(): Error | null {
    return this.#failure;
  }

  /** Requests submitted or queued and not yet completed. */
  get inFlight(): number {
    return this.#inFlight + this.#waiting.length;
  }

  /** pread into `bufs` (one buffer, or up to {@link URING_MAX_IOVECS} back to back). Resolves with the bytes read. */
  read(fd: number, position: number, bufs: Uint8Array | readonly Uint8Array[]): Promise<number> {
    const slot = this.#take();
    if (slot < 0) return this.#later(() => this.read(fd, position, bufs));
    try {
      this.#ring.prepRw(slot, false, fd, position, bufs, 0);
    } catch (err) {
      this.#give(slot);
      throw err;
    }
    return this.#started(slot, bufs, 'read');
  }

  /** pwritev2 of `bufs` with `rwFlags` (e.g. RWF_DSYNC). Resolves with the bytes written. */
  write(fd: number, position: number, bufs: Uint8Array | readonly Uint8Array[], rwFlags = 0): Promise<number> {
    const slot = this.#take();
    if (slot < 0) return this.#later(() => this.write(fd, position, bufs, rwFlags));
    try {
      this.#ring.prepRw(slot, true, fd, position, bufs, rwFlags);
    } catch (err) {
      this.#give(slot);
      throw err;
    }
    return this.#started(slot, bufs, 'write');
  }

  /** fdatasync (or fsync with `datasync` false). */
  fsync(fd: number, datasync = true): Promise<number> {
    const slot = this.#take();
    if (slot < 0) return this.#later(() => this.fsync(fd, datasync));
    this.#ring.prepFsync(slot, fd, datasync);
    return this.#started(slot, null, datasync ? 'fdatasync' : 'fsync');
  }

  /** fallocate(fd, mode, offset, length) with FALLOC_FL_* `mode`. */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<number> {
    const slot = this.#take();
    if (slot < 0) return this.#later(() => this.fallocate(fd, mode, offset, length));
    try {
      this.#ring.prepFallocate(slot, fd, mode, offset, length);
    } catch (err) {
      this.#give(slot);
      throw err;
    }
    return this.#started(slot, null, 'fallocate');
  }

  /**
   * Waits for every request to complete, then tears the ring down. Idempotent; requests started
   * once it has resolved throw.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.inFlight > 0 || this.#orphanReaper !== null) await new Promise<void>((resolve) => (this.#drained = resolve));
      this.#closed = true;
      this.#poller?.close();
      this.#poller = null;
      this.#ring.close();
    })();
    return this.#closing;
  }

  #take(): number {
    if (this.#closed) throw new Error('IoUring is closed');
    return this.#freeCount > 0 ? this.#free[--this.#freeCount]! : -1;
  }

  #give(slot: number): void {
    this.#free[this.#freeCount++] = slot;
  }

  #later(start: () => Promise<number>): Promise<number> {
    return new Promise((resolve, reject) =>
      this.#waiting.push((err?: Error) => {
        if (err) return reject(err);
        try {
          start().then(resolve, reject);
        } catch (e) {
          reject(e as Error);
        }
      }),
    );
  }

  #started(slot: number, hold: unknown, syscall: string): Promise<number> {
    const s = this.#slots[slot]!;
    s.hold = hold;
    s.syscall = syscall;
    this.#inFlight++;
    this.#queue[(this.#queueHead + this.#unsubmitted) % this.#queue.length] = slot;
    this.#unsubmitted++;
    if (!this.#submitScheduled) {
      this.#submitScheduled = true;
      setImmediate(this.#submitBound);
    }
    return new Promise(s.capture);
  }

  #submit(): void {
    this.#submitScheduled = false;
    if (this.#unsubmitted === 0) return;
    let left: number;
    try {
      left = this.#ring.submit();
    } catch (err) {
      this.#fail(err as Error);
      return;
    }
    this.#queueHead = (this.#queueHead + this.#unsubmitted - left) % this.#queue.length;
    this.#unsubmitted = left;
    this.#reap();
    // A kernel short of resources took only part of the batch: try the rest on the next turn.
    if (left > 0 && !this.#submitScheduled) {
      this.#submitScheduled = true;
      setImmediate(this.#submitBound);
    }
    this.#watch();
  }

  /** Settles every completion the kernel has posted. */
  #reap(): void {
    const out = this.#completions;
    const capacity = out.length >> 1;
    for (;;) {
      const n = this.#ring.reap(out);
      for (let i = 0; i < n; i++) this.#settle(out[2 * i]!, out[2 * i + 1]!);
      if (n < capacity) break;
    }
    this.#startWaiting();
  }

  /** Ends a request: with its completion's `result`, or rejected with `failure` (never run). */
  #settle(slot: number, result: number, failure: Error | null = null): void {
    const s = this.#slots[slot]!;
    const { resolve, reject, syscall } = s;
    s.hold = null;
    s.resolve = noop;
    s.reject = noop;
    this.#give(slot);
    this.#inFlight--;
    if (failure !== null) reject(failure);
    else if (result >= 0) resolve(result);
    else reject(systemError(-result, syscall));
  }

  #startWaiting(): void {
    while (this.#freeCount > 0 && this.#waiting.length > 0) this.#waiting.shift()!();
    if (this.inFlight === 0 && this.#orphanReaper === null && this.#drained !== null) {
      const drained = this.#drained;
      this.#drained = null;
      drained();
    }
  }

  /** Watches the ring fd while requests are with the kernel; stops when none are. */
  #watch(): void {
    const wanted = this.#inFlight > this.#unsubmitted;
    if (wanted === this.#polling) return;
    if (this.#poller === null) {
      this.#poller = new binding.Poller(this.#ring.fd, (status) => {
        if (status < 0) {
          this.#fail(Object.assign(new Error(`poll failed on io_uring fd (status ${status})`), { errno: -status, syscall: 'uv_poll' }));
          return;
        }
        this.#reap();
        this.#watch();
      });
    }
    if (wanted) this.#poller.start(binding.pollEvents.READABLE);
    else this.#poller.stop();
    this.#polling = wanted;
  }

  /**
   * The ring itself failed (io_uring_enter or its poll watcher, which only a closed ring fd
   * explains): it takes no more requests. Those the kernel never took, and those waiting for a
   * slot, are rejected now. Those it took may still be reading or writing their buffers (io-wq
   * works on, whatever became of the fd), so they stay pending, their buffers held, until their
   * completions turn up in the CQ ring, which stays mapped and is read here without the fd:
   * rejecting them early would let the caller reuse or unmap memory the kernel still writes, or
   * report a write failed that still lands on disk.
   */
  #fail(err: Error): void {
    this.#closed = true;
    this.#failure = err;
    this.#poller?.close();
    this.#poller = null;
    this.#polling = false;
    // (The native ring is still open: close() releases it only once nothing is in flight.)
    const never = Math.min(this.#unsubmitted, this.#ring.unconsumed());
    for (let i = this.#unsubmitted - never; i < this.#unsubmitted; i++) {
      this.#settle(this.#queue[(this.#queueHead + i) % this.#queue.length]!, 0, err);
    }
    this.#unsubmitted = 0;
    for (const waiter of this.#waiting.splice(0)) waiter(err);
    if (this.#inFlight === 0) return this.#startWaiting();
    this.#orphanReaper = setInterval(() => {
      this.#reap();
      if (this.#inFlight > 0) return;
      clearInterval(this.#orphanReaper!);
      this.#orphanReaper = null;
      this.#startWaiting();
    }, ORPHAN_REAP_MS);
  }
}

/** An Error shaped like the addon's (and Node's) system errors: code, errno (positive), syscall. */
