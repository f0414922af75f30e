// The modern virtio-pci transport, driven only through config space and BAR4 region accesses with
// guest memory in a real DmaSpace: identity and capabilities, feature negotiation, queue setup,
// request round trips (direct and indirect chains), interrupts (MSI-X per queue, INTx with ISR),
// EVENT_IDX, reset semantics, the PCI_CFG window and the mmap'd notify page.
import { afterEach, describe, expect, it } from 'vitest';
import { PciIrq, PciRegion } from '../../lib/protocol/constants';
import { Cfg, CapId } from '../../lib/pci/ids';
import { StopReason } from '../../lib/pci/device';
import { VirtioPciLayout } from '../../lib/virtio/pci';
import {
  CommonCfg,
  DeviceStatus,
  Feature,
  PciCapType,
  UsedFlags,
  AvailFlags,
  VIRTIO_MSI_NO_VECTOR,
  featureBit,
} from '../../lib/virtio/spec';
import { ECHO_DEVICE_TYPE, ECHO_F_TEST, EchoDevice } from './echo';
import { TRANSPORT_FEATURES, VirtioRig, pattern, tick } from './rig';

const rigs: VirtioRig<EchoDevice>[] = [];
function rig(options: ConstructorParameters<typeof EchoDevice>[0] = {}): VirtioRig<EchoDevice> {
  const r = new VirtioRig(new EchoDevice(options));
  rigs.push(r);
  return r;
}
afterEach(async () => {
  for (const r of rigs.splice(0)) await r.close();
});

/** A readable buffer with `data` and a writable buffer of `len` bytes. */
function bufs(r: VirtioRig, data: Buffer, len = data.length) {
  const src = r.alloc(data.length, 8);
  data.copy(r.mem, src);
  const dst = r.alloc(len, 8);
  return { src, dst, chain: [{ addr: src, len: data.length }, { addr: dst, len, write: true }] };
}

describe('identity and capabilities', () => {
  it('is a non-transitional virtio PCI function with the five capabilities in BAR4', () => {
    const r = rig();
    const cfg = r.configRead(0, 64);
    expect(cfg.readUInt16LE(Cfg.VENDOR_ID)).toBe(0x1af4);
    expect(cfg.readUInt16LE(Cfg.DEVICE_ID)).toBe(0x1040 + ECHO_DEVICE_TYPE);
    expect(cfg[Cfg.REVISION_ID]).toBeGreaterThanOrEqual(1);
    expect(cfg.readUInt16LE(Cfg.SUBSYSTEM_VENDOR_ID)).toBe(0x1af4);
    expect(cfg.readUInt16LE(Cfg.SUBSYSTEM_ID)).toBeGreaterThanOrEqual(0x40);
    const caps = r.virtioCaps();
    expect(caps.get(PciCapType.COMMON_CFG)).toMatchObject({ bar: 4, offset: VirtioPciLayout.COMMON });
    expect(caps.get(PciCapType.ISR_CFG)).toMatchObject({ bar: 4, offset: VirtioPciLayout.ISR });
    expect(caps.get(PciCapType.DEVICE_CFG)).toMatchObject({ bar: 4, offset: VirtioPciLayout.DEVICE });
    expect(caps.get(PciCapType.NOTIFY_CFG)).toMatchObject({ bar: 4, offset: VirtioPciLayout.NOTIFY, extra: 4 });
    expect(caps.get(PciCapType.PCI_CFG)).toBeDefined();
    // BAR4 is a 64-bit memory BAR of 16 KiB; MSI-X lives in BAR1.
    expect(r.device.regions[PciRegion.BAR4]!.size).toBe(0x4000);
    expect(r.device.config.bar(4)).toMatchObject({ size: 0x4000, is64: true });
    expect(r.capability(CapId.MSIX)).toBeGreaterThan(0);
  });

  it('offers the transport features plus the device bits, nothing above bit 63', () => {
    const r = rig();
    const f = r.deviceFeatures();
    expect(f & TRANSPORT_FEATURES).toBe(TRANSPORT_FEATURES);
    expect(f & featureBit(ECHO_F_TEST)).not.toBe(0n);
    expect(f & featureBit(Feature.RING_PACKED)).toBe(0n);
    r.setCommon32(CommonCfg.DEVICE_FEATURE_SELECT, 2);
    expect(r.common32(CommonCfg.DEVICE_FEATURE)).toBe(0);
  });

  it('serves the device configuration and a write to it', () => {
    const r = rig();
    expect([...r.deviceConfig(0, 8)]).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    r.barWrite(VirtioPciLayout.DEVICE + 2, Buffer.from([0xaa]));
    expect(r.deviceConfig(2, 1)[0]).toBe(0xaa);
    // Past the structure: zeroes, and writes are ignored.
    expect(r.deviceConfig(8, 4).readUInt32LE(0)).toBe(0);
    r.barWrite(VirtioPciLayout.DEVICE + 100, Buffer.from([1]));
  });

  it('refuses accesses that cross two structures', () => {
    const r = rig();
    const dst = Buffer.alloc(8);
    expect(r.device.regions[PciRegion.BAR4]!.read!(0xffc, dst)).toBeGreaterThan(0);
    expect(r.device.regions[PciRegion.BAR4]!.write!(0xffc, dst)).toBeGreaterThan(0);
  });
});

