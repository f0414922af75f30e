/**
 * The addon's exact interface, and the one place that loads it.
 *
 * Policy (decided here, once): every function is a thin, synchronous, non-blocking syscall shim.
 * "Would block" (EAGAIN/EWOULDBLOCK) on the data path is a *returned value* (`WOULD_BLOCK`, -1),
 * never an exception, because draining a socket until it is empty is the normal case. Every other
 * failure throws an `Error` carrying `code` (e.g. 'EBADF'), `errno` (positive number) and `syscall`.
 * Argument mistakes throw `TypeError`/`RangeError` ("Expected first argument to be ...").
 * System errors read like Node's own: message 'EBADF: Bad file descriptor, sendmsg'.
 * Every fd the addon creates is close-on-exec; the addon never closes an fd it returned, except on
 * its own error paths (e.g. fds received with a truncated control message).
 */
import * as path from 'node:path';
import { getSystemErrorMap } from 'node:util';

/** `uv_poll` event bits, as reported to a {@link Poller} callback. */
export interface PollEvents {
  readonly READABLE: number;
  readonly WRITABLE: number;
  readonly DISCONNECT: number;
}

/**
 * A libuv poll watcher on one fd. It does not own the fd. While started it keeps itself alive
 * (no JS reference needed); a closed one throws `Error('Poller is closed')` from start/stop, and
 * every method throws TypeError when called on anything but a Poller.
 */
export interface Poller {
  /** Start (or change) watching for `events` (a non-zero mask of {@link PollEvents}). */
  start(events: number): void;
  /** Stop watching; the watcher can be started again. */
  stop(): void;
  /** Stop for good and release the libuv handle; idempotent. Must be called before the fd closes. */
  close(): void;
  /**
   * Busy polling (0..10000 us; 0, the default, is off): after a callback that returned `true`,
   * keep checking the fd (zero-timeout poll, yielding the CPU between checks) and call back as
   * soon as it is readable, until `us` pass without traffic or the callback returns anything but
   * `true`. One turn never holds the event loop for more than 1 ms.
   */
  busyPoll(us: number): void;
  /**
   * Fused receive: on each readable wake-up (and in busy polling) the poller itself does the
   * non-blocking recvmsg into `buffer[state[0], state[0] + state[1])` before calling back, and
   * leaves in state[2] the bytes received, 0 at end of stream, or -errno (the callback must reset it
   * to {@link RECV_NONE}, or no further receive is made), and in state[3..] the fds as recvmsg's
   * `fdsOut`. state[1] = 0 pauses it. `receiveInto(null)` disarms. The poller holds both arrays
   * until disarmed or closed.
   */
  receiveInto(buffer: Uint8Array | null, state?: Int32Array): void;
}

/** Layout of a {@link Poller.receiveInto} state array. */
export const RecvState = { OFFSET: 0, LENGTH: 1, RESULT: 2, FDS: 3 } as const;
/** state[RESULT] when the poller has not received anything for the callback. */
export const RECV_NONE = -0x80000000;

export interface PollerConstructor {
  /**
   * `callback(status, events)`: status 0 and the ready events, or a negative libuv status on error
   * (then `events` is 0). Called on the event loop thread; exceptions it throws propagate as uncaught.
   * Throws (syscall 'uv_poll_init') EBADF for a closed fd, EPERM for a regular file, and EEXIST if
   * another started Poller watches the same fd. libuv switches the fd to O_NONBLOCK.
   */
  new (fd: number, callback: (status: number, events: number) => boolean | void): Poller;
}

export interface NativeConstants {
  readonly PAGE_SIZE: number;
  readonly PROT_READ: number;
  readonly PROT_WRITE: number;
  readonly EFD_NONBLOCK: number;
  readonly EFD_SEMAPHORE: number;
  readonly MFD_ALLOW_SEALING: number;
  readonly F_SEAL_SEAL: number;
  readonly F_SEAL_SHRINK: number;
  readonly F_SEAL_GROW: number;
  readonly F_SEAL_WRITE: number;
  /** Linux SCM_MAX_FD: most fds one sendmsg may carry. */
  readonly SCM_MAX_FD: number;
  readonly EAGAIN: number;
  /** pwritev2 flag: this write is durable when it completes (NVMe FUA). */
  readonly RWF_DSYNC: number;
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
}

