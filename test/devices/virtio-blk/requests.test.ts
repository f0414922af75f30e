// virtio-blk driven through region accesses and a real DmaSpace: configuration and features, then
// every request type in several descriptor layouts, on RAM and file backends, on several queues.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { FileBackend, RamBackend, type BlockBackend } from '../../../lib/block';
import { PciIrq } from '../../../lib/protocol/constants';
import { VirtioBlkDevice } from '../../../lib/devices/virtio-blk';
import { ClassCode } from '../../../lib/pci/ids';
import { BlkConfig, BlkDwzFlags, BlkFeature, BlkReqType, Feature, VIRTIO_PCI_VENDOR_ID, featureBit } from '../../../lib/virtio/spec';
import { BlkRig, IOERR, OK, UNSUPP, pattern, tick, type BlkRigOptions } from './rig';

const rigs: BlkRig[] = [];
const dirs: string[] = [];
function rig(options: BlkRigOptions = {}): BlkRig {
  const r = new BlkRig(options);
  rigs.push(r);
  return r;
}
function tmpFile(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'vblk-'));
  dirs.push(d);
  return path.join(d, 'disk.img');
}
afterEach(async () => {
  for (const r of rigs.splice(0)) await r.close();
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

/** A backend that counts calls and records FUA writes. */
function counting(inner: BlockBackend) {
  const calls = { flush: 0, fua: 0, writes: 0, discard: 0, writeZeroes: 0 };
  const backend: BlockBackend = {
    get size() {
      return inner.size;
    },
    discardZeroes: inner.discardZeroes,
    read: (o, d) => inner.read(o, d),
    readv: (o, d) => inner.readv!(o, d),
    write: (o, s, f) => {
      calls.writes++;
      if (f) calls.fua++;
      return inner.write(o, s, f);
    },
    writev: (o, s, f) => {
      calls.writes++;
      if (f) calls.fua++;
      return inner.writev!(o, s, f);
    },
    flush: () => {
      calls.flush++;
      return inner.flush();
    },
    discard: (o, l) => {
      calls.discard++;
      return inner.discard(o, l);
    },
    writeZeroes: (o, l, f) => {
      calls.writeZeroes++;
      return inner.writeZeroes!(o, l, f);
    },
    close: () => inner.close(),
  };
  return { backend, calls };
}

describe('identity, configuration and features', () => {
  it('is virtio-blk (1af4:1042) with capacity, blk_size, seg_max, size_max, num_queues', () => {
    const r = rig({ diskSize: 8 << 20, blockSize: 4096, queues: 3, queueSize: 128, sizeMax: 1 << 20, serial: 'disk-1' });
    const cfg = r.configRead(0, 12);
    expect(cfg.readUInt16LE(0)).toBe(VIRTIO_PCI_VENDOR_ID);
    expect(cfg.readUInt16LE(2)).toBe(0x1042);
    expect(cfg.readUIntLE(9, 3)).toBe(ClassCode.STORAGE_SCSI);
    const c = r.deviceConfig(0, BlkConfig.SIZE);
    expect(c.readBigUInt64LE(BlkConfig.CAPACITY)).toBe(BigInt((8 << 20) / 512));
    expect(c.readUInt32LE(BlkConfig.BLK_SIZE)).toBe(4096);
    expect(c.readUInt32LE(BlkConfig.SEG_MAX)).toBe(126);
    expect(c.readUInt32LE(BlkConfig.SIZE_MAX)).toBe(1 << 20);
    expect(c.readUInt16LE(BlkConfig.NUM_QUEUES)).toBe(3);
    expect(c[BlkConfig.WRITEBACK]).toBe(1);
    expect(c.readUInt32LE(BlkConfig.MAX_DISCARD_SEG)).toBeGreaterThan(0);
    expect(c.readUInt32LE(BlkConfig.DISCARD_SECTOR_ALIGNMENT)).toBe(8);
    expect(c[BlkConfig.WRITE_ZEROES_MAY_UNMAP]).toBe(1); // RAM discards read back as zeroes
    expect(r.common16(0x12)).toBe(3);
    const f = r.deviceFeatures();
    for (const bit of [BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH, BlkFeature.CONFIG_WCE, BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES]) {
      expect(f & featureBit(bit), `bit ${bit}`).not.toBe(0n);
    }
    expect(f & featureBit(BlkFeature.RO)).toBe(0n);
  });

  it('a read-only disk offers RO and no discard or write zeroes', () => {
    const r = rig({ readOnly: true });
    const f = r.deviceFeatures();
    expect(f & featureBit(BlkFeature.RO)).not.toBe(0n);
    expect(f & featureBit(BlkFeature.DISCARD)).toBe(0n);
    expect(f & featureBit(BlkFeature.WRITE_ZEROES)).toBe(0n);
  });

  it('rounds the capacity down to whole blocks', () => {
    const r = rig({ backend: new RamBackend((1 << 20) + 1000), blockSize: 4096 });
    expect(r.deviceConfig(BlkConfig.CAPACITY, 8).readBigUInt64LE(0)).toBe(BigInt((1 << 20) / 512));
    expect(r.device.capacity).toBe(2048);
  });

  it('refuses bad options', () => {
    const backend = new RamBackend(1 << 20);
    expect(() => new VirtioBlkDevice({ backend, queues: 0 })).toThrow(RangeError);
    expect(() => new VirtioBlkDevice({ backend, queues: 65 })).toThrow(RangeError);
    expect(() => new VirtioBlkDevice({ backend, blockSize: 1000 })).toThrow(RangeError);
    expect(() => new VirtioBlkDevice({ backend, queueSize: 100 })).toThrow(RangeError);
    expect(() => new VirtioBlkDevice({ backend, serial: 'x'.repeat(21) })).toThrow(RangeError);
    expect(() => new VirtioBlkDevice({ backend, segMax: 1000 })).toThrow(RangeError);
    expect(() => new VirtioBlkDevice({ backend: new RamBackend(100), blockSize: 512 })).toThrow(RangeError);
    void backend.close();
  });
});

describe('read and write', () => {
  it('round-trips data in every layout: plain, indirect, split header, many segments, status with data', async () => {
    const r = rig();
    await r.init();
    const layouts = [{}, { indirect: true }, { splitHeader: true }, { segments: 5 }, { segments: 3, indirect: true }, { statusWithData: true }];
    let sector = 0;
    for (const [k, layout] of layouts.entries()) {
      const data = pattern(4096 + 512 * k, k + 1);
      const w = await r.request(k % 2, BlkReqType.OUT, sector, { out: data, ...layout });
      expect(w, JSON.stringify(layout)).toEqual({ status: OK, len: 1, data: Buffer.alloc(0) });
      const rd = await r.request((k + 1) % 2, BlkReqType.IN, sector, { inLen: data.length, ...layout });
      expect(rd.status).toBe(OK);
      expect(rd.len).toBe(data.length + 1);
      expect(rd.data.equals(data), JSON.stringify(layout)).toBe(true);
      sector += data.length / 512;
    }
    expect(r.device.stats).toMatchObject({ reads: 6, writes: 6, errors: 0 });
    await tick();
    expect(r.drainIrq(PciIrq.MSIX, 1) + r.drainIrq(PciIrq.MSIX, 2)).toBeGreaterThan(0);
  });

  it('the data lands in the backend at sector * 512', async () => {
    const backend = new RamBackend(4 << 20);
    const r = rig({ backend });
    await r.init();
    const data = pattern(8192, 3);
    expect((await r.request(0, BlkReqType.OUT, 100, { out: data })).status).toBe(OK);
    expect(backend.view(100 * 512, 8192).equals(data)).toBe(true);
    // The last sector of the disk.
    const last = r.device.capacity - 1;
    expect((await r.request(0, BlkReqType.OUT, last, { out: pattern(512, 4) })).status).toBe(OK);
    expect((await r.request(0, BlkReqType.IN, last, { inLen: 512 })).data.equals(pattern(512, 4))).toBe(true);
  });

  it('many requests in flight across both queues, one notify each', async () => {
    const r = rig({ queueSize: 64 });
    await r.init();
    const placed = [];
    for (let k = 0; k < 40; k++) placed.push({ k, p: r.place(k % 2, BlkReqType.OUT, k * 8, { out: pattern(4096, k), indirect: true }) });
    r.queues[0]!.kick();
    r.queues[1]!.kick();
    await r.waitUsed(r.queues[0]!, 20);
    await r.waitUsed(r.queues[1]!, 20);
    for (const { p } of placed) expect(r.mem[p.statusAt]).toBe(OK);
    for (let k = 0; k < 40; k += 7) expect((await r.request(1, BlkReqType.IN, k * 8, { inLen: 4096 })).data.equals(pattern(4096, k))).toBe(true);
  });

  it('a zero-length read or write succeeds and does nothing', async () => {
    const r = rig();
    await r.init();
    expect(await r.request(0, BlkReqType.IN, 0, {})).toMatchObject({ status: OK, len: 1 });
    expect(await r.request(0, BlkReqType.OUT, 0, {})).toMatchObject({ status: OK, len: 1 });
  });

  it('on a file backend', async () => {
    const file = tmpFile();
    const r = rig({ backend: FileBackend.open(file, { size: 4 << 20 }) });
    await r.init();
    const data = pattern(64 << 10, 9);
    expect((await r.request(0, BlkReqType.OUT, 2048, { out: data, segments: 16 })).status).toBe(OK);
    expect((await r.request(1, BlkReqType.IN, 2048, { inLen: data.length, segments: 4 })).data.equals(data)).toBe(true);
    expect((await r.request(0, BlkReqType.FLUSH, 0)).status).toBe(OK);
    await r.close();
    const fd = fs.openSync(file, 'r');
    const back = Buffer.alloc(data.length);
    fs.readSync(fd, back, 0, back.length, 2048 * 512);
    fs.closeSync(fd);
    expect(back.equals(data)).toBe(true);
  });
});

describe('write caching', () => {
  it('write-back by default: writes are not FUA, FLUSH reaches the backend', async () => {
    const { backend, calls } = counting(new RamBackend(1 << 20));
    const r = rig({ backend });
    await r.init();
    expect(r.device.writeCacheEnabled).toBe(true);
    await r.request(0, BlkReqType.OUT, 0, { out: pattern(512, 1) });
    expect(calls).toMatchObject({ writes: 1, fua: 0 });
    await r.request(0, BlkReqType.FLUSH, 0);
    expect(calls.flush).toBe(1);
    expect(r.device.stats.flushes).toBe(1);
  });

  it('write-through when the driver sets writeback 0 (CONFIG_WCE), or without FLUSH', async () => {
    const { backend, calls } = counting(new RamBackend(1 << 20));
    const r = rig({ backend });
    await r.init();
    r.barWrite(r.layout.device + BlkConfig.WRITEBACK, Buffer.from([0]));
    expect(r.deviceConfig(BlkConfig.WRITEBACK, 1)[0]).toBe(0);
    expect(r.device.writeCacheEnabled).toBe(false);
    await r.request(0, BlkReqType.OUT, 0, { out: pattern(512, 1) });
    expect(calls.fua).toBe(1);
    const all = r.deviceFeatures();
    await r.init({ features: all & ~featureBit(BlkFeature.FLUSH) });
    // CONFIG_WCE without FLUSH: writeback reads 0 and every write is durable.
    expect(r.deviceConfig(BlkConfig.WRITEBACK, 1)[0]).toBe(0);
    await r.request(0, BlkReqType.OUT, 0, { out: pattern(512, 1) });
    expect(calls.fua).toBe(2);
  });

  it('writeback is read-only without CONFIG_WCE', async () => {
    const r = rig();
    await r.init({ features: r.deviceFeatures() & ~featureBit(BlkFeature.CONFIG_WCE) });
    r.barWrite(r.layout.device + BlkConfig.WRITEBACK, Buffer.from([0]));
    expect(r.deviceConfig(BlkConfig.WRITEBACK, 1)[0]).toBe(1);
    expect(r.device.writeCacheEnabled).toBe(true);
  });
});

describe('GET_ID', () => {
  it('writes the serial, NUL-padded to 20 bytes', async () => {
    const r = rig({ serial: 'vfio-user-disk' });
    await r.init();
    const d = await r.request(0, BlkReqType.GET_ID, 0, { inLen: 20 });
    expect(d.status).toBe(OK);
    expect(d.len).toBe(21);
    expect(d.data.toString('latin1')).toBe('vfio-user-disk\0\0\0\0\0\0');
    // A shorter buffer gets what fits.
    const s = await r.request(0, BlkReqType.GET_ID, 0, { inLen: 4 });
    expect(s).toMatchObject({ status: OK, len: 5 });
    expect(s.data.toString('latin1')).toBe('vfio');
  });
});

describe('DISCARD and WRITE_ZEROES', () => {
  it('discard frees RAM ranges (they read back as zeroes)', async () => {
    const r = rig();
    await r.init();
    await r.request(0, BlkReqType.OUT, 0, { out: pattern(16 << 10, 1) });
    const d = await r.request(0, BlkReqType.DISCARD, 0, { out: BlkRig.ranges([{ sector: 8, sectors: 8 }, { sector: 24, sectors: 4 }]) });
    expect(d.status).toBe(OK);
    const back = (await r.request(0, BlkReqType.IN, 0, { inLen: 16 << 10 })).data;
    const expected = pattern(16 << 10, 1);
    expected.fill(0, 8 * 512, 16 * 512);
    expected.fill(0, 24 * 512, 28 * 512);
    expect(back.equals(expected)).toBe(true);
    expect(r.device.stats.discards).toBe(1);
  });

  it('write zeroes zeroes a file range, with or without UNMAP', async () => {
    const r = rig({ backend: FileBackend.open(tmpFile(), { size: 1 << 20 }) });
    await r.init();
    await r.request(0, BlkReqType.OUT, 0, { out: pattern(8192, 2) });
    expect((await r.request(0, BlkReqType.WRITE_ZEROES, 0, { out: BlkRig.ranges([{ sector: 2, sectors: 4 }]) })).status).toBe(OK);
    expect((await r.request(0, BlkReqType.WRITE_ZEROES, 0, { out: BlkRig.ranges([{ sector: 10, sectors: 2, flags: BlkDwzFlags.UNMAP }]) })).status).toBe(OK);
    const back = (await r.request(0, BlkReqType.IN, 0, { inLen: 8192 })).data;
    const expected = pattern(8192, 2);
    expected.fill(0, 2 * 512, 6 * 512);
    expected.fill(0, 10 * 512, 12 * 512);
    expect(back.equals(expected)).toBe(true);
    expect(r.device.stats.writeZeroes).toBe(2);
  });

  it('WRITE_ZEROES with UNMAP on RAM discards; without it, writes zeroes', async () => {
    const { backend, calls } = counting(new RamBackend(1 << 20));
    const r = rig({ backend });
    await r.init();
    await r.request(0, BlkReqType.WRITE_ZEROES, 0, { out: BlkRig.ranges([{ sector: 0, sectors: 8, flags: BlkDwzFlags.UNMAP }]) });
    await r.request(0, BlkReqType.WRITE_ZEROES, 0, { out: BlkRig.ranges([{ sector: 0, sectors: 8 }]) });
    expect(calls).toMatchObject({ discard: 1, writeZeroes: 1 });
  });

  it('UNSUPP when not negotiated', async () => {
    const r = rig();
    await r.init({ features: r.deviceFeatures() & ~(featureBit(BlkFeature.DISCARD) | featureBit(BlkFeature.WRITE_ZEROES)) });
    expect((await r.request(0, BlkReqType.DISCARD, 0, { out: BlkRig.ranges([{ sector: 0, sectors: 1 }]) })).status).toBe(UNSUPP);
    expect((await r.request(0, BlkReqType.WRITE_ZEROES, 0, { out: BlkRig.ranges([{ sector: 0, sectors: 1 }]) })).status).toBe(UNSUPP);
  });
});

describe('read-only', () => {
  it('reads work; writes fail with IOERR and change nothing', async () => {
    const backend = new RamBackend(1 << 20);
    backend.view(0, 512).set(pattern(512, 5));
    const r = rig({ backend, readOnly: true });
    await r.init();
    expect((await r.request(0, BlkReqType.OUT, 0, { out: pattern(512, 6) })).status).toBe(IOERR);
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 512 })).data.equals(pattern(512, 5))).toBe(true);
    expect((await r.request(0, BlkReqType.FLUSH, 0)).status).toBe(OK);
  });
});

describe('features the driver declines', () => {
  it('works with VERSION_1 alone (no indirect, no EVENT_IDX, no MQ): one queue', async () => {
    const r = rig({ queues: 1 });
    await r.init({ features: featureBit(Feature.VERSION_1) });
    const data = pattern(4096, 8);
    expect((await r.request(0, BlkReqType.OUT, 0, { out: data })).status).toBe(OK);
    expect((await r.request(0, BlkReqType.IN, 0, { inLen: 4096 })).data.equals(data)).toBe(true);
  });
});

describe('mmap notify mode', () => {
  it('serves requests the guest never notified', async () => {
    const r = rig({ notify: 'mmap' });
    await r.init();
    const p = r.place(0, BlkReqType.OUT, 0, { out: pattern(4096, 1) });
    await r.waitUsed(r.queues[0]!);
    expect(r.mem[p.statusAt]).toBe(OK);
    expect(r.device.counters.notifies).toBe(0);
  });
});
