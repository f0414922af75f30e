// Doorbells: trapped REGION_WRITEs, the mmap'd doorbell page (polled), and shadow doorbells with
// EventIdx (Doorbell Buffer Config), including the sleep/wake handshake in trap mode.
import { afterEach, describe, expect, it } from 'vitest';
import { AdminOpcode, AerType, IoOpcode, LogId } from '../../../lib/nvme/constants';
import { cqHeadDoorbell, sqTailDoorbell } from '../../../lib/nvme/registers';
import { Mapping } from '../../../lib/native/mapping';
import { PciRegion } from '../../../lib/protocol/constants';
import { PAGE, Rig, tick, type Command } from './rig';
import { useFdLeakCheck } from '../../helpers/fds';


useFdLeakCheck();
let rig: Rig;
afterEach(async () => {
  await rig?.close();
});

const FAST_POLL = { spinUs: 100, shortMs: 1, shortForMs: 15, longMs: 4 };

/** Linux's nvme_dbbuf_need_event: ring the real doorbell iff the new value passed EventIdx. */
function needEvent(eventIdx: number, next: number, old: number): boolean {
  return ((next - eventIdx - 1) & 0xffff) < ((next - old) & 0xffff);
}

/** A host that uses shadow doorbells like Linux's nvme-pci driver. */
class ShadowHost {
  mmioWrites = 0;
  constructor(
    readonly rig: Rig,
    readonly dbs: number,
    readonly eis: number,
  ) {}

  submit(qid: number, cmd: Command): number {
    const rig = this.rig;
    const q = rig.queue(qid);
    const old = q.sqTail;
    const cid = rig.place(qid, { nsid: 1, ...cmd });
    rig.mem.writeUInt32LE(q.sqTail, this.dbs + 8 * qid);
    const ei = rig.mem.readUInt32LE(this.eis + 8 * qid);
    if (needEvent(ei, q.sqTail, old)) {
      rig.write32(sqTailDoorbell(qid), q.sqTail);
      this.mmioWrites++;
    }
    return cid;
  }

  /** Reap and publish the CQ head through the shadow (MMIO only if EventIdx asks). */
  reap(qid: number): void {
    const rig = this.rig;
    const q = rig.queue(qid);
    const old = q.cqHead;
    if (rig.reap(qid, false).length === 0) return;
    rig.mem.writeUInt32LE(q.cqHead, this.dbs + 8 * qid + 4);
    const ei = rig.mem.readUInt32LE(this.eis + 8 * qid + 4);
    if (needEvent(ei, q.cqHead, old)) {
      rig.write32(cqHeadDoorbell(qid), q.cqHead);
      this.mmioWrites++;
    }
  }

  async wait(qid: number, cid: number): Promise<number> {
    const q = this.rig.queue(qid);
    await this.rig.waitFor(() => (this.reap(qid), q.done.has(cid)), `cid ${cid}`);
    const c = q.done.get(cid)!;
    q.done.delete(cid);
    return c.status;
  }
}

async function shadowRig(doorbells: 'trap' | 'mmap', poll = FAST_POLL): Promise<ShadowHost> {
  rig = new Rig({ queues: 2, doorbells, poll });
  await rig.enable();
  await rig.createQueuePair(1, 32);
  await rig.createQueuePair(2, 32);
  const dbs = rig.alloc(PAGE);
  const eis = rig.alloc(PAGE);
  const c = await rig.admin({ opcode: AdminOpcode.DBBUF, prp1: dbs, prp2: eis });
  expect(c.status).toBe(0);
  return new ShadowHost(rig, dbs, eis);
}

