// What a careless or hostile guest can do to virtio-blk: every mistake is a status (IOERR, UNSUPP)
// or, for requests the device cannot even answer, DEVICE_NEEDS_RESET. Nothing throws, nothing
// reaches the backend that should not, and DMA_UNMAP / reset wait for I/O in flight.
import { afterEach, describe, expect, it } from 'vitest';
import { RamBackend, type BlockBackend } from '../../../lib/block';
import { createMemfd } from '../../../lib/native/memfd';
import { DmaMapFlags } from '../../../lib/protocol/constants';
import { BlkDwzFlags, BlkReqType, CommonCfg, DeviceStatus } from '../../../lib/virtio/spec';
import { BlkRig, IOERR, OK, UNSUPP, pattern, tick, type BlkRigOptions } from './rig';

const rigs: BlkRig[] = [];
async function ready(options: BlkRigOptions = {}): Promise<BlkRig> {
  const r = new BlkRig({ diskSize: 1 << 20, ...options });
  rigs.push(r);
  await r.init();
  return r;
}
afterEach(async () => {
  for (const r of rigs.splice(0)) await r.close();
});

const needsReset = (r: BlkRig) => (r.status & DeviceStatus.DEVICE_NEEDS_RESET) !== 0;

/** A backend whose operations wait for `open()`, or fail. */
function controlled(inner: BlockBackend) {
  let gate: Promise<void> | null = null;
  let open = () => {};
  let fail: Error | null = null;
  const wrap = <T>(op: () => Promise<T>) => async () => {
    if (gate) await gate;
    if (fail) throw fail;
    return op();
  };
  const backend: BlockBackend = {
    get size() {
      return inner.size;
    },
    discardZeroes: true,
    read: (o, d) => wrap(() => inner.read(o, d))(),
    write: (o, s, f) => wrap(() => inner.write(o, s, f))(),
    flush: () => wrap(() => inner.flush())(),
    discard: (o, l) => wrap(() => inner.discard(o, l))(),
    close: () => inner.close(),
  };
  return {
    backend,
    hold() {
      gate = new Promise<void>((r) => (open = r));
    },
    release() {
      gate = null;
      open();
    },
    failWith(err: Error | null) {
      fail = err;
    },
  };
}

