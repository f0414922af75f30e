/**
 * PCI Express capability (ID 0x10), version 2, for an endpoint (PCIe Base 7.5.3). Advertises
 * Function Level Reset by default: writing 1 to Device Control bit 15 ("Initiate FLR", never
 * stored, always reads 0) calls the reset hook.
 *
 * The link registers describe a plausible x4 8 GT/s (gen3) link without ASPM, so that drivers and
 * `lspci` see nothing odd; nothing here models a link. A root-complex integrated endpoint has no
 * link, and its link registers read 0.
 *
 * @packageDocumentation
 */
import { CapId } from '../ids';
import { RegisterLayout } from '../layout';
import { PlacedCapability, touched, writtenValue, type Capability, type CapabilityWrite } from './common';

/** Register offsets inside the capability (`PCI_EXP_*`). */
export const ExpCap = {
  /** u16: capability version, device/port type, interrupt message number. */
  FLAGS: 0x02,
  /** u32: Device Capabilities. */
  DEVCAP: 0x04,
  /** u16: Device Control. */
  DEVCTL: 0x08,
  /** u16: Device Status. */
  DEVSTA: 0x0a,
  /** u32: Link Capabilities. */
  LNKCAP: 0x0c,
  /** u16: Link Control. */
  LNKCTL: 0x10,
  /** u16: Link Status. */
  LNKSTA: 0x12,
  /** u32: Slot Capabilities (ports only; 0). */
  SLTCAP: 0x14,
  /** u16: Slot Control (ports only; 0). */
  SLTCTL: 0x18,
  /** u16: Slot Status (ports only; 0). */
  SLTSTA: 0x1a,
  /** u16: Root Control (root ports only; 0). */
  RTCTL: 0x1c,
  /** u16: Root Capabilities (root ports only; 0). */
  RTCAP: 0x1e,
  /** u32: Root Status (root ports only; 0). */
  RTSTA: 0x20,
  /** u32: Device Capabilities 2. */
  DEVCAP2: 0x24,
  /** u16: Device Control 2. */
  DEVCTL2: 0x28,
  /** u16: Device Status 2 (reserved; 0). */
  DEVSTA2: 0x2a,
  /** u32: Link Capabilities 2. */
  LNKCAP2: 0x2c,
  /** u16: Link Control 2. */
  LNKCTL2: 0x30,
  /** u16: Link Status 2. */
  LNKSTA2: 0x32,
  /** u32: Slot Capabilities 2 (0). */
  SLTCAP2: 0x34,
  /** u16: Slot Control 2 (0). */
  SLTCTL2: 0x38,
  /** u16: Slot Status 2 (0). */
  SLTSTA2: 0x3a,
  /** Size of a version 2 capability. */
  SIZEOF: 0x3c,
} as const;

/** Fields of FLAGS (`PCI_EXP_FLAGS_*`). */
export const ExpFlags = {
  /** Capability version. */
  VERS: 0x000f,
  /** Device/port type, see {@link ExpType}. */
  TYPE: 0x00f0,
  /** Interrupt message number. */
  IRQ: 0x3e00,
} as const;

/** Device/port types (`PCI_EXP_TYPE_*`), shifted into FLAGS bits 7:4. */
export const ExpType = {
  /** PCI Express endpoint. */
  ENDPOINT: 0x0,
  /** Legacy endpoint. */
  LEG_END: 0x1,
  /** Root complex integrated endpoint. */
  RC_END: 0x9,
} as const;

/** Bits of Device Capabilities (`PCI_EXP_DEVCAP_*`). */
export const DevCap = {
  /** Max_Payload_Size supported: 128 << value bytes. */
  PAYLOAD: 0x00000007,
  /** 8-bit tag field supported. */
  EXT_TAG: 0x00000020,
  /** Role-based error reporting; required since PCIe 1.1. */
  RBER: 0x00008000,
  /** Function Level Reset capable. */
  FLR: 0x10000000,
} as const;

