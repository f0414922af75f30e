/**
 * NVM command set I/O (NVM Command Set 1.0, section 3): Read, Write, Flush, Write Zeroes and
 * Dataset Management (deallocate), with data in client DMA memory.
 *
 * Two levels:
 * - `prepare*` fill a reusable {@link NvmeRequest} (no allocation; the perf engine's path) and
 *   `read`/`write`/`flush`/`writeZeroes`/`deallocate` submit one command and resolve with its
 *   completion (an error status rejects with {@link NvmeError}). They check the shape of the
 *   arguments only: whether an LBA range fits the namespace is the controller's call (LBA Out of
 *   Range), so a test can provoke it.
 * - {@link readBlocks} / {@link writeBlocks}: any number of blocks to or from an ordinary Buffer,
 *   split into commands of at most the queue's transfer size, several in flight, through a bounce
 *   buffer in DMA memory.
 *
 * @packageDocumentation
 */
import { Dsm, Rw } from '../../nvme/commands';
import { IoOpcode } from '../../nvme/constants';
import type { NvmeDriver } from './controller';
import type { NamespaceInfo } from './identify';
import { dmaSlice, type DataRef } from './prp';
import type { Completion, NvmeRequest, QueuePair } from './queue';

/** The command dword fields of Read, Write, Write Zeroes and Dataset Management (lib/nvme). */
export { Dsm, Rw };

/** Most blocks one Read/Write/Write Zeroes command can name (NLB is 16 bits, 0's based). */
export const MAX_BLOCKS_PER_COMMAND = 0x10000;

/** Options of a read or write. */
export interface RwOptions {
  /** Force Unit Access: the data is durable when the command completes. */
  fua?: boolean;
  /** Command timeout in ms (default: the queue's). */
  timeoutMs?: number;
}

/** A range of blocks. */
export interface BlockRange {
  lba: number;
  count: number;
}

function checkBlocks(lba: number, count: number): void {
  if (!Number.isSafeInteger(lba) || lba < 0) throw new RangeError(`Expected an LBA (an integer >= 0), got ${String(lba)}`);
  if (!Number.isInteger(count) || count < 1 || count > MAX_BLOCKS_PER_COMMAND) {
    throw new RangeError(`Expected a block count in [1, ${String(MAX_BLOCKS_PER_COMMAND)}], got ${String(count)}`);
  }
}

function checkBuffer(ns: NamespaceInfo, count: number, buf: DataRef): number {
  const bytes = count * ns.blockSize;
  if (buf.length < bytes) throw new RangeError(`${String(count)} blocks of ${String(ns.blockSize)} bytes need ${String(bytes)} bytes; the buffer has ${String(buf.length)}`);
  return bytes;
}

function setRw(req: NvmeRequest, opcode: number, ns: NamespaceInfo, lba: number, count: number, iova: number, fua: boolean): void {
  req.opcode = opcode;
  req.flags = 0;
  req.nsid = ns.nsid;
  req.cdw2 = 0;
  req.cdw3 = 0;
  req.mptr = 0;
  req.cdw10 = lba % 0x1_0000_0000;
  req.cdw11 = Math.floor(lba / 0x1_0000_0000);
  req.cdw12 = ((count - 1) | (fua ? Rw.FUA : 0)) >>> 0;
  req.cdw13 = 0;
  req.cdw14 = 0;
  req.cdw15 = 0;
  req.prp1 = 0;
  req.prp2 = 0;
  req.dataIova = iova;
  req.dataLength = count * ns.blockSize;
  req.send = null;
  req.receive = 0;
}

/** Fills `req` as a Read of `count` blocks at `lba` into DMA address `iova` (no checks). */
export function prepareRead(req: NvmeRequest, ns: NamespaceInfo, lba: number, count: number, iova: number): NvmeRequest {
  setRw(req, IoOpcode.READ, ns, lba, count, iova, false);
  return req;
}