describe('shadow doorbells (trap mode)', () => {
  it('a burst needs few real doorbell writes; every command completes; the poller then sleeps', async () => {
    const host = await shadowRig('trap');
    const buf = rig.alloc(PAGE);
    const cids: number[] = [];
    for (let i = 0; i < 24; i++) cids.push(host.submit(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 7 }));
    for (const cid of cids) expect(await host.wait(1, cid)).toBe(0);
    expect(host.mmioWrites).toBeLessThan(24);
    await rig.waitFor(() => rig.ctrl.poller.phase === 'sleep', 'poller asleep');
    expect(rig.ctrl.doorbellCounts.shadow).toBeGreaterThan(0);
  });

  it('while the poller spins, EventIdx trails the newest tail and head: laps of the rings need no real doorbell', async () => {
    const host = await shadowRig('trap', { ...FAST_POLL, spinUs: 10_000_000 });
    const buf = rig.alloc(PAGE);
    // The first submission finds the poller asleep and rings.
    expect(await host.wait(1, host.submit(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 }))).toBe(0);
    const rung = host.mmioWrites;
    for (let i = 0; i < 100; i++) {
      const cids = [0, 1, 2].map(() => host.submit(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 }));
      for (const cid of cids) expect(await host.wait(1, cid)).toBe(0);
    }
    expect(host.mmioWrites).toBe(rung);
    const q = rig.queue(1);
    expect(rig.mem.readUInt32LE(host.eis + 8)).toBe((q.sqTail + 31) % 32);
    // The last head the host published is seen at the next poll.
    await rig.waitFor(() => rig.mem.readUInt32LE(host.eis + 12) === (q.cqHead + 31) % 32, 'CQ EventIdx trailing the head');
    expect(rig.ctrl.poller.phase).toBe('spin');
  });

  it('asleep, EventIdx equals the tail: the next submission rings the real doorbell, which wakes it', async () => {
    const host = await shadowRig('trap');
    const buf = rig.alloc(PAGE);
    expect(await host.wait(2, host.submit(2, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 }))).toBe(0);
    await rig.waitFor(() => rig.ctrl.poller.phase === 'sleep', 'poller asleep');
    const tail = rig.queue(2).sqTail;
    expect(rig.mem.readUInt32LE(host.eis + 16)).toBe(tail);
    const before = host.mmioWrites;
    const cid = host.submit(2, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 });
    expect(host.mmioWrites).toBe(before + 1);
    expect(await host.wait(2, cid)).toBe(0);
  });

  it('asleep with MSI-X, the CQ EventIdx trails the head: consuming completions rings nothing; without MSI-X it asks for the head', async () => {
    const host = await shadowRig('trap');
    rig.enableMsix();
    const buf = rig.alloc(PAGE);
    expect(await host.wait(1, host.submit(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 }))).toBe(0);
    await rig.waitFor(() => rig.ctrl.poller.phase === 'sleep', 'poller asleep');
    const q = rig.queue(1);
    expect(rig.mem.readUInt32LE(host.eis + 12)).toBe((q.cqHead + 31) % 32);
    // QD1 laps of the ring: one real doorbell per submission (it wakes the controller), none for
    // the heads; every command still completes, also once the ring has wrapped.
    for (let i = 0; i < 40; i++) {
      await rig.waitFor(() => rig.ctrl.poller.phase === 'sleep', 'poller asleep');
      const before = host.mmioWrites;
      expect(await host.wait(1, host.submit(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 }))).toBe(0);
      expect(host.mmioWrites).toBe(before + 1);
    }
    rig.disableMsix();
    expect(await host.wait(1, host.submit(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 }))).toBe(0);
    await rig.waitFor(() => rig.ctrl.poller.phase === 'sleep', 'poller asleep');
    expect(rig.mem.readUInt32LE(host.eis + 12)).toBe(q.cqHead);
  });

  it('a late trapped doorbell with an older tail does not move the tail back (no stale commands re-run)', async () => {
    const host = await shadowRig('trap');
    const buf = rig.alloc(PAGE);
    const q = rig.queue(1);
    const first = host.submit(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 });
    const oldTail = q.sqTail;
    expect(await host.wait(1, first)).toBe(0);
    // More work published through the shadow only, and completed...
    const later = [0, 1, 2].map(() => rig.place(1, { opcode: IoOpcode.READ, nsid: 1, prp1: buf, cdw12: 0 }));
    rig.mem.writeUInt32LE(q.sqTail, host.dbs + 8);
    rig.read32(0x1c); // activity: the controller looks at the shadows
    for (const cid of later) expect(await host.wait(1, cid)).toBe(0);
    const executed = rig.ctrl.stats.hostReads;
    // ...then the posted MMIO write of the old tail finally arrives (as it can over the socket).
    rig.write32(sqTailDoorbell(1), oldTail);
    await new Promise((r) => setTimeout(r, 20));
    host.reap(1);
    expect(rig.reap(1, false)).toEqual([]);
    expect(rig.ctrl.stats.hostReads).toBe(executed);
  });

  it('a tail published only in the shadow while asleep is picked up at the next wake-up', async () => {
    const host = await shadowRig('trap');
    await rig.waitFor(() => rig.ctrl.poller.phase === 'sleep', 'poller asleep');
    // A misbehaving host: shadow only, no doorbell although EventIdx asked for one.
    const buf = rig.alloc(PAGE);
    const q = rig.queue(1);
    const cid = rig.place(1, { opcode: IoOpcode.READ, nsid: 1, prp1: buf, cdw12: 0 });
    rig.mem.writeUInt32LE(q.sqTail, host.dbs + 8);
    await tick();
    expect(rig.reap(1, false)).toEqual([]);
    rig.read32(0x1c); // any register access counts as activity
    expect(await host.wait(1, cid)).toBe(0);
  });

  it('the admin queue ignores the shadow buffer; real doorbells keep working for I/O queues too', async () => {
    const host = await shadowRig('trap');
    // Admin: shadow alone does nothing...
    const cid = rig.place(0, { opcode: AdminOpcode.GET_FEATURES, cdw10: 0x07 });
    rig.mem.writeUInt32LE(rig.queue(0).sqTail, host.dbs);
    await rig.waitFor(() => rig.ctrl.poller.phase === 'sleep', 'poller asleep');
    expect(rig.reap(0)).toEqual([]);
    rig.ring(0);
    expect((await rig.wait(0, cid)).status).toBe(0);
    // I/O with plain REGION_WRITE doorbells (a host that never writes the shadow).
    const buf = rig.alloc(PAGE);
    const c = await rig.io(2, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 });
    expect(c.status).toBe(0);
  });

  it('starts the shadows from the current doorbell values of queues that already run', async () => {
    rig = new Rig({ queues: 1 });
    await rig.enable();
    await rig.createQueuePair(1, 16);
    const buf = rig.alloc(PAGE);
    for (let i = 0; i < 3; i++) expect((await rig.io(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 })).status).toBe(0);
    const dbs = rig.alloc(PAGE);
    const eis = rig.alloc(PAGE);
    expect((await rig.admin({ opcode: AdminOpcode.DBBUF, prp1: dbs, prp2: eis })).status).toBe(0);
    expect(rig.mem.readUInt32LE(dbs + 8)).toBe(3);
    expect(rig.mem.readUInt32LE(dbs + 12)).toBe(3);
    expect(rig.mem.readUInt32LE(dbs)).toBe(0); // admin queue: not shadowed
  });
});

