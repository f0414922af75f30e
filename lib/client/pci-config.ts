/**
 * Decoders of a PCI config-space snapshot, for clients (reference §4.6): the type-0 header
 * ({@link parseConfigHeader}), the standard and extended capability lists
 * ({@link walkCapabilities}, {@link walkExtendedCapabilities}) and the MSI-X capability
 * ({@link parseMsixCapability}). Pure functions of the bytes; `PciFunction` (pci.ts) reads the
 * bytes and uses them.
 *
 * Walks are bounded (at most 48 standard and 960 extended capabilities, pointers checked, loops
 * stopped), since config space comes from the server.
 *
 * @packageDocumentation
 */
import { CAPABILITY_AREA_START, Cfg, EXPRESS_CONFIG_SPACE_SIZE, EXTENDED_CAPABILITY_START, Status } from '../pci/ids';

/** The type-0 header fields a driver looks at. */
export interface PciHeader {
  readonly vendorId: number;
  readonly deviceId: number;
  readonly command: number;
  readonly status: number;
  readonly revisionId: number;
  /** 24-bit class code: base class << 16 | sub-class << 8 | programming interface. */
  readonly classCode: number;
  readonly headerType: number;
  readonly subsystemVendorId: number;
  readonly subsystemId: number;
  readonly interruptLine: number;
  /** 0 = no INTx, 1..4 = INTA#..INTD#. */
  readonly interruptPin: number;
  /** STATUS.CAP_LIST: a capability list starts at {@link PciHeader.capabilitiesPointer}. */
  readonly hasCapabilities: boolean;
  readonly capabilitiesPointer: number;
}

/** A capability of the standard list. */
export interface PciCapability {
  /** Capability ID ({@link CapId}). */
  readonly id: number;
  /** Offset of its header in config space. */
  readonly offset: number;
}

/** A PCI Express extended capability (from 0x100). */
export interface PciExtendedCapability {
  /** Extended capability ID ({@link ExtCapId}). */
  readonly id: number;
  readonly version: number;
  readonly offset: number;
}

/** The MSI-X capability, decoded (PCI 3.0 §6.8.2). */
export interface MsixInfo {
  /** Offset of the capability in config space. */
  readonly capOffset: number;
  /** Number of vectors (table size). */
  readonly tableSize: number;
  /** BAR (region index) holding the table. */
  readonly tableBar: number;
  /** Offset of the table in that BAR. */
  readonly tableOffset: number;
  /** BAR holding the pending-bit array. */
  readonly pbaBar: number;
  /** Offset of the PBA in that BAR. */
  readonly pbaOffset: number;
  /** Message Control: MSI-X enable. */
  readonly enabled: boolean;
  /** Message Control: function mask. */
  readonly functionMasked: boolean;
}

/** Register offsets inside the MSI-X capability (`PCI_MSIX_*`). */
export const MsixRegs = {
  /** u16 Message Control. */
  FLAGS: 0x2,
  /** u32 table offset | BIR. */
  TABLE: 0x4,
  /** u32 PBA offset | BIR. */
  PBA: 0x8,
  /** Bits of Message Control. */
  QSIZE: 0x07ff,
  MASKALL: 0x4000,
  ENABLE: 0x8000,
  BIR_MASK: 0x7,
  /** Size of one table entry; fields at 0 (address low), 4 (high), 8 (data), 12 (vector control). */
  ENTRY_SIZE: 16,
  VECTOR_CTRL: 12,
  ENTRY_MASKED: 0x1,
} as const;

const MAX_CAPS = 48;
const MAX_EXT_CAPS = (EXPRESS_CONFIG_SPACE_SIZE - EXTENDED_CAPABILITY_START) / 4;

function u16(b: Uint8Array, at: number): number {
  return (b[at] ?? 0) | ((b[at + 1] ?? 0) << 8);
}

function u32(b: Uint8Array, at: number): number {
  return ((b[at] ?? 0) | ((b[at + 1] ?? 0) << 8) | ((b[at + 2] ?? 0) << 16) | ((b[at + 3] ?? 0) << 24)) >>> 0;
}

