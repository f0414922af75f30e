// Admin commands through the admin queue: negative cases first, every guest error a status.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AdminOpcode, AerType, FeatureId, LogId, Status } from '../../../lib/nvme/constants';
import { IdCtrl, IdNs, Nidt, SmartLog } from '../../../lib/nvme/structs';
import { Reg, sqTailDoorbell, cqHeadDoorbell } from '../../../lib/nvme/registers';
import { Rig, tick } from './rig';
import { useFdLeakCheck } from '../../helpers/fds';

const DNR = 0x4000;

useFdLeakCheck();
let rig: Rig;

beforeEach(async () => {
  rig = new Rig({ queues: 4, serial: 'SN-ADMIN-1', model: 'Test Model', firmware: 'FW1', maxQueueEntries: 256, diskSize: 4 << 20 });
  await rig.enable();
});
afterEach(async () => {
  await rig.close();
});

const identify = async (cns: number, nsid = 0, extra: { cdw11?: number; prp1?: number } = {}) => {
  const buf = extra.prp1 ?? rig.alloc(8192);
  const c = await rig.admin({ opcode: AdminOpcode.IDENTIFY, nsid, prp1: buf, prp2: buf + 4096, cdw10: cns, cdw11: extra.cdw11 ?? 0 });
  return { c, data: rig.mem.subarray(buf, buf + 4096) };
};

describe('generic errors', () => {
  it('an unknown or unsupported admin opcode is Invalid Opcode with DNR', async () => {
    for (const opcode of [0x03, 0x07, 0x0b, AdminOpcode.FORMAT_NVM, AdminOpcode.NS_MGMT, AdminOpcode.KEEP_ALIVE, 0xc0, 0xff]) {
      const c = await rig.admin({ opcode });
      expect(c.status, `opcode 0x${opcode.toString(16)}`).toBe(Status.INVALID_OPCODE);
      expect(c.status & DNR).toBe(DNR);
    }
  });

  it('fused commands and SGL data pointers are Invalid Field', async () => {
    expect((await rig.admin({ opcode: AdminOpcode.IDENTIFY, flags: 0x01, cdw10: 1 })).status).toBe(Status.INVALID_FIELD);
    expect((await rig.admin({ opcode: AdminOpcode.IDENTIFY, flags: 0x40, cdw10: 1 })).status).toBe(Status.INVALID_FIELD);
  });

  it('a data buffer outside the DMA maps is Data Transfer Error; a misaligned PRP is PRP Offset Invalid', async () => {
    const outside = await rig.admin({ opcode: AdminOpcode.IDENTIFY, prp1: 0x4000_0000_0000, cdw10: 1 });
    expect(outside.status).toBe(Status.DATA_XFER_ERROR);
    const notDword = await rig.admin({ opcode: AdminOpcode.IDENTIFY, prp1: rig.alloc(4096) + 2, cdw10: 1 });
    expect(notDword.status).toBe(Status.PRP_INVALID_OFFSET);
    const buf = rig.alloc(8192);
    const badPrp2 = await rig.admin({ opcode: AdminOpcode.IDENTIFY, prp1: buf + 512, prp2: buf + 4096 + 8, cdw10: 1 });
    expect(badPrp2.status).toBe(Status.PRP_INVALID_OFFSET);
    const hugePrp = await rig.admin({ opcode: AdminOpcode.IDENTIFY, prp1: 0xffff_ffff_ffff_f000n, cdw10: 1 });
    expect(hugePrp.status).toBe(Status.DATA_XFER_ERROR);
  });

  it('errors land in the Error Information log, newest first, with a growing error count', async () => {
    await rig.admin({ opcode: 0x7f, cid: 0x77 });
    await rig.admin({ opcode: AdminOpcode.IDENTIFY, cdw10: 0x99, cid: 0x78, prp1: rig.alloc(4096) });
    const buf = rig.alloc(4096);
    const c = await rig.admin({ opcode: AdminOpcode.GET_LOG_PAGE, prp1: buf, cdw10: LogId.ERROR | (((128 / 4) - 1) << 16) });
    expect(c.status).toBe(0);
    const e0 = rig.mem.subarray(buf, buf + 64);
    const e1 = rig.mem.subarray(buf + 64, buf + 128);
    expect(e0.readBigUInt64LE(0)).toBe(2n);
    expect(e0.readUInt16LE(10)).toBe(0x78);
    expect(e0.readUInt16LE(12) >>> 1).toBe(Status.INVALID_FIELD);
    expect(e1.readBigUInt64LE(0)).toBe(1n);
    expect(e1.readUInt16LE(10)).toBe(0x77);
    expect(e1.readUInt16LE(12) >>> 1).toBe(Status.INVALID_OPCODE);
  });
});

