// BAR0 registers and the controller state machine, driven through region accesses only.
import { afterEach, describe, expect, it } from 'vitest';
import { NvmeController } from '../../../lib/devices/nvme/controller';
import { RamBackend } from '../../../lib/block';
import { AdminOpcode, Status } from '../../../lib/nvme/constants';
import { Cc, Csts, Reg, cqHeadDoorbell, sqTailDoorbell } from '../../../lib/nvme/registers';
import { PciRegion } from '../../../lib/protocol/constants';
import { ClassCode } from '../../../lib/pci/ids';
import { Rig, gate, tick, wrapBackend } from './rig';
import { useFdLeakCheck } from '../../helpers/fds';

const CC_EN = (4 << 20) | (6 << 16) | 1;


useFdLeakCheck();
let rig: Rig;
afterEach(async () => {
  await rig?.close();
});

describe('construction', () => {
  it('refuses bad options with RangeError', async () => {
    const backend = new RamBackend(1 << 20);
    expect(() => new NvmeController({ backend, queues: 0 })).toThrow(RangeError);
    expect(() => new NvmeController({ backend, queues: 65 })).toThrow(RangeError);
    expect(() => new NvmeController({ backend, blockSize: 1024 as 512 })).toThrow(RangeError);
    expect(() => new NvmeController({ backend, mdts: 17 })).toThrow(RangeError);
    expect(() => new NvmeController({ backend, maxQueueEntries: 1 })).toThrow(RangeError);
    expect(() => new NvmeController({ backend, doorbells: 'poll' as 'trap' })).toThrow(RangeError);
    const tiny = new RamBackend(256);
    expect(() => new NvmeController({ backend: tiny, blockSize: 512 })).toThrow(RangeError);
    // A controller that was not built does not own its backend: the caller closes it.
    await tiny.close();
    await backend.close();
  });
});

describe('PCI identity', () => {
  it('is a PCIe NVMe endpoint (class 01:08:02) with PM and MSI-X (table and PBA in BAR4)', () => {
    rig = new Rig({ queues: 4 });
    const hdr = rig.configRead(0, 64);
    expect(hdr.readUInt32LE(8) >>> 8).toBe(ClassCode.STORAGE_NVME);
    expect(rig.capability(0x01)).toBeGreaterThan(0); // PM
    expect(rig.capability(0x10)).toBeGreaterThan(0); // PCIe
    const msix = rig.capability(0x11);
    const ctl = rig.configRead(msix + 2, 2).readUInt16LE(0);
    expect((ctl & 0x7ff) + 1).toBe(5); // queues + 1 vectors
    expect(rig.configRead(msix + 4, 4).readUInt32LE(0)).toBe(4); // table: BAR4 offset 0
    expect(rig.configRead(msix + 8, 4).readUInt32LE(0)).toBe(0x800 | 4); // PBA: BAR4 0x800
    // BAR0 is a 64-bit memory BAR; BAR0 = 8 KiB
    expect(hdr.readUInt32LE(0x10) & 0x7).toBe(0x4);
    expect(rig.ctrl.regions[PciRegion.BAR0]!.size).toBe(0x2000);
    expect(rig.ctrl.regions[PciRegion.BAR4]!.size).toBe(0x1000);
    expect(hdr[0x3d]).toBe(1); // INTA#
  });

  it('trap mode offers no mmap; mmap mode offers the doorbell page, one fd, page aligned', () => {
    rig = new Rig();
    expect(rig.ctrl.regions[PciRegion.BAR0]!.mmap).toBeUndefined();
    const mapped = new Rig({ doorbells: 'mmap' });
    const mmap = mapped.ctrl.regions[PciRegion.BAR0]!.mmap!;
    expect(mmap.areas).toEqual([{ offset: 0x1000, size: 0x1000 }]);
    expect(mmap.fileOffset).toBe(0);
    expect(mmap.fd.closed).toBe(false);
    return mapped.close();
  });
});