describe('requests that fail with a status', () => {
  it('sectors past the capacity, or above 2^53', async () => {
    const r = await ready();
    const cap = r.device.capacity;
    expect((await r.request(0, BlkReqType.IN, cap, { inLen: 512 })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.IN, cap - 1, { inLen: 1024 })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.OUT, cap, { out: pattern(512, 1) })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.OUT, 0xffff_ffff_ffff_ff00n, { out: pattern(512, 1) })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.IN, 2 ** 53, { inLen: 512 })).status).toBe(IOERR);
    expect(r.device.stats.errors).toBe(5);
    expect(needsReset(r)).toBe(false);
  });

  it('data lengths that are not a multiple of 512', async () => {
    const r = await ready();
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 511 })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.OUT, 0, { out: pattern(700, 1) })).status).toBe(IOERR);
  });

  it('data outside every map, or in a map without the access needed', async () => {
    const r = await ready();
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 512, dataAddr: 0x7000_0000 })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.OUT, 0, { out: pattern(512, 1), dataAddr: 0x7000_0000 })).status).toBe(IOERR);
    // Data running off the end of the only map.
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 1024, dataAddr: r.memSize - 512 })).status).toBe(IOERR);
    // A read-only map: fine to write from, not to read into.
    const ro = 0x4000_0000;
    expect(r.dma.add({ iova: BigInt(ro), size: 0x10000n, offset: 0n, flags: DmaMapFlags.READ }, createMemfd('ro', 0x10000))).toBe(0);
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 512, dataAddr: ro })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.OUT, 0, { out: Buffer.alloc(512), dataAddr: ro })).status).toBe(OK);
    expect(needsReset(r)).toBe(false);
  });

  it('a header outside the maps', async () => {
    const r = await ready();
    const q = r.queues[0]!;
    const status = r.alloc(1);
    q.add([{ addr: 0x7000_0000, len: 16 }, { addr: status, len: 1, write: true }]);
    q.kick();
    await r.waitUsed(q);
    expect(r.mem[status]).toBe(IOERR);
  });

  it('unknown and unsupported request types', async () => {
    const r = await ready();
    for (const type of [2, 3, BlkReqType.GET_LIFETIME, BlkReqType.SECURE_ERASE, 0xffffffff]) {
      expect((await r.request(0, type, 0, { inLen: 512 })).status, `type ${type}`).toBe(UNSUPP);
    }
  });

  it('too many segments (seg_max) or a buffer larger than size_max', async () => {
    const r = await ready({ segMax: 4, sizeMax: 8192 });
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 4096, segments: 4 })).status).toBe(OK);
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 4096, segments: 8 })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 16384 })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 16384, segments: 2 })).status).toBe(OK);
  });

  it('discard and write zeroes: UNMAP on discard, unknown flags, bad ranges, bad sizes', async () => {
    const r = await ready();
    const cap = r.device.capacity;
    const dwz = (type: number, out: Buffer) => r.request(0, type, 0, { out });
    expect((await dwz(BlkReqType.DISCARD, BlkRig.ranges([{ sector: 0, sectors: 8, flags: BlkDwzFlags.UNMAP }]))).status).toBe(UNSUPP);
    expect((await dwz(BlkReqType.WRITE_ZEROES, BlkRig.ranges([{ sector: 0, sectors: 8, flags: 2 }]))).status).toBe(UNSUPP);
    expect((await dwz(BlkReqType.DISCARD, BlkRig.ranges([{ sector: cap - 1, sectors: 2 }]))).status).toBe(IOERR);
    expect((await dwz(BlkReqType.DISCARD, BlkRig.ranges([{ sector: 2n ** 60n, sectors: 1 }]))).status).toBe(IOERR);
    expect((await dwz(BlkReqType.WRITE_ZEROES, BlkRig.ranges([{ sector: 0, sectors: 1 << 20 }]))).status).toBe(IOERR);
    expect((await dwz(BlkReqType.DISCARD, Buffer.alloc(20))).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.DISCARD, 0, {})).status).toBe(IOERR);
    expect((await dwz(BlkReqType.DISCARD, BlkRig.ranges(Array.from({ length: 257 }, () => ({ sector: 0, sectors: 1 }))))).status).toBe(IOERR);
    expect((await dwz(BlkReqType.WRITE_ZEROES, BlkRig.ranges([{ sector: 0, sectors: 1 }, { sector: 8, sectors: 1 }]))).status).toBe(IOERR);
    // A range list outside the maps.
    const q = r.queues[0]!;
    const hdr = r.alloc(16);
    r.mem.writeUInt32LE(BlkReqType.DISCARD, hdr);
    const status = r.alloc(1);
    q.add([{ addr: hdr, len: 16 }, { addr: 0x7000_0000, len: 16 }, { addr: status, len: 1, write: true }]);
    q.kick();
    await r.waitUsed(q);
    expect(r.mem[status]).toBe(IOERR);
    expect(needsReset(r)).toBe(false);
  });

  it('backend failures are IOERR for that request only', async () => {
    const c = controlled(new RamBackend(1 << 20));
    const r = await ready({ backend: c.backend });
    c.failWith(Object.assign(new Error('disk on fire'), { code: 'EIO' }));
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 512 })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.OUT, 0, { out: pattern(512, 1) })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.FLUSH, 0)).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.DISCARD, 0, { out: BlkRig.ranges([{ sector: 0, sectors: 1 }]) })).status).toBe(IOERR);
    c.failWith(null);
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 512 })).status).toBe(OK);
  });
});

