/**
 * {@link MsixTable}: the MSI-X table and Pending Bit Array (PBA) that live in a BAR, and the
 * delivery policy of PCI 3.0 6.8.2: a masked vector sets its pending bit instead of firing and
 * fires when unmasked.
 *
 * Who controls what, with a real client (`shared/peers.md` 2, reference 4.6 and 6.6):
 * - The MSI-X enable and function-mask bits are in config space; clients forward config writes,
 *   so the capability ({@link MsixCapability}) pushes them here with {@link MsixTable.setControl}.
 * - The table: QEMU's `vfio-user-pci` (like kernel VFIO) emulates it itself. Guest writes to the
 *   table never reach the server and it never sends SET_IRQS MASK/UNMASK for MSI-X; it registers
 *   an eventfd for a vector when the guest unmasks it there. Our copy of the per-vector mask bits
 *   then stays "masked" forever and must not gate delivery: the server sets
 *   `honourTableMask = false` for such clients. A client that programs the table through
 *   REGION_WRITE (ours, acting as a driver) keeps the default `true`.
 *
 * Why a flag and not a `deliverable(vector)` predicate: which copy of the mask is authoritative is
 * a property of the client, fixed per connection, not of each vector; and whether a vector has an
 * eventfd right now is answered by the {@link DeliverFn}'s return value at the moment of sending,
 * so there is no second, possibly stale, source of truth. A vector that could not be sent is kept
 * pending and goes out on {@link MsixTable.retryPending}.
 *
 * Accesses of any size and alignment inside the table or PBA are accepted (the spec only defines
 * dword and qword ones); outside them they throw RangeError, which the server turns into EINVAL.
 *
 * @packageDocumentation
 */
import { NOT_WIRED, checkVector, type DeliverFn, type TriggerResult } from './interrupts';
import { checkRange, getLE } from './layout';

/** Bytes per table entry. */
export const MSIX_ENTRY_SIZE = 16;
/** Most vectors an MSI-X capability can describe (11-bit table size). */
export const MSIX_MAX_VECTORS = 2048;

/** Offsets inside one table entry (`PCI_MSIX_ENTRY_*`). */
export const MsixEntry = {
  /** u32: message address bits 31:2 (bits 1:0 read 0). */
  LOWER_ADDR: 0x0,
  /** u32: message address bits 63:32. */
  UPPER_ADDR: 0x4,
  /** u32: message data. */
  DATA: 0x8,
  /** u32: vector control; bit 0 masks the vector. */
  VECTOR_CTRL: 0xc,
} as const;

/** Vector control bit 0: the vector is masked (set at reset). */
export const MSIX_ENTRY_CTRL_MASKBIT = 0x1;

/** Writable bits of one entry, byte by byte. */
const ENTRY_WRITABLE = Uint8Array.of(
  0xfc, 0xff, 0xff, 0xff, // address low: dword aligned
  0xff, 0xff, 0xff, 0xff, // address high
  0xff, 0xff, 0xff, 0xff, // data
  MSIX_ENTRY_CTRL_MASKBIT, 0, 0, 0, // vector control: only the mask bit
);

/** Options of {@link MsixTable}. */
export interface MsixTableOptions {
  /** Number of vectors, 1..2048. */
  vectors: number;
  /** Sends a vector; see {@link DeliverFn}. Default: nothing wired, vectors stay pending. */
  deliver?: DeliverFn;
  /** Whether the table's per-vector mask bits gate delivery; default true. See the module docs. */
  honourTableMask?: boolean;
}

/** MSI-X table, PBA and delivery policy of one function. */
export class MsixTable {
  /** Number of vectors. */
  readonly vectors: number;
  /** Size of the table in bytes (16 per vector). */
  readonly tableSize: number;
  /** Size of the PBA in bytes (whole qwords). */
  readonly pbaSize: number;
  /** Sends a vector; may be replaced at any time (e.g. when a client connects). */
  deliver: DeliverFn;