/**
 * The addon's io_uring (native/uring.cc): numbered slots double as the kernel's user_data;
 * `submit()` is one io_uring_enter for everything prepared, `reap(out)` fills (slot, result) pairs
 * from the completion ring without a syscall. lib/native/uring.ts is its JS face.
 */
export interface NativeIoUring {
  readonly fd: number;
  readonly entries: number;
  prepRw(slot: number, write: boolean, fd: number, position: number, bufs: Uint8Array | readonly Uint8Array[], rwFlags: number): void;
  prepFsync(slot: number, fd: number, datasync: boolean): void;
  prepFallocate(slot: number, fd: number, mode: number, offset: number, length: number): void;
  submit(): number;
  reap(out: Int32Array): number;
  /** Prepared SQEs the kernel has not taken (the newest ones); no system call. */
  unconsumed(): number;
  close(): void;
}

export interface NativeBinding {
  readonly constants: NativeConstants;
  readonly pollEvents: PollEvents;
  readonly Poller: PollerConstructor;
  /** io_uring_setup with `entries` slots; throws (syscall 'io_uring_setup') ENOSYS or EPERM where refused. */
  readonly IoUring: new (entries: number) => NativeIoUring;

  /** sched_yield(): lets another runnable task have this CPU (for polling loops); never throws. */
  schedYield(): void;
  /**
   * socket(AF_UNIX, SOCK_STREAM|NONBLOCK|CLOEXEC) + bind + listen. Does not unlink `path` first.
   * With `mode` (0..0o777) the socket is fchmod'ed before bind, so the file is created with `mode`
   * less the umask, atomically (it never exists with a wider mode); without, the umask alone decides.
   */
  unixListen(path: string, backlog: number, mode?: number): number;
  /** accept4(NONBLOCK|CLOEXEC); returns the new fd, or -1 when no connection is pending. */
  unixAccept(listenFd: number): number;
  /** A connected non-blocking CLOEXEC unix stream socket. Throws (e.g. ECONNREFUSED, ENOENT, EAGAIN). */
  unixConnect(path: string): number;
  /** socketpair(AF_UNIX, SOCK_STREAM|NONBLOCK|CLOEXEC). */
  socketpair(): [number, number];

  /**
   * One sendmsg(MSG_NOSIGNAL|MSG_DONTWAIT) of the concatenation of `iov` with `fds` attached as
   * SCM_RIGHTS (omit or pass null/empty for none). Returns the bytes sent (possibly fewer than the
   * total: then the fds went with the first byte), or -1 if nothing could be sent (would block).
   * The fds stay open and owned by the caller. At most 64 views, holding at least one byte in
   * all (else RangeError), and at most SCM_MAX_FD fds. EPIPE/ECONNRESET mean the peer is gone.
   */
  sendmsg(fd: number, iov: readonly Uint8Array[], fds?: ArrayLike<number> | null): number;

  /**
   * One recvmsg(MSG_DONTWAIT|MSG_CMSG_CLOEXEC) into `buf[offset, offset+length)`.
   * Returns the bytes read, 0 at end of stream, or -1 if nothing is available (would block).
   * Received fds are written to `fdsOut[1..n]` with `fdsOut[0] = n` (0 when none); the control
   * buffer has room for `fdsOut.length - 1` fds. If the kernel truncated the control data
   * (MSG_CTRUNC) every fd that did arrive is closed and an error with code 'EMSGSIZE' and syscall
   * 'recvmsg' is thrown (the bytes of that call are lost: treat the stream as broken); a malformed
   * control message throws EPROTO the same way. `length` must be >= 1. `fdsOut[0]` is 0 whenever
   * no fds are reported (-1, 0, or a throw). The caller owns every fd reported in `fdsOut`.
   */
  recvmsg(fd: number, buf: Uint8Array, offset: number, length: number, fdsOut: Int32Array): number;

