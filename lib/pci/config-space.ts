/**
 * {@link ConfigSpace}: the PCI configuration space of one type-0 function, as a vfio-user server
 * serves it through REGION_READ/REGION_WRITE on region 7 (reference 4.6).
 *
 * The space is data: register values, a writable mask and a write-1-to-clear mask (the
 * cloud-hypervisor `PciConfiguration` model plus W1C), and a copy of the power-on values for
 * {@link ConfigSpace.reset}. A guest write merges byte by byte, so any offset and length works:
 * a 4-byte write across two registers, or one bulk write over several capabilities.
 *
 * BAR size probing needs no special case: a BAR's writable mask is `~(size - 1)` over its address
 * bits, so writing all-ones reads back the size mask with the read-only type bits.
 *
 * Errors: every offset is bounds-checked and an access outside the space throws `RangeError`
 * before anything changes. The server checks region bounds first and answers `EINVAL`; should a
 * RangeError still come out of here, it must turn it into `EINVAL` too, never let it escape.
 * Misuse while building (overlapping capabilities, a BAR defined twice) throws `RangeError` or
 * `Error`: those are bugs in the device model.
 *
 * @packageDocumentation
 */
import { createHash } from 'node:crypto';
import type { Capability, ExtendedCapability } from './capabilities/common';
import {
  Bar,
  CAPABILITY_AREA_START,
  CONFIG_SPACE_SIZE,
  Cfg,
  Command,
  EXPRESS_CONFIG_SPACE_SIZE,
  EXTENDED_CAPABILITY_START,
  HeaderType,
  Rom,
  STATUS_W1C_BITS,
  Status,
  barOffset,
} from './ids';
import { RegisterLayout, checkRange, getLE, hex, putLE, type RegisterMasks, type RegisterSize } from './layout';

/** Identity of the function, written into the read-only header fields. */
export interface ConfigSpaceOptions {
  /** 4096-byte PCI Express space with extended capabilities; default false (256 bytes). */
  express?: boolean;
  /** VENDOR_ID. */
  vendorId: number;
  /** DEVICE_ID. */
  deviceId: number;
  /** SUBSYSTEM_VENDOR_ID; default `vendorId`. */
  subsystemVendorId?: number;
  /** SUBSYSTEM_ID; default 0. */
  subsystemId?: number;
  /** 24-bit class code, e.g. `ClassCode.STORAGE_NVME` (0x010802). */
  classCode: number;
  /** REVISION_ID; default 0. */
  revision?: number;
  /** INTERRUPT_PIN: 0 = no INTx (default), 1..4 = INTA#..INTD#. */
  interruptPin?: number;
  /** Set HEADER_TYPE bit 7 (the device has several functions); default false. */
  multiFunction?: boolean;
}

/** Kind of address space a BAR decodes. */
export type BarKind = 'memory' | 'io';

/** Declaration of a BAR, for {@link ConfigSpace.defineBar}. */
export interface BarOptions {
  /**
   * Size in bytes: a power of two, at least 16 for memory and 4 for I/O; at most 256 for I/O
   * (PCI 3.0 6.2.5.1), 2 GiB for 32-bit memory, 2^52 for 64-bit memory.
   */
  size: number;
  /** Default `'memory'`. */
  kind?: BarKind;
  /** 64-bit memory BAR: uses this register and the next one. Default false. */
  is64?: boolean;
  /** Prefetchable memory. Default false. */
  prefetchable?: boolean;
}

/** A declared BAR. */
export interface BarInfo {
  readonly index: number;
  readonly size: number;
  readonly kind: BarKind;
  readonly is64: boolean;
  readonly prefetchable: boolean;
}

/** Called after a write or reset changed COMMAND, with the new and previous values. */
export type CommandListener = (command: number, previous: number) => void;

