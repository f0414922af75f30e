/**
 * Every decoder, fed random or mutated bytes, either returns a value or throws ProtocolError:
 * never another exception, and never a view of bytes outside its input.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  AccessKind,
  Command,
  DeviceFeature,
  DirtyPagesFlags,
  DmaLayout,
  DmaUnmapFlags,
  PAYLOAD_DECODERS,
  ProtocolError,
  commandName,
  createDmaAccess,
  createRegionAccess,
  decodeDmaLoggingControl,
  decodeDmaLoggingReportReply,
  decodeDmaLoggingReportRequest,
  decodeHeader,
  decodeMigDeviceState,
  decodeMigrationFeatureData,
  decodePayload,
  encodeDeviceFeatureRequest,
  encodeDeviceInfoReply,
  encodeDeviceInfoRequest,
  encodeDirtyPagesReply,
  encodeDirtyPagesRequest,
  encodeDmaLoggingControl,
  encodeDmaLoggingReportReply,
  encodeDmaLoggingReportRequest,
  encodeDmaMapRequest,
  encodeDmaReadReply,
  encodeDmaReadRequest,
  encodeDmaUnmapReply,
  encodeDmaUnmapRequest,
  encodeDmaWriteReply,
  encodeDmaWriteRequest,
  encodeIrqInfoReply,
  encodeIrqInfoRequest,
  encodeMigDataReadReply,
  encodeMigDataReadRequest,
  encodeMigDataWriteRequest,
  encodeMigDeviceState,
  encodeMigrationFeatureData,
  encodeRegionInfoReply,
  encodeRegionInfoRequest,
  encodeRegionIoFdsReply,
  encodeRegionIoFdsRequest,
  encodeRegionReadReply,
  encodeRegionReadRequest,
  encodeRegionWriteMultiReply,
  encodeRegionWriteMultiRequest,
  encodeRegionWriteReply,
  encodeRegionWriteRequest,
  encodeSetIrqsRequest,
  encodeVersion,
  readDmaAccess,
  readRegionAccess,
  sparseMmapCap,
  typeCap,
} from '../../lib/protocol';
import { concat, hex, u16le, u32le } from '../helpers/bytes';

type Decoder = (payload: Uint8Array) => unknown;

const EMPTY_SEED = [Buffer.alloc(0)];

/** Valid payloads for each decoder: the starting points of the mutation fuzz. */
const SEEDS: Record<number, { request: Buffer[]; reply: Buffer[] }> = {
  [Command.VERSION]: {
    request: [
      encodeVersion({ major: 0, minor: 2, capabilities: { maxMsgFds: 8, maxDataXferSize: 1 << 20, twinSocket: { supported: true } } }),
      concat(u16le(0), u16le(0), Buffer.from('{"capabilities": {"pgsizes": 4096, "migration": {"pgsize": 4096}, "write_multiple": true}}'), [0]),
    ],
    reply: [encodeVersion({ major: 0, minor: 1, capabilities: { maxMsgFds: 8, twinSocket: { supported: true, fdIndex: 0 } } })],
  },
  [Command.DMA_MAP]: { request: [encodeDmaMapRequest({ flags: 3, address: 0x100000n, size: 0x200000n })], reply: EMPTY_SEED },
  [Command.DMA_UNMAP]: {
    request: [
      encodeDmaUnmapRequest({ flags: 0, address: 0x1000n, size: 0x1000n }),
      encodeDmaUnmapRequest({ flags: DmaUnmapFlags.GET_DIRTY_BITMAP, address: 0n, size: 0x1000n, bitmap: { pgsize: 4096n, size: 8n } }),
    ],
    reply: [
      encodeDmaUnmapReply({ argsz: 24, flags: 0, address: 0n, size: 4096n }),
      encodeDmaUnmapReply({ argsz: 48, flags: 1, address: 0n, size: 4096n, bitmap: { pgsize: 4096n, data: Buffer.alloc(8, 1) } }),
    ],
  },
  [Command.DEVICE_GET_INFO]: { request: [encodeDeviceInfoRequest()], reply: [encodeDeviceInfoReply({ flags: 3, numRegions: 9, numIrqs: 5 })] },
  [Command.DEVICE_GET_REGION_INFO]: {
    request: [encodeRegionInfoRequest({ index: 0 })],
    reply: [
      encodeRegionInfoReply({ flags: 7, index: 9, size: 0x4000n, capabilities: [typeCap(3, 1), sparseMmapCap([{ offset: 0x1000n, size: 0x1000n }, { offset: 0x2000n, size: 0x1000n }])] }),
      encodeRegionInfoReply({ flags: 7, index: 0, size: 0x4000n, capabilities: [{ kind: 'unknown', id: 3, version: 1, data: Buffer.alloc(8) }, sparseMmapCap([])] }),
      encodeRegionInfoReply({ flags: 7, index: 0, size: 0x4000n, capabilities: [sparseMmapCap([])] }, 32),
    ],
  },
  [Command.DEVICE_GET_REGION_IO_FDS]: {
    request: [encodeRegionIoFdsRequest({ index: 0, argsz: 96 })],
    reply: [
      encodeRegionIoFdsReply({ index: 0, subRegions: [{ offset: 0n, size: 4n, fdIndex: 0, type: 0, flags: 1, datamatch: 5n }] }),
      encodeRegionIoFdsReply({ index: 0, entrySize: 48, subRegions: [{ offset: 0n, size: 4n, fdIndex: 0, type: 2, flags: 0, datamatch: 0n, shadowMemFdIndex: 1, shadowOffset: 8n }] }),
    ],
  },
  [Command.DEVICE_GET_IRQ_INFO]: { request: [encodeIrqInfoRequest({ index: 2 })], reply: [encodeIrqInfoReply({ flags: 1, index: 2, count: 16 })] },
  [Command.DEVICE_SET_IRQS]: {
    request: [
      encodeSetIrqsRequest({ flags: 0x24, index: 2, start: 0, count: 2 }),
      encodeSetIrqsRequest({ flags: 0x22, index: 1, start: 0, count: 3, data: hex('01 00 01') }),
    ],
    reply: EMPTY_SEED,
  },
  [Command.REGION_READ]: {
    request: [encodeRegionReadRequest({ offset: 0x10n, region: 0, count: 4 })],
    reply: [encodeRegionReadReply({ offset: 0x10n, region: 0, data: hex('78 56 34 12') })],
  },
  [Command.REGION_WRITE]: {
    request: [encodeRegionWriteRequest({ offset: 0x30n, region: 7, data: hex('00 f8 ff ff') })],
    reply: [encodeRegionWriteReply({ offset: 0x30n, region: 7, count: 4 })],
  },
  [Command.DMA_READ]: {
    request: [encodeDmaReadRequest({ address: 0x1000n, count: 4 })],
    reply: [encodeDmaReadReply({ address: 0x1000n, data: hex('01 02 03 04') }), encodeDmaReadReply({ address: 0x1000n, data: hex('01 02') }, DmaLayout.QEMU)],
  },
  [Command.DMA_WRITE]: {
    request: [encodeDmaWriteRequest({ address: 0x1000n, data: hex('01 02 03 04') })],
    reply: [encodeDmaWriteReply({ address: 0x1000n, count: 4 }), encodeDmaWriteReply({ address: 0x1000n, count: 4 }, DmaLayout.QEMU)],
  },
  [Command.DEVICE_RESET]: { request: EMPTY_SEED, reply: EMPTY_SEED },
  [Command.DIRTY_PAGES]: {
    request: [encodeDirtyPagesRequest({ flags: DirtyPagesFlags.GET_BITMAP, range: { iova: 0n, size: 0x1000n, bitmap: { pgsize: 4096n, size: 8n } } })],
    reply: [encodeDirtyPagesReply({ iova: 0n, size: 0x1000n, pgsize: 4096n, bitmap: Buffer.alloc(8, 0xff) })],
  },
  [Command.REGION_WRITE_MULTI]: {
    request: [encodeRegionWriteMultiRequest([{ offset: 0n, region: 0, data: hex('01 02') }, { offset: 8n, region: 1, data: hex('01 02 03 04 05 06 07 08') }])],
    reply: [encodeRegionWriteMultiReply({ wrCnt: 2 })],
  },
  [Command.DEVICE_FEATURE]: {
    request: [encodeDeviceFeatureRequest({ flags: DeviceFeature.SET | 2, data: encodeMigDeviceState({ deviceState: 3 }) })],
    reply: [encodeDeviceFeatureRequest({ flags: DeviceFeature.GET | 8, data: encodeDmaLoggingReportReply({ iova: 0n, length: 4096n * 65n, pageSize: 4096n, bitmap: Buffer.alloc(16) }) })],
  },
  [Command.MIG_DATA_READ]: { request: [encodeMigDataReadRequest({ size: 16 })], reply: [encodeMigDataReadReply({ data: Buffer.alloc(5, 7) })] },
  [Command.MIG_DATA_WRITE]: { request: [encodeMigDataWriteRequest({ data: Buffer.alloc(5, 7) })], reply: EMPTY_SEED },
};

