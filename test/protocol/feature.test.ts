import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  Command,
  DeviceFeature,
  HeaderFlags,
  MigState,
  MigrationFlags,
  decodeDeviceFeatureReply,
  decodeDeviceFeatureRequest,
  decodeDmaLoggingControl,
  decodeDmaLoggingReportReply,
  decodeDmaLoggingReportRequest,
  decodeMigDeviceState,
  decodeMigrationFeatureData,
  dmaLoggingBitmapSize,
  encodeDeviceFeatureReply,
  encodeDeviceFeatureRequest,
  encodeDmaLoggingControl,
  encodeDmaLoggingReportReply,
  encodeDmaLoggingReportRequest,
  encodeMessage,
  encodeMigDeviceState,
  encodeMigrationFeatureData,
  featureIndex,
} from '../../lib/protocol';
import { arbBytes, arbU64, concat, dump, extended, hex, payloadOf, truncated, u32le, u64le, withU32 } from '../helpers/bytes';

// Appendix B.7: SET MIG_DEVICE_STATE -> STOP_COPY, msg_id 20.
const B7 = dump(`
0000: 14 00 10 00 20 00 00 00 00 00 00 00 00 00 00 00   id 20, cmd 16, size 32
0010: 10 00 00 00 02 00 02 00 03 00 00 00 ff ff ff ff   argsz 16, flags 0x20002 (SET|feature 2), state 3, data_fd -1
`);

describe('DEVICE_FEATURE envelope', () => {
  it('encodes B.7 exactly, and its reply is the same bytes with the reply type', () => {
    const data = encodeMigDeviceState({ deviceState: MigState.STOP_COPY });
    const p = encodeDeviceFeatureRequest({ flags: DeviceFeature.SET | DeviceFeature.MIG_DEVICE_STATE, data });
    expect(encodeMessage({ msgId: 20, command: Command.DEVICE_FEATURE }, p)).toEqual(B7);
    const reply = encodeMessage({ msgId: 20, command: Command.DEVICE_FEATURE, flags: HeaderFlags.TYPE_REPLY }, encodeDeviceFeatureReply({ argsz: 16, flags: 0x20002, data }));
    expect(reply).toEqual(concat(B7.subarray(0, 8), hex('01 00 00 00'), B7.subarray(12)));
  });

  it('decodes B.7 down to the device state', () => {
    const m = decodeDeviceFeatureRequest(payloadOf(B7));
    expect(m.argsz).toBe(16);
    expect(featureIndex(m.flags)).toBe(DeviceFeature.MIG_DEVICE_STATE);
    expect(m.flags & DeviceFeature.SET).toBeTruthy();
    expect(decodeMigDeviceState(m.data)).toEqual({ deviceState: 3, dataFd: 0xffffffff });
  });

  it('MIGRATION GET reply of libvfio-user: argsz 16, flags 0x10001, STOP_COPY|PRE_COPY', () => {
    const p = encodeDeviceFeatureReply({ flags: DeviceFeature.GET | DeviceFeature.MIGRATION, data: encodeMigrationFeatureData(BigInt(MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY)) });
    expect(p).toEqual(concat(u32le(16), u32le(0x10001), u64le(5)));
    const m = decodeDeviceFeatureReply(p);
    expect(decodeMigrationFeatureData(m.data)).toBe(5n);
    expect(() => decodeMigrationFeatureData(hex('05 00 00 00'))).toThrow(/truncated/);
  });

  it('a GET request without data names a larger argsz', () => {
    const p = encodeDeviceFeatureRequest({ argsz: 16, flags: DeviceFeature.GET | DeviceFeature.MIGRATION });
    expect(p).toEqual(concat(u32le(16), u32le(0x10001)));
    expect(decodeDeviceFeatureRequest(p)).toEqual({ argsz: 16, flags: 0x10001, data: Buffer.alloc(0) });
  });

  it.each([
    [0x00002, 'names no operation'],
    [0x30002, 'combines GET and SET'],
    [0x80002, 'unknown bits'],
  ])('rejects flags 0x%s', (flags, msg) => {
    expect(() => decodeDeviceFeatureRequest(concat(u32le(8), u32le(flags)))).toThrow(new RegExp(msg));
    expect(() => decodeDeviceFeatureReply(concat(u32le(8), u32le(flags)))).toThrow(new RegExp(msg));
  });

  it('accepts PROBE alone and with GET and SET', () => {
    for (const f of [0x40006, 0x50006, 0x60006, 0x70006]) expect(decodeDeviceFeatureRequest(concat(u32le(8), u32le(f))).flags).toBe(f);
  });

  it('rejects truncation and argsz < 8', () => {
    expect(() => decodeDeviceFeatureRequest(hex('08 00 00 00 01 00 01'))).toThrow(/flags is truncated/);
    expect(() => decodeDeviceFeatureRequest(withU32(payloadOf(B7), 0, 7))).toThrow(/argsz 7/);
  });

  it('round-trips', () => {
    const ops = fc.constantFrom(0x10000, 0x20000, 0x40000, 0x50000, 0x60000, 0x70000);
    fc.assert(
      fc.property(ops, fc.nat(0xffff), arbBytes(40), fc.integer({ min: 8, max: 0xffffffff }), (op, index, data, argsz) => {
        const flags = op | index;
        expect(decodeDeviceFeatureRequest(encodeDeviceFeatureRequest({ argsz, flags, data }))).toEqual({ argsz, flags, data });
        expect(decodeDeviceFeatureReply(encodeDeviceFeatureReply({ flags, data }))).toEqual({ argsz: 8 + data.length, flags, data });
      }),
    );
  });
});

