/**
 * A small scripted NVMe controller for the driver tests, standing in until the real controller
 * (lib/devices/nvme) exists. Minimal but honest: it is a {@link PciDevice} (NVMe class code,
 * 64-bit BAR0 with registers and doorbells, MSI-X in BAR4), it implements the CC.EN / CSTS.RDY
 * handshake, shutdown, the admin queue and I/O queue pairs in guest memory reached through its
 * DmaSpace, PRP1/PRP2/PRP-list walking, phase-tagged completions and per-CQ MSI-X interrupts,
 * and it checks what a controller checks (queue ids and sizes, vectors, LBA ranges, NSIDs,
 * opcodes, transfer sizes) with NVMe statuses. Data lives in a Buffer.
 *
 * Options let tests shape it: queue limits, MDTS, block size, optional Write Zeroes / DSM, the
 * doorbell page offered as a sparse mmap area (then polled, like SPDK's vfio-user target), a
 * delay before CSTS.RDY follows CC.EN, and `swallow` to never complete chosen commands.
 */
import { performance } from 'node:perf_hooks';
import { Fd } from '../../../lib/native/fd';
import { Mapping } from '../../../lib/native/mapping';
import { createMemfd } from '../../../lib/native/memfd';
import { DmaError } from '../../../lib/server/dma';
import type { ResetReason } from '../../../lib/server/device';
import { PciDevice } from '../../../lib/pci/device';
import { ClassCode } from '../../../lib/pci/ids';
import { AdminOpcode, FeatureId, IoOpcode, Status } from '../../../lib/nvme/constants';

const BAR0_SIZE = 0x4000;
const DOORBELLS = 0x1000;
const MSIX_BAR = 4;

export interface ScriptedNvmeOptions {
  /** Namespace 1 size in blocks (default 4096). */
  blocks?: number;
  /** Block size (default 512). */
  blockSize?: number;
  /** CAP.MQES + 1 (default 1024). */
  maxQueueEntries?: number;
  /** I/O queues granted at most (default 16). */
  maxIoQueues?: number;
  /** MSI-X vectors (default 17). */
  msixVectors?: number;
  /** MDTS (log2 of 4 KiB pages; 0 = unlimited; default 5 = 128 KiB). */
  mdts?: number;
  /** Offer the doorbell page for mmap and poll it (default false). */
  mmapDoorbells?: boolean;
  /** Support Write Zeroes and Dataset Management (default true). */
  writeZeroes?: boolean;
  dsm?: boolean;
  /** CAP.TO in 500 ms units (default 1). */
  timeoutUnits?: number;
  /** Milliseconds between CC.EN changing and CSTS.RDY following (default 0: at once). */
  readyDelayMs?: number;
  /** Bytes between doorbells: 4 << CAP.DSTRD (default 4). */
  doorbellStride?: number;
}

interface SubmissionQueue {
  qid: number;
  base: number;
  size: number;
  head: number;
  tail: number;
  cqid: number;
}

interface CompletionQueue {
  qid: number;
  base: number;
  size: number;
  head: number;
  tail: number;
  phase: number;
  ien: boolean;
  vector: number;
}

/** A command's status and result dword. */
interface Outcome {
  status: number;
  dw0: number;
}

const OK: Outcome = { status: Status.SUCCESS, dw0: 0 };
const fail = (status: number): Outcome => ({ status, dw0: 0 });

export class ScriptedNvmeDevice extends PciDevice {
  readonly blocks: number;
  readonly blockSize: number;
  readonly storage: Buffer;
  readonly maxQueueEntries: number;
  readonly maxIoQueues: number;
  readonly vectorCount: number;
  readonly mdts: number;
  readonly options: Required<ScriptedNvmeOptions>;

  /** Never complete commands for which this returns true (tests of timeouts). */
  swallow: ((qid: number, opcode: number) => boolean) | null = null;
  /** Counters for tests. */
  readonly stats = { commands: 0, doorbellWrites: 0, interrupts: 0, mmapPolls: 0, swallowed: 0 };

