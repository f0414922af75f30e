/**
 * `VirtioBlkDevice`: a virtio block device (virtio 1.2, 5.2) on the modern virtio-pci transport,
 * served over vfio-user, on any {@link BlockBackend} (RAM, file, NBD). Linux binds it with
 * `virtio_pci` + `virtio_blk` (PCI 1af4:1042).
 *
 * Requests (5.2.6): IN (read), OUT (write), FLUSH, GET_ID, DISCARD and WRITE_ZEROES, on
 * `queues` request queues (VIRTIO_BLK_F_MQ). Offered: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH,
 * CONFIG_WCE, MQ, DISCARD and WRITE_ZEROES, or RO instead of the last two for a read-only disk.
 *
 * Data moves between the backend and zero-copy views of the request's buffers (held mapped until
 * the backend is done). Write caching: with FLUSH negotiated and `writeback` 1 (the default; the
 * driver may change it with CONFIG_WCE) writes complete when the backend has them and FLUSH makes
 * them durable; otherwise every write is durable before it completes (write-through).
 *
 * Errors, all values: a request the device cannot parse at all (no status byte, a header shorter
 * than 16 bytes) sets DEVICE_NEEDS_RESET, as QEMU does; everything else is a status — IOERR for a
 * sector range past the capacity, a data length that is not a multiple of 512, data outside the
 * client's maps or without the access needed, a write to a read-only disk, more segments than
 * `seg_max` or a buffer larger than `size_max`, a backend failure; UNSUPP for unknown request
 * types, DISCARD with the UNMAP flag, unknown range flags, or DISCARD/WRITE_ZEROES not negotiated.
 *
 * @packageDocumentation
 */
import { randomBytes } from 'node:crypto';
import { RESOLVED, zeroRange, type BlockBackend } from '../../block/backend';
import { ClassCode } from '../../pci/ids';
import { DmaError } from '../../server/dma';
import { ElementData } from '../../virtio/data';
import { VirtioPciDevice, type NotifyMode } from '../../virtio/pci';
import type { PollPolicy } from '../../pci/poller';
import {
  BLK_ID_BYTES,
  BLK_SECTOR_SIZE,
  BlkConfig,
  BlkDiscardWriteZeroes,
  BlkDwzFlags,
  BlkFeature,
  BlkReqHeader,
  BlkReqType,
  BlkStatus,
  VirtioDeviceId,
  featureBit,
} from '../../virtio/spec';
import { SplitVirtqueue, VirtqElement, readU64 } from '../../virtio/virtqueue';

/** Options of {@link VirtioBlkDevice}. */
export interface VirtioBlkOptions {
  /** The disk; the device owns it from now on and closes it in {@link VirtioBlkDevice.close}. */
  backend: BlockBackend;
  /** Request queues, 1..64 (default 4). */
  queues?: number;
  /** Largest queue size, a power of two from 4 to 32768 (default 256). */
  queueSize?: number;
  /** Logical block size `blk_size`: 512, 1024, 2048 or 4096 (default 512). */
  blockSize?: number;
  /** A read-only disk (VIRTIO_BLK_F_RO): writes, discards and write-zeroes fail. Always so on a read-only backend. */
  readOnly?: boolean;
  /** The GET_ID string, at most 20 ASCII characters (default: random). */
  serial?: string;
  /** `seg_max`: most data segments per request (default queueSize - 2). */
  segMax?: number;
  /** `size_max`: largest single buffer in bytes (default 4 MiB). */
  sizeMax?: number;
  /** How notifications arrive (default `'trap'`; see lib/virtio/pci.ts). */
  notify?: NotifyMode;
  /** Polling policy for `'mmap'` notifications. */
  poll?: Partial<PollPolicy>;
  /** `'trap'` only: poll the rings this long after activity, notifications suppressed (default 0). */
  spinUs?: number;
  /** Receives one line per notable event (status changes, resets, errors). */
  trace?: (line: string) => void;
}

