import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  AccessKind,
  Command,
  DmaLayout,
  HEADER_SIZE,
  ProtocolError,
  createDmaAccess,
  createRegionAccess,
  decodeDmaReadReply,
  decodeDmaReadRequest,
  decodeDmaWriteReply,
  decodeDmaWriteRequest,
  decodeHeader,
  decodeRegionReadReply,
  decodeRegionReadRequest,
  decodeRegionWriteMultiReply,
  decodeRegionWriteMultiRequest,
  decodeRegionWriteReply,
  decodeRegionWriteRequest,
  dmaAccessSize,
  encodeDmaReadReply,
  encodeDmaReadRequest,
  encodeDmaWriteReply,
  encodeDmaWriteRequest,
  encodeHeader,
  encodeMessage,
  encodeRegionReadReply,
  encodeRegionReadRequest,
  encodeRegionWriteMultiReply,
  encodeRegionWriteMultiRequest,
  encodeRegionWriteReply,
  encodeRegionWriteRequest,
  readDmaAccess,
  readRegionAccess,
  regionAccessSize,
  regionWriteMultiSize,
  writeDmaAccess,
  writeRegionAccess,
} from '../../lib/protocol';
import { arbBytes, arbU32, arbU64, atOffset, concat, dump, extended, hex, payloadOf, truncated, u32le, u64le, withU32, withU64 } from '../helpers/bytes';

// Appendix B.2: REGION_READ of 4 bytes at 0x10 of BAR0, msg_id 7; reply value 0x12345678.
const B2_REQUEST = dump(`
0000: 07 00 09 00 20 00 00 00 00 00 00 00 00 00 00 00   id 7, cmd 9, size 32, command
0010: 10 00 00 00 00 00 00 00 00 00 00 00 04 00 00 00   offset 0x10, region 0, count 4
`);
const B2_REPLY = dump(`
0000: 07 00 09 00 24 00 00 00 01 00 00 00 00 00 00 00   id 7, cmd 9, size 36, flags = reply
0010: 10 00 00 00 00 00 00 00 00 00 00 00 04 00 00 00   offset, region, count echoed
0020: 78 56 34 12                                       data
`);

const viewOf = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset, b.byteLength);