  private cc = 0;
  private csts = 0;
  private aqa = 0;
  private asq = 0;
  private acq = 0;
  private grantedQueues = 0;
  private readonly sqs = new Map<number, SubmissionQueue>();
  private readonly cqs = new Map<number, CompletionQueue>();
  private readonly doorbellFd: Fd | null;
  private readonly doorbellPage: Mapping | null;
  private pollTimer: NodeJS.Timeout | NodeJS.Immediate | null = null;
  private readyTimer: NodeJS.Timeout | null = null;
  private processing = false;

  constructor(options: ScriptedNvmeOptions = {}) {
    const o: Required<ScriptedNvmeOptions> = {
      blocks: options.blocks ?? 4096,
      blockSize: options.blockSize ?? 512,
      maxQueueEntries: options.maxQueueEntries ?? 1024,
      maxIoQueues: options.maxIoQueues ?? 16,
      msixVectors: options.msixVectors ?? 17,
      mdts: options.mdts ?? 5,
      mmapDoorbells: options.mmapDoorbells ?? false,
      writeZeroes: options.writeZeroes ?? true,
      dsm: options.dsm ?? true,
      timeoutUnits: options.timeoutUnits ?? 1,
      readyDelayMs: options.readyDelayMs ?? 0,
      doorbellStride: options.doorbellStride ?? 4,
    };
    let fd: Fd | null = null;
    let page: Mapping | null = null;
    if (o.mmapDoorbells) {
      fd = createMemfd('scripted-nvme-bar0', BAR0_SIZE);
      page = Mapping.map(fd, 0, BAR0_SIZE);
    }
    let self: ScriptedNvmeDevice | null = null;
    super({
      vendorId: 0x1b36,
      deviceId: 0x0010,
      classCode: ClassCode.STORAGE_NVME,
      express: true,
      pcie: true,
      bars: {
        0: {
          size: BAR0_SIZE,
          is64: true,
          read: (offset, dst) => self!.readBar0(offset, dst),
          write: (offset, src) => self!.writeBar0(offset, src),
          ...(fd !== null ? { mmap: { fd, fileOffset: 0, areas: [{ offset: DOORBELLS, size: 0x1000 }] } } : {}),
        },
        [MSIX_BAR]: { size: 0x1000, is64: true },
      },
      msix: { vectors: o.msixVectors, table: { bar: MSIX_BAR, offset: 0 }, pba: { bar: MSIX_BAR, offset: 0x800 } },
    });
    self = this;
    this.options = o;
    this.blocks = o.blocks;
    this.blockSize = o.blockSize;
    this.storage = Buffer.alloc(o.blocks * o.blockSize);
    this.maxQueueEntries = o.maxQueueEntries;
    this.maxIoQueues = o.maxIoQueues;
    this.vectorCount = o.msixVectors;
    this.mdts = o.mdts;
    this.doorbellFd = fd;
    this.doorbellPage = page;
  }

  /** CC as the host last wrote it, CSTS as the controller reports it. */
  get registers(): { cc: number; csts: number } {
    return { cc: this.cc, csts: this.csts };
  }

  /** I/O queues currently created. */
  get ioQueueCount(): { sq: number; cq: number } {
    return { sq: this.sqs.size - (this.sqs.has(0) ? 1 : 0), cq: this.cqs.size - (this.cqs.has(0) ? 1 : 0) };
  }

  close(): void {
    this.stopPolling();
    if (this.readyTimer !== null) clearTimeout(this.readyTimer);
    this.doorbellPage?.unmapNow();
    this.doorbellFd?.close();
  }

  protected override onReset(_reason: ResetReason): void {
    this.controllerReset();
    this.cc = 0;
  }

  // ---- registers ----

  private get pageSize(): number {
    return 1 << (12 + ((this.cc >>> 7) & 0xf));
  }