const MIN_MEMORY_BAR = 16;
const MIN_IO_BAR = 4;
const MAX_IO_BAR = 256;
const MAX_BAR_32 = 2 ** 31;
const MAX_BAR_64 = 2 ** 52;
const MIN_ROM = 2048;
const BAR_COUNT = 6;
const U64_MASK = 0xffff_ffff_ffff_ffffn;
/** Extended capability header: next pointer in bits 31:20. */
const EXT_NEXT_SHIFT = 20;

/** COMMAND bits writable on every function; IO and MEMORY are added with a BAR that decodes them. */
const COMMAND_ALWAYS_WRITABLE = Command.MASTER | Command.PARITY | Command.SERR | Command.INTX_DISABLE;

/** A capability and where it sits. */
interface Placement {
  readonly cap: Capability;
  readonly offset: number;
  readonly length: number;
}

/** The second register of a 64-bit BAR. */
const UPPER_HALF = 'upper-half';

/**
 * Configuration space of one PCI function. See the module documentation for the model.
 *
 * Two kinds of writers:
 * - the guest (through the client): {@link write}, which applies the masks and runs hooks;
 * - the device model: {@link setU8}/{@link setU16}/{@link setU32}, which ignore masks and hooks
 *   (to raise status bits, pending bits, ...), and the `define*`/`add*` builders, which also set
 *   power-on values.
 */
export class ConfigSpace {
  /** 256 or 4096. */
  readonly size: number;
  /** PCI Express (4096 bytes, extended capabilities allowed). */
  readonly express: boolean;

  private readonly values: Uint8Array;
  private readonly defaults: Uint8Array;
  private readonly writable: Uint8Array;
  private readonly w1c: Uint8Array;
  private readonly bars: (BarInfo | typeof UPPER_HALF | undefined)[] = new Array(BAR_COUNT).fill(undefined);
  private rom = 0;
  private readonly capabilities: Placement[] = [];
  private readonly extendedCapabilities: Placement[] = [];
  private readonly commandListeners = new Set<CommandListener>();

  constructor(options: ConfigSpaceOptions) {
    this.express = options.express ?? false;
    this.size = this.express ? EXPRESS_CONFIG_SPACE_SIZE : CONFIG_SPACE_SIZE;
    this.values = new Uint8Array(this.size);
    this.defaults = new Uint8Array(this.size);
    this.writable = new Uint8Array(this.size);
    this.w1c = new Uint8Array(this.size);
    this.install(0, headerLayout(options, this.express));
  }

  // --- guest accesses --------------------------------------------------------------------------

  /**
   * Copies `dst.length` bytes from `offset` into `dst`.
   * @throws RangeError if the range is not inside the space (the server answers EINVAL).
   */
  read(offset: number, dst: Uint8Array): void {
    checkRange('config space', offset, dst.length, this.size);
    dst.set(this.values.subarray(offset, offset + dst.length));
  }

  /**
   * A guest write: merges `src` at `offset` byte by byte through the masks, then reports a COMMAND
   * change to listeners and runs the `written` hook of every capability it overlapped.
   * @throws RangeError if the range is not inside the space; nothing is changed then.
   */
  write(offset: number, src: Uint8Array): void {
    checkRange('config space', offset, src.length, this.size);
    const commandBefore = this.command;
    const hooked = this.hookedCapabilitiesIn(offset, src.length);
    const before = hooked.map((p) => this.values.slice(p.offset, p.offset + p.length));
    for (let i = 0; i < src.length; i++) this.mergeByte(offset + i, src[i] as number);
    this.notifyCommand(commandBefore);
    hooked.forEach((p, k) => this.runWriteHook(p, offset, src, before[k] as Uint8Array));
  }

  // --- device-side register access ---------------------------------------------------------------

  /** Byte at `offset`. @throws RangeError outside the space. */
  u8(offset: number): number {
    return this.get(offset, 1);
  }

  /** Little-endian u16 at `offset` (any alignment). @throws RangeError outside the space. */
  u16(offset: number): number {
    return this.get(offset, 2);
  }

