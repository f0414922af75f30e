import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  Command,
  Errno,
  HEADER_SIZE,
  HeaderFlags,
  HeaderVerdicts,
  ProtocolError,
  createHeader,
  decodeHeader,
  encodeErrorReply,
  encodeHeader,
  encodeMessage,
  errorOf,
  isCommand,
  isError,
  isReply,
  maxCommandPayload,
  messageType,
  noReply,
  readHeader,
  validateHeader,
  type Header,
} from '../../lib/protocol';
import { arbU16, arbU32, dump, hex } from '../helpers/bytes';

// Appendix B.3: error reply to DEVICE_GET_REGION_INFO, msg_id 3, EINVAL.
const B3 = dump(`
0000: 03 00 05 00 10 00 00 00 21 00 00 00 16 00 00 00   size 16, flags 0x21 (reply|error), error 22
`);

const hdr = (h: Partial<Header>): Header => ({ msgId: 1, command: Command.DMA_MAP, msgSize: 48, flags: 0, error: 0, ...h });

describe('header codec', () => {
  it('encodes the B.3 error reply exactly', () => {
    const buf = Buffer.alloc(16, 0xaa);
    encodeErrorReply(buf, 0, 3, Command.DEVICE_GET_REGION_INFO, Errno.EINVAL);
    expect(buf).toEqual(B3);
  });

  it('decodes the B.3 error reply', () => {
    const h = decodeHeader(B3);
    expect(h).toEqual({ msgId: 3, command: 5, msgSize: 16, flags: 0x21, error: 22 });
    expect(isReply(h)).toBe(true);
    expect(isError(h)).toBe(true);
    expect(errorOf(h)).toBe(Errno.EINVAL);
  });

  it('decodes the B.1 VERSION header (little-endian fields)', () => {
    expect(decodeHeader(hex('01 00 01 00 54 00 00 00 00 00 00 00 00 00 00 00'))).toEqual({
      msgId: 1, command: Command.VERSION, msgSize: 84, flags: 0, error: 0,
    });
  });

  it('writes at an offset into the caller buffer and touches nothing else', () => {
    const buf = Buffer.alloc(40, 0xee);
    encodeHeader(buf, 10, { msgId: 0xbeef, command: 12, msgSize: 0x12345678, flags: 0x31, error: 0xfffffffe });
    expect(buf.subarray(0, 10)).toEqual(Buffer.alloc(10, 0xee));
    expect(buf.subarray(26)).toEqual(Buffer.alloc(14, 0xee));
    expect(buf.subarray(10, 26)).toEqual(hex('ef be 0c 00 78 56 34 12 31 00 00 00 fe ff ff ff'));
    expect(decodeHeader(buf, 10)).toEqual({ msgId: 0xbeef, command: 12, msgSize: 0x12345678, flags: 0x31, error: 0xfffffffe });
  });

  it('round-trips every field value', () => {
    fc.assert(
      fc.property(arbU16, arbU16, fc.integer({ min: 16, max: 0xffff_ffff }), arbU32, arbU32, fc.nat(8), (msgId, command, msgSize, flags, error, at) => {
        const buf = Buffer.alloc(at + 16);
        encodeHeader(buf, at, { msgId, command, msgSize, flags, error });
        const out = createHeader();
        expect(readHeader(buf, at, out)).toBe(out);
        expect(out).toEqual({ msgId, command, msgSize, flags, error });
      }),
    );
  });

  it('rejects fields that do not fit and buffers without room', () => {
    const buf = Buffer.alloc(16);
    expect(() => encodeHeader(buf, 0, { msgId: 0x10000, command: 1, msgSize: 16 })).toThrow(RangeError);
    expect(() => encodeHeader(buf, 0, { msgId: 1, command: -1, msgSize: 16 })).toThrow(RangeError);
    expect(() => encodeHeader(buf, 0, { msgId: 1, command: 1, msgSize: 15 })).toThrow(RangeError);
    expect(() => encodeHeader(buf, 1, { msgId: 1, command: 1, msgSize: 16 })).toThrow(RangeError);
    expect(() => encodeHeader(buf, 0, { msgId: 1, command: 1, msgSize: 16, flags: 2 ** 32 })).toThrow(RangeError);
  });

  it('refuses to read a truncated header with a ProtocolError', () => {
    expect(() => decodeHeader(B3.subarray(0, 15))).toThrow(ProtocolError);
    expect(() => decodeHeader(B3, 1)).toThrow(ProtocolError);
  });

  it('encodeMessage frames a payload with the right msg_size', () => {
    const m = encodeMessage({ msgId: 7, command: Command.REGION_READ }, hex('10 00 00 00 00 00 00 00 00 00 00 00 04 00 00 00'));
    expect(m).toEqual(dump(`
0000: 07 00 09 00 20 00 00 00 00 00 00 00 00 00 00 00
0010: 10 00 00 00 00 00 00 00 00 00 00 00 04 00 00 00
`));
  });
});

