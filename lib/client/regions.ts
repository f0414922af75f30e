/**
 * Device regions as the client sees them: what `DEVICE_GET_REGION_INFO` said (reference §3.5), the
 * file descriptor a mappable region came with, and the local mmaps of its sparse areas (§6.7).
 *
 * A mappable region is described by a sparse-mmap capability whose areas are mapped from the
 * reply's fd at `region.offset + area.offset`. Everything outside the areas is reached with
 * `REGION_READ`/`REGION_WRITE` only. Peers differ in how many fds they attach:
 *
 * - one fd for all areas: the spec, current libvfio-user, our server (QEMU 11.1 accepts only this);
 * - one fd per area: libvfio-user 2022 (seen in `peer-traces/`: two fds for two areas);
 * - anything else cannot be attributed to areas: the fds are closed and the region is reported
 *   with {@link RegionInfo.mmapUnavailable} set, usable through messages only.
 *
 * @packageDocumentation
 */
import { binding } from '../native/binding';
import { Fd } from '../native/fd';
import { Mapping } from '../native/mapping';
import { Errno, RegionInfoFlags } from '../protocol/constants';
import { ProtocolError } from '../protocol/errors';
import type { RegionCapability, RegionInfoReply } from '../protocol/messages/region';

/** One mappable area of a region, relative to the region's start. */
export interface RegionArea {
  /** Start of the area inside the region. */
  readonly offset: number;
  /** Length of the area in bytes. */
  readonly size: number;
}

/** What the server reported for one region index (reference §3.5, §4.2). */
export interface RegionInfo {
  /** Region index (0-5 BARs, 6 ROM, 7 config space, 8 VGA, >= 9 device-specific). */
  readonly index: number;
  /** Raw {@link RegionInfoFlags} of the reply (READ, WRITE, MMAP, CAPS). */
  readonly flags: number;
  /** Size in bytes; 0 = the region is not implemented. */
  readonly size: number;
  /** Offset of the region in its file, the base for the areas' mmap offsets. */
  readonly fileOffset: bigint;
  /** READ flag: the server allows reads. (Some libvfio-user builds report config space with flags 0.) */
  readonly readable: boolean;
  /** WRITE flag: the server allows writes. */
  readonly writable: boolean;
  /** MMAP flag: the server offers (parts of) the region for mapping. */
  readonly mmapFlag: boolean;
  /** True when the areas can actually be mapped with {@link VfioUserClient.mmapRegion}. */
  readonly mappable: boolean;
  /** Why a region with the MMAP flag cannot be mapped (no fd, ambiguous fds), else null. */
  readonly mmapUnavailable: string | null;
  /** Mappable areas: the sparse-mmap capability, or the whole region when it has none. */
  readonly areas: readonly RegionArea[];
  /** The region-type capability of a device-specific region, if present. */
  readonly type: { readonly type: number; readonly subtype: number } | null;
  /** Every capability of the chain, decoded (unknown ones kept as bytes). */
  readonly capabilities: readonly RegionCapability[];
}

/** One mapped area: a zero-copy view of device memory shared with the server. */
export interface MappedArea {
  /** Start of the area inside the region. */
  readonly offset: number;
  /** Length of the area. */
  readonly size: number;
  /** The mapping itself (length `size`); unmapped when the region or the client is closed. */
  readonly mapping: Mapping;
}

/**
 * The local mmaps of one region's areas. Stores through {@link MappedArea.mapping}'s bytes reach
 * the device without a message; the server is not told about them (§6.5).
 *
 * Never write through the bytes of a region that is not {@link RegionInfo.writable}: the mapping
 * is read-only and such a store kills the process (SIGSEGV). Likewise a server that shrinks the
 * file under the mapping turns later accesses into SIGBUS; that is the trust a mapping implies.
 */
export class MappedRegion {
  readonly #areas: MappedArea[];
  #unmapped = false;

  /** @internal Built by {@link mapRegionAreas}. */
  constructor(
    readonly index: number,
    areas: MappedArea[],
  ) {
    this.#areas = areas;
  }

  /** The mapped areas, in the order the server listed them. */
  get areas(): readonly MappedArea[] {
    return this.#areas;
  }

  /** False once unmapped. */
  get mapped(): boolean {
    return !this.#unmapped;
  }

