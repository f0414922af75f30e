/**
 * PCI helpers for a {@link VfioUserClient}: what a driver does with config space (reference §4.6).
 *
 * {@link PciFunction} reads config space (decoded by pci-config.ts) and does the accesses: BAR
 * sizing by probing (write all-ones, read back, restore, with memory and I/O decoding off
 * meanwhile, as Linux does), BAR assignment (placed by bar-windows.ts), command-register updates
 * (memory space, bus mastering), and MSI-X: the enable and function-mask bits in the capability,
 * table entries programmed with `REGION_WRITE` to the BAR that holds the table, and PBA reads.
 *
 * @packageDocumentation
 */
import { debuglog } from 'node:util';
import { Bar, CapId, Cfg, Command as PciCommand, Rom, barOffset } from '../pci/ids';
import { PciRegion } from '../protocol/constants';
import { allocate, checkWindows, type BarWindows, type Placeable } from './bar-windows';
import type { VfioUserClient, WriteOptions } from './client';
import { MsixRegs, parseConfigHeader, parseMsixCapability, walkCapabilities, walkExtendedCapabilities, type MsixInfo, type PciCapability, type PciExtendedCapability, type PciHeader } from './pci-config';

const debug = debuglog('vfio-user:client');

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

/** One MSI-X table entry. */
export interface MsixEntry {
  /** Message address (64 bits). */
  address: bigint;
  /** Message data. */
  data: number;
  /** Vector control bit 0: masked. */
  masked: boolean;
}

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
      const rom: Placeable<BarInfo> | null =
        romMask === 0 ? null : { name: 'the ROM BAR', space: 'memory', size: BigInt((romMask & -romMask) >>> 0), address: BigInt((original & Rom.ADDRESS_MASK) >>> 0), windows: [w.mem32] };
      const wanted: Placeable<BarInfo>[] = bars
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
