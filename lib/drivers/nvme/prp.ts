/**
 * Physical Region Page entries for a data buffer (NVM Express Base 1.4, 4.3), built the way
 * Linux's `nvme_pci_setup_prps` and SPDK's `nvme_pcie_prp_list_append` do:
 *
 * - PRP1 is the buffer's first address (dword aligned, any offset inside its page).
 * - If the buffer ends within PRP1's page, PRP2 is 0. If it ends within the next page, PRP2 is
 *   that page's address. Otherwise PRP2 points at a PRP list: one page-aligned entry per further
 *   page. When a list page is full and entries remain, its last entry points at the next list
 *   page instead (a chain).
 *
 * The buffers here are contiguous in DMA address space (one {@link DmaMemory} range), so every
 * entry after the first is the previous one plus a page. List pages belong to the command's slot
 * in its queue (see `queue.ts`); building writes them in place and allocates nothing.
 *
 * @packageDocumentation
 */
import type { DmaMemory } from '../../client/dma';

/** A data buffer in client DMA memory: its DMA address and length (and, usually, its bytes). */
export interface DataRef {
  /** DMA address (IOVA) of the first byte; dword aligned. */
  readonly iova: number;
  /** Length in bytes. */
  readonly length: number;
}

/** A {@link DataRef} with the memory itself. */
export interface DmaSlice extends DataRef {
  /** Zero-copy view of the bytes (shared with the device). */
  readonly bytes: Buffer;
}

/** `[offset, offset + length)` of `mem` as a {@link DmaSlice}. */
export function dmaSlice(mem: DmaMemory, offset = 0, length = mem.size - offset): DmaSlice {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > mem.size) {
    throw new RangeError(`slice ${String(offset)}+${String(length)} is outside the ${String(mem.size)}-byte DMA range`);
  }
  return { iova: mem.iovaOf(offset), length, bytes: mem.bytes.subarray(offset, offset + length) };
}

/** PRP1 and PRP2 of one command (reused by the caller: building allocates nothing). */
export interface PrpPair {
  prp1: number;
  prp2: number;
}

/** Most data pages a transfer of `maxTransfer` bytes can touch at any dword-aligned start. */
export function maxPrpEntries(maxTransfer: number, pageSize: number): number {
  return Math.ceil((maxTransfer - 4) / pageSize) + 1;
}

/**
 * PRP list pages one command needs for transfers up to `maxTransfer` bytes (0 if PRP1 and PRP2
 * always suffice).
 */
export function prpListPages(maxTransfer: number, pageSize: number): number {
  const listEntries = maxPrpEntries(maxTransfer, pageSize) - 1;
  if (listEntries <= 1) return 0;
  const perPage = pageSize / 8;
  return Math.max(1, Math.ceil((listEntries - 1) / (perPage - 1)));
}

function putU64(buf: Buffer, at: number, value: number): void {
  buf.writeUInt32LE(value % 0x1_0000_0000, at);
  buf.writeUInt32LE(Math.floor(value / 0x1_0000_0000), at + 4);
}

/**
 * Fills `out` with PRP1/PRP2 for `[iova, iova + length)`, writing a PRP list (chained if needed)
 * into `list` (the command's list pages, page aligned at DMA address `listIova`) when the buffer
 * spans more than two pages. The list pages may be `listBytes` bytes of a larger buffer from
 * `listOffset` on (a queue's slots share one buffer: no view per command).
 *
 * @throws {RangeError} if `iova` is not dword aligned, or the list does not fit `list` (a
 * transfer larger than the slot was sized for).
 */
export function buildPrps(iova: number, length: number, pageSize: number, list: Buffer, listIova: number, out: PrpPair, listOffset = 0, listBytes = list.length - listOffset): void {
  if (length <= 0) {
    out.prp1 = 0;
    out.prp2 = 0;
    return;
  }
  if (iova % 4 !== 0) throw new RangeError(`PRP data pointer 0x${iova.toString(16)} is not dword aligned`);
  out.prp1 = iova;
  const first = pageSize - (iova % pageSize);
  if (length <= first) {
    out.prp2 = 0;
    return;
  }
  let page = iova + first;
  let remaining = length - first;
  if (remaining <= pageSize) {
    out.prp2 = page;
    return;
  }
  const perPage = pageSize / 8;
  let entries = Math.ceil(remaining / pageSize);
  let listPage = 0;
  let slot = 0;
  while (entries > 0) {
    if (slot === perPage - 1 && entries > 1) {
      // Last slot of a full list page: chain to the next list page.
      listPage++;
      const next = listPage * pageSize;
      if (next + pageSize > listBytes) throw new RangeError(`a ${String(length)}-byte transfer needs more PRP list pages than the slot has`);
      putU64(list, listOffset + (listPage - 1) * pageSize + slot * 8, listIova + next);
      slot = 0;
      continue;
    }
    const at = listPage * pageSize + slot * 8;
    if (at + 8 > listBytes) throw new RangeError(`a ${String(length)}-byte transfer needs more PRP list pages than the slot has`);
    putU64(list, listOffset + at, page);
    page += pageSize;
    remaining -= pageSize;
    entries--;
    slot++;
  }
  out.prp2 = listIova;
}
