/**
 * Vendor-specific capability (ID 0x09, PCI 3.0 appendix H): arbitrary bytes after a 3-byte
 * header whose third byte is the capability's length.
 *
 * @packageDocumentation
 */
import { CapId } from '../ids';
import { RegisterLayout } from '../layout';
import { PlacedCapability, type Capability, type CapabilityWrite } from './common';

/** Offset of the length byte. */
export const VNDR_LENGTH = 0x2;
/** Bytes before the vendor data (ID, next, length). */
export const VNDR_HEADER_SIZE = 3;

/** Options of {@link VendorCapability}. */
export interface VendorOptions {
  /** Per-byte writable mask of the data (same length); default all read-only. */
  writable?: Uint8Array;
  /** Called after a guest write touched the capability. */
  onWrite?: (write: CapabilityWrite) => void;
}

/** A vendor-specific capability carrying `data` (at most 252 bytes, so the length fits a byte). */
export class VendorCapability extends PlacedCapability implements Capability {
  readonly id = CapId.VNDR;
  readonly layout: RegisterLayout;
  private readonly onWrite: ((write: CapabilityWrite) => void) | undefined;

  constructor(data: Uint8Array, options: VendorOptions = {}) {
    super();
    const length = VNDR_HEADER_SIZE + data.length;
    if (length > 0xff) throw new RangeError(`Expected at most 252 bytes of vendor data, got ${data.length}`);
    this.layout = new RegisterLayout(length)
      .define(VNDR_LENGTH, 1, length)
      .defineBytes(VNDR_HEADER_SIZE, data, options.writable);
    this.onWrite = options.onWrite;
  }

  written(write: CapabilityWrite): void {
    this.onWrite?.(write);
  }

  /** Reads the vendor data (current values) into `dst`, from `offset` within the data. */
  readData(offset: number, dst: Uint8Array): void {
    this.space.read(this.offset + VNDR_HEADER_SIZE + offset, dst);
  }
}