const DECODERS: { name: string; decode: Decoder; seeds: Buffer[] }[] = [
  ...Object.entries(PAYLOAD_DECODERS).flatMap(([cmd, d]) => {
    const seeds = SEEDS[Number(cmd)]!;
    return [
      { name: `${commandName(Number(cmd))} request`, decode: d.request, seeds: seeds.request },
      { name: `${commandName(Number(cmd))} reply`, decode: d.reply, seeds: seeds.reply },
    ];
  }),
  { name: 'MIGRATION feature data', decode: decodeMigrationFeatureData, seeds: [encodeMigrationFeatureData(5n)] },
  { name: 'MIG_DEVICE_STATE data', decode: decodeMigDeviceState, seeds: [encodeMigDeviceState({ deviceState: 2 })] },
  { name: 'DMA_LOGGING_START data', decode: decodeDmaLoggingControl, seeds: [encodeDmaLoggingControl({ pageSize: 4096n, ranges: [{ iova: 0n, length: 4096n }] })] },
  { name: 'DMA_LOGGING_REPORT request data', decode: decodeDmaLoggingReportRequest, seeds: [encodeDmaLoggingReportRequest({ iova: 0n, length: 4096n, pageSize: 4096n })] },
  { name: 'DMA_LOGGING_REPORT reply data', decode: decodeDmaLoggingReportReply, seeds: [encodeDmaLoggingReportReply({ iova: 0n, length: 4096n * 64n, pageSize: 4096n, bitmap: Buffer.alloc(8) })] },
  ...([
    [AccessKind.READ_REQUEST, Command.REGION_READ, 'request'],
    [AccessKind.WRITE_REQUEST, Command.REGION_WRITE, 'request'],
    [AccessKind.READ_REPLY, Command.REGION_READ, 'reply'],
    [AccessKind.WRITE_REPLY, Command.REGION_WRITE, 'reply'],
  ] as const).flatMap(([kind, regionCmd, dir]) => [
    {
      name: `readRegionAccess kind ${String(kind)}`,
      decode: (p: Uint8Array) => readRegionAccess(new DataView(p.buffer), p.byteOffset, p.byteLength, kind, createRegionAccess()),
      seeds: SEEDS[regionCmd]![dir],
    },
    {
      name: `readDmaAccess kind ${String(kind)}`,
      decode: (p: Uint8Array) => readDmaAccess(new DataView(p.buffer), p.byteOffset, p.byteLength, kind, createDmaAccess()),
      seeds: SEEDS[regionCmd === Command.REGION_READ ? Command.DMA_READ : Command.DMA_WRITE]![dir],
    },
  ]),
  { name: 'decodeHeader', decode: (p) => decodeHeader(p), seeds: [hex('03 00 05 00 10 00 00 00 21 00 00 00 16 00 00 00')] },
];

