// Interrupts: MSI-X vector per completion queue delivered through the client's eventfds, interrupt
// coalescing, and INTx with level semantics when MSI-X is off (INTMS/INTMC masking).
import { afterEach, describe, expect, it } from 'vitest';
import { AdminOpcode, FeatureId, IoOpcode } from '../../../lib/nvme/constants';
import { Reg, cqHeadDoorbell } from '../../../lib/nvme/registers';
import { PciIrq } from '../../../lib/protocol/constants';
import { PAGE, Rig, tick } from './rig';
import { useFdLeakCheck } from '../../helpers/fds';


useFdLeakCheck();
let rig: Rig;
afterEach(async () => {
  await rig?.close();
});

/** PCI STATUS.INTERRUPT (bit 3): the INTx line level as config space shows it. */
const intxLevel = () => (rig.configRead(0x06, 2).readUInt16LE(0) & 0x8) !== 0;

async function flushRead(qid: number): Promise<number> {
  const buf = rig.alloc(PAGE);
  return rig.submit(qid, { opcode: IoOpcode.READ, nsid: 1, prp1: buf, cdw12: 7 });
}

describe('MSI-X', () => {
  it('no eventfd for a vector: the interrupt stays pending (PBA) and goes out when one is registered', async () => {
    rig = new Rig({ queues: 2 });
    rig.enableBusMaster();
    rig.enableMsix(0); // enabled, but no eventfds yet
    await rig.enable();
    const c = await rig.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: FeatureId.NUM_QUEUES });
    expect(c.status).toBe(0);
    expect(rig.ctrl.msix!.isPending(0)).toBe(true);
    rig.addEventfd(PciIrq.MSIX, 0);
    expect(rig.drainIrq(PciIrq.MSIX, 0)).toBe(1);
    expect(rig.ctrl.msix!.isPending(0)).toBe(false);
  });

  it('each completion queue signals its own vector; a CQ with IEN clear signals nothing', async () => {
    rig = new Rig({ queues: 3 });
    rig.enableBusMaster();
    rig.enableMsix();
    await rig.enable();
    expect(rig.drainIrq(PciIrq.MSIX, 0)).toBe(0);
    await rig.createQueuePair(1, 16, { vector: 1 });
    await rig.createQueuePair(2, 16, { vector: 3 });
    await rig.createQueuePair(3, 16, { vector: 2, ien: false });
    expect(rig.drainIrq(PciIrq.MSIX, 0)).toBeGreaterThanOrEqual(1); // admin completions
    await rig.wait(2, await flushRead(2));
    expect(rig.drainIrq(PciIrq.MSIX, 3)).toBe(1);
    expect(rig.drainIrq(PciIrq.MSIX, 1)).toBe(0);
    await rig.wait(1, await flushRead(1));
    expect(rig.drainIrq(PciIrq.MSIX, 1)).toBe(1);
    await rig.wait(3, await flushRead(3));
    expect(rig.drainIrq(PciIrq.MSIX, 2)).toBe(0);
    expect(rig.irqs.signalled[PciIrq.INTX]).toBe(0);
  });

  it('a batch of completions in one turn costs one interrupt', async () => {
    rig = new Rig({ queues: 1 });
    rig.enableBusMaster();
    rig.enableMsix();
    await rig.enable();
    await rig.createQueuePair(1, 64);
    rig.drainIrq(PciIrq.MSIX, 1);
    const buf = rig.alloc(PAGE);
    for (let i = 0; i < 16; i++) rig.place(1, { opcode: IoOpcode.READ, nsid: 1, prp1: buf, cdw12: 7 });
    rig.ring(1);
    await rig.waitFor(() => {
      rig.reap(1);
      return rig.queue(1).done.size === 16;
    }, 'all 16 completions');
    expect(rig.drainIrq(PciIrq.MSIX, 1)).toBe(1);
  });

  it('coalescing: the threshold aggregates completions; the time limit fires a partial batch', async () => {
    rig = new Rig({ queues: 2 });
    rig.enableBusMaster();
    rig.enableMsix();
    await rig.enable();
    await rig.createQueuePair(1, 64);
    await rig.createQueuePair(2, 64);
    // THR = 4 (0's based 3), TIME = 50 ms (500 x 100 µs does not fit; 0xff = 25.5 ms max).
    expect((await rig.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.IRQ_COALESCE, cdw11: (0xff << 8) | 3 })).status).toBe(0);
    // Vector 2 opts out (Interrupt Vector Configuration CD).
    expect((await rig.admin({ opcode: AdminOpcode.SET_FEATURES, cdw10: FeatureId.IRQ_CONFIG, cdw11: 2 | (1 << 16) })).status).toBe(0);
    rig.drainIrq(PciIrq.MSIX, 1);
    const cids = [];
    for (let i = 0; i < 3; i++) {
      cids.push(await flushRead(1));
      await rig.waitFor(() => rig.ctrl.inFlight === 0, 'idle');
      await tick();
    }
    expect(rig.drainIrq(PciIrq.MSIX, 1)).toBe(0); // 3 < 4: held back
    await flushRead(1);
    await rig.waitFor(() => rig.ctrl.inFlight === 0, 'idle');
    await tick();
    expect(rig.drainIrq(PciIrq.MSIX, 1)).toBe(1); // the 4th fires
    await flushRead(1);
    await rig.waitFor(() => rig.drainIrq(PciIrq.MSIX, 1) === 1, 'aggregation time', 1000); // fires after ~26 ms
    await rig.wait(2, await flushRead(2));
    expect(rig.drainIrq(PciIrq.MSIX, 2)).toBe(1); // not coalesced
    // The admin queue is never coalesced.
    rig.drainIrq(PciIrq.MSIX, 0);
    await rig.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: FeatureId.ARBITRATION });
    expect(rig.drainIrq(PciIrq.MSIX, 0)).toBe(1);
  });
});

