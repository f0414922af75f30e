import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  Command,
  DmaMapFlags,
  DmaUnmapFlags,
  ProtocolError,
  decodeDmaMapReply,
  decodeDmaMapRequest,
  decodeDmaUnmapReply,
  decodeDmaUnmapRequest,
  dmaUnmapReplySize,
  encodeDmaMapReply,
  encodeDmaMapRequest,
  encodeDmaUnmapReply,
  encodeDmaUnmapRequest,
  encodeMessage,
} from '../../lib/protocol';
import { arbBytes, arbU32, arbU64, atOffset, concat, dump, extended, hex, payloadOf, truncated, u32le, u64le, withU32 } from '../helpers/bytes';

// Appendix B.6: DMA_MAP of [0x100000, 0x300000) read/write, fd attached, file offset 0.
const B6 = dump(`
0000: 02 00 02 00 30 00 00 00 00 00 00 00 00 00 00 00   id 2, cmd 2, size 48
0010: 20 00 00 00 03 00 00 00 00 00 00 00 00 00 00 00   argsz 32, flags R|W, offset 0
0020: 00 00 10 00 00 00 00 00 00 00 20 00 00 00 00 00   address 0x100000, size 0x200000
`);

// From peer-traces (QEMU 11.1 -> libvfio-user): DMA_UNMAP argsz=24 flags=0 iova=0x100000 size=0x7f00000,
// and libvfio-user's reply echoing the same 24 bytes.
const TRACE_UNMAP = concat(u32le(24), u32le(0), u64le(0x100000), u64le(0x7f00000));

describe('DMA_MAP', () => {
  it('encodes B.6 exactly', () => {
    const p = encodeDmaMapRequest({ flags: DmaMapFlags.READ | DmaMapFlags.WRITE, address: 0x100000n, size: 0x200000n });
    expect(encodeMessage({ msgId: 2, command: Command.DMA_MAP }, p)).toEqual(B6);
  });

  it('decodes B.6', () => {
    expect(decodeDmaMapRequest(payloadOf(B6))).toEqual({ argsz: 32, flags: 3, offset: 0n, address: 0x100000n, size: 0x200000n });
  });

  it('decodes the read-only map with a file offset QEMU sent during SeaBIOS (peer-traces)', () => {
    const p = concat(u32le(32), u32le(1), u64le(0xc3000), u64le(0xc3000), u64le(0xd000));
    expect(decodeDmaMapRequest(atOffset(p))).toEqual({ argsz: 32, flags: 1, offset: 0xc3000n, address: 0xc3000n, size: 0xd000n });
  });

  it('accepts libvfio-user MMAP/FILE_IO flags, rejects other bits', () => {
    const p = payloadOf(B6);
    expect(decodeDmaMapRequest(withU32(p, 4, 0xf)).flags).toBe(0xf);
    expect(() => decodeDmaMapRequest(withU32(p, 4, 0x13))).toThrow(/flags 0x13 has unknown bits/);
  });

  it('rejects truncated, extended, and lying-argsz requests', () => {
    const p = payloadOf(B6);
    expect(() => decodeDmaMapRequest(truncated(p))).toThrow(/size is truncated/);
    expect(() => decodeDmaMapRequest(extended(p))).toThrow(/trailing/);
    expect(() => decodeDmaMapRequest(withU32(p, 0, 31))).toThrow(/argsz 31/);
    expect(() => decodeDmaMapRequest(withU32(p, 0, 48))).toThrow(ProtocolError);
  });

  it('reply is header-only', () => {
    expect(encodeDmaMapReply().byteLength).toBe(0);
    expect(decodeDmaMapReply(Buffer.alloc(0))).toBeNull();
    expect(() => decodeDmaMapReply(Buffer.alloc(1))).toThrow(/expected no payload/);
  });

  it('round-trips', () => {
    fc.assert(
      fc.property(fc.nat(0xf), arbU64, arbU64, arbU64, (flags, offset, address, size) => {
        expect(decodeDmaMapRequest(encodeDmaMapRequest({ flags, offset, address, size }))).toEqual({ argsz: 32, flags, offset, address, size });
      }),
    );
  });
});