/** Places `bytes` inside a larger buffer filled with a sentinel, as a transport's receive buffer would. */
function embed(bytes: Uint8Array, before: number, after: number): Buffer {
  const pool = Buffer.alloc(before + bytes.byteLength + after, 0xa5);
  pool.set(bytes, before);
  return pool.subarray(before, before + bytes.byteLength);
}

/** Every byte view reachable from `value` that shares `input`'s memory must lie inside `input`. */
function checkViews(value: unknown, input: Buffer, seen = new Set<unknown>()): void {
  if (value === null || typeof value !== 'object' || seen.has(value)) return;
  seen.add(value);
  if (ArrayBuffer.isView(value)) {
    if (value.buffer === input.buffer && value.byteLength > 0) {
      expect(value.byteOffset).toBeGreaterThanOrEqual(input.byteOffset);
      expect(value.byteOffset + value.byteLength).toBeLessThanOrEqual(input.byteOffset + input.byteLength);
    }
    return;
  }
  for (const v of Object.values(value)) checkViews(v, input, seen);
}

function run(decode: Decoder, input: Buffer): void {
  let value: unknown;
  try {
    value = decode(input);
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    expect(e.errno).toBeGreaterThan(0);
    expect(e.message.length).toBeGreaterThan(0);
    return;
  }
  checkViews(value, input);
}