describe('feature negotiation and status', () => {
  it('accepts an offered subset with VERSION_1 and latches it at FEATURES_OK', async () => {
    const r = rig();
    await r.init({ features: featureBit(Feature.VERSION_1) });
    expect(r.device.negotiated(Feature.VERSION_1)).toBe(true);
    expect(r.device.negotiated(Feature.EVENT_IDX)).toBe(false);
    // The driver cannot change its features any more.
    r.writeDriverFeatures(TRANSPORT_FEATURES);
    expect(r.device.driverFeatures).toBe(featureBit(Feature.VERSION_1));
    expect(r.status).toBe(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK);
  });

  it('refuses FEATURES_OK without VERSION_1, or with a bit it did not offer', async () => {
    const r = rig();
    await expect(r.init({ features: featureBit(Feature.EVENT_IDX) })).rejects.toThrow(/refused/);
    await expect(r.init({ features: TRANSPORT_FEATURES | featureBit(Feature.RING_PACKED) })).rejects.toThrow(/refused/);
    await expect(r.init({ features: TRANSPORT_FEATURES | featureBit(7) })).rejects.toThrow(/refused/);
    expect(r.device.running).toBe(false);
    await r.init();
    expect(r.device.running).toBe(true);
  });

  it('does not run on DRIVER_OK without FEATURES_OK', async () => {
    const r = rig();
    r.enableBusMaster();
    r.setCommon8(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.DRIVER_OK);
    expect(r.device.running).toBe(false);
  });

  it('FAILED stops processing', async () => {
    const r = rig();
    await r.init();
    r.setCommon8(CommonCfg.DEVICE_STATUS, r.status | DeviceStatus.FAILED);
    expect(r.device.running).toBe(false);
    const q = r.queues[0]!;
    const { chain } = bufs(r, pattern(16, 1));
    q.add(chain);
    q.kick();
    await tick();
    expect(q.reap()).toEqual([]);
  });
});

