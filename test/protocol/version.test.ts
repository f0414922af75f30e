import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  Command,
  ProtocolError,
  decodeHeader,
  decodeVersion,
  decodeVersionReply,
  decodeVersionRequest,
  encodeMessage,
  encodeVersion,
  versionPayloadSize,
  type CapabilitiesInput,
} from '../../lib/protocol';
import { concat, dump, payloadOf, u16le } from '../helpers/bytes';

// Appendix B.1: VERSION request, msg_id 1, proposing 0.2 (84 bytes).
const B1 = dump(`
0000: 01 00 01 00 54 00 00 00 00 00 00 00 00 00 00 00   header: id 1, cmd 1, size 0x54, flags 0
0010: 00 00 02 00 7b 22 63 61 70 61 62 69 6c 69 74 69   major 0, minor 2, '{"capabiliti'
0020: 65 73 22 3a 7b 22 6d 61 78 5f 6d 73 67 5f 66 64   'es":{"max_msg_fd'
0030: 73 22 3a 38 2c 22 6d 61 78 5f 64 61 74 61 5f 78   's":8,"max_data_x'
0040: 66 65 72 5f 73 69 7a 65 22 3a 31 30 34 38 35 37   'fer_size":104857'
0050: 36 7d 7d 00                                       '6}}' NUL
`);

/** A VERSION payload with the given JSON text and a NUL. */
const versionPayload = (json: string, major = 0, minor = 0): Buffer =>
  concat(u16le(major), u16le(minor), Buffer.from(json, 'utf8'), [0]);

// What QEMU 11.1's vfio-user-pci client really sent (peers.md §2, peer-traces): 214 bytes.
const QEMU_11_1_REQUEST_JSON =
  '{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, "max_data_xfer_size": 1048576, ' +
  '"migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, "write_multiple": true}}';
// The compact form of reference 3.1: 178 bytes of JSON, 199-byte message.
const QEMU_COMPACT_JSON =
  '{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,' +
  '"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}';
// libvfio-user server replies (peer-traces): HEAD (json-c pretty spacing, 125 bytes) and 2022 (112).
const LVU_HEAD_REPLY_JSON = '{ "capabilities": { "max_msg_fds": 8, "max_data_xfer_size": 1048576, "migration": { "pgsize": 4096 } } }';
const LVU_2022_REPLY_JSON = '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}';

describe('VERSION golden vectors', () => {
  it('encodes B.1 exactly', () => {
    const payload = encodeVersion({ major: 0, minor: 2, capabilities: { maxMsgFds: 8, maxDataXferSize: 1048576 } });
    expect(encodeMessage({ msgId: 1, command: Command.VERSION }, payload)).toEqual(B1);
    expect(versionPayloadSize({ major: 0, minor: 2, capabilities: { maxMsgFds: 8, maxDataXferSize: 1048576 } })).toBe(84 - 16);
  });

  it('decodes B.1', () => {
    expect(decodeHeader(B1).msgSize).toBe(84);
    const v = decodeVersionRequest(payloadOf(B1));
    expect(v.major).toBe(0);
    expect(v.minor).toBe(2);
    expect(v.announced).toEqual({ maxMsgFds: 8, maxDataXferSize: 1048576 });
    expect(v.capabilities).toEqual({
      maxMsgFds: 8, maxDataXferSize: 1048576, maxDmaMaps: 65535, pgsizes: 4096n, writeMultiple: false,
      twinSocket: { supported: false }, migration: undefined,
    });
    expect(v.ignored).toEqual([]);
  });

  it('decodes the QEMU 11.1 client request as recorded (0.0, spaced JSON, 214 bytes)', () => {
    const p = versionPayload(QEMU_11_1_REQUEST_JSON);
    expect(16 + p.byteLength).toBe(214);
    const v = decodeVersionRequest(p);
    expect([v.major, v.minor]).toEqual([0, 0]);
    expect(v.capabilities).toEqual({
      maxMsgFds: 16, maxDataXferSize: 1048576, maxDmaMaps: 65535, pgsizes: 4096n, writeMultiple: true,
      twinSocket: { supported: false }, migration: { pgsize: 4096, maxBitmapSize: 268435456 },
    });
    expect(v.ignored).toEqual([]);
  });

  it('decodes the compact QEMU request of reference 3.1 (199 bytes) to the same capabilities', () => {
    const p = versionPayload(QEMU_COMPACT_JSON);
    expect(16 + p.byteLength).toBe(199);
    expect(decodeVersion(p).capabilities).toEqual(decodeVersion(versionPayload(QEMU_11_1_REQUEST_JSON)).capabilities);
  });

  it('decodes libvfio-user replies (HEAD: 125 bytes with spaces; 2022: 112 bytes)', () => {
    for (const [json, size] of [[LVU_HEAD_REPLY_JSON, 125], [LVU_2022_REPLY_JSON, 112]] as const) {
      const p = versionPayload(json);
      expect(16 + p.byteLength).toBe(size);
      const v = decodeVersionReply(p);
      expect(v.announced).toEqual({ maxMsgFds: 8, maxDataXferSize: 1048576, migration: { pgsize: 4096 } });
      expect(v.capabilities.maxDmaMaps).toBe(65535); // default: LVU never announces it
    }
  });

  it('our server reply to QEMU stays within the 199-byte request (reference 3.1 step 6)', () => {
    const reply = encodeVersion({
      major: 0, minor: 0,
      capabilities: { maxMsgFds: 8, maxDataXferSize: 1048576, pgsizes: 4096n, maxDmaMaps: 65535, writeMultiple: true },
    });
    expect(reply.subarray(4, -1).toString()).toBe(
      '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}',
    );
    expect(16 + reply.byteLength).toBe(142);
    expect(16 + reply.byteLength).toBeLessThanOrEqual(199);
  });

  it('encodes twin_socket and migration objects', () => {
    const p = encodeVersion({ major: 0, minor: 2, capabilities: { twinSocket: { supported: true, fdIndex: 0 }, migration: { pgsize: 4096 } } });
    expect(p.subarray(4).toString()).toBe('{"capabilities":{"twin_socket":{"supported":true,"fd_index":0},"migration":{"pgsize":4096}}}\0');
  });

  it('always sends JSON: {} without capabilities; nothing only on request', () => {
    expect(encodeVersion({ major: 0, minor: 1 })).toEqual(concat(u16le(0), u16le(1), Buffer.from('{}'), [0]));
    expect(encodeVersion({ major: 0, minor: 1, document: null })).toEqual(concat(u16le(0), u16le(1)));
    expect(encodeVersion({ major: 0, minor: 1, document: { x: [1n] } }).subarray(4).toString()).toBe('{"x":[1]}\0');
  });
});