describe('mmap doorbells', () => {
  function mapDoorbells(): Mapping {
    const mmap = rig.ctrl.regions[PciRegion.BAR0]!.mmap!;
    return Mapping.map(mmap.fd, mmap.fileOffset + mmap.areas[0]!.offset, mmap.areas[0]!.size);
  }

  it('stores into the mapped page are found by polling; REGION_WRITEs land in the same page', async () => {
    rig = new Rig({ queues: 1, doorbells: 'mmap', poll: FAST_POLL });
    await rig.enable();
    const page = mapDoorbells();
    const words = new Uint32Array(page.buffer, 0, 1024);
    // Admin command through the mapped doorbell (no message).
    const cid = rig.place(0, { opcode: AdminOpcode.GET_FEATURES, cdw10: 0x07 });
    words[0] = rig.queue(0).sqTail;
    await rig.waitFor(() => (rig.reap(0, false), rig.queue(0).done.has(cid)), 'completion via mapped doorbell');
    words[1] = rig.queue(0).cqHead;
    expect(rig.ctrl.doorbellCounts.mapped).toBeGreaterThanOrEqual(1);
    // A trapped write to a mapped doorbell still works and is visible in the page.
    await rig.createQueuePair(1, 16);
    expect(words[2]).toBe(0);
    const buf = rig.alloc(PAGE);
    const c = await rig.io(1, { opcode: IoOpcode.READ, prp1: buf, cdw12: 0 });
    expect(c.status).toBe(0);
    expect(words[2]).toBe(rig.queue(1).sqTail);
    expect(rig.read32(sqTailDoorbell(1))).toBe(rig.queue(1).sqTail);
    page.unmapNow();
  });

  it('backs off when idle (spin -> short -> long timers) and spins again on a doorbell', async () => {
    rig = new Rig({ queues: 1, doorbells: 'mmap', poll: FAST_POLL });
    await rig.enable();
    const page = mapDoorbells();
    const words = new Uint32Array(page.buffer, 0, 1024);
    await rig.waitFor(() => rig.ctrl.poller.phase === 'short', 'short timer phase');
    await rig.waitFor(() => rig.ctrl.poller.phase === 'long', 'long timer phase', 2000);
    const cid = rig.place(0, { opcode: AdminOpcode.GET_FEATURES, cdw10: 0x07 });
    words[0] = rig.queue(0).sqTail;
    await rig.waitFor(() => (rig.reap(0, false), rig.queue(0).done.has(cid)), 'completion');
    expect(['spin', 'short']).toContain(rig.ctrl.poller.phase);
    page.unmapNow();
  });

  it('an invalid value stored in the mapped page is reported once by an AER', async () => {
    rig = new Rig({ queues: 1, doorbells: 'mmap', poll: FAST_POLL });
    await rig.enable();
    const page = mapDoorbells();
    const words = new Uint32Array(page.buffer, 0, 1024);
    const aer = rig.submit(0, { opcode: AdminOpcode.ASYNC_EVENT });
    await tick();
    words[1] = 999; // admin CQ head beyond the queue
    const c = await rig.wait(0, aer);
    expect(c.dw0).toBe(AerType.ERROR | (0x01 << 8) | (LogId.ERROR << 16));
    page.unmapNow();
  });

  it('a controller reset zeroes the page', async () => {
    rig = new Rig({ queues: 1, doorbells: 'mmap', poll: FAST_POLL });
    await rig.enable();
    const page = mapDoorbells();
    const words = new Uint32Array(page.buffer, 0, 1024);
    const cid = rig.place(0, { opcode: AdminOpcode.GET_FEATURES, cdw10: 0x07 });
    words[0] = rig.queue(0).sqTail;
    await rig.waitFor(() => (rig.reap(0, false), rig.queue(0).done.has(cid)), 'completion');
    await rig.disable();
    expect(words[0]).toBe(0);
    expect(rig.ctrl.poller.phase).toBe('stopped');
    page.unmapNow();
  });
});