  /** Little-endian u32 at `offset` (any alignment). @throws RangeError outside the space. */
  u32(offset: number): number {
    return this.get(offset, 4);
  }

  /** Device-side store: ignores masks, runs no hooks, does not change power-on values. */
  setU8(offset: number, value: number): void {
    this.set(offset, 1, value);
  }

  /** Device-side store of a u16; see {@link setU8}. */
  setU16(offset: number, value: number): void {
    this.set(offset, 2, value);
  }

  /** Device-side store of a u32; see {@link setU8}. */
  setU32(offset: number, value: number): void {
    this.set(offset, 4, value);
  }

  /**
   * Defines a device-specific register: its power-on value (set now and by {@link reset}) and
   * masks. For registers outside the header and capabilities; builders use it internally.
   */
  defineRegister(offset: number, size: RegisterSize, value: number, masks: RegisterMasks = {}): void {
    checkRange('config space', offset, size, this.size);
    this.install(offset, new RegisterLayout(size).define(0, size, value, masks));
  }

  /** A copy of every register's current value (device state, for migration). */
  snapshot(): Uint8Array {
    return this.values.slice();
  }

  /**
   * Takes every register's value from a {@link snapshot} of a space built the same way (check
   * {@link fingerprint} first): a device-side store of the whole space, with no masks and no hooks;
   * COMMAND listeners are told if COMMAND changed. @throws RangeError for a snapshot of another size.
   */
  restore(values: Uint8Array): void {
    if (values.length !== this.size) throw new RangeError(`Expected a ${this.size}-byte config space snapshot, got ${values.length} bytes`);
    const commandBefore = this.command;
    this.values.set(values);
    this.notifyCommand(commandBefore);
  }

  /**
   * How the space is built, as a short string: size, power-on values and masks (identity, BAR
   * sizes and types, capabilities and where they are). Two spaces with the same fingerprint take
   * each other's {@link snapshot}.
   */
  fingerprint(): string {
    const h = createHash('sha256');
    h.update(String(this.size));
    h.update(this.defaults);
    h.update(this.writable);
    h.update(this.w1c);
    return h.digest('hex').slice(0, 32);
  }

  /** Copies of the writable and write-1-to-clear masks (for tests and `lspci`-like dumps). */
  masks(): { writable: Uint8Array; w1c: Uint8Array } {
    return { writable: this.writable.slice(), w1c: this.w1c.slice() };
  }

  // --- COMMAND and STATUS ------------------------------------------------------------------------

  /** The COMMAND register. */
  get command(): number {
    return this.u16(Cfg.COMMAND);
  }

  /** COMMAND.MEMORY: the function decodes its memory BARs. */
  get memoryEnabled(): boolean {
    return (this.command & Command.MEMORY) !== 0;
  }

  /** COMMAND.IO: the function decodes its I/O BARs. */
  get ioEnabled(): boolean {
    return (this.command & Command.IO) !== 0;
  }

  /** COMMAND.MASTER: the function may do DMA and send MSI/MSI-X. Refuse DMA while false. */
  get busMaster(): boolean {
    return (this.command & Command.MASTER) !== 0;
  }

  /** COMMAND.INTX_DISABLE: the function must not assert INTx. */
  get intxDisabled(): boolean {
    return (this.command & Command.INTX_DISABLE) !== 0;
  }

  /**
   * Calls `listener` whenever a guest write or {@link reset} changes COMMAND (not for device-side
   * stores). Returns a function that removes the listener.
   */
  onCommandChange(listener: CommandListener): () => void {
    this.commandListeners.add(listener);
    return () => this.commandListeners.delete(listener);
  }

  /** Sets or clears STATUS.INTERRUPT, which mirrors the function's INTx line. */
  setInterruptStatus(asserted: boolean): void {
    const status = this.u16(Cfg.STATUS);
    this.setU16(Cfg.STATUS, asserted ? status | Status.INTERRUPT : status & ~Status.INTERRUPT);
  }

