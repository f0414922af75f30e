/**
 * The NVM command set on the I/O queues: Read, Write (FUA), Flush, Write Zeroes, Dataset
 * Management (deallocate) and Compare, on the controller's single namespace (NSID 1).
 *
 * Data moves between the backend and zero-copy views of guest memory ({@link Transfer}), which stay
 * referenced (so DMA_UNMAP waits) until the backend is done; nothing is copied in between unless a
 * PRP page lies in a message-only map, which goes through a bounce buffer. Every guest mistake is a
 * status: Invalid Namespace, Invalid Field (SGLs, fused commands, MDTS), LBA Out of Range, PRP
 * Offset Invalid, Data Transfer Error; a write to a read-only backend is Namespace is Write
 * Protected. Backend failures become media errors (Unrecovered Read Error, Write Fault) and count
 * in the SMART log.
 *
 * @packageDocumentation
 */
import { DmaError, type DmaSpace } from '../../server/dma';
import { RESOLVED, zeroRange, type BlockBackend } from '../../block/backend';
import { Dsm, Rw } from '../../nvme/commands';
import { IoOpcode, NSID_ALL, Status } from '../../nvme/constants';
import { copyFromGuest, copyFromGuestSync, mapPrp } from './prp';
import type { HandlerResult, Request } from './request';
import { SQE_FUSE_MASK, SQE_PSDT_MASK } from '../../nvme/structs';
import { NSID } from './admin';

/** SMART counters the I/O path updates. */
export interface IoStats {
  units512Read: number;
  units512Written: number;
  hostReads: number;
  hostWrites: number;
  mediaErrors: number;
}

/** What I/O commands need from the controller. */
export interface IoContext {
  readonly dma: DmaSpace;
  readonly backend: BlockBackend;
  readonly pageSize: number;
  /** MDTS in bytes (Infinity: unlimited). */
  readonly maxTransfer: number;
  /** Logical block size in bytes, and its log2. */
  readonly blockSize: number;
  readonly blockShift: number;
  /** Namespace size in blocks. */
  readonly blocks: number;
  /** Volatile write cache enabled (Set Features 06h); when off, every write is FUA. */
  readonly writeCacheEnabled: boolean;
  readonly stats: IoStats;
  /** A backend operation failed (for tracing). */
  backendError(req: Request, err: unknown): void;
}

/** Runs one I/O command. */
export function ioCommand(ctx: IoContext, req: Request): HandlerResult {
  if ((req.flags & (SQE_FUSE_MASK | SQE_PSDT_MASK)) !== 0) return Status.INVALID_FIELD;
  switch (req.opcode) {
    case IoOpcode.READ:
      return readWrite(ctx, req, false);
    case IoOpcode.WRITE:
      return readWrite(ctx, req, true);
    case IoOpcode.FLUSH:
      return flush(ctx, req);
    case IoOpcode.WRITE_ZEROES:
      return writeZeroes(ctx, req);
    case IoOpcode.DSM:
      return datasetManagement(ctx, req);
    case IoOpcode.COMPARE:
      return compare(ctx, req);
    default:
      return Status.INVALID_OPCODE;
  }
}

/** Start LBA (CDW11:CDW10), or -1 if it is too large to be in range. */
function startLba(req: Request): number {
  if (req.cdw11 > 0x1f_ffff) return -1;
  return req.cdw11 * 0x1_0000_0000 + req.cdw10;
}

/** Checks NSID and range; sets req.lba. SUCCESS or the error status. */
function checkRange(ctx: IoContext, req: Request, blocks: number): number {
  if (req.nsid !== NSID) return Status.INVALID_NS;
  const slba = startLba(req);
  if (slba < 0 || slba + blocks > ctx.blocks) return Status.LBA_RANGE;
  req.lba = slba;
  return Status.SUCCESS;
}

/** Maps the command's data (`bytes` long) to held views; SUCCESS or a status. */
function mapData(ctx: IoContext, req: Request, bytes: number, toGuest: boolean): number {
  const status = mapPrp(ctx.dma, req.prp1, req.prp2, bytes, ctx.pageSize, req.segs);
  if (status !== Status.SUCCESS) return status;
  return req.xfer.acquire(ctx.dma, req.segs, toGuest);
}

