/**
 * Address windows for BAR assignment, and the allocator that places BARs in them as PC firmware
 * does: largest first, naturally aligned, around what already has an address. Used by
 * `PciFunction.assignBars` (pci.ts).
 *
 * @packageDocumentation
 */

/** An address range `[start, end)` that BARs are assigned from. */
export interface AddressWindow {
  readonly start: bigint;
  readonly end: bigint;
}

/**
 * Where `PciFunction.assignBars` places BARs, like a PCI host bridge's apertures. Each
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

/** Something {@link allocate} places (a BAR or the ROM BAR); `bar` is the caller's, carried along. */
export interface Placeable<T> {
  readonly name: string;
  readonly space: 'memory' | 'io';
  readonly size: bigint;
  /** Current address; 0 = to be assigned. */
  readonly address: bigint;
  /** Windows to try, in order. */
  readonly windows: readonly AddressWindow[];
  readonly bar?: T;
}

const U32_END = 1n << 32n;
const U64_END = 1n << 64n;

/** Fills in the default windows and checks each lies in its space. */
export function checkWindows(w: BarWindows): Required<BarWindows> {
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
export function allocate<T>(wanted: readonly Placeable<T>[]): Map<Placeable<T>, bigint> {
  const taken: Record<'memory' | 'io', { start: bigint; end: bigint }[]> = { memory: [], io: [] };
  for (const p of wanted) if (p.address !== 0n) taken[p.space].push({ start: p.address, end: p.address + p.size });
  const todo = wanted.filter((p) => p.address === 0n).sort((a, b) => (a.size === b.size ? 0 : a.size > b.size ? -1 : 1));
  const placed = new Map<Placeable<T>, bigint>();
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