  // --- BARs ----------------------------------------------------------------------------------------

  /**
   * Declares BAR `index` (0..5; a 64-bit BAR also takes `index + 1`). Absent BARs read 0 and
   * ignore writes; a declared one answers the sizing probe with `~(size - 1)` plus its type bits.
   * @throws RangeError for a bad index, size or combination; Error if the slot is taken.
   */
  defineBar(index: number, options: BarOptions): BarInfo {
    const info = barInfo(index, options);
    this.claimBarSlots(info);
    const mask = sizeMask(info.size);
    if (info.kind === 'io') {
      this.defineRegister(barOffset(index), 4, Bar.SPACE_IO, { writable: low32(mask) & Bar.IO_MASK });
      this.allowCommandBits(Command.IO);
      return info;
    }
    const type = (info.is64 ? Bar.MEM_TYPE_64 : Bar.MEM_TYPE_32) | (info.prefetchable ? Bar.MEM_PREFETCH : 0);
    this.defineRegister(barOffset(index), 4, type, { writable: low32(mask) & Bar.MEM_MASK });
    if (info.is64) this.defineRegister(barOffset(index + 1), 4, 0, { writable: Number(mask >> 32n) });
    this.allowCommandBits(Command.MEMORY);
    return info;
  }

  /**
   * Declares the expansion ROM BAR: `size` a power of two from 2 KiB to 2 GiB. Bit 0 (enable) is
   * writable. Without a ROM the register reads 0 and ignores writes.
   */
  defineRom(size: number): void {
    if (this.rom !== 0) throw new Error('The expansion ROM is already defined');
    checkPowerOfTwo('ROM', size, MIN_ROM, MAX_BAR_32);
    this.rom = size;
    const writable = (low32(sizeMask(size)) & Rom.ADDRESS_MASK) | Rom.ENABLE;
    this.defineRegister(Cfg.ROM_ADDRESS, 4, 0, { writable });
    this.allowCommandBits(Command.MEMORY);
  }

  /** The declaration of BAR `index`, or undefined if absent or the upper half of a 64-bit BAR. */
  bar(index: number): BarInfo | undefined {
    const slot = this.bars[index];
    return slot === UPPER_HALF ? undefined : slot;
  }

  /** Size of the expansion ROM, 0 if none. */
  get romSize(): number {
    return this.rom;
  }

  /**
   * Base address the guest programmed into BAR `index` (type bits stripped; both registers of a
   * 64-bit BAR). During a sizing probe this is the size mask, as on hardware.
   * @throws RangeError if BAR `index` is not declared.
   */
  barAddress(index: number): bigint {
    const info = this.bar(index);
    if (info === undefined) throw new RangeError(`BAR ${index} is not defined`);
    const low = this.u32(barOffset(index));
    if (info.kind === 'io') return BigInt((low & Bar.IO_MASK) >>> 0);
    const address = BigInt((low & Bar.MEM_MASK) >>> 0);
    return info.is64 ? (BigInt(this.u32(barOffset(index + 1))) << 32n) | address : address;
  }

  /** ROM base address programmed by the guest (bits 31:11). */
  get romAddress(): number {
    return (this.u32(Cfg.ROM_ADDRESS) & Rom.ADDRESS_MASK) >>> 0;
  }

  /** ROM enable bit (the ROM is decoded only if COMMAND.MEMORY is set too). */
  get romEnabled(): boolean {
    return (this.u32(Cfg.ROM_ADDRESS) & Rom.ENABLE) !== 0;
  }

  // --- capabilities --------------------------------------------------------------------------------

