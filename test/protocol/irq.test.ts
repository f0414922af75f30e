import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  Command,
  IrqInfoFlags,
  IrqSetFlags,
  PciIrq,
  decodeIrqInfoReply,
  decodeIrqInfoRequest,
  decodeSetIrqsReply,
  decodeSetIrqsRequest,
  encodeIrqInfoReply,
  encodeIrqInfoRequest,
  encodeMessage,
  encodeSetIrqsReply,
  encodeSetIrqsRequest,
  setIrqsFdCount,
  setIrqsFdsValid,
  setIrqsPayloadSize,
} from '../../lib/protocol';
import { arbU32, concat, dump, extended, hex, payloadOf, truncated, u32le, withU32 } from '../helpers/bytes';

// Appendix B.4: MSI-X vectors 0 and 1 to two eventfds, msg_id 9.
const B4 = dump(`
0000: 09 00 08 00 24 00 00 00 00 00 00 00 00 00 00 00   id 9, cmd 8, size 36
0010: 14 00 00 00 24 00 00 00 02 00 00 00 00 00 00 00   argsz 20, flags 0x24 (EVENTFD|TRIGGER), index 2, start 0
0020: 02 00 00 00                                       count 2
`);

const setIrqs = (flags: number, index: number, start: number, count: number, data: number[] = []): Buffer =>
  concat(u32le(20 + data.length), u32le(flags), u32le(index), u32le(start), u32le(count), data);

describe('DEVICE_GET_IRQ_INFO', () => {
  it('request and reply as in the trace (ERR index: EVENTFD, count 1)', () => {
    const req = encodeIrqInfoRequest({ index: PciIrq.ERR });
    expect(req).toEqual(hex('10000000 00000000 03000000 00000000'));
    expect(decodeIrqInfoRequest(req)).toEqual({ argsz: 16, flags: 0, index: 3, count: 0 });
    const rep = encodeIrqInfoReply({ flags: IrqInfoFlags.EVENTFD, index: PciIrq.ERR, count: 1 });
    expect(rep).toEqual(hex('10000000 01000000 03000000 01000000'));
    expect(decodeIrqInfoReply(rep)).toEqual({ argsz: 16, flags: 1, index: 3, count: 1 });
  });

  it('rejects truncated, extended and argsz < 16', () => {
    const p = encodeIrqInfoReply({ flags: 1, index: 2, count: 8 });
    for (const d of [decodeIrqInfoRequest, decodeIrqInfoReply]) {
      expect(() => d(truncated(p))).toThrow(/truncated/);
      expect(() => d(extended(p))).toThrow(/trailing/);
      expect(() => d(withU32(p, 0, 12))).toThrow(/argsz 12/);
    }
  });

  it('round-trips', () => {
    fc.assert(
      fc.property(fc.integer({ min: 16, max: 0xffffffff }), arbU32, arbU32, arbU32, (argsz, flags, index, count) => {
        expect(decodeIrqInfoReply(encodeIrqInfoReply({ argsz, flags, index, count }))).toEqual({ argsz, flags, index, count });
      }),
    );
  });
});

