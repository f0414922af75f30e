/**
 * The controller registers as a host driver reads them (NVM Express Base 1.4, section 3.1).
 *
 * Offsets, bit fields and the doorbell formula are the specification's (lib/nvme), one
 * spelling for the controller model and the driver. What a driver needs on top lives here: decoding
 * CAP and VS of *any* controller (its doorbell stride, page sizes and timeout, not the ones our
 * model happens to choose), and the CC value that enables it.
 *
 * @packageDocumentation
 */
import { CapHi, CapLo, Cc } from '../../nvme/registers';

/** Doorbell offsets for a controller's stride (the formula is the specification's). */
export { cqHeadDoorbell, sqTailDoorbell } from '../../nvme/registers';

/** Controller Capabilities, decoded (CAP, offset 0x00). */
export interface ControllerCapabilities {
  /** Maximum Queue Entries Supported, as a count (MQES + 1): the largest queue size, 2..65536. */
  readonly maxQueueEntries: number;
  /** Contiguous Queues Required. */
  readonly contiguousQueuesRequired: boolean;
  /** Arbitration mechanisms supported beyond round robin (AMS bits). */
  readonly arbitration: number;
  /** Worst-case time for CSTS.RDY to follow CC.EN, in milliseconds (CAP.TO x 500 ms). */
  readonly timeoutMs: number;
  /** Doorbell stride in bytes (4 << CAP.DSTRD). */
  readonly doorbellStride: number;
  /** NVM Subsystem Reset supported. */
  readonly subsystemReset: boolean;
  /** Command Sets Supported (CAP.CSS bits 44:37, bit 0 = NVM command set). */
  readonly commandSets: number;
  /** Smallest and largest memory page size the controller supports, in bytes. */
  readonly minPageSize: number;
  readonly maxPageSize: number;
  /** Controller Memory Buffer and Persistent Memory Region supported. */
  readonly cmb: boolean;
  readonly pmr: boolean;
  /** The raw register, low and high dwords. */
  readonly raw: readonly [number, number];
}

/** Decodes CAP from its two dwords. */
export function decodeCap(lo: number, hi: number): ControllerCapabilities {
  const to = (lo >>> CapLo.TO_SHIFT) & 0xff;
  return Object.freeze({
    maxQueueEntries: (lo & CapLo.MQES_MASK) + 1,
    contiguousQueuesRequired: (lo & CapLo.CQR) !== 0,
    arbitration: (lo >>> 17) & 0x3,
    timeoutMs: to * 500,
    doorbellStride: 4 << ((hi >>> CapHi.DSTRD_SHIFT) & 0xf),
    subsystemReset: (hi & CapHi.NSSRS) !== 0,
    commandSets: (hi >>> 5) & 0xff,
    minPageSize: 2 ** (12 + ((hi >>> CapHi.MPSMIN_SHIFT) & 0xf)),
    maxPageSize: 2 ** (12 + ((hi >>> CapHi.MPSMAX_SHIFT) & 0xf)),
    cmb: (hi & CapHi.CMBS) !== 0,
    pmr: (hi & CapHi.PMRS) !== 0,
    raw: Object.freeze([lo >>> 0, hi >>> 0] as const),
  });
}

/** Version register (VS, offset 0x08), decoded. */
export interface ControllerVersion {
  readonly major: number;
  readonly minor: number;
  readonly tertiary: number;
}

export function decodeVersion(vs: number): ControllerVersion {
  return Object.freeze({ major: vs >>> 16, minor: (vs >>> 8) & 0xff, tertiary: vs & 0xff });
}

/** `1.4.0`-style text of a version. */
export function versionString(v: ControllerVersion): string {
  return `${String(v.major)}.${String(v.minor)}.${String(v.tertiary)}`;
}

/**
 * The CC value that enables a controller with 64-byte SQEs, 16-byte CQEs, the NVM command set,
 * round-robin arbitration and memory pages of `pageSize` bytes.
 */
export function enableValue(pageSize: number): number {
  const mps = Math.log2(pageSize) - 12;
  return (Cc.EN | (0 << Cc.CSS_SHIFT) | (mps << Cc.MPS_SHIFT) | (0 << Cc.AMS_SHIFT) | (6 << Cc.IOSQES_SHIFT) | (4 << Cc.IOCQES_SHIFT)) >>> 0;
}