const MAX_QUEUES = 64;
const DEFAULT_QUEUES = 4;
const DEFAULT_SIZE_MAX = 4 << 20;
/** Discard: most sectors per range, most ranges per request (Linux uses at most 256). */
const MAX_DISCARD_SECTORS = 1 << 22;
const MAX_DISCARD_SEG = 256;
/** Write zeroes: most sectors per range (32 MiB: backends without holes write real zeroes), ranges per request. */
const MAX_WRITE_ZEROES_SECTORS = 1 << 16;
const MAX_WRITE_ZEROES_SEG = 1;

/** Counters of the I/O path. */
export interface VirtioBlkStats {
  reads: number;
  writes: number;
  bytesRead: number;
  bytesWritten: number;
  flushes: number;
  discards: number;
  writeZeroes: number;
  /** Requests that completed with IOERR or UNSUPP. */
  errors: number;
}

/** One request in flight: the element plus the parsed header, data views and result. */
export class BlkRequest extends VirtqElement {
  type = 0;
  /** First sector (-1 when the header's is above 2^53). */
  sector = 0;
  /** Bytes of data (IN: device-writable, OUT: device-readable). */
  dataLen = 0;
  readonly data = new ElementData();
  /** Discard / write-zeroes ranges: sector, count, flags (parsed before any await). */
  readonly ranges: number[] = [];
  /** Made once per pooled request, so settling a request allocates no closure. */
  readonly onIoDone: () => void;
  readonly onIoFailed: (err: unknown) => void;

  constructor(queue: SplitVirtqueue, device: VirtioBlkDevice) {
    super(queue);
    this.onIoDone = () => device.ioDone(this);
    this.onIoFailed = (err: unknown) => device.ioFailed(this, err);
  }
}

export class VirtioBlkDevice extends VirtioPciDevice<BlkRequest> {
  readonly backend: BlockBackend;
  readonly blockSize: number;
  /** Capacity in 512-byte sectors (whole logical blocks of the backend). */
  readonly capacity: number;
  readonly readOnly: boolean;
  readonly serial: string;
  readonly segMax: number;
  readonly sizeMax: number;
  readonly stats: VirtioBlkStats = { reads: 0, writes: 0, bytesRead: 0, bytesWritten: 0, flushes: 0, discards: 0, writeZeroes: 0, errors: 0 };
  private readonly capacityBytes: number;
  private readonly configImage = Buffer.alloc(BlkConfig.SIZE);
  private readonly id = Buffer.alloc(BLK_ID_BYTES);
  private readonly header = Buffer.alloc(BlkReqHeader.SIZE);
  private readonly rangeScratch = Buffer.alloc(MAX_DISCARD_SEG * BlkDiscardWriteZeroes.SIZE);
  private writeThrough = true;

