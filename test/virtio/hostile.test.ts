// Guest errors in the ring structure and the queue setup, each driven through region accesses:
// the device sets DEVICE_NEEDS_RESET (with a configuration-change interrupt), stops, never throws,
// and comes back after a reset. Buffers outside the maps are not ring errors: those chains still
// reach the device, which fails the request (see the virtio-blk tests).
import { afterEach, describe, expect, it } from 'vitest';
import { PciIrq } from '../../lib/protocol/constants';
import { CommonCfg, DescFlags, DeviceStatus, Feature, featureBit } from '../../lib/virtio/spec';
import { EchoDevice } from './echo';
import { DriverQueue, VirtioRig, pattern, tick } from './rig';

const rigs: VirtioRig<EchoDevice>[] = [];
async function ready(options: ConstructorParameters<typeof EchoDevice>[0] = {}, features?: bigint): Promise<{ r: VirtioRig<EchoDevice>; q: DriverQueue }> {
  const r = new VirtioRig(new EchoDevice({ queueSize: 8, ...options }));
  rigs.push(r);
  await r.init(features === undefined ? {} : { features });
  return { r, q: r.queues[0]! };
}
afterEach(async () => {
  for (const r of rigs.splice(0)) await r.close();
});

/** Kicks, lets the device run, and checks it now needs a reset (and said so). */
async function expectNeedsReset(r: VirtioRig<EchoDevice>, q: DriverQueue, why: RegExp): Promise<void> {
  const lines: string[] = [];
  (r.device as unknown as { trace: (l: string) => void }).trace = (l) => lines.push(l);
  q.kick();
  await tick();
  expect(r.status & DeviceStatus.DEVICE_NEEDS_RESET).toBe(DeviceStatus.DEVICE_NEEDS_RESET);
  expect(r.device.running).toBe(false);
  expect(lines.join('\n')).toMatch(why);
  expect(r.drainIrq(PciIrq.MSIX, 0)).toBe(1); // the configuration vector
  // Stopped: more work is not taken.
  const seen = r.device.seen.length;
  q.kick();
  await tick();
  expect(r.device.seen.length).toBe(seen);
  // A reset brings it back.
  await r.init();
  const q2 = r.queues[0]!;
  const a = r.alloc(8, 8);
  const b = r.alloc(8, 8);
  q2.add([{ addr: a, len: 8 }, { addr: b, len: 8, write: true }]);
  q2.kick();
  expect((await r.waitUsed(q2)).length).toBe(1);
}