describe('DMA_UNMAP', () => {
  it('decodes the traced request and its echoed reply', () => {
    const want = { argsz: 24, flags: 0, address: 0x100000n, size: 0x7f00000n, bitmap: undefined };
    expect(decodeDmaUnmapRequest(TRACE_UNMAP)).toEqual(want);
    expect(encodeDmaUnmapRequest({ flags: 0, address: 0x100000n, size: 0x7f00000n })).toEqual(TRACE_UNMAP);
    expect(decodeDmaUnmapReply(TRACE_UNMAP)).toEqual(want);
    expect(encodeDmaUnmapReply(want)).toEqual(TRACE_UNMAP);
  });

  it('ALL: address and size must be 0, no bitmap', () => {
    const all = encodeDmaUnmapRequest({ flags: DmaUnmapFlags.ALL, address: 0n, size: 0n });
    expect(all).toEqual(hex('18000000 02000000 0000000000000000 0000000000000000'));
    expect(decodeDmaUnmapRequest(all).flags).toBe(DmaUnmapFlags.ALL);
    expect(() => decodeDmaUnmapRequest(concat(u32le(24), u32le(2), u64le(0x1000), u64le(0)))).toThrow(/must be 0 with ALL/);
    expect(() => decodeDmaUnmapRequest(concat(u32le(24), u32le(2), u64le(0), u64le(1)))).toThrow(/must be 0 with ALL/);
    expect(() => decodeDmaUnmapRequest(concat(u32le(56), u32le(3), u64le(0), u64le(0), u64le(4096), u64le(16)))).toThrow(/combines ALL/);
  });

  it('legacy GET_DIRTY_BITMAP request carries the 16-byte bitmap header', () => {
    const p = encodeDmaUnmapRequest({ flags: DmaUnmapFlags.GET_DIRTY_BITMAP, address: 0x100000n, size: 0x40000n, bitmap: { pgsize: 4096n, size: 8n } });
    expect(p).toEqual(concat(u32le(48), u32le(1), u64le(0x100000), u64le(0x40000), u64le(4096), u64le(8)));
    expect(decodeDmaUnmapRequest(p)).toEqual({ argsz: 48, flags: 1, address: 0x100000n, size: 0x40000n, bitmap: { pgsize: 4096n, size: 8n } });
    // flag without header, header without flag, argsz too small for the bitmap
    expect(() => decodeDmaUnmapRequest(concat(u32le(48), u32le(1), u64le(0), u64le(0)))).toThrow(/truncated/);
    expect(() => decodeDmaUnmapRequest(concat(u32le(48), u32le(0), u64le(0), u64le(0), u64le(4096), u64le(8)))).toThrow(/trailing/);
    expect(() => decodeDmaUnmapRequest(withU32(p, 0, 47))).toThrow(/argsz 47 is smaller than the 48-byte reply/);
  });

  it('legacy GET_DIRTY_BITMAP reply: echo, header, bitmap', () => {
    const bits = hex('ff 00 00 00 00 00 00 81');
    const p = encodeDmaUnmapReply({ argsz: 48, flags: 1, address: 0x100000n, size: 0x40000n, bitmap: { pgsize: 4096n, data: bits } });
    expect(p).toEqual(concat(u32le(48), u32le(1), u64le(0x100000), u64le(0x40000), u64le(4096), u64le(8), bits));
    expect(p.byteLength).toBe(dmaUnmapReplySize(8));
    const r = decodeDmaUnmapReply(p);
    expect(r.bitmap).toEqual({ pgsize: 4096n, size: 8n, data: bits });
    expect(() => decodeDmaUnmapReply(truncated(p))).toThrow(/bitmap.size 8 disagrees/);
    expect(() => decodeDmaUnmapReply(extended(p))).toThrow(/bitmap.size 8 disagrees/);
  });

  it('rejects unknown flags, wrong lengths and too-small argsz', () => {
    expect(() => decodeDmaUnmapRequest(withU32(TRACE_UNMAP, 4, 4))).toThrow(/unknown bits/);
    expect(() => decodeDmaUnmapRequest(truncated(TRACE_UNMAP))).toThrow(ProtocolError);
    expect(() => decodeDmaUnmapRequest(extended(TRACE_UNMAP))).toThrow(ProtocolError);
    expect(() => decodeDmaUnmapRequest(withU32(TRACE_UNMAP, 0, 23))).toThrow(/argsz 23/);
    expect(() => decodeDmaUnmapReply(extended(TRACE_UNMAP))).toThrow(/trailing/);
  });

  it('does not interpret the echoed argsz of a reply', () => {
    expect(decodeDmaUnmapReply(withU32(TRACE_UNMAP, 0, 0)).argsz).toBe(0);
  });

  it('round-trips requests and replies', () => {
    const bitmapCase = fc.record({ pgsize: arbU64, data: arbBytes(32) });
    fc.assert(
      fc.property(arbU32, arbU64, arbU64, fc.option(bitmapCase, { nil: undefined }), (argszExtra, address, size, bm) => {
        const flags = bm === undefined ? 0 : DmaUnmapFlags.GET_DIRTY_BITMAP;
        const bitmap = bm === undefined ? undefined : { pgsize: bm.pgsize, size: BigInt(bm.data.byteLength) };
        const need = bm === undefined ? 24 : 40 + bm.data.byteLength;
        const argsz = Math.min(need + argszExtra, 0xffffffff);
        expect(decodeDmaUnmapRequest(encodeDmaUnmapRequest({ argsz, flags, address, size, bitmap }))).toEqual({ argsz, flags, address, size, bitmap });
        const reply = decodeDmaUnmapReply(encodeDmaUnmapReply({ argsz, flags, address, size, bitmap: bm }));
        expect(reply).toEqual({ argsz, flags, address, size, bitmap: bm === undefined ? undefined : { ...bitmap, data: bm.data } });
      }),
    );
  });
});
