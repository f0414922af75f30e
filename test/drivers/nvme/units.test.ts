/**
 * The driver's pure parts: PRP building (walked back the way a controller walks it), the latency
 * histogram, register and status decoding, and Identify parsing of hostile structures.
 */
import { describe, expect, it } from 'vitest';
import {
  LatencyHistogram,
  NvmeError,
  buildPrps,
  decodeCap,
  decodeStatus,
  enableValue,
  latencySummary,
  maxPrpEntries,
  parseIdentifyController,
  parseIdentifyNamespace,
  parseNamespaceList,
  prpListPages,
  statusName,
  type PrpPair,
} from '../../../lib/drivers/nvme';

const PAGE = 4096;

/**
 * Walks PRP1/PRP2 for `length` bytes like a controller (NVMe 1.4, 4.3), reading list entries from
 * `list` (which sits at DMA address `listIova`). Returns the data segments.
 */
function walk(prp: PrpPair, length: number, list: Buffer, listIova: number): [number, number][] {
  const entry = (iova: number) => {
    const at = iova - listIova;
    expect(at >= 0 && at + 8 <= list.length, `PRP list entry at 0x${iova.toString(16)} is outside the list pages`).toBe(true);
    return list.readUInt32LE(at + 4) * 2 ** 32 + list.readUInt32LE(at);
  };
  const segs: [number, number][] = [];
  const first = Math.min(length, PAGE - (prp.prp1 % PAGE));
  segs.push([prp.prp1, first]);
  let rest = length - first;
  if (rest === 0) {
    expect(prp.prp2).toBe(0);
    return segs;
  }
  if (rest <= PAGE) {
    expect(prp.prp2 % PAGE).toBe(0);
    segs.push([prp.prp2, rest]);
    return segs;
  }
  let at = prp.prp2;
  while (rest > 0) {
    const last = (at + 8) % PAGE === 0;
    const value = entry(at);
    if (last && rest > PAGE) {
      at = value;
      continue;
    }
    expect(value % PAGE).toBe(0);
    const n = Math.min(PAGE, rest);
    segs.push([value, n]);
    rest -= n;
    at += 8;
  }
  return segs;
}

describe('PRPs', () => {
  const listIova = 0x40_0000;

  for (const [offset, length] of [
    [0, 512],
    [0, PAGE],
    [8, PAGE - 8],
    [PAGE - 512, 1024],
    [0, 2 * PAGE],
    [512, 2 * PAGE - 512],
    [0, 3 * PAGE],
    [4, 16 * PAGE],
    [0, 512 * PAGE],
    [PAGE - 4, 512 * PAGE],
    [0, 513 * PAGE],
    [12, 2000 * PAGE],
  ] as const) {
    it(`covers ${String(length)} bytes at page offset ${String(offset)} exactly, in order`, () => {
      const iova = 0x1000_0000 + offset;
      const pages = Math.max(1, prpListPages(length, PAGE));
      const list = Buffer.alloc(pages * PAGE, 0xee);
      const out: PrpPair = { prp1: -1, prp2: -1 };
      buildPrps(iova, length, PAGE, list, listIova, out);
      expect(out.prp1).toBe(iova);
      const segs = walk(out, length, list, listIova);
      let next = iova;
      let total = 0;
      for (const [addr, n] of segs) {
        expect(addr).toBe(next);
        next += n;
        total += n;
      }
      expect(total).toBe(length);
      expect(segs.length).toBeLessThanOrEqual(maxPrpEntries(length, PAGE));
    });
  }

  it('sizes list pages for the worst alignment', () => {
    expect(prpListPages(PAGE, PAGE)).toBe(0);
    expect(prpListPages(2 * PAGE, PAGE)).toBe(1); // at offset 4 it touches three pages
    expect(prpListPages(2 * 1024 * 1024, PAGE)).toBe(1);
    expect(prpListPages(4 * 1024 * 1024, PAGE)).toBe(3);
    expect(maxPrpEntries(PAGE, PAGE)).toBe(2);
  });

  it('refuses misaligned buffers and lists that do not fit', () => {
    const out: PrpPair = { prp1: 0, prp2: 0 };
    expect(() => buildPrps(0x1002, 512, PAGE, Buffer.alloc(PAGE), listIova, out)).toThrow(RangeError);
    expect(() => buildPrps(0x1000, 600 * PAGE, PAGE, Buffer.alloc(PAGE), listIova, out)).toThrow(RangeError);
    buildPrps(0x1000, 0, PAGE, Buffer.alloc(0), listIova, out);
    expect(out).toEqual({ prp1: 0, prp2: 0 });
  });
});