describe('REGION_READ / REGION_WRITE', () => {
  it('encodes B.2 exactly', () => {
    expect(encodeMessage({ msgId: 7, command: Command.REGION_READ }, encodeRegionReadRequest({ offset: 0x10n, region: 0, count: 4 }))).toEqual(B2_REQUEST);
    expect(encodeMessage({ msgId: 7, command: Command.REGION_READ, flags: 1 }, encodeRegionReadReply({ offset: 0x10n, region: 0, data: hex('78 56 34 12') }))).toEqual(B2_REPLY);
  });

  it('decodes B.2', () => {
    expect(decodeRegionReadRequest(payloadOf(B2_REQUEST))).toEqual({ offset: 0x10n, region: 0, count: 4, data: null });
    const r = decodeRegionReadReply(payloadOf(B2_REPLY));
    expect(r).toEqual({ offset: 0x10n, region: 0, count: 4, data: hex('78 56 34 12') });
    expect(r.data!.readUInt32LE(0)).toBe(0x12345678);
  });

  it('write request carries the data; the reply echoes without data (trace: CFG+0x30 4 bytes)', () => {
    const req = encodeRegionWriteRequest({ offset: 0x30n, region: 7, data: hex('00 f8 ff ff') });
    expect(req).toEqual(concat(u64le(0x30), u32le(7), u32le(4), hex('00 f8 ff ff')));
    expect(decodeRegionWriteRequest(req)).toEqual({ offset: 0x30n, region: 7, count: 4, data: hex('00 f8 ff ff') });
    const rep = encodeRegionWriteReply({ offset: 0x30n, region: 7, count: 4 });
    expect(rep).toEqual(concat(u64le(0x30), u32le(7), u32le(4)));
    expect(decodeRegionWriteReply(rep)).toEqual({ offset: 0x30n, region: 7, count: 4, data: null });
  });

  it('accepts libvfio-user header-only replies as count 0', () => {
    expect(decodeRegionReadReply(Buffer.alloc(0))).toEqual({ offset: 0n, region: 0, count: 0, data: Buffer.alloc(0) });
    expect(decodeRegionWriteReply(Buffer.alloc(0))).toEqual({ offset: 0n, region: 0, count: 0, data: null });
    // a count-0 reply with the echo is fine too
    expect(decodeRegionReadReply(concat(u64le(8), u32le(2), u32le(0)))).toEqual({ offset: 8n, region: 2, count: 0, data: Buffer.alloc(0) });
    // but requests may not be empty
    expect(() => decodeRegionReadRequest(Buffer.alloc(0))).toThrow(/truncated/);
    expect(() => decodeRegionWriteRequest(Buffer.alloc(0))).toThrow(/truncated/);
  });

  it('accepts a short read reply (count below the request) since the data matches count', () => {
    expect(decodeRegionReadReply(concat(u64le(0), u32le(7), u32le(2), hex('aa bb')))).toMatchObject({ count: 2 });
  });

  it('rejects lying counts, truncation and extra bytes', () => {
    const req = payloadOf(B2_REQUEST);
    const rep = payloadOf(B2_REPLY);
    expect(() => decodeRegionReadRequest(truncated(req))).toThrow(/truncated/);
    expect(() => decodeRegionReadRequest(extended(req))).toThrow(/1 unexpected trailing bytes/);
    expect(() => decodeRegionReadReply(truncated(rep))).toThrow(/count 4 disagrees with the 3 data bytes/);
    expect(() => decodeRegionReadReply(extended(rep))).toThrow(/count 4 disagrees with the 5 data bytes/);
    expect(() => decodeRegionReadReply(withU32(rep, 12, 0xffffffff))).toThrow(/count/);
    const wr = encodeRegionWriteRequest({ offset: 0n, region: 0, data: hex('01 02') });
    expect(() => decodeRegionWriteRequest(withU32(wr, 12, 3))).toThrow(/count 3 disagrees/);
    expect(() => decodeRegionWriteReply(extended(encodeRegionWriteReply({ offset: 0n, region: 0, count: 1 })))).toThrow(/trailing/);
    expect(() => decodeRegionWriteReply(Buffer.alloc(8))).toThrow(/truncated/);
  });

  describe('hot path', () => {
    it('readRegionAccess fills the caller object and returns zero-copy data', () => {
      const msg = Buffer.from(B2_REPLY);
      const out = createRegionAccess();
      const view = viewOf(msg);
      expect(readRegionAccess(view, HEADER_SIZE, msg.byteLength - HEADER_SIZE, AccessKind.READ_REPLY, out)).toBe(out);
      expect(out.count).toBe(4);
      msg[0x20] = 0xff;
      expect(out.data![0]).toBe(0xff); // a view into the message, not a copy
      expect(out.data!.buffer).toBe(msg.buffer);
      // reuse the same object for the next message
      readRegionAccess(viewOf(B2_REQUEST), HEADER_SIZE, 16, AccessKind.READ_REQUEST, out);
      expect(out).toEqual({ offset: 0x10n, region: 0, count: 4, data: null });
    });

    it('reads a payload in the middle of a larger receive buffer', () => {
      const stream = concat(B2_REQUEST, B2_REPLY, B2_REQUEST);
      const at = B2_REQUEST.byteLength;
      const h = decodeHeader(stream, at);
      const out = readRegionAccess(viewOf(atOffset(stream)), at + HEADER_SIZE, h.msgSize - HEADER_SIZE, AccessKind.READ_REPLY, createRegionAccess());
      expect(out.data).toEqual(hex('78 56 34 12'));
      expect(() => readRegionAccess(viewOf(stream), stream.byteLength - 4, 16, AccessKind.READ_REQUEST, out)).toThrow(RangeError);
    });

    it('writeRegionAccess writes header+struct into a preallocated buffer', () => {
      const buf = Buffer.alloc(64, 0xee);
      const n = writeRegionAccess(buf, HEADER_SIZE, { offset: 0x10n, region: 0, count: 4 });
      expect(n).toBe(16);
      encodeHeader(buf, 0, { msgId: 7, command: Command.REGION_READ, msgSize: HEADER_SIZE + n });
      expect(buf.subarray(0, 32)).toEqual(B2_REQUEST);
      expect(buf.subarray(32)).toEqual(Buffer.alloc(32, 0xee));
      expect(writeRegionAccess(buf, 0, { offset: 1n, region: 2, count: 2 }, hex('aa bb'))).toBe(18);
      expect(buf.subarray(16, 18)).toEqual(hex('aa bb'));
      expect(() => writeRegionAccess(buf, 50, { offset: 0n, region: 0, count: 0 })).toThrow(RangeError);
      expect(() => writeRegionAccess(buf, 0, { offset: 0n, region: 0, count: 3 }, hex('aa'))).toThrow(RangeError);
    });
  });

  it('round-trips all four messages', () => {
    fc.assert(
      fc.property(arbU64, arbU32, arbBytes(64), fc.nat(8), (offset, region, data, pad) => {
        expect(decodeRegionReadRequest(atOffset(encodeRegionReadRequest({ offset, region, count: data.length }), pad))).toEqual({ offset, region, count: data.length, data: null });
        expect(decodeRegionReadReply(atOffset(encodeRegionReadReply({ offset, region, data }), pad))).toEqual({ offset, region, count: data.length, data });
        expect(decodeRegionWriteRequest(encodeRegionWriteRequest({ offset, region, data }))).toEqual({ offset, region, count: data.length, data });
        expect(decodeRegionWriteReply(encodeRegionWriteReply({ offset, region, count: data.length }))).toEqual({ offset, region, count: data.length, data: null });
        expect(regionAccessSize(AccessKind.READ_REPLY, data.length)).toBe(16 + data.length);
      }),
    );
  });
});