  private registerImage(): Buffer {
    const r = Buffer.alloc(0x40);
    const mqes = this.maxQueueEntries - 1;
    // CAP: MQES, CQR, TO; DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 0.
    r.writeUInt32LE((mqes | (1 << 16) | (this.options.timeoutUnits << 24)) >>> 0, 0x00);
    r.writeUInt32LE((1 << 5) | Math.log2(this.options.doorbellStride / 4), 0x04);
    r.writeUInt32LE(0x00010400, 0x08); // VS 1.4.0
    r.writeUInt32LE(this.cc, 0x14);
    r.writeUInt32LE(this.csts, 0x1c);
    r.writeUInt32LE(this.aqa, 0x24);
    r.writeUInt32LE(this.asq % 0x1_0000_0000, 0x28);
    r.writeUInt32LE(Math.floor(this.asq / 0x1_0000_0000), 0x2c);
    r.writeUInt32LE(this.acq % 0x1_0000_0000, 0x30);
    r.writeUInt32LE(Math.floor(this.acq / 0x1_0000_0000), 0x34);
    return r;
  }

  private readBar0(offset: number, dst: Buffer): void {
    dst.fill(0);
    if (offset < 0x40) {
      const img = this.registerImage();
      img.copy(dst, 0, offset, Math.min(0x40, offset + dst.length));
    }
  }

  private writeBar0(offset: number, src: Buffer): number | void {
    if (offset >= DOORBELLS) {
      if (offset % 4 !== 0 || src.length !== 4) return 22; // EINVAL: doorbells are dwords
      const value = src.readUInt32LE(0);
      this.stats.doorbellWrites++;
      if (this.doorbellPage !== null) this.doorbellPage.bytes.writeUInt32LE(value, offset);
      const stride = this.options.doorbellStride;
      if ((offset - DOORBELLS) % stride === 0) this.doorbell((offset - DOORBELLS) / stride, value);
      return;
    }
    const img = this.registerImage();
    src.copy(img, offset, 0, Math.max(0, Math.min(src.length, 0x40 - offset)));
    const touches = (reg: number, size: number) => offset < reg + size && reg < offset + src.length;
    if (touches(0x24, 4)) this.aqa = img.readUInt32LE(0x24) & 0x0fff0fff;
    if (touches(0x28, 8)) this.asq = (img.readUInt32LE(0x2c) * 0x1_0000_0000 + img.readUInt32LE(0x28)) - (img.readUInt32LE(0x28) & 0xfff);
    if (touches(0x30, 8)) this.acq = (img.readUInt32LE(0x34) * 0x1_0000_0000 + img.readUInt32LE(0x30)) - (img.readUInt32LE(0x30) & 0xfff);
    if (touches(0x14, 4)) this.writeCc(img.readUInt32LE(0x14) & 0x00fffff1);
  }

  private writeCc(value: number): void {
    const was = this.cc;
    this.cc = value;
    const enable = (value & 1) !== 0 && (was & 1) === 0;
    const disable = (value & 1) === 0 && (was & 1) !== 0;
    if (enable) this.after(() => this.enable());
    if (disable) this.after(() => this.controllerReset());
    const shn = (value >>> 14) & 0x3;
    if (shn !== 0 && ((was >>> 14) & 0x3) === 0) {
      // Shutdown: nothing volatile to save; SHST complete at once.
      this.csts = (this.csts & ~0xc) | (2 << 2);
    }
    if (shn === 0) this.csts &= ~0xc;
  }

  private after(fn: () => void): void {
    if (this.options.readyDelayMs <= 0) {
      fn();
      return;
    }
    if (this.readyTimer !== null) clearTimeout(this.readyTimer);
    this.readyTimer = setTimeout(() => {
      this.readyTimer = null;
      fn();
    }, this.options.readyDelayMs);
  }

