/**
 * This controller's BAR0: its size and layout, the register values it chooses (CAP, VS), and the
 * register file that turns byte accesses into register reads and writes. The register offsets and
 * bit fields themselves are the specification's (lib/nvme); what a CC write sets in motion
 * is the controller's (controller.ts).
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
import { ADMIN_QUEUE_BASE_MASK_LO, AQA_WRITABLE, CC_WRITABLE, CapHi, CapLo, Cc, DOORBELL_OFFSET, Reg, version } from '../../nvme/registers';

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

/** The doorbell page's memory, as the register file reads and writes it (doorbells.ts). */
export interface DoorbellStore {
  readonly bytes: Buffer;
  read(index: number): number;
  write(index: number, value: number): void;
}

/** What register writes set in motion. */
export interface RegisterHost {
  /** CC changed from `old` to `next` (already stored). */
  ccWritten(old: number, next: number): void;
  /** INTMS or INTMC was written. */
  intmsChanged(): void;
  /** Doorbell dword `index` was written (already stored in the page). */
  doorbellWritten(index: number, value: number): void;
}

/** The controller registers below the doorbells, and byte-level access to all of BAR0. */
export class RegisterFile {
  cc = 0;
  csts = 0;
  aqa = 0;
  readonly asq = [0, 0];
  readonly acq = [0, 0];
  /** Interrupt mask (INTMS/INTMC), one bit per vector. */
  intms = 0;
  /** Memory page size (CC.MPS) in bytes, taken when the controller is enabled. */
  pageSize = 4096;

  constructor(
    readonly cap: readonly [number, number],
    private readonly page: DoorbellStore,
    private readonly host: RegisterHost,
  ) {}

  /** Registers to their power-on values (CSTS and the page size are the controller's to reset). */
  powerOn(): void {
    this.cc = 0;
    this.aqa = 0;
    this.asq[0] = this.asq[1] = 0;
    this.acq[0] = this.acq[1] = 0;
    this.intms = 0;
  }

  /** A read of `dst.length` bytes at `offset` of BAR0. */
  readBar0(offset: number, dst: Buffer): void {
    const page = this.page.bytes;
    let value = 0;
    let base = -1;
    for (let i = 0; i < dst.length; i++) {
      const at = offset + i;
      if (at >= DOORBELL_OFFSET) {
        dst[i] = page[at - DOORBELL_OFFSET]!;
        continue;
      }
      const b = at & ~3;
      if (b !== base) {
        base = b;
        value = this.read(b);
      }
      dst[i] = (value >>> ((at - b) * 8)) & 0xff;
    }
  }

  /** A write of `src` at `offset` of BAR0: each dword it touches is written whole. */
  writeBar0(offset: number, src: Buffer): void {
    let i = 0;
    while (i < src.length) {
      const at = offset + i;
      const base = at & ~3;
      const end = Math.min(src.length, i + base + 4 - at);
      if (base >= DOORBELL_OFFSET) {
        const index = (base - DOORBELL_OFFSET) >> 2;
        let v = this.page.read(index);
        for (let k = i; k < end; k++) v = setByte(v, offset + k - base, src[k]!);
        this.page.write(index, v);
        this.host.doorbellWritten(index, v >>> 0);
      } else {
        // INTMS and INTMC are write-1-to-set/clear: bytes not written count as 0.
        let v = base === Reg.INTMS || base === Reg.INTMC ? 0 : this.read(base);
        for (let k = i; k < end; k++) v = setByte(v, offset + k - base, src[k]!);
        this.write(base, v >>> 0);
      }
      i = end;
    }
  }

  private read(base: number): number {
    switch (base) {
      case Reg.CAP:
        return this.cap[0];
      case Reg.CAP + 4:
        return this.cap[1];
      case Reg.VS:
        return NVME_VERSION;
      case Reg.INTMS:
      case Reg.INTMC:
        return this.intms;
      case Reg.CC:
        return this.cc;
      case Reg.CSTS:
        return this.csts;
      case Reg.AQA:
        return this.aqa;
      case Reg.ASQ:
        return this.asq[0]!;
      case Reg.ASQ + 4:
        return this.asq[1]!;
      case Reg.ACQ:
        return this.acq[0]!;
      case Reg.ACQ + 4:
        return this.acq[1]!;
      default:
        return 0; // reserved, optional features absent (CMB, PMR, boot partitions), NSSR
    }
  }

  private write(base: number, value: number): void {
    switch (base) {
      case Reg.INTMS:
        this.intms = (this.intms | value) >>> 0;
        this.host.intmsChanged();
        return;
      case Reg.INTMC:
        this.intms = (this.intms & ~value) >>> 0;
        this.host.intmsChanged();
        return;
      case Reg.CC:
        this.writeCc(value);
        return;
      case Reg.AQA:
        this.aqa = value & AQA_WRITABLE;
        return;
      case Reg.ASQ:
        this.asq[0] = (value & ADMIN_QUEUE_BASE_MASK_LO) >>> 0;
        return;
      case Reg.ASQ + 4:
        this.asq[1] = value;
        return;
      case Reg.ACQ:
        this.acq[0] = (value & ADMIN_QUEUE_BASE_MASK_LO) >>> 0;
        return;
      case Reg.ACQ + 4:
        this.acq[1] = value;
        return;
      default:
        return; // read-only or reserved; NSSR without CAP.NSSRS does nothing
    }
  }

  private writeCc(value: number): void {
    const old = this.cc;
    let next = value & CC_WRITABLE;
    if ((old & Cc.EN) !== 0 && (next & Cc.EN) !== 0) {
      // While enabled, page size, command set and arbitration are fixed.
      const fixed = Cc.MPS_MASK | Cc.CSS_MASK | Cc.AMS_MASK;
      next = (next & ~fixed) | (old & fixed);
    }
    this.cc = next >>> 0;
    this.host.ccWritten(old, next);
  }
}

function setByte(word: number, index: number, byte: number): number {
  const shift = index * 8;
  return ((word & ~(0xff << shift)) | (byte << shift)) >>> 0;
}