function readWrite(ctx: IoContext, req: Request, write: boolean): HandlerResult {
  const blocks = (req.cdw12 & Rw.NLB_MASK) + 1;
  const bytes = blocks << ctx.blockShift;
  if (req.nsid !== NSID) return Status.INVALID_NS;
  if (bytes > ctx.maxTransfer) return Status.INVALID_FIELD;
  const range = checkRange(ctx, req, blocks);
  if (range !== Status.SUCCESS) return range;
  if (write && ctx.backend.readOnly === true) return Status.NS_WRITE_PROTECTED;
  const mapped = mapData(ctx, req, bytes, !write);
  if (mapped !== Status.SUCCESS) return mapped;
  const offset = req.lba * ctx.blockSize;
  const fua = write && ((req.cdw12 & Rw.FUA) !== 0 || !ctx.writeCacheEnabled);
  let io: Promise<void>;
  try {
    if (req.xfer.bounced) io = write ? bounceWrite(ctx, req, offset, bytes, fua) : bounceRead(ctx, req, offset, bytes);
    else io = write ? writev(ctx.backend, offset, req.xfer.bufs, fua) : readv(ctx.backend, offset, req.xfer.bufs);
  } catch (err) {
    io = Promise.reject(err);
  }
  req.ioWrite = write;
  req.ioBytes = bytes;
  // A backend that finished before returning (the RAM disk) hands back the one resolved promise:
  // the status is known now, so the command completes without two promise hops.
  if (io === RESOLVED) return readWriteDone(ctx, req);
  req.onIoDone ??= () => readWriteDone(ctx, req);
  req.onIoFailed ??= (err: unknown) => {
    req.xfer.release();
    return mediaError(ctx, req, err, req.ioWrite);
  };
  return io.then(req.onIoDone, req.onIoFailed);
}

function readWriteDone(ctx: IoContext, req: Request): number {
  const poisoned = req.xfer.poisoned(ctx.dma, req.segs);
  req.xfer.release();
  if (poisoned) return Status.DATA_XFER_ERROR;
  const stats = ctx.stats;
  if (req.ioWrite) {
    stats.units512Written += req.ioBytes / 512;
    stats.hostWrites++;
  } else {
    stats.units512Read += req.ioBytes / 512;
    stats.hostReads++;
  }
  return Status.SUCCESS;
}

function flush(ctx: IoContext, req: Request): HandlerResult {
  if (req.nsid !== NSID && req.nsid !== NSID_ALL) return Status.INVALID_NS;
  return settle(ctx, req, () => ctx.backend.flush(), true);
}

function writeZeroes(ctx: IoContext, req: Request): HandlerResult {
  const blocks = (req.cdw12 & Rw.NLB_MASK) + 1;
  const range = checkRange(ctx, req, blocks);
  if (range !== Status.SUCCESS) return range;
  if (ctx.backend.readOnly === true) return Status.NS_WRITE_PROTECTED;
  const offset = req.lba * ctx.blockSize;
  const length = blocks * ctx.blockSize;
  const fua = (req.cdw12 & Rw.FUA) !== 0 || !ctx.writeCacheEnabled;
  const backend = ctx.backend;
  return settle(ctx, req, () => zeroRange(backend, offset, length, fua), true);
}

/** Scratch for Dataset Management range lists, parsed before any await. */
const dsmScratch = Buffer.alloc(Dsm.MAX_RANGES * Dsm.RANGE_BYTES);

function datasetManagement(ctx: IoContext, req: Request): HandlerResult {
  if (req.nsid !== NSID) return Status.INVALID_NS;
  const count = (req.cdw10 & 0xff) + 1;
  const bytes = count * Dsm.RANGE_BYTES;
  const status = mapPrp(ctx.dma, req.prp1, req.prp2, bytes, ctx.pageSize, req.segs);
  if (status !== Status.SUCCESS) return status;
  const deallocate = (req.cdw11 & Dsm.AD) !== 0;
  const sync = copyFromGuestSync(ctx.dma, req.segs, dsmScratch.subarray(0, bytes));
  if (sync === null) {
    const list = Buffer.alloc(bytes);
    return copyFromGuest(ctx.dma, req.segs, list).then((s) => (s !== Status.SUCCESS ? s : deallocateRanges(ctx, req, list, count, deallocate)));
  }
  if (sync !== Status.SUCCESS) return sync;
  return deallocateRanges(ctx, req, dsmScratch, count, deallocate);
}

function deallocateRanges(ctx: IoContext, req: Request, list: Buffer, count: number, deallocate: boolean): HandlerResult {
  const ranges: number[] = [];
  for (let i = 0; i < count; i++) {
    const at = i * Dsm.RANGE_BYTES;
    const nlb = list.readUInt32LE(at + 4);
    const hi = list.readUInt32LE(at + 12);
    const slba = hi > 0x1f_ffff ? -1 : hi * 0x1_0000_0000 + list.readUInt32LE(at + 8);
    if (nlb === 0) continue;
    if (slba < 0 || slba + nlb > ctx.blocks) {
      req.lba = Math.max(0, slba);
      return Status.LBA_RANGE;
    }
    ranges.push(slba, nlb);
  }
  // Integral Dataset for Read/Write are hints; only Deallocate does something.
  if (!deallocate || ranges.length === 0) return Status.SUCCESS;
  if (ctx.backend.readOnly === true) return Status.NS_WRITE_PROTECTED;
  const shift = ctx.blockShift;
  return settle(
    ctx,
    req,
    async () => {
      for (let i = 0; i < ranges.length; i += 2) await ctx.backend.discard(ranges[i]! * 2 ** shift, ranges[i + 1]! * 2 ** shift);
    },
    true,
  );
}