describe('registers', () => {
  it('CAP: MQES, CQR, TO, DSTRD 0, CSS NVM, MPSMIN 4K; VS 1.4.0', () => {
    rig = new Rig({ maxQueueEntries: 256 });
    const cap = rig.read64(Reg.CAP);
    expect(Number(cap & 0xffffn)).toBe(255); // MQES, 0's based
    expect((cap >> 16n) & 1n).toBe(1n); // CQR
    expect(Number((cap >> 24n) & 0xffn)).toBe(20); // TO: 10 s in 500 ms units
    expect((cap >> 32n) & 0xfn).toBe(0n); // DSTRD
    expect((cap >> 37n) & 1n).toBe(1n); // CSS: NVM
    expect((cap >> 48n) & 0xfn).toBe(0n); // MPSMIN
    expect((cap >> 52n) & 0xfn).toBe(4n); // MPSMAX
    expect(rig.read32(Reg.VS)).toBe(0x00010400);
  });

  it('ignores writes to read-only registers (CAP, VS, CSTS) and reads reserved ones as 0', () => {
    rig = new Rig();
    const cap = rig.read64(Reg.CAP);
    rig.write64(Reg.CAP, 0n);
    rig.write32(Reg.VS, 0);
    rig.write32(Reg.CSTS, 0xffffffff);
    rig.write32(Reg.NSSR, 0x4e564d65);
    expect(rig.read64(Reg.CAP)).toBe(cap);
    expect(rig.read32(Reg.VS)).toBe(0x00010400);
    expect(rig.read32(Reg.CSTS)).toBe(0);
    expect(rig.read32(Reg.CMBLOC)).toBe(0);
    expect(rig.read32(Reg.CMBSZ)).toBe(0);
    expect(rig.read32(Reg.NSSR)).toBe(0);
  });

  it('merges byte and word writes into registers; keeps reserved bits of AQA, ASQ, CC zero', () => {
    rig = new Rig();
    rig.bar0Write(Reg.AQA, Buffer.from([0x1f]));
    rig.bar0Write(Reg.AQA + 2, Buffer.from([0x0f, 0xf0]));
    expect(rig.read32(Reg.AQA)).toBe(0x0000f001f & 0x0fff0fff);
    rig.write32(Reg.AQA, 0xffffffff);
    expect(rig.read32(Reg.AQA)).toBe(0x0fff0fff);
    rig.write64(Reg.ASQ, 0x1234_5678_9abc_dfffn);
    expect(rig.read64(Reg.ASQ)).toBe(0x1234_5678_9abc_d000n);
    rig.write32(Reg.CC, 0xff00000e);
    expect(rig.read32(Reg.CC)).toBe(0);
  });

  it('INTMS sets and INTMC clears mask bits (write 1), reading both returns the mask', () => {
    rig = new Rig();
    rig.write32(Reg.INTMS, 0x5);
    rig.write32(Reg.INTMS, 0x2);
    expect(rig.read32(Reg.INTMS)).toBe(0x7);
    rig.bar0Write(Reg.INTMC, Buffer.from([0x1])); // a byte write clears only what it writes
    expect(rig.read32(Reg.INTMC)).toBe(0x6);
  });

  it('a doorbell written while the controller is disabled does nothing', async () => {
    rig = new Rig();
    rig.write32(sqTailDoorbell(0), 1);
    rig.write32(cqHeadDoorbell(5), 1);
    await tick();
    expect(rig.read32(Reg.CSTS)).toBe(0);
  });
});

describe('enable (CC.EN 0 -> 1)', () => {
  it('sets CFS for a bad admin queue size, page size, command set or arbitration', async () => {
    rig = new Rig();
    rig.enableBusMaster();
    const bad = [
      { aqa: 0, cc: CC_EN }, // sizes of 1 entry
      { aqa: 0x001f001f, cc: CC_EN | (5 << Cc.MPS_SHIFT) }, // 128 KiB pages > MPSMAX
      { aqa: 0x001f001f, cc: CC_EN | (1 << Cc.CSS_SHIFT) },
      { aqa: 0x001f001f, cc: CC_EN | (1 << Cc.AMS_SHIFT) },
    ];
    for (const b of bad) {
      rig.write32(Reg.AQA, b.aqa);
      rig.write64(Reg.ASQ, 0x10000);
      rig.write64(Reg.ACQ, 0x20000);
      rig.write32(Reg.CC, b.cc);
      expect(rig.read32(Reg.CSTS) & (Csts.RDY | Csts.CFS)).toBe(Csts.CFS);
      // The host resets to recover: CC.EN = 0 clears CFS.
      rig.write32(Reg.CC, 0);
      expect(rig.read32(Reg.CSTS)).toBe(0);
    }
  });

  it('an admin queue outside guest memory is a fatal error at first use, not a crash', async () => {
    rig = new Rig();
    rig.enableBusMaster();
    rig.write32(Reg.AQA, 0x001f001f);
    rig.write64(Reg.ASQ, 0x7000_0000_0000);
    rig.write64(Reg.ACQ, 0x7000_0001_0000);
    rig.write32(Reg.CC, CC_EN);
    expect(rig.read32(Reg.CSTS) & Csts.RDY).toBe(Csts.RDY);
    rig.write32(sqTailDoorbell(0), 1);
    expect(rig.read32(Reg.CSTS) & Csts.CFS).toBe(Csts.CFS);
  });

  it('becomes ready at once, with the page size CC.MPS selects', async () => {
    rig = new Rig();
    await rig.enable({ cc: CC_EN | (1 << Cc.MPS_SHIFT) });
    expect(rig.read32(Reg.CSTS)).toBe(Csts.RDY);
    expect(rig.ctrl.pageSize).toBe(8192);
  });

  it('without bus mastering, the first command is a fatal error (no DMA is attempted)', async () => {
    rig = new Rig();
    await rig.enable();
    rig.configWrite(0x04, Buffer.from([0x02, 0x00])); // memory space only
    rig.submit(0, { opcode: AdminOpcode.IDENTIFY, prp1: rig.alloc(4096), cdw10: 1 });
    expect(rig.read32(Reg.CSTS) & Csts.CFS).toBe(Csts.CFS);
  });
});

