import { describe, expect, it } from 'vitest';
import {
  ClassCode,
  ConfigSpace,
  MSIX_ENTRY_SIZE,
  MsixCap,
  MsixCapability,
  MsixEntry,
  MsixFlags,
  MsixTable,
} from '../../lib/pci';
import { fullDevice, recorder, writeReg } from './fixtures';

function le32(value: number): Uint8Array {
  return Uint8Array.of(value & 0xff, (value >>> 8) & 0xff, (value >>> 16) & 0xff, value >>> 24);
}

function ctrl(vector: number): number {
  return vector * MSIX_ENTRY_SIZE + MsixEntry.VECTOR_CTRL;
}

function unmask(table: MsixTable, vector: number): void {
  table.writeTable(ctrl(vector), le32(0));
}

function mask(table: MsixTable, vector: number): void {
  table.writeTable(ctrl(vector), le32(1));
}

function pba(table: MsixTable): number[] {
  const bytes = new Uint8Array(table.pbaSize);
  table.readPba(0, bytes);
  return Array.from(bytes);
}

function enabledTable(vectors = 16, honourTableMask = true): { table: MsixTable; delivered: number[] } {
  const { deliver, delivered } = recorder();
  const table = new MsixTable({ vectors, deliver, honourTableMask });
  table.setControl(true, false);
  return { table, delivered };
}

describe('MSI-X table registers', () => {
  it('powers on with every vector masked, zero address/data, nothing pending, disabled', () => {
    const table = new MsixTable({ vectors: 3 });
    const bytes = new Uint8Array(table.tableSize);
    table.readTable(0, bytes);
    const expected = new Uint8Array(48);
    for (let v = 0; v < 3; v++) expected[ctrl(v)] = 1;
    expect(bytes).toEqual(expected);
    expect(pba(table)).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    expect(table.enabled).toBe(false);
  });

  it('stores address and data, keeps address bits 1:0 and reserved control bits zero', () => {
    const table = new MsixTable({ vectors: 4 });
    table.writeTable(2 * MSIX_ENTRY_SIZE, new Uint8Array(16).fill(0xff));
    const entry = new Uint8Array(16);
    table.readTable(2 * MSIX_ENTRY_SIZE, entry);
    expect(Array.from(entry)).toEqual([0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]);
    table.writeTable(3 * MSIX_ENTRY_SIZE, Uint8Array.of(0x00, 0x10, 0xe0, 0xfe, 0, 0, 0, 0, 0x41, 0, 0, 0));
    expect(table.address(3)).toBe(0xfee0_1000n);
    expect(table.data(3)).toBe(0x41);
    expect(table.address(2)).toBe(0xffff_ffff_ffff_fffcn);
  });

  it('accepts odd sizes at odd offsets within the table', () => {
    const table = new MsixTable({ vectors: 2 });
    table.writeTable(9, Uint8Array.of(0xaa, 0xbb, 0xcc, 0x00, 0x00)); // data bytes 1..3, then ctrl bytes 0..1
    expect(table.data(0)).toBe(0xccbbaa00);
    expect(table.isMasked(0)).toBe(false);
  });

  it('PBA is read-only and sized in qwords', () => {
    const table = new MsixTable({ vectors: 70 });
    expect(table.pbaSize).toBe(16);
    table.writePba(0, new Uint8Array(16).fill(0xff));
    expect(pba(table)).toEqual(new Array(16).fill(0));
  });

  it('accesses outside the table or PBA throw RangeError and change nothing', () => {
    const table = new MsixTable({ vectors: 2 });
    expect(() => table.readTable(30, new Uint8Array(4))).toThrow(RangeError);
    expect(() => table.writeTable(-1, new Uint8Array(1))).toThrow(RangeError);
    expect(() => table.writeTable(28, new Uint8Array(8))).toThrow(RangeError);
    expect(table.isMasked(1)).toBe(true);
    expect(() => table.readPba(8, new Uint8Array(1))).toThrow(RangeError);
    expect(() => table.writePba(4, new Uint8Array(8))).toThrow(RangeError);
  });

  it('refuses bad vector counts and vectors', () => {
    expect(() => new MsixTable({ vectors: 0 })).toThrow(RangeError);
    expect(() => new MsixTable({ vectors: 2049 })).toThrow(RangeError);
    const table = new MsixTable({ vectors: 4 });
    expect(() => table.trigger(4)).toThrow(RangeError);
    expect(() => table.trigger(-1)).toThrow(RangeError);
    expect(() => table.trigger(1.5)).toThrow(RangeError);
  });
});