  constructor(options: VirtioBlkOptions) {
    const queues = options.queues ?? DEFAULT_QUEUES;
    if (!Number.isInteger(queues) || queues < 1 || queues > MAX_QUEUES) throw new RangeError(`Expected queues from 1 to ${MAX_QUEUES}, got ${queues}`);
    const queueSize = options.queueSize ?? 256;
    if (!Number.isInteger(queueSize) || queueSize < 4) throw new RangeError(`Expected queueSize to be a power of two from 4 to 32768, got ${queueSize}`);
    const blockSize = options.blockSize ?? 512;
    if (![512, 1024, 2048, 4096].includes(blockSize)) throw new RangeError(`Expected blockSize 512, 1024, 2048 or 4096, got ${blockSize}`);
    const blocks = Math.floor(options.backend.size / blockSize);
    if (blocks < 1) throw new RangeError(`The backend (${options.backend.size} bytes) holds no ${blockSize}-byte block`);
    const segMax = options.segMax ?? queueSize - 2;
    if (!Number.isInteger(segMax) || segMax < 1 || segMax > queueSize - 2) throw new RangeError(`Expected segMax from 1 to ${queueSize - 2}, got ${segMax}`);
    const sizeMax = options.sizeMax ?? DEFAULT_SIZE_MAX;
    if (!Number.isInteger(sizeMax) || sizeMax < 4096 || sizeMax > 0xffff_ffff) throw new RangeError(`Expected sizeMax from 4096 to 2^32 - 1, got ${sizeMax}`);
    const serial = options.serial ?? `VB${randomBytes(6).toString('hex').toUpperCase()}`;
    if (Buffer.byteLength(serial, 'latin1') > BLK_ID_BYTES || !/^[\x20-\x7e]*$/.test(serial)) throw new RangeError(`Expected a serial of at most ${BLK_ID_BYTES} printable ASCII characters, got '${serial}'`);
    const readOnly = options.readOnly === true || options.backend.readOnly === true;
    let features = featureBit(BlkFeature.SIZE_MAX) | featureBit(BlkFeature.SEG_MAX) | featureBit(BlkFeature.BLK_SIZE) | featureBit(BlkFeature.FLUSH) | featureBit(BlkFeature.CONFIG_WCE) | featureBit(BlkFeature.MQ);
    features |= readOnly ? featureBit(BlkFeature.RO) : featureBit(BlkFeature.DISCARD) | featureBit(BlkFeature.WRITE_ZEROES);
    super({
      deviceType: VirtioDeviceId.BLOCK,
      classCode: ClassCode.STORAGE_SCSI,
      features,
      queues,
      queueSize,
      configSize: BlkConfig.SIZE,
      ...(options.notify !== undefined ? { notify: options.notify } : {}),
      ...(options.poll !== undefined ? { poll: options.poll } : {}),
      ...(options.spinUs !== undefined ? { spinUs: options.spinUs } : {}),
      ...(options.trace !== undefined ? { trace: options.trace } : {}),
    });
    this.backend = options.backend;
    this.blockSize = blockSize;
    this.capacityBytes = blocks * blockSize;
    this.capacity = this.capacityBytes / BLK_SECTOR_SIZE;
    this.readOnly = readOnly;
    this.serial = serial;
    this.segMax = segMax;
    this.sizeMax = sizeMax;
    this.id.write(serial, 'latin1');
    const c = this.configImage;
    c.writeBigUInt64LE(BigInt(this.capacity), BlkConfig.CAPACITY);
    c.writeUInt32LE(sizeMax, BlkConfig.SIZE_MAX);
    c.writeUInt32LE(segMax, BlkConfig.SEG_MAX);
    c.writeUInt32LE(blockSize, BlkConfig.BLK_SIZE);
    c[BlkConfig.WRITEBACK] = 1;
    c.writeUInt16LE(queues, BlkConfig.NUM_QUEUES);
    if (!readOnly) {
      c.writeUInt32LE(MAX_DISCARD_SECTORS, BlkConfig.MAX_DISCARD_SECTORS);
      c.writeUInt32LE(MAX_DISCARD_SEG, BlkConfig.MAX_DISCARD_SEG);
      c.writeUInt32LE(blockSize / BLK_SECTOR_SIZE, BlkConfig.DISCARD_SECTOR_ALIGNMENT);
      c.writeUInt32LE(MAX_WRITE_ZEROES_SECTORS, BlkConfig.MAX_WRITE_ZEROES_SECTORS);
      c.writeUInt32LE(MAX_WRITE_ZEROES_SEG, BlkConfig.MAX_WRITE_ZEROES_SEG);
      c[BlkConfig.WRITE_ZEROES_MAY_UNMAP] = options.backend.discardZeroes === true ? 1 : 0;
    }
  }

  /** True while writes are made durable before they complete (no write cache in use). */
  get writeCacheEnabled(): boolean {
    return !this.writeThrough;
  }