/** Bits of Device Control (`PCI_EXP_DEVCTL_*`). */
export const DevCtl = {
  /** Correctable error reporting enable. */
  CERE: 0x0001,
  /** Non-fatal error reporting enable. */
  NFERE: 0x0002,
  /** Fatal error reporting enable. */
  FERE: 0x0004,
  /** Unsupported request reporting enable. */
  URRE: 0x0008,
  /** Relaxed ordering enable (set at reset). */
  RELAX_EN: 0x0010,
  /** Max_Payload_Size: 128 << value bytes. */
  PAYLOAD: 0x00e0,
  /** Extended (8-bit) tag enable. */
  EXT_TAG: 0x0100,
  /** Phantom functions enable (not supported). */
  PHANTOM: 0x0200,
  /** Aux power PM enable (not supported). */
  AUX_PME: 0x0400,
  /** No snoop enable (set at reset). */
  NOSNOOP_EN: 0x0800,
  /** Max_Read_Request_Size: 128 << value bytes. */
  READRQ: 0x7000,
  /** Initiate Function Level Reset; reads 0. */
  BCR_FLR: 0x8000,
} as const;

/** Device Control at reset: relaxed ordering and no snoop enabled, 128-byte payload, 512-byte reads. */
export const DEFAULT_DEVCTL = DevCtl.RELAX_EN | DevCtl.NOSNOOP_EN | (2 << 12);

/** Bits of Device Status (`PCI_EXP_DEVSTA_*`); the error bits are write-1-to-clear. */
export const DevSta = {
  /** Correctable error detected. */
  CED: 0x0001,
  /** Non-fatal error detected. */
  NFED: 0x0002,
  /** Fatal error detected. */
  FED: 0x0004,
  /** Unsupported request detected. */
  URD: 0x0008,
  /** Transactions pending. */
  TRPND: 0x0020,
} as const;

/** Link speed encodings (Current/Max Link Speed, Target Link Speed). */
export const LinkSpeed = {
  GT_2_5: 1,
  GT_5: 2,
  GT_8: 3,
  GT_16: 4,
  GT_32: 5,
} as const;

/** Bits of Link Control (`PCI_EXP_LNKCTL_*`) an endpoint implements. */
export const LnkCtl = {
  /** ASPM control. */
  ASPMC: 0x0003,
  /** Read completion boundary. */
  RCB: 0x0008,
  /** Common clock configuration. */
  CCC: 0x0040,
  /** Extended synch. */
  ES: 0x0080,
} as const;

/** Link Status bit 12: the slot uses the platform's reference clock. */
export const LNKSTA_SLOT_CLOCK = 0x1000;
/** Device Capabilities 2 bit 4 / Device Control 2 bit 4: completion timeout disable. */
export const COMPLETION_TIMEOUT_DISABLE = 0x0010;
/** Link Control 2 bits 3:0: target link speed. */
export const LNKCTL2_TARGET_SPEED = 0x000f;

/** Error reporting enables, relaxed ordering, payload size, ext tags, no snoop, read request size. */
const DEVCTL_WRITABLE =
  DevCtl.CERE |
  DevCtl.NFERE |
  DevCtl.FERE |
  DevCtl.URRE |
  DevCtl.RELAX_EN |
  DevCtl.PAYLOAD |
  DevCtl.EXT_TAG |
  DevCtl.NOSNOOP_EN |
  DevCtl.READRQ;

/** Options of {@link PcieCapability}. */
export interface PcieOptions {
  /** `'endpoint'` (default) or `'rc-integrated'` (root complex integrated endpoint, no link). */
  type?: 'endpoint' | 'rc-integrated';
  /** Advertise Function Level Reset; default true. */
  flr?: boolean;
  /** Largest payload supported, 128..4096 bytes; default 256. */
  maxPayloadSupported?: 128 | 256 | 512 | 1024 | 2048 | 4096;
  /** Link speed, a {@link LinkSpeed} value; default 8 GT/s. */
  linkSpeed?: number;
  /** Link width in lanes; default 4. */
  linkWidth?: 1 | 2 | 4 | 8 | 12 | 16 | 32;
  /** The FLR itself; default: reset the config space (`space.reset()`). */
  onFunctionLevelReset?: () => void;
}

