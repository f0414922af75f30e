/**
 * Allocation check of the virtio-blk hot path, in process: 4 KiB reads (indirect chains, 32 in
 * flight, one notify per batch) on a RAM disk, driven through region accesses by the test driver.
 * V8's sampling heap profiler (objects collected by minor and major GCs included) attributes every
 * allocation to the function that made it; the report gives bytes per request for the device's
 * own code (lib/virtio, lib/devices/virtio-blk), the rest of the library (the block backend, the
 * DMA mapping's view) and the test driver. Prints JSON (BENCH_JSON_OUT=FILE writes it).
 *
 *   npx vitest run --config bench/vitest.bench.config.mts bench/virtio-blk-alloc.bench-test.ts
 */
import * as fs from 'node:fs';
import { Session } from 'node:inspector/promises';
import { expect, it } from 'vitest';
import { BlkReqType } from '../lib/virtio/spec';
import { BlkRig } from '../test/devices/virtio-blk/rig';

interface ProfileNode {
  callFrame: { functionName: string; url: string; lineNumber: number };
  selfSize: number;
  children: ProfileNode[];
}

it('virtio-blk allocates nothing per request but the data view', async () => {
  const r = new BlkRig({ diskSize: 8 << 20, queueSize: 256, queues: 1 });
  try {
    await r.init();
    const q = r.queues[0]!;
    const placed = Array.from({ length: 32 }, (_, k) => r.place(0, BlkReqType.IN, k * 8, { inLen: 4096, indirect: true }));
    q.kick();
    await r.waitUsed(q, placed.length);
    const heads = placed.map((p) => p.head);
    const round = async () => {
      for (const h of heads) q.publish(h);
      q.kick();
      await r.waitUsed(q, heads.length);
    };
    for (let i = 0; i < 300; i++) await round(); // warm up (JIT, pools, array capacities)
    const session = new Session();
    session.connect();
    await session.post('HeapProfiler.startSampling', { samplingInterval: 128, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true });
    const rounds = 2000;
    for (let i = 0; i < rounds; i++) await round();
    const { profile } = (await session.post('HeapProfiler.stopSampling')) as { profile: { head: ProfileNode } };
    session.disconnect();
    const requests = rounds * heads.length;
    const sites = new Map<string, number>();
    const by = { device: 0, library: 0, other: 0 };
    const walk = (n: ProfileNode) => {
      const url = n.callFrame.url;
      const site = `${n.callFrame.functionName || '(anonymous)'} ${url.split('/').slice(-3).join('/')}:${n.callFrame.lineNumber + 1}`;
      sites.set(site, (sites.get(site) ?? 0) + n.selfSize);
      if (/\/lib\/(virtio|devices\/virtio-blk)\//.test(url)) by.device += n.selfSize;
      else if (/\/lib\//.test(url)) by.library += n.selfSize;
      else by.other += n.selfSize;
      for (const c of n.children) walk(c);
    };
    walk(profile.head);
    const perRequest = (b: number) => +(b / requests).toFixed(1);
    const report = {
      bench: 'virtio-blk-alloc',
      workload: '4 KiB IN requests, indirect chains, 32 per notify, RamBackend, in process',
      requests,
      bytesPerRequest: { device: perRequest(by.device), restOfLibrary: perRequest(by.library), driverAndRuntime: perRequest(by.other) },
      topSites: [...sites.entries()]
        .sort((a, b) => b[1] - a[1])
        .slice(0, 8)
        .map(([site, bytes]) => ({ site, bytesPerRequest: perRequest(bytes) })),
    };
    const json = JSON.stringify(report, null, 2);
    console.log(json);
    if (process.env.BENCH_JSON_OUT) fs.writeFileSync(process.env.BENCH_JSON_OUT, json + '\n');
    // The device's own code: nothing per request but sampling noise.
    expect(report.bytesPerRequest.device).toBeLessThan(16);
  } finally {
    await r.close();
  }
}, 300_000);