describe('DEVICE_SET_IRQS', () => {
  it('encodes B.4 exactly and reports the two expected eventfds', () => {
    const p = encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, index: PciIrq.MSIX, start: 0, count: 2 });
    expect(encodeMessage({ msgId: 9, command: Command.DEVICE_SET_IRQS }, p)).toEqual(B4);
    const r = decodeSetIrqsRequest(payloadOf(B4));
    expect(r).toEqual({ argsz: 20, flags: 0x24, index: 2, start: 0, count: 2, data: null });
    expect(setIrqsFdCount(r)).toBe(2);
    expect(setIrqsFdsValid(r, 2)).toBe(true);
    expect(setIrqsFdsValid(r, 0)).toBe(true); // de-assign
    expect(setIrqsFdsValid(r, 1)).toBe(false);
    expect(setIrqsFdsValid(r, 3)).toBe(false);
  });

  it('decodes every sequence QEMU sends for INTx/ERR (peers.md §2)', () => {
    for (const flags of [0x24, 0x09, 0x14, 0x11, 0x21]) {
      const count = flags === 0x21 ? 0 : 1;
      const r = decodeSetIrqsRequest(setIrqs(flags, 0, 0, count));
      expect(r.flags).toBe(flags);
      expect(setIrqsFdCount(r)).toBe(flags & IrqSetFlags.DATA_EVENTFD ? 1 : 0);
    }
    const none = decodeSetIrqsRequest(setIrqs(0x09, 0, 0, 1));
    expect(setIrqsFdsValid(none, 0)).toBe(true);
    expect(setIrqsFdsValid(none, 1)).toBe(false); // fds only with DATA_EVENTFD
  });

  it('DATA_BOOL carries count bytes, argsz 20 + count', () => {
    const p = encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, index: 1, start: 4, count: 3, data: hex('01 00 01') });
    expect(p).toEqual(setIrqs(0x0a, 1, 4, 3, [1, 0, 1]));
    expect(p.byteLength).toBe(setIrqsPayloadSize(0x0a, 3));
    const r = decodeSetIrqsRequest(p);
    expect(r.argsz).toBe(23);
    expect(r.data).toEqual(hex('01 00 01'));
    expect(() => decodeSetIrqsRequest(truncated(p))).toThrow(/count 3 disagrees/);
    expect(() => decodeSetIrqsRequest(extended(p))).toThrow(/count 3 disagrees/);
  });

  it('rejects lying argsz, data without DATA_BOOL, and truncation', () => {
    expect(() => decodeSetIrqsRequest(withU32(payloadOf(B4), 0, 24))).toThrow(/argsz 24 is not the 20-byte/);
    expect(() => decodeSetIrqsRequest(withU32(payloadOf(B4), 0, 16))).toThrow(/argsz 16/);
    expect(() => decodeSetIrqsRequest(extended(payloadOf(B4)))).toThrow(/trailing/);
    expect(() => decodeSetIrqsRequest(truncated(payloadOf(B4)))).toThrow(/count is truncated/);
  });

  it.each([
    [0x20, 'needs exactly one DATA'],
    [0x07 | 0x20, 'needs exactly one DATA'],
    [0x05 | 0x20, 'needs exactly one DATA'],
    [0x01, 'needs exactly one ACTION'],
    [0x01 | 0x18, 'needs exactly one ACTION'],
    [0x01 | 0x20 | 0x40, 'unknown bits'],
  ])('rejects flags 0x%s', (flags, msg) => {
    expect(() => decodeSetIrqsRequest(setIrqs(flags, 0, 0, 1))).toThrow(new RegExp(msg));
  });

  it('encoder refuses inconsistent data', () => {
    expect(() => encodeSetIrqsRequest({ flags: 0x22, index: 0, start: 0, count: 2, data: hex('01') })).toThrow(RangeError);
    expect(() => encodeSetIrqsRequest({ flags: 0x22, index: 0, start: 0, count: 1 })).toThrow(TypeError);
    expect(() => encodeSetIrqsRequest({ flags: 0x24, index: 0, start: 0, count: 1, data: hex('01') })).toThrow(TypeError);
  });

  it('reply is header-only', () => {
    expect(encodeSetIrqsReply().byteLength).toBe(0);
    expect(decodeSetIrqsReply(Buffer.alloc(0))).toBeNull();
    expect(() => decodeSetIrqsReply(Buffer.alloc(4))).toThrow(/expected no payload/);
  });

  it('round-trips every valid flag combination', () => {
    const data = fc.constantFrom(0x01, 0x02, 0x04);
    const action = fc.constantFrom(0x08, 0x10, 0x20);
    fc.assert(
      fc.property(data, action, arbU32, arbU32, fc.uint8Array({ maxLength: 40 }), fc.nat(40), (d, a, index, start, bytes, n) => {
        const flags = d | a;
        const bool = d === IrqSetFlags.DATA_BOOL;
        const count = bool ? bytes.length : n;
        const m = { flags, index, start, count, data: bool ? Buffer.from(bytes) : null };
        expect(decodeSetIrqsRequest(encodeSetIrqsRequest(m))).toEqual({ argsz: 20 + (bool ? count : 0), ...m });
      }),
    );
  });
});