/** Fills `req` as a Write of `count` blocks at `lba` from DMA address `iova` (no checks). */
export function prepareWrite(req: NvmeRequest, ns: NamespaceInfo, lba: number, count: number, iova: number, fua = false): NvmeRequest {
  setRw(req, IoOpcode.WRITE, ns, lba, count, iova, fua);
  return req;
}

/** Reads `count` blocks at `lba` of `ns` into `buf` (DMA memory). */
export function read(qp: QueuePair, ns: NamespaceInfo, lba: number, count: number, buf: DataRef, options: RwOptions = {}): Promise<Completion> {
  checkBlocks(lba, count);
  const bytes = checkBuffer(ns, count, buf);
  return qp.submit(
    { opcode: IoOpcode.READ, nsid: ns.nsid, cdw10: lba % 0x1_0000_0000, cdw11: Math.floor(lba / 0x1_0000_0000), cdw12: ((count - 1) | (options.fua ? Rw.FUA : 0)) >>> 0 },
    { data: { iova: buf.iova, length: bytes }, ...(options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {}) },
  );
}

/** Writes `count` blocks at `lba` of `ns` from `buf` (DMA memory). */
export function write(qp: QueuePair, ns: NamespaceInfo, lba: number, count: number, buf: DataRef, options: RwOptions = {}): Promise<Completion> {
  checkBlocks(lba, count);
  const bytes = checkBuffer(ns, count, buf);
  return qp.submit(
    { opcode: IoOpcode.WRITE, nsid: ns.nsid, cdw10: lba % 0x1_0000_0000, cdw11: Math.floor(lba / 0x1_0000_0000), cdw12: ((count - 1) | (options.fua ? Rw.FUA : 0)) >>> 0 },
    { data: { iova: buf.iova, length: bytes }, ...(options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {}) },
  );
}

/** Flush: every completed write to `nsid` is durable afterwards (0xffffffff: all namespaces). */
export function flush(qp: QueuePair, nsid: number): Promise<Completion> {
  return qp.submit({ opcode: IoOpcode.FLUSH, nsid });
}

/** Write Zeroes over `count` blocks at `lba`; `deallocate` sets DEAC (the blocks may be unmapped). */
export function writeZeroes(qp: QueuePair, ns: NamespaceInfo, lba: number, count: number, options: { deallocate?: boolean; fua?: boolean } = {}): Promise<Completion> {
  checkBlocks(lba, count);
  const cdw12 = (count - 1) | (options.deallocate ? Rw.DEAC : 0) | (options.fua ? Rw.FUA : 0);
  return qp.submit({ opcode: IoOpcode.WRITE_ZEROES, nsid: ns.nsid, cdw10: lba % 0x1_0000_0000, cdw11: Math.floor(lba / 0x1_0000_0000), cdw12: cdw12 >>> 0 });
}

/**
 * Dataset Management with Attribute - Deallocate over `ranges` (1..256; each up to 2^32 - 1
 * blocks). The range list travels in the command's slot page, so no buffer is needed.
 */
export function deallocate(qp: QueuePair, ns: NamespaceInfo, ranges: readonly BlockRange[]): Promise<Completion> {
  if (ranges.length < 1 || ranges.length > Dsm.MAX_RANGES) throw new RangeError(`Expected 1..${String(Dsm.MAX_RANGES)} ranges, got ${String(ranges.length)}`);
  const list = Buffer.alloc(ranges.length * Dsm.RANGE_BYTES);
  ranges.forEach((r, i) => {
    if (!Number.isSafeInteger(r.lba) || r.lba < 0 || !Number.isInteger(r.count) || r.count < 1 || r.count > 0xffffffff) {
      throw new RangeError(`bad deallocate range ${String(r.lba)}+${String(r.count)}`);
    }
    const at = i * Dsm.RANGE_BYTES;
    list.writeUInt32LE(0, at); // context attributes
    list.writeUInt32LE(r.count, at + 4);
    list.writeUInt32LE(r.lba % 0x1_0000_0000, at + 8);
    list.writeUInt32LE(Math.floor(r.lba / 0x1_0000_0000), at + 12);
  });
  return qp.submit({ opcode: IoOpcode.DSM, nsid: ns.nsid, cdw10: ranges.length - 1, cdw11: Dsm.AD }, { send: list });
}

