/**
 * `DEVICE_GET_REGION_INFO` (5) and `DEVICE_GET_REGION_IO_FDS` (6), requests and replies
 * (reference 3.5, 3.6).
 *
 * ```
 * REGION_INFO request/reply (32 + caps)     capability header (8), at cap_offset / next
 *  0  4 argsz                                0 2 id       1 SPARSE_MMAP, 2 TYPE, others skipped
 *  4  4 flags   READ|WRITE|MMAP|CAPS         2 2 version
 *  8  4 index                                4 4 next     payload offset of the next cap, 0 = last
 * 12  4 cap_offset  (from payload start)    SPARSE_MMAP: 8 u32 nr_areas, 12 u32 reserved,
 * 16  8 size                                  16 + 16*i: u64 offset, u64 size
 * 24  8 offset  file offset for mmap        TYPE: 8 u32 type, 12 u32 subtype
 * ```
 *
 * A reply whose `argsz` exceeds the payload is *partial*: the fixed 32 bytes only, no chain, no
 * fd; the client asks again with that `argsz` (QEMU's two-step exchange, peers.md §2).
 *
 * ```
 * REGION_IO_FDS request (16)               reply: 16 + count entries of (argsz - 16) / count bytes
 *  0 4 argsz  4 4 flags  8 4 index         spec entry (40): 0 u64 offset, 8 u64 size, 16 u32 fd_index,
 * 12 4 count                                 20 u32 type, 24 u32 flags, 28 u32 padding, 32 u64 datamatch
 *                                          LVU entry (48): ..., 28 u32 shadow_mem_fd_index,
 *                                            32 u64 shadow_offset, 40 u64 datamatch
 * ```
 *
 * @packageDocumentation
 */
import { PayloadSize, RegionCap, RegionInfoFlags } from '../constants';
import { Reader, Writer, checkBytes, checkUint } from '../codec';

// ---------------------------------------------------------------------------------------------
// DEVICE_GET_REGION_INFO

/** `DEVICE_GET_REGION_INFO` request. All fields but `argsz` and `index` are 0. */
export interface RegionInfoRequest {
  /** Largest reply payload accepted (>= 32). */
  argsz: number;
  flags: number;
  /** Region index queried. */
  index: number;
  capOffset: number;
  size: bigint;
  offset: bigint;
}

/** One mappable area of a region (sparse mmap capability). */
export interface SparseMmapArea {
  /** Start of the area, relative to the region. */
  offset: bigint;
  /** Length of the area. */
  size: bigint;
}

/** `VFIO_REGION_INFO_CAP_SPARSE_MMAP` (id 1). */
export interface SparseMmapCapability {
  kind: 'sparse-mmap';
  version: number;
  areas: SparseMmapArea[];
}

/** `VFIO_REGION_INFO_CAP_TYPE` (id 2). */
export interface TypeCapability {
  kind: 'type';
  version: number;
  /** Region type ({@link RegionType}). */
  type: number;
  subtype: number;
}

/** Any other capability: skipped by `next`; `data` is everything from its header to the next cap. */
export interface UnknownCapability {
  kind: 'unknown';
  id: number;
  version: number;
  data: Buffer;
}

/** A region-info capability. */
export type RegionCapability = SparseMmapCapability | TypeCapability | UnknownCapability;

/** A sparse-mmap capability (version 1). */
export function sparseMmapCap(areas: SparseMmapArea[]): SparseMmapCapability {
  return { kind: 'sparse-mmap', version: 1, areas };
}

/** A type capability (version 1). */
export function typeCap(type: number, subtype: number): TypeCapability {
  return { kind: 'type', version: 1, type, subtype };
}

/** `DEVICE_GET_REGION_INFO` reply. */
export interface RegionInfoReply {
  /** Size of the complete reply payload (32 + capabilities). */
  argsz: number;
  /** {@link RegionInfoFlags}. */
  flags: number;
  index: number;
  /** Offset of the first capability (payload-relative), when `CAPS`. */
  capOffset: number;
  /** Region size; 0 = not implemented. */
  size: bigint;
  /** File offset of the region in the reply's fd. */
  offset: bigint;
  /** Capabilities in chain order (empty when `truncated` or without `CAPS`). */
  capabilities: RegionCapability[];
  /** `argsz` exceeds the payload: only the fixed part was sent; ask again with `argsz`. */
  truncated: boolean;
}

