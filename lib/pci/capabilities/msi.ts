/**
 * MSI capability (ID 0x05, PCI 3.0 6.8.1) with its delivery policy.
 *
 * All MSI state lives in config space: enable, Multiple Message Enable, address, data, and with
 * per-vector masking the Mask and Pending registers. Clients forward config writes (QEMU does,
 * and emulates on top), so here, unlike the MSI-X table, the server's copy of the mask bits is
 * the guest's and does gate delivery (`shared/design.md`, "Interrupts").
 *
 * @packageDocumentation
 */
import { CapId } from '../ids';
import { NOT_WIRED, checkVector, type DeliverFn, type TriggerResult } from '../interrupts';
import { RegisterLayout } from '../layout';
import { PlacedCapability, touched, type Capability, type CapabilityWrite } from './common';

/** Register offsets inside the capability (`PCI_MSI_*`); which apply depends on the layout. */
export const MsiCap = {
  /** u16: Message Control, see {@link MsiFlags}. */
  FLAGS: 0x02,
  /** u32: message address bits 31:2. */
  ADDRESS_LO: 0x04,
  /** u32: message address bits 63:32 (64-bit layout). */
  ADDRESS_HI: 0x08,
  /** u16: message data (32-bit layout). */
  DATA_32: 0x08,
  /** u16: message data (64-bit layout). */
  DATA_64: 0x0c,
  /** u32: mask bits (32-bit layout with per-vector masking). */
  MASK_32: 0x0c,
  /** u32: mask bits (64-bit layout with per-vector masking). */
  MASK_64: 0x10,
  /** u32: pending bits (32-bit layout with per-vector masking). */
  PENDING_32: 0x10,
  /** u32: pending bits (64-bit layout with per-vector masking). */
  PENDING_64: 0x14,
} as const;

/** Bits of Message Control (`PCI_MSI_FLAGS_*`). */
export const MsiFlags = {
  /** MSI enable. */
  ENABLE: 0x0001,
  /** Multiple Message Capable: log2 of the vectors the function asks for (read-only). */
  QMASK: 0x000e,
  /** Multiple Message Enable: log2 of the vectors software granted. */
  QSIZE: 0x0070,
  /** 64-bit address capable. */
  ADDR_64: 0x0080,
  /** Per-vector masking capable. */
  MASKBIT: 0x0100,
} as const;

/** Vector counts MSI can ask for. */
export type MsiVectorCount = 1 | 2 | 4 | 8 | 16 | 32;

/** Options of {@link MsiCapability}. */
export interface MsiOptions {
  /** Vectors the function asks for (Multiple Message Capable); default 1. */
  vectors?: MsiVectorCount;
  /** 64-bit message address; default true. */
  address64?: boolean;
  /** Per-vector masking with Mask and Pending registers; default true. */
  perVectorMasking?: boolean;
  /** Sends a vector; see {@link DeliverFn}. Default: nothing wired. */
  deliver?: DeliverFn;
}

/** The MSI capability and its delivery policy. */
export class MsiCapability extends PlacedCapability implements Capability {
  readonly id = CapId.MSI;
  readonly layout: RegisterLayout;
  /** Vectors the function asks for. */
  readonly vectors: number;
  /** 64-bit address layout. */
  readonly address64: boolean;
  /** Mask and Pending registers present. */
  readonly perVectorMasking: boolean;
  /** Sends a vector; may be replaced at any time. */
  deliver: DeliverFn;

  private readonly dataAt: number;
  private readonly maskAt: number;

  constructor(options: MsiOptions = {}) {
    super();
    this.vectors = options.vectors ?? 1;
    if (![1, 2, 4, 8, 16, 32].includes(this.vectors)) {
      throw new RangeError(`Expected MSI vectors to be 1, 2, 4, 8, 16 or 32, got ${this.vectors}`);
    }
    this.address64 = options.address64 ?? true;
    this.perVectorMasking = options.perVectorMasking ?? true;
    this.deliver = options.deliver ?? NOT_WIRED;
    this.dataAt = this.address64 ? MsiCap.DATA_64 : MsiCap.DATA_32;
    this.maskAt = this.address64 ? MsiCap.MASK_64 : MsiCap.MASK_32;
    this.layout = this.buildLayout();
  }

  written(write: CapabilityWrite): void {
    if (touched(write, MsiCap.FLAGS, 2)) this.clampMultipleMessageEnable();
    this.retryPending();
  }

  /** MSI enable bit. */
  get enabled(): boolean {
    return (this.u16(MsiCap.FLAGS) & MsiFlags.ENABLE) !== 0;
  }

