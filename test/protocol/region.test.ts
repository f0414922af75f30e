import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  Command,
  IoFdType,
  KvmIoeventfdFlags,
  ProtocolError,
  RegionCap,
  RegionInfoFlags,
  RegionType,
  RegionSubtypeMigrationV1,
  decodeRegionInfoReply,
  decodeRegionInfoRequest,
  decodeRegionIoFdsReply,
  decodeRegionIoFdsRequest,
  encodeMessage,
  encodeRegionInfoReply,
  encodeRegionInfoRequest,
  encodeRegionIoFdsReply,
  encodeRegionIoFdsRequest,
  regionInfoReplySize,
  regionIoFdsFdCount,
  regionIoFdsReplySize,
  sparseMmapCap,
  typeCap,
  type IoFdSubRegion,
  type RegionCapability,
  type RegionInfoInit,
} from '../../lib/protocol';
import { arbBytes, arbU32, arbU64, atOffset, concat, dump, extended, hex, payloadOf, truncated, u16le, u32le, u64le, withU32 } from '../helpers/bytes';

// Appendix B.5: region 0, 16 KiB, R|W|MMAP, one sparse area [0x1000, 0x2000), msg_id 3.
const B5 = dump(`
0000: 03 00 05 00 50 00 00 00 01 00 00 00 00 00 00 00   size 80, reply
0010: 40 00 00 00 0f 00 00 00 00 00 00 00 20 00 00 00   argsz 64, flags R|W|MMAP|CAPS, index 0, cap_offset 32
0020: 00 40 00 00 00 00 00 00 00 00 00 00 00 00 00 00   size 0x4000, offset 0
0030: 01 00 01 00 00 00 00 00 01 00 00 00 00 00 00 00   cap id 1, version 1, next 0; nr_areas 1, reserved
0040: 00 10 00 00 00 00 00 00 00 10 00 00 00 00 00 00   area offset 0x1000, size 0x1000
`);
const B5_INFO: RegionInfoInit = {
  flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP,
  index: 0,
  size: 0x4000n,
  offset: 0n,
  capabilities: [sparseMmapCap([{ offset: 0x1000n, size: 0x1000n }])],
};

/** A capability header. */
const capHdr = (id: number, version: number, next: number): Buffer => concat(u16le(id), u16le(version), u32le(next));
/** A region-info fixed part. */
const fixed = (argsz: number, flags: number, capOffset: number, size: bigint, index = 0): Buffer =>
  concat(u32le(argsz), u32le(flags), u32le(index), u32le(capOffset), u64le(size), u64le(0));

describe('DEVICE_GET_REGION_INFO request', () => {
  it('encodes what QEMU sends (argsz 32, then the full argsz)', () => {
    const m = encodeMessage({ msgId: 7, command: Command.DEVICE_GET_REGION_INFO }, encodeRegionInfoRequest({ index: 0 }));
    expect(m).toEqual(dump(`
0000: 07 00 05 00 30 00 00 00 00 00 00 00 00 00 00 00
0010: 20 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0020: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
`));
    expect(decodeRegionInfoRequest(encodeRegionInfoRequest({ index: 7, argsz: 80 }))).toEqual({ argsz: 80, flags: 0, index: 7, capOffset: 0, size: 0n, offset: 0n });
  });

  it('rejects truncated, extended and argsz < 32', () => {
    const p = encodeRegionInfoRequest({ index: 1 });
    expect(() => decodeRegionInfoRequest(truncated(p))).toThrow(ProtocolError);
    expect(() => decodeRegionInfoRequest(extended(p))).toThrow(/trailing/);
    expect(() => decodeRegionInfoRequest(withU32(p, 0, 31))).toThrow(/argsz 31/);
  });
});