  /**
   * mmap(MAP_SHARED) `length` bytes of `fd` at `offset` (any offset: the addon maps from the page
   * boundary below and returns a view starting exactly at `offset`). Returns an external
   * ArrayBuffer of exactly `length` bytes; its finaliser unmaps it if {@link munmap} never did.
   * The mapping is aligned to the page size, or to st_blksize when larger (hugetlbfs). `prot` must
   * include PROT_READ and may add PROT_WRITE (nothing else): writing through a view of a read-only
   * mapping, or touching pages past the end of the file, kills the process (SIGSEGV/SIGBUS).
   * `offset` is a safe-integer Number or a BigInt below 2^63; `length` is 1..2^32 (V8's largest
   * ArrayBuffer; RangeError above: lib/native/mapping.ts maps longer ranges as several buffers).
   * External ArrayBuffers need Node.js: runtimes with a V8 memory cage (Electron) get an Error.
   * Every mapping is guarded against SIGBUS: if its file shrinks, touching the lost pages replaces
   * the whole mapping with zero pages (see {@link mmapPoisoned}) instead of ending the process.
   */
  mmap(fd: number, offset: number | bigint, length: number, prot: number): ArrayBuffer;
  /**
   * True if the SIGBUS guard replaced this mapping's pages because its file shrank under it; false
   * for a healthy, detached or unmapped buffer. TypeError for anything but an ArrayBuffer.
   */
  mmapPoisoned(buffer: ArrayBuffer): boolean;
  /**
   * This environment's fault counter (one element): the SIGBUS guard adds 1 whenever it poisons a
   * mapping, so a reader can tell, without a call, whether anything needs {@link mmapPoisoned}.
   */
  readonly faultEpoch: Int32Array;
  /**
   * Detach `buffer` (every view of it then has length 0), then munmap it. Idempotent: a second call,
   * or a call on an already detached buffer, does nothing. Throws TypeError for an ArrayBuffer that
   * did not come from {@link mmap}.
   */
  munmap(buffer: ArrayBuffer): void;

  /** memfd_create(name, MFD_CLOEXEC | flags). */
  memfdCreate(name: string, flags?: number): number;
  /** fcntl(F_GET_SEALS): the F_SEAL_* bits of `fd`. Throws EINVAL for a file that has no seals. */
  getSeals(fd: number): number;
  /** fcntl(F_ADD_SEALS). Throws EPERM once F_SEAL_SEAL is set (or without MFD_ALLOW_SEALING). */
  addSeals(fd: number, seals: number): void;
  /**
   * fallocate(PUNCH_HOLE | KEEP_SIZE): `[offset, offset + length)` reads back as zeros and its
   * memory (memfd) or blocks (file) are freed; the size stays. EOPNOTSUPP where unsupported.
   */
  punchHole(fd: number, offset: number, length: number): void;
  /** eventfd(initval, EFD_CLOEXEC | flags). */
  eventfd(initval: number, flags?: number): number;
  /**
   * Add 1 to an eventfd's counter (one 8-byte write). Returns false if it would block (the counter
   * is full). Never blocks, even on an eventfd without EFD_NONBLOCK (a zero-timeout poll first).
   */
  eventfdSignal(fd: number): boolean;
  /**
   * Read and reset an eventfd's counter; 0 if it was zero. Never blocks, like eventfdSignal.
   * Counts above 2^53 lose precision (the kernel caps the counter at 2^64-2).
   */
  eventfdDrain(fd: number): number;
}

/** The package root, from either lib/native (tests run the sources) or dist/native (published). */
export const PACKAGE_ROOT = path.join(__dirname, '..', '..');

function load(): NativeBinding {
  if (process.platform !== 'linux') {
    throw new Error(
      `vfio-user: unsupported platform ${process.platform}-${process.arch}: vfio-user needs Linux ` +
        '(UNIX sockets with SCM_RIGHTS, memfd, eventfd)',
    );
  }
  if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
    throw new Error('vfio-user: unsupported platform: the protocol is little-endian only');
  }
  // node-gyp-build picks prebuilds/<platform>-<arch>/ first, then build/Release (a source build).
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const nodeGypBuild = require('node-gyp-build') as (dir: string) => unknown;
  // The addon's exports object has dictionary-mode properties, which makes every `binding.x` on
  // the data path a slow lookup (measured: ~7% of a server's user time); a plain copy is fast.
  return { ...(nodeGypBuild(PACKAGE_ROOT) as NativeBinding) };
}

export const binding: NativeBinding = load();

/**
 * An Error like the addon's own (`code`, positive `errno`, `syscall`; message 'EBADF: Bad file
 * descriptor, recvmsg'), for an errno the addon reported as a value rather than throwing.
 */
export function systemError(errno: number, syscall: string): NodeJS.ErrnoException {
  const [code, description] = getSystemErrorMap().get(-errno) ?? [`E${errno}`, 'Unknown error'];
  return Object.assign(new Error(`${code}: ${description}, ${syscall}`), { code, errno, syscall });
}

/** The value data-path calls return instead of throwing EAGAIN. */
export const WOULD_BLOCK = -1;
