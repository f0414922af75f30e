import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  Command,
  DirtyPagesFlags,
  decodeDirtyPagesReply,
  decodeDirtyPagesRequest,
  decodeMigDataReadReply,
  decodeMigDataReadRequest,
  decodeMigDataWriteReply,
  decodeMigDataWriteRequest,
  dirtyPagesReplySize,
  encodeDirtyPagesReply,
  encodeDirtyPagesRequest,
  encodeMessage,
  encodeMigDataReadReply,
  encodeMigDataReadRequest,
  encodeMigDataWriteReply,
  encodeMigDataWriteRequest,
} from '../../lib/protocol';
import { arbBytes, arbU64, concat, extended, hex, truncated, u32le, u64le, withU32, withU64 } from '../helpers/bytes';

describe('MIG_DATA_READ', () => {
  it('request: argsz, size (24-byte message)', () => {
    const p = encodeMigDataReadRequest({ size: 4096 });
    expect(encodeMessage({ msgId: 1, command: Command.MIG_DATA_READ }, p)).toEqual(concat(hex('01 00 11 00 18 00 00 00 00 00 00 00 00 00 00 00'), u32le(4104), u32le(4096)));
    expect(decodeMigDataReadRequest(p)).toEqual({ argsz: 4104, size: 4096 });
  });

  it('request: argsz must leave room for size bytes (libvfio-user)', () => {
    expect(() => decodeMigDataReadRequest(concat(u32le(4103), u32le(4096)))).toThrow(/argsz 4103 has no room/);
    expect(() => decodeMigDataReadRequest(concat(u32le(8), u32le(0), [0]))).toThrow(/trailing/);
    expect(() => decodeMigDataReadRequest(hex('08 00 00 00 00 00 00'))).toThrow(/truncated/);
  });

  it('reply: trusts size, not msg_size (libvfio-user pads to the requested size)', () => {
    const padded = concat(u32le(11), u32le(3), hex('aa bb cc'), Buffer.alloc(4093));
    const r = decodeMigDataReadReply(padded);
    expect(r).toEqual({ argsz: 11, size: 3, data: hex('aa bb cc') });
    expect(decodeMigDataReadReply(concat(u32le(8), u32le(0)))).toEqual({ argsz: 8, size: 0, data: Buffer.alloc(0) });
    expect(encodeMigDataReadReply({ data: hex('aa bb cc') })).toEqual(concat(u32le(11), u32le(3), hex('aa bb cc')));
  });

  it('reply: size beyond the bytes present is rejected', () => {
    expect(() => decodeMigDataReadReply(concat(u32le(12), u32le(4), hex('aa bb cc')))).toThrow(/size 4 exceeds the 3 data bytes/);
    expect(() => decodeMigDataReadReply(concat(u32le(8), u32le(0xffffffff)))).toThrow(/size/);
  });
});

describe('MIG_DATA_WRITE', () => {
  it('request: argsz 8 + size, exactly size bytes', () => {
    const p = encodeMigDataWriteRequest({ data: hex('01 02 03') });
    expect(p).toEqual(concat(u32le(11), u32le(3), hex('01 02 03')));
    expect(decodeMigDataWriteRequest(p)).toEqual({ argsz: 11, size: 3, data: hex('01 02 03') });
    expect(() => decodeMigDataWriteRequest(truncated(p))).toThrow(/size 3 disagrees with the 2/);
    expect(() => decodeMigDataWriteRequest(extended(p))).toThrow(/size 3 disagrees with the 4/);
    expect(() => decodeMigDataWriteRequest(withU32(p, 0, 7))).toThrow(/argsz 7/);
  });

  it('reply is header-only', () => {
    expect(encodeMigDataWriteReply().byteLength).toBe(0);
    expect(decodeMigDataWriteReply(Buffer.alloc(0))).toBeNull();
    expect(() => decodeMigDataWriteReply(Buffer.alloc(8))).toThrow(/expected no payload/);
  });

  it('round-trips', () => {
    fc.assert(
      fc.property(arbBytes(100), fc.nat(100), (data, pad) => {
        expect(decodeMigDataWriteRequest(encodeMigDataWriteRequest({ data }))).toEqual({ argsz: 8 + data.length, size: data.length, data });
        expect(decodeMigDataReadReply(Buffer.concat([encodeMigDataReadReply({ data }), Buffer.alloc(pad)]))).toEqual({ argsz: 8 + data.length, size: data.length, data });
        expect(decodeMigDataReadRequest(encodeMigDataReadRequest({ size: data.length }))).toEqual({ argsz: 8 + data.length, size: data.length });
      }),
    );
  });
});