describe('MSI-X delivery, honouring the table mask (a client that programs the table)', () => {
  it('does nothing while MSI-X is disabled', () => {
    const { deliver, delivered } = recorder();
    const table = new MsixTable({ vectors: 4, deliver });
    unmask(table, 1);
    expect(table.trigger(1)).toBe('disabled');
    expect(table.isPending(1)).toBe(false);
    expect(delivered).toEqual([]);
  });

  it('delivers an unmasked vector at once', () => {
    const { table, delivered } = enabledTable();
    unmask(table, 5);
    expect(table.trigger(5)).toBe('delivered');
    expect(delivered).toEqual([5]);
    expect(table.isPending(5)).toBe(false);
  });

  it('a masked vector becomes pending and is delivered, once, when unmasked', () => {
    const { table, delivered } = enabledTable();
    expect(table.trigger(9)).toBe('pending');
    expect(table.trigger(9)).toBe('pending');
    expect(pba(table)).toEqual([0, 0x02, 0, 0, 0, 0, 0, 0]);
    expect(delivered).toEqual([]);
    unmask(table, 9);
    expect(delivered).toEqual([9]);
    expect(table.isPending(9)).toBe(false);
    unmask(table, 9); // already unmasked: nothing more
    expect(delivered).toEqual([9]);
  });

  it('masking again after delivery makes the next trigger pending', () => {
    const { table, delivered } = enabledTable();
    unmask(table, 0);
    table.trigger(0);
    mask(table, 0);
    expect(table.trigger(0)).toBe('pending');
    expect(delivered).toEqual([0]);
  });

  it('the function mask holds every vector; clearing it delivers the pending ones', () => {
    const { table, delivered } = enabledTable();
    unmask(table, 1);
    unmask(table, 2);
    table.setControl(true, true);
    expect(table.trigger(1)).toBe('pending');
    expect(table.trigger(2)).toBe('pending');
    expect(table.trigger(3)).toBe('pending'); // also masked per-vector
    table.setControl(true, false);
    expect(delivered).toEqual([1, 2]);
    expect(table.isPending(3)).toBe(true);
  });

  it('a vector the deliver function refuses (no eventfd) stays pending until retryPending', () => {
    let wired = false;
    const { deliver, delivered } = recorder(() => wired);
    const table = new MsixTable({ vectors: 4, deliver });
    table.setControl(true, false);
    unmask(table, 2);
    expect(table.trigger(2)).toBe('pending');
    table.retryPending();
    expect(table.isPending(2)).toBe(true);
    wired = true;
    table.retryPending();
    expect(delivered).toEqual([2]);
    expect(table.isPending(2)).toBe(false);
  });

  it('retryPending delivers nothing while disabled', () => {
    const { table, delivered } = enabledTable();
    table.trigger(4);
    table.setControl(false, false);
    unmask(table, 4);
    table.retryPending();
    expect(delivered).toEqual([]);
    table.setControl(true, false);
    expect(delivered).toEqual([4]);
  });

  it('pending bits of vectors beyond 64 land in the second PBA qword', () => {
    const { table } = enabledTable(70);
    table.trigger(65);
    expect(pba(table)[8]).toBe(0x02);
  });

  it('reset masks every vector and clears pending, enable and function mask', () => {
    const { table } = enabledTable();
    unmask(table, 0);
    table.setControl(true, true);
    table.trigger(0);
    table.reset();
    expect([table.enabled, table.functionMasked, table.isMasked(0), table.isPending(0)]).toEqual([false, false, true, false]);
  });
});

