/**
 * The controller's state across a migration, at the level of queue entries (the test rig is the
 * host): completions that were waiting for room in a full completion queue, a Delete I/O SQ waiting
 * for them, and an outstanding Asynchronous Event Request move to the destination and complete
 * there, each exactly once; commands still in the submission queue are fetched there.
 */
import { describe, expect, it } from 'vitest';
import type { MigrationHooks } from '../../../lib/server/migration';
import { AdminOpcode, IoOpcode } from '../../../lib/nvme/constants';
import { HostQueue, Rig, sc, type Completion } from './rig';

/** Stops the rig's controller and reads its whole stream. */
async function save(rig: Rig): Promise<Buffer> {
  const hooks = rig.ctrl.migration as MigrationHooks;
  await hooks.setRunning(false);
  const saver = hooks.saver!();
  await saver.started?.();
  const parts: Buffer[] = [];
  for (;;) {
    const chunk = saver.read(1 << 20, true);
    if (chunk.length === 0) break;
    parts.push(Buffer.from(chunk));
  }
  saver.close?.();
  return Buffer.concat(parts);
}

/** A destination rig whose DMA space maps the source rig's guest memory, loaded with `stream`. */
async function restore(src: Rig, stream: Buffer): Promise<Rig> {
  const dst = new Rig({ serial: 'MIG-RIG' });
  await dst.remapMemory(src);
  const hooks = dst.ctrl.migration as MigrationHooks;
  await hooks.setRunning(false);
  const loader = hooks.loader!();
  loader.write(stream);
  await loader.finish();
  return dst;
}

describe('NvmeController migration: commands in flight', () => {
  it('waiting completions, a deferred Delete I/O SQ, an AER and unfetched commands complete once on the destination', async () => {
    const src = new Rig({ serial: 'MIG-RIG' });
    await src.enable();
    // CQ 1 with 2 entries (room for one completion), SQ 1 with 8.
    const cq = src.alloc(2 * 16);
    const sq = src.alloc(8 * 64);
    expect(sc(await src.admin({ opcode: AdminOpcode.CREATE_CQ, prp1: cq, cdw10: (1 << 16) | 1, cdw11: 1 }))).toBe(0);
    expect(sc(await src.admin({ opcode: AdminOpcode.CREATE_SQ, prp1: sq, cdw10: (7 << 16) | 1, cdw11: (1 << 16) | 1 }))).toBe(0);
    src.queues.set(1, new HostQueue(1, sq, 8, cq, 2));
    const buf = src.alloc(4096);
    for (let i = 0; i < 4; i++) src.place(1, { opcode: IoOpcode.READ, nsid: 1, cdw10: i, prp1: buf });
    src.ring(1);
    await src.waitFor(() => src.ctrl.cq(1)?.waiting.length === 3, 'three completions waiting for room');
    const aer = src.submit(0, { opcode: AdminOpcode.ASYNC_EVENT });
    const del = src.submit(0, { opcode: AdminOpcode.DELETE_SQ, cdw10: 1 });
    // Two more reads go into the ring but are never fetched on the source.
    await src.waitFor(() => src.ctrl.sq(1)!.onDrained !== null, 'the deletion waiting');
    const stream = await save(src);
    expect(src.ctrl.stopped).toBe(true);

    const dst = await restore(src, stream);
    try {
      expect(dst.ctrl.ready).toBe(true);
      expect(dst.ctrl.cq(1)!.waiting.length).toBe(3);
      expect(dst.ctrl.sq(1)!.onDrained).not.toBeNull();
      // The host now talks to the destination (same guest memory, same rings).
      (src as unknown as { ctrl: unknown }).ctrl = dst.ctrl;
      await (dst.ctrl.migration as MigrationHooks).setRunning(true);
      const seen: Completion[] = [];
      await src.waitFor(() => {
        seen.push(...src.reap(1));
        return seen.length === 4;
      }, 'four read completions');
      expect(seen.map((c) => c.cid).sort()).toEqual([0, 1, 2, 3]);
      expect(seen.every((c) => c.status === 0)).toBe(true);
      // Once its queue drained, the deletion completes: once.
      const d = await src.wait(0, del);
      expect(sc(d)).toBe(0);
      expect(dst.ctrl.sq(1)).toBeNull();
      // The AER is still outstanding on the destination; nothing else completed.
      expect(src.reap(0)).toEqual([]);
      expect(src.reap(1)).toEqual([]);
      expect(dst.ctrl.events.waiting).toBe(1);
      void aer;
    } finally {
      (src as unknown as { ctrl: unknown }).ctrl = dst.ctrl;
      await dst.close();
    }
  });

  it('commands left in the submission queue are fetched by the destination', async () => {
    const src = new Rig({ serial: 'MIG-RIG' });
    await src.enable();
    await src.createQueuePair(1, 16, { ien: false });
    const buf = src.alloc(4096);
    await (src.ctrl.migration as MigrationHooks).setRunning(false);
    // Placed and rung while the source is stopped: the doorbell is recorded, nothing is fetched.
    const cids = [0, 1, 2].map((i) => src.place(1, { opcode: IoOpcode.WRITE, nsid: 1, cdw10: i, prp1: buf }));
    src.ring(1);
    expect(src.ctrl.sq(1)!.tail).toBe(3);
    expect(src.ctrl.sq(1)!.head).toBe(0);
    const late = await save(src);
    const dst = await restore(src, late);
    try {
      (src as unknown as { ctrl: unknown }).ctrl = dst.ctrl;
      await (dst.ctrl.migration as MigrationHooks).setRunning(true);
      for (const cid of cids) expect(sc(await src.wait(1, cid))).toBe(0);
      expect(dst.ctrl.stats.hostWrites).toBe(3);
    } finally {
      await dst.close();
    }
  });
});