  /**
   * Vectors granted by software (Multiple Message Enable), 1..{@link vectors}. Clamped here too,
   * not only by the write hook: within one config write, COMMAND listeners run before the hooks
   * (a write from COMMAND to the MSI flags that sets bus master and an oversized Multiple Message
   * Enable made `retryPending` walk past the last vector and throw).
   */
  get enabledVectors(): number {
    return Math.min(1 << ((this.u16(MsiCap.FLAGS) & MsiFlags.QSIZE) >> 4), this.vectors);
  }

  /** Message address programmed by the guest. */
  get address(): bigint {
    const high = this.address64 ? BigInt(this.u32(MsiCap.ADDRESS_HI)) : 0n;
    return (high << 32n) | BigInt(this.u32(MsiCap.ADDRESS_LO));
  }

  /** Message data of `vector`: the programmed data with its low bits replaced by the vector. */
  messageData(vector: number): number {
    checkVector(vector, this.enabledVectors);
    return (this.u16(this.dataAt) & ~(this.enabledVectors - 1)) | vector;
  }

  /** Mask bit of `vector` (always false without per-vector masking). */
  isMasked(vector: number): boolean {
    checkVector(vector, this.vectors);
    return this.perVectorMasking && (this.u32(this.maskAt) & bit(vector)) !== 0;
  }

  /** Pending bit of `vector` (always false without per-vector masking). */
  isPending(vector: number): boolean {
    checkVector(vector, this.vectors);
    return this.perVectorMasking && (this.u32(this.maskAt + 4) & bit(vector)) !== 0;
  }

  /**
   * The device raises `vector`. Not enabled (or beyond the granted vectors): `'disabled'`.
   * Masked, or refused by the {@link DeliverFn}: pending if the capability has pending bits,
   * else `'dropped'`. Allocation-free.
   * @throws RangeError if `vector` is not below {@link vectors} (a device-model bug).
   */
  trigger(vector: number): TriggerResult {
    checkVector(vector, this.vectors);
    if (!this.enabled || vector >= this.enabledVectors) return 'disabled';
    if (this.isMasked(vector) || this.deliver(vector) === false) {
      if (!this.perVectorMasking) return 'dropped';
      this.setPending(vector, true);
      return 'pending';
    }
    if (this.perVectorMasking) this.setPending(vector, false);
    return 'delivered';
  }

  /** Sends every pending, unmasked, enabled vector; those refused stay pending. */
  retryPending(): void {
    if (!this.perVectorMasking || !this.enabled) return;
    for (let vector = 0; vector < this.enabledVectors; vector++) {
      if (!this.isPending(vector) || this.isMasked(vector)) continue;
      this.setPending(vector, false);
      if (this.deliver(vector) === false) this.setPending(vector, true);
    }
  }

  /** Software must not grant more than asked for; if it does, grant the most (as QEMU does). */
  private clampMultipleMessageEnable(): void {
    const flags = this.u16(MsiCap.FLAGS);
    const capable = (flags & MsiFlags.QMASK) >> 1;
    if ((flags & MsiFlags.QSIZE) >> 4 > capable) this.setU16(MsiCap.FLAGS, (flags & ~MsiFlags.QSIZE) | (capable << 4));
  }

  private setPending(vector: number, pending: boolean): void {
    const at = this.maskAt + 4;
    const bits = this.u32(at);
    this.setU32(at, pending ? bits | bit(vector) : bits & ~bit(vector));
  }

  private buildLayout(): RegisterLayout {
    const log2 = Math.log2(this.vectors);
    const flags =
      (log2 << 1) | (this.address64 ? MsiFlags.ADDR_64 : 0) | (this.perVectorMasking ? MsiFlags.MASKBIT : 0);
    const size = (this.address64 ? MsiCap.DATA_64 : MsiCap.DATA_32) + 2 + (this.perVectorMasking ? 10 : 0);
    const layout = new RegisterLayout(size)
      .define(MsiCap.FLAGS, 2, flags, { writable: MsiFlags.ENABLE | MsiFlags.QSIZE })
      .define(MsiCap.ADDRESS_LO, 4, 0, { writable: 0xfffffffc })
      .define(this.dataAt, 2, 0, { writable: 0xffff });
    if (this.address64) layout.define(MsiCap.ADDRESS_HI, 4, 0, { writable: 0xffffffff });
    if (this.perVectorMasking) layout.define(this.maskAt, 4, 0, { writable: lowBits(this.vectors) });
    return layout;
  }
}

function bit(vector: number): number {
  return (1 << vector) >>> 0;
}

/** The low `count` bits set (count 1..32). */
function lowBits(count: number): number {
  return count === 32 ? 0xffffffff : (1 << count) - 1;
}
