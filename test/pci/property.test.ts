/**
 * Property tests that drive config space only through guest reads and writes, the way a client
 * does (in the spirit of cloud-hypervisor's fuzz targets), plus a model check of MSI-X delivery.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { MSIX_ENTRY_SIZE, MsixEntry, MsixTable, type ConfigSpace } from '../../lib/pci';
import { dump, fullDevice, walkCapabilities, walkExtended } from './fixtures';

const SIZE = 4096;

/** A write anywhere in the space, mostly short like real accesses, sometimes long. */
const inRangeWrite = fc
  .tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.uint8Array({ minLength: 1, maxLength: 64 }))
  .map(([offset, bytes]) => ({ offset, bytes: bytes.subarray(0, Math.min(bytes.length, SIZE - offset)) }));

/** Writes aimed at the interesting part: header and standard capabilities. */
const lowWrite = fc
  .tuple(fc.integer({ min: 0, max: 0xff }), fc.uint8Array({ minLength: 1, maxLength: 8 }))
  .map(([offset, bytes]) => ({ offset, bytes }));

/** Writes aimed at the extended capabilities. */
const extendedWrite = fc
  .tuple(fc.integer({ min: 0x100, max: 0x11f }), fc.uint8Array({ minLength: 1, maxLength: 8 }))
  .map(([offset, bytes]) => ({ offset, bytes }));

const anyWrite = fc.oneof(inRangeWrite, lowWrite, extendedWrite);

function identity(space: ConfigSpace): unknown {
  const bytes = dump(space);
  return {
    ids: Array.from(bytes.subarray(0x00, 0x04)),
    classAndRevision: Array.from(bytes.subarray(0x08, 0x0c)),
    headerType: bytes[0x0e],
    subsystem: Array.from(bytes.subarray(0x2c, 0x30)),
    capabilityList: bytes[0x34],
    pin: bytes[0x3d],
    chain: walkCapabilities(space),
    extended: walkExtended(space),
  };
}

describe('config space under random guest writes', () => {
  it('never throws and never changes a read-only byte (identity, class, capability chains)', () => {
    fc.assert(
      fc.property(fc.array(anyWrite, { maxLength: 60 }), (writes) => {
        const { space } = fullDevice({ countFlr: true });
        const powerOn = dump(space);
        const powerOnIdentity = identity(space);
        const { writable, w1c } = space.masks();
        for (const { offset, bytes } of writes) {
          space.write(offset, bytes);
          const now = dump(space);
          for (let i = 0; i < SIZE; i++) {
            if (writable[i] === 0 && w1c[i] === 0 && now[i] !== powerOn[i]) {
              throw new Error(`read-only byte ${i.toString(16)} changed to ${now[i]} by a write at ${offset}+${bytes.length}`);
            }
          }
        }
        expect(identity(space)).toEqual(powerOnIdentity);
      }),
      { numRuns: 300 },
    );
  });

  it('header bytes follow the mask rule exactly: ((old & ~writable) | (new & writable)) & ~(new & w1c)', () => {
    const headerWrite = fc
      .tuple(fc.integer({ min: 0, max: 0x3f }), fc.uint8Array({ minLength: 1, maxLength: 8 }))
      .map(([offset, bytes]) => ({ offset, bytes: bytes.subarray(0, Math.min(bytes.length, 0x40 - offset)) }));
    fc.assert(
      fc.property(fc.array(headerWrite, { maxLength: 40 }), fc.integer({ min: 0, max: 0xffff }), (writes, status) => {
        const { space } = fullDevice();
        space.setU16(0x06, status | 0x10); // device-raised status bits, so W1C has something to clear
        const model = dump(space);
        const { writable, w1c } = space.masks();
        for (const { offset, bytes } of writes) {
          space.write(offset, bytes);
          bytes.forEach((byte, i) => {
            const at = offset + i;
            const w = writable[at] as number;
            model[at] = (((model[at] as number) & ~w) | (byte & w)) & ~(byte & (w1c[at] as number));
          });
          expect(Array.from(dump(space).subarray(0, 0x40))).toEqual(Array.from(model.subarray(0, 0x40)));
        }
      }),
      { numRuns: 300 },
    );
  });

  it('out-of-range accesses throw RangeError and change nothing; in-range ones never touch bytes outside', () => {
    const offsets = fc.oneof(
      fc.integer({ min: -16, max: SIZE + 16 }),
      fc.integer({ min: -(2 ** 40), max: 2 ** 40 }),
      fc.constantFrom(Number.NaN, 0.5, SIZE - 0.5, Number.MAX_SAFE_INTEGER),
    );
    const { space } = fullDevice({ countFlr: true });
    fc.assert(
      fc.property(offsets, fc.integer({ min: 0, max: 80 }), fc.boolean(), (offset, length, isWrite) => {
        const before = Buffer.from(dump(space));
        const valid = Number.isInteger(offset) && offset >= 0 && offset + length <= SIZE;
        const guarded = new Uint8Array(length + 16).fill(0xa5);
        const view = guarded.subarray(8, 8 + length);
        const access = (): void => (isWrite ? space.write(offset, view) : space.read(offset, view));
        if (!valid) {
          expect(access).toThrow(RangeError);
          expect(before.equals(dump(space))).toBe(true);
        } else {
          access();
        }
        const guards = [...guarded.subarray(0, 8), ...guarded.subarray(8 + length)];
        expect(guards.every((b) => b === 0xa5)).toBe(true);
      }),
      { numRuns: 1000 },
    );
  });
});