/** What a server describes in a region-info reply. */
export interface RegionInfoInit {
  /** READ/WRITE/MMAP; `CAPS` is set or cleared by the encoder. */
  flags: number;
  index: number;
  size: bigint;
  offset?: bigint;
  /** Capabilities in chain order (put `type` before `sparse-mmap`, as libvfio-user does). */
  capabilities?: RegionCapability[];
}

/** Encodes a `DEVICE_GET_REGION_INFO` request (`argsz` default 32). */
export function encodeRegionInfoRequest(m: { index: number; argsz?: number }): Buffer {
  return Writer.alloc(PayloadSize.REGION_INFO)
    .u32(m.argsz ?? PayloadSize.REGION_INFO, 'argsz')
    .u32(0, 'flags')
    .u32(m.index, 'index')
    .u32(0, 'capOffset')
    .u64(0n, 'size')
    .u64(0n, 'offset')
    .finish();
}

/**
 * Decodes a `DEVICE_GET_REGION_INFO` request.
 *
 * @throws {ProtocolError} unless exactly 32 bytes with `argsz` >= 32.
 */
export function decodeRegionInfoRequest(payload: Uint8Array): RegionInfoRequest {
  const r = new Reader(payload, 'DEVICE_GET_REGION_INFO request');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const index = r.u32('index');
  const capOffset = r.u32('cap_offset');
  const size = r.u64('size');
  const offset = r.u64('offset');
  r.end();
  if (argsz < PayloadSize.REGION_INFO) r.fail('argsz', `${String(argsz)} is below ${String(PayloadSize.REGION_INFO)}`);
  return { argsz, flags, index, capOffset, size, offset };
}

function capSize(cap: RegionCapability): number {
  switch (cap.kind) {
    case 'sparse-mmap':
      return PayloadSize.CAP_SPARSE_FIXED + PayloadSize.SPARSE_AREA * cap.areas.length;
    case 'type':
      return PayloadSize.CAP_TYPE;
    case 'unknown':
      return PayloadSize.CAP_HEADER + cap.data.byteLength;
  }
}

/** Size of the complete reply payload for `info`: 32 + all capabilities. */
export function regionInfoReplySize(info: Pick<RegionInfoInit, 'capabilities'>): number {
  let n = PayloadSize.REGION_INFO;
  for (const cap of info.capabilities ?? []) n += capSize(cap);
  return n;
}

/**
 * Encodes a `DEVICE_GET_REGION_INFO` reply for a request whose `argsz` was `requestArgsz`.
 *
 * If the complete reply fits, it is sent whole with `CAPS` set (when there are capabilities) and
 * the chain at `cap_offset` 32. Otherwise only the fixed 32 bytes are sent, with `argsz` = the
 * size needed and `CAPS` cleared (`MMAP` kept): the server must then not attach the region's fd
 * (reference 3.5, libvfio-user behaviour). In short: attach the fd iff the result is longer than
 * 32 bytes and the region is mappable.
 */
export function encodeRegionInfoReply(info: RegionInfoInit, requestArgsz = Infinity): Buffer {
  const caps = info.capabilities ?? [];
  const full = regionInfoReplySize(info);
  const complete = full <= requestArgsz && caps.length > 0;
  let flags = info.flags & ~RegionInfoFlags.CAPS;
  if (complete) flags |= RegionInfoFlags.CAPS;
  const w = Writer.alloc(complete ? full : PayloadSize.REGION_INFO);
  w.u32(full, 'argsz')
    .u32(flags, 'flags')
    .u32(info.index, 'index')
    .u32(complete ? PayloadSize.REGION_INFO : 0, 'capOffset')
    .u64(info.size, 'size')
    .u64(info.offset ?? 0n, 'offset');
  if (complete) {
    let at: number = PayloadSize.REGION_INFO;
    caps.forEach((cap, i) => {
      const end = at + capSize(cap);
      const next = i === caps.length - 1 ? 0 : end;
      writeCap(w, cap, next);
      at = end;
    });
  }
  return w.finish();
}

