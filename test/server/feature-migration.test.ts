/**
 * DEVICE_FEATURE (reference §3.16), MIG_DATA_READ / MIG_DATA_WRITE (§3.17, §3.18) and the v2
 * migration state machine (§5): negative cases first; then a source walk (RUNNING -> STOP_COPY,
 * reading the stream until 0), a destination (RESUMING, writing, STOP loads), and DMA logging with
 * pages dirtied through the device's views.
 */
import { describe, it, expect } from 'vitest';
import { Command, DeviceFeature, DmaMapFlags, Errno, MigState } from '../../lib/protocol/constants';
import type { MigrationHooks } from '../../lib/server/migration';
import { rawClient, regionAccess, TestDevice, type RawClient } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { dmaMap, feature, guestMemory, setup, u32s, u64, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

const { GET, SET, PROBE, MIGRATION, MIG_DEVICE_STATE, DMA_LOGGING_START, DMA_LOGGING_STOP, DMA_LOGGING_REPORT } = DeviceFeature;
const { STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY } = MigState;
const PAGE = 4096;

/** TestDevice with migration hooks that log what they are asked to do. */
class MigratableDevice extends TestDevice {
  readonly log: string[] = [];
  blob = Buffer.from(Array.from({ length: 10000 }, (_, i) => (i * 7) & 0xff));
  loaded: Buffer | null = null;
  failLoad = false;
  failStop = false;
  readonly migration: MigrationHooks;

  constructor(preCopy = false) {
    super();
    this.migration = {
      preCopy,
      setRunning: (running) => {
        if (!running && this.failStop) throw new Error('cannot stop');
        this.log.push(running ? 'run' : 'stop');
      },
      save: () => {
        this.log.push('save');
        return this.blob;
      },
      load: async (data) => {
        this.log.push(`load ${data.length}`);
        if (this.failLoad) throw new Error('bad state');
        this.loaded = Buffer.from(data);
      },
    };
  }
}

const getState = async (client: RawClient) => {
  const r = (await client.msg(Command.DEVICE_FEATURE, feature(16, GET | MIG_DEVICE_STATE))) as Buffer;
  return r.readUInt32LE(8);
};
const setState = (client: RawClient, state: number) => client.msg(Command.DEVICE_FEATURE, feature(16, SET | MIG_DEVICE_STATE, u32s(state, 0xffff_ffff)));
const migRead = (client: RawClient, size: number, argsz = 8 + size) => client.msg(Command.MIG_DATA_READ, u32s(argsz, size));
const migWrite = (client: RawClient, data: Buffer) => client.msg(Command.MIG_DATA_WRITE, Buffer.concat([u32s(8 + data.length, data.length), data]));

describe('DEVICE_FEATURE: refused', () => {
  it('refuses every feature and migration data command when the device cannot migrate', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, GET | MIGRATION))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(8, PROBE | GET | MIGRATION))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, GET | MIG_DEVICE_STATE))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(24, SET | DMA_LOGGING_START, Buffer.concat([u64(PAGE), u32s(0, 0)])))).toBe(Errno.EINVAL);
    expect(await migRead(client, 16)).toBe(Errno.EINVAL);
    expect(await migWrite(client, Buffer.alloc(16))).toBe(Errno.EINVAL);
  });

  it('refuses a short payload, argsz below 8, unknown flag bits and missing or clashing operations', async () => {
    const { client } = await setup(new MigratableDevice());
    expect(await client.msg(Command.DEVICE_FEATURE, u32s(16))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(7, GET | MIGRATION))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, 0x80000 | GET | MIGRATION))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, MIGRATION))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, GET | SET | MIG_DEVICE_STATE, u32s(STOP, 0)))).toBe(Errno.EINVAL);
  });

  it('refuses features vfio-user does not have, and operations a feature lacks', async () => {
    const { client } = await setup(new MigratableDevice());
    for (const index of [0, 3, 4, 5, 9, 10, 0xffff]) {
      expect(await client.msg(Command.DEVICE_FEATURE, feature(64, GET | index)), `feature ${index}`).toBe(Errno.EINVAL);
      expect(await client.msg(Command.DEVICE_FEATURE, feature(64, PROBE | index)), `probe ${index}`).toBe(Errno.EINVAL);
    }
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, SET | MIGRATION, u64(1)))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, PROBE | SET | MIGRATION))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, GET | DMA_LOGGING_START))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(48, SET | DMA_LOGGING_REPORT, Buffer.alloc(24)))).toBe(Errno.EINVAL);
  });

  it('refuses a GET whose argsz has no room for the data', async () => {
    const { client } = await setup(new MigratableDevice());
    expect(await client.msg(Command.DEVICE_FEATURE, feature(15, GET | MIGRATION))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(8, GET | MIG_DEVICE_STATE))).toBe(Errno.EINVAL);
  });
});