  /**
   * Places a capability in the standard list: at `at`, or after the last one (dword-aligned, from
   * 0x40). Calls `cap.attached` (which may refuse by throwing), then installs it, links it at the
   * end of the list and sets CAPABILITY_LIST and STATUS.CAP_LIST. Returns its offset.
   * @throws RangeError if it does not fit below 0x100, is misaligned or overlaps another one;
   * whatever `attached` throws. Nothing is changed then.
   */
  addCapability(cap: Capability, at?: number): number {
    const length = cap.layout.length;
    if (length < 2) throw new RangeError(`Expected a capability of at least 2 bytes, got ${length}`);
    checkId('capability', cap.id, 0xff);
    const offset = at ?? nextFree(this.capabilities, CAPABILITY_AREA_START);
    this.checkPlacement('capability', offset, length, CAPABILITY_AREA_START, CONFIG_SPACE_SIZE, this.capabilities);
    cap.attached?.(this, offset); // may refuse (throw) before anything changes
    this.install(offset, cap.layout);
    this.defineHeader(offset, 2, cap.id);
    const last = this.capabilities[this.capabilities.length - 1];
    if (last === undefined) this.defineRegister(Cfg.CAPABILITY_LIST, 1, offset);
    else this.defineHeader(last.offset + 1, 1, offset);
    const status = this.defaults16(Cfg.STATUS) | Status.CAP_LIST;
    this.defineRegister(Cfg.STATUS, 2, status, { w1c: STATUS_W1C_BITS });
    this.capabilities.push({ cap, offset, length });
    return offset;
  }

  /**
   * Places a PCIe extended capability (Express only): the first at 0x100, later ones after the
   * last (or at `at`), linked through the `next` field (bits 31:20) of the 32-bit headers.
   * Returns its offset.
   * @throws Error on a conventional space; RangeError if it does not fit or overlaps.
   */
  addExtendedCapability(cap: ExtendedCapability, at?: number): number {
    if (!this.express) throw new Error('Extended capabilities need a PCI Express config space');
    const length = cap.layout.length;
    if (length < 4) throw new RangeError(`Expected an extended capability of at least 4 bytes, got ${length}`);
    checkId('extended capability', cap.id, 0xffff);
    checkId('extended capability version', cap.version, 0xf);
    const first = this.extendedCapabilities.length === 0;
    const offset = at ?? nextFree(this.extendedCapabilities, EXTENDED_CAPABILITY_START);
    if (first && offset !== EXTENDED_CAPABILITY_START) {
      throw new RangeError(`The first extended capability must be at 0x100, not ${hex(offset)}`);
    }
    const list = this.extendedCapabilities;
    this.checkPlacement('extended capability', offset, length, EXTENDED_CAPABILITY_START, this.size, list);
    cap.attached?.(this, offset);
    this.install(offset, cap.layout);
    this.defineHeader(offset, 4, (cap.id | (cap.version << 16)) >>> 0);
    const last = list[list.length - 1];
    if (last !== undefined) {
      const header = this.defaults32(last.offset) & 0x000f_ffff;
      this.defineHeader(last.offset, 4, (header | (offset << EXT_NEXT_SHIFT)) >>> 0);
    }
    list.push({ cap, offset, length });
    return offset;
  }

  /** Offset of the first standard capability with `id`, or undefined. */
  findCapability(id: number): number | undefined {
    return this.capabilities.find((p) => p.cap.id === id)?.offset;
  }

  /** Offset of the first extended capability with `id`, or undefined. */
  findExtendedCapability(id: number): number | undefined {
    return this.extendedCapabilities.find((p) => p.cap.id === id)?.offset;
  }

  // --- reset -----------------------------------------------------------------------------------------

  /**
   * Restores power-on values, as a function-level reset does: COMMAND returns to 0 (no bus
   * mastering, no decoding), MSI and MSI-X are disabled, BARs unprogrammed. Then calls every
   * capability's `reset` hook and, last, the COMMAND listeners, so they see a consistent device.
   */
  reset(): void {
    const commandBefore = this.command;
    this.values.set(this.defaults);
    for (const p of this.capabilities) p.cap.reset?.();
    for (const p of this.extendedCapabilities) p.cap.reset?.();
    this.notifyCommand(commandBefore);
  }

  // --- internals -------------------------------------------------------------------------------------