  // ---- VirtioPciDevice ----

  protected createElement(queue: SplitVirtqueue<BlkRequest>): BlkRequest {
    return new BlkRequest(queue as unknown as SplitVirtqueue, this);
  }

  protected readDeviceConfig(offset: number, dst: Buffer): void {
    this.configImage.copy(dst, 0, offset, offset + dst.length);
  }

  protected override writeDeviceConfig(offset: number, src: Buffer): void {
    // Only `writeback` is writable, and only with CONFIG_WCE (5.2.5).
    const at = BlkConfig.WRITEBACK - offset;
    if (at < 0 || at >= src.length || !this.negotiated(BlkFeature.CONFIG_WCE)) return;
    this.configImage[BlkConfig.WRITEBACK] = src[at]! & 1;
    this.updateCacheMode();
    this.trace?.(`virtio-blk: writeback ${this.configImage[BlkConfig.WRITEBACK]}`);
  }

  protected override onDriverOk(): void {
    // CONFIG_WCE without FLUSH: writeback starts at 0 (5.2.5.1).
    if (this.negotiated(BlkFeature.CONFIG_WCE) && !this.negotiated(BlkFeature.FLUSH)) this.configImage[BlkConfig.WRITEBACK] = 0;
    this.updateCacheMode();
  }

  protected override onVirtioReset(): void {
    this.configImage[BlkConfig.WRITEBACK] = 1;
    this.writeThrough = true;
  }

  protected override onClose(): Promise<void> {
    return this.backend.close();
  }

  private updateCacheMode(): void {
    this.writeThrough = !this.negotiated(BlkFeature.FLUSH) || this.configImage[BlkConfig.WRITEBACK] === 0;
  }

  // ---- requests ----

  protected handle(req: BlkRequest): void {
    // The status byte is the last device-writable byte; the header the first 16 readable ones.
    if (req.writable < 1 || req.readable < BlkReqHeader.SIZE) {
      this.needsReset(`queue ${req.queue.index}: request ${req.head} has no ${req.writable < 1 ? 'status byte' : 'header'}`);
      this.complete(req);
      return;
    }
    if (!this.readHeader(req)) return this.finish(req, BlkStatus.IOERR);
    req.dataLen = 0;
    switch (req.type) {
      case BlkReqType.IN:
        return this.readWrite(req, false);
      case BlkReqType.OUT:
        return this.readWrite(req, true);
      case BlkReqType.FLUSH:
        return this.flush(req);
      case BlkReqType.GET_ID:
        return this.getId(req);
      case BlkReqType.DISCARD:
      case BlkReqType.WRITE_ZEROES:
        return this.discardOrZero(req);
      default:
        return this.finish(req, BlkStatus.UNSUPP);
    }
  }

  /** Reads type and sector; usually from the first buffer directly, else through a copy. */
  private readHeader(req: BlkRequest): boolean {
    const mem = req.queue.mem;
    let buf: Buffer;
    let off: number;
    const first = req.addr[0]!;
    if (req.len[0]! >= BlkReqHeader.SIZE && first >= 0 && mem.locate(first, BlkReqHeader.SIZE, false)) {
      buf = mem.buf;
      off = mem.off;
    } else {
      if (!req.readInto(mem, 0, this.header)) return false;
      buf = this.header;
      off = 0;
    }
    req.type = buf.readUInt32LE(off + BlkReqHeader.TYPE);
    req.sector = readU64(buf, off + BlkReqHeader.SECTOR);
    return true;
  }

  /** True if `[sector, sector + bytes)` lies within the capacity. */
  private inRange(sector: number, bytes: number): boolean {
    return sector >= 0 && sector <= this.capacity && sector * BLK_SECTOR_SIZE + bytes <= this.capacityBytes;
  }

