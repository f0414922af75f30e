/**
 * `DEVICE_GET_REGION_IO_FDS` on the client side (reference §3.6): the file descriptors a server
 * offers for parts of a region, so that the client can notify it without a message.
 *
 * An ioeventfd sub-region (type 0) stands for writes of `size` bytes at `offset` (any size when
 * `size` is 0), of value `datamatch` only when its DATAMATCH flag is set; such a write is a signal
 * of the eventfd, the value itself is dropped, as KVM does for a guest's store. libvfio-user's
 * shadow ioeventfd (type 2, 48-byte entries) also stores the value into shadow memory (a second fd,
 * at `shadowOffset`) before the signal, so the device can read it. ioregionfd (type 1) was never
 * merged into KVM: such entries are reported but never used for writes.
 *
 * Everything in the reply is checked before use: fd indexes, that ioeventfds are eventfds, sizes
 * (0, 1, 2, 4, 8), that sub-regions lie inside the region; a bad reply fails the query with
 * {@link ProtocolError} and closes its fds.
 *
 * @packageDocumentation
 */
import * as fs from 'node:fs';
import { binding } from '../native/binding';
import { Fd } from '../native/fd';
import { Mapping } from '../native/mapping';
import { Errno, IoFdType, KvmIoeventfdFlags } from '../protocol/constants';
import { ProtocolError } from '../protocol/errors';
import type { RegionIoFdsReply } from '../protocol/messages/region';

const PAGE = 4096;
const SIZES = new Set([0n, 1n, 2n, 4n, 8n]);

/** One sub-region of {@link RegionIoFds}. */
export interface RegionIoFd {
  /** Start within the region. */
  readonly offset: bigint;
  /** Width of the writes it stands for; 0 = any. */
  readonly size: bigint;
  /** {@link IoFdType}: 0 ioeventfd, 1 ioregionfd, 2 ioeventfd with shadow memory. */
  readonly type: number;
  /** KVM ioeventfd flags ({@link KvmIoeventfdFlags}). */
  readonly flags: number;
  /** The value a write must have when DATAMATCH is set. */
  readonly datamatch: bigint;
  /** The fd the server gave (owned by the {@link RegionIoFds}; closed with it). */
  readonly fd: Fd;
  /** Where a shadow ioeventfd's value goes (type 2 only): the file offset of its slot. */
  readonly shadowOffset: bigint | null;
}

/**
 * What the server offered for one region: the sub-regions and their fds. Owns the fds and the
 * shadow mappings until {@link RegionIoFds.close}.
 */
export class RegionIoFds {
  readonly #shadows: (Mapping | null)[];
  /** Per sub-region: its shadow slot's view (within the mapped page) and its eventfd number. */
  readonly #slots: (Buffer | null)[];
  readonly #eventfds: number[];
  readonly #fds: readonly Fd[];
  #closed = false;
  /** Writes sent through an ioeventfd so far. */
  signalled = 0;