// ---- whole ranges through a bounce buffer ----

/** Options of {@link readBlocks} / {@link writeBlocks}. */
export interface TransferOptions extends RwOptions {
  /** Commands in flight at once (default 4, at most the queue depth). */
  inflight?: number;
  /** Blocks per command (default: as many as the queue's transfer size allows). */
  blocksPerCommand?: number;
}

/**
 * Moves `count` blocks at `lba` between `host` (count x blockSize bytes) and the namespace,
 * through a DMA bounce buffer of `inflight` commands, in order of LBA.
 */
async function transfer(driver: NvmeDriver, qp: QueuePair, ns: NamespaceInfo, lba: number, count: number, host: Buffer, writing: boolean, options: TransferOptions): Promise<void> {
  if (!Number.isSafeInteger(lba) || lba < 0) throw new RangeError(`Expected an LBA (an integer >= 0), got ${String(lba)}`);
  if (!Number.isSafeInteger(count) || count < 1) throw new RangeError(`Expected a block count >= 1, got ${String(count)}`);
  const bytes = count * ns.blockSize;
  if (host.length < bytes) throw new RangeError(`${String(count)} blocks need ${String(bytes)} bytes; the buffer has ${String(host.length)}`);
  const perCommand = Math.max(
    1,
    Math.min(options.blocksPerCommand ?? Infinity, Math.floor(qp.maxTransfer / ns.blockSize), MAX_BLOCKS_PER_COMMAND, count),
  );
  const commands = Math.ceil(count / perCommand);
  const inflight = Math.max(1, Math.min(options.inflight ?? 4, qp.depth, commands));
  const chunk = perCommand * ns.blockSize;
  const bounce = await driver.allocateBuffer(chunk * inflight);
  try {
    let next = 0;
    let failure: unknown = null;
    const worker = async (slot: number): Promise<void> => {
      const view = dmaSlice(bounce, slot * chunk, chunk);
      while (failure === null && next < commands) {
        const i = next++;
        const first = i * perCommand;
        const n = Math.min(perCommand, count - first);
        const part = host.subarray(first * ns.blockSize, (first + n) * ns.blockSize);
        try {
          if (writing) {
            view.bytes.set(part);
            await write(qp, ns, lba + first, n, view, options);
          } else {
            await read(qp, ns, lba + first, n, view, options);
            part.set(view.bytes.subarray(0, part.length));
          }
        } catch (err) {
          failure ??= err;
        }
      }
    };
    await Promise.all(Array.from({ length: inflight }, (_, slot) => worker(slot)));
    if (failure !== null) throw failure;
  } finally {
    await driver.freeBuffer(bounce).catch(() => undefined);
  }
}

/** Reads `count` blocks at `lba` into `dst` (an ordinary Buffer of at least count x blockSize bytes). */
export function readBlocks(driver: NvmeDriver, qp: QueuePair, ns: NamespaceInfo, lba: number, count: number, dst: Buffer, options: TransferOptions = {}): Promise<void> {
  return transfer(driver, qp, ns, lba, count, dst, false, options);
}

/** Writes `count` blocks at `lba` from `src` (an ordinary Buffer of at least count x blockSize bytes). */
export function writeBlocks(driver: NvmeDriver, qp: QueuePair, ns: NamespaceInfo, lba: number, count: number, src: Buffer, options: TransferOptions = {}): Promise<void> {
  return transfer(driver, qp, ns, lba, count, src, true, options);
}