  private readonly table: Uint8Array;
  private readonly pba: Uint8Array;
  private tableMaskHonoured: boolean;
  private enableBit = false;
  private functionMaskBit = false;

  constructor(options: MsixTableOptions) {
    const { vectors } = options;
    if (!Number.isInteger(vectors) || vectors < 1 || vectors > MSIX_MAX_VECTORS) {
      throw new RangeError(`Expected MSI-X vectors from 1 to ${MSIX_MAX_VECTORS}, got ${vectors}`);
    }
    this.vectors = vectors;
    this.tableSize = vectors * MSIX_ENTRY_SIZE;
    this.pbaSize = Math.ceil(vectors / 64) * 8;
    this.table = new Uint8Array(this.tableSize);
    this.pba = new Uint8Array(this.pbaSize);
    this.deliver = options.deliver ?? NOT_WIRED;
    this.tableMaskHonoured = options.honourTableMask ?? true;
    this.reset();
  }

  /** MSI-X enable, as last pushed from config space. */
  get enabled(): boolean {
    return this.enableBit;
  }

  /** Function mask, as last pushed from config space: masks every vector. */
  get functionMasked(): boolean {
    return this.functionMaskBit;
  }

  /** Whether per-vector mask bits in the table gate delivery. Changing it retries pending vectors. */
  get honourTableMask(): boolean {
    return this.tableMaskHonoured;
  }

  set honourTableMask(honour: boolean) {
    this.tableMaskHonoured = honour;
    this.retryPending();
  }

  /**
   * Takes the enable and function-mask bits of the capability's Message Control (called by
   * {@link MsixCapability} after each config write). Sends pending vectors that became deliverable.
   */
  setControl(enabled: boolean, functionMasked: boolean): void {
    this.enableBit = enabled;
    this.functionMaskBit = functionMasked;
    this.retryPending();
  }

  /** Reads table bytes at `offset` (relative to the table). @throws RangeError outside the table. */
  readTable(offset: number, dst: Uint8Array): void {
    checkRange('MSI-X table', offset, dst.length, this.tableSize);
    dst.set(this.table.subarray(offset, offset + dst.length));
  }

  /**
   * Writes table bytes through the entry masks; a vector whose mask bit this clears fires if
   * pending. @throws RangeError outside the table, changing nothing.
   */
  writeTable(offset: number, src: Uint8Array): void {
    checkRange('MSI-X table', offset, src.length, this.tableSize);
    const first = Math.floor(offset / MSIX_ENTRY_SIZE);
    const last = Math.floor((offset + src.length - 1) / MSIX_ENTRY_SIZE);
    const wasMasked = this.maskedVectorsIn(first, last);
    for (let i = 0; i < src.length; i++) {
      const at = offset + i;
      const writable = ENTRY_WRITABLE[at % MSIX_ENTRY_SIZE] as number;
      this.table[at] = ((this.table[at] as number) & ~writable) | ((src[i] as number) & writable);
    }
    for (const vector of wasMasked) if (!this.isMasked(vector)) this.retry(vector);
  }

  /** Reads PBA bytes at `offset` (relative to the PBA). @throws RangeError outside the PBA. */
  readPba(offset: number, dst: Uint8Array): void {
    checkRange('MSI-X PBA', offset, dst.length, this.pbaSize);
    dst.set(this.pba.subarray(offset, offset + dst.length));
  }

  /** The PBA is read-only (writes are undefined by the spec and ignored). @throws RangeError outside. */
  writePba(offset: number, src: Uint8Array): void {
    checkRange('MSI-X PBA', offset, src.length, this.pbaSize);
  }

  /**
   * The device raises `vector`: sent if MSI-X is enabled and the vector unmasked (per the policy)
   * and the {@link DeliverFn} accepts it; otherwise pending. Allocation-free.
   * @throws RangeError if `vector` is not a vector of this table (a device-model bug).
   */
  trigger(vector: number): TriggerResult {
    checkVector(vector, this.vectors);
    if (!this.enableBit) return 'disabled';
    if (this.gated(vector) || this.deliver(vector) === false) {
      this.setPending(vector, true);
      return 'pending';
    }
    this.setPending(vector, false);
    return 'delivered';
  }

