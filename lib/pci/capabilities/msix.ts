/**
 * MSI-X capability (ID 0x11, PCI 3.0 6.8.2): 12 bytes in config space that say how many vectors
 * there are and in which BAR the table and the PBA live. The table and PBA themselves, and the
 * delivery policy, are {@link MsixTable}; this capability forwards the enable and function-mask
 * bits of Message Control to it after every config write.
 *
 * @packageDocumentation
 */
import type { ConfigSpace } from '../config-space';
import { CapId } from '../ids';
import { RegisterLayout, hex } from '../layout';
import type { MsixTable } from '../msix';
import { PlacedCapability, touched, type Capability, type CapabilityWrite } from './common';

/** Register offsets inside the capability (`PCI_MSIX_*`). */
export const MsixCap = {
  /** u16: Message Control, see {@link MsixFlags}. */
  FLAGS: 0x2,
  /** u32: table offset (bits 31:3) and BIR (bits 2:0). */
  TABLE: 0x4,
  /** u32: PBA offset (bits 31:3) and BIR (bits 2:0). */
  PBA: 0x8,
  /** Size of the capability. */
  SIZEOF: 0xc,
} as const;

/** Bits of Message Control (`PCI_MSIX_FLAGS_*`). */
export const MsixFlags = {
  /** Table size minus one (read-only). */
  QSIZE: 0x07ff,
  /** Function mask: masks every vector. */
  MASKALL: 0x4000,
  /** MSI-X enable. */
  ENABLE: 0x8000,
} as const;

/** BAR indicator bits of the TABLE and PBA registers. */
export const MSIX_BIR_MASK = 0x7;

/** Where a structure lives: BAR index and offset inside it (8-byte aligned). */
export interface MsixLocation {
  bar: number;
  offset: number;
}

/** A BAR-relative byte range, for routing region accesses to {@link MsixTable}. */
export interface BarRange {
  readonly bar: number;
  readonly offset: number;
  readonly size: number;
}

/** Options of {@link MsixCapability}. */
export interface MsixCapabilityOptions {
  /** Where the table is (Table BIR and Table Offset). */
  table: MsixLocation;
  /** Where the PBA is (PBA BIR and PBA Offset). */
  pba: MsixLocation;
}

/**
 * The MSI-X capability for `msix`. Add it to the config space after declaring the BARs it points
 * into: `attached` checks that they exist, are memory BARs and are large enough.
 */
export class MsixCapability extends PlacedCapability implements Capability {
  readonly id = CapId.MSIX;
  readonly layout: RegisterLayout;
  /** The table's place in its BAR. */
  readonly tableRange: BarRange;
  /** The PBA's place in its BAR. */
  readonly pbaRange: BarRange;

  constructor(
    readonly msix: MsixTable,
    options: MsixCapabilityOptions,
  ) {
    super();
    this.tableRange = barRange('table', options.table, msix.tableSize);
    this.pbaRange = barRange('PBA', options.pba, msix.pbaSize);
    if (overlap(this.tableRange, this.pbaRange)) throw new RangeError('The MSI-X table and PBA overlap');
    this.layout = new RegisterLayout(MsixCap.SIZEOF)
      .define(MsixCap.FLAGS, 2, msix.vectors - 1, { writable: MsixFlags.ENABLE | MsixFlags.MASKALL })
      .define(MsixCap.TABLE, 4, (this.tableRange.offset | this.tableRange.bar) >>> 0)
      .define(MsixCap.PBA, 4, (this.pbaRange.offset | this.pbaRange.bar) >>> 0);
  }

  override attached(space: ConfigSpace, offset: number): void {
    for (const range of [this.tableRange, this.pbaRange]) checkFitsBar(space, range);
    super.attached(space, offset);
  }

  written(write: CapabilityWrite): void {
    if (touched(write, MsixCap.FLAGS, 2)) this.msix.setControl(this.enabled, this.functionMasked);
  }

  reset(): void {
    this.msix.reset();
  }

  /** Message Control's enable bit. */
  get enabled(): boolean {
    return (this.u16(MsixCap.FLAGS) & MsixFlags.ENABLE) !== 0;
  }

  /** Message Control's function mask bit. */
  get functionMasked(): boolean {
    return (this.u16(MsixCap.FLAGS) & MsixFlags.MASKALL) !== 0;
  }
}

function barRange(what: string, location: MsixLocation, size: number): BarRange {
  const { bar, offset } = location;
  if (!Number.isInteger(bar) || bar < 0 || bar > 5) {
    throw new RangeError(`Expected the MSI-X ${what} BAR to be from 0 to 5, got ${bar}`);
  }
  if (!Number.isInteger(offset) || offset < 0 || offset % 8 !== 0 || offset + size > 2 ** 32) {
    throw new RangeError(`Expected the MSI-X ${what} offset to be 8-byte aligned and 32-bit, got ${offset}`);
  }
  return Object.freeze({ bar, offset, size });
}

function overlap(a: BarRange, b: BarRange): boolean {
  return a.bar === b.bar && a.offset < b.offset + b.size && b.offset < a.offset + a.size;
}

function checkFitsBar(space: ConfigSpace, range: BarRange): void {
  const bar = space.bar(range.bar);
  if (bar === undefined || bar.kind !== 'memory') {
    throw new Error(`MSI-X points into BAR ${range.bar}, which is not a memory BAR; define it first`);
  }
  if (range.offset + range.size > bar.size) {
    throw new RangeError(`MSI-X range ${hex(range.offset)}+${range.size} does not fit in the ${bar.size}-byte BAR ${range.bar}`);
  }
}