describe('DEVICE_FEATURE: MIGRATION and PROBE', () => {
  it('reports STOP_COPY (and PRE_COPY when offered) with argsz 16', async () => {
    for (const [preCopy, flags] of [
      [false, 1n],
      [true, 5n],
    ] as const) {
      const { client } = await setup(new MigratableDevice(preCopy));
      expect(await client.msg(Command.DEVICE_FEATURE, feature(64, GET | MIGRATION))).toEqual(Buffer.concat([u32s(16, GET | MIGRATION), u64(flags)]));
    }
  });

  it('answers PROBE by echoing the request', async () => {
    const { client } = await setup(new MigratableDevice());
    for (const flags of [PROBE | GET | MIGRATION, PROBE | GET | SET | MIG_DEVICE_STATE, PROBE | SET | DMA_LOGGING_START, PROBE | DMA_LOGGING_REPORT]) {
      const request = feature(100, flags);
      expect(await client.msg(Command.DEVICE_FEATURE, request)).toEqual(request);
    }
  });
});

describe('migration: state machine', () => {
  it('starts RUNNING and answers GET with the state and data_fd -1', async () => {
    const { client } = await setup(new MigratableDevice());
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, GET | MIG_DEVICE_STATE))).toEqual(Buffer.concat([u32s(16, GET | MIG_DEVICE_STATE), u32s(RUNNING, 0xffff_ffff)]));
  });

  it('refuses states that cannot be requested, and leaves the device alone', async () => {
    const device = new MigratableDevice();
    const { client } = await setup(device);
    for (const target of [MigState.ERROR, MigState.RUNNING_P2P, MigState.PRE_COPY_P2P, 8, 0xffff_ffff, PRE_COPY]) {
      expect(await setState(client, target), `state ${target}`).toBe(Errno.EINVAL);
    }
    expect(await getState(client)).toBe(RUNNING);
    expect(device.log).toEqual([]);
  });

  it('refuses SET data that is not 8 bytes', async () => {
    const { client } = await setup(new MigratableDevice());
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, SET | MIG_DEVICE_STATE, u32s(STOP)))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(16, SET | MIG_DEVICE_STATE, u32s(STOP, 0, 0)))).toBe(Errno.EINVAL);
    expect(await getState(client)).toBe(RUNNING);
  });

  it('treats the current state as a no-op', async () => {
    const device = new MigratableDevice();
    const { client } = await setup(device);
    expect(await setState(client, RUNNING)).toBeInstanceOf(Buffer);
    expect(device.log).toEqual([]);
  });

  it('stays where it was when the device cannot stop', async () => {
    const device = new MigratableDevice();
    device.failStop = true;
    const { client } = await setup(device);
    expect(await setState(client, STOP_COPY)).toBe(Errno.EINVAL);
    expect(await getState(client)).toBe(RUNNING);
  });

  it('refuses STOP_COPY -> PRE_COPY, and walks PRE_COPY -> STOP through RUNNING', async () => {
    const device = new MigratableDevice(true);
    const { client } = await setup(device);
    expect(await setState(client, PRE_COPY)).toBeInstanceOf(Buffer);
    // PRE_COPY has nothing to send early: "nothing for now".
    expect(await migRead(client, 64)).toEqual(u32s(8, 0));
    expect(await setState(client, STOP)).toBeInstanceOf(Buffer);
    expect(device.log).toEqual(['stop']);
    expect(await setState(client, PRE_COPY)).toBeInstanceOf(Buffer);
    expect(await setState(client, STOP_COPY)).toBeInstanceOf(Buffer);
    expect(await setState(client, PRE_COPY)).toBe(Errno.EINVAL);
    expect(await getState(client)).toBe(STOP_COPY);
    expect(device.log).toEqual(['stop', 'run', 'stop', 'save']);
  });

  it('leaves the migration state alone on DEVICE_RESET', async () => {
    const { client } = await setup(new MigratableDevice());
    expect(await setState(client, STOP)).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_RESET)).toBeInstanceOf(Buffer);
    expect(await getState(client)).toBe(STOP);
  });
});