  private enable(): void {
    const iosqes = (this.cc >>> 16) & 0xf;
    const iocqes = (this.cc >>> 20) & 0xf;
    const mps = (this.cc >>> 7) & 0xf;
    const asqs = (this.aqa & 0xfff) + 1;
    const acqs = ((this.aqa >>> 16) & 0xfff) + 1;
    if (iosqes !== 6 || iocqes !== 4 || mps !== 0 || asqs < 2 || acqs < 2 || this.asq === 0 || this.acq === 0) {
      this.csts |= 0x2; // CFS: a configuration this controller cannot run
      return;
    }
    this.sqs.set(0, { qid: 0, base: this.asq, size: asqs, head: 0, tail: 0, cqid: 0 });
    this.cqs.set(0, { qid: 0, base: this.acq, size: acqs, head: 0, tail: 0, phase: 1, ien: true, vector: 0 });
    this.grantedQueues = 0;
    this.csts = (this.csts & ~0x2) | 0x1;
    this.doorbellPage?.bytes.fill(0, DOORBELLS);
    if (this.doorbellPage !== null) this.startPolling();
  }

  /** CC.EN 1 -> 0 (or a device reset): queues deleted, CSTS.RDY 0. */
  private controllerReset(): void {
    this.stopPolling();
    this.sqs.clear();
    this.cqs.clear();
    this.grantedQueues = 0;
    this.csts = 0;
    this.doorbellPage?.bytes.fill(0, DOORBELLS);
  }

  // ---- doorbells ----

  private sqDoorbell(qid: number): number {
    return DOORBELLS + 2 * qid * this.options.doorbellStride;
  }

  private cqDoorbell(qid: number): number {
    return DOORBELLS + (2 * qid + 1) * this.options.doorbellStride;
  }

  private doorbell(index: number, value: number): void {
    if ((this.csts & 1) === 0) return;
    const qid = index >>> 1;
    if ((index & 1) === 0) {
      const sq = this.sqs.get(qid);
      if (sq === undefined || value >= sq.size) return; // invalid doorbell: ignored (no AER here)
      sq.tail = value;
    } else {
      const cq = this.cqs.get(qid);
      if (cq === undefined || value >= cq.size) return;
      cq.head = value;
    }
    this.processAll();
  }

  private startPolling(): void {
    if (this.pollTimer !== null) return;
    // Adaptive, as an SPDK poller that backs off: spin while doorbells move (and 20 ms after),
    // then look once a millisecond.
    let lastActivity = 0;
    const tick = () => {
      this.pollTimer = null;
      if ((this.csts & 1) === 0 || this.doorbellPage === null || this.doorbellPage.state !== 'mapped') return;
      this.stats.mmapPolls++;
      const now = performance.now();
      if (this.scanDoorbells()) lastActivity = now;
      this.pollTimer = now - lastActivity < 20 ? setImmediate(tick) : setTimeout(tick, 1);
    };
    this.pollTimer = setTimeout(tick, 1);
  }

  private stopPolling(): void {
    if (this.pollTimer === null) return;
    clearTimeout(this.pollTimer as NodeJS.Timeout);
    clearImmediate(this.pollTimer as NodeJS.Immediate);
    this.pollTimer = null;
  }

  /** Picks up doorbell stores in the mapped page. True if something changed. */
  private scanDoorbells(): boolean {
    const page = this.doorbellPage!.bytes;
    let changed = false;
    for (const sq of this.sqs.values()) {
      const v = page.readUInt32LE(this.sqDoorbell(sq.qid));
      if (v !== sq.tail && v < sq.size) {
        sq.tail = v;
        changed = true;
      }
    }
    for (const cq of this.cqs.values()) {
      const v = page.readUInt32LE(this.cqDoorbell(cq.qid));
      if (v !== cq.head && v < cq.size) {
        cq.head = v;
        changed = true;
      }
    }
    if (changed) this.processAll();
    return changed;
  }

  // ---- command processing ----