describe('MSI-X delivery when the client emulates the table (QEMU vfio-user-pci)', () => {
  it('delivers vectors whose server-side mask bit is still set', () => {
    const { table, delivered } = enabledTable(16, false);
    expect(table.isMasked(7)).toBe(true);
    expect(table.trigger(7)).toBe('delivered');
    expect(delivered).toEqual([7]);
  });

  it('still honours enable and the function mask, which come through config space', () => {
    const { table, delivered } = enabledTable(16, false);
    table.setControl(true, true);
    expect(table.trigger(3)).toBe('pending');
    table.setControl(false, false);
    expect(table.trigger(3)).toBe('disabled');
    table.setControl(true, false);
    expect(delivered).toEqual([3]);
  });

  it('switching the mode delivers vectors held back by the table mask', () => {
    const { table, delivered } = enabledTable(16, true);
    table.trigger(11);
    expect(delivered).toEqual([]);
    table.honourTableMask = false;
    expect(delivered).toEqual([11]);
  });

  it('a vector without an eventfd yet is pending and goes out once one is registered', () => {
    const wired = new Set<number>();
    const { deliver, delivered } = recorder((v) => wired.has(v));
    const table = new MsixTable({ vectors: 4, deliver, honourTableMask: false });
    table.setControl(true, false);
    expect(table.trigger(1)).toBe('pending');
    wired.add(1); // SET_IRQS index 2, start 1, count 1, EVENTFD|TRIGGER
    table.retryPending();
    expect(delivered).toEqual([1]);
  });
});

describe('MSI-X capability in config space', () => {
  it('config writes to Message Control drive enable and function mask; reset disables', () => {
    const { space, table } = fullDevice();
    const { deliver, delivered } = recorder();
    table.deliver = deliver;
    table.honourTableMask = false;
    const control = 0x60 + MsixCap.FLAGS;
    writeReg(space, control, 2, MsixFlags.ENABLE | MsixFlags.MASKALL); // Linux: enable with all masked
    expect([table.enabled, table.functionMasked]).toEqual([true, true]);
    expect(table.trigger(0)).toBe('pending');
    writeReg(space, control + 1, 1, MsixFlags.ENABLE >> 8); // clear the function mask with a byte write
    expect(delivered).toEqual([0]);
    expect(table.trigger(1)).toBe('delivered');
    space.reset();
    expect(table.enabled).toBe(false);
    expect(table.trigger(1)).toBe('disabled');
  });

  function spaceWithBars(): ConfigSpace {
    const space = new ConfigSpace({ vendorId: 1, deviceId: 2, classCode: ClassCode.OTHER });
    space.defineBar(0, { size: 4096 });
    space.defineBar(1, { size: 16, kind: 'io' });
    return space;
  }

  it('checks that the table and PBA fit memory BARs that exist', () => {
    const table = new MsixTable({ vectors: 8 });
    const at = (bar: number, offset: number) => ({ bar, offset });
    expect(() => spaceWithBars().addCapability(new MsixCapability(table, { table: at(2, 0), pba: at(0, 0x800) }))).toThrow(/BAR 2/);
    expect(() => spaceWithBars().addCapability(new MsixCapability(table, { table: at(1, 0), pba: at(0, 0x800) }))).toThrow(/BAR 1/);
    expect(() => spaceWithBars().addCapability(new MsixCapability(table, { table: at(0, 0xfc0), pba: at(0, 0x800) }))).toThrow(RangeError);
    expect(() => new MsixCapability(table, { table: at(0, 0), pba: at(0, 0x40) })).toThrow(/overlap/);
    expect(() => new MsixCapability(table, { table: at(0, 4), pba: at(0, 0x800) })).toThrow(RangeError);
    expect(() => new MsixCapability(table, { table: at(6, 0), pba: at(0, 0x800) })).toThrow(RangeError);
    const space = spaceWithBars();
    expect(() => space.addCapability(new MsixCapability(table, { table: at(2, 0), pba: at(0, 0x800) }))).toThrow();
    expect(space.u8(0x34)).toBe(0); // the refused capability left no trace
    const cap = new MsixCapability(table, { table: at(0, 0xf80), pba: at(0, 0x800) });
    space.addCapability(cap);
    expect(cap.offset).toBe(0x40);
    expect(space.u32(cap.offset + MsixCap.TABLE)).toBe(0xf80);
    expect(space.u32(cap.offset + MsixCap.PBA)).toBe(0x800);
  });
});
