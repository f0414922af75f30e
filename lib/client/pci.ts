/**
 * PCI helpers for a {@link VfioUserClient}: what a driver does with config space (reference §4.6).
 *
 * Pure decoders ({@link parseConfigHeader}, {@link walkCapabilities},
 * {@link walkExtendedCapabilities}, {@link parseMsixCapability}) read a config-space snapshot;
 * {@link PciFunction} adds the accesses: BAR sizing by probing (write all-ones, read back,
 * restore, with memory and I/O decoding off meanwhile, as Linux does), command-register updates
 * (memory space, bus mastering), and MSI-X: the enable and function-mask bits in the capability,
 * table entries programmed with `REGION_WRITE` to the BAR that holds the table, and PBA reads.
 *
 * Walks are bounded (at most 48 standard and 960 extended capabilities, pointers checked, loops
 * stopped), since config space comes from the server.
 *
 * @packageDocumentation
 */
import { debuglog } from 'node:util';
import { Bar, CAPABILITY_AREA_START, CapId, Cfg, Command as PciCommand, EXPRESS_CONFIG_SPACE_SIZE, EXTENDED_CAPABILITY_START, Rom, Status, barOffset } from '../pci/ids';
import { PciRegion } from '../protocol/constants';
import type { VfioUserClient, WriteOptions } from './client';

const debug = debuglog('vfio-user:client');

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

/** A BAR as found by probing (or as left by {@link PciFunction.assignBars}). */
export interface BarInfo {
  /** BAR index 0-5 (the lower register of a 64-bit BAR). */
  readonly index: number;
  readonly kind: 'memory' | 'io';
  /** A 64-bit memory BAR (it also uses register `index + 1`). */
  readonly is64: boolean;
  readonly prefetchable: boolean;
  /** Size decoded from the probe; 0 = not implemented. */
  readonly size: bigint;
  /** The address programmed in the register(s); 0 = unassigned. */
  readonly address: bigint;
  /** Size of the matching vfio-user region (0 if not implemented). */
  readonly regionSize: number;
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

/** One MSI-X table entry. */
export interface MsixEntry {
  /** Message address (64 bits). */
  address: bigint;
  /** Message data. */
  data: number;
  /** Vector control bit 0: masked. */
  masked: boolean;
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

/** An address range `[start, end)` that BARs are assigned from. */
export interface AddressWindow {
  readonly start: bigint;
  readonly end: bigint;
}

/**
 * Where {@link PciFunction.assignBars} places BARs, like a PCI host bridge's apertures. Each
 * defaults to what PC firmware uses.
 */
export interface BarWindows {
  /** 32-bit memory, below 4 GiB (default `[0xc000_0000, 0xfec0_0000)`, under the IOAPIC). */
  mem32?: AddressWindow;
  /** 64-bit memory (default `[0x80_0000_0000, 0x100_0000_0000)`, 512 GiB from 512 GiB). */
  mem64?: AddressWindow;
  /** I/O ports (default `[0xc000, 0x10000)`). */
  io?: AddressWindow;
}

/** The default {@link BarWindows}. */
export const DEFAULT_BAR_WINDOWS: Readonly<Required<BarWindows>> = Object.freeze({
  mem32: Object.freeze({ start: 0xc000_0000n, end: 0xfec0_0000n }),
  mem64: Object.freeze({ start: 0x80_0000_0000n, end: 0x100_0000_0000n }),
  io: Object.freeze({ start: 0xc000n, end: 0x1_0000n }),
});

/** Options of {@link PciFunction.enable}. */
export interface EnableOptions {
  /** COMMAND.MEMORY: respond to memory BAR accesses (default true). */
  memory?: boolean;
  /** COMMAND.IO: respond to I/O BAR accesses (default: as it was). */
  io?: boolean;
  /** COMMAND.MASTER: may DMA and send MSI/MSI-X (default true). */
  busMaster?: boolean;
  /**
   * Assign addresses to unassigned BARs (and the ROM BAR) first, with
   * {@link PciFunction.assignBars} (default true). Servers that model real PCI decode a BAR only
   * at its programmed address.
   */
  assignBars?: boolean;
  /** Windows to assign from (see {@link BarWindows}). */
  windows?: BarWindows;
}

/**
 * A PCI function reached through a {@link VfioUserClient}: config space (region 7) plus the BARs
 * holding MSI-X structures. Config accesses always wait for their reply; MSI-X table writes
 * follow the client's posted-write rules.
 */
export class PciFunction {
  #config: Buffer = Buffer.alloc(0);
  #header: PciHeader | null = null;
  #caps: PciCapability[] = [];
  #extCaps: PciExtendedCapability[] = [];
  #msix: MsixInfo | null = null;
  #bars: readonly BarInfo[] = [];