describe('migration: data', () => {
  it('refuses MIG_DATA_READ outside a saving state, with argsz too small, or above max_data_xfer_size', async () => {
    const { client } = await setup(new MigratableDevice());
    expect(await migRead(client, 64)).toBe(Errno.EINVAL);
    expect(await setState(client, STOP_COPY)).toBeInstanceOf(Buffer);
    expect(await migRead(client, 64, 71)).toBe(Errno.EINVAL);
    expect(await migRead(client, 1024 * 1024 + 1)).toBe(Errno.EINVAL);
    expect(await client.msg(Command.MIG_DATA_READ, u32s(72, 64, 0))).toBe(Errno.EINVAL);
  });

  it('refuses MIG_DATA_WRITE outside RESUMING, and with a size that lies', async () => {
    const { client } = await setup(new MigratableDevice());
    expect(await migWrite(client, Buffer.alloc(8))).toBe(Errno.EINVAL);
    expect(await setState(client, RESUMING)).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.MIG_DATA_WRITE, Buffer.concat([u32s(16, 9), Buffer.alloc(8)]))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.MIG_DATA_WRITE, Buffer.concat([u32s(16, 7), Buffer.alloc(8)]))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.MIG_DATA_WRITE, u32s(8))).toBe(Errno.EINVAL);
  });

  it('source: RUNNING -> STOP_COPY stops and saves; reads come in chunks until 0; STOP ends it', async () => {
    const device = new MigratableDevice();
    const { client } = await setup(device);
    expect(await setState(client, STOP_COPY)).toEqual(Buffer.concat([u32s(16, SET | MIG_DEVICE_STATE), u32s(STOP_COPY, 0xffff_ffff)]));
    expect(device.log).toEqual(['stop', 'save']);
    const chunks: Buffer[] = [];
    for (;;) {
      const r = (await migRead(client, 4096)) as Buffer;
      const size = r.readUInt32LE(4);
      expect(r.readUInt32LE(0)).toBe(8 + size);
      expect(r.length).toBe(8 + size);
      if (size === 0) break;
      chunks.push(r.subarray(8));
    }
    expect(chunks.map((c) => c.length)).toEqual([4096, 4096, 1808]);
    expect(Buffer.concat(chunks)).toEqual(device.blob);
    expect(await migRead(client, 4096)).toEqual(u32s(8, 0));
    expect(await setState(client, STOP)).toBeInstanceOf(Buffer);
    expect(await migRead(client, 4096)).toBe(Errno.EINVAL);
    expect(await setState(client, RUNNING)).toBeInstanceOf(Buffer);
    expect(device.log).toEqual(['stop', 'save', 'run']);
  });

  it('destination: RESUMING, MIG_DATA_WRITE chunks, STOP loads the whole stream', async () => {
    const source = new MigratableDevice();
    const device = new MigratableDevice();
    const { client } = await setup(device);
    expect(await setState(client, RESUMING)).toBeInstanceOf(Buffer);
    expect(device.log).toEqual(['stop']);
    for (let at = 0; at < source.blob.length; at += 3000) {
      expect(await migWrite(client, source.blob.subarray(at, at + 3000))).toEqual(Buffer.alloc(0));
    }
    expect(device.loaded).toBeNull();
    expect(await setState(client, STOP)).toBeInstanceOf(Buffer);
    expect(device.loaded).toEqual(source.blob);
    expect(await setState(client, RUNNING)).toBeInstanceOf(Buffer);
    expect(device.log).toEqual(['stop', 'load 10000', 'run']);
  });

  it('destination: a load the device refuses fails the SET and goes to ERROR; DEVICE_RESET recovers', async () => {
    const device = new MigratableDevice();
    device.failLoad = true;
    const { client } = await setup(device);
    expect(await setState(client, RESUMING)).toBeInstanceOf(Buffer);
    expect(await migWrite(client, Buffer.from('garbage'))).toBeInstanceOf(Buffer);
    expect(await setState(client, RUNNING)).toBe(Errno.EINVAL);
    expect(await getState(client)).toBe(MigState.ERROR);
    // Nothing can be requested from ERROR; a reset runs the device again.
    expect(await setState(client, STOP)).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_RESET)).toBeInstanceOf(Buffer);
    expect(await getState(client)).toBe(RUNNING);
    expect(device.log).toEqual(['stop', 'load 7', 'run']);
  });

  it('refuses region accesses in STOP_COPY, allows them in STOP', async () => {
    const device = new MigratableDevice();
    const { client } = await setup(device);
    expect(await setState(client, STOP)).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.REGION_READ, regionAccess(7, 0, 4))).toBeInstanceOf(Buffer);
    expect(await setState(client, STOP_COPY)).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.REGION_READ, regionAccess(7, 0, 4))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(7, 0, 1, Buffer.from([1])))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_WRITE_MULTI, Buffer.concat([u64(1), u64(0), u32s(7, 1), u64(1)]))).toBe(Errno.EINVAL);
    expect(device.calls).toEqual([]);
    expect(await setState(client, STOP)).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(7, 0, 1, Buffer.from([1])))).toBeInstanceOf(Buffer);
  });
});