describe('requests the device cannot answer: DEVICE_NEEDS_RESET', () => {
  it('no status byte (nothing device-writable)', async () => {
    const r = await ready();
    r.place(0, BlkReqType.FLUSH, 0, { noStatus: true });
    r.queues[0]!.kick();
    await tick();
    expect(needsReset(r)).toBe(true);
    expect(r.device.inFlight).toBe(0);
  });

  it('a header shorter than 16 bytes', async () => {
    const r = await ready();
    r.place(0, BlkReqType.IN, 0, { headerLen: 8, inLen: 512 });
    r.queues[0]!.kick();
    await tick();
    expect(needsReset(r)).toBe(true);
  });

  it('a status byte outside the maps', async () => {
    const r = await ready();
    r.place(0, BlkReqType.IN, 0, { inLen: 512, statusAddr: 0x7000_0000 });
    r.queues[0]!.kick();
    await tick();
    expect(needsReset(r)).toBe(true);
    expect(r.device.inFlight).toBe(0);
    // It recovers after a reset.
    await r.init();
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 512 })).status).toBe(OK);
  });
});

describe('lifetime of guest memory and of requests', () => {
  it('DMA_UNMAP waits for the backend to finish with the data', async () => {
    const c = controlled(new RamBackend(1 << 20));
    const r = await ready({ backend: c.backend });
    c.hold();
    const p = r.place(0, BlkReqType.IN, 0, { inLen: 4096 });
    r.queues[0]!.kick();
    await tick();
    let unmapped = false;
    const unmap = r.dma.removeAll().then(() => (unmapped = true));
    await tick();
    expect(unmapped).toBe(false);
    c.release();
    await unmap;
    expect(unmapped).toBe(true);
    // The used ring went with the map: the device needs a reset, and did not crash.
    await tick();
    expect(needsReset(r)).toBe(true);
    expect(p.head).toBe(0);
  });

  it('a reset waits for I/O in flight and drops its completion', async () => {
    const c = controlled(new RamBackend(1 << 20));
    const r = await ready({ backend: c.backend });
    c.hold();
    r.place(0, BlkReqType.OUT, 0, { out: pattern(4096, 1) });
    r.queues[0]!.kick();
    await tick();
    expect(r.device.inFlight).toBe(1);
    r.setCommon8(CommonCfg.DEVICE_STATUS, 0);
    await tick();
    expect(r.status).not.toBe(0);
    c.release();
    await r.waitFor(() => r.status === 0, 'reset');
    expect(r.queues[0]!.reap()).toEqual([]);
    expect(r.device.inFlight).toBe(0);
  });

  it('data in a map without shared memory goes through DMA_READ / DMA_WRITE messages', async () => {
    const r = await ready();
    const base = 0x8000_0000;
    const remote = Buffer.alloc(0x10000);
    r.dma.transport = {
      maxTransfer: 1024,
      read: async (iova, length) => Buffer.from(remote.subarray(iova - base, iova - base + length)),
      write: async (iova, data) => {
        remote.set(data, iova - base);
      },
    };
    expect(r.dma.add({ iova: BigInt(base), size: 0x10000n, offset: 0n, flags: DmaMapFlags.READ | DmaMapFlags.WRITE }, null)).toBe(0);
    pattern(4096, 7).copy(remote, 0);
    expect((await r.request(0, BlkReqType.OUT, 8, { out: Buffer.alloc(4096), dataAddr: base })).status).toBe(OK);
    expect((await r.request(0, BlkReqType.IN, 8, { inLen: 4096 })).data.equals(pattern(4096, 7))).toBe(true);
    expect((await r.request(0, BlkReqType.IN, 8, { inLen: 4096, dataAddr: base + 0x8000 })).status).toBe(OK);
    expect(remote.subarray(0x8000, 0x9000).equals(pattern(4096, 7))).toBe(true);
  });
});