  private constructor(readonly client: VfioUserClient) {}

  /** Reads the whole config space and decodes it. */
  static async open(client: VfioUserClient): Promise<PciFunction> {
    const fn = new PciFunction(client);
    await fn.refresh();
    return fn;
  }

  /** The config-space snapshot of the last {@link PciFunction.refresh}. */
  get config(): Buffer {
    return this.#config;
  }

  get header(): PciHeader {
    return this.#header!;
  }

  get capabilities(): readonly PciCapability[] {
    return this.#caps;
  }

  get extendedCapabilities(): readonly PciExtendedCapability[] {
    return this.#extCaps;
  }

  /** The MSI-X capability as of the last refresh, or null if the function has none. */
  get msix(): MsixInfo | null {
    return this.#msix;
  }

  /** The BARs as of the last {@link PciFunction.probeBars} or {@link PciFunction.assignBars} (empty before). */
  get bars(): readonly BarInfo[] {
    return this.#bars;
  }

  /** First capability with ID `id`. */
  findCapability(id: number): PciCapability | undefined {
    return this.#caps.find((c) => c.id === id);
  }

  /** First extended capability with ID `id`. */
  findExtendedCapability(id: number): PciExtendedCapability | undefined {
    return this.#extCaps.find((c) => c.id === id);
  }

  /** Reads the whole config space again (in pieces of at most the negotiated transfer size). */
  async refresh(): Promise<void> {
    const size = this.client.region(PciRegion.CONFIG).size;
    const config = await this.client.read(PciRegion.CONFIG, 0, size);
    this.#config = config;
    this.#header = parseConfigHeader(config);
    this.#caps = walkCapabilities(config);
    this.#extCaps = walkExtendedCapabilities(config);
    const msix = this.#caps.find((c) => c.id === CapId.MSIX);
    this.#msix = msix === undefined ? null : parseMsixCapability(config, msix.offset);
  }