  /** @internal Built by the client from a checked reply. */
  constructor(
    readonly index: number,
    /** Bytes per entry in the reply: 40 (spec), 48 (libvfio-user), 0 (no entries). */
    readonly entrySize: number,
    readonly subRegions: readonly RegionIoFd[],
    shadows: (Mapping | null)[],
    fds: readonly Fd[],
  ) {
    this.#shadows = shadows;
    this.#fds = fds;
    this.#slots = subRegions.map((s, i) => {
      const shadow = shadows[i];
      if (shadow == null || s.shadowOffset === null) return null;
      const at = Number(s.shadowOffset % BigInt(PAGE));
      return shadow.bytes.subarray(at, Math.min(PAGE, at + (s.size === 0n ? 8 : Number(s.size))));
    });
    this.#eventfds = subRegions.map((s) => (s.type === IoFdType.IOREGIONFD ? -1 : s.fd.value));
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Index in {@link RegionIoFds.subRegions} of the ioeventfd a write of `data` at `offset` stands
   * for (exact offset, a matching size, the datamatch value when asked for), or -1.
   */
  match(offset: bigint, data: Uint8Array): number {
    if (this.#closed) return -1;
    const length = BigInt(data.length);
    for (let i = 0; i < this.subRegions.length; i++) {
      const s = this.subRegions[i]!;
      if (s.type === IoFdType.IOREGIONFD || s.offset !== offset) continue;
      if (s.size !== 0n && s.size !== length) continue;
      if ((s.flags & KvmIoeventfdFlags.DATAMATCH) !== 0 && (data.length > 8 || readLe(data) !== s.datamatch)) continue;
      return i;
    }
    return -1;
  }

  /**
   * Performs a write of `data` at `offset` through an ioeventfd if one stands for it: the value
   * into shadow memory (type 2), then a signal. Returns false (nothing done) otherwise, or if the
   * eventfd's counter is full.
   */
  tryWrite(offset: bigint, data: Uint8Array): boolean {
    const i = this.match(offset, data);
    return i >= 0 && this.writeAt(i, data);
  }

  /**
   * Performs a write of `data` through sub-region `i` (as {@link RegionIoFds.match} found it; a
   * caller that writes one register often looks it up once): the value into its shadow memory,
   * if any, then the signal. False if the set is closed, `i` is no ioeventfd, or the eventfd's
   * counter is full.
   */
  writeAt(i: number, data: Uint8Array): boolean {
    const fd = this.#eventfds[i];
    if (this.#closed || fd === undefined || fd < 0) return false;
    const slot = this.#slots[i];
    if (slot != null) slot.set(data.length <= slot.length ? data : data.subarray(0, slot.length));
    try {
      if (!binding.eventfdSignal(fd)) return false;
    } catch {
      return false;
    }
    this.signalled++;
    return true;
  }

  /** Closes every fd and unmaps the shadow memory. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const m of this.#shadows) m?.unmapNow();
    Fd.closeAll([...this.#fds]);
  }
}

function readLe(data: Uint8Array): bigint {
  let v = 0n;
  for (let i = data.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(data[i]!);
  return v;
}

function bad(message: string, field: string): ProtocolError {
  return new ProtocolError(`DEVICE_GET_REGION_IO_FDS reply: ${message}`, { field, errno: Errno.EPROTO });
}

function isEventfd(fd: Fd): boolean {
  try {
    return fs.readlinkSync(`/proc/self/fd/${String(fd.value)}`) === 'anon_inode:[eventfd]';
  } catch {
    return false;
  }
}

/**
 * @internal Checks a complete reply for region `index` of `regionSize` bytes against the fds it
 * came with and builds the set; closes the fds on failure.
 */
export function buildRegionIoFds(index: number, regionSize: number, reply: RegionIoFdsReply, fds: Fd[]): RegionIoFds {
  const shadows: (Mapping | null)[] = [];
  try {
    if (reply.index !== index) throw bad(`index ${String(reply.index)} answers a query for ${String(index)}`, 'index');
    const used = new Set<number>();
    const subRegions: RegionIoFd[] = reply.subRegions.map((s, i) => {
      const fd = fds[s.fdIndex];
      if (fd === undefined) throw bad(`entry ${String(i)} refers to fd ${String(s.fdIndex)} of ${String(fds.length)}`, 'fd_index');
      if (!SIZES.has(s.size)) throw bad(`entry ${String(i)} has size ${String(s.size)} (0, 1, 2, 4 or 8)`, 'size');
      if (s.offset + (s.size === 0n ? 1n : s.size) > BigInt(regionSize)) throw bad(`entry ${String(i)} at 0x${s.offset.toString(16)} lies outside the ${String(regionSize)}-byte region`, 'offset');
      if (s.type !== IoFdType.IOEVENTFD && s.type !== IoFdType.IOREGIONFD && s.type !== IoFdType.IOEVENTFD_SHADOW) throw bad(`entry ${String(i)} has unknown type ${String(s.type)}`, 'type');
      if (s.type !== IoFdType.IOREGIONFD && !isEventfd(fd)) throw bad(`entry ${String(i)} is an ioeventfd but its fd is not an eventfd`, 'fd_index');
      used.add(s.fdIndex);
      let shadowOffset: bigint | null = null;
      let shadow: Mapping | null = null;
      if (s.type === IoFdType.IOEVENTFD_SHADOW) {
        const memFd = s.shadowMemFdIndex === undefined ? undefined : fds[s.shadowMemFdIndex];
        if (memFd === undefined || s.shadowOffset === undefined) throw bad(`entry ${String(i)} (shadow ioeventfd) has no shadow memory fd`, 'shadow_mem_fd_index');
        used.add(s.shadowMemFdIndex!);
        shadowOffset = s.shadowOffset;
        const width = s.size === 0n ? 8n : s.size;
        if (shadowOffset % width !== 0n) throw bad(`entry ${String(i)}: shadow offset 0x${shadowOffset.toString(16)} is not aligned to the access size`, 'shadow_offset');
        const pageStart = shadowOffset - (shadowOffset % BigInt(PAGE));
        try {
          shadow = Mapping.map(memFd, pageStart, PAGE, binding.constants.PROT_READ | binding.constants.PROT_WRITE);
        } catch (err) {
          throw bad(`entry ${String(i)}: the shadow memory cannot be mapped at 0x${shadowOffset.toString(16)}: ${(err as Error).message}`, 'shadow_offset');
        }
      }
      shadows.push(shadow);
      return Object.freeze({ offset: s.offset, size: s.size, type: s.type, flags: s.flags, datamatch: s.datamatch, fd, shadowOffset });
    });
    if (used.size !== fds.length) throw bad(`carries ${String(fds.length)} fds, its entries use ${String(used.size)}`, 'fds');
    return new RegionIoFds(index, reply.entrySize, subRegions, shadows, fds);
  } catch (err) {
    for (const m of shadows) m?.unmapNow();
    Fd.closeAll(fds);
    throw err;
  }
}
