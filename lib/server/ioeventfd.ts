/**
 * ioeventfds a device offers for parts of its regions (reference §3.6; libvfio-user's
 * `vfu_create_ioeventfd`), and the `DEVICE_GET_REGION_IO_FDS` reply that describes them.
 *
 * An ioeventfd stands for writes of `size` bytes (any size when 0) at `offset` of a region, and,
 * with `datamatch`, only for writes of that value. A client (or KVM, for a guest's store) that
 * sees such a write signals the eventfd instead of sending REGION_WRITE; the value itself is lost,
 * unless the ioeventfd has shadow memory: then the client stores the written value there first
 * (libvfio-user's "shadow ioeventfd", type 2) and the device reads it. The device creates the
 * eventfd, watches it (`EventFd.watch`) and keeps it; each client that asks gets a copy.
 *
 * A client that does not use the ioeventfds keeps writing with REGION_WRITE, so a device must
 * serve those writes the same way (a doorbell written by message rings as well).
 *
 * The reply uses the spec's 40-byte entries, or libvfio-user's 48-byte entries when some entry
 * has shadow memory (type 2; the client tells the layouts apart by the stride). Fds shared by
 * several entries are sent once. A client that accepts fewer fds than the entries need gets an
 * empty set: it could not use them.
 *
 * @packageDocumentation
 */
import * as fs from 'node:fs';
import type { Fd } from '../native/fd';
import { Errno, IoFdType, KvmIoeventfdFlags, RegionInfoFlags } from '../protocol/constants';
import { encodeRegionIoFdsReply, type IoFdSubRegion, type RegionIoFdsRequest } from '../protocol/messages/region';

/** Widths an ioeventfd can stand for (0 = any width). */
export type IoEventfdSize = 0 | 1 | 2 | 4 | 8;

/** An ioeventfd for part of a region, as a device declares it. */
export interface IoEventfd {
  /** Start within the region. */
  readonly offset: number;
  /** Width of the writes it stands for: 1, 2, 4 or 8 bytes, or 0 for any width. */
  readonly size: IoEventfdSize;
  /** Only writes of this value (KVM's DATAMATCH; needs a non-zero `size` the value fits in). */
  readonly datamatch?: bigint | number;
  /** The eventfd: the device's, which it watches; clients get copies. */
  readonly fd: Fd;
  /**
   * Shadow memory: the client stores the written value (little-endian, `size` bytes, 8 when
   * `size` is 0) at `offset` of this file before signalling. A memfd (or other regular file) the
   * device maps; the client maps the page holding `offset`. Seal it against shrinking.
   */
  readonly shadow?: { readonly fd: Fd; readonly offset: number };
}

const SIZES: readonly number[] = [0, 1, 2, 4, 8];

/**
 * Why `e` cannot be offered for a region of `regionSize` bytes with `regionFlags`, or null if it
 * can. `others` are the entries before it (an identical offset, size and datamatch is a duplicate,
 * which KVM refuses too).
 */
export function checkIoEventfd(e: IoEventfd, regionSize: number, regionFlags: number, others: readonly IoEventfd[] = []): string | null {
  if (typeof e !== 'object' || e === null) return 'not an object';
  if (!SIZES.includes(e.size)) return `size ${String(e.size)} is not 0, 1, 2, 4 or 8`;
  if (!Number.isSafeInteger(e.offset) || e.offset < 0) return `offset ${String(e.offset)} is not a non-negative integer`;
  if ((regionFlags & RegionInfoFlags.WRITE) === 0) return 'the region is not writable';
  if (e.offset + Math.max(e.size, 1) > regionSize) return `0x${e.offset.toString(16)}+${e.size} lies outside the ${regionSize}-byte region`;
  if (e.datamatch !== undefined) {
    if (e.size === 0) return 'datamatch needs a size';
    const v = BigInt(e.datamatch);
    if (v < 0n || v >= 1n << BigInt(8 * e.size)) return `datamatch 0x${v.toString(16)} does not fit in ${e.size} bytes`;
  }
  if (e.fd.closed) return 'the eventfd is closed';
  if (!isEventfd(e.fd.value)) return `fd ${e.fd.value} is not an eventfd`;
  if (e.shadow !== undefined) {
    const width = e.size === 0 ? 8 : e.size;
    if (e.shadow.fd.closed) return 'the shadow memory fd is closed';
    if (!Number.isSafeInteger(e.shadow.offset) || e.shadow.offset < 0 || e.shadow.offset % width !== 0) {
      return `shadow offset ${String(e.shadow.offset)} is not a non-negative multiple of ${width}`;
    }
    let st: fs.Stats;
    try {
      st = fs.fstatSync(e.shadow.fd.value);
    } catch (err) {
      return `the shadow memory cannot be examined: ${(err as Error).message}`;
    }
    if (!st.isFile()) return 'the shadow memory is not a regular file (a memfd)';
    if (e.shadow.offset + width > st.size) return `the shadow slot at 0x${e.shadow.offset.toString(16)} lies past the end of its ${st.size}-byte file`;
  }
  const match = e.datamatch === undefined ? null : BigInt(e.datamatch);
  for (const o of others) {
    if (o.offset === e.offset && o.size === e.size && (o.datamatch === undefined ? null : BigInt(o.datamatch)) === match) {
      return `a second ioeventfd for ${e.size} bytes at 0x${e.offset.toString(16)}${match === null ? '' : ` (datamatch 0x${match.toString(16)})`}`;
    }
  }
  return null;
}