function writeCap(w: Writer, cap: RegionCapability, next: number): void {
  switch (cap.kind) {
    case 'sparse-mmap':
      w.u16(RegionCap.SPARSE_MMAP, 'cap.id').u16(cap.version, 'cap.version').u32(next, 'cap.next');
      w.u32(cap.areas.length, 'nr_areas').u32(0, 'reserved');
      for (const a of cap.areas) w.u64(a.offset, 'areas[].offset').u64(a.size, 'areas[].size');
      return;
    case 'type':
      w.u16(RegionCap.TYPE, 'cap.id').u16(cap.version, 'cap.version').u32(next, 'cap.next');
      w.u32(cap.type, 'type').u32(cap.subtype, 'subtype');
      return;
    case 'unknown':
      checkUint(cap.id, 0xffff, 'cap.id');
      if (cap.id === RegionCap.SPARSE_MMAP || cap.id === RegionCap.TYPE) {
        throw new RangeError(`Expected an unknown capability id, got the known id ${String(cap.id)}`);
      }
      checkBytes(cap.data, 'cap.data');
      w.u16(cap.id, 'cap.id').u16(cap.version, 'cap.version').u32(next, 'cap.next').bytes(cap.data, 'cap.data');
      return;
  }
}

/**
 * Decodes a `DEVICE_GET_REGION_INFO` reply, walking the capability chain.
 *
 * Accepted shapes: a complete reply (payload length = `argsz`), or a partial one (exactly 32 bytes
 * with `argsz` > 32, `truncated: true`, capabilities not parsed).
 *
 * @throws {ProtocolError} if `argsz` < 32 or disagrees with the payload; if there are capability
 * bytes without `CAPS`; if `cap_offset` or a `next` points outside the payload or does not move
 * strictly forward (loops); if a capability overruns the next one or the payload; if bytes follow
 * the last capability; if a sparse area lies outside the region.
 */
export function decodeRegionInfoReply(payload: Uint8Array): RegionInfoReply {
  const r = new Reader(payload, 'DEVICE_GET_REGION_INFO reply');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const index = r.u32('index');
  const capOffset = r.u32('cap_offset');
  const size = r.u64('size');
  const offset = r.u64('offset');
  const len = payload.byteLength;
  const reply: RegionInfoReply = { argsz, flags, index, capOffset, size, offset, capabilities: [], truncated: false };
  if (argsz < PayloadSize.REGION_INFO) r.fail('argsz', `${String(argsz)} is below ${String(PayloadSize.REGION_INFO)}`);
  if (len === PayloadSize.REGION_INFO && argsz > len) {
    reply.truncated = true;
    return reply;
  }
  if (argsz !== len) r.fail('argsz', `${String(argsz)} disagrees with the ${String(len)}-byte payload`);
  if ((flags & RegionInfoFlags.CAPS) === 0) {
    r.end();
    return reply;
  }
  if (capOffset < PayloadSize.REGION_INFO || capOffset > len - PayloadSize.CAP_HEADER) {
    r.fail('cap_offset', `${String(capOffset)} is outside [${String(PayloadSize.REGION_INFO)}, ${String(len - PayloadSize.CAP_HEADER)}]`);
  }
  let at = capOffset;
  for (;;) {
    r.seek(at, 'cap');
    const id = r.u16('cap.id');
    const version = r.u16('cap.version');
    const next = r.u32('cap.next');
    if (next !== 0) {
      if (next <= at) r.fail('cap.next', `${String(next)} does not move forward from ${String(at)} (loop)`);
      if (next > len - PayloadSize.CAP_HEADER) r.fail('cap.next', `${String(next)} is outside the ${String(len)}-byte payload`);
    }
    const limit = next === 0 ? len : next;
    switch (id) {
      case RegionCap.SPARSE_MMAP: {
        const nr = r.u32('nr_areas');
        r.skip(4, 'reserved');
        if (nr > (limit - r.pos) / PayloadSize.SPARSE_AREA) {
          r.fail('nr_areas', `${String(nr)} areas do not fit before offset ${String(limit)}`);
        }
        const areas: SparseMmapArea[] = [];
        for (let i = 0; i < nr; i++) {
          const a = { offset: r.u64('areas[].offset'), size: r.u64('areas[].size') };
          if (a.offset + a.size > size) {
            r.fail('areas[].offset', `area [0x${a.offset.toString(16)}, +0x${a.size.toString(16)}) lies outside the 0x${size.toString(16)}-byte region`);
          }
          areas.push(a);
        }
        reply.capabilities.push({ kind: 'sparse-mmap', version, areas });
        break;
      }
      case RegionCap.TYPE: {
        const type = r.u32('type');
        const subtype = r.u32('subtype');
        reply.capabilities.push({ kind: 'type', version, type, subtype });
        break;
      }
      default:
        reply.capabilities.push({ kind: 'unknown', id, version, data: r.bytes(limit - r.pos, 'cap.data') });
    }
    if (r.pos > limit) r.fail('cap.next', `${String(next)} points inside the capability at ${String(at)}`);
    if (next === 0) break;
    at = next;
  }
  r.end();
  return reply;
}