describe('DMA_READ / DMA_WRITE', () => {
  const spec = (address: bigint, count: bigint, data: number[] = []): Buffer => concat(u64le(address), u64le(count), data);
  const qemu = (address: bigint, count: number, data: number[] = []): Buffer => concat(u64le(address), u32le(count), data);

  it('spec layout: u64 count, data at 16', () => {
    expect(encodeDmaReadRequest({ address: 0x1000n, count: 4 })).toEqual(spec(0x1000n, 4n));
    expect(decodeDmaReadRequest(spec(0x1000n, 4n))).toEqual({ address: 0x1000n, count: 4, data: null, layout: DmaLayout.SPEC });
    expect(encodeDmaReadReply({ address: 0x1000n, data: hex('01 02 03 04') })).toEqual(spec(0x1000n, 4n, [1, 2, 3, 4]));
    expect(decodeDmaReadReply(spec(0x1000n, 4n, [1, 2, 3, 4]))).toEqual({ address: 0x1000n, count: 4, data: hex('01 02 03 04'), layout: DmaLayout.SPEC });
    expect(encodeDmaWriteRequest({ address: 0x2000n, data: hex('aa') })).toEqual(spec(0x2000n, 1n, [0xaa]));
    expect(decodeDmaWriteRequest(spec(0x2000n, 1n, [0xaa]))).toMatchObject({ count: 1, data: hex('aa'), layout: DmaLayout.SPEC });
    expect(encodeDmaWriteReply({ address: 0x2000n, count: 1 })).toEqual(spec(0x2000n, 1n));
  });

  it("accepts the QEMU client's layout: u32 count, data at 12 (reference 3.11)", () => {
    const reply = qemu(0x1000n, 4, [1, 2, 3, 4]);
    expect(decodeDmaReadReply(reply)).toEqual({ address: 0x1000n, count: 4, data: hex('01 02 03 04'), layout: DmaLayout.QEMU });
    expect(encodeDmaReadReply({ address: 0x1000n, data: hex('01 02 03 04') }, DmaLayout.QEMU)).toEqual(reply);
    expect(decodeDmaReadRequest(qemu(0x1000n, 4))).toEqual({ address: 0x1000n, count: 4, data: null, layout: DmaLayout.QEMU });
    expect(decodeDmaWriteRequest(qemu(0x1000n, 2, [9, 8]))).toMatchObject({ count: 2, data: hex('09 08'), layout: DmaLayout.QEMU });
  });

  it('tells the layouts apart even when the data looks like a count', () => {
    // QEMU reply of 4 zero bytes: the spec reading would see count 4 with 0 data bytes
    expect(decodeDmaReadReply(qemu(0n, 4, [0, 0, 0, 0]))).toMatchObject({ layout: DmaLayout.QEMU, count: 4 });
    // spec reply with 0 bytes: QEMU reading would see count 0 and 4 data bytes
    expect(decodeDmaReadReply(spec(0n, 0n))).toMatchObject({ layout: DmaLayout.SPEC, count: 0 });
    fc.assert(
      fc.property(arbU64, arbBytes(40), (address, data) => {
        expect(decodeDmaReadReply(encodeDmaReadReply({ address, data }, DmaLayout.SPEC)).layout).toBe(DmaLayout.SPEC);
        expect(decodeDmaReadReply(encodeDmaReadReply({ address, data }, DmaLayout.QEMU)).layout).toBe(DmaLayout.QEMU);
      }),
    );
  });

  it('DMA_WRITE reply: 16, 12 or 0 bytes (reference 3.12, 8.3)', () => {
    expect(decodeDmaWriteReply(spec(0x3000n, 8n))).toEqual({ address: 0x3000n, count: 8, data: null, layout: DmaLayout.SPEC });
    expect(decodeDmaWriteReply(qemu(0x3000n, 8))).toEqual({ address: 0x3000n, count: 8, data: null, layout: DmaLayout.QEMU });
    expect(decodeDmaWriteReply(Buffer.alloc(0))).toEqual({ address: 0n, count: 0, data: null, layout: DmaLayout.NONE });
    expect(encodeDmaWriteReply({ address: 1n, count: 1 }, DmaLayout.NONE).byteLength).toBe(0);
    for (const n of [8, 11, 13, 15, 17, 24]) expect(() => decodeDmaWriteReply(Buffer.alloc(n))).toThrow(ProtocolError);
  });

  it('DMA_READ reply may be header-only (count 0)', () => {
    expect(decodeDmaReadReply(Buffer.alloc(0))).toMatchObject({ count: 0, layout: DmaLayout.NONE, data: Buffer.alloc(0) });
    expect(() => decodeDmaReadRequest(Buffer.alloc(0))).toThrow(/truncated/);
    expect(() => decodeDmaWriteRequest(Buffer.alloc(0))).toThrow(/truncated/);
  });

  it('rejects lying counts and wrong lengths', () => {
    expect(() => decodeDmaReadReply(truncated(spec(0n, 4n, [1, 2, 3, 4])))).toThrow(/count disagrees/);
    expect(() => decodeDmaReadReply(extended(spec(0n, 4n, [1, 2, 3, 4])))).toThrow(/count disagrees/);
    expect(() => decodeDmaWriteRequest(withU64(spec(0n, 1n, [1]), 8, 2n ** 32n + 1n))).toThrow(ProtocolError);
    expect(() => decodeDmaReadRequest(extended(spec(0n, 4n)))).toThrow(/17 bytes/);
    expect(() => decodeDmaReadRequest(truncated(spec(0n, 4n)))).toThrow(/15 bytes/);
    expect(() => decodeDmaReadRequest(spec(0n, 2n ** 60n))).toThrow(/safe integer/);
    expect(decodeDmaReadRequest(spec(0n, 2n ** 53n - 1n)).count).toBe(Number.MAX_SAFE_INTEGER);
  });

  describe('hot path', () => {
    it('readDmaAccess fills the caller object with a zero-copy view', () => {
      const msg = encodeMessage({ msgId: 1, command: Command.DMA_WRITE }, spec(0x4000n, 3n, [1, 2, 3]));
      const out = createDmaAccess();
      expect(readDmaAccess(viewOf(msg), 16, msg.byteLength - 16, AccessKind.WRITE_REQUEST, out)).toBe(out);
      msg[32] = 0x77;
      expect(out.data![0]).toBe(0x77);
      expect(out).toMatchObject({ address: 0x4000n, count: 3, layout: DmaLayout.SPEC });
    });

    it('writeDmaAccess writes into a caller buffer in either layout', () => {
      const buf = Buffer.alloc(40, 0xee);
      expect(writeDmaAccess(buf, 4, { address: 0x10n, count: 2 }, hex('aa bb'))).toBe(18);
      expect(buf.subarray(4, 22)).toEqual(spec(0x10n, 2n, [0xaa, 0xbb]));
      expect(buf.subarray(22)).toEqual(Buffer.alloc(18, 0xee));
      expect(writeDmaAccess(buf, 0, { address: 0x10n, count: 2 }, undefined, DmaLayout.QEMU)).toBe(12);
      expect(buf.subarray(0, 12)).toEqual(qemu(0x10n, 2));
      expect(writeDmaAccess(buf, 0, { address: 0n, count: 2 ** 40 })).toBe(16);
      expect(buf.readBigUInt64LE(8)).toBe(2n ** 40n);
      expect(() => writeDmaAccess(buf, 30, { address: 0n, count: 0 })).toThrow(RangeError);
      expect(() => writeDmaAccess(buf, 0, { address: 0n, count: 2 ** 33 }, undefined, DmaLayout.QEMU)).toThrow(RangeError);
    });
  });

  it('round-trips both layouts', () => {
    fc.assert(
      fc.property(arbU64, arbBytes(48), fc.constantFrom(DmaLayout.SPEC, DmaLayout.QEMU), (address, data, layout) => {
        const count = data.length;
        expect(decodeDmaReadRequest(encodeDmaReadRequest({ address, count }, layout))).toEqual({ address, count, data: null, layout });
        expect(decodeDmaReadReply(encodeDmaReadReply({ address, data }, layout))).toEqual({ address, count, data, layout });
        expect(decodeDmaWriteRequest(encodeDmaWriteRequest({ address, data }, layout))).toEqual({ address, count, data, layout });
        expect(decodeDmaWriteReply(encodeDmaWriteReply({ address, count }, layout))).toEqual({ address, count, data: null, layout });
        expect(encodeDmaWriteRequest({ address, data }, layout).byteLength).toBe(dmaAccessSize(AccessKind.WRITE_REQUEST, count, layout));
      }),
    );
  });
});