describe('DIRTY_PAGES (legacy, LVU-2022 layout)', () => {
  it('START and STOP: 8 bytes, header-only reply', () => {
    const start = encodeDirtyPagesRequest({ flags: DirtyPagesFlags.START });
    expect(start).toEqual(concat(u32le(8), u32le(1)));
    expect(decodeDirtyPagesRequest(start)).toEqual({ argsz: 8, flags: 1 });
    expect(decodeDirtyPagesRequest(concat(u32le(8), u32le(2)))).toEqual({ argsz: 8, flags: 2 });
    expect(encodeDirtyPagesReply().byteLength).toBe(0);
    expect(decodeDirtyPagesReply(Buffer.alloc(0))).toBeNull();
    expect(() => decodeDirtyPagesRequest(extended(start))).toThrow(/trailing/);
    expect(() => decodeDirtyPagesRequest(concat(u32le(4), u32le(1)))).toThrow(/argsz 4/);
  });

  it('GET_BITMAP: 32-byte range, bitmap at 40', () => {
    const range = { iova: 0x100000n, size: 0x40000n, bitmap: { pgsize: 4096n, size: 8n } };
    const req = encodeDirtyPagesRequest({ flags: DirtyPagesFlags.GET_BITMAP, range });
    expect(req).toEqual(concat(u32le(48), u32le(4), u64le(0x100000), u64le(0x40000), u64le(4096), u64le(8)));
    expect(decodeDirtyPagesRequest(req)).toEqual({ argsz: 48, flags: 4, range });
    const bitmap = hex('01 02 03 04 05 06 07 08');
    const rep = encodeDirtyPagesReply({ iova: 0x100000n, size: 0x40000n, pgsize: 4096n, bitmap });
    expect(rep).toEqual(concat(u32le(48), u32le(4), u64le(0x100000), u64le(0x40000), u64le(4096), u64le(8), bitmap));
    expect(rep.byteLength).toBe(dirtyPagesReplySize(8));
    expect(rep.subarray(40)).toEqual(bitmap);
    expect(decodeDirtyPagesReply(rep)).toEqual({ argsz: 48, flags: 4, range, bitmap });
  });

  it('rejects bad flags, lying argsz and bitmap sizes', () => {
    for (const f of [0, 3, 5, 8, 0x104]) expect(() => decodeDirtyPagesRequest(concat(u32le(8), u32le(f)))).toThrow(/not exactly one/);
    const range = { iova: 0n, size: 0x1000n, bitmap: { pgsize: 4096n, size: 8n } };
    const req = encodeDirtyPagesRequest({ flags: DirtyPagesFlags.GET_BITMAP, range });
    expect(() => decodeDirtyPagesRequest(withU32(req, 0, 47))).toThrow(/argsz 47 is smaller/);
    expect(() => decodeDirtyPagesRequest(withU64(req, 32, 2n ** 64n - 1n))).toThrow(/argsz/);
    expect(() => decodeDirtyPagesRequest(truncated(req))).toThrow(/truncated/);
    expect(() => decodeDirtyPagesRequest(concat(u32le(48), u32le(4)))).toThrow(/iova is truncated/);
    const rep = encodeDirtyPagesReply({ iova: 0n, size: 0x1000n, pgsize: 4096n, bitmap: Buffer.alloc(8) });
    expect(() => decodeDirtyPagesReply(truncated(rep))).toThrow(/bitmap.size 8 disagrees/);
    expect(() => decodeDirtyPagesReply(withU32(rep, 0, 40))).toThrow(/argsz 40 disagrees/);
    expect(() => decodeDirtyPagesReply(withU32(rep, 4, 1))).toThrow(/not GET_BITMAP/);
  });

  it('round-trips', () => {
    fc.assert(
      fc.property(arbU64, arbU64, arbU64, arbBytes(40), (iova, size, pgsize, bitmap) => {
        const range = { iova, size, bitmap: { pgsize, size: BigInt(bitmap.length) } };
        expect(decodeDirtyPagesRequest(encodeDirtyPagesRequest({ flags: DirtyPagesFlags.GET_BITMAP, range }))).toEqual({ argsz: 40 + bitmap.length, flags: 4, range });
        expect(decodeDirtyPagesReply(encodeDirtyPagesReply({ iova, size, pgsize, bitmap }))).toEqual({ argsz: 40 + bitmap.length, flags: 4, range, bitmap });
      }),
    );
  });
});