// ---------------------------------------------------------------------------------------------
// DEVICE_GET_REGION_IO_FDS

/** `DEVICE_GET_REGION_IO_FDS` request (16 bytes). */
export interface RegionIoFdsRequest {
  /** Largest reply payload accepted (>= 16). */
  argsz: number;
  /** 0 (libvfio-user rejects anything else). */
  flags: number;
  /** Region index. */
  index: number;
  /** 0 (libvfio-user rejects anything else). */
  count: number;
}

/**
 * One sub-region of a `DEVICE_GET_REGION_IO_FDS` reply, in either layout: the spec's 40-byte entry
 * (ioeventfd type 0, ioregionfd type 1) or libvfio-user's 48-byte entry (types 0 and 2, with the
 * shadow fields).
 */
export interface IoFdSubRegion {
  /** `offset` (LVU: `gpa_offset`): start within the region. */
  offset: bigint;
  /** Length; 0 = any access size. */
  size: bigint;
  /** Index into the reply's fd array. */
  fdIndex: number;
  /** {@link IoFdType}. */
  type: number;
  /** KVM ioeventfd flags (type 0/2) or proposed ioregionfd flags (type 1). */
  flags: number;
  /** `datamatch` (type 0/2) or `user_data` (type 1). */
  datamatch: bigint;
  /** 48-byte layout only: fd index of the shadow memory (type 2). */
  shadowMemFdIndex?: number | undefined;
  /** 48-byte layout only: offset of the slot in the shadow memory (type 2). */
  shadowOffset?: bigint | undefined;
}

/** `DEVICE_GET_REGION_IO_FDS` reply. */
export interface RegionIoFdsReply {
  /** 16 + size of the whole sub-region array. */
  argsz: number;
  flags: number;
  index: number;
  /** Number of sub-regions (the full number even when the array was left out). */
  count: number;
  /** Stride of the entries: 40 (spec), 48 (libvfio-user since 2022-11), 0 when none were sent. */
  entrySize: number;
  subRegions: IoFdSubRegion[];
  /** `argsz` exceeds the payload: the array (and its fds) was left out. */
  truncated: boolean;
}

/** What a server describes in a `DEVICE_GET_REGION_IO_FDS` reply. */
export interface RegionIoFdsInit {
  flags?: number;
  index: number;
  subRegions: IoFdSubRegion[];
  /** Entry layout to emit: 40 (spec, default) or 48 (libvfio-user). */
  entrySize?: 40 | 48;
}

/** Encodes a `DEVICE_GET_REGION_IO_FDS` request (`argsz` default 16). */
export function encodeRegionIoFdsRequest(m: { index: number; argsz?: number; flags?: number; count?: number }): Buffer {
  return Writer.alloc(PayloadSize.REGION_IO_FDS_FIXED)
    .u32(m.argsz ?? PayloadSize.REGION_IO_FDS_FIXED, 'argsz')
    .u32(m.flags ?? 0, 'flags')
    .u32(m.index, 'index')
    .u32(m.count ?? 0, 'count')
    .finish();
}

/**
 * Decodes a `DEVICE_GET_REGION_IO_FDS` request.
 *
 * @throws {ProtocolError} unless exactly 16 bytes with `argsz` >= 16.
 */
export function decodeRegionIoFdsRequest(payload: Uint8Array): RegionIoFdsRequest {
  const r = new Reader(payload, 'DEVICE_GET_REGION_IO_FDS request');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const index = r.u32('index');
  const count = r.u32('count');
  r.end();
  if (argsz < PayloadSize.REGION_IO_FDS_FIXED) r.fail('argsz', `${String(argsz)} is below ${String(PayloadSize.REGION_IO_FDS_FIXED)}`);
  return { argsz, flags, index, count };
}

/** Payload size of a complete reply with `count` entries of `entrySize` bytes. */
export function regionIoFdsReplySize(count: number, entrySize: 40 | 48 = 40): number {
  return PayloadSize.REGION_IO_FDS_FIXED + count * entrySize;
}

/**
 * Encodes a `DEVICE_GET_REGION_IO_FDS` reply for a request whose `argsz` was `requestArgsz`.
 * Entries use the spec's 40-byte layout unless `entrySize` is 48. If the array does not fit,
 * only the 16-byte fixed part is sent (with the full `argsz` and `count`), and no fds.
 */