/** The PCI Express capability of an endpoint. */
export class PcieCapability extends PlacedCapability implements Capability {
  readonly id = CapId.EXP;
  readonly layout: RegisterLayout;
  /** Function Level Reset advertised. */
  readonly flr: boolean;
  private readonly onFunctionLevelReset: (() => void) | undefined;

  constructor(options: PcieOptions = {}) {
    super();
    this.flr = options.flr ?? true;
    this.onFunctionLevelReset = options.onFunctionLevelReset;
    const type = options.type === 'rc-integrated' ? ExpType.RC_END : ExpType.ENDPOINT;
    const payload = Math.log2(options.maxPayloadSupported ?? 256) - 7;
    if (!Number.isInteger(payload) || payload < 0 || payload > 5) {
      throw new RangeError(`Expected maxPayloadSupported from 128 to 4096, got ${options.maxPayloadSupported}`);
    }
    this.layout = new RegisterLayout(ExpCap.SIZEOF)
      .define(ExpCap.FLAGS, 2, 2 | (type << 4))
      .define(ExpCap.DEVCAP, 4, (payload | DevCap.EXT_TAG | DevCap.RBER | (this.flr ? DevCap.FLR : 0)) >>> 0)
      .define(ExpCap.DEVCTL, 2, DEFAULT_DEVCTL, { writable: DEVCTL_WRITABLE })
      .define(ExpCap.DEVSTA, 2, 0, { w1c: DevSta.CED | DevSta.NFED | DevSta.FED | DevSta.URD })
      .define(ExpCap.DEVCAP2, 4, COMPLETION_TIMEOUT_DISABLE)
      .define(ExpCap.DEVCTL2, 2, 0, { writable: COMPLETION_TIMEOUT_DISABLE });
    if (type === ExpType.ENDPOINT) defineLink(this.layout, options.linkSpeed ?? LinkSpeed.GT_8, options.linkWidth ?? 4);
  }

  written(write: CapabilityWrite): void {
    const initiateFlr = touched(write, ExpCap.DEVCTL, 2) && (writtenValue(write, ExpCap.DEVCTL, 2) & DevCtl.BCR_FLR) !== 0;
    if (initiateFlr && this.flr) this.functionLevelReset();
  }

  /** Max_Payload_Size programmed in Device Control, in bytes. */
  get maxPayloadSize(): number {
    return 128 << ((this.u16(ExpCap.DEVCTL) & DevCtl.PAYLOAD) >> 5);
  }

  /** Max_Read_Request_Size programmed in Device Control, in bytes. */
  get maxReadRequestSize(): number {
    return 128 << ((this.u16(ExpCap.DEVCTL) & DevCtl.READRQ) >> 12);
  }

  private functionLevelReset(): void {
    if (this.onFunctionLevelReset !== undefined) this.onFunctionLevelReset();
    else this.space.reset();
  }
}

function defineLink(layout: RegisterLayout, speed: number, width: number): void {
  if (!Number.isInteger(speed) || speed < LinkSpeed.GT_2_5 || speed > LinkSpeed.GT_32) {
    throw new RangeError(`Expected linkSpeed from 1 to 5, got ${speed}`);
  }
  if (![1, 2, 4, 8, 12, 16, 32].includes(width)) throw new RangeError(`Expected a link width of 1 to 32 lanes, got ${width}`);
  const speedAndWidth = speed | (width << 4);
  const supportedSpeeds = ((1 << (speed + 1)) - 2) & 0xfe; // every speed up to the maximum
  layout
    .define(ExpCap.LNKCAP, 4, speedAndWidth)
    .define(ExpCap.LNKCTL, 2, 0, { writable: LnkCtl.ASPMC | LnkCtl.RCB | LnkCtl.CCC | LnkCtl.ES })
    .define(ExpCap.LNKSTA, 2, speedAndWidth | LNKSTA_SLOT_CLOCK)
    .define(ExpCap.LNKCAP2, 4, supportedSpeeds)
    .define(ExpCap.LNKCTL2, 2, speed, { writable: LNKCTL2_TARGET_SPEED });
}