/**
 * Check a whole list for a region; throws RangeError naming the first bad entry. For device
 * models that register ioeventfds (`PciDevice.setIoEventfds`).
 */
export function assertIoEventfds(list: readonly IoEventfd[], regionSize: number, regionFlags: number, what: string): void {
  for (let i = 0; i < list.length; i++) {
    const why = checkIoEventfd(list[i]!, regionSize, regionFlags, list.slice(0, i));
    if (why !== null) throw new RangeError(`${what}: ioeventfd ${i}: ${why}`);
  }
}

/**
 * Lists already checked in full: a client asking again and again costs a closed-fd test per
 * entry, not a readlink and an fstat (lists are replaced, never changed in place).
 */
const checked = new WeakMap<readonly IoEventfd[], number>();

/** A reply to DEVICE_GET_REGION_IO_FDS: the body and the fds it refers to, or an errno. */
export type RegionIoFdsResult = number | Buffer | { body: Buffer; fds: readonly number[] };

/**
 * Answer DEVICE_GET_REGION_IO_FDS (validated as libvfio-user does: `flags` and `count` 0, a region
 * that exists) for `region`, sending at most `maxFds` fds. A device whose list does not hold
 * together gets EINVAL (and `onBadDevice` is told why).
 */
export function regionIoFdsReply(
  req: RegionIoFdsRequest,
  region: { readonly size: number; readonly flags: number; readonly ioeventfds?: readonly IoEventfd[] } | null | undefined,
  maxFds: number,
  onBadDevice: (why: string) => void,
): RegionIoFdsResult {
  if (req.flags !== 0 || req.count !== 0) return Errno.EINVAL;
  if (region == null || region.size === 0) return Errno.EINVAL;
  const list = region.ioeventfds ?? [];
  if (checked.get(list) !== region.size) {
    for (let i = 0; i < list.length; i++) {
      const why = checkIoEventfd(list[i]!, region.size, region.flags, list.slice(0, i));
      if (why !== null) {
        onBadDevice(`region ${req.index}: ioeventfd ${i}: ${why}`);
        return Errno.EINVAL;
      }
    }
    checked.set(list, region.size);
  } else {
    const closed = list.findIndex((e) => e.fd.closed || e.shadow?.fd.closed === true);
    if (closed >= 0) {
      onBadDevice(`region ${req.index}: ioeventfd ${closed}: its fd is closed`);
      return Errno.EINVAL;
    }
  }
  const fds: number[] = [];
  const fdIndex = (fd: number): number => {
    const at = fds.indexOf(fd);
    if (at >= 0) return at;
    fds.push(fd);
    return fds.length - 1;
  };
  const shadowed = list.some((e) => e.shadow !== undefined);
  let subRegions: IoFdSubRegion[] = list.map((e) => ({
    offset: BigInt(e.offset),
    size: BigInt(e.size),
    fdIndex: fdIndex(e.fd.value),
    type: e.shadow === undefined ? IoFdType.IOEVENTFD : IoFdType.IOEVENTFD_SHADOW,
    flags: e.datamatch === undefined ? 0 : KvmIoeventfdFlags.DATAMATCH,
    datamatch: e.datamatch === undefined ? 0n : BigInt(e.datamatch),
    shadowMemFdIndex: e.shadow === undefined ? 0 : fdIndex(e.shadow.fd.value),
    shadowOffset: e.shadow === undefined ? 0n : BigInt(e.shadow.offset),
  }));
  // A client that cannot take the fds cannot use any of it: nothing is offered.
  if (fds.length > maxFds) {
    subRegions = [];
    fds.length = 0;
  }
  const body = encodeRegionIoFdsReply({ index: req.index, subRegions, entrySize: shadowed && subRegions.length > 0 ? 48 : 40 }, req.argsz);
  // The array and its fds go only when the whole reply fits in argsz (the two-step exchange).
  if (subRegions.length === 0 || body.readUInt32LE(0) > req.argsz) return body;
  return { body, fds };
}

/** True if `fd` is an eventfd (its /proc link reads "anon_inode:[eventfd]"). */
function isEventfd(fd: number): boolean {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:[eventfd]';
  } catch {
    return false;
  }
}
