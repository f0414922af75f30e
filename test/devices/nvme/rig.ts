/**
 * A host-side NVMe driver for tests that drives an {@link NvmeController} only the way a client
 * would: region accesses to BAR0 and config space, guest memory in a memfd DMA-mapped into a real
 * DmaSpace, interrupts through a real IrqTable with eventfds. It builds SQEs in guest memory,
 * rings doorbells with REGION_WRITEs and reaps CQEs by phase tag.
 */
import { GuestMemory } from '../../helpers/guest-memory';
import { binding } from '../../../lib/native/binding';
import { Fd } from '../../../lib/native/fd';
import { IrqSetFlags, PciIrq, PciRegion } from '../../../lib/protocol/constants';
import { DmaSpace } from '../../../lib/server/dma';
import { IrqTable } from '../../../lib/server/irq';
import { NvmeController, type NvmeControllerOptions } from '../../../lib/devices/nvme/controller';
import { RamBackend, type BlockBackend } from '../../../lib/block';
import { AdminOpcode } from '../../../lib/nvme/constants';
import { Reg, cqHeadDoorbell, sqTailDoorbell } from '../../../lib/nvme/registers';

export const PAGE = 4096;

/** A command as a test writes it: any SQE field, defaults 0. */
export interface Command {
  opcode: number;
  flags?: number;
  cid?: number;
  nsid?: number;
  prp1?: number | bigint;
  prp2?: number | bigint;
  cdw10?: number;
  cdw11?: number;
  cdw12?: number;
  cdw13?: number;
  cdw14?: number;
  cdw15?: number;
}

/** A reaped completion. */
export interface Completion {
  dw0: number;
  dw1: number;
  sqhd: number;
  sqid: number;
  cid: number;
  /** Status field without the phase (SC | SCT << 8 | ... | DNR << 14). */
  status: number;
  phase: number;
}

/** Status without DNR/More/CRD. */
export const sc = (c: Completion) => c.status & 0x7ff;

/** The host's side of one queue pair. */
export class HostQueue {
  sqTail = 0;
  sqHead = 0;
  cqHead = 0;
  phase = 1;
  nextCid = 0;
  readonly done = new Map<number, Completion>();

  constructor(
    readonly id: number,
    readonly sqIova: number,
    readonly sqSize: number,
    readonly cqIova: number,
    readonly cqSize: number,
  ) {}
}

export interface RigOptions extends Partial<NvmeControllerOptions> {
  /** Guest memory size (default 32 MiB). */
  memory?: number;
  /** Backend size when no backend is given (default 8 MiB). */
  diskSize?: number;
  /** Admin queue sizes (default 32 / 32). */
  adminEntries?: number;
}

export class Rig {
  readonly ctrl: NvmeController;
  readonly dma = new DmaSpace();
  readonly irqs: IrqTable;
  readonly mem: Buffer;
  readonly memSize: number;
  readonly queues = new Map<number, HostQueue>();
  /** Raw eventfds the IrqTable owns, by "index:vector". */
  private readonly eventfds = new Map<string, number>();
  private readonly memory: GuestMemory;
  private closed = false;

  constructor(options: RigOptions = {}) {
    const backend = options.backend ?? new RamBackend(options.diskSize ?? 8 << 20);
    this.ctrl = new NvmeController({ ...options, backend });
    this.memSize = options.memory ?? 32 << 20;
    this.memory = new GuestMemory(this.dma, 'nvme-test-guest', this.memSize);
    this.mem = this.memory.bytes;
    this.irqs = new IrqTable(this.ctrl.irqs);
    this.ctrl.attach({ dma: this.dma, irqs: this.irqs });
  }

  /** Page-aligned guest memory (zeroed). */
  alloc(bytes: number, align = PAGE): number {
    return this.memory.alloc(bytes, align);
  }

  /** DMA_UNMAP all guest memory, then DMA_MAP it again (new mapping, same memory, as SeaBIOS-era clients do; or `from`'s memory). */
  async remapMemory(from: this = this): Promise<void> {
    await this.memory.remap(from.memory);
  }

  // ---- region access ----