describe('flag helpers', () => {
  it('classify command, reply, error and no-reply', () => {
    expect(messageType(0x31)).toBe(1);
    expect(isCommand(0)).toBe(true);
    expect(isCommand(HeaderFlags.NO_REPLY)).toBe(true);
    expect(isReply(0)).toBe(false);
    expect(isReply({ flags: 1 })).toBe(true);
    expect(isError(0x21)).toBe(true);
    expect(isError(0x20)).toBe(false); // Error flag in a command means nothing
    expect(isError(0x01)).toBe(false);
    expect(noReply(0x10)).toBe(true);
    expect(noReply(0x11)).toBe(false); // only meaningful in a command
    expect(noReply(0)).toBe(false);
  });

  it('errorOf normalises out-of-range errno values to EINVAL, as libvfio-user does', () => {
    expect(errorOf(hdr({ flags: 0x21, error: 2 }))).toBe(Errno.ENOENT);
    expect(errorOf(hdr({ flags: 0x21, error: 0 }))).toBe(Errno.EINVAL);
    expect(errorOf(hdr({ flags: 0x21, error: 4097 }))).toBe(Errno.EINVAL);
    expect(errorOf(hdr({ flags: 0x21, error: 4096 }))).toBe(4096);
    expect(errorOf(hdr({ flags: 0x01, error: 5 }))).toBe(0);
  });
});

