// Property: whatever a guest submits (any opcode, namespace, dwords, data pointers, bogus doorbell
// and register writes, resets in the middle), driving the controller through its region interface
// never throws, and every completion it posts carries a well-formed status with the right phase.
import * as fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { AdminOpcode, IoOpcode, Status, statusCode } from '../../../lib/nvme/constants';
import { Reg } from '../../../lib/nvme/registers';
import { PAGE, Rig, tick, type Command, type Completion } from './rig';

const DATA_SIZE = 1 << 20;
/** Every status the controller may post (SCT + SC), by value. */
const KNOWN = new Set(Object.values(Status).map(statusCode));

type Action =
  | { kind: 'admin'; cmd: Command }
  | { kind: 'io'; qid: number; cmd: Command }
  | { kind: 'doorbell'; offset: number; value: number }
  | { kind: 'register'; offset: number; value: number }
  | { kind: 'reset' }
  | { kind: 'settle' };

const u32 = fc.oneof(fc.constant(0), fc.constant(1), fc.constant(0xffffffff), fc.integer({ min: 0, max: 0xffff }), fc.nat({ max: 0xffffffff }));

/** Data pointers: mostly page-aligned in the data area; sometimes offset, outside the maps, or huge. */
const prp = fc.oneof(
  { weight: 6, arbitrary: fc.nat({ max: DATA_SIZE / PAGE - 1 }).map((page) => ({ page, off: 0 })) },
  { weight: 2, arbitrary: fc.tuple(fc.nat({ max: DATA_SIZE / PAGE - 1 }), fc.constantFrom(4, 512, 2048, 3)).map(([page, off]) => ({ page, off })) },
  { weight: 1, arbitrary: fc.constantFrom(0x7000_0000, 0, 0xffff_ffff_f000) },
);

/** Mostly plausible commands (valid opcode, flags 0, NSID 1, small LBAs and lengths), some wild. */
const command = (opcodes: readonly number[]) =>
  fc.record({
    opcode: fc.oneof({ weight: 8, arbitrary: fc.constantFrom(...opcodes) }, { weight: 1, arbitrary: fc.nat({ max: 0xff }) }),
    flags: fc.oneof({ weight: 12, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.nat({ max: 0xff }) }),
    nsid: fc.oneof({ weight: 8, arbitrary: fc.constant(1) }, { weight: 1, arbitrary: fc.constantFrom(0, 2, 0xffffffff) }, { weight: 1, arbitrary: fc.nat({ max: 0xffffffff }) }),
    prp1: prp,
    prp2: prp,
    cdw10: fc.oneof({ weight: 6, arbitrary: fc.nat({ max: 2100 }) }, { weight: 2, arbitrary: u32 }),
    cdw11: fc.oneof({ weight: 6, arbitrary: fc.constant(0) }, { weight: 2, arbitrary: u32 }),
    cdw12: fc.oneof({ weight: 6, arbitrary: fc.nat({ max: 63 }) }, { weight: 1, arbitrary: u32 }),
    cdw13: u32,
  });

const ADMIN = [
  AdminOpcode.IDENTIFY, AdminOpcode.IDENTIFY, AdminOpcode.GET_FEATURES, AdminOpcode.SET_FEATURES, AdminOpcode.GET_LOG_PAGE,
  AdminOpcode.CREATE_CQ, AdminOpcode.CREATE_SQ, AdminOpcode.DELETE_SQ, AdminOpcode.DELETE_CQ, AdminOpcode.ASYNC_EVENT,
  AdminOpcode.ABORT, AdminOpcode.DBBUF, AdminOpcode.FORMAT_NVM,
];
const IO = [IoOpcode.READ, IoOpcode.READ, IoOpcode.WRITE, IoOpcode.WRITE, IoOpcode.FLUSH, IoOpcode.COMPARE, IoOpcode.WRITE_ZEROES, IoOpcode.DSM, IoOpcode.VERIFY];