describe('Identify', () => {
  it('unknown CNS values are Invalid Field; namespace CNS with a bad NSID is Invalid Namespace', async () => {
    for (const cns of [0x04, 0x09, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x1c, 0xff]) {
      expect((await identify(cns, 1)).c.status, `CNS ${cns}`).toBe(Status.INVALID_FIELD);
    }
    for (const nsid of [0, 2, 0xfffffffe, 0xffffffff]) {
      expect((await identify(0x00, nsid)).c.status).toBe(Status.INVALID_NS);
      expect((await identify(0x03, nsid)).c.status).toBe(Status.INVALID_NS);
    }
    expect((await identify(0x02, 0xffffffff)).c.status).toBe(Status.INVALID_NS);
    expect((await identify(0x06, 0, { cdw11: 2 << 24 })).c.status).toBe(Status.INVALID_FIELD); // CSI ZNS
    expect((await identify(0x05, 1, { cdw11: 1 << 24 })).c.status).toBe(Status.INVALID_FIELD);
  });

  it('controller: IDs, strings, MDTS, queue entry sizes, one namespace, ONCS, OACS (DBBUF), VWC, SUBNQN', async () => {
    const { c, data } = await identify(0x01);
    expect(c.status).toBe(0);
    expect(data.readUInt16LE(IdCtrl.VID)).toBe(0x4e58);
    expect(data.subarray(IdCtrl.SN, IdCtrl.SN + 20).toString()).toBe('SN-ADMIN-1'.padEnd(20));
    expect(data.subarray(IdCtrl.MN, IdCtrl.MN + 40).toString()).toBe('Test Model'.padEnd(40));
    expect(data.subarray(IdCtrl.FR, IdCtrl.FR + 8).toString()).toBe('FW1'.padEnd(8));
    expect(data[IdCtrl.MDTS]).toBe(7);
    expect(data.readUInt32LE(IdCtrl.VER)).toBe(0x00010400);
    expect(data[IdCtrl.SQES]).toBe(0x66);
    expect(data[IdCtrl.CQES]).toBe(0x44);
    expect(data.readUInt32LE(IdCtrl.NN)).toBe(1);
    expect(data.readUInt16LE(IdCtrl.ONCS)).toBe(0x0d); // Compare, DSM, Write Zeroes
    expect(data.readUInt16LE(IdCtrl.OACS)).toBe(0x100); // Doorbell Buffer Config
    expect(data[IdCtrl.VWC]).toBe(0x07);
    expect(data[IdCtrl.AERL]).toBe(3);
    expect(data[IdCtrl.CNTRLTYPE]).toBe(1);
    const nqn = data.subarray(IdCtrl.SUBNQN, IdCtrl.SUBNQN + 256).toString().replace(/\0+$/, '');
    expect(nqn).toMatch(/^nqn\.2014-08\.org\.nvmexpress:uuid:[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  });

  it('namespace: size, one LBA format, DLFEAT, IDs; descriptors list EUI-64, NGUID, UUID and CSI', async () => {
    const { c, data } = await identify(0x00, 1);
    expect(c.status).toBe(0);
    expect(data.readBigUInt64LE(IdNs.NSZE)).toBe(BigInt((4 << 20) / 512));
    expect(data.readBigUInt64LE(IdNs.NCAP)).toBe(BigInt((4 << 20) / 512));
    expect(data[IdNs.NLBAF]).toBe(0);
    expect(data[IdNs.FLBAS]).toBe(0);
    expect(data[IdNs.LBAF0 + 2]).toBe(9);
    expect(data[IdNs.DLFEAT]! & 0x7).toBe(1); // RAM: deallocated blocks read as zeroes
    const nguid = Buffer.from(data.subarray(IdNs.NGUID, IdNs.NGUID + 16));
    const eui = Buffer.from(data.subarray(IdNs.EUI64, IdNs.EUI64 + 8));
    expect(nguid.equals(Buffer.alloc(16))).toBe(false);
    const descs = (await identify(0x03, 1)).data;
    const seen = new Map<number, Buffer>();
    for (let at = 0; descs[at] !== 0; at += 4 + descs[at + 1]!) seen.set(descs[at]!, Buffer.from(descs.subarray(at + 4, at + 4 + descs[at + 1]!)));
    expect(seen.get(Nidt.EUI64)).toEqual(eui);
    expect(seen.get(Nidt.NGUID)).toEqual(nguid);
    expect(seen.get(Nidt.UUID)!.length).toBe(16);
    expect(seen.get(Nidt.CSI)).toEqual(Buffer.of(0));
  });

  it('active namespace lists (CNS 02h and 07h/NVM) list NSID 1 only for a starting NSID below it', async () => {
    const a = await identify(0x02, 0);
    expect(a.data.readUInt32LE(0)).toBe(1);
    expect(a.data.readUInt32LE(4)).toBe(0);
    expect((await identify(0x02, 1)).data.readUInt32LE(0)).toBe(0);
    expect((await identify(0x07, 0, { cdw11: 0 })).data.readUInt32LE(0)).toBe(1);
  });

  it('NVM command set specific controller (CNS 06h) and command set independent namespace (CNS 08h)', async () => {
    expect((await identify(0x06, 0)).c.status).toBe(0);
    expect((await identify(0x05, 1)).c.status).toBe(0);
    const indep = await identify(0x08, 1);
    expect(indep.c.status).toBe(0);
    expect(indep.data[14]).toBe(1); // NSTAT: ready
  });

  it('fills a data buffer that starts mid-page (PRP1 offset + PRP2)', async () => {
    const buf = rig.alloc(8192);
    const c = await rig.admin({ opcode: AdminOpcode.IDENTIFY, prp1: buf + 2048, prp2: buf + 4096, cdw10: 1 });
    expect(c.status).toBe(0);
    expect(rig.mem.readUInt16LE(buf + 2048)).toBe(0x4e58);
  });
});

describe('Create/Delete I/O queues', () => {
  const createCq = (qid: number, entries: number, cdw11: number, prp1?: number) =>
    rig.admin({ opcode: AdminOpcode.CREATE_CQ, prp1: prp1 ?? rig.alloc(entries * 16), cdw10: ((entries - 1) << 16) | qid, cdw11 });
  const createSq = (qid: number, entries: number, cqid: number, cdw11 = 1, prp1?: number) =>
    rig.admin({ opcode: AdminOpcode.CREATE_SQ, prp1: prp1 ?? rig.alloc(entries * 64), cdw10: ((entries - 1) << 16) | qid, cdw11: (cqid << 16) | cdw11 });

  it('Create CQ: bad QID, size, contiguity, alignment, vector, unreachable memory', async () => {
    expect((await createCq(0, 16, 1)).status).toBe(Status.QID_INVALID);
    expect((await createCq(5, 16, 1)).status).toBe(Status.QID_INVALID); // queues: 4
    expect((await createCq(1, 1, 1)).status).toBe(Status.QUEUE_SIZE); // QSIZE 0
    expect((await createCq(1, 257, 1)).status).toBe(Status.QUEUE_SIZE); // > MQES + 1
    expect((await createCq(1, 16, 0)).status).toBe(Status.INVALID_FIELD); // PC = 0 with CAP.CQR
    expect((await createCq(1, 16, 1, rig.alloc(4096) + 256)).status).toBe(Status.PRP_INVALID_OFFSET);
    expect((await createCq(1, 16, 1 | 2 | (1 << 16))).status).toBe(Status.INVALID_VECTOR); // MSI-X off: vector 0 only
    rig.enableMsix();
    expect((await createCq(1, 16, 1 | 2 | (5 << 16))).status).toBe(Status.INVALID_VECTOR); // 5 vectors: 0..4
    expect((await createCq(1, 16, 1, 0x3000_0000_0000)).status).toBe(Status.INVALID_FIELD); // outside the maps
    expect((await createCq(1, 16, 1 | 2 | (4 << 16))).status).toBe(0);
    expect((await createCq(1, 16, 1)).status).toBe(Status.QID_INVALID); // exists
  });

  it('Create SQ: bad QID, missing CQ, size, contiguity, alignment', async () => {
    expect((await createCq(1, 16, 1)).status).toBe(0);
    expect((await createSq(0, 16, 1)).status).toBe(Status.QID_INVALID);
    expect((await createSq(5, 16, 1)).status).toBe(Status.QID_INVALID);
    expect((await createSq(1, 16, 0)).status).toBe(Status.CQ_INVALID); // the admin CQ
    expect((await createSq(1, 16, 2)).status).toBe(Status.CQ_INVALID); // does not exist
    expect((await createSq(1, 16, 0xffff)).status).toBe(Status.CQ_INVALID);
    expect((await createSq(1, 1, 1)).status).toBe(Status.QUEUE_SIZE);
    expect((await createSq(1, 16, 1, 0)).status).toBe(Status.INVALID_FIELD);
    expect((await createSq(1, 16, 1, 1, rig.alloc(4096) + 64)).status).toBe(Status.PRP_INVALID_OFFSET);
    expect((await createSq(1, 16, 1)).status).toBe(0);
    expect((await createSq(1, 16, 1)).status).toBe(Status.QID_INVALID);
    expect((await createSq(2, 16, 1)).status).toBe(0); // two SQs may share a CQ
  });

  it('Delete: bad QIDs, a CQ with SQs is Invalid Queue Deletion, then in the right order it works', async () => {
    expect((await createCq(1, 16, 1)).status).toBe(0);
    expect((await createSq(1, 16, 1)).status).toBe(0);
    expect((await rig.admin({ opcode: AdminOpcode.DELETE_SQ, cdw10: 0 })).status).toBe(Status.QID_INVALID);
    expect((await rig.admin({ opcode: AdminOpcode.DELETE_SQ, cdw10: 3 })).status).toBe(Status.QID_INVALID);
    expect((await rig.admin({ opcode: AdminOpcode.DELETE_CQ, cdw10: 0 })).status).toBe(Status.QID_INVALID);
    expect((await rig.admin({ opcode: AdminOpcode.DELETE_CQ, cdw10: 2 })).status).toBe(Status.QID_INVALID);
    expect((await rig.admin({ opcode: AdminOpcode.DELETE_CQ, cdw10: 1 })).status).toBe(Status.INVALID_QUEUE_DELETION);
    expect((await rig.admin({ opcode: AdminOpcode.DELETE_SQ, cdw10: 1 })).status).toBe(0);
    expect((await rig.admin({ opcode: AdminOpcode.DELETE_CQ, cdw10: 1 })).status).toBe(0);
    expect(rig.ctrl.sq(1)).toBeNull();
    expect(rig.ctrl.cq(1)).toBeNull();
    // Its doorbell is now an invalid register: an AER reports it.
    const aer = rig.submit(0, { opcode: AdminOpcode.ASYNC_EVENT });
    rig.write32(sqTailDoorbell(1), 1);
    const c = await rig.wait(0, aer);
    expect(c.dw0 & 0x7).toBe(AerType.ERROR);
    expect((c.dw0 >>> 8) & 0xff).toBe(0x00); // write to invalid doorbell register
    expect((c.dw0 >>> 16) & 0xff).toBe(LogId.ERROR);
  });

  it('Delete SQ waits for the commands in flight on that queue, which complete first', async () => {
    const q = await rig.createQueuePair(1, 16);
    const buf = rig.alloc(4096);
    const cids = [0, 1, 2].map(() => rig.place(1, { opcode: 0x02, nsid: 1, prp1: buf, cdw12: 7 }));
    rig.ring(1);
    const del = await rig.admin({ opcode: AdminOpcode.DELETE_SQ, cdw10: 1 });
    expect(del.status).toBe(0);
    const io = rig.reap(1);
    expect(io.map((c) => c.cid).sort()).toEqual(cids);
    expect(q.id).toBe(1);
  });
});

describe('Get/Set Features', () => {
  const get = (fid: number, cdw11 = 0, sel = 0) => rig.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: fid | (sel << 8), cdw11 });
  const set = (fid: number, cdw11: number, save = false) => rig.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: fid | (save ? 1 << 31 : 0), cdw11 });

  it('unknown or unsupported features, bad selects and saving are errors', async () => {
    for (const fid of [0x00, FeatureId.LBA_RANGE, FeatureId.AUTO_PST, FeatureId.HOST_MEM_BUF, FeatureId.TIMESTAMP, FeatureId.KATO, 0x7f, 0xff]) {
      expect((await get(fid)).status, `get ${fid}`).toBe(Status.INVALID_FIELD);
      expect((await set(fid, 0)).status, `set ${fid}`).toBe(Status.INVALID_FIELD);
    }
    expect((await get(FeatureId.ARBITRATION, 0, 4)).status).toBe(Status.INVALID_FIELD);
    expect((await set(FeatureId.ARBITRATION, 0, true)).status).toBe(Status.FEATURE_NOT_SAVEABLE);
    expect((await set(FeatureId.POWER_MGMT, 1)).status).toBe(Status.INVALID_FIELD); // only PS0
    expect((await set(FeatureId.NUM_QUEUES, 0xffff)).status).toBe(Status.INVALID_FIELD);
    expect((await set(FeatureId.TEMP_THRESH, 9 << 16)).status).toBe(Status.INVALID_FIELD);
    expect((await set(FeatureId.TEMP_THRESH, 2 << 20)).status).toBe(Status.INVALID_FIELD);
    expect((await get(FeatureId.IRQ_CONFIG, 5)).status).toBe(Status.INVALID_FIELD);
    expect((await set(FeatureId.IRQ_CONFIG, 5)).status).toBe(Status.INVALID_FIELD);
    expect((await set(FeatureId.ERR_RECOVERY, 1 << 16)).status).toBe(Status.INVALID_FIELD); // DULBE
  });

  it('Number of Queues: allocates the configured count; refused once I/O queues exist', async () => {
    const c = await set(FeatureId.NUM_QUEUES, (63 << 16) | 63);
    expect(c.status).toBe(0);
    expect(c.dw0).toBe((3 << 16) | 3);
    expect((await get(FeatureId.NUM_QUEUES)).dw0).toBe((3 << 16) | 3);
    await rig.createQueuePair(1, 4);
    expect((await set(FeatureId.NUM_QUEUES, 0)).status).toBe(Status.CMD_SEQ_ERROR);
  });

  it('stores and returns arbitration, coalescing, vector config, VWC, atomicity, AEC, error recovery', async () => {
    const cases: [number, number, number?][] = [
      [FeatureId.ARBITRATION, 0x01020307],
      [FeatureId.IRQ_COALESCE, 0x0a05],
      [FeatureId.VOLATILE_WC, 0],
      [FeatureId.WRITE_ATOMIC, 1],
      [FeatureId.ASYNC_EVENT, 0x1f],
      [FeatureId.ERR_RECOVERY, 0x0100],
      [FeatureId.POWER_MGMT, 0],
    ];
    for (const [fid, value] of cases) {
      expect((await set(fid, value)).status).toBe(0);
      expect((await get(fid)).dw0, `fid ${fid}`).toBe(value);
    }
    expect((await set(FeatureId.IRQ_CONFIG, 2 | (1 << 16))).status).toBe(0);
    expect((await get(FeatureId.IRQ_CONFIG, 2)).dw0).toBe(2 | (1 << 16));
    expect((await get(FeatureId.IRQ_CONFIG, 3)).dw0).toBe(3);
    // Defaults and capabilities.
    expect((await get(FeatureId.ARBITRATION, 0, 1)).dw0).toBe(3);
    expect((await get(FeatureId.VOLATILE_WC, 0, 2)).dw0).toBe(1);
    expect((await get(FeatureId.VOLATILE_WC, 0, 3)).dw0).toBe(0x4);
    expect((await get(FeatureId.ERR_RECOVERY, 0, 3)).dw0).toBe(0x6);
  });

  it('temperature thresholds per sensor; crossing the over-threshold raises a SMART AER when enabled', async () => {
    expect((await get(FeatureId.TEMP_THRESH)).dw0 & 0xffff).toBe(343);
    expect((await set(FeatureId.TEMP_THRESH, 300 | (1 << 20) | (2 << 16))).status).toBe(0); // under, sensor 2
    expect((await get(FeatureId.TEMP_THRESH, (1 << 20) | (2 << 16))).dw0).toBe(300 | (1 << 20) | (2 << 16));
    expect((await set(FeatureId.ASYNC_EVENT, 0x02)).status).toBe(0);
    const aer = rig.submit(0, { opcode: AdminOpcode.ASYNC_EVENT });
    expect((await set(FeatureId.TEMP_THRESH, 300)).status).toBe(0); // composite 313 K > 300 K
    const c = await rig.wait(0, aer);
    expect(c.dw0).toBe(AerType.SMART | (0x01 << 8) | (LogId.SMART << 16));
    const buf = rig.alloc(4096);
    await rig.admin({ opcode: AdminOpcode.GET_LOG_PAGE, prp1: buf, nsid: 0xffffffff, cdw10: LogId.SMART | (127 << 16) });
    expect(rig.mem[buf + SmartLog.CRITICAL_WARNING]! & 0x2).toBe(0x2);
  });
});