describe('queue configuration', () => {
  it('reports num_queues, the maximum size, notify offsets; absent queues read size 0', () => {
    const r = rig({ queues: 3, queueSize: 64 });
    expect(r.common16(CommonCfg.NUM_QUEUES)).toBe(3);
    for (let i = 0; i < 3; i++) {
      r.setCommon16(CommonCfg.QUEUE_SELECT, i);
      expect(r.common16(CommonCfg.QUEUE_SIZE)).toBe(64);
      expect(r.common16(CommonCfg.QUEUE_NOTIFY_OFF)).toBe(i);
      expect(r.common16(CommonCfg.QUEUE_ENABLE)).toBe(0);
      expect(r.common16(CommonCfg.QUEUE_MSIX_VECTOR)).toBe(VIRTIO_MSI_NO_VECTOR);
    }
    r.setCommon16(CommonCfg.QUEUE_SELECT, 3);
    expect(r.common16(CommonCfg.QUEUE_SIZE)).toBe(0);
    r.setCommon16(CommonCfg.QUEUE_SIZE, 8); // ignored: no such queue
    expect(r.common16(CommonCfg.QUEUE_SIZE)).toBe(0);
  });

  it('maps MSI-X vectors in the table and reads NO_VECTOR for others', () => {
    const r = rig({ queues: 2 });
    r.setCommon16(CommonCfg.CONFIG_MSIX_VECTOR, 2);
    expect(r.common16(CommonCfg.CONFIG_MSIX_VECTOR)).toBe(2);
    r.setCommon16(CommonCfg.CONFIG_MSIX_VECTOR, 3);
    expect(r.common16(CommonCfg.CONFIG_MSIX_VECTOR)).toBe(VIRTIO_MSI_NO_VECTOR);
    r.setCommon16(CommonCfg.QUEUE_SELECT, 1);
    r.setCommon16(CommonCfg.QUEUE_MSIX_VECTOR, 1);
    expect(r.common16(CommonCfg.QUEUE_MSIX_VECTOR)).toBe(1);
    r.setCommon16(CommonCfg.QUEUE_MSIX_VECTOR, 0x1234);
    expect(r.common16(CommonCfg.QUEUE_MSIX_VECTOR)).toBe(VIRTIO_MSI_NO_VECTOR);
  });

  it('keeps a queue\'s configuration fixed once enabled; writing 0 to queue_enable does nothing', async () => {
    const r = rig();
    await r.init({ noDriverOk: true });
    r.setCommon16(CommonCfg.QUEUE_SELECT, 0);
    const desc = r.common32(CommonCfg.QUEUE_DESC);
    r.setCommon32(CommonCfg.QUEUE_DESC, 0x123000);
    r.setCommon16(CommonCfg.QUEUE_SIZE, 2);
    r.setCommon16(CommonCfg.QUEUE_ENABLE, 0);
    expect(r.common32(CommonCfg.QUEUE_DESC)).toBe(desc);
    expect(r.common16(CommonCfg.QUEUE_SIZE)).toBe(16);
    expect(r.common16(CommonCfg.QUEUE_ENABLE)).toBe(1);
  });

  it('reads 64-bit fields as two halves and takes 8-byte writes', async () => {
    const r = rig();
    r.setCommon16(CommonCfg.QUEUE_SELECT, 0);
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(0x1_2345_6780n);
    r.barWrite(VirtioPciLayout.COMMON + CommonCfg.QUEUE_DRIVER, b);
    expect(r.common32(CommonCfg.QUEUE_DRIVER)).toBe(0x2345_6780);
    expect(r.common32(CommonCfg.QUEUE_DRIVER + 4)).toBe(1);
    expect(r.barRead(VirtioPciLayout.COMMON + CommonCfg.QUEUE_DRIVER, 8).readBigUInt64LE(0)).toBe(0x1_2345_6780n);
    // Beyond the structure: zeroes.
    expect(r.barRead(VirtioPciLayout.COMMON + 0x100, 4).readUInt32LE(0)).toBe(0);
  });
});

describe('requests', () => {
  it('echoes a direct chain and interrupts the queue\'s MSI-X vector', async () => {
    const r = rig();
    await r.init();
    const q = r.queues[1]!;
    const data = pattern(300, 7);
    const { dst, chain } = bufs(r, data, 512);
    const head = q.add(chain);
    q.kick();
    const [used] = await r.waitUsed(q);
    expect(used).toEqual({ id: head, len: 300 });
    expect(r.mem.subarray(dst, dst + 300)).toEqual(data);
    await tick();
    expect(r.drainIrq(PciIrq.MSIX, 2)).toBe(1);
    expect(r.device.seen[0]).toMatchObject({ queue: 1, head });
  });

  it('follows an indirect table, split buffers and many chains in one notify', async () => {
    const r = rig();
    await r.init();
    const q = r.queues[0]!;
    const heads: number[] = [];
    const outs: number[] = [];
    for (let k = 0; k < 5; k++) {
      const a = r.alloc(100, 8);
      const b = r.alloc(60, 8);
      pattern(100, k).copy(r.mem, a);
      pattern(60, k + 50).copy(r.mem, b);
      const o1 = r.alloc(80, 8);
      const o2 = r.alloc(80, 8);
      outs.push(o1, o2);
      heads.push(q.add([{ addr: a, len: 100 }, { addr: b, len: 60 }, { addr: o1, len: 80, write: true }, { addr: o2, len: 80, write: true }], { indirect: k % 2 === 0 }));
    }
    q.kick();
    const used = await r.waitUsed(q, 5);
    expect(used.map((u) => u.id)).toEqual(heads);
    expect(used.every((u) => u.len === 160)).toBe(true);
    for (let k = 0; k < 5; k++) {
      const got = Buffer.concat([r.mem.subarray(outs[2 * k]!, outs[2 * k]! + 80), r.mem.subarray(outs[2 * k + 1]!, outs[2 * k + 1]! + 80)]);
      expect(got).toEqual(Buffer.concat([pattern(100, k), pattern(60, k + 50)]));
    }
  });

  it('wraps the 16-bit ring indexes', async () => {
    const r = rig({ queueSize: 4 });
    await r.init({ features: featureBit(Feature.VERSION_1) });
    const q = r.queues[0]!;
    for (let k = 0; k < 70; k++) {
      const { chain } = bufs(r, pattern(8, k));
      q.add(chain);
      q.kick();
      await r.waitUsed(q);
      if (k === 30) r.device.counters.notifies = 0;
    }
    expect(r.device.queues[0]!.lastAvail).toBe(70);
  });

  it('takes no more chains than the queue holds while they are in flight, and resumes', async () => {
    const r = rig({ queueSize: 4 });
    await r.init();
    r.device.hold = true;
    const q = r.queues[0]!;
    const heads: number[] = [];
    for (let k = 0; k < 4; k++) heads.push(q.add(bufs(r, pattern(8, k)).chain, { indirect: true }));
    q.kick();
    await tick();
    expect(r.device.held.length).toBe(4);
    // A driver that reuses a head still in flight: the device holds it until an element frees.
    q.publish(heads[0]!);
    q.kick();
    await tick();
    expect(r.device.held.length).toBe(4);
    r.device.hold = false;
    r.device.release();
    expect((await r.waitUsed(q, 5)).length).toBe(5);
  });
});