describe('LatencyHistogram', () => {
  it('maps values to buckets that contain them, monotonically', () => {
    let previous = -1;
    for (let v = 0; v < 5_000_000; v = Math.floor(v * 1.01) + 1) {
      const b = LatencyHistogram.bucketOf(v);
      expect(b).toBeGreaterThanOrEqual(previous);
      previous = b;
      const start = LatencyHistogram.bucketStart(b);
      expect(start).toBeLessThanOrEqual(v);
      expect(v).toBeLessThan(start + LatencyHistogram.bucketWidth(b));
      // Relative width under 1 %.
      if (v >= 128) expect(LatencyHistogram.bucketWidth(b) / start).toBeLessThanOrEqual(1 / 128);
    }
    expect(LatencyHistogram.bucketOf(2 ** 40)).toBe(LatencyHistogram.BUCKETS - 1);
  });

  it('reports percentiles within a bucket width, exact min/max/mean', () => {
    const h = new LatencyHistogram();
    for (let v = 1; v <= 100_000; v++) h.record(v * 10);
    expect(h.count).toBe(100_000);
    expect(h.min).toBe(10);
    expect(h.max).toBe(1_000_000);
    expect(h.mean).toBeCloseTo(500_005, 0);
    for (const p of [50, 90, 99, 99.9]) {
      const exact = p * 10_000;
      expect(Math.abs(h.percentile(p) - exact) / exact).toBeLessThan(0.01);
    }
    expect(h.percentile(100)).toBe(1_000_000);
    const s = latencySummary(h);
    expect(s.min).toBe(0.01);
    expect(s.max).toBe(1000);
    const other = new LatencyHistogram();
    other.record(5);
    h.merge(other);
    expect(h.min).toBe(5);
    expect(h.count).toBe(100_001);
    h.reset();
    expect(h.count).toBe(0);
    expect(h.percentile(50)).toBe(0);
  });
});

describe('registers and statuses', () => {
  it('decodes CAP', () => {
    const lo = (1023 | (1 << 16) | (20 << 24)) >>> 0;
    const hi = 2 | (1 << 5) | (0 << 16) | (4 << 20);
    const cap = decodeCap(lo, hi);
    expect(cap).toMatchObject({ maxQueueEntries: 1024, contiguousQueuesRequired: true, timeoutMs: 10_000, doorbellStride: 16, minPageSize: 4096, maxPageSize: 65536 });
    expect(cap.commandSets & 1).toBe(1);
  });

  it('builds CC for 4 KiB pages, 64/16-byte entries', () => {
    expect(enableValue(4096)).toBe(0x00460001);
    expect(enableValue(16384)).toBe(0x00460101);
  });

  it('decodes statuses and names them', () => {
    expect(decodeStatus(0x4080)).toEqual({ sct: 0, sc: 0x80, crd: 0, more: false, dnr: true });
    expect(decodeStatus(0x2101)).toMatchObject({ sct: 1, sc: 1, more: true, dnr: false });
    expect(statusName(0, 0x80)).toBe('LBA_RANGE');
    expect(statusName(2, 0x81)).toBe('READ_ERROR');
    expect(statusName(7, 0xab)).toBe('SCT_7_SC_0xab');
    const e = new NvmeError(0x4002, { qid: 3, cid: 9, opcode: 0x01 });
    expect(e).toMatchObject({ code: 'INVALID_FIELD', sct: 0, sc: 2, dnr: true, qid: 3, cid: 9, opcode: 1 });
    expect(e.message).toMatch(/I\/O command 0x01 \(qid 3, cid 9\) failed: INVALID_FIELD/);
  });
});

describe('Identify parsing', () => {
  it('reads controller strings as trimmed ASCII and bounds the NQN', () => {
    const d = Buffer.alloc(4096);
    d.write('SN1234              ', 4, 'latin1');
    d.write('Model\u0001X', 24, 'latin1');
    d.fill(0x41, 768, 1024); // an NQN without a NUL
    d[77] = 5;
    const c = parseIdentifyController(d);
    expect(c.serial).toBe('SN1234');
    expect(c.model).toBe('Model?X');
    expect(c.subnqn.length).toBe(256);
    expect(c.mdts).toBe(5);
    expect(() => parseIdentifyController(Buffer.alloc(100))).toThrow(RangeError);
  });

  it('refuses namespaces it cannot use, and treats NSZE 0 as inactive', () => {
    const d = Buffer.alloc(4096);
    expect(parseIdentifyNamespace(1, d)).toBeNull();
    d.writeBigUInt64LE(100n, 0);
    d[128 + 2] = 9;
    expect(parseIdentifyNamespace(1, d)).toMatchObject({ nsze: 100, blockSize: 512, capacity: 51200 });
    d[26] = 3; // FLBAS selects a format NLBAF does not have
    expect(() => parseIdentifyNamespace(1, d)).toThrow(/NLBAF/);
    d[26] = 0;
    d[128 + 2] = 30;
    expect(() => parseIdentifyNamespace(1, d)).toThrow(/block size/);
  });

  it('stops a namespace list at 0 or at an entry that does not ascend', () => {
    const d = Buffer.alloc(4096);
    d.writeUInt32LE(1, 0);
    d.writeUInt32LE(4, 4);
    d.writeUInt32LE(2, 8);
    expect(parseNamespaceList(d)).toEqual([1, 4]);
    expect(parseNamespaceList(Buffer.alloc(4096))).toEqual([]);
  });
});
