// Fuzz the transport and the split rings through their real interfaces: random descriptors
// (addresses inside and outside the maps, every flag combination, indirect tables of random
// sizes), random available-ring entries and indexes, notifies, random common-configuration
// writes and resets. The device must never throw, never leave an element in flight, and only ever
// return heads that exist; a broken ring ends in DEVICE_NEEDS_RESET, never in a crash.
import * as fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { PciRegion } from '../../lib/protocol/constants';
import { DeviceStatus } from '../../lib/virtio/spec';
import { EchoDevice } from './echo';
import { VirtioRig, tick } from './rig';

const SIZE = 8;
const MEMORY = 1 << 20;

type Action =
  | { kind: 'desc'; queue: number; index: number; addr: number; len: number; flags: number; next: number }
  | { kind: 'table'; queue: number; index: number; entries: number; seed: number }
  | { kind: 'publish'; queue: number; head: number }
  | { kind: 'idx'; queue: number; delta: number }
  | { kind: 'kick'; queue: number }
  | { kind: 'common'; offset: number; size: 1 | 2 | 4; value: number }
  | { kind: 'reset' };

const addr = fc.oneof(
  { weight: 6, arbitrary: fc.integer({ min: 0x8000, max: MEMORY - 64 }) },
  { weight: 1, arbitrary: fc.constantFrom(0, MEMORY - 1, MEMORY, 0x7000_0000, 2 ** 53 - 16) },
);
const action: fc.Arbitrary<Action> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('desc' as const), queue: fc.constantFrom(0, 1), index: fc.nat({ max: SIZE - 1 }), addr, len: fc.oneof(fc.nat({ max: 64 }), fc.constantFrom(0, 0xffffffff, 16 * 9)), flags: fc.nat({ max: 7 }), next: fc.oneof(fc.nat({ max: SIZE }), fc.nat({ max: 0xffff })) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('table' as const), queue: fc.constantFrom(0, 1), index: fc.nat({ max: SIZE - 1 }), entries: fc.integer({ min: 1, max: 12 }), seed: fc.nat() }) },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('publish' as const), queue: fc.constantFrom(0, 1), head: fc.oneof(fc.nat({ max: SIZE - 1 }), fc.nat({ max: 0xffff })) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('idx' as const), queue: fc.constantFrom(0, 1), delta: fc.integer({ min: -3, max: 20 }) }) },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('kick' as const), queue: fc.constantFrom(0, 1, 5) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('common' as const), offset: fc.nat({ max: 0x3f }), size: fc.constantFrom(1 as const, 2 as const, 4 as const), value: fc.nat({ max: 0xffffffff }) }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'reset' as const }) },
);

describe('virtio transport fuzz', () => {
  it('random rings and registers never crash the device', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(action, { minLength: 1, maxLength: 40 }), fc.boolean(), async (actions, mmap) => {
        const r = new VirtioRig(new EchoDevice({ queueSize: SIZE, notify: mmap ? 'mmap' : 'trap', poll: { spinUs: 0, shortMs: 1, longMs: 1 } }), { memory: MEMORY });
        try {
          await r.init();
          for (const a of actions) {
            const q = 'queue' in a ? r.queues[a.queue] : undefined;
            switch (a.kind) {
              case 'desc':
                q?.writeDesc(a.index, a.addr, a.len, a.flags, a.next & 0xffff);
                break;
              case 'table': {
                if (!q) break;
                const table = 0x9000 + a.index * 0x100;
                let x = a.seed | 1;
                for (let i = 0; i < a.entries; i++) {
                  x = (x * 1103515245 + 12345) >>> 0;
                  q.writeDesc(i, 0x8000 + (x % 0x1000), x % 32, (x >>> 8) & 7, (x >>> 12) % (a.entries + 1), table);
                }
                q.writeDesc(a.index, table, a.entries * 16, 4, 0);
                break;
              }
              case 'publish':
                q?.publish(a.head);
                break;
              case 'idx':
                q?.setAvailIdx(q.availIdx + a.delta);
                break;
              case 'kick':
                if (q) q.kick();
                else r.barWrite(r.layout.notify + a.queue * 4, Buffer.from([a.queue, 0]));
                break;
              case 'common': {
                const b = Buffer.alloc(a.size);
                b.writeUIntLE(a.value % 2 ** (8 * a.size), 0, a.size);
                expect(() => r.device.regions[PciRegion.BAR4]!.write!(r.layout.common + a.offset, b)).not.toThrow();
                break;
              }
              case 'reset':
                await r.init();
                break;
            }
            await tick();
            for (const dq of r.queues) for (const u of dq.reap()) expect(u.id).toBeLessThan(SIZE);
          }
          for (let i = 0; i < 5; i++) await tick();
          expect(r.device.inFlight).toBe(0);
          // A device that needs a reset does not process anything.
          if ((r.status & DeviceStatus.DEVICE_NEEDS_RESET) !== 0) expect(r.device.running).toBe(false);
        } finally {
          await r.close();
        }
      }),
      { numRuns: 300 },
    );
  }, 120_000);
});