  /**
   * Sends every pending vector that is deliverable now, clearing its pending bit; those the
   * {@link DeliverFn} refuses stay pending. The server calls this after registering eventfds.
   */
  retryPending(): void {
    if (!this.enableBit || this.functionMaskBit) return;
    for (let byte = 0; byte < this.pbaSize; byte++) {
      if (this.pba[byte] === 0) continue;
      for (let bit = 0; bit < 8; bit++) this.retry(byte * 8 + bit);
    }
  }

  /** Per-vector mask bit in the table. */
  isMasked(vector: number): boolean {
    checkVector(vector, this.vectors);
    return ((this.table[vector * MSIX_ENTRY_SIZE + MsixEntry.VECTOR_CTRL] as number) & MSIX_ENTRY_CTRL_MASKBIT) !== 0;
  }

  /** Pending bit in the PBA. */
  isPending(vector: number): boolean {
    checkVector(vector, this.vectors);
    return ((this.pba[vector >> 3] as number) & (1 << (vector & 7))) !== 0;
  }

  /** Message address programmed for `vector` (our own client's use; QEMU keeps its own). */
  address(vector: number): bigint {
    checkVector(vector, this.vectors);
    const base = vector * MSIX_ENTRY_SIZE;
    const high = BigInt(getLE(this.table, base + MsixEntry.UPPER_ADDR, 4));
    return (high << 32n) | BigInt(getLE(this.table, base + MsixEntry.LOWER_ADDR, 4));
  }

  /** Message data programmed for `vector`. */
  data(vector: number): number {
    checkVector(vector, this.vectors);
    return getLE(this.table, vector * MSIX_ENTRY_SIZE + MsixEntry.DATA, 4);
  }

  /** Copies of the table and the PBA (device state, for migration). */
  snapshot(): { table: Uint8Array; pba: Uint8Array } {
    return { table: this.table.slice(), pba: this.pba.slice() };
  }

  /**
   * Takes a table and PBA from a {@link snapshot} of a table of the same size. Enable and function
   * mask come from config space ({@link setControl}). @throws RangeError for other sizes.
   */
  restore(table: Uint8Array, pba: Uint8Array): void {
    if (table.length !== this.tableSize || pba.length !== this.pbaSize) {
      throw new RangeError(`Expected an MSI-X snapshot of ${this.tableSize} + ${this.pbaSize} bytes, got ${table.length} + ${pba.length}`);
    }
    this.table.set(table);
    this.pba.set(pba);
  }

  /** Power-on state: every vector masked, addresses and data 0, nothing pending, disabled. */
  reset(): void {
    this.table.fill(0);
    for (let v = 0; v < this.vectors; v++) {
      this.table[v * MSIX_ENTRY_SIZE + MsixEntry.VECTOR_CTRL] = MSIX_ENTRY_CTRL_MASKBIT;
    }
    this.pba.fill(0);
    this.enableBit = false;
    this.functionMaskBit = false;
  }

  /** Whether the policy holds `vector` back (function mask, or its own mask when honoured). */
  private gated(vector: number): boolean {
    return this.functionMaskBit || (this.tableMaskHonoured && this.isMasked(vector));
  }

  private retry(vector: number): void {
    if (vector >= this.vectors || !this.isPending(vector)) return;
    if (!this.enableBit || this.gated(vector)) return;
    this.setPending(vector, false);
    if (this.deliver(vector) === false) this.setPending(vector, true);
  }

  private setPending(vector: number, pending: boolean): void {
    const bit = 1 << (vector & 7);
    const byte = this.pba[vector >> 3] as number;
    this.pba[vector >> 3] = pending ? byte | bit : byte & ~bit;
  }

  private maskedVectorsIn(first: number, last: number): number[] {
    const masked: number[] = [];
    for (let v = first; v <= last; v++) if (this.isMasked(v)) masked.push(v);
    return masked;
  }
}
