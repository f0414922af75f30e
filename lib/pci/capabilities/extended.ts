/**
 * PCI Express extended capabilities (from 0x100, PCIe Base 7.6): a generic builder and the
 * Device Serial Number capability.
 *
 * The 32-bit header (ID bits 15:0, version 19:16, next 31:20) is written by
 * `ConfigSpace.addExtendedCapability`; the layouts here start with 4 zero bytes for it.
 *
 * @packageDocumentation
 */
import { ExtCapId } from '../ids';
import { RegisterLayout } from '../layout';
import { PlacedCapability, type CapabilityWrite, type ExtendedCapability } from './common';

/** Size of the extended capability header. */
export const EXT_CAP_HEADER_SIZE = 4;

/** Options of {@link GenericExtendedCapability}. */
export interface GenericExtendedOptions {
  /** Extended capability ID ({@link ExtCapId}). */
  id: number;
  /** Capability version, 0..15. */
  version: number;
  /** Registers after the header: their power-on values and masks (offsets relative to the body). */
  body: RegisterLayout;
  /** Called after a guest write touched the capability. */
  onWrite?: (write: CapabilityWrite) => void;
}

/** Any extended capability: header plus a body described by a {@link RegisterLayout}. */
export class GenericExtendedCapability extends PlacedCapability implements ExtendedCapability {
  readonly id: number;
  readonly version: number;
  readonly layout: RegisterLayout;
  private readonly onWrite: ((write: CapabilityWrite) => void) | undefined;

  constructor(options: GenericExtendedOptions) {
    super();
    this.id = options.id;
    this.version = options.version;
    this.layout = withHeader(options.body);
    this.onWrite = options.onWrite;
  }

  written(write: CapabilityWrite): void {
    this.onWrite?.(write);
  }
}

/** Offsets inside the Device Serial Number capability (`PCI_DSN_*`). */
export const DsnCap = {
  /** u32: serial number bits 31:0. */
  SERIAL_LOWER: 0x4,
  /** u32: serial number bits 63:32. */
  SERIAL_UPPER: 0x8,
  /** Size of the capability. */
  SIZEOF: 0xc,
} as const;

/** Device Serial Number (ID 0x0003, version 1): a read-only 64-bit IEEE EUI-64 serial number. */
export class DeviceSerialNumberCapability extends GenericExtendedCapability {
  constructor(readonly serialNumber: bigint) {
    if (serialNumber < 0n || serialNumber > 0xffff_ffff_ffff_ffffn) {
      throw new RangeError(`Expected a 64-bit serial number, got ${serialNumber}`);
    }
    const body = new RegisterLayout(DsnCap.SIZEOF - EXT_CAP_HEADER_SIZE)
      .define(0, 4, Number(serialNumber & 0xffff_ffffn))
      .define(4, 4, Number(serialNumber >> 32n));
    super({ id: ExtCapId.DSN, version: 1, body });
  }
}

/** `body` shifted behind a zero 4-byte header. */
function withHeader(body: RegisterLayout): RegisterLayout {
  const layout = new RegisterLayout(EXT_CAP_HEADER_SIZE + body.length);
  layout.values.set(body.values, EXT_CAP_HEADER_SIZE);
  layout.writable.set(body.writable, EXT_CAP_HEADER_SIZE);
  layout.w1c.set(body.w1c, EXT_CAP_HEADER_SIZE);
  return layout;
}