function compare(ctx: IoContext, req: Request): HandlerResult {
  const blocks = (req.cdw12 & Rw.NLB_MASK) + 1;
  const bytes = blocks << ctx.blockShift;
  if (req.nsid !== NSID) return Status.INVALID_NS;
  if (bytes > ctx.maxTransfer) return Status.INVALID_FIELD;
  const range = checkRange(ctx, req, blocks);
  if (range !== Status.SUCCESS) return range;
  const mapped = mapData(ctx, req, bytes, false);
  if (mapped !== Status.SUCCESS) return mapped;
  const offset = req.lba * ctx.blockSize;
  const stored = Buffer.allocUnsafe(bytes);
  const run = async (): Promise<number> => {
    await ctx.backend.read(offset, stored);
    let guest: readonly Buffer[] = req.xfer.bufs;
    if (req.xfer.bounced) {
      const copy = Buffer.alloc(bytes);
      const s = await copyFromGuest(ctx.dma, req.segs, copy);
      if (s !== Status.SUCCESS) return s;
      guest = [copy];
    }
    ctx.stats.units512Read += bytes / 512;
    ctx.stats.hostReads++;
    let at = 0;
    for (const b of guest) {
      if (stored.compare(b, 0, b.length, at, at + b.length) !== 0) return Status.COMPARE_FAILED;
      at += b.length;
    }
    return Status.SUCCESS;
  };
  return run().then(
    (s) => {
      req.xfer.release();
      return s;
    },
    (err: unknown) => {
      req.xfer.release();
      return mediaError(ctx, req, err, false);
    },
  );
}

/** Runs a backend operation; its failure is a media error. */
function settle(ctx: IoContext, req: Request, op: () => Promise<void>, write: boolean): Promise<number> {
  let p: Promise<void>;
  try {
    p = op();
  } catch (err) {
    p = Promise.reject(err);
  }
  return p.then(
    () => Status.SUCCESS,
    (err: unknown) => mediaError(ctx, req, err, write),
  );
}

function mediaError(ctx: IoContext, req: Request, err: unknown, write: boolean): number {
  // A bounce copy through DMA_READ/DMA_WRITE messages that failed is the guest's map, not the media.
  if (err instanceof DmaError) return Status.DATA_XFER_ERROR;
  // The kernel refused to copy to or from guest memory (a map the client truncated): not the media.
  if ((err as NodeJS.ErrnoException | null)?.code === 'EFAULT') return Status.DATA_XFER_ERROR;
  ctx.stats.mediaErrors++;
  ctx.backendError(req, err);
  return write ? Status.WRITE_FAULT : Status.READ_ERROR;
}

function readv(backend: BlockBackend, offset: number, bufs: readonly Buffer[]): Promise<void> {
  if (bufs.length === 1) return backend.read(offset, bufs[0]!);
  if (backend.readv) return backend.readv(offset, bufs);
  return sequential(bufs, offset, (at, b) => backend.read(at, b));
}

function writev(backend: BlockBackend, offset: number, bufs: readonly Buffer[], fua: boolean): Promise<void> {
  if (bufs.length === 1) return backend.write(offset, bufs[0]!, fua);
  if (backend.writev) return backend.writev(offset, bufs, fua);
  return sequential(bufs, offset, (at, b) => backend.write(at, b, fua));
}

async function sequential(bufs: readonly Buffer[], offset: number, op: (at: number, b: Buffer) => Promise<void>): Promise<void> {
  let at = offset;
  for (const b of bufs) {
    await op(at, b);
    at += b.length;
  }
}

async function bounceRead(ctx: IoContext, req: Request, offset: number, bytes: number): Promise<void> {
  const tmp = Buffer.allocUnsafe(bytes);
  await ctx.backend.read(offset, tmp);
  let done = 0;
  for (let s = 0; s < req.segs.count; s++) {
    const n = req.segs.length[s]!;
    await ctx.dma.write(req.segs.iova[s]!, tmp.subarray(done, done + n));
    done += n;
  }
}

async function bounceWrite(ctx: IoContext, req: Request, offset: number, bytes: number, fua: boolean): Promise<void> {
  const tmp = Buffer.allocUnsafe(bytes);
  let done = 0;
  for (let s = 0; s < req.segs.count; s++) {
    const n = req.segs.length[s]!;
    await ctx.dma.read(req.segs.iova[s]!, tmp.subarray(done, done + n));
    done += n;
  }
  await ctx.backend.write(offset, tmp, fua);
}
