// AdaptivePoller's spin window: work that keeps arriving just after the window widens it (so a
// client at queue depth 1 is caught by spin polls, not timer polls); a long pause resets it; work
// after a pause that is not "just after" leaves it alone.
import { afterEach, describe, expect, it } from 'vitest';
import { AdaptivePoller, type PollTarget } from '../../lib/pci/poller';

/** A target with work whenever `pending` is set; it can never sleep (as an mmap'd doorbell page). */
class Work implements PollTarget {
  pending = false;
  readonly pollable = true;
  readonly canSleep = false;
  poll(): boolean {
    const had = this.pending;
    this.pending = false;
    return had;
  }
  arm(): boolean {
    return false;
  }
}

const POLICY = { spinUs: 200, maxSpinUs: 1000, shortMs: 5, shortForMs: 40, longMs: 5 };
let poller: AdaptivePoller | null = null;
afterEach(() => poller?.stop());

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, what: string): Promise<void> {
  const deadline = performance.now() + 5000;
  while (!cond()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

describe('AdaptivePoller spin window', () => {
  it('doubles while work lands right after it, up to maxSpinUs, and resets after a long pause', async () => {
    const work = new Work();
    poller = new AdaptivePoller(work, POLICY);
    poller.wake();
    expect(poller.spinWindowUs).toBe(200);
    const widths: number[] = [];
    for (let i = 0; i < 4; i++) {
      // Let the window run out, then store work: the first timer poll (5 ms later) finds it.
      await until(() => poller!.phase === 'short', 'the short phase');
      work.pending = true;
      await until(() => !work.pending, 'the work to be found');
      widths.push(poller.spinWindowUs);
    }
    expect(widths).toEqual([400, 800, 1000, 1000]);
    // Idle into the long phase: back to spinUs.
    await until(() => poller!.phase === 'long', 'the long phase');
    expect(poller.spinWindowUs).toBe(200);
  });

  it('keeps its width when work comes well after the window', async () => {
    const work = new Work();
    poller = new AdaptivePoller(work, POLICY);
    poller.wake();
    await until(() => poller!.phase === 'short', 'the short phase');
    // Three timer polls later than the window: a client with a pause, not a slightly slow one.
    await sleep(POLICY.spinUs / 1000 + 3 * POLICY.shortMs);
    expect(poller.phase).toBe('short');
    work.pending = true;
    await until(() => !work.pending, 'the work to be found');
    expect(poller.spinWindowUs).toBe(200);
  });
});
