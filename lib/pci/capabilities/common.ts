/**
 * What a capability is to a config space (`ConfigSpace`): an ID, a {@link RegisterLayout}
 * (power-on bytes and write masks) and optional hooks. Builders in this folder implement it;
 * device code may too.
 *
 * The list header (ID and next pointer: bytes 0-1 of a standard capability, dword 0 of an
 * extended one) is written and kept read-only by the config space; a layout leaves it zero.
 *
 * @packageDocumentation
 */
import { getLE, type RegisterLayout, type RegisterSize } from '../layout';

/**
 * What a capability sees of the config space holding it: its registers, by config-space offset.
 * `ConfigSpace` is one; this module names only what capabilities use, so it need not import it.
 */
export interface CapabilitySpace {
  u8(offset: number): number;
  u16(offset: number): number;
  u32(offset: number): number;
  setU16(offset: number, value: number): void;
  setU32(offset: number, value: number): void;
  /** Copies bytes from `offset` into `dst`. */
  read(offset: number, dst: Uint8Array): void;
  /** Back to power-on values (a function-level or power-state reset asked for by a capability). */
  reset(): void;
}

/** A guest write that touched a capability, as passed to {@link Capability.written}. */
export interface CapabilityWrite {
  /** Config-space offset of the capability. */
  readonly base: number;
  /** First written byte, relative to the capability. */
  readonly offset: number;
  /** The written bytes that fall inside the capability: a view of the caller's data, do not keep. */
  readonly data: Uint8Array;
  /** The capability's bytes before the write (so a hook can undo or compare). */
  readonly before: Uint8Array;
}

/** A capability in the standard list (from 0x40) or, with {@link ExtendedCapability}, from 0x100. */
export interface Capability {
  /** Capability ID ({@link CapId} or {@link ExtCapId}). */
  readonly id: number;
  /** Power-on bytes and masks, including the (zero) list header. */
  readonly layout: RegisterLayout;
  /** Called once by `addCapability` with where the capability was placed. */
  attached?(space: CapabilitySpace, offset: number): void;
  /**
   * Called after a guest write changed (masked) bytes of this capability, once per write, after
   * the write is merged. Runs for every write that overlaps, even one that changed nothing.
   */
  written?(write: CapabilityWrite): void;
  /** Called after the config space's reset restored power-on bytes, to reset state kept outside. */
  reset?(): void;
}

/** A PCIe extended capability: also carries the 4-bit version of its header. */
export interface ExtendedCapability extends Capability {
  /** Capability version, bits 19:16 of the header. */
  readonly version: number;
}

/** True when the write covered any byte of `[rel, rel + size)`. */
export function touched(write: CapabilityWrite, rel: number, size: number): boolean {
  return write.offset < rel + size && rel < write.offset + write.data.length;
}

/**
 * The value the guest wrote to the register at `rel`, with bytes it did not write taken as 0.
 * For bits that are not stored (such as "initiate FLR"), which therefore cannot be read back.
 */
export function writtenValue(write: CapabilityWrite, rel: number, size: RegisterSize): number {
  let value = 0;
  for (let i = size - 1; i >= 0; i--) {
    const at = rel + i - write.offset;
    const byte = at >= 0 && at < write.data.length ? (write.data[at] ?? 0) : 0;
    value = value * 256 + byte;
  }
  return value;
}

/** The register at `rel` as it was before the write. */
export function valueBefore(write: CapabilityWrite, rel: number, size: RegisterSize): number {
  return getLE(write.before, rel, size);
}

/**
 * Base of the capability builders: remembers where the capability was placed and gives typed
 * access to its registers by offset relative to the capability.
 */
export abstract class PlacedCapability {
  private placement: { space: CapabilitySpace; offset: number } | undefined;

  attached(space: CapabilitySpace, offset: number): void {
    if (this.placement !== undefined) {
      throw new Error(`${this.constructor.name} was already added to a config space`);
    }
    this.placement = { space, offset };
  }

  /** True once added to a config space. */
  get isAttached(): boolean {
    return this.placement !== undefined;
  }

  /** Config-space offset of the capability. @throws Error if not added to a config space yet. */
  get offset(): number {
    return this.where().offset;
  }

  /** The config space holding the capability. @throws Error if not added yet. */
  protected get space(): CapabilitySpace {
    return this.where().space;
  }

  protected u8(rel: number): number {
    return this.space.u8(this.offset + rel);
  }

  protected u16(rel: number): number {
    return this.space.u16(this.offset + rel);
  }

  protected u32(rel: number): number {
    return this.space.u32(this.offset + rel);
  }

  protected setU16(rel: number, value: number): void {
    this.space.setU16(this.offset + rel, value);
  }

  protected setU32(rel: number, value: number): void {
    this.space.setU32(this.offset + rel, value);
  }

  private where(): { space: CapabilitySpace; offset: number } {
    if (this.placement === undefined) {
      throw new Error(`${this.constructor.name} has not been added to a config space`);
    }
    return this.placement;
  }
}