describe('validateHeader (libvfio-user order: type, min size, payload required, max size)', () => {
  it('accepts ordinary commands and replies', () => {
    expect(validateHeader(hdr({}))).toBe(HeaderVerdicts.ACCEPT);
    expect(validateHeader(hdr({ command: Command.DEVICE_RESET, msgSize: 16 }))).toBe(HeaderVerdicts.ACCEPT);
    expect(validateHeader(hdr({ flags: 1, msgSize: 16 }))).toBe(HeaderVerdicts.ACCEPT); // DMA_MAP reply
    expect(validateHeader(hdr({ flags: 0x21, msgSize: 16, error: 22 }))).toBe(HeaderVerdicts.ACCEPT);
  });

  it('closes on a type other than command or reply', () => {
    for (const t of [2, 3, 0xf]) expect(validateHeader(hdr({ flags: t }))).toBe(HeaderVerdicts.BAD_TYPE);
  });

  it('closes on msg_size below 16, before anything else is checked', () => {
    expect(validateHeader(hdr({ msgSize: 15 }))).toBe(HeaderVerdicts.TOO_SHORT);
    expect(validateHeader(hdr({ msgSize: 0, command: 999 }))).toBe(HeaderVerdicts.TOO_SHORT);
    expect(validateHeader(hdr({ flags: 1, msgSize: 8 }))).toBe(HeaderVerdicts.TOO_SHORT);
  });

  it('type is checked before size', () => {
    expect(validateHeader(hdr({ flags: 2, msgSize: 0 }))).toBe(HeaderVerdicts.BAD_TYPE);
  });

  it('rejects (EINVAL) a command without payload, except DEVICE_RESET', () => {
    const v = validateHeader(hdr({ command: Command.REGION_READ, msgSize: 16 }));
    expect(v).toEqual({ action: 'reject', errno: Errno.EINVAL, reason: expect.any(String) as string });
    expect(validateHeader(hdr({ command: Command.VERSION, msgSize: 16 }))).toBe(HeaderVerdicts.NO_PAYLOAD);
    // payload-required is checked before the size limit and the command number
    expect(validateHeader(hdr({ command: 999, msgSize: 16 }))).toBe(HeaderVerdicts.NO_PAYLOAD);
  });

  it('closes on a message larger than anything valid (default 1 MiB + 32, as LVU)', () => {
    expect(validateHeader(hdr({ command: Command.REGION_WRITE, msgSize: 16 + 16 + 1048576 }))).toBe(HeaderVerdicts.ACCEPT);
    expect(validateHeader(hdr({ command: Command.REGION_WRITE, msgSize: 16 + 16 + 1048576 + 1 }))).toBe(HeaderVerdicts.TOO_BIG);
    expect(validateHeader(hdr({ flags: 1, msgSize: 0xffffffff }))).toBe(HeaderVerdicts.TOO_BIG);
    expect(validateHeader(hdr({ msgSize: 1000 }), { maxMsgSize: 999 })).toBe(HeaderVerdicts.TOO_BIG);
  });

  it('rejects (after draining) a command larger than its own maximum', () => {
    expect(validateHeader(hdr({ command: Command.DMA_MAP, msgSize: 49 }))).toBe(HeaderVerdicts.PAYLOAD_TOO_BIG);
    expect(validateHeader(hdr({ command: Command.DEVICE_RESET, msgSize: 17 }))).toBe(HeaderVerdicts.PAYLOAD_TOO_BIG);
    // data limit follows our announced max_data_xfer_size
    const lim = { maxDataXferSize: 4096, maxMsgSize: 1 << 20 };
    expect(validateHeader(hdr({ command: Command.REGION_WRITE, msgSize: 32 + 4096 }), lim)).toBe(HeaderVerdicts.ACCEPT);
    expect(validateHeader(hdr({ command: Command.REGION_WRITE, msgSize: 32 + 4097 }), lim)).toBe(HeaderVerdicts.PAYLOAD_TOO_BIG);
    expect(validateHeader(hdr({ command: Command.MIG_DATA_WRITE, msgSize: 24 + 4097 }), lim)).toBe(HeaderVerdicts.PAYLOAD_TOO_BIG);
  });

  it('rejects unknown commands with EINVAL', () => {
    for (const c of [0, 19, 0xffff]) expect(validateHeader(hdr({ command: c }))).toBe(HeaderVerdicts.UNKNOWN_COMMAND);
    // but an unknown reply is the transport's business (it will not match anything)
    expect(validateHeader(hdr({ command: 0, flags: 1 }))).toBe(HeaderVerdicts.ACCEPT);
  });

  it('rejects commands sent in the wrong direction when the receiver is known', () => {
    const dmaRead = hdr({ command: Command.DMA_READ, msgSize: 32 });
    expect(validateHeader(dmaRead, { receiver: 'client' })).toBe(HeaderVerdicts.ACCEPT);
    expect(validateHeader(dmaRead, { receiver: 'server' })).toEqual(expect.objectContaining({ action: 'reject', errno: Errno.EINVAL }));
    const regionRead = hdr({ command: Command.REGION_READ, msgSize: 32 });
    expect(validateHeader(regionRead, { receiver: 'server' })).toBe(HeaderVerdicts.ACCEPT);
    expect(validateHeader(regionRead, { receiver: 'client' })).toEqual(expect.objectContaining({ action: 'reject', errno: Errno.ENOSYS }));
    expect(validateHeader(regionRead)).toBe(HeaderVerdicts.ACCEPT);
  });

  it('maxCommandPayload matches the fixed sizes of reference section 2', () => {
    expect(maxCommandPayload(Command.DMA_MAP)).toBe(32);
    expect(maxCommandPayload(Command.DMA_UNMAP)).toBe(40);
    expect(maxCommandPayload(Command.DEVICE_GET_INFO)).toBe(16);
    expect(maxCommandPayload(Command.DEVICE_GET_REGION_INFO)).toBe(32);
    expect(maxCommandPayload(Command.DEVICE_GET_IRQ_INFO)).toBe(16);
    expect(maxCommandPayload(Command.REGION_READ)).toBe(16);
    expect(maxCommandPayload(Command.DMA_READ)).toBe(16);
    expect(maxCommandPayload(Command.DEVICE_RESET)).toBe(0);
    expect(maxCommandPayload(Command.MIG_DATA_READ)).toBe(8);
    expect(maxCommandPayload(Command.REGION_WRITE, 100)).toBe(116);
    expect(maxCommandPayload(Command.VERSION)).toBe(Infinity);
  });

  it('verdicts are shared constants (no allocation per message)', () => {
    expect(Object.isFrozen(validateHeader(hdr({ msgSize: 1 })))).toBe(true);
    expect(HEADER_SIZE).toBe(16);
  });
});