  /** Runs every submission queue until it is empty or its CQ is full. */
  private processAll(): void {
    if (this.processing) return;
    this.processing = true;
    try {
      let progress = true;
      while (progress && (this.csts & 1) !== 0) {
        progress = false;
        for (const sq of [...this.sqs.values()]) {
          if (this.processQueue(sq)) progress = true;
        }
      }
    } finally {
      this.processing = false;
    }
  }

  private processQueue(sq: SubmissionQueue): boolean {
    const cq = this.cqs.get(sq.cqid);
    if (cq === undefined) return false;
    let posted = 0;
    while (sq.head !== sq.tail && this.sqs.get(sq.qid) === sq) {
      if ((cq.tail + 1) % cq.size === cq.head) break; // CQ full: wait for the head doorbell
      let sqe: Buffer;
      try {
        sqe = Buffer.from(this.dma.view(sq.base + sq.head * 64, 64, false));
      } catch {
        this.csts |= 0x2; // the queue itself is unreachable: controller fatal status
        return false;
      }
      sq.head = (sq.head + 1) % sq.size;
      this.stats.commands++;
      const opcode = sqe[0]!;
      const cid = sqe.readUInt16LE(2);
      if (this.swallow?.(sq.qid, opcode)) {
        this.stats.swallowed++;
        continue;
      }
      const r = sq.qid === 0 ? this.admin(sqe) : this.io(sqe);
      if (!this.post(cq, sq, cid, r)) return false;
      posted++;
      if (sq.qid === 0 && opcode === AdminOpcode.DELETE_SQ) break; // queues changed under us
    }
    if (posted > 0 && cq.ien) {
      this.stats.interrupts++;
      this.interrupt(cq.vector);
    }
    return posted > 0;
  }

  private post(cq: CompletionQueue, sq: SubmissionQueue, cid: number, r: Outcome): boolean {
    let cqe: Buffer;
    try {
      cqe = this.dma.view(cq.base + cq.tail * 16, 16, true);
    } catch {
      this.csts |= 0x2;
      return false;
    }
    cqe.writeUInt32LE(r.dw0 >>> 0, 0);
    cqe.writeUInt32LE(0, 4);
    cqe.writeUInt32LE((sq.head | (sq.qid << 16)) >>> 0, 8);
    // Status and phase last: the host polls that dword.
    cqe.writeUInt32LE((cid | (((r.status << 1) | cq.phase) << 16)) >>> 0, 12);
    cq.tail = (cq.tail + 1) % cq.size;
    if (cq.tail === 0) cq.phase ^= 1;
    return true;
  }

  // ---- admin ----

  private admin(sqe: Buffer): Outcome {
    const opcode = sqe[0]!;
    const nsid = sqe.readUInt32LE(4);
    const cdw10 = sqe.readUInt32LE(40);
    const cdw11 = sqe.readUInt32LE(44);
    switch (opcode) {
      case AdminOpcode.IDENTIFY:
        return this.identify(sqe, cdw10 & 0xff, nsid);
      case AdminOpcode.SET_FEATURES:
        return this.setFeatures(cdw10 & 0xff, cdw11);
      case AdminOpcode.GET_FEATURES:
        if ((cdw10 & 0xff) === FeatureId.NUM_QUEUES) {
          const g = Math.max(1, this.grantedQueues) - 1;
          return { status: 0, dw0: (g | (g << 16)) >>> 0 };
        }
        if ((cdw10 & 0xff) === FeatureId.VOLATILE_WC) return OK;
        return fail(Status.INVALID_FIELD);
      case AdminOpcode.CREATE_CQ:
        return this.createCq(sqe, cdw10, cdw11);
      case AdminOpcode.CREATE_SQ:
        return this.createSq(sqe, cdw10, cdw11);
      case AdminOpcode.DELETE_SQ: {
        const qid = cdw10 & 0xffff;
        if (qid === 0 || !this.sqs.has(qid)) return fail(Status.QID_INVALID);
        this.sqs.delete(qid);
        return OK;
      }
      case AdminOpcode.DELETE_CQ: {
        const qid = cdw10 & 0xffff;
        if (qid === 0 || !this.cqs.has(qid)) return fail(Status.QID_INVALID);
        for (const sq of this.sqs.values()) if (sq.cqid === qid) return fail(Status.INVALID_QUEUE_DELETION);
        this.cqs.delete(qid);
        return OK;
      }
      case AdminOpcode.GET_LOG_PAGE: {
        const lid = cdw10 & 0xff;
        if (lid < 1 || lid > 3) return fail(Status.INVALID_LOG_PAGE);
        const length = (((cdw10 >>> 16) | ((cdw11 & 0xffff) << 16)) + 1) * 4;
        return this.toHost(sqe, Buffer.alloc(length));
      }
      default:
        return fail(Status.INVALID_OPCODE);
    }
  }