  private readWrite(req: BlkRequest, write: boolean): void {
    const bytes = write ? req.readable - BlkReqHeader.SIZE : req.writable - 1;
    req.dataLen = bytes;
    if (write && this.readOnly) return this.finish(req, BlkStatus.IOERR);
    if (bytes % BLK_SECTOR_SIZE !== 0 || !this.inRange(req.sector, bytes)) return this.finish(req, BlkStatus.IOERR);
    if (req.count > this.segMax + 2 || req.maxLen > this.sizeMax) return this.finish(req, BlkStatus.IOERR);
    if (bytes === 0) return this.finish(req, BlkStatus.OK);
    const dma = this.dma;
    if (!req.data.map(dma, req, !write, write ? BlkReqHeader.SIZE : 0, bytes)) return this.finish(req, BlkStatus.IOERR);
    const offset = req.sector * BLK_SECTOR_SIZE;
    const backend = this.backend;
    const data = req.data;
    let io: Promise<void>;
    try {
      if (data.bounced) io = write ? this.bounceWrite(req, offset) : this.bounceRead(req, offset);
      else if (data.count === 1) io = write ? backend.write(offset, data.views[0]!, this.writeThrough) : backend.read(offset, data.views[0]!);
      else if (write) io = backend.writev ? backend.writev(offset, data.list(), this.writeThrough) : sequential(backend, offset, data.list(), true, this.writeThrough);
      else io = backend.readv ? backend.readv(offset, data.list()) : sequential(backend, offset, data.list(), false, false);
    } catch (err) {
      io = Promise.reject(err);
    }
    settle(io, req);
  }

  /** @internal Backend I/O of a read or write finished. */
  ioDone(req: BlkRequest): void {
    const poisoned = req.data.poisoned(this.dma);
    req.data.release();
    if (poisoned) return this.finish(req, BlkStatus.IOERR);
    const s = this.stats;
    if (req.type === BlkReqType.IN) {
      s.reads++;
      s.bytesRead += req.dataLen;
    } else if (req.type === BlkReqType.OUT) {
      s.writes++;
      s.bytesWritten += req.dataLen;
    } else if (req.type === BlkReqType.FLUSH) s.flushes++;
    else if (req.type === BlkReqType.DISCARD) s.discards++;
    else if (req.type === BlkReqType.WRITE_ZEROES) s.writeZeroes++;
    this.finish(req, BlkStatus.OK);
  }

  /** @internal Backend I/O failed: a media error for this request. */
  ioFailed(req: BlkRequest, err: unknown): void {
    req.data.release();
    if (!(err instanceof DmaError)) this.trace?.(`virtio-blk: backend error (type ${req.type}, sector ${req.sector}): ${(err as Error)?.message ?? String(err)}`);
    this.finish(req, BlkStatus.IOERR);
  }

  private flush(req: BlkRequest): void {
    let io: Promise<void>;
    try {
      io = this.backend.flush();
    } catch (err) {
      io = Promise.reject(err);
    }
    settle(io, req);
  }

  private getId(req: BlkRequest): void {
    const n = Math.min(BLK_ID_BYTES, req.writable - 1);
    if (!req.writeFrom(req.queue.mem, 0, this.id.subarray(0, n))) return this.finish(req, BlkStatus.IOERR);
    req.dataLen = n;
    this.finish(req, BlkStatus.OK);
  }