describe('interrupts', () => {
  it('INTx: with MSI-X off, sets ISR bit 0, asserts INTx, and the ISR read clears both', async () => {
    const r = rig();
    r.addEventfd(PciIrq.INTX, 0);
    await r.init({ msix: false });
    const q = r.queues[0]!;
    q.add(bufs(r, pattern(8, 1)).chain);
    q.kick();
    await r.waitUsed(q);
    await tick();
    expect(r.drainIrq(PciIrq.INTX, 0)).toBe(1);
    expect(r.configRead(Cfg.STATUS, 2).readUInt16LE(0) & 0x08).toBe(0x08);
    expect(r.read8(VirtioPciLayout.ISR)).toBe(1);
    expect(r.read8(VirtioPciLayout.ISR)).toBe(0);
    expect(r.configRead(Cfg.STATUS, 2).readUInt16LE(0) & 0x08).toBe(0);
  });

  it('a configuration change interrupts the config vector (MSI-X) or sets ISR bit 1 (INTx)', async () => {
    const r = rig();
    await r.init();
    const gen = r.common8(CommonCfg.CONFIG_GENERATION);
    r.device.changeConfig();
    expect(r.common8(CommonCfg.CONFIG_GENERATION)).toBe((gen + 1) & 0xff);
    expect(r.drainIrq(PciIrq.MSIX, 0)).toBe(1);
    const s = rig();
    s.addEventfd(PciIrq.INTX, 0);
    await s.init({ msix: false });
    s.device.changeConfig();
    expect(s.read8(VirtioPciLayout.ISR)).toBe(2);
    expect(s.drainIrq(PciIrq.INTX, 0)).toBe(1);
  });

  it('no interrupt for a queue mapped to NO_VECTOR', async () => {
    const r = rig();
    await r.init();
    r.setCommon16(CommonCfg.QUEUE_SELECT, 0);
    // Vectors are fixed once the queue is enabled? No: the driver may remap them; map to none.
    r.setCommon16(CommonCfg.QUEUE_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);
    const q = r.queues[0]!;
    q.add(bufs(r, pattern(8, 1)).chain);
    q.kick();
    await r.waitUsed(q);
    await tick();
    expect(r.drainIrq(PciIrq.MSIX, 1)).toBe(0);
  });
});

