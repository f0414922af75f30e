/**
 * This controller's BAR0: its size and layout, and the register values it chooses (CAP, VS).
 * The register offsets and bit fields themselves are the specification's (lib/nvme/spec).
 *
 * BAR0 layout (8 KiB, 64-bit memory BAR):
 *
 * | offset          | what                                                            |
 * |-----------------|-----------------------------------------------------------------|
 * | 0x0000 - 0x0fff | controller registers (CAP ... CMBSTS, PMR*), always trapped     |
 * | 0x1000 - 0x1fff | doorbells: SQyTDBL, CQyHDBL for y = 0..64 (DSTRD = 0: 4 bytes)  |
 *
 * The doorbell page can be offered to the client as a sparse mmap area (see `doorbells.ts`); the
 * MSI-X table and PBA live in BAR4, so nothing else shares the doorbell page.
 *
 * 64-bit registers (CAP, ASQ, ACQ, ...) are handled as two dwords: drivers access them with two
 * 32-bit accesses or one 64-bit access, and the client forwards either.
 *
 * @packageDocumentation
 */
import { CapHi, CapLo, DOORBELL_OFFSET, version } from '../../nvme/spec/registers';

/** Size of BAR0: the register page plus one page of doorbells. */
export const BAR0_SIZE = 0x2000;
/** Size of the doorbell page (room for 1024 doorbells at stride 4, i.e. 512 queue pairs). */
export const DOORBELL_PAGE_SIZE = BAR0_SIZE - DOORBELL_OFFSET;

/** Doorbell stride exponent: doorbells are `4 << DSTRD` bytes apart. */
export const DSTRD = 0;

/** VS reported by this controller: NVMe 1.4.0. */
export const NVME_VERSION = version(1, 4, 0);

/** Memory page size the controller supports: 4 KiB (MPSMIN) up to 64 KiB (MPSMAX). */
export const MPSMIN = 0;
export const MPSMAX = 4;

/** Parameters of CAP that the controller chooses. */
export interface CapParams {
  /** Largest queue size, in entries (MQES + 1), 2..65536. */
  maxQueueEntries: number;
  /** Timeout for CSTS.RDY transitions in milliseconds (rounded up to 500 ms units, max 127.5 s). */
  timeoutMs: number;
}

/** CAP as two dwords: [bits 31:0, bits 63:32]. */
export function capValue(p: CapParams): [number, number] {
  const to = Math.min(255, Math.max(1, Math.ceil(p.timeoutMs / 500)));
  const lo = ((p.maxQueueEntries - 1) & CapLo.MQES_MASK) | CapLo.CQR | (to << CapLo.TO_SHIFT);
  const hi = (DSTRD << CapHi.DSTRD_SHIFT) | CapHi.CSS_NVM | (MPSMIN << CapHi.MPSMIN_SHIFT) | (MPSMAX << CapHi.MPSMAX_SHIFT);
  return [lo >>> 0, hi >>> 0];
}