  private get(offset: number, size: RegisterSize): number {
    checkRange('config space', offset, size, this.size);
    return getLE(this.values, offset, size);
  }

  private set(offset: number, size: RegisterSize, value: number): void {
    checkRange('config space', offset, size, this.size);
    putLE(this.values, offset, size, value);
  }

  /** `((old & ~writable) | (byte & writable)) & ~(byte & w1c)`. */
  private mergeByte(at: number, byte: number): void {
    const old = this.values[at] as number;
    const writable = this.writable[at] as number;
    const clear = (this.w1c[at] as number) & byte;
    this.values[at] = ((old & ~writable) | (byte & writable)) & ~clear;
  }

  private notifyCommand(previous: number): void {
    const command = this.command;
    if (command === previous) return;
    for (const listener of this.commandListeners) listener(command, previous);
  }

  /** Standard and extended capabilities with a `written` hook that overlap the access. */
  private hookedCapabilitiesIn(offset: number, length: number): Placement[] {
    const hit = (p: Placement): boolean =>
      p.cap.written !== undefined && p.offset < offset + length && offset < p.offset + p.length;
    return [...this.capabilities.filter(hit), ...this.extendedCapabilities.filter(hit)];
  }

  private runWriteHook(p: Placement, offset: number, src: Uint8Array, before: Uint8Array): void {
    const start = Math.max(offset, p.offset);
    const end = Math.min(offset + src.length, p.offset + p.length);
    const data = src.subarray(start - offset, end - offset);
    p.cap.written?.({ base: p.offset, offset: start - p.offset, data, before });
  }

  /** Copies a layout in as values, power-on values and masks. */
  private install(offset: number, layout: RegisterLayout): void {
    this.values.set(layout.values, offset);
    this.defaults.set(layout.values, offset);
    this.writable.set(layout.writable, offset);
    this.w1c.set(layout.w1c, offset);
  }

  /** Writes a read-only capability header field (value and power-on value, masks cleared). */
  private defineHeader(offset: number, size: RegisterSize, value: number): void {
    this.defineRegister(offset, size, value);
  }

  private defaults16(offset: number): number {
    return getLE(this.defaults, offset, 2);
  }

  private defaults32(offset: number): number {
    return getLE(this.defaults, offset, 4);
  }

  private allowCommandBits(bits: number): void {
    putLE(this.writable, Cfg.COMMAND, 2, getLE(this.writable, Cfg.COMMAND, 2) | bits);
  }

  private claimBarSlots(info: BarInfo): void {
    const taken = (i: number): boolean => this.bars[i] !== undefined;
    if (taken(info.index)) throw new Error(`BAR ${info.index} is already defined`);
    if (info.is64 && taken(info.index + 1)) {
      throw new Error(`BAR ${info.index + 1} is already defined; a 64-bit BAR ${info.index} needs it`);
    }
    this.bars[info.index] = info;
    if (info.is64) this.bars[info.index + 1] = UPPER_HALF;
  }

  private checkPlacement(
    what: string,
    offset: number,
    length: number,
    start: number,
    end: number,
    list: readonly Placement[],
  ): void {
    if (!Number.isInteger(offset) || offset % 4 !== 0 || offset < start || offset + length > end) {
      throw new RangeError(`No room for a ${length}-byte ${what} at ${hex(offset)}: it must be dword-aligned within ${hex(start)}..${hex(end)}`);
    }
    const clash = list.find((p) => p.offset < offset + length && offset < p.offset + p.length);
    if (clash !== undefined) {
      throw new RangeError(`A ${what} at ${hex(offset)} would overlap the one at ${hex(clash.offset)}`);
    }
  }
}

