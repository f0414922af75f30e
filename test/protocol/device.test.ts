import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  Command,
  DeviceFlags,
  decodeDeviceInfoReply,
  decodeDeviceInfoRequest,
  decodeDeviceResetReply,
  decodeDeviceResetRequest,
  encodeDeviceInfoReply,
  encodeDeviceInfoRequest,
  encodeDeviceResetReply,
  encodeDeviceResetRequest,
  encodeMessage,
} from '../../lib/protocol';
import { arbU32, dump, extended, hex, payloadOf, truncated, withU32 } from '../helpers/bytes';

// peer-traces: QEMU 11.1 asks `argsz=16 flags=0 num_regions=0 num_irqs=0` (32-byte message);
// libvfio-user HEAD answers flags=0x3 num_regions=9 num_irqs=5, LVU-2022 num_regions=10.
const REQUEST = dump(`
0000: 06 00 04 00 20 00 00 00 00 00 00 00 00 00 00 00
0010: 10 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
`);
const LVU_REPLY = hex('10 00 00 00 03 00 00 00 09 00 00 00 05 00 00 00');
const LVU_2022_REPLY = hex('10 00 00 00 03 00 00 00 0a 00 00 00 05 00 00 00');

describe('DEVICE_GET_INFO', () => {
  it('encodes the request QEMU sends', () => {
    expect(encodeMessage({ msgId: 6, command: Command.DEVICE_GET_INFO }, encodeDeviceInfoRequest())).toEqual(REQUEST);
    expect(decodeDeviceInfoRequest(payloadOf(REQUEST))).toEqual({ argsz: 16, flags: 0, numRegions: 0, numIrqs: 0 });
  });

  it('encodes and decodes the libvfio-user replies', () => {
    expect(encodeDeviceInfoReply({ flags: DeviceFlags.PCI | DeviceFlags.RESET, numRegions: 9, numIrqs: 5 })).toEqual(LVU_REPLY);
    expect(decodeDeviceInfoReply(LVU_REPLY)).toEqual({ argsz: 16, flags: 3, numRegions: 9, numIrqs: 5 });
    expect(decodeDeviceInfoReply(LVU_2022_REPLY).numRegions).toBe(10);
  });

  it('rejects truncated, extended and argsz < 16 (libvfio-user check)', () => {
    for (const decode of [decodeDeviceInfoRequest, decodeDeviceInfoReply]) {
      expect(() => decode(truncated(LVU_REPLY))).toThrow(/num_irqs is truncated/);
      expect(() => decode(extended(LVU_REPLY))).toThrow(/trailing/);
      expect(() => decode(withU32(LVU_REPLY, 0, 15))).toThrow(/argsz 15 is below 16/);
    }
    expect(decodeDeviceInfoRequest(withU32(LVU_REPLY, 0, 4096)).argsz).toBe(4096);
  });

  it('round-trips', () => {
    fc.assert(
      fc.property(fc.integer({ min: 16, max: 0xffffffff }), arbU32, arbU32, arbU32, (argsz, flags, numRegions, numIrqs) => {
        const m = { argsz, flags, numRegions, numIrqs };
        expect(decodeDeviceInfoReply(encodeDeviceInfoReply(m))).toEqual(m);
        expect(decodeDeviceInfoRequest(encodeDeviceInfoRequest(m))).toEqual(m);
      }),
    );
  });
});

describe('DEVICE_RESET', () => {
  it('has no payload either way', () => {
    expect(encodeMessage({ msgId: 33, command: Command.DEVICE_RESET }, encodeDeviceResetRequest())).toEqual(
      hex('21 00 0d 00 10 00 00 00 00 00 00 00 00 00 00 00'),
    );
    expect(encodeDeviceResetReply().byteLength).toBe(0);
    expect(decodeDeviceResetRequest(Buffer.alloc(0))).toBeNull();
    expect(decodeDeviceResetReply(Buffer.alloc(0))).toBeNull();
    expect(() => decodeDeviceResetRequest(Buffer.alloc(4))).toThrow(/DEVICE_RESET request: expected no payload, got 4 bytes/);
    expect(() => decodeDeviceResetReply(Buffer.alloc(1))).toThrow(/DEVICE_RESET reply/);
  });
});