  private discardOrZero(req: BlkRequest): void {
    const discard = req.type === BlkReqType.DISCARD;
    if (!this.negotiated(discard ? BlkFeature.DISCARD : BlkFeature.WRITE_ZEROES)) return this.finish(req, BlkStatus.UNSUPP);
    if (this.readOnly) return this.finish(req, BlkStatus.IOERR);
    const bytes = req.readable - BlkReqHeader.SIZE;
    const count = bytes / BlkDiscardWriteZeroes.SIZE;
    const maxSeg = discard ? MAX_DISCARD_SEG : MAX_WRITE_ZEROES_SEG;
    if (!Number.isInteger(count) || count < 1 || count > maxSeg) return this.finish(req, BlkStatus.IOERR);
    const list = this.rangeScratch.subarray(0, bytes);
    if (!req.readInto(req.queue.mem, BlkReqHeader.SIZE, list)) return this.finish(req, BlkStatus.IOERR);
    const maxSectors = discard ? MAX_DISCARD_SECTORS : MAX_WRITE_ZEROES_SECTORS;
    const ranges = req.ranges;
    ranges.length = 0;
    for (let i = 0; i < count; i++) {
      const at = i * BlkDiscardWriteZeroes.SIZE;
      const sector = readU64(list, at + BlkDiscardWriteZeroes.SECTOR);
      const sectors = list.readUInt32LE(at + BlkDiscardWriteZeroes.NUM_SECTORS);
      const flags = list.readUInt32LE(at + BlkDiscardWriteZeroes.FLAGS);
      // Unknown flags, and UNMAP on a discard, are UNSUPP (5.2.6.2).
      if ((flags & ~BlkDwzFlags.UNMAP) !== 0 || (discard && flags !== 0)) return this.finish(req, BlkStatus.UNSUPP);
      if (sectors > maxSectors || !this.inRange(sector, sectors * BLK_SECTOR_SIZE)) return this.finish(req, BlkStatus.IOERR);
      ranges.push(sector, sectors, flags);
    }
    this.runRanges(req, discard).then(req.onIoDone, req.onIoFailed);
  }

  private async runRanges(req: BlkRequest, discard: boolean): Promise<void> {
    const backend = this.backend;
    const ranges = req.ranges;
    for (let i = 0; i < ranges.length; i += 3) {
      const offset = ranges[i]! * BLK_SECTOR_SIZE;
      const length = ranges[i + 1]! * BLK_SECTOR_SIZE;
      if (length === 0) continue;
      const unmap = (ranges[i + 2]! & BlkDwzFlags.UNMAP) !== 0;
      if (discard) await backend.discard(offset, length);
      else if (unmap && backend.discardZeroes === true) await backend.discard(offset, length);
      else await zeroRange(backend, offset, length, this.writeThrough);
    }
  }

  /** Writes the status byte and returns the request to the driver. */
  private finish(req: BlkRequest, status: number): void {
    if (status !== BlkStatus.OK) this.stats.errors++;
    const data = status === BlkStatus.OK && (req.type === BlkReqType.IN || req.type === BlkReqType.GET_ID) ? req.dataLen : 0;
    req.written = data + 1;
    if (!req.writeByte(req.queue.mem, req.writable - 1, status)) {
      this.needsReset(`queue ${req.queue.index}: status byte of request ${req.head} is unreachable`);
    }
    this.complete(req);
  }

  private async bounceRead(req: BlkRequest, offset: number): Promise<void> {
    const tmp = Buffer.allocUnsafe(req.dataLen);
    await this.backend.read(offset, tmp);
    await req.data.scatter(this.dma, tmp);
  }

  private async bounceWrite(req: BlkRequest, offset: number): Promise<void> {
    const tmp = Buffer.allocUnsafe(req.dataLen);
    await req.data.gather(this.dma, tmp);
    await this.backend.write(offset, tmp, this.writeThrough);
  }
}

/**
 * Completes `req` when `io` settles. A synchronous backend's shared, already-resolved promise
 * (RAM) completes it at once: no promise, no microtask per request.
 */
function settle(io: Promise<void>, req: BlkRequest): void {
  if (io === RESOLVED) req.onIoDone();
  else io.then(req.onIoDone, req.onIoFailed);
}

async function sequential(backend: BlockBackend, offset: number, bufs: readonly Buffer[], write: boolean, fua: boolean): Promise<void> {
  let at = offset;
  for (const b of bufs) {
    if (write) await backend.write(at, b, fua);
    else await backend.read(at, b);
    at += b.length;
  }
}