const action: fc.Arbitrary<Action> = fc.oneof(
  { weight: 4, arbitrary: command(ADMIN).map((cmd) => ({ kind: 'admin' as const, cmd: cmd as unknown as Command })) },
  { weight: 8, arbitrary: fc.tuple(fc.constantFrom(1, 2), command(IO)).map(([qid, cmd]) => ({ kind: 'io' as const, qid, cmd: cmd as unknown as Command })) },
  // Doorbells of queues the host does not track, or out-of-range values for ones it does.
  {
    weight: 1,
    arbitrary: fc.oneof(
      fc.tuple(fc.integer({ min: 6, max: 1023 }), u32).map(([i, value]) => ({ kind: 'doorbell' as const, offset: 0x1000 + i * 4, value })),
      fc.tuple(fc.integer({ min: 0, max: 5 }), fc.integer({ min: 4096, max: 0xffffffff })).map(([i, value]) => ({ kind: 'doorbell' as const, offset: 0x1000 + i * 4, value })),
    ),
  },
  {
    weight: 1,
    arbitrary: fc
      .tuple(fc.constantFrom(Reg.INTMS, Reg.INTMC, Reg.NSSR, Reg.CAP, Reg.VS, Reg.CSTS, Reg.CMBLOC, 0x100, 0xffc), u32)
      .map(([offset, value]) => ({ kind: 'register' as const, offset, value })),
  },
  { weight: 1, arbitrary: fc.constant({ kind: 'reset' as const }) },
  { weight: 2, arbitrary: fc.constant({ kind: 'settle' as const }) },
);

function checkCompletion(c: Completion, qid: number, sqSize: number): void {
  const sct = (c.status >>> 8) & 0x7;
  expect(sct, `SCT of 0x${c.status.toString(16)}`).toBeLessThanOrEqual(2);
  expect(KNOWN.has(statusCode(c.status)), `status 0x${c.status.toString(16)}`).toBe(true);
  expect(c.status & 0x3800, 'More/CRD bits').toBe(0);
  expect(c.sqhd).toBeLessThan(qid === 0 ? 32 : Math.max(sqSize, 65536));
}

describe('property: random command sequences', () => {
  it('never throw; every completion has a valid status and the expected phase', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(action, { minLength: 5, maxLength: 40 }), fc.constantFrom<'trap' | 'mmap'>('trap', 'mmap'), async (actions, doorbells) => {
        const rig = new Rig({ queues: 4, doorbells, diskSize: 1 << 20, mdts: 5, poll: { spinUs: 50, shortMs: 1, shortForMs: 5, longMs: 2 } });
        try {
          // Data first (low memory), queues above it: garbage PRP lists cannot reach the rings.
          const data = rig.alloc(DATA_SIZE);
          const toAddr = (p: { page: number; off: number } | number) => (typeof p === 'number' ? p : data + p.page * PAGE + p.off);
          const start = async () => {
            await rig.enable();
            await rig.createQueuePair(1, 16);
            await rig.createQueuePair(2, 8);
          };
          await start();
          const reapAll = () => {
            for (const [qid, q] of rig.queues) for (const c of rig.reap(qid)) checkCompletion(c, qid, q.sqSize);
          };
          for (const a of actions) {
            const ready = (rig.read32(Reg.CSTS) & 0x3) === 1;
            switch (a.kind) {
              case 'admin':
              case 'io': {
                const qid = a.kind === 'admin' ? 0 : a.qid;
                const q = rig.queues.get(qid);
                if (!ready || q === undefined) break;
                // Keep one slot free: the host never fills its SQ.
                if ((q.sqTail + 1) % q.sqSize === q.sqHead) break;
                const cmd = { ...a.cmd, prp1: toAddr(a.cmd.prp1 as never), prp2: toAddr(a.cmd.prp2 as never) };
                rig.submit(qid, cmd);
                break;
              }
              case 'doorbell':
                rig.write32(a.offset, a.value);
                break;
              case 'register':
                rig.write32(a.offset, a.value);
                break;
              case 'reset':
                await rig.disable();
                await start();
                break;
              case 'settle':
                for (let i = 0; i < 3; i++) await tick();
                break;
            }
            reapAll();
          }
          for (let i = 0; i < 5; i++) {
            await tick();
            reapAll();
          }
          // Whatever happened, a reset brings back a working controller.
          await rig.disable();
          await start();
          const id = await rig.admin({ opcode: AdminOpcode.IDENTIFY, prp1: data, cdw10: 1 });
          expect(id.status).toBe(0);
        } finally {
          await rig.close();
        }
      }),
      { numRuns: 150 },
    );
  }, 120_000);
});