/** Decodes the type-0 header of a config-space snapshot (at least 64 bytes). */
export function parseConfigHeader(config: Uint8Array): PciHeader {
  if (config.length < CAPABILITY_AREA_START) throw new RangeError(`Expected at least 64 bytes of config space, got ${String(config.length)}`);
  const status = u16(config, Cfg.STATUS);
  return Object.freeze({
    vendorId: u16(config, Cfg.VENDOR_ID),
    deviceId: u16(config, Cfg.DEVICE_ID),
    command: u16(config, Cfg.COMMAND),
    status,
    revisionId: config[Cfg.REVISION_ID]!,
    classCode: (config[Cfg.CLASS_DEVICE + 1]! << 16) | (config[Cfg.CLASS_DEVICE]! << 8) | config[Cfg.CLASS_PROG]!,
    headerType: config[Cfg.HEADER_TYPE]!,
    subsystemVendorId: u16(config, Cfg.SUBSYSTEM_VENDOR_ID),
    subsystemId: u16(config, Cfg.SUBSYSTEM_ID),
    interruptLine: config[Cfg.INTERRUPT_LINE]!,
    interruptPin: config[Cfg.INTERRUPT_PIN]!,
    hasCapabilities: (status & Status.CAP_LIST) !== 0,
    capabilitiesPointer: config[Cfg.CAPABILITY_LIST]! & ~0x3,
  });
}

/**
 * The standard capability list, in list order. Empty unless STATUS.CAP_LIST is set. Stops at a
 * pointer outside `[0x40, 0xff]`, at a capability seen before (a loop) or after 48 entries.
 */
export function walkCapabilities(config: Uint8Array): PciCapability[] {
  const header = parseConfigHeader(config);
  const out: PciCapability[] = [];
  if (!header.hasCapabilities) return out;
  const seen = new Set<number>();
  let at = header.capabilitiesPointer;
  while (at >= CAPABILITY_AREA_START && at + 2 <= Math.min(config.length, 256) && !seen.has(at) && out.length < MAX_CAPS) {
    seen.add(at);
    out.push(Object.freeze({ id: config[at]!, offset: at }));
    at = config[at + 1]! & ~0x3;
  }
  return out;
}

/**
 * The extended capability list from 0x100, for a 4 KiB (PCI Express) config space; empty for a
 * 256-byte one or when the first header is 0 or all-ones. Loop- and bounds-safe.
 */
export function walkExtendedCapabilities(config: Uint8Array): PciExtendedCapability[] {
  const out: PciExtendedCapability[] = [];
  if (config.length < EXPRESS_CONFIG_SPACE_SIZE) return out;
  const seen = new Set<number>();
  let at: number = EXTENDED_CAPABILITY_START;
  while (at >= EXTENDED_CAPABILITY_START && at + 4 <= config.length && !seen.has(at) && out.length < MAX_EXT_CAPS) {
    const h = u32(config, at);
    if (h === 0 || h === 0xffffffff) break;
    seen.add(at);
    out.push(Object.freeze({ id: h & 0xffff, version: (h >>> 16) & 0xf, offset: at }));
    at = (h >>> 20) & ~0x3;
    if (at === 0) break;
  }
  return out;
}

/** Decodes the MSI-X capability at `capOffset` of a config snapshot. */
export function parseMsixCapability(config: Uint8Array, capOffset: number): MsixInfo {
  if (capOffset + 12 > config.length) throw new RangeError(`MSI-X capability at 0x${capOffset.toString(16)} does not fit config space`);
  const flags = u16(config, capOffset + MsixRegs.FLAGS);
  const table = u32(config, capOffset + MsixRegs.TABLE);
  const pba = u32(config, capOffset + MsixRegs.PBA);
  return Object.freeze({
    capOffset,
    tableSize: (flags & MsixRegs.QSIZE) + 1,
    tableBar: table & MsixRegs.BIR_MASK,
    tableOffset: (table & ~MsixRegs.BIR_MASK) >>> 0,
    pbaBar: pba & MsixRegs.BIR_MASK,
    pbaOffset: (pba & ~MsixRegs.BIR_MASK) >>> 0,
    enabled: (flags & MsixRegs.ENABLE) !== 0,
    functionMasked: (flags & MsixRegs.MASKALL) !== 0,
  });
}