describe('INTx (MSI-X off)', () => {
  it('asserts while a CQ holds unconsumed entries, deasserts on the head doorbell; edge to the eventfd', async () => {
    rig = new Rig({ queues: 1 });
    rig.addEventfd(PciIrq.INTX, 0);
    await rig.enable();
    expect(rig.ctrl.msixEnabled).toBe(false);
    const cid = rig.submit(0, { opcode: AdminOpcode.GET_FEATURES, cdw10: FeatureId.NUM_QUEUES });
    await tick();
    expect(intxLevel()).toBe(true);
    expect(rig.drainIrq(PciIrq.INTX, 0)).toBe(1);
    // Reap without ringing: still asserted.
    rig.reap(0, false);
    expect(rig.queue(0).done.has(cid)).toBe(true);
    expect(intxLevel()).toBe(true);
    rig.write32(cqHeadDoorbell(0), rig.queue(0).cqHead);
    expect(intxLevel()).toBe(false);
  });

  it('INTMS masks the vector (line drops), INTMC unmasks it (line rises again)', async () => {
    rig = new Rig({ queues: 1 });
    rig.addEventfd(PciIrq.INTX, 0);
    await rig.enable();
    rig.submit(0, { opcode: AdminOpcode.GET_FEATURES, cdw10: FeatureId.NUM_QUEUES });
    await tick();
    expect(intxLevel()).toBe(true);
    rig.drainIrq(PciIrq.INTX, 0);
    rig.write32(Reg.INTMS, 1);
    expect(intxLevel()).toBe(false);
    rig.write32(Reg.INTMC, 1);
    expect(intxLevel()).toBe(true);
    expect(rig.drainIrq(PciIrq.INTX, 0)).toBe(1);
  });

  it('an unmask (end of interrupt) while still asserted signals again; enabling MSI-X stops INTx', async () => {
    rig = new Rig({ queues: 1 });
    rig.addEventfd(PciIrq.INTX, 0);
    await rig.enable();
    rig.submit(0, { opcode: AdminOpcode.GET_FEATURES, cdw10: FeatureId.NUM_QUEUES });
    await tick();
    rig.drainIrq(PciIrq.INTX, 0);
    rig.irqs.setMasked(PciIrq.INTX, 0, false);
    rig.ctrl.irqsChanged(PciIrq.INTX);
    expect(rig.drainIrq(PciIrq.INTX, 0)).toBe(1);
    rig.enableMsix();
    rig.ctrl.irqsChanged(PciIrq.INTX);
    expect(intxLevel()).toBe(false);
  });

  it('I/O CQs (vector 0, IEN) drive the same line; a CQ with IEN clear does not', async () => {
    rig = new Rig({ queues: 2 });
    await rig.enable();
    await rig.createQueuePair(1, 16, { ien: false });
    await rig.createQueuePair(2, 16);
    await rig.wait(1, await flushRead(1));
    expect(intxLevel()).toBe(false);
    const cid = await flushRead(2);
    await rig.waitFor(intxLevel, 'INTx');
    await rig.wait(2, cid);
    expect(intxLevel()).toBe(false);
  });
});