describe('DEVICE_GET_REGION_INFO reply', () => {
  it('encodes B.5 exactly', () => {
    expect(encodeMessage({ msgId: 3, command: Command.DEVICE_GET_REGION_INFO, flags: 1 }, encodeRegionInfoReply(B5_INFO, 64))).toEqual(B5);
  });

  it('decodes B.5', () => {
    expect(decodeRegionInfoReply(payloadOf(B5))).toEqual({
      argsz: 64, flags: 0xf, index: 0, capOffset: 32, size: 0x4000n, offset: 0n, truncated: false,
      capabilities: [{ kind: 'sparse-mmap', version: 1, areas: [{ offset: 0x1000n, size: 0x1000n }] }],
    });
  });

  it('sends a partial reply (fixed part, argsz = needed, CAPS cleared, MMAP kept) when argsz is too small', () => {
    const p = encodeRegionInfoReply(B5_INFO, 32);
    expect(p).toEqual(fixed(64, 0x7, 0, 0x4000n));
    const r = decodeRegionInfoReply(p);
    expect(r.truncated).toBe(true);
    expect(r.argsz).toBe(64);
    expect(r.flags & RegionInfoFlags.MMAP).toBe(RegionInfoFlags.MMAP);
    expect(r.capabilities).toEqual([]);
  });

  it('decodes the LVU-2022 two-step exchange from the trace (argsz 80, sparse cap with two areas)', () => {
    // first answer: argsz=80 flags=0x7 size=0x3000, 32 bytes only
    expect(decodeRegionInfoReply(fixed(80, 7, 0, 0x3000n, 1))).toMatchObject({ truncated: true, argsz: 80, index: 1 });
    // second answer: 80 bytes, cap_offset 32, "+48 bytes of caps"
    const full = concat(fixed(80, 0xf, 32, 0x3000n, 1), capHdr(1, 1, 0), u32le(2), u32le(0),
      u64le(0x1000), u64le(0x1000), u64le(0x2000), u64le(0x1000));
    expect(decodeRegionInfoReply(full).capabilities).toEqual([sparseMmapCap([{ offset: 0x1000n, size: 0x1000n }, { offset: 0x2000n, size: 0x1000n }])]);
  });

  it('decodes a region without capabilities (config space, 256 bytes, R|W)', () => {
    const p = fixed(32, 3, 0, 0x100n, 7);
    expect(decodeRegionInfoReply(p)).toEqual({ argsz: 32, flags: 3, index: 7, capOffset: 0, size: 0x100n, offset: 0n, capabilities: [], truncated: false });
    expect(encodeRegionInfoReply({ flags: 3, index: 7, size: 0x100n }, 32)).toEqual(p);
  });

  it('type capability before sparse, as LVU-2022 lays out its migration region (32, then 48)', () => {
    const info: RegionInfoInit = {
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP,
      index: 9,
      size: 0x2000n,
      capabilities: [typeCap(RegionType.MIGRATION_V1, RegionSubtypeMigrationV1), sparseMmapCap([{ offset: 0x1000n, size: 0x1000n }])],
    };
    const p = encodeRegionInfoReply(info);
    expect(p).toEqual(concat(fixed(80, 0xf, 32, 0x2000n, 9), capHdr(2, 1, 48), u32le(3), u32le(1), capHdr(1, 1, 0), u32le(1), u32le(0), u64le(0x1000), u64le(0x1000)));
    expect(p.byteLength).toBe(regionInfoReplySize(info));
    expect(decodeRegionInfoReply(p).capabilities).toEqual(info.capabilities);
  });

  it('skips unknown capabilities by following next', () => {
    const p = concat(fixed(32 + 16 + 16, 0xf, 32, 0x1000n), capHdr(RegionCap.MSIX_MAPPABLE, 1, 48), hex('de ad be ef 00 00 00 00'),
      capHdr(1, 1, 0), u32le(0), u32le(0));
    expect(p.byteLength).toBe(64);
    const r = decodeRegionInfoReply(p);
    expect(r.capabilities).toEqual([
      { kind: 'unknown', id: 3, version: 1, data: hex('de ad be ef 00 00 00 00') },
      { kind: 'sparse-mmap', version: 1, areas: [] },
    ]);
  });

  it('follows next over gaps between capabilities', () => {
    const p = concat(fixed(32 + 16 + 8 + 16, 0xf, 32, 0x1000n), capHdr(2, 1, 56), u32le(1), u32le(2), Buffer.alloc(8), capHdr(1, 1, 0), u32le(0), u32le(0));
    expect(decodeRegionInfoReply(p).capabilities.map((c) => c.kind)).toEqual(['type', 'sparse-mmap']);
  });

  describe('rejects malformed chains', () => {
    const two = (firstNext: number, secondNext: number): Buffer =>
      concat(fixed(64, 0xf, 32, 0x1000n), capHdr(2, 1, firstNext), u32le(1), u32le(1), capHdr(2, 1, secondNext), u32le(1), u32le(1));

    it('is well-formed with forward links', () => {
      expect(decodeRegionInfoReply(two(48, 0)).capabilities).toHaveLength(2);
    });
    it('a self loop', () => {
      expect(() => decodeRegionInfoReply(two(32, 0))).toThrow(/does not move forward/);
    });
    it('a two-cap loop', () => {
      expect(() => decodeRegionInfoReply(two(48, 32))).toThrow(/loop/);
    });
    it('next beyond the payload', () => {
      expect(() => decodeRegionInfoReply(two(64, 0))).toThrow(/outside the 64-byte payload/);
      expect(() => decodeRegionInfoReply(two(0xffffffff, 0))).toThrow(ProtocolError);
    });
    it('next pointing inside the current capability', () => {
      expect(() => decodeRegionInfoReply(two(40, 0))).toThrow(/points inside/);
    });
    it('cap_offset before the fixed part or past the end', () => {
      expect(() => decodeRegionInfoReply(withU32(two(48, 0), 12, 16))).toThrow(/cap_offset 16/);
      expect(() => decodeRegionInfoReply(withU32(two(48, 0), 12, 60))).toThrow(/cap_offset 60/);
    });
    it('CAPS without room for a capability', () => {
      expect(() => decodeRegionInfoReply(fixed(32, 0xf, 32, 0x1000n))).toThrow(/cap_offset/);
    });
    it('capability bytes without CAPS', () => {
      expect(() => decodeRegionInfoReply(withU32(two(48, 0), 4, 7))).toThrow(/trailing/);
    });
    it('nr_areas larger than the room', () => {
      const p = concat(fixed(64, 0xf, 32, 0x4000n), capHdr(1, 1, 0), u32le(2), u32le(0), u64le(0), u64le(0x1000));
      expect(() => decodeRegionInfoReply(p)).toThrow(/nr_areas 2 areas do not fit/);
      const huge = withU32(payloadOf(B5), 40, 0xffffffff);
      expect(() => decodeRegionInfoReply(huge)).toThrow(/nr_areas/);
    });
    it('a sparse area outside the region', () => {
      const p = Buffer.from(payloadOf(B5));
      p.writeBigUInt64LE(0x3001n, 48); // [0x3001, 0x4001) in a 0x4000 region
      expect(() => decodeRegionInfoReply(p)).toThrow(/outside the 0x4000-byte region/);
      p.writeBigUInt64LE(0xfffffffffffff000n, 48); // overflow-safe
      expect(() => decodeRegionInfoReply(p)).toThrow(/outside/);
    });
    it('argsz that disagrees with the payload, or below 32', () => {
      expect(() => decodeRegionInfoReply(withU32(payloadOf(B5), 0, 72))).toThrow(/argsz 72 disagrees/);
      expect(() => decodeRegionInfoReply(withU32(payloadOf(B5), 0, 48))).toThrow(/argsz 48 disagrees/);
      expect(() => decodeRegionInfoReply(fixed(16, 0, 0, 0n))).toThrow(/argsz 16 is below/);
      expect(() => decodeRegionInfoReply(truncated(payloadOf(B5)))).toThrow(ProtocolError);
      expect(() => decodeRegionInfoReply(truncated(fixed(64, 7, 0, 0n)))).toThrow(/truncated/);
    });
    it('trailing bytes after the last capability', () => {
      const p = concat(fixed(56, 0xf, 32, 0x1000n), capHdr(2, 1, 0), u32le(1), u32le(1), Buffer.alloc(8));
      expect(() => decodeRegionInfoReply(p)).toThrow(/trailing/);
    });
  });

  it('round-trips any capability chain, complete or partial', () => {
    const area = fc.record({ offset: fc.bigInt({ min: 0n, max: 2n ** 40n }), size: fc.bigInt({ min: 0n, max: 2n ** 40n }) });
    const cap: fc.Arbitrary<RegionCapability> = fc.oneof(
      fc.record({ kind: fc.constant('sparse-mmap' as const), version: fc.nat(0xffff), areas: fc.array(area, { maxLength: 4 }) }),
      fc.record({ kind: fc.constant('type' as const), version: fc.nat(0xffff), type: arbU32, subtype: arbU32 }),
      fc.record({ kind: fc.constant('unknown' as const), id: fc.integer({ min: 3, max: 0xffff }), version: fc.nat(0xffff), data: arbBytes(24) }),
    );
    fc.assert(
      fc.property(fc.nat(7), arbU32, fc.array(cap, { maxLength: 4 }), arbU64, fc.integer({ min: 32, max: 400 }), (flags, index, capabilities, offset, requestArgsz) => {
        const info: RegionInfoInit = { flags, index, size: 2n ** 42n, offset, capabilities };
        const p = encodeRegionInfoReply(info, requestArgsz);
        const r = decodeRegionInfoReply(atOffset(p));
        const full = regionInfoReplySize(info);
        expect(r.argsz).toBe(full);
        expect(r.size).toBe(2n ** 42n);
        expect(r.offset).toBe(offset);
        expect(r.index).toBe(index);
        if (capabilities.length > 0 && full <= requestArgsz) {
          expect(r.flags).toBe(flags | RegionInfoFlags.CAPS);
          expect(r.capabilities).toEqual(capabilities);
          expect(r.truncated).toBe(false);
        } else {
          expect(r.flags).toBe(flags);
          expect(r.capabilities).toEqual([]);
          expect(r.truncated).toBe(capabilities.length > 0);
        }
      }),
    );
  });
});