  /** Reads a config register of 1, 2 or 4 bytes (and updates the snapshot). */
  async readConfig(offset: number, size: 1 | 2 | 4): Promise<number> {
    const value = await this.client.readUint(PciRegion.CONFIG, offset, size);
    if (offset + size <= this.#config.length) this.#config.writeUIntLE(value, offset, size);
    return value;
  }

  /** Writes a config register of 1, 2 or 4 bytes and waits for the reply. */
  async writeConfig(offset: number, size: 1 | 2 | 4, value: number): Promise<void> {
    const v = size === 4 ? value >>> 0 : value & ((1 << (size * 8)) - 1);
    await this.client.writeUint(PciRegion.CONFIG, offset, size, v, { posted: false });
  }

  /**
   * Sizes every BAR: for each register, write all-ones, read back, restore (both registers of a
   * 64-bit BAR). Memory and I/O decoding are switched off meanwhile and restored afterwards.
   */
  async probeBars(): Promise<BarInfo[]> {
    return this.#withDecodingOff(() => this.#probeBars());
  }

  /**
   * Gives every implemented BAR that has no address (0) one, the way PC firmware does, and keeps
   * the addresses already set. With memory and I/O decoding off: size each BAR (write all-ones,
   * read back, restore), then allocate largest first, naturally aligned, around the BARs already
   * placed: 64-bit prefetchable memory from the 64-bit window, other memory from the 32-bit window
   * (a 64-bit BAR that does not fit there goes to the 64-bit window), I/O from the I/O window.
   * The expansion ROM BAR gets an address the same way (32-bit window), its enable bit untouched.
   * Each register is written with its type bits, low register first, and read back. COMMAND is
   * restored at the end: this does not turn decoding on ({@link PciFunction.enable} does).
   *
   * @returns the BARs with their addresses as read back.
   * @throws an Error with `code` 'ENOSPC' if a BAR does not fit its window (nothing is written
   * then); RangeError for an empty window or one outside its address space.
   */
  async assignBars(windows: BarWindows = {}): Promise<BarInfo[]> {
    const w = checkWindows(windows);
    return this.#withDecodingOff(async () => {
      const bars = await this.#probeBars();
      const original = await this.readConfig(Cfg.ROM_ADDRESS, 4);
      const romBack = await this.#probe(Cfg.ROM_ADDRESS, Rom.ADDRESS_MASK, original);
      const romMask = (romBack & Rom.ADDRESS_MASK) >>> 0;
      const rom: Placeable | null =
        romMask === 0 ? null : { name: 'the ROM BAR', space: 'memory', size: BigInt((romMask & -romMask) >>> 0), address: BigInt((original & Rom.ADDRESS_MASK) >>> 0), windows: [w.mem32] };
      const wanted: Placeable[] = bars
        .filter((b) => b.size > 0n)
        .map((b) => ({
          name: `BAR${String(b.index)}`,
          space: b.kind,
          size: b.size,
          address: b.address,
          windows: b.kind === 'io' ? [w.io] : b.is64 && b.prefetchable ? [w.mem64, w.mem32] : b.is64 ? [w.mem32, w.mem64] : [w.mem32],
          bar: b,
        }));
      if (rom !== null) wanted.push(rom);
      const placed = allocate(wanted);
      const assigned = new Map<BarInfo, bigint>();
      for (const [p, address] of placed) {
        if (p.bar === undefined) {
          await this.writeConfig(Cfg.ROM_ADDRESS, 4, (Number(address) | (original & ~Rom.ADDRESS_MASK)) >>> 0);
          continue;
        }
        assigned.set(p.bar, address);
        const reg = barOffset(p.bar.index);
        const low = await this.readConfig(reg, 4);
        const typeBits = p.bar.kind === 'io' ? low & ~Bar.IO_MASK : low & ~Bar.MEM_MASK;
        await this.writeConfig(reg, 4, (Number(address & 0xffff_ffffn) | typeBits) >>> 0);
        if (p.bar.is64) await this.writeConfig(reg + 4, 4, Number(address >> 32n));
      }
      const out: BarInfo[] = [];
      for (const b of bars) {
        const wantedAt = assigned.get(b);
        if (wantedAt === undefined) {
          out.push(b);
          continue;
        }
        const reg = barOffset(b.index);
        const low = await this.readConfig(reg, 4);
        let address = BigInt((b.kind === 'io' ? low & Bar.IO_MASK : low & Bar.MEM_MASK) >>> 0);
        if (b.is64) address |= BigInt(await this.readConfig(reg + 4, 4)) << 32n;
        if (address !== wantedAt) debug('BAR%d reads back 0x%s, not the assigned 0x%s', b.index, address.toString(16), wantedAt.toString(16));
        out.push(Object.freeze({ ...b, address }));
      }
      this.#bars = out;
      return out;
    });
  }

  /** Sizes the expansion ROM BAR the same way; 0 if there is none. */
  async probeRom(): Promise<number> {
    const original = await this.readConfig(Cfg.ROM_ADDRESS, 4);
    const back = await this.#probe(Cfg.ROM_ADDRESS, Rom.ADDRESS_MASK, original);
    const mask = (back & Rom.ADDRESS_MASK) >>> 0;
    return mask === 0 ? 0 : (mask & -mask) >>> 0;
  }

  /**
   * Makes the function usable the way firmware leaves it for a driver: assigns addresses to the
   * BARs that have none ({@link PciFunction.assignBars}, unless `assignBars: false`), then sets
   * COMMAND bits (read-modify-write): by default memory space and bus mastering on, I/O space as
   * it was. Returns the new COMMAND value.
   */
  async enable(options: EnableOptions = {}): Promise<number> {
    if (options.assignBars !== false) await this.assignBars(options.windows);
    let command = await this.readConfig(Cfg.COMMAND, 2);
    const set = (bit: number, on: boolean | undefined) => {
      if (on === true) command |= bit;
      else if (on === false) command &= ~bit;
    };
    set(PciCommand.MEMORY, options.memory ?? true);
    set(PciCommand.IO, options.io);
    set(PciCommand.MASTER, options.busMaster ?? true);
    await this.writeConfig(Cfg.COMMAND, 2, command);
    return command;
  }

  // ---- MSI-X ----