  private identify(sqe: Buffer, cns: number, nsid: number): Outcome {
    const data = Buffer.alloc(4096);
    if (cns === 0x01) {
      data.writeUInt16LE(0x1b36, 0);
      data.writeUInt16LE(0x1af4, 2);
      data.write('SCRIPTED0001'.padEnd(20, ' '), 4, 'latin1');
      data.write('vfio-user scripted NVMe'.padEnd(40, ' '), 24, 'latin1');
      data.write('1.0'.padEnd(8, ' '), 64, 'latin1');
      data[77] = this.mdts;
      data.writeUInt16LE(1, 78); // CNTLID
      data.writeUInt32LE(0x00010400, 80); // VER
      data[111] = 1; // I/O controller
      data[512] = 0x66; // SQES
      data[513] = 0x44; // CQES
      data.writeUInt32LE(1, 516); // NN
      data.writeUInt16LE((this.options.dsm ? 1 << 2 : 0) | (this.options.writeZeroes ? 1 << 3 : 0), 520); // ONCS
      data[525] = 0x1; // VWC present
      data.write('nqn.2026-01.io.vfio-user:scripted', 768, 'latin1');
    } else if (cns === 0x00) {
      if (nsid === 1) {
        data.writeBigUInt64LE(BigInt(this.blocks), 0);
        data.writeBigUInt64LE(BigInt(this.blocks), 8);
        data.writeBigUInt64LE(BigInt(this.blocks), 16);
        data[25] = 0; // NLBAF: one format
        data[26] = 0; // FLBAS: format 0
        data[33] = 0x1 | 0x8; // DLFEAT: deallocated reads zeroes; Write Zeroes DEAC
        data.write('00112233445566778899aabbccddeeff', 104, 'hex');
        data[128 + 2] = Math.log2(this.blockSize);
      } else if (nsid !== 0xffffffff) {
        return fail(Status.INVALID_NS);
      }
    } else if (cns === 0x02) {
      if (nsid < 1) data.writeUInt32LE(1, 0);
    } else {
      return fail(Status.INVALID_FIELD);
    }
    return this.toHost(sqe, data);
  }

  private setFeatures(fid: number, cdw11: number): Outcome {
    if (fid === FeatureId.NUM_QUEUES) {
      const nsq = (cdw11 & 0xffff) + 1;
      const ncq = (cdw11 >>> 16) + 1;
      if (nsq === 0x10000 || ncq === 0x10000) return fail(Status.INVALID_FIELD);
      this.grantedQueues = Math.min(Math.max(nsq, ncq), this.maxIoQueues);
      const g = this.grantedQueues - 1;
      return { status: 0, dw0: (g | (g << 16)) >>> 0 };
    }
    if (fid === FeatureId.VOLATILE_WC) return OK;
    return fail(Status.INVALID_FIELD);
  }