describe('DEVICE_GET_REGION_IO_FDS', () => {
  const doorbell: IoFdSubRegion = { offset: 0x1000n, size: 4n, fdIndex: 0, type: IoFdType.IOEVENTFD, flags: KvmIoeventfdFlags.DATAMATCH, datamatch: 0x1234n };

  it('request: 16 bytes, argsz >= 16', () => {
    const p = encodeRegionIoFdsRequest({ index: 0, argsz: 56 });
    expect(p).toEqual(concat(u32le(56), u32le(0), u32le(0), u32le(0)));
    expect(decodeRegionIoFdsRequest(p)).toEqual({ argsz: 56, flags: 0, index: 0, count: 0 });
    expect(() => decodeRegionIoFdsRequest(withU32(p, 0, 15))).toThrow(/argsz 15/);
    expect(() => decodeRegionIoFdsRequest(truncated(p))).toThrow(ProtocolError);
    expect(() => decodeRegionIoFdsRequest(extended(p))).toThrow(ProtocolError);
  });

  it('reply: emits the spec 40-byte entry', () => {
    const p = encodeRegionIoFdsReply({ index: 0, subRegions: [doorbell] });
    expect(p).toEqual(concat(u32le(56), u32le(0), u32le(0), u32le(1),
      u64le(0x1000), u64le(4), u32le(0), u32le(0), u32le(1), u32le(0), u64le(0x1234)));
    expect(p.byteLength).toBe(regionIoFdsReplySize(1));
    const r = decodeRegionIoFdsReply(p);
    expect(r).toEqual({ argsz: 56, flags: 0, index: 0, count: 1, entrySize: 40, subRegions: [doorbell], truncated: false });
    expect(regionIoFdsFdCount(r)).toBe(1);
  });

  it('reply: parses libvfio-user 48-byte entries by stride (datamatch at 40)', () => {
    const entry = concat(u64le(0x2000), u64le(8), u32le(1), u32le(IoFdType.IOEVENTFD_SHADOW), u32le(0), u32le(0),
      u64le(0x40), u64le(0xabcd));
    const p = concat(u32le(16 + 96), u32le(0), u32le(0), u32le(2), entry, entry);
    const r = decodeRegionIoFdsReply(p);
    expect(r.entrySize).toBe(48);
    expect(r.subRegions[1]).toEqual({ offset: 0x2000n, size: 8n, fdIndex: 1, type: 2, flags: 0, shadowMemFdIndex: 0, shadowOffset: 0x40n, datamatch: 0xabcdn });
    expect(regionIoFdsFdCount(r)).toBe(2);
    expect(encodeRegionIoFdsReply({ index: 0, subRegions: r.subRegions, entrySize: 48 })).toEqual(p);
  });

  it('reply: partial (array and fds left out) when argsz is too small', () => {
    const p = encodeRegionIoFdsReply({ index: 2, subRegions: [doorbell, doorbell] }, 16);
    expect(p).toEqual(concat(u32le(96), u32le(0), u32le(2), u32le(2)));
    expect(decodeRegionIoFdsReply(p)).toMatchObject({ truncated: true, count: 2, argsz: 96, subRegions: [] });
  });

  it('reply: count 0', () => {
    const p = encodeRegionIoFdsReply({ index: 1, subRegions: [] });
    expect(decodeRegionIoFdsReply(p)).toEqual({ argsz: 16, flags: 0, index: 1, count: 0, entrySize: 0, subRegions: [], truncated: false });
  });

  it('rejects inconsistent replies', () => {
    const good = encodeRegionIoFdsReply({ index: 0, subRegions: [doorbell] });
    expect(() => decodeRegionIoFdsReply(truncated(good))).toThrow(/argsz 56 disagrees/);
    expect(() => decodeRegionIoFdsReply(withU32(good, 12, 2))).toThrow(/not a 40- or 48-byte stride/);
    expect(() => decodeRegionIoFdsReply(withU32(good, 12, 0))).toThrow(/trailing/);
    expect(() => decodeRegionIoFdsReply(concat(u32le(16 + 44), u32le(0), u32le(0), u32le(1), Buffer.alloc(44)))).toThrow(/stride/);
    expect(() => decodeRegionIoFdsReply(concat(u32le(56), u32le(0), u32le(0), u32le(0)))).toThrow(/count is 0/);
    expect(() => decodeRegionIoFdsReply(concat(u32le(8), u32le(0), u32le(0), u32le(0)))).toThrow(/argsz 8/);
  });

  it('round-trips both layouts', () => {
    const sub = fc.record({ offset: arbU64, size: arbU64, fdIndex: fc.nat(16), type: fc.constantFrom(0, 1), flags: arbU32, datamatch: arbU64 });
    fc.assert(
      fc.property(arbU32, fc.array(sub, { maxLength: 5 }), (index, subRegions) => {
        const r = decodeRegionIoFdsReply(encodeRegionIoFdsReply({ index, subRegions }));
        expect(r.subRegions).toEqual(subRegions);
        expect(r.count).toBe(subRegions.length);
        const lvu = subRegions.map((s) => ({ ...s, shadowMemFdIndex: 3, shadowOffset: 64n }));
        expect(decodeRegionIoFdsReply(encodeRegionIoFdsReply({ index, subRegions: lvu, entrySize: 48 })).subRegions).toEqual(lvu);
      }),
    );
  });
});