describe('REGION_WRITE_MULTI', () => {
  const entry = (offset: number, region: number, count: number, data: number[]): Buffer =>
    concat(u64le(offset), u32le(region), u32le(count), Buffer.concat([Buffer.from(data), Buffer.alloc(8 - data.length)]));

  it('encodes entries of 24 bytes with left-aligned data', () => {
    const p = encodeRegionWriteMultiRequest([
      { offset: 0x1000n, region: 0, data: hex('01 00 00 00') },
      { offset: 0x2008n, region: 2, data: hex('ff ff ff ff ff ff ff ff') },
    ]);
    expect(p).toEqual(concat(u64le(2), entry(0x1000, 0, 4, [1, 0, 0, 0]), entry(0x2008, 2, 8, [255, 255, 255, 255, 255, 255, 255, 255])));
    expect(p.byteLength).toBe(regionWriteMultiSize(2));
    const r = decodeRegionWriteMultiRequest(p);
    expect(r.wrCnt).toBe(2);
    expect(r.wrs[0]).toEqual({ offset: 0x1000n, region: 0, count: 4, data: hex('01 00 00 00') });
  });

  it('ignores bytes beyond count in the data field', () => {
    const p = concat(u64le(1), entry(0, 1, 2, [0xaa, 0xbb, 0xcc, 0xdd]));
    expect(decodeRegionWriteMultiRequest(p).wrs[0]!.data).toEqual(hex('aa bb'));
  });

  it('rejects a lying wr_cnt, counts outside 1..8, truncation', () => {
    const p = concat(u64le(1), entry(0, 1, 2, [1, 2]));
    expect(() => decodeRegionWriteMultiRequest(withU64(p, 0, 2n))).toThrow(/wr_cnt 2 disagrees/);
    expect(() => decodeRegionWriteMultiRequest(withU64(p, 0, 2n ** 64n - 1n))).toThrow(/wr_cnt/);
    expect(() => decodeRegionWriteMultiRequest(truncated(p))).toThrow(/wr_cnt/);
    expect(() => decodeRegionWriteMultiRequest(extended(p))).toThrow(/wr_cnt/);
    expect(() => decodeRegionWriteMultiRequest(withU32(p, 20, 0))).toThrow(/count 0 is outside 1..8/);
    expect(() => decodeRegionWriteMultiRequest(withU32(p, 20, 9))).toThrow(/count 9/);
    expect(() => decodeRegionWriteMultiRequest(Buffer.alloc(7))).toThrow(/truncated/);
    expect(decodeRegionWriteMultiRequest(u64le(0))).toEqual({ wrCnt: 0, wrs: [] });
  });

  it('reply: 8-byte wr_cnt', () => {
    expect(encodeRegionWriteMultiReply({ wrCnt: 200 })).toEqual(u64le(200));
    expect(decodeRegionWriteMultiReply(u64le(200))).toEqual({ wrCnt: 200 });
    expect(() => decodeRegionWriteMultiReply(extended(u64le(1)))).toThrow(/trailing/);
    expect(() => decodeRegionWriteMultiReply(u64le(2n ** 63n))).toThrow(/out of range/);
  });

  it('round-trips', () => {
    const w = fc.record({ offset: arbU64, region: arbU32, data: fc.uint8Array({ minLength: 1, maxLength: 8 }).map((a) => Buffer.from(a)) });
    fc.assert(
      fc.property(fc.array(w, { maxLength: 10 }), (wrs) => {
        const r = decodeRegionWriteMultiRequest(encodeRegionWriteMultiRequest(wrs));
        expect(r.wrCnt).toBe(wrs.length);
        expect(r.wrs).toEqual(wrs.map((e) => ({ ...e, count: e.data.length })));
      }),
    );
  });
});