describe('notification suppression', () => {
  it('EVENT_IDX: publishes avail_event after draining; interrupts only when used passes used_event', async () => {
    const r = rig();
    await r.init();
    const q = r.queues[0]!;
    q.setUsedEvent(2); // interrupt when the used index passes 2 (i.e. after the 3rd entry)
    for (let k = 0; k < 2; k++) {
      q.add(bufs(r, pattern(8, k)).chain);
      q.kick();
      await r.waitUsed(q);
      await tick();
      expect(q.availEvent).toBe(k + 1);
    }
    // The first completion always interrupts (nothing signalled before); the second does not.
    expect(r.drainIrq(PciIrq.MSIX, 1)).toBe(1);
    q.add(bufs(r, pattern(8, 9)).chain);
    q.kick();
    await r.waitUsed(q);
    await tick();
    expect(r.drainIrq(PciIrq.MSIX, 1)).toBe(1);
    expect(r.device.counters.suppressed).toBe(1);
  });

  it('without EVENT_IDX: honours NO_INTERRUPT, sets NO_NOTIFY only while busy', async () => {
    const r = rig();
    await r.init({ features: featureBit(Feature.VERSION_1) | featureBit(Feature.INDIRECT_DESC) });
    const q = r.queues[0]!;
    q.setAvailFlags(AvailFlags.NO_INTERRUPT);
    q.add(bufs(r, pattern(8, 1)).chain);
    q.kick();
    await r.waitUsed(q);
    await tick();
    expect(r.drainIrq(PciIrq.MSIX, 1)).toBe(0);
    expect(q.usedFlags & UsedFlags.NO_NOTIFY).toBe(0);
    q.setAvailFlags(0);
    q.add(bufs(r, pattern(8, 2)).chain);
    q.kick();
    await r.waitUsed(q);
    await tick();
    expect(r.drainIrq(PciIrq.MSIX, 1)).toBe(1);
  });
});

describe('reset', () => {
  it('reads the old status until in-flight requests finish, then 0; their completions are dropped', async () => {
    const r = rig();
    await r.init();
    r.device.hold = true;
    const q = r.queues[0]!;
    q.add(bufs(r, pattern(8, 1)).chain);
    q.kick();
    await tick();
    expect(r.device.held.length).toBe(1);
    r.setCommon8(CommonCfg.DEVICE_STATUS, 0);
    await tick();
    expect(r.status).not.toBe(0);
    r.device.hold = false;
    r.device.release();
    await r.waitFor(() => r.status === 0, 'status 0');
    expect(q.reap()).toEqual([]);
    expect(r.device.inFlight).toBe(0);
    expect(r.device.resets).toBeGreaterThan(0);
    // Everything is back to power-on values.
    r.setCommon16(CommonCfg.QUEUE_SELECT, 0);
    expect(r.common16(CommonCfg.QUEUE_ENABLE)).toBe(0);
    expect(r.common16(CommonCfg.QUEUE_SIZE)).toBe(16);
    expect(r.common16(CommonCfg.CONFIG_MSIX_VECTOR)).toBe(VIRTIO_MSI_NO_VECTOR);
    expect(r.device.driverFeatures).toBe(0n);
    // And it comes back up.
    await r.init();
    const q2 = r.queues[0]!;
    q2.add(bufs(r, pattern(8, 2)).chain);
    q2.kick();
    expect((await r.waitUsed(q2)).length).toBe(1);
  });

  it('DEVICE_RESET from the client resets the transport too', async () => {
    const r = rig();
    await r.init();
    await r.device.reset('client');
    expect(r.status).toBe(0);
    expect(r.device.running).toBe(false);
  });
});

describe('PCI_CFG window', () => {
  it('reads and writes BAR4 through config space', async () => {
    const r = rig();
    const at = r.layout.pciCfg;
    const set = (bar: number, offset: number, length: number) => {
      const b = Buffer.alloc(12); // bar, id, padding[2], offset, length
      b[0] = bar;
      b.writeUInt32LE(offset, 4);
      b.writeUInt32LE(length, 8);
      r.configWrite(at + 4, b);
    };
    set(4, VirtioPciLayout.COMMON + CommonCfg.NUM_QUEUES, 2);
    expect(r.configRead(at + 16, 2).readUInt16LE(0)).toBe(2);
    // Write queue_select = 1 through the window.
    set(4, VirtioPciLayout.COMMON + CommonCfg.QUEUE_SELECT, 2);
    r.configWrite(at + 16, Buffer.from([1, 0, 0, 0]));
    expect(r.common16(CommonCfg.QUEUE_SELECT)).toBe(1);
    // A misaligned or foreign window reads 0 and writes nothing.
    set(4, VirtioPciLayout.COMMON + CommonCfg.QUEUE_SELECT + 1, 2);
    expect(r.configRead(at + 16, 4).readUInt32LE(0)).toBe(0);
    set(0, 0, 4);
    expect(r.configRead(at + 16, 4).readUInt32LE(0)).toBe(0);
  });
});