  private createCq(sqe: Buffer, cdw10: number, cdw11: number): Outcome {
    const qid = cdw10 & 0xffff;
    const size = (cdw10 >>> 16) + 1;
    const base = this.prp1(sqe);
    const vector = cdw11 >>> 16;
    if (qid === 0 || qid > Math.max(this.grantedQueues, 0) || this.cqs.has(qid)) return fail(Status.QID_INVALID);
    if (size < 2 || size > this.maxQueueEntries) return fail(Status.QUEUE_SIZE);
    if ((cdw11 & 0x1) === 0) return fail(Status.INVALID_FIELD); // CAP.CQR: contiguous only
    if (vector >= this.vectorCount) return fail(Status.INVALID_VECTOR);
    if (base % this.pageSize !== 0) return fail(Status.PRP_INVALID_OFFSET);
    this.cqs.set(qid, { qid, base, size, head: 0, tail: 0, phase: 1, ien: (cdw11 & 0x2) !== 0, vector });
    // A new queue starts at 0, whatever a deleted one left in the mapped doorbell.
    this.doorbellPage?.bytes.writeUInt32LE(0, this.cqDoorbell(qid));
    return OK;
  }

  private createSq(sqe: Buffer, cdw10: number, cdw11: number): Outcome {
    const qid = cdw10 & 0xffff;
    const size = (cdw10 >>> 16) + 1;
    const base = this.prp1(sqe);
    const cqid = cdw11 >>> 16;
    if (qid === 0 || qid > this.grantedQueues || this.sqs.has(qid)) return fail(Status.QID_INVALID);
    if (size < 2 || size > this.maxQueueEntries) return fail(Status.QUEUE_SIZE);
    if ((cdw11 & 0x1) === 0) return fail(Status.INVALID_FIELD);
    if (cqid === 0 || !this.cqs.has(cqid)) return fail(Status.CQ_INVALID);
    if (base % this.pageSize !== 0) return fail(Status.PRP_INVALID_OFFSET);
    this.sqs.set(qid, { qid, base, size, head: 0, tail: 0, cqid });
    this.doorbellPage?.bytes.writeUInt32LE(0, this.sqDoorbell(qid));
    return OK;
  }

  // ---- I/O ----

  private io(sqe: Buffer): Outcome {
    const opcode = sqe[0]!;
    const nsid = sqe.readUInt32LE(4);
    const cdw10 = sqe.readUInt32LE(40);
    const cdw11 = sqe.readUInt32LE(44);
    const cdw12 = sqe.readUInt32LE(48);
    if (opcode === IoOpcode.FLUSH) return nsid === 1 || nsid === 0xffffffff ? OK : fail(Status.INVALID_NS);
    if (nsid !== 1) return fail(Status.INVALID_NS);
    const slba = cdw11 * 0x1_0000_0000 + cdw10;
    const nlb = (cdw12 & 0xffff) + 1;
    switch (opcode) {
      case IoOpcode.READ:
      case IoOpcode.WRITE: {
        if (slba + nlb > this.blocks) return fail(Status.LBA_RANGE);
        const length = nlb * this.blockSize;
        if (this.mdts > 0 && length > 4096 * 2 ** this.mdts) return fail(Status.INVALID_FIELD);
        const at = slba * this.blockSize;
        return opcode === IoOpcode.READ ? this.toHost(sqe, this.storage.subarray(at, at + length)) : this.fromHost(sqe, this.storage.subarray(at, at + length));
      }
      case IoOpcode.WRITE_ZEROES:
        if (!this.options.writeZeroes) return fail(Status.INVALID_OPCODE);
        if (slba + nlb > this.blocks) return fail(Status.LBA_RANGE);
        this.storage.fill(0, slba * this.blockSize, (slba + nlb) * this.blockSize);
        return OK;
      case IoOpcode.DSM: {
        if (!this.options.dsm) return fail(Status.INVALID_OPCODE);
        const nr = (cdw10 & 0xff) + 1;
        const ranges = Buffer.alloc(nr * 16);
        const got = this.fromHost(sqe, ranges);
        if (got.status !== 0) return got;
        if ((cdw11 & 0x4) === 0) return OK; // only attributes: nothing to do
        for (let i = 0; i < nr; i++) {
          const count = ranges.readUInt32LE(i * 16 + 4);
          const lba = ranges.readUInt32LE(i * 16 + 12) * 0x1_0000_0000 + ranges.readUInt32LE(i * 16 + 8);
          if (lba + count > this.blocks) return fail(Status.LBA_RANGE);
        }
        for (let i = 0; i < nr; i++) {
          const count = ranges.readUInt32LE(i * 16 + 4);
          const lba = ranges.readUInt32LE(i * 16 + 12) * 0x1_0000_0000 + ranges.readUInt32LE(i * 16 + 8);
          this.storage.fill(0, lba * this.blockSize, (lba + count) * this.blockSize);
        }
        return OK;
      }
      default:
        return fail(Status.INVALID_OPCODE);
    }
  }