  /** Sets Message Control's enable and function-mask bits. */
  async setMsixEnabled(enabled: boolean, functionMasked = false): Promise<void> {
    const msix = this.#requireMsix();
    const at = msix.capOffset + MsixRegs.FLAGS;
    let flags = await this.readConfig(at, 2);
    flags = enabled ? flags | MsixRegs.ENABLE : flags & ~MsixRegs.ENABLE;
    flags = functionMasked ? flags | MsixRegs.MASKALL : flags & ~MsixRegs.MASKALL;
    await this.writeConfig(at, 2, flags);
    this.#msix = { ...msix, enabled, functionMasked };
  }

  /** Programs table entry `vector` (address, data, vector control) with one 16-byte write. */
  async writeMsixVector(vector: number, entry: MsixEntry, options: WriteOptions = {}): Promise<void> {
    const msix = this.#requireMsix();
    const b = Buffer.alloc(MsixRegs.ENTRY_SIZE);
    b.writeBigUInt64LE(BigInt.asUintN(64, entry.address), 0);
    b.writeUInt32LE(entry.data >>> 0, 8);
    b.writeUInt32LE(entry.masked ? MsixRegs.ENTRY_MASKED : 0, MsixRegs.VECTOR_CTRL);
    await this.client.write(msix.tableBar, this.#entryOffset(msix, vector), b, options);
  }

  /** Reads table entry `vector`. */
  async readMsixVector(vector: number): Promise<MsixEntry> {
    const msix = this.#requireMsix();
    const b = await this.client.read(msix.tableBar, this.#entryOffset(msix, vector), MsixRegs.ENTRY_SIZE);
    return {
      address: b.readBigUInt64LE(0),
      data: b.readUInt32LE(8),
      masked: (b.readUInt32LE(MsixRegs.VECTOR_CTRL) & MsixRegs.ENTRY_MASKED) !== 0,
    };
  }

  /** Sets or clears the mask bit of table entry `vector` (a 4-byte write of its vector control). */
  async setMsixVectorMasked(vector: number, masked: boolean, options: WriteOptions = {}): Promise<void> {
    const msix = this.#requireMsix();
    await this.client.writeUint(msix.tableBar, this.#entryOffset(msix, vector) + MsixRegs.VECTOR_CTRL, 4, masked ? MsixRegs.ENTRY_MASKED : 0, options);
  }

  /** Reads the pending-bit array: element i is true if vector i is pending. */
  async readMsixPba(): Promise<boolean[]> {
    const msix = this.#requireMsix();
    const bytes = Math.ceil(msix.tableSize / 64) * 8;
    const b = await this.client.read(msix.pbaBar, msix.pbaOffset, bytes);
    return Array.from({ length: msix.tableSize }, (_, i) => (b[i >> 3]! & (1 << (i & 7))) !== 0);
  }

  #requireMsix(): MsixInfo {
    if (this.#msix === null) throw new RangeError('the function has no MSI-X capability');
    return this.#msix;
  }

  #entryOffset(msix: MsixInfo, vector: number): number {
    if (!Number.isInteger(vector) || vector < 0 || vector >= msix.tableSize) {
      throw new RangeError(`Expected an MSI-X vector below ${String(msix.tableSize)}, got ${String(vector)}`);
    }
    return msix.tableOffset + vector * MsixRegs.ENTRY_SIZE;
  }

  /** Runs `fn` with COMMAND's memory and I/O decoding off, then restores COMMAND. */
  async #withDecodingOff<T>(fn: () => Promise<T>): Promise<T> {
    const command = await this.readConfig(Cfg.COMMAND, 2);
    const decode = command & (PciCommand.MEMORY | PciCommand.IO);
    if (decode !== 0) await this.writeConfig(Cfg.COMMAND, 2, command & ~decode);
    try {
      return await fn();
    } finally {
      if (decode !== 0) await this.writeConfig(Cfg.COMMAND, 2, command);
    }
  }

  /** The sizing probe of every BAR (decoding must be off). */
  async #probeBars(): Promise<BarInfo[]> {
    const out: BarInfo[] = [];
    for (let i = 0; i < 6; i++) {
      const reg = barOffset(i);
      const original = await this.readConfig(reg, 4);
      const io = (original & Bar.SPACE_IO) !== 0;
      const is64 = !io && (original & 0x6) === Bar.MEM_TYPE_64 && i < 5;
      const lo = await this.#probe(reg, 0xffffffff, original);
      let mask = BigInt((io ? lo & Bar.IO_MASK : lo & Bar.MEM_MASK) >>> 0);
      let address = BigInt((io ? original & Bar.IO_MASK : original & Bar.MEM_MASK) >>> 0);
      if (is64) {
        const originalHi = await this.readConfig(reg + 4, 4);
        const hi = await this.#probe(reg + 4, 0xffffffff, originalHi);
        mask |= BigInt(hi) << 32n;
        address |= BigInt(originalHi) << 32n;
      }
      const size = mask === 0n ? 0n : mask & -mask;
      const region = i < this.client.regions.length ? this.client.region(i).size : 0;
      const bar: BarInfo = {
        index: i,
        kind: io ? 'io' : 'memory',
        is64,
        prefetchable: !io && (original & Bar.MEM_PREFETCH) !== 0,
        size,
        address,
        regionSize: region,
      };
      out.push(Object.freeze(bar));
      if (is64) i++;
    }
    this.#bars = out;
    return out;
  }