describe('controller reset (CC.EN 1 -> 0)', () => {
  it('deletes every queue and restores feature defaults; the admin queue is new after re-enable', async () => {
    rig = new Rig({ queues: 4 });
    await rig.enable();
    await rig.createQueuePair(1, 16);
    const set = await rig.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: 0x08, cdw11: 0x0a05 });
    expect(set.status).toBe(0);
    await rig.disable();
    expect(rig.ctrl.sq(1)).toBeNull();
    expect(rig.ctrl.cq(0)).toBeNull();
    await rig.enable();
    const get = await rig.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: 0x08 });
    expect(get.dw0).toBe(0);
    // The old I/O queue is gone: deleting it is an invalid queue identifier.
    const del = await rig.admin({ opcode: AdminOpcode.DELETE_SQ, cdw10: 1 });
    expect(del.status).toBe(Status.QID_INVALID);
  });

  it('keeps RDY set until in-flight backend I/O finishes, then drops its completion', async () => {
    const ram = new RamBackend(1 << 20);
    const g = gate();
    const release = g.open;
    const slow = wrapBackend(ram, {
      read: async (offset: number, dst: Buffer) => {
        await g.promise;
        return ram.read(offset, dst);
      },
    });
    rig = new Rig({ backend: slow });
    await rig.enable();
    await rig.createQueuePair(1, 16);
    const buf = rig.alloc(4096);
    rig.submit(1, { opcode: 0x02, nsid: 1, prp1: buf, cdw12: 7 });
    await rig.waitFor(() => rig.ctrl.inFlight === 1, 'read in flight');
    rig.write32(Reg.CC, rig.read32(Reg.CC) & ~1);
    expect(rig.read32(Reg.CSTS) & Csts.RDY).toBe(Csts.RDY); // not yet
    release();
    await rig.waitFor(() => (rig.read32(Reg.CSTS) & Csts.RDY) === 0, 'RDY = 0');
    // The read's completion was never posted (the CQ slot is still zero).
    const cq = rig.queue(1).cqIova;
    expect(rig.mem.readUInt32LE(cq + 12)).toBe(0);
  });

  it('a DEVICE_RESET (server reset) returns every register to its power-on value', async () => {
    rig = new Rig();
    await rig.enable();
    rig.write32(Reg.INTMS, 1);
    await rig.ctrl.reset('client');
    expect(rig.read32(Reg.CC)).toBe(0);
    expect(rig.read32(Reg.CSTS)).toBe(0);
    expect(rig.read32(Reg.AQA)).toBe(0);
    expect(rig.read64(Reg.ASQ)).toBe(0n);
    expect(rig.read32(Reg.INTMS)).toBe(0);
  });

  it('enabling again before RDY cleared takes effect once the reset completes', async () => {
    const ram = new RamBackend(1 << 20);
    const g = gate();
    const release = g.open;
    const slow = wrapBackend(ram, {
      flush: async () => {
        await g.promise;
      },
    });
    rig = new Rig({ backend: slow });
    await rig.enable();
    await rig.createQueuePair(1, 4);
    rig.submit(1, { opcode: 0x00, nsid: 1 });
    await rig.waitFor(() => rig.ctrl.inFlight === 1, 'flush in flight');
    rig.write32(Reg.CC, CC_EN & ~1);
    rig.write32(Reg.CC, CC_EN);
    release();
    await rig.waitFor(() => rig.ctrl.inFlight === 0, 'idle');
    await tick();
    expect(rig.read32(Reg.CSTS)).toBe(Csts.RDY);
  });
});

describe('shutdown (CC.SHN)', () => {
  it('reports SHST occurring, flushes the backend, then complete; stops fetching commands', async () => {
    const ram = new RamBackend(1 << 20);
    let flushes = 0;
    const counted = wrapBackend(ram, {
      flush: async () => {
        flushes++;
      },
    });
    rig = new Rig({ backend: counted });
    await rig.enable();
    rig.write32(Reg.CC, CC_EN | (1 << Cc.SHN_SHIFT));
    expect((rig.read32(Reg.CSTS) >>> 2) & 3).toBe(1);
    await rig.waitFor(() => ((rig.read32(Reg.CSTS) >>> 2) & 3) === 2, 'SHST complete');
    expect(flushes).toBe(1);
    // After shutdown, commands are not processed.
    rig.submit(0, { opcode: AdminOpcode.GET_FEATURES, cdw10: 0x07 });
    await tick();
    expect(rig.reap(0)).toEqual([]);
    // A reset brings it back.
    await rig.disable();
    expect(rig.read32(Reg.CSTS)).toBe(0);
  });

  it('a failing flush at shutdown sets CFS with SHST complete', async () => {
    const ram = new RamBackend(1 << 20);
    const failing = wrapBackend(ram, {
      flush: async () => {
        throw new Error('EIO');
      },
    });
    rig = new Rig({ backend: failing });
    await rig.enable();
    rig.write32(Reg.CC, CC_EN | (2 << Cc.SHN_SHIFT));
    await rig.waitFor(() => ((rig.read32(Reg.CSTS) >>> 2) & 3) === 2, 'SHST complete');
    expect(rig.read32(Reg.CSTS) & Csts.CFS).toBe(Csts.CFS);
  });
});