describe('MSI-X delivery policy against a model', () => {
  type Op =
    | { kind: 'trigger'; vector: number }
    | { kind: 'control'; enabled: boolean; functionMask: boolean }
    | { kind: 'mask'; vector: number; masked: boolean }
    | { kind: 'wire'; wired: boolean };

  const VECTORS = 8;
  const vector = fc.integer({ min: 0, max: VECTORS - 1 });
  const op: fc.Arbitrary<Op> = fc.oneof(
    vector.map((v) => ({ kind: 'trigger' as const, vector: v })),
    fc.record({ kind: fc.constant('control' as const), enabled: fc.boolean(), functionMask: fc.boolean() }),
    fc.record({ kind: fc.constant('mask' as const), vector, masked: fc.boolean() }),
    fc.record({ kind: fc.constant('wire' as const), wired: fc.boolean() }),
  );

  it('delivers only deliverable vectors, and never leaves a deliverable vector pending', () => {
    fc.assert(
      fc.property(fc.boolean(), fc.array(op, { maxLength: 80 }), (honourTableMask, ops) => {
        let wired = true;
        const delivered: number[] = [];
        const table = new MsixTable({
          vectors: VECTORS,
          honourTableMask,
          deliver: (v) => {
            if (!wired) return false;
            delivered.push(v);
            return true;
          },
        });
        const gated = (v: number): boolean => table.functionMasked || (honourTableMask && table.isMasked(v));
        for (const step of ops) {
          const count = delivered.length;
          if (step.kind === 'trigger') table.trigger(step.vector);
          if (step.kind === 'control') table.setControl(step.enabled, step.functionMask);
          if (step.kind === 'mask') {
            const bytes = Uint8Array.of(step.masked ? 1 : 0, 0, 0, 0);
            table.writeTable(step.vector * MSIX_ENTRY_SIZE + MsixEntry.VECTOR_CTRL, bytes);
          }
          if (step.kind === 'wire') {
            wired = step.wired;
            table.retryPending();
          }
          for (const v of delivered.slice(count)) {
            expect(table.enabled && !gated(v)).toBe(true);
          }
          for (let v = 0; v < VECTORS; v++) {
            const stuck = table.isPending(v) && table.enabled && !gated(v) && wired;
            expect(stuck, `vector ${v} pending although deliverable`).toBe(false);
          }
        }
      }),
      { numRuns: 500 },
    );
  });
});