  /**
   * A zero-copy view of `[offset, offset + length)` of the region, if that range lies inside one
   * mapped area; otherwise null (use messages).
   */
  view(offset: number, length: number): Buffer | null {
    if (this.#unmapped) return null;
    for (const a of this.#areas) {
      if (offset >= a.offset && offset + length <= a.offset + a.size) {
        const start = offset - a.offset;
        return a.mapping.bytes.subarray(start, start + length);
      }
    }
    return null;
  }

  /** Unmaps every area at once (views read as length 0 afterwards). Idempotent. */
  unmap(): void {
    if (this.#unmapped) return;
    this.#unmapped = true;
    for (const a of this.#areas) a.mapping.unmapNow();
  }
}

/** @internal A region plus the fds that came with it (one per area, possibly the same Fd). */
export interface RegionRecord {
  info: RegionInfo;
  /** fd to map area i from; empty unless `info.mappable`. */
  areaFds: Fd[];
  mapped: MappedRegion | null;
}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/** The distinct fds of a record. */
function distinct(fds: readonly Fd[]): Fd[] {
  return [...new Set(fds)];
}

/**
 * @internal Builds a region record from a complete (not truncated) reply and the fds it carried.
 * Takes ownership of `fds`: they end up in the record or are closed (also when this throws).
 *
 * @throws {ProtocolError} for a size or area that does not fit a JS number.
 */
export function buildRegionRecord(reply: RegionInfoReply, fds: Fd[]): RegionRecord {
  try {
    return build(reply, fds);
  } catch (err) {
    Fd.closeAll(fds);
    throw err;
  }
}

function build(reply: RegionInfoReply, fds: Fd[]): RegionRecord {
  if (reply.size > MAX_SAFE) {
    throw new ProtocolError(`DEVICE_GET_REGION_INFO reply: region ${reply.index} size 0x${reply.size.toString(16)} is beyond 2^53`, {
      field: 'size',
      errno: Errno.EPROTO,
    });
  }
  const size = Number(reply.size);
  const flags = reply.flags;
  const sparse = reply.capabilities.find((c) => c.kind === 'sparse-mmap');
  const typeCap = reply.capabilities.find((c) => c.kind === 'type');
  const mmapFlag = (flags & RegionInfoFlags.MMAP) !== 0 && size > 0;

  let areas: RegionArea[] = [];
  if (sparse !== undefined && sparse.kind === 'sparse-mmap') {
    // The decoder checked every area against the region size, so both ends are safe integers.
    areas = sparse.areas.filter((a) => a.size > 0n).map((a) => ({ offset: Number(a.offset), size: Number(a.size) }));
  } else if (mmapFlag) {
    areas = [{ offset: 0, size }];
  }

  let areaFds: Fd[] = [];
  let unavailable: string | null = null;
  if (!mmapFlag) {
    // An fd without MMAP is useless to us; close it rather than trust it.
    Fd.closeAll(fds);
    areas = [];
  } else if (areas.length === 0) {
    Fd.closeAll(fds);
    unavailable = 'the sparse-mmap capability lists no areas';
  } else if (fds.length === 1) {
    areaFds = areas.map(() => fds[0]!);
  } else if (fds.length > 1 && fds.length === areas.length) {
    areaFds = fds.slice();
  } else {
    Fd.closeAll(fds);
    unavailable =
      fds.length === 0
        ? 'the reply carried no file descriptor'
        : `the reply carried ${String(fds.length)} file descriptors for ${String(areas.length)} areas`;
  }
  const mappable = areaFds.length > 0;

  const info: RegionInfo = Object.freeze({
    index: reply.index,
    flags,
    size,
    fileOffset: reply.offset,
    readable: (flags & RegionInfoFlags.READ) !== 0,
    writable: (flags & RegionInfoFlags.WRITE) !== 0,
    mmapFlag,
    mappable,
    mmapUnavailable: unavailable,
    areas: Object.freeze(areas),
    type: typeCap !== undefined && typeCap.kind === 'type' ? Object.freeze({ type: typeCap.type, subtype: typeCap.subtype }) : null,
    capabilities: Object.freeze(reply.capabilities.slice()),
  });
  return { info, areaFds, mapped: null };
}

/**
 * @internal Maps every area of `record` (once; later calls return the same object).
 *
 * @throws {ProtocolError} if an area cannot be mapped from the server's file (e.g. it lies past
 * the end of the file): the server described something it did not provide.
 */
export function mapRegionAreas(record: RegionRecord): MappedRegion {
  if (record.mapped !== null && record.mapped.mapped) return record.mapped;
  const { info } = record;
  const { PROT_READ, PROT_WRITE } = binding.constants;
  const prot = PROT_READ | (info.writable ? PROT_WRITE : 0);
  const done: MappedArea[] = [];
  try {
    info.areas.forEach((area, i) => {
      const fileOffset = info.fileOffset + BigInt(area.offset);
      const mapping = Mapping.map(record.areaFds[i]!, fileOffset, area.size, prot);
      done.push({ offset: area.offset, size: area.size, mapping });
    });
  } catch (err) {
    for (const a of done) a.mapping.unmapNow();
    throw new ProtocolError(`region ${String(info.index)}: cannot map its areas: ${(err as Error).message}`, {
      field: 'areas',
      errno: Errno.EPROTO,
      cause: err,
    });
  }
  record.mapped = new MappedRegion(info.index, done);
  return record.mapped;
}

/** @internal Unmaps and closes everything a record holds. */
export function releaseRegionRecord(record: RegionRecord): void {
  record.mapped?.unmap();
  record.mapped = null;
  const fds = distinct(record.areaFds);
  record.areaFds = [];
  Fd.closeAll(fds);
}