describe('DMA logging', () => {
  const IOVA = 0x100000;
  const start = (pageSize: number | bigint, ranges: [number, number][] = []) =>
    feature(1024, SET | DMA_LOGGING_START, Buffer.concat([u64(pageSize), u32s(ranges.length, 0), ...ranges.flatMap(([a, l]) => [u64(a), u64(l)])]));
  const stop = () => feature(8, SET | DMA_LOGGING_STOP);
  const report = (iova: number, length: number, pageSize: number, argsz = 1024) =>
    feature(argsz, GET | DMA_LOGGING_REPORT, Buffer.concat([u64(iova), u64(length), u64(pageSize)]));
  /** The set bits of a report reply's bitmap. */
  const bits = (reply: Buffer | number): number[] => {
    expect(reply).toBeInstanceOf(Buffer);
    const bitmap = (reply as Buffer).subarray(32);
    const out: number[] = [];
    for (let k = 0; k < bitmap.length * 8; k++) if (bitmap[k >> 3]! & (1 << (k & 7))) out.push(k);
    return out;
  };

  async function logging() {
    const device = new MigratableDevice();
    const { client } = await setup(device);
    const mem = guestMemory('dirty', 16 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, IOVA, 16 * PAGE), [mem.fd.value])).toBeInstanceOf(Buffer);
    return { client, device, dma: device.ctx!.dma };
  }

  it('refuses page size 0, a range count that lies, a second START, and REPORT/STOP while off', async () => {
    const { client } = await logging();
    expect(await client.msg(Command.DEVICE_FEATURE, start(0))).toBe(Errno.EINVAL);
    const lying = Buffer.concat([u64(PAGE), u32s(2, 0), u64(IOVA), u64(PAGE)]);
    expect(await client.msg(Command.DEVICE_FEATURE, feature(1024, SET | DMA_LOGGING_START, lying))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, PAGE))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, stop())).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, start(PAGE))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_FEATURE, start(PAGE))).toBe(Errno.EINVAL);
  });

  it('answers START with the page size it chose', async () => {
    const { client } = await logging();
    const ranges: [number, number][] = [[IOVA, 16 * PAGE]];
    const reply = (await client.msg(Command.DEVICE_FEATURE, start(1000, ranges))) as Buffer;
    expect(reply).toEqual(feature(1024, SET | DMA_LOGGING_START, Buffer.concat([u64(PAGE), u32s(1, 0), u64(IOVA), u64(16 * PAGE)])));
  });

  it('reports pages written through views and copies, and clears them when read', async () => {
    const { client, dma } = await logging();
    expect(await client.msg(Command.DEVICE_FEATURE, start(PAGE))).toBeInstanceOf(Buffer);
    dma.view(IOVA + 3 * PAGE + 100, 8, true).fill(1);
    await dma.write(IOVA + 9 * PAGE - 2, Buffer.alloc(4)); // pages 8 and 9
    dma.view(IOVA + 12 * PAGE, 8, false); // a read marks nothing
    const io = dma.acquire(IOVA + 14 * PAGE, 1, true);
    io.release();
    const reply = (await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, PAGE))) as Buffer;
    expect(reply.readUInt32LE(0)).toBe(8 + 24 + 8);
    expect(reply.length).toBe(8 + 24 + 8);
    expect(reply.subarray(8, 32)).toEqual(Buffer.concat([u64(IOVA), u64(16 * PAGE), u64(PAGE)]));
    expect(bits(reply)).toEqual([3, 8, 9, 14]);
    expect(bits(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, PAGE)))).toEqual([]);
  });

  it('scales the log to the report page size', async () => {
    const { client, dma } = await logging();
    expect(await client.msg(Command.DEVICE_FEATURE, start(PAGE))).toBeInstanceOf(Buffer);
    dma.view(IOVA + 3 * PAGE, 1, true);
    dma.view(IOVA + 8 * PAGE, 1, true);
    expect(bits(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, 2 * PAGE)))).toEqual([1, 4]);
    dma.view(IOVA + 3 * PAGE, 1, true);
    expect(bits(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, PAGE / 2)))).toEqual([6, 7]);
  });

  it('keeps the log when a REPORT is refused for too small an argsz', async () => {
    const { client, dma } = await logging();
    expect(await client.msg(Command.DEVICE_FEATURE, start(PAGE))).toBeInstanceOf(Buffer);
    dma.view(IOVA + 5 * PAGE, 1, true);
    expect(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, PAGE, 8 + 24 + 7))).toBe(Errno.EINVAL);
    expect(bits(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, PAGE, 8 + 24 + 8)))).toEqual([5]);
  });

  it('refuses a REPORT range that is not exactly one map, or a page size that is not a power of two', async () => {
    const { client } = await logging();
    expect(await client.msg(Command.DEVICE_FEATURE, start(PAGE))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 8 * PAGE, PAGE))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, report(IOVA + PAGE, 15 * PAGE, PAGE))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, report(0, PAGE, PAGE))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, 3000))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, 0))).toBe(Errno.EINVAL);
  });

  it('logs maps added while logging, and reports message-only maps as clean', async () => {
    const { client, dma } = await logging();
    expect(await client.msg(Command.DEVICE_FEATURE, start(PAGE))).toBeInstanceOf(Buffer);
    const later = guestMemory('dirty-later', 2 * PAGE);
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, 0x400000, 2 * PAGE), [later.fd.value])).toBeInstanceOf(Buffer);
    dma.view(0x400000 + PAGE, 1, true);
    expect(bits(await client.msg(Command.DEVICE_FEATURE, report(0x400000, 2 * PAGE, PAGE)))).toEqual([1]);
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, 0x800000, 2 * PAGE))).toBeInstanceOf(Buffer);
    expect(bits(await client.msg(Command.DEVICE_FEATURE, report(0x800000, 2 * PAGE, PAGE)))).toEqual([]);
  });

  it('stops logging on STOP', async () => {
    const { client, dma } = await logging();
    expect(await client.msg(Command.DEVICE_FEATURE, start(PAGE))).toBeInstanceOf(Buffer);
    dma.view(IOVA, 1, true);
    expect(await client.msg(Command.DEVICE_FEATURE, stop())).toEqual(stop());
    expect(dma.logging).toBe(false);
    expect(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, PAGE))).toBe(Errno.EINVAL);
    // A new session starts clean.
    expect(await client.msg(Command.DEVICE_FEATURE, start(PAGE))).toBeInstanceOf(Buffer);
    expect(bits(await client.msg(Command.DEVICE_FEATURE, report(IOVA, 16 * PAGE, PAGE)))).toEqual([]);
  });
});

describe('migration across a client hang-up', () => {
  it('a saving or loading session ends with its client: the next client finds a plain state', async () => {
    const device = new MigratableDevice();
    const { server, socketPath, client } = await setup(device);
    expect(await setState(client, RESUMING)).toBeInstanceOf(Buffer);
    expect(await migWrite(client, Buffer.from('half a stream'))).toBeInstanceOf(Buffer);
    const gone = new Promise((r) => server.once('disconnect', r));
    client.close();
    await gone;
    const next = await rawClient(socketPath);
    try {
      // RUNNING, not RESUMING (a client that knows nothing of migration can use it), and nothing
      // of the half stream was loaded.
      expect(await getState(next)).toBe(RUNNING);
      expect(device.loaded).toBeNull();
      expect(device.log).toEqual(['stop', 'run']);
    } finally {
      next.close();
    }
  });
});