/** The type-0 header's power-on values and masks. */
function headerLayout(options: ConfigSpaceOptions, express: boolean): RegisterLayout {
  const pin = options.interruptPin ?? 0;
  checkId('vendorId', options.vendorId, 0xffff);
  checkId('deviceId', options.deviceId, 0xffff);
  checkId('subsystemVendorId', options.subsystemVendorId ?? 0, 0xffff);
  checkId('subsystemId', options.subsystemId ?? 0, 0xffff);
  checkId('classCode', options.classCode, 0xffffff);
  checkId('revision', options.revision ?? 0, 0xff);
  checkId('interruptPin', pin, 4);
  const headerType = HeaderType.NORMAL | (options.multiFunction === true ? HeaderType.MULTI_FUNCTION : 0);
  return new RegisterLayout(CAPABILITY_AREA_START)
    .define(Cfg.VENDOR_ID, 2, options.vendorId)
    .define(Cfg.DEVICE_ID, 2, options.deviceId)
    .define(Cfg.COMMAND, 2, 0, { writable: COMMAND_ALWAYS_WRITABLE })
    .define(Cfg.STATUS, 2, 0, { w1c: STATUS_W1C_BITS })
    .define(Cfg.REVISION_ID, 4, ((options.classCode << 8) | (options.revision ?? 0)) >>> 0)
    .define(Cfg.CACHE_LINE_SIZE, 1, 0, { writable: 0xff })
    .define(Cfg.LATENCY_TIMER, 1, 0, { writable: express ? 0 : 0xff })
    .define(Cfg.HEADER_TYPE, 1, headerType)
    .define(Cfg.SUBSYSTEM_VENDOR_ID, 2, options.subsystemVendorId ?? options.vendorId)
    .define(Cfg.SUBSYSTEM_ID, 2, options.subsystemId ?? 0)
    .define(Cfg.INTERRUPT_LINE, 1, 0, { writable: 0xff })
    .define(Cfg.INTERRUPT_PIN, 1, pin);
}

function barInfo(index: number, options: BarOptions): BarInfo {
  if (!Number.isInteger(index) || index < 0 || index >= BAR_COUNT) {
    throw new RangeError(`Expected a BAR index from 0 to 5, got ${index}`);
  }
  const kind = options.kind ?? 'memory';
  const is64 = options.is64 ?? false;
  const prefetchable = options.prefetchable ?? false;
  if (kind === 'io' && (is64 || prefetchable)) {
    throw new RangeError(`I/O BAR ${index} cannot be 64-bit or prefetchable`);
  }
  if (is64 && index === BAR_COUNT - 1) throw new RangeError('BAR 5 cannot be 64-bit: there is no BAR 6');
  if (kind === 'io') checkPowerOfTwo(`I/O BAR ${index}`, options.size, MIN_IO_BAR, MAX_IO_BAR);
  else checkPowerOfTwo(`BAR ${index}`, options.size, MIN_MEMORY_BAR, is64 ? MAX_BAR_64 : MAX_BAR_32);
  return Object.freeze({ index, size: options.size, kind, is64, prefetchable });
}

function checkPowerOfTwo(what: string, size: number, min: number, max: number): void {
  const isPowerOfTwo = Number.isSafeInteger(size) && size > 0 && Number.isInteger(Math.log2(size));
  if (!isPowerOfTwo || size < min || size > max) {
    throw new RangeError(`Expected ${what} size to be a power of two from ${min} to ${max}, got ${size}`);
  }
}

function checkId(what: string, value: number, max: number): void {
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new RangeError(`Expected ${what} to be an integer from 0 to ${hex(max)}, got ${value}`);
  }
}

/** `~(size - 1)` over 64 bits: the address bits a BAR of `size` bytes implements. */
function sizeMask(size: number): bigint {
  return ~(BigInt(size) - 1n) & U64_MASK;
}

function low32(mask: bigint): number {
  return Number(mask & 0xffff_ffffn);
}

/** First dword-aligned offset after every placed capability, or `start`. */
function nextFree(list: readonly Placement[], start: number): number {
  const end = list.reduce((max, p) => Math.max(max, p.offset + p.length), start);
  return (end + 3) & ~3;
}