describe('Get Log Page', () => {
  const log = (lid: number, bytes: number, options: { nsid?: number; offset?: number; rae?: boolean; buf?: number } = {}) => {
    const buf = options.buf ?? rig.alloc(Math.max(bytes, 4096));
    const numd = bytes / 4 - 1;
    return rig
      .admin({
        opcode: AdminOpcode.GET_LOG_PAGE,
        nsid: options.nsid ?? 0xffffffff,
        prp1: buf,
        ...(bytes > 4096 ? { prp2: buf + 4096 } : {}),
        cdw10: lid | (options.rae ? 0x8000 : 0) | ((numd & 0xffff) << 16),
        cdw11: numd >>> 16,
        cdw12: options.offset ?? 0,
      })
      .then((c) => ({ c, data: rig.mem.subarray(buf, buf + bytes) }));
  };

  it('unknown log pages, misaligned or too large offsets, per-namespace SMART are errors', async () => {
    for (const lid of [0x00, LogId.CHANGED_NS, LogId.CMD_EFFECTS, 0x06, 0x80, 0xff]) {
      expect((await log(lid, 512)).c.status, `lid ${lid}`).toBe(Status.INVALID_LOG_PAGE);
    }
    expect((await log(LogId.SMART, 512, { offset: 2 })).c.status).toBe(Status.INVALID_FIELD);
    expect((await log(LogId.SMART, 512, { offset: 512 })).c.status).toBe(Status.INVALID_FIELD);
    expect((await log(LogId.SMART, 512, { nsid: 1 })).c.status).toBe(Status.INVALID_FIELD);
    expect((await log(LogId.SMART, 1024 * 1024)).c.status).toBe(Status.INVALID_FIELD); // > MDTS (512 KiB)
  });

  it('SMART counts data units and commands; power-on hours and error entries are there', async () => {
    await rig.createQueuePair(1, 16);
    const buf = rig.alloc(64 * 1024);
    for (let i = 0; i < 3; i++) expect((await rig.io(1, { opcode: 0x01, ...rig.prps(buf, 65536), cdw10: i * 128, cdw12: 127 })).status).toBe(0);
    for (let i = 0; i < 2; i++) expect((await rig.io(1, { opcode: 0x02, ...rig.prps(buf, 4096), cdw12: 7 })).status).toBe(0);
    await rig.io(1, { opcode: 0x02, prp1: buf, cdw10: 0xffffff, cdw12: 0 }); // LBA out of range: an error entry
    const { c, data } = await log(LogId.SMART, 512);
    expect(c.status).toBe(0);
    expect(data.readUInt16LE(SmartLog.TEMPERATURE)).toBe(313);
    expect(data[SmartLog.AVAIL_SPARE]).toBe(100);
    expect(data.readBigUInt64LE(SmartLog.DATA_UNITS_WRITTEN)).toBe(1n); // 384 units of 512 B: 1 thousand, rounded up
    expect(data.readBigUInt64LE(SmartLog.DATA_UNITS_READ)).toBe(1n);
    expect(data.readBigUInt64LE(SmartLog.HOST_WRITES)).toBe(3n);
    expect(data.readBigUInt64LE(SmartLog.HOST_READS)).toBe(2n);
    expect(data.readBigUInt64LE(SmartLog.POWER_CYCLES)).toBe(1n);
    expect(data.readBigUInt64LE(SmartLog.POWER_ON_HOURS)).toBe(0n);
    expect(data.readBigUInt64LE(SmartLog.NUM_ERR_LOG_ENTRIES)).toBe(1n);
    // A partial read at an offset: host writes onwards, 16 bytes.
    const part = await log(LogId.SMART, 16, { offset: SmartLog.HOST_WRITES });
    expect(part.data.readBigUInt64LE(0)).toBe(3n);
  });

  it('firmware slot log: slot 1 active with the firmware revision', async () => {
    const { c, data } = await log(LogId.FW_SLOT, 512);
    expect(c.status).toBe(0);
    expect(data[0]).toBe(1);
    expect(data.subarray(8, 16).toString()).toBe('FW1'.padEnd(8));
  });
});