/** Mutations that hit the interesting values of length, count and offset fields. */
const mutation = (seed: Buffer): fc.Arbitrary<Buffer> =>
  fc
    .array(
      fc.oneof(
        fc.record({ op: fc.constant('byte' as const), at: fc.nat(), v: fc.nat(255) }),
        fc.record({
          op: fc.constant('u32' as const),
          at: fc.nat(),
          v: fc.constantFrom(0, 1, 2, 7, 8, 15, 16, 20, 23, 24, 31, 32, 40, 47, 48, 63, 64, 0x7fffffff, 0xfffffff0, 0xffffffff),
        }),
        fc.record({ op: fc.constant('cut' as const), at: fc.nat(), v: fc.constant(0) }),
        fc.record({ op: fc.constant('grow' as const), at: fc.nat(16), v: fc.nat(255) }),
      ),
      { minLength: 1, maxLength: 4 },
    )
    .map((ops) => {
      let b = Buffer.from(seed);
      for (const { op, at, v } of ops) {
        if (op === 'byte' && b.length > 0) b[at % b.length] = v;
        else if (op === 'u32' && b.length >= 4) b.writeUInt32LE(v, (at % (b.length - 3)) & ~3); // aligned field
        else if (op === 'cut') b = b.subarray(0, b.length === 0 ? 0 : at % b.length);
        else if (op === 'grow') b = Buffer.concat([b, Buffer.alloc(at, v)]);
      }
      return Buffer.from(b);
    });

describe('fuzz: every decoder returns a value or throws ProtocolError', () => {
  it('covers every command in both directions', () => {
    expect(Object.keys(PAYLOAD_DECODERS)).toHaveLength(18);
    for (const d of DECODERS) expect(d.seeds.length).toBeGreaterThan(0);
  });

  it.each(DECODERS)('$name: the seeds decode', ({ decode, seeds }) => {
    for (const s of seeds) expect(() => decode(s)).not.toThrow();
  });

  it.each(DECODERS)('$name: random bytes', ({ decode }) => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 160 }), fc.nat(9), fc.nat(9), (bytes, before, after) => {
        run(decode, embed(bytes, before, after));
      }),
      { numRuns: 300 },
    );
  });

  it.each(DECODERS)('$name: mutated valid payloads', ({ decode, seeds }) => {
    fc.assert(
      fc.property(fc.constantFrom(...seeds).chain(mutation), fc.nat(9), (bytes, before) => {
        run(decode, embed(bytes, before, 3));
      }),
      { numRuns: 400 },
    );
  });

  it('decodePayload: any command number, either direction', () => {
    fc.assert(
      fc.property(fc.integer({ min: -1, max: 40 }), fc.boolean(), fc.uint8Array({ maxLength: 64 }), (cmd, reply, bytes) => {
        run((p) => decodePayload(cmd, reply, p), embed(bytes, 1, 1));
      }),
    );
  });

  it('VERSION: random JSON-ish text after major/minor', () => {
    const text = fc.stringMatching(/^[{}[\]",:0-9a-z_ .eE+-]{0,80}$/);
    fc.assert(
      fc.property(text, fc.boolean(), (t, nul) => {
        const payload = concat(u16le(0), u16le(2), Buffer.from(t), nul ? [0] : []);
        run(PAYLOAD_DECODERS[Command.VERSION].request, embed(payload, 2, 2));
      }),
      { numRuns: 500 },
    );
  });

  it('a truncated-by-one or extended-by-one seed of a fixed-size message is always rejected', () => {
    const fixed = [
      Command.DMA_MAP, Command.DEVICE_GET_INFO, Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_REGION_IO_FDS,
      Command.DEVICE_GET_IRQ_INFO, Command.REGION_READ, Command.MIG_DATA_READ,
    ] as const;
    for (const cmd of fixed) {
      const seed = SEEDS[cmd]!.request[0]!;
      const decode = PAYLOAD_DECODERS[cmd].request;
      expect(() => decode(seed.subarray(0, seed.length - 1)), commandName(cmd)).toThrow(ProtocolError);
      expect(() => decode(Buffer.concat([seed, Buffer.alloc(1)])), commandName(cmd)).toThrow(ProtocolError);
    }
    expect(() => PAYLOAD_DECODERS[Command.DEVICE_GET_INFO].reply(concat(SEEDS[Command.DEVICE_GET_INFO]!.reply[0]!, u32le(0)))).toThrow(ProtocolError);
  });
});