describe('broken chains set DEVICE_NEEDS_RESET', () => {
  it('a chain that loops', async () => {
    const { r, q } = await ready();
    const a = r.alloc(16, 8);
    q.writeDesc(0, a, 16, DescFlags.NEXT, 1);
    q.writeDesc(1, a, 16, DescFlags.NEXT, 0);
    q.publish(0);
    await expectNeedsReset(r, q, /loops or is longer/);
  });

  it('a chain that points at itself', async () => {
    const { r, q } = await ready();
    q.writeDesc(3, r.alloc(16), 16, DescFlags.NEXT | DescFlags.WRITE, 3);
    q.publish(3);
    await expectNeedsReset(r, q, /loops/);
  });

  it('an indirect table longer than the queue', async () => {
    const { r, q } = await ready();
    const table = r.alloc(16 * 9, 16);
    for (let i = 0; i < 9; i++) q.writeDesc(i, r.alloc(8, 8), 8, DescFlags.NEXT | DescFlags.WRITE, i + 1, table);
    q.writeDesc(8, r.alloc(8, 8), 8, DescFlags.WRITE, 0, table);
    q.writeDesc(0, table, 16 * 9, DescFlags.INDIRECT, 0);
    q.publish(0);
    await expectNeedsReset(r, q, /longer than the queue/);
  });

  it('a loop inside an indirect table', async () => {
    const { r, q } = await ready();
    const table = r.alloc(16 * 4, 16);
    q.writeDesc(0, r.alloc(8), 8, DescFlags.NEXT, 1, table);
    q.writeDesc(1, r.alloc(8), 8, DescFlags.NEXT, 0, table);
    q.writeDesc(0, table, 16 * 4, DescFlags.INDIRECT, 0);
    q.publish(0);
    await expectNeedsReset(r, q, /loops/);
  });

  it('an indirect descriptor without the feature', async () => {
    const { r, q } = await ready({}, featureBit(Feature.VERSION_1));
    const head = q.add([{ addr: r.alloc(8), len: 8 }, { addr: r.alloc(8), len: 8, write: true }], { indirect: true });
    expect(head).toBe(0);
    await expectNeedsReset(r, q, /without VIRTIO_F_INDIRECT_DESC/);
  });

  it('an indirect descriptor inside an indirect table', async () => {
    const { r, q } = await ready();
    const inner = r.alloc(16, 16);
    q.writeDesc(0, r.alloc(8), 8, DescFlags.WRITE, 0, inner);
    const outer = r.alloc(16, 16);
    q.writeDesc(0, inner, 16, DescFlags.INDIRECT, 0, outer);
    q.writeDesc(0, outer, 16, DescFlags.INDIRECT, 0);
    q.publish(0);
    await expectNeedsReset(r, q, /inside an indirect table/);
  });

  it('INDIRECT together with NEXT', async () => {
    const { r, q } = await ready();
    const table = r.alloc(16, 16);
    q.writeDesc(0, r.alloc(8), 8, DescFlags.WRITE, 0, table);
    q.writeDesc(0, table, 16, DescFlags.INDIRECT | DescFlags.NEXT, 1);
    q.publish(0);
    await expectNeedsReset(r, q, /INDIRECT|NEXT/);
  });

  it('an indirect table whose length is not a multiple of 16, or 0', async () => {
    for (const len of [0, 24]) {
      const { r, q } = await ready();
      q.writeDesc(0, r.alloc(64, 16), len, DescFlags.INDIRECT, 0);
      q.publish(0);
      await expectNeedsReset(r, q, /indirect table of/);
    }
  });

  it('an indirect table outside every map, or above 2^53', async () => {
    for (const addr of [0x7000_0000, 0xffff_ffff_ffff_f000n]) {
      const { r, q } = await ready();
      q.writeDesc(0, addr, 32, DescFlags.INDIRECT, 0);
      q.publish(0);
      await expectNeedsReset(r, q, /unreachable/);
    }
  });

  it('a device-readable buffer after a device-writable one', async () => {
    const { r, q } = await ready();
    q.add([{ addr: r.alloc(8), len: 8, write: true }, { addr: r.alloc(8), len: 8 }]);
    await expectNeedsReset(r, q, /device-readable descriptor after/);
  });

  it('a head or next index out of range', async () => {
    {
      const { r, q } = await ready();
      q.publish(8);
      await expectNeedsReset(r, q, /head 8 is out of range/);
    }
    {
      const { r, q } = await ready();
      q.writeDesc(0, r.alloc(8), 8, DescFlags.NEXT, 200);
      q.publish(0);
      await expectNeedsReset(r, q, /next index 200/);
    }
  });

  it('an available index that jumps by more than the queue size', async () => {
    const { r, q } = await ready();
    q.setAvailIdx(9);
    await expectNeedsReset(r, q, /available index moved/);
  });
});