describe('Asynchronous Event Request and Abort', () => {
  it('more outstanding AERs than AERL + 1 is Asynchronous Event Request Limit Exceeded', async () => {
    for (let i = 0; i < 4; i++) rig.submit(0, { opcode: AdminOpcode.ASYNC_EVENT });
    const c = await rig.admin({ opcode: AdminOpcode.ASYNC_EVENT });
    expect(c.status).toBe(Status.ASYNC_LIMIT);
  });

  it('an invalid doorbell value is reported once; the next needs the error log read (RAE clear)', async () => {
    const first = rig.submit(0, { opcode: AdminOpcode.ASYNC_EVENT });
    rig.write32(cqHeadDoorbell(0), 9999);
    const c1 = await rig.wait(0, first);
    expect(c1.dw0).toBe(AerType.ERROR | (0x01 << 8) | (LogId.ERROR << 16));
    const second = rig.submit(0, { opcode: AdminOpcode.ASYNC_EVENT });
    rig.write32(sqTailDoorbell(0), 9999);
    await tick();
    expect(rig.queue(0).done.has(second)).toBe(false);
    rig.reap(0);
    expect(rig.queue(0).done.has(second)).toBe(false);
    const buf = rig.alloc(4096);
    await rig.admin({ opcode: AdminOpcode.GET_LOG_PAGE, prp1: buf, cdw10: LogId.ERROR | (15 << 16) });
    const c2 = await rig.wait(0, second);
    expect(c2.dw0 & 0xff07).toBe(AerType.ERROR | (0x01 << 8));
  });

  it('Abort of an outstanding AER completes it with Abort Requested; anything else is "not aborted"', async () => {
    const aer = rig.submit(0, { opcode: AdminOpcode.ASYNC_EVENT, cid: 0x4242 });
    await tick();
    const abort = await rig.admin({ opcode: AdminOpcode.ABORT, cdw10: (0x4242 << 16) | 0 });
    expect(abort.status).toBe(0);
    expect(abort.dw0 & 1).toBe(0);
    expect((await rig.wait(0, aer)).status).toBe(Status.ABORT_REQ);
    const none = await rig.admin({ opcode: AdminOpcode.ABORT, cdw10: (0x1234 << 16) | 1 });
    expect(none.status).toBe(0);
    expect(none.dw0 & 1).toBe(1);
  });

  it('a controller reset drops outstanding AERs without posting them', async () => {
    rig.submit(0, { opcode: AdminOpcode.ASYNC_EVENT });
    await tick();
    const cq = rig.queue(0).cqIova;
    await rig.disable();
    expect(rig.mem.readUInt32LE(cq + 12)).toBe(0);
    expect(rig.read32(Reg.CSTS)).toBe(0);
  });
});

describe('Doorbell Buffer Config', () => {
  it('misaligned, identical or unreachable buffers are Invalid Field', async () => {
    const a = rig.alloc(4096);
    const b = rig.alloc(4096);
    expect((await rig.admin({ opcode: AdminOpcode.DBBUF, prp1: a + 8, prp2: b })).status).toBe(Status.INVALID_FIELD);
    expect((await rig.admin({ opcode: AdminOpcode.DBBUF, prp1: a, prp2: b + 512 })).status).toBe(Status.INVALID_FIELD);
    expect((await rig.admin({ opcode: AdminOpcode.DBBUF, prp1: a, prp2: a })).status).toBe(Status.INVALID_FIELD);
    expect((await rig.admin({ opcode: AdminOpcode.DBBUF, prp1: 0x5000_0000_0000, prp2: b })).status).toBe(Status.INVALID_FIELD);
    expect((await rig.admin({ opcode: AdminOpcode.DBBUF, prp1: a, prp2: b })).status).toBe(0);
  });
});