describe('mmap notify mode', () => {
  it('offers the notify page as a sparse-mmap area and polls the rings without notifies', async () => {
    const r = rig({ notify: 'mmap' });
    const region = r.device.regions[PciRegion.BAR4]!;
    expect(region.mmap?.areas).toEqual([{ offset: VirtioPciLayout.NOTIFY, size: 0x1000 }]);
    await r.init();
    const q = r.queues[0]!;
    const { dst, chain } = bufs(r, pattern(64, 3));
    q.add(chain);
    // No kick: the guest's notify store would land in shared memory.
    await r.waitUsed(q);
    expect(r.mem.subarray(dst, dst + 64)).toEqual(pattern(64, 3));
    expect(r.device.counters.notifies).toBe(0);
    expect(r.device.counters.polledWork).toBeGreaterThan(0);
    // Trapped writes to the page still work.
    q.add(bufs(r, pattern(64, 4)).chain);
    q.kick();
    await r.waitUsed(q);
    await r.device.virtioReset('test');
    expect(r.device.poller.phase).toBe('stopped');
  });
});

describe('trap mode with polling (spinUs)', () => {
  it('suppresses notifies while polling, takes unnotified work, then re-arms and sleeps', async () => {
    const r = rig({ spinUs: 300_000 });
    await r.init();
    const q = r.queues[0]!;
    q.add(bufs(r, pattern(8, 1)).chain);
    q.kick();
    await r.waitUsed(q);
    // Polling now: avail_event is out of reach, so a driver would not notify...
    expect((q.availEvent - r.device.queues[0]!.lastAvail) & 0xffff).toBeGreaterThan(0x7000);
    expect(r.device.poller.phase).toBe('spin');
    // ...and work it publishes without a notify is taken anyway.
    const notifies = r.device.counters.notifies;
    q.add(bufs(r, pattern(8, 2)).chain);
    await r.waitUsed(q);
    expect(r.device.counters.notifies).toBe(notifies);
    // After the spin window: notifications re-armed at what was taken, poller asleep.
    await r.waitFor(() => r.device.poller.phase === 'sleep', 'poller asleep', 5000);
    expect(q.availEvent).toBe(r.device.queues[0]!.lastAvail);
    expect(r.device.poller.counts.arms).toBeGreaterThan(0);
  });

  it('without EVENT_IDX, NO_NOTIFY is set while polling and cleared when re-armed', async () => {
    const r = rig({ spinUs: 20_000 });
    await r.init({ features: featureBit(Feature.VERSION_1) });
    const q = r.queues[0]!;
    q.add(bufs(r, pattern(8, 1)).chain);
    q.kick();
    await r.waitUsed(q);
    expect(q.usedFlags & UsedFlags.NO_NOTIFY).toBe(UsedFlags.NO_NOTIFY);
    await r.waitFor(() => r.device.poller.phase === 'sleep', 'poller asleep', 5000);
    expect(q.usedFlags & UsedFlags.NO_NOTIFY).toBe(0);
  });
});

describe('stopped (migration, or detached with its state kept) and running again', () => {
  it('finishes what is in flight, takes nothing new while stopped, then carries on', async () => {
    const r = rig();
    await r.init();
    const q = r.queues[0]!;
    r.device.hold = true;
    q.add(bufs(r, pattern(8, 1)).chain);
    q.kick();
    await tick();
    let stopped = false;
    const suspended = r.device.pause(StopReason.MIGRATION).then(() => (stopped = true));
    await tick();
    expect(stopped).toBe(false); // waits for the request in flight
    r.device.hold = false;
    r.device.release();
    await suspended;
    expect(q.reap().length).toBe(1);
    expect(r.drainIrq(PciIrq.MSIX, 1)).toBe(0); // held while stopped
    q.add(bufs(r, pattern(8, 2)).chain);
    q.kick();
    await tick();
    expect(q.reap()).toEqual([]);
    r.device.resume(StopReason.MIGRATION);
    expect((await r.waitUsed(q)).length).toBe(1);
    await tick();
    expect(r.drainIrq(PciIrq.MSIX, 1)).toBeGreaterThan(0);
  });

  it('detached (keepState): a BAR access by the next client carries on', async () => {
    const r = rig();
    await r.init();
    await r.device.suspend();
    const q = r.queues[0]!;
    q.add(bufs(r, pattern(8, 3)).chain);
    q.kick();
    expect((await r.waitUsed(q)).length).toBe(1);
    expect(r.device.stopped).toBe(false);
  });
});