export function encodeRegionIoFdsReply(m: RegionIoFdsInit, requestArgsz = Infinity): Buffer {
  const entrySize = m.entrySize ?? 40;
  const count = m.subRegions.length;
  const full = regionIoFdsReplySize(count, entrySize);
  const complete = full <= requestArgsz;
  const w = Writer.alloc(complete ? full : PayloadSize.REGION_IO_FDS_FIXED);
  w.u32(full, 'argsz').u32(m.flags ?? 0, 'flags').u32(m.index, 'index').u32(count, 'count');
  if (complete) {
    for (const s of m.subRegions) {
      w.u64(s.offset, 'offset').u64(s.size, 'size').u32(s.fdIndex, 'fdIndex').u32(s.type, 'type').u32(s.flags, 'flags');
      if (entrySize === 48) {
        w.u32(s.shadowMemFdIndex ?? 0, 'shadowMemFdIndex').u64(s.shadowOffset ?? 0n, 'shadowOffset');
      } else {
        w.u32(0, 'padding');
      }
      w.u64(s.datamatch, 'datamatch');
    }
  }
  return w.finish();
}

/**
 * Decodes a `DEVICE_GET_REGION_IO_FDS` reply. The entry stride is computed as
 * `(argsz - 16) / count` (reference 8.8) and must be 40 or 48.
 *
 * @throws {ProtocolError} if `argsz` < 16 or disagrees with the payload, `count` is 0 with entries
 * present, the array does not divide into `count` entries of 40 or 48 bytes, or a partial reply
 * claims no entries.
 */
export function decodeRegionIoFdsReply(payload: Uint8Array): RegionIoFdsReply {
  const r = new Reader(payload, 'DEVICE_GET_REGION_IO_FDS reply');
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const index = r.u32('index');
  const count = r.u32('count');
  const len = payload.byteLength;
  const reply: RegionIoFdsReply = { argsz, flags, index, count, entrySize: 0, subRegions: [], truncated: false };
  if (argsz < PayloadSize.REGION_IO_FDS_FIXED) r.fail('argsz', `${String(argsz)} is below ${String(PayloadSize.REGION_IO_FDS_FIXED)}`);
  if (len === PayloadSize.REGION_IO_FDS_FIXED && argsz > len) {
    if (count === 0) r.fail('count', 'is 0 although argsz announces entries');
    reply.truncated = true;
    return reply;
  }
  if (argsz !== len) r.fail('argsz', `${String(argsz)} disagrees with the ${String(len)}-byte payload`);
  if (count === 0) {
    r.end();
    return reply;
  }
  const array = len - PayloadSize.REGION_IO_FDS_FIXED;
  const stride = array / count;
  if (stride !== PayloadSize.IO_FD_ENTRY_SPEC && stride !== PayloadSize.IO_FD_ENTRY_LVU) {
    r.fail('count', `${String(count)} entries in ${String(array)} bytes is not a 40- or 48-byte stride`);
  }
  reply.entrySize = stride;
  for (let i = 0; i < count; i++) {
    const offset = r.u64('offset');
    const size = r.u64('size');
    const fdIndex = r.u32('fd_index');
    const type = r.u32('type');
    const eflags = r.u32('flags');
    if (stride === PayloadSize.IO_FD_ENTRY_LVU) {
      const shadowMemFdIndex = r.u32('shadow_mem_fd_index');
      const shadowOffset = r.u64('shadow_offset');
      const datamatch = r.u64('datamatch');
      reply.subRegions.push({ offset, size, fdIndex, type, flags: eflags, datamatch, shadowMemFdIndex, shadowOffset });
    } else {
      r.skip(4, 'padding');
      const datamatch = r.u64('datamatch');
      reply.subRegions.push({ offset, size, fdIndex, type, flags: eflags, datamatch });
    }
  }
  r.end();
  return reply;
}

/**
 * How many fds a `DEVICE_GET_REGION_IO_FDS` reply must carry: one more than the highest fd index
 * its entries refer to (shadow-memory indexes of type-2 entries included), 0 if none.
 */
export function regionIoFdsFdCount(reply: Pick<RegionIoFdsReply, 'subRegions'>): number {
  let n = 0;
  for (const s of reply.subRegions) {
    n = Math.max(n, s.fdIndex + 1);
    if (s.type === 2 && s.shadowMemFdIndex !== undefined) n = Math.max(n, s.shadowMemFdIndex + 1);
  }
  return n;
}
