// Measures the doorbell polling policy (doorbells.ts) with its defaults: CPU used while idle, and
// the latency from a doorbell store in the mapped page to the completion, in each phase. Prints
// one JSON line; the assertions are loose bounds so that a loaded CI machine still passes.
import { afterEach, describe, expect, it } from 'vitest';
import { AdminOpcode, IoOpcode } from '../../../lib/nvme/constants';
import { DEFAULT_POLL_POLICY } from '../../../lib/pci/poller';
import { Mapping } from '../../../lib/native/mapping';
import { PciRegion } from '../../../lib/protocol/constants';
import { Rig, tick } from './rig';

let rig: Rig;
afterEach(async () => {
  await rig?.close();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

describe('doorbell polling policy (defaults)', () => {
  it('idles cheaply and answers within the phase bounds', async () => {
    rig = new Rig({ queues: 1, doorbells: 'mmap' });
    await rig.enable();
    await rig.createQueuePair(1, 64);
    const mmap = rig.ctrl.regions[PciRegion.BAR0]!.mmap!;
    const page = Mapping.map(mmap.fd, mmap.fileOffset + 0x1000, 0x1000);
    const words = new Uint32Array(page.buffer, 0, 1024);
    const buf = rig.alloc(4096);
    const q = rig.queue(1);

    /** Stores the SQ tail in the mapped page (no message) and times the completion. */
    const roundTrip = async (): Promise<number> => {
      const cid = rig.place(1, { opcode: IoOpcode.READ, nsid: 1, prp1: buf, cdw12: 7 });
      const t0 = performance.now();
      words[2] = q.sqTail;
      for (;;) {
        rig.reap(1, false);
        if (q.done.delete(cid)) break;
        await tick();
      }
      const dt = performance.now() - t0;
      words[3] = q.cqHead;
      return dt;
    };

    // Spin phase: back to back.
    const spin: number[] = [];
    for (let i = 0; i < 200; i++) spin.push(await roundTrip());
    // Short phase: after a pause of 5 ms plus a fraction of a poll interval, so that the store lands
    // at a different point of the poller's period each time (stores aligned with its timer would
    // look faster than they are).
    const short: number[] = [];
    for (let i = 0; i < 10; i++) {
      await sleep(5 + (i / 10) * DEFAULT_POLL_POLICY.shortMs);
      // Under load the poller may not have run since the timer fired: give it its turn.
      await rig.waitFor(() => rig.ctrl.poller.phase === 'short', 'short phase', 1000);
      short.push(await roundTrip());
    }
    // Long phase: after the idle threshold.
    const long: number[] = [];
    for (let i = 0; i < 8; i++) {
      await sleep(DEFAULT_POLL_POLICY.shortForMs + 30 + (i / 8) * DEFAULT_POLL_POLICY.longMs);
      await rig.waitFor(() => rig.ctrl.poller.phase === 'long', 'long phase', 1000);
      long.push(await roundTrip());
    }
    // CPU while idle in the long phase.
    await sleep(DEFAULT_POLL_POLICY.shortForMs + 20);
    const before = process.cpuUsage();
    const counts0 = { ...rig.ctrl.poller.counts };
    const t0 = performance.now();
    await sleep(1000);
    const used = process.cpuUsage(before);
    const wall = performance.now() - t0;
    const idleCpu = (used.user + used.system) / 1000 / wall;
    const idlePolls = rig.ctrl.poller.counts.long - counts0.long;
    // And the trapped path for comparison: a REGION_WRITE callback processes at once.
    const trapped: number[] = [];
    for (let i = 0; i < 200; i++) {
      const cid = rig.place(1, { opcode: IoOpcode.READ, nsid: 1, prp1: buf, cdw12: 7 });
      const t = performance.now();
      rig.ring(1);
      for (;;) {
        rig.reap(1);
        if (q.done.delete(cid)) break;
        await tick();
      }
      trapped.push(performance.now() - t);
    }
    const result = {
      policy: DEFAULT_POLL_POLICY,
      latencyMs: {
        spinMedian: +median(spin).toFixed(3),
        shortMedian: +median(short).toFixed(3),
        shortMax: +Math.max(...short).toFixed(3),
        longMedian: +median(long).toFixed(3),
        longMax: +Math.max(...long).toFixed(3),
        trappedMedian: +median(trapped).toFixed(3),
      },
      idle: { cpuPercent: +(idleCpu * 100).toFixed(2), pollsPerSecond: Math.round((idlePolls * 1000) / wall) },
    };
    console.info(`[nvme polling] ${JSON.stringify(result)}`);
    expect(median(spin)).toBeLessThan(2);
    expect(median(short)).toBeLessThan(DEFAULT_POLL_POLICY.shortMs * 10);
    expect(median(long)).toBeLessThan(DEFAULT_POLL_POLICY.longMs * 5);
    expect(idleCpu).toBeLessThan(0.1);
    expect(idlePolls).toBeLessThan(2000 / DEFAULT_POLL_POLICY.longMs);
    page.unmapNow();
    // Keep the admin queue honest too: the controller still answers.
    expect((await rig.admin({ opcode: AdminOpcode.GET_FEATURES, cdw10: 0x07 })).status).toBe(0);
  }, 20_000);
});