describe('MIG_DEVICE_STATE data', () => {
  it('is exactly 8 bytes', () => {
    expect(encodeMigDeviceState({ deviceState: MigState.RUNNING, dataFd: 0 })).toEqual(hex('02000000 00000000'));
    expect(() => decodeMigDeviceState(hex('02000000 000000'))).toThrow(/data_fd is truncated/);
    expect(() => decodeMigDeviceState(hex('02000000 00000000 00'))).toThrow(/trailing/);
  });
});

describe('DMA logging', () => {
  it('START data: page size, ranges', () => {
    const m = { pageSize: 4096n, ranges: [{ iova: 0n, length: 0x8000000n }, { iova: 0x100000000n, length: 0x1000n }] };
    const d = encodeDmaLoggingControl(m);
    expect(d).toEqual(concat(u64le(4096), u32le(2), u32le(0), u64le(0), u64le(0x8000000), u64le(0x100000000), u64le(0x1000)));
    expect(decodeDmaLoggingControl(d)).toEqual(m);
    expect(decodeDmaLoggingControl(concat(u64le(4096), u32le(0), u32le(0)))).toEqual({ pageSize: 4096n, ranges: [] });
    expect(() => decodeDmaLoggingControl(withU32(d, 8, 3))).toThrow(/num_ranges 3 disagrees/);
    expect(() => decodeDmaLoggingControl(withU32(d, 8, 0x10000000))).toThrow(/num_ranges/);
    expect(() => decodeDmaLoggingControl(truncated(d))).toThrow(/num_ranges/);
    expect(() => decodeDmaLoggingControl(hex('00 10 00 00 00 00 00 00 00'))).toThrow(/truncated/);
  });

  it('bitmap size is ceil(ceil(length/page)/64) u64 words', () => {
    expect(dmaLoggingBitmapSize(0n, 4096n)).toBe(0);
    expect(dmaLoggingBitmapSize(1n, 4096n)).toBe(8);
    expect(dmaLoggingBitmapSize(64n * 4096n, 4096n)).toBe(8);
    expect(dmaLoggingBitmapSize(64n * 4096n + 1n, 4096n)).toBe(16);
    expect(dmaLoggingBitmapSize(0x8000000n, 4096n)).toBe(4096);
    expect(() => dmaLoggingBitmapSize(4096n, 3000n)).toThrow(RangeError);
    expect(() => dmaLoggingBitmapSize(2n ** 64n - 1n, 1n)).toThrow(RangeError);
  });

  it('REPORT request (24 bytes) and reply (24 + bitmap)', () => {
    const req = { iova: 0x100000n, length: 65n * 4096n, pageSize: 4096n };
    const d = encodeDmaLoggingReportRequest(req);
    expect(d).toEqual(concat(u64le(0x100000), u64le(65 * 4096), u64le(4096)));
    expect(decodeDmaLoggingReportRequest(d)).toEqual(req);
    const bitmap = concat(u64le(1n | (1n << 63n)), u64le(1));
    const rep = encodeDmaLoggingReportReply({ ...req, bitmap });
    expect(rep).toEqual(concat(d, bitmap));
    expect(decodeDmaLoggingReportReply(rep)).toEqual({ ...req, bitmap });
    // as a full DEVICE_FEATURE reply: bitmap at payload offset 32
    const full = encodeDeviceFeatureReply({ flags: DeviceFeature.GET | DeviceFeature.DMA_LOGGING_REPORT, data: rep });
    expect(full.subarray(32)).toEqual(bitmap);
  });

  it('REPORT rejects a bitmap of the wrong size and non-power-of-two pages', () => {
    const req = { iova: 0n, length: 4096n * 64n, pageSize: 4096n };
    const rep = encodeDmaLoggingReportReply({ ...req, bitmap: Buffer.alloc(8) });
    expect(() => decodeDmaLoggingReportReply(truncated(rep))).toThrow(/bitmap has 7 bytes; length and page_size need 8/);
    expect(() => decodeDmaLoggingReportReply(extended(rep, 8))).toThrow(/bitmap has 16 bytes/);
    expect(() => decodeDmaLoggingReportRequest(concat(u64le(0), u64le(4096), u64le(0)))).toThrow(/page_size 0 is not a power of two/);
    expect(() => decodeDmaLoggingReportRequest(concat(u64le(0), u64le(4096), u64le(12288)))).toThrow(/power of two/);
    expect(() => decodeDmaLoggingReportRequest(extended(encodeDmaLoggingReportRequest(req)))).toThrow(/trailing/);
    expect(() => encodeDmaLoggingReportReply({ ...req, bitmap: Buffer.alloc(16) })).toThrow(RangeError);
  });

  it('round-trips', () => {
    fc.assert(
      fc.property(arbU64, fc.bigInt({ min: 0n, max: 2n ** 16n }), fc.nat(20), (iova, length, shift) => {
        const pageSize = 1n << BigInt(shift);
        const n = dmaLoggingBitmapSize(length, pageSize);
        const bitmap = Buffer.alloc(n, 0x5a);
        expect(decodeDmaLoggingReportReply(encodeDmaLoggingReportReply({ iova, length, pageSize, bitmap }))).toEqual({ iova, length, pageSize, bitmap });
        const ranges = [{ iova, length }];
        expect(decodeDmaLoggingControl(encodeDmaLoggingControl({ pageSize, ranges }))).toEqual({ pageSize, ranges });
      }),
    );
  });
});