  bar0Read(offset: number, length: number): Buffer {
    const dst = Buffer.alloc(length);
    const r = this.ctrl.regions[PciRegion.BAR0]!.read!(offset, dst);
    if (typeof r === 'number' && r !== 0) throw new Error(`BAR0 read errno ${r}`);
    return dst;
  }

  read32(offset: number): number {
    return this.bar0Read(offset, 4).readUInt32LE(0);
  }

  read64(offset: number): bigint {
    return this.bar0Read(offset, 8).readBigUInt64LE(0);
  }

  bar0Write(offset: number, data: Buffer): void {
    const r = this.ctrl.regions[PciRegion.BAR0]!.write!(offset, data);
    if (typeof r === 'number' && r !== 0) throw new Error(`BAR0 write errno ${r}`);
  }

  write32(offset: number, value: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(value >>> 0);
    this.bar0Write(offset, b);
  }

  write64(offset: number, value: number | bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(value));
    this.bar0Write(offset, b);
  }

  configRead(offset: number, length: number): Buffer {
    const dst = Buffer.alloc(length);
    this.ctrl.regions[PciRegion.CONFIG]!.read!(offset, dst);
    return dst;
  }

  configWrite(offset: number, data: Buffer): void {
    this.ctrl.regions[PciRegion.CONFIG]!.write!(offset, data);
  }

  /** Offset of capability `id` in config space. */
  capability(id: number): number {
    let at = this.configRead(0x34, 1)[0]!;
    while (at !== 0) {
      const hdr = this.configRead(at, 2);
      if (hdr[0] === id) return at;
      at = hdr[1]!;
    }
    throw new Error(`capability 0x${id.toString(16)} not found`);
  }

  /** COMMAND: memory space + bus master (what a driver does first). */
  enableBusMaster(): void {
    this.configWrite(0x04, Buffer.from([0x06, 0x00]));
  }

  /** Enables MSI-X in config space and gives vectors [0, count) eventfds (what QEMU does). */
  enableMsix(count = this.ctrl.vectors): void {
    const cap = this.capability(0x11);
    const ctl = this.configRead(cap + 2, 2).readUInt16LE(0);
    const b = Buffer.alloc(2);
    b.writeUInt16LE((ctl | 0x8000) & ~0x4000);
    this.configWrite(cap + 2, b);
    for (let v = 0; v < count; v++) this.addEventfd(PciIrq.MSIX, v);
  }

  disableMsix(): void {
    const cap = this.capability(0x11);
    const ctl = this.configRead(cap + 2, 2).readUInt16LE(0);
    const b = Buffer.alloc(2);
    b.writeUInt16LE(ctl & ~0x8000);
    this.configWrite(cap + 2, b);
  }

  /** Registers an eventfd for (index, vector) in the IrqTable, as SET_IRQS would. */
  addEventfd(index: number, vector: number): void {
    const raw = binding.eventfd(0, binding.constants.EFD_NONBLOCK);
    const errno = this.irqs.set(
      { argsz: 24, flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, index, start: vector, count: 1, data: null },
      [new Fd(raw)],
    );
    if (errno !== 0) throw new Error(`SET_IRQS failed: ${errno}`);
    this.eventfds.set(`${index}:${vector}`, raw);
    this.ctrl.irqsChanged(index);
  }

  /** Reads and resets the eventfd counter of (index, vector). */
  drainIrq(index: number, vector: number): number {
    const raw = this.eventfds.get(`${index}:${vector}`);
    if (raw === undefined) throw new Error(`no eventfd for ${index}:${vector}`);
    return binding.eventfdDrain(raw);
  }

  // ---- controller bring-up ----

  /** AQA/ASQ/ACQ, bus master, CC.EN = 1 with 4 KiB pages and 64/16-byte entries; waits for RDY. */
  async enable(options: { adminEntries?: number; cc?: number } = {}): Promise<HostQueue> {
    const n = options.adminEntries ?? 32;
    this.enableBusMaster();
    const sq = this.alloc(n * 64);
    const cq = this.alloc(n * 16);
    this.write32(Reg.AQA, ((n - 1) << 16) | (n - 1));
    this.write64(Reg.ASQ, sq);
    this.write64(Reg.ACQ, cq);
    this.write32(Reg.CC, options.cc ?? ((4 << 20) | (6 << 16) | 1));
    await this.waitFor(() => (this.read32(Reg.CSTS) & 0x3) !== 0, 'CSTS.RDY or CFS');
    const q = new HostQueue(0, sq, n, cq, n);
    this.queues.set(0, q);
    return q;
  }

  /** CC.EN = 0 and wait for RDY = 0. Host queue state is dropped. */
  async disable(): Promise<void> {
    const cc = this.read32(Reg.CC);
    this.write32(Reg.CC, cc & ~1);
    await this.waitFor(() => (this.read32(Reg.CSTS) & 1) === 0, 'CSTS.RDY = 0');
    this.queues.clear();
  }

  /** Creates I/O CQ and SQ `qid` (sizes in entries). Throws unless both succeed. */
  async createQueuePair(qid: number, entries = 64, options: { vector?: number; ien?: boolean } = {}): Promise<HostQueue> {
    const cq = this.alloc(entries * 16);
    const sq = this.alloc(entries * 64);
    const vector = options.vector ?? (this.ctrl.msixEnabled ? qid : 0);
    const ien = options.ien ?? true;
    const c1 = await this.admin({ opcode: AdminOpcode.CREATE_CQ, prp1: cq, cdw10: ((entries - 1) << 16) | qid, cdw11: (vector << 16) | (ien ? 2 : 0) | 1 });
    if (c1.status !== 0) throw new Error(`create CQ ${qid}: status 0x${c1.status.toString(16)}`);
    const c2 = await this.admin({ opcode: AdminOpcode.CREATE_SQ, prp1: sq, cdw10: ((entries - 1) << 16) | qid, cdw11: (qid << 16) | 1 });
    if (c2.status !== 0) throw new Error(`create SQ ${qid}: status 0x${c2.status.toString(16)}`);
    const q = new HostQueue(qid, sq, entries, cq, entries);
    this.queues.set(qid, q);
    return q;
  }

  // ---- commands ----

  /** Writes an SQE into queue `qid` without ringing; returns its cid. */
  place(qid: number, cmd: Command): number {
    const q = this.queue(qid);
    const cid = cmd.cid ?? q.nextCid++ & 0xffff;
    const at = q.sqIova + q.sqTail * 64;
    const e = this.mem.subarray(at, at + 64);
    e.fill(0);
    e[0] = cmd.opcode;
    e[1] = cmd.flags ?? 0;
    e.writeUInt16LE(cid, 2);
    e.writeUInt32LE((cmd.nsid ?? 0) >>> 0, 4);
    e.writeBigUInt64LE(BigInt(cmd.prp1 ?? 0), 24);
    e.writeBigUInt64LE(BigInt(cmd.prp2 ?? 0), 32);
    const dws = [cmd.cdw10, cmd.cdw11, cmd.cdw12, cmd.cdw13, cmd.cdw14, cmd.cdw15];
    dws.forEach((v, i) => e.writeUInt32LE((v ?? 0) >>> 0, 40 + i * 4));
    q.sqTail = (q.sqTail + 1) % q.sqSize;
    return cid;
  }

  /** Rings SQ `qid`'s tail doorbell with the host's tail. */
  ring(qid: number): void {
    this.write32(sqTailDoorbell(qid), this.queue(qid).sqTail);
  }

  /** place + ring. */
  submit(qid: number, cmd: Command): number {
    const cid = this.place(qid, cmd);
    this.ring(qid);
    return cid;
  }

  /** Reaps every new CQE of queue `qid` (checking phase), rings the CQ head doorbell if any. */
  reap(qid: number, ringHead = true): Completion[] {
    const q = this.queue(qid);
    const out: Completion[] = [];
    for (;;) {
      const at = q.cqIova + q.cqHead * 16;
      const dw3 = this.mem.readUInt32LE(at + 12);
      const phase = (dw3 >>> 16) & 1;
      if (phase !== q.phase) break;
      const c: Completion = {
        dw0: this.mem.readUInt32LE(at),
        dw1: this.mem.readUInt32LE(at + 4),
        sqhd: this.mem.readUInt16LE(at + 8),
        sqid: this.mem.readUInt16LE(at + 10),
        cid: dw3 & 0xffff,
        status: dw3 >>> 17,
        phase,
      };
      out.push(c);
      q.done.set(c.cid, c);
      q.sqHead = c.sqhd;
      q.cqHead = (q.cqHead + 1) % q.cqSize;
      if (q.cqHead === 0) q.phase ^= 1;
    }
    if (out.length > 0 && ringHead) this.write32(cqHeadDoorbell(qid), q.cqHead);
    return out;
  }

  /** Waits for the completion of `cid` on queue `qid` (reaping the CQ). */
  async wait(qid: number, cid: number, timeoutMs = 5000): Promise<Completion> {
    const q = this.queue(qid);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.reap(qid);
      const c = q.done.get(cid);
      if (c !== undefined) {
        q.done.delete(cid);
        return c;
      }
      if (Date.now() > deadline) throw new Error(`timeout waiting for cid ${cid} on queue ${qid} (CSTS 0x${this.read32(Reg.CSTS).toString(16)})`);
      await tick();
    }
  }

  async admin(cmd: Command): Promise<Completion> {
    return this.wait(0, this.submit(0, cmd));
  }

  async io(qid: number, cmd: Command): Promise<Completion> {
    return this.wait(qid, this.submit(qid, { nsid: 1, ...cmd }));
  }

  queue(qid: number): HostQueue {
    const q = this.queues.get(qid);
    if (q === undefined) throw new Error(`no host queue ${qid}`);
    return q;
  }

  // ---- data buffers ----

  /**
   * Builds a data pointer for `bytes` at `buffer` (page aligned unless `offset`): PRP1, and PRP2
   * either as the second page or a PRP list (chained across list pages if needed).
   */
  prps(buffer: number, bytes: number, pageSize = PAGE): { prp1: number; prp2: number } {
    const first = Math.min(bytes, pageSize - (buffer % pageSize));
    const rest = bytes - first;
    if (rest === 0) return { prp1: buffer, prp2: 0 };
    const page2 = buffer + first;
    if (rest <= pageSize) return { prp1: buffer, prp2: page2 };
    const pages: number[] = [];
    for (let off = 0; off < rest; off += pageSize) pages.push(page2 + off);
    return { prp1: buffer, prp2: this.prpList(pages, pageSize) };
  }

  /** Writes a (chained) PRP list of `pages`; returns its address. */
  prpList(pages: number[], pageSize = PAGE): number {
    const slots = pageSize / 8;
    const listPages = Math.max(1, Math.ceil((pages.length - 1) / (slots - 1)));
    const lists = Array.from({ length: listPages }, () => this.alloc(pageSize));
    let li = 0;
    let slot = 0;
    for (let i = 0; i < pages.length; i++) {
      const remaining = pages.length - i;
      if (slot === slots - 1 && remaining > 1) {
        this.mem.writeBigUInt64LE(BigInt(lists[li + 1]!), lists[li]! + slot * 8);
        li++;
        slot = 0;
      }
      this.mem.writeBigUInt64LE(BigInt(pages[i]!), lists[li]! + slot * 8);
      slot++;
    }
    return lists[0]!;
  }

  async waitFor(cond: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!cond()) {
      if (Date.now() > deadline) throw new Error(`timeout waiting for ${what}`);
      await tick();
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.ctrl.close();
    this.irqs.clear();
    await this.dma.removeAll();
    this.memory.close();
  }
}

/** One turn of the event loop (lets promise-based backends and timers run). */
export function tick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Deterministic pseudo-random bytes. */
export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** A backend that delegates to `inner` except for the methods in `overrides` (slow, failing...). */
export function wrapBackend(inner: BlockBackend, overrides: Partial<BlockBackend>): BlockBackend {
  return {
    get size() {
      return inner.size;
    },
    discardZeroes: inner.discardZeroes,
    read: (o, d) => inner.read(o, d),
    write: (o, s, f) => inner.write(o, s, f),
    flush: () => inner.flush(),
    discard: (o, l) => inner.discard(o, l),
    ...(inner.writeZeroes ? { writeZeroes: (o: number, l: number, f: boolean) => inner.writeZeroes!(o, l, f) } : {}),
    close: () => inner.close(),
    ...overrides,
  };
}

/** A promise with its resolve function, to hold a backend operation. */
export function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}