describe('queue setup the device cannot use', () => {
  it('rings outside every map (found on first use)', async () => {
    const r = new VirtioRig(new EchoDevice({ queueSize: 8 }));
    rigs.push(r);
    await r.init({ noDriverOk: true });
    r.setCommon16(CommonCfg.QUEUE_SELECT, 0);
    // Re-point queue 0 (needs it disabled: reset and set up again by hand).
    await r.reset();
    r.setCommon8(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER);
    r.writeDriverFeatures(featureBit(Feature.VERSION_1));
    r.setCommon8(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK);
    r.enableMsix(3);
    r.setCommon16(CommonCfg.CONFIG_MSIX_VECTOR, 0);
    r.setCommon16(CommonCfg.QUEUE_SELECT, 0);
    r.setCommon32(CommonCfg.QUEUE_DESC, 0x7000_0000);
    r.setCommon32(CommonCfg.QUEUE_DRIVER, 0x7000_1000);
    r.setCommon32(CommonCfg.QUEUE_DEVICE, 0x7000_2000);
    r.setCommon16(CommonCfg.QUEUE_ENABLE, 1);
    r.setCommon8(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK);
    r.barWrite(r.layout.notify, Buffer.from([0, 0]));
    await tick();
    expect(r.status & DeviceStatus.DEVICE_NEEDS_RESET).toBe(DeviceStatus.DEVICE_NEEDS_RESET);
  });

  it('misaligned rings, a size that is not a power of two, addresses above 2^53', async () => {
    const cases: [number, number, number][] = [
      [CommonCfg.QUEUE_DESC, 0x10008, 0],
      [CommonCfg.QUEUE_DRIVER, 0x10001, 0],
      [CommonCfg.QUEUE_DEVICE, 0x10002, 0],
      [CommonCfg.QUEUE_SIZE, 6, 0],
      [CommonCfg.QUEUE_SIZE, 0, 0],
      [CommonCfg.QUEUE_SIZE, 16, 0],
      [CommonCfg.QUEUE_DESC, 0, 0xffff_0000],
    ];
    for (const [field, lo, hi] of cases) {
      const r = new VirtioRig(new EchoDevice({ queueSize: 8 }));
      rigs.push(r);
      await r.init({ noDriverOk: true, queues: 1 });
      // Queue 1 is still disabled: configure it badly, enable, then DRIVER_OK.
      r.setupQueue(1, 8, 2);
      await r.reset();
      r.setCommon8(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER);
      r.writeDriverFeatures(featureBit(Feature.VERSION_1));
      r.setCommon8(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK);
      r.setCommon16(CommonCfg.QUEUE_SELECT, 0);
      r.setCommon32(CommonCfg.QUEUE_DESC, 0x10000);
      r.setCommon32(CommonCfg.QUEUE_DRIVER, 0x11000);
      r.setCommon32(CommonCfg.QUEUE_DEVICE, 0x12000);
      if (field === CommonCfg.QUEUE_SIZE) r.setCommon16(field, lo);
      else {
        r.setCommon32(field, lo);
        r.setCommon32(field + 4, hi);
      }
      r.setCommon16(CommonCfg.QUEUE_ENABLE, 1);
      r.setCommon8(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK);
      expect(r.status & DeviceStatus.DEVICE_NEEDS_RESET, `field 0x${field.toString(16)} = 0x${lo.toString(16)}`).toBe(DeviceStatus.DEVICE_NEEDS_RESET);
    }
  });

  it('a used ring the client unmapped while the device was working', async () => {
    const { r, q } = await ready();
    r.device.hold = true;
    q.add([{ addr: r.alloc(8), len: 8 }, { addr: r.alloc(8), len: 8, write: true }]);
    q.kick();
    await tick();
    await r.dma.removeAll();
    r.device.hold = false;
    r.device.release();
    expect(r.status & DeviceStatus.DEVICE_NEEDS_RESET).toBe(DeviceStatus.DEVICE_NEEDS_RESET);
    expect(r.device.inFlight).toBe(0);
  });

  it('bus mastering off: the rings are unreachable', async () => {
    const { r, q } = await ready();
    r.configWrite(0x04, Buffer.from([0x02, 0x00]));
    q.add([{ addr: r.alloc(8), len: 8 }, { addr: r.alloc(8), len: 8, write: true }]);
    q.kick();
    await tick();
    expect(r.status & DeviceStatus.DEVICE_NEEDS_RESET).toBe(DeviceStatus.DEVICE_NEEDS_RESET);
  });

  it('a DMA re-map under a running queue is followed (same memory, new mapping)', async () => {
    const { r, q } = await ready();
    q.add([{ addr: r.alloc(8), len: 8 }, { addr: r.alloc(8), len: 8, write: true }]);
    q.kick();
    await r.waitUsed(q);
    await r.remapMemory();
    const src = r.alloc(8);
    pattern(8, 3).copy(r.mem, src);
    const dst = r.alloc(8);
    q.add([{ addr: src, len: 8 }, { addr: dst, len: 8, write: true }]);
    q.kick();
    await r.waitUsed(q);
    expect(r.mem.subarray(dst, dst + 8)).toEqual(pattern(8, 3));
  });

  it('buffers outside every map reach the device (it fails the request, the ring is fine)', async () => {
    const { r, q } = await ready();
    q.add([{ addr: 0x7000_0000, len: 8 }, { addr: r.alloc(8), len: 8, write: true }]);
    q.kick();
    const [used] = await r.waitUsed(q);
    expect(used!.len).toBe(0); // the echo device could not read it
    expect(r.status & DeviceStatus.DEVICE_NEEDS_RESET).toBe(0);
  });
});