  /** Writes `ones` to a 4-byte register, reads it back, restores `original`. */
  async #probe(offset: number, ones: number, original: number): Promise<number> {
    await this.writeConfig(offset, 4, ones);
    try {
      return await this.readConfig(offset, 4);
    } finally {
      await this.writeConfig(offset, 4, original);
      if (offset + 4 <= this.#config.length) this.#config.writeUInt32LE(original >>> 0, offset);
    }
  }
}

/** Something {@link allocate} places: a BAR or the ROM BAR. */
interface Placeable {
  readonly name: string;
  readonly space: 'memory' | 'io';
  readonly size: bigint;
  /** Current address; 0 = to be assigned. */
  readonly address: bigint;
  /** Windows to try, in order. */
  readonly windows: readonly AddressWindow[];
  readonly bar?: BarInfo;
}

const U32_END = 1n << 32n;
const U64_END = 1n << 64n;

/** Fills in the default windows and checks each lies in its space. */
function checkWindows(w: BarWindows): Required<BarWindows> {
  const out = { ...DEFAULT_BAR_WINDOWS, ...w };
  const check = (name: string, win: AddressWindow, limit: bigint) => {
    if (typeof win.start !== 'bigint' || typeof win.end !== 'bigint' || win.start <= 0n || win.end <= win.start || win.end > limit) {
      throw new RangeError(`Expected the ${name} window to be a non-empty range of bigints in (0, 0x${limit.toString(16)}], got [${String(win.start)}, ${String(win.end)})`);
    }
  };
  check('mem32', out.mem32, U32_END);
  check('mem64', out.mem64, U64_END);
  check('io', out.io, U32_END);
  return out;
}

const alignUp = (v: bigint, a: bigint): bigint => ((v + a - 1n) / a) * a;

/**
 * Places every entry of `wanted` whose address is 0: largest first, naturally aligned, in the
 * first of its windows with room, around every range already taken in its space (the entries
 * that keep their address, and those placed before). Returns the new addresses.
 * @throws an Error with `code` 'ENOSPC' if one does not fit.
 */
function allocate(wanted: readonly Placeable[]): Map<Placeable, bigint> {
  const taken: Record<'memory' | 'io', { start: bigint; end: bigint }[]> = { memory: [], io: [] };
  for (const p of wanted) if (p.address !== 0n) taken[p.space].push({ start: p.address, end: p.address + p.size });
  const todo = wanted.filter((p) => p.address === 0n).sort((a, b) => (a.size === b.size ? 0 : a.size > b.size ? -1 : 1));
  const placed = new Map<Placeable, bigint>();
  for (const p of todo) {
    let at: bigint | null = null;
    for (const win of p.windows) {
      at = fit(win, p.size, taken[p.space]);
      if (at !== null) break;
    }
    if (at === null) {
      const where = p.windows.map((win) => `[0x${win.start.toString(16)}, 0x${win.end.toString(16)})`).join(' or ');
      throw Object.assign(new Error(`no room for ${p.name} (${p.space}, 0x${p.size.toString(16)} bytes) in ${where}`), { code: 'ENOSPC' });
    }
    taken[p.space].push({ start: at, end: at + p.size });
    placed.set(p, at);
  }
  return placed;
}

/** Lowest `size`-aligned address in `win` where `size` bytes overlap nothing in `taken`. */
function fit(win: AddressWindow, size: bigint, taken: readonly { start: bigint; end: bigint }[]): bigint | null {
  let at = alignUp(win.start, size);
  while (at + size <= win.end) {
    const clash = taken.find((t) => t.start < at + size && at < t.end);
    if (clash === undefined) return at;
    at = alignUp(clash.end, size);
  }
  return null;
}