  // ---- data transfer through PRPs ----

  private prp1(sqe: Buffer): number {
    return sqe.readUInt32LE(28) * 0x1_0000_0000 + sqe.readUInt32LE(24);
  }

  /** The guest segments of a transfer of `length` bytes (NVMe 1.4 4.3), or a status. */
  private segments(sqe: Buffer, length: number): [number, number][] | number {
    if ((sqe[1]! & 0xc0) !== 0) return Status.INVALID_FIELD; // SGLs not supported
    const ps = this.pageSize;
    const prp1 = this.prp1(sqe);
    const prp2 = sqe.readUInt32LE(36) * 0x1_0000_0000 + sqe.readUInt32LE(32);
    if (prp1 % 4 !== 0) return Status.PRP_INVALID_OFFSET;
    const first = Math.min(length, ps - (prp1 % ps));
    const out: [number, number][] = [[prp1, first]];
    let rest = length - first;
    if (rest === 0) return out;
    if (rest <= ps) {
      if (prp2 % ps !== 0) return Status.PRP_INVALID_OFFSET;
      out.push([prp2, rest]);
      return out;
    }
    if (prp2 % 8 !== 0) return Status.PRP_INVALID_OFFSET;
    let entry = prp2;
    try {
      while (rest > 0) {
        const lastInPage = (entry + 8) % ps === 0;
        const value = this.dma.view(entry, 8, false);
        const addr = value.readUInt32LE(4) * 0x1_0000_0000 + value.readUInt32LE(0);
        if (lastInPage && rest > ps) {
          if (addr % 8 !== 0) return Status.PRP_INVALID_OFFSET;
          entry = addr; // chain to the next list page
          continue;
        }
        if (addr % ps !== 0) return Status.PRP_INVALID_OFFSET;
        const n = Math.min(rest, ps);
        out.push([addr, n]);
        rest -= n;
        entry += 8;
      }
    } catch (err) {
      if (err instanceof DmaError) return Status.DATA_XFER_ERROR;
      throw err;
    }
    return out;
  }

  /** Controller -> host: `data` into the command's buffer. */
  private toHost(sqe: Buffer, data: Buffer): Outcome {
    return this.move(sqe, data, true);
  }

  /** Host -> controller: the command's buffer into `data`. */
  private fromHost(sqe: Buffer, data: Buffer): Outcome {
    return this.move(sqe, data, false);
  }

  private move(sqe: Buffer, data: Buffer, toHost: boolean): Outcome {
    const segs = this.segments(sqe, data.length);
    if (typeof segs === 'number') return fail(segs);
    try {
      let at = 0;
      for (const [iova, n] of segs) {
        const view = this.dma.view(iova, n, toHost);
        if (toHost) data.copy(view, 0, at, at + n);
        else view.copy(data, at, 0, n);
        at += n;
      }
    } catch (err) {
      if (err instanceof DmaError) return fail(Status.DATA_XFER_ERROR);
      throw err;
    }
    return OK;
  }
}