describe('VERSION decoding rules', () => {
  it('accepts a payload without JSON (defaults apply)', () => {
    const v = decodeVersion(concat(u16le(0), u16le(2)));
    expect(v.document).toBeNull();
    expect(v.capabilities.maxMsgFds).toBe(1);
    expect(v.capabilities.maxDataXferSize).toBe(1048576);
  });

  it('rejects a payload shorter than major+minor', () => {
    expect(() => decodeVersion(Buffer.from([0, 0, 2]))).toThrow(ProtocolError);
    expect(() => decodeVersion(Buffer.alloc(0))).toThrow(/major is truncated/);
  });

  it('requires the NUL as the last byte (both peers do)', () => {
    const withoutNul = concat(u16le(0), u16le(2), Buffer.from('{}'));
    expect(() => decodeVersion(withoutNul)).toThrow(/not NUL-terminated/);
    expect(() => decodeVersion(concat(u16le(0), u16le(2), Buffer.from('{}\0 ')))).toThrow(/not NUL-terminated/);
  });

  it('rejects an inner NUL, trailing garbage, empty JSON, non-UTF-8 and non-objects', () => {
    expect(() => decodeVersion(versionPayload('{}\0{}'))).toThrow(ProtocolError);
    expect(() => decodeVersion(versionPayload('{} x'))).toThrow(ProtocolError);
    expect(() => decodeVersion(versionPayload(''))).toThrow(ProtocolError);
    expect(() => decodeVersion(concat(u16le(0), u16le(0), Buffer.from('{"a":"'), [0xff, 0xfe], Buffer.from('"}'), [0]))).toThrow(/UTF-8/);
    expect(() => decodeVersion(versionPayload('[]'))).toThrow(/document must be a JSON object/);
    expect(() => decodeVersion(versionPayload('{"capabilities":[]}'))).toThrow(/capabilities must be a JSON object/);
  });

  it('ignores unknown keys at every level and reports them', () => {
    const v = decodeVersion(versionPayload('{"vendor":1,"capabilities":{"future":{"x":1},"twin_socket":{"supported":true,"extra":2},"migration":{"pgsize":8192,"k":0}}}'));
    expect(v.ignored).toEqual(['vendor', 'capabilities.future', 'capabilities.twin_socket.extra', 'capabilities.migration.k']);
    expect(v.capabilities.twinSocket).toEqual({ supported: true });
    expect(v.capabilities.migration).toEqual({ pgsize: 8192 });
  });

  it('round-trips any announcement', () => {
    const caps = fc.record(
      {
        maxMsgFds: fc.integer({ min: 0, max: 0xffffffff }),
        maxDataXferSize: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
        maxDmaMaps: fc.integer({ min: 0, max: 0xffffffff }),
        pgsizes: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
        writeMultiple: fc.boolean(),
        twinSocket: fc.record({ supported: fc.boolean(), fdIndex: fc.integer({ min: 0, max: 0x7fffffff }) }, { requiredKeys: ['supported'] }),
        migration: fc.record({ pgsize: fc.nat(), maxBitmapSize: fc.nat() }, { requiredKeys: [] }),
      },
      { requiredKeys: [] },
    );
    fc.assert(
      fc.property(fc.nat(0xffff), fc.nat(0xffff), caps, (major, minor, announced: CapabilitiesInput) => {
        const payload = encodeVersion({ major, minor, capabilities: announced });
        expect(payload.byteLength).toBe(versionPayloadSize({ major, minor, capabilities: announced }));
        const v = decodeVersion(payload);
        expect(v.major).toBe(major);
        expect(v.minor).toBe(minor);
        expect(v.announced).toEqual(announced);
        expect(v.ignored).toEqual([]);
      }),
    );
  });
});
