/**
 * A guest-side virtio-pci driver for tests, driving a {@link VirtioPciDevice} only the way a
 * client would: region accesses to config space and BAR4, guest memory in a memfd DMA-mapped into
 * a real DmaSpace, interrupts through a real IrqTable with eventfds. It finds the virtio
 * capabilities, negotiates features, lays out split rings in guest memory, builds descriptor
 * chains (direct or indirect), notifies with REGION_WRITEs and reaps the used ring.
 */
import * as fs from 'node:fs';
import { GuestMemory } from '../helpers/guest-memory';
import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { IrqSetFlags, PciIrq, PciRegion } from '../../lib/protocol/constants';
import { DmaSpace } from '../../lib/server/dma';
import { IrqTable } from '../../lib/server/irq';
import type { VirtioPciDevice } from '../../lib/virtio/pci';
import {
  Avail,
  CommonCfg,
  Desc,
  DescFlags,
  DeviceStatus,
  Feature,
  PciCap,
  PciCapType,
  Used,
  availRingSize,
  featureBit,
  usedRingSize,
} from '../../lib/virtio/spec';

export const PAGE = 4096;

/** One buffer of a chain as a test describes it. */
export interface Buf {
  addr: number;
  len: number;
  /** Device-writable. */
  write?: boolean;
}

/** A reaped used element. */
export interface UsedElem {
  id: number;
  len: number;
}

/** Where the capabilities say the structures are (BAR offsets). */
export interface VirtioLayout {
  common: number;
  isr: number;
  device: number;
  notify: number;
  multiplier: number;
  pciCfg: number; // config-space offset of the PCI_CFG capability
}

/** What a {@link DriverQueue} needs of its driver: guest memory (addresses are offsets in it), an allocator, the layout and BAR4 writes. */
export interface QueueHost {
  readonly mem: Buffer;
  readonly layout: VirtioLayout;
  alloc(bytes: number, align?: number): number;
  barWrite(offset: number, data: Buffer): void;
}

/** A virtio vendor capability (cfg_type -> where its structure is, and where the capability is). */
export interface VirtioCap {
  bar: number;
  offset: number;
  length: number;
  /** The dword after the capability (notify_off_multiplier for NOTIFY_CFG), else 0. */
  extra: number;
  /** Config-space offset of the capability. */
  at: number;
}

/** Every virtio vendor capability in a config-space snapshot (the first of each cfg_type), walking the list as a driver does. */
export function parseVirtioCaps(config: Buffer): Map<number, VirtioCap> {
  const out = new Map<number, VirtioCap>();
  const seen = new Set<number>();
  let at = config[0x34]!;
  while (at !== 0 && !seen.has(at) && at + 20 <= config.length) {
    seen.add(at);
    const hdr = config.subarray(at, at + 20);
    if (hdr[0] === 0x09 && !out.has(hdr[PciCap.CFG_TYPE]!)) {
      out.set(hdr[PciCap.CFG_TYPE]!, {
        bar: hdr[PciCap.BAR]!,
        offset: hdr.readUInt32LE(PciCap.OFFSET),
        length: hdr.readUInt32LE(PciCap.LENGTH),
        extra: hdr[PciCap.CAP_LEN]! >= 20 ? hdr.readUInt32LE(16) : 0,
        at,
      });
    }
    at = hdr[1]!;
  }
  return out;
}

/** The BAR4 offsets of the virtio structures, from the capabilities. */
export function virtioLayout(caps: Map<number, VirtioCap>): VirtioLayout {
  const get = (t: number) => {
    const c = caps.get(t);
    if (c === undefined) throw new Error(`virtio capability ${t} missing`);
    return c;
  };
  return {
    common: get(PciCapType.COMMON_CFG).offset,
    isr: get(PciCapType.ISR_CFG).offset,
    device: get(PciCapType.DEVICE_CFG).offset,
    notify: get(PciCapType.NOTIFY_CFG).offset,
    multiplier: get(PciCapType.NOTIFY_CFG).extra,
    pciCfg: get(PciCapType.PCI_CFG).at,
  };
}

/** The driver's side of one split virtqueue. */
export class DriverQueue {
  availIdx = 0;
  lastUsed = 0;
  private free: number[];
  /** Heads in flight -> descriptor indices to free (and the indirect table, if any). */
  private readonly chains = new Map<number, number[]>();

  constructor(
    readonly rig: QueueHost,
    readonly index: number,
    readonly size: number,
    readonly desc: number,
    readonly avail: number,
    readonly used: number,
  ) {
    this.free = Array.from({ length: size }, (_, i) => i);
  }

  /** Writes descriptor `i` raw. */
  writeDesc(i: number, addr: number | bigint, len: number, flags: number, next: number, table = this.desc): void {
    const at = table + i * Desc.SIZE;
    const m = this.rig.mem;
    m.writeBigUInt64LE(BigInt(addr), at + Desc.ADDR);
    m.writeUInt32LE(len >>> 0, at + Desc.LEN);
    m.writeUInt16LE(flags, at + Desc.FLAGS);
    m.writeUInt16LE(next, at + Desc.NEXT);
  }

  /** Puts `head` in the available ring and publishes the new index (no notify). */
  publish(head: number, idxAdvance = 1): void {
    const m = this.rig.mem;
    m.writeUInt16LE(head, this.avail + Avail.RING + 2 * (this.availIdx % this.size));
    this.availIdx = (this.availIdx + idxAdvance) & 0xffff;
    m.writeUInt16LE(this.availIdx, this.avail + Avail.IDX);
  }

  /** Sets the raw available index (to fake a driver that moves it wildly). */
  setAvailIdx(idx: number): void {
    this.availIdx = idx & 0xffff;
    this.rig.mem.writeUInt16LE(this.availIdx, this.avail + Avail.IDX);
  }

  /** Builds a chain of `bufs` from free descriptors (or one indirect table) and publishes it. Returns the head. */
  add(bufs: Buf[], options: { indirect?: boolean; publish?: boolean } = {}): number {
    let head: number;
    if (options.indirect) {
      const table = this.rig.alloc(bufs.length * Desc.SIZE, 16);
      bufs.forEach((b, i) => this.writeDesc(i, b.addr, b.len, (b.write ? DescFlags.WRITE : 0) | (i + 1 < bufs.length ? DescFlags.NEXT : 0), i + 1, table));
      const d = this.take(1);
      head = d[0]!;
      this.writeDesc(head, table, bufs.length * Desc.SIZE, DescFlags.INDIRECT, 0);
      this.chains.set(head, d);
    } else {
      const d = this.take(bufs.length);
      head = d[0]!;
      bufs.forEach((b, i) => this.writeDesc(d[i]!, b.addr, b.len, (b.write ? DescFlags.WRITE : 0) | (i + 1 < bufs.length ? DescFlags.NEXT : 0), d[i + 1] ?? 0));
      this.chains.set(head, d);
    }
    if (options.publish !== false) this.publish(head);
    return head;
  }

  private take(n: number): number[] {
    if (this.free.length < n) throw new Error(`queue ${this.index}: out of descriptors`);
    return this.free.splice(0, n);
  }

  /** Rings the queue's notify address (a REGION_WRITE of the queue index). */
  kick(): void {
    const l = this.rig.layout;
    const b = Buffer.alloc(2);
    b.writeUInt16LE(this.index);
    this.rig.barWrite(l.notify + this.index * l.multiplier, b);
  }

  /** Used elements the device added since the last call; their descriptors go back to the free list. */
  reap(): UsedElem[] {
    const m = this.rig.mem;
    const idx = m.readUInt16LE(this.used + Used.IDX);
    const out: UsedElem[] = [];
    while (this.lastUsed !== idx) {
      const at = this.used + Used.RING + Used.ELEM_SIZE * (this.lastUsed % this.size);
      const e = { id: m.readUInt32LE(at + Used.ELEM_ID), len: m.readUInt32LE(at + Used.ELEM_LEN) };
      out.push(e);
      const d = this.chains.get(e.id);
      if (d) {
        this.chains.delete(e.id);
        this.free.push(...d);
      }
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  /** EVENT_IDX: the driver's used_event (interrupt when the used index passes it). */
  setUsedEvent(value: number): void {
    this.rig.mem.writeUInt16LE(value & 0xffff, this.avail + Avail.RING + 2 * this.size);
  }

  /** EVENT_IDX: the device's avail_event. */
  get availEvent(): number {
    return this.rig.mem.readUInt16LE(this.used + Used.RING + Used.ELEM_SIZE * this.size);
  }

  get usedFlags(): number {
    return this.rig.mem.readUInt16LE(this.used + Used.FLAGS);
  }

  setAvailFlags(flags: number): void {
    this.rig.mem.writeUInt16LE(flags, this.avail + Avail.FLAGS);
  }

  get inFlight(): number {
    return this.chains.size;
  }
}

export interface InitOptions {
  /** Features to accept (default: everything offered). */
  features?: bigint;
  /** Queue size to write (default: the device's maximum). */
  queueSize?: number;
  /** Queues to set up (default: all). */
  queues?: number;
  /** Enable MSI-X with one vector per queue plus config (default true). */
  msix?: boolean;
  /** Stop before DRIVER_OK (the caller finishes). */
  noDriverOk?: boolean;
}

export interface RigOptions {
  /** Guest memory size (default 16 MiB). */
  memory?: number;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- any element type: the rig only drives the transport
export class VirtioRig<D extends VirtioPciDevice<any> = VirtioPciDevice> {
  readonly dma = new DmaSpace();
  readonly irqs: IrqTable;
  readonly mem: Buffer;
  readonly memSize: number;
  readonly layout: VirtioLayout;
  readonly queues: DriverQueue[] = [];
  private readonly eventfds = new Map<string, number>();
  private readonly memory: GuestMemory;
  private closed = false;

  constructor(
    readonly device: D,
    options: RigOptions = {},
  ) {
    this.memSize = options.memory ?? 16 << 20;
    this.memory = new GuestMemory(this.dma, 'virtio-test-guest', this.memSize);
    this.mem = this.memory.bytes;
    this.irqs = new IrqTable(device.irqs);
    device.attach({ dma: this.dma, irqs: this.irqs });
    this.layout = this.findLayout();
  }

  /** Aligned guest memory (zeroed). */
  alloc(bytes: number, align = PAGE): number {
    return this.memory.alloc(bytes, align);
  }

  /** DMA_UNMAP all guest memory, then map it again. */
  async remapMemory(from: this = this): Promise<void> {
    await this.memory.remap(from.memory);
  }

  // ---- region access ----

  barRead(offset: number, length: number): Buffer {
    const dst = Buffer.alloc(length);
    const r = this.device.regions[PciRegion.BAR4]!.read!(offset, dst);
    if (typeof r === 'number' && r !== 0) throw new Error(`BAR4 read errno ${r}`);
    return dst;
  }

  barWrite(offset: number, data: Buffer): void {
    const r = this.device.regions[PciRegion.BAR4]!.write!(offset, data);
    if (typeof r === 'number' && r !== 0) throw new Error(`BAR4 write errno ${r}`);
  }

  configRead(offset: number, length: number): Buffer {
    const dst = Buffer.alloc(length);
    this.device.regions[PciRegion.CONFIG]!.read!(offset, dst);
    return dst;
  }

  configWrite(offset: number, data: Buffer): void {
    this.device.regions[PciRegion.CONFIG]!.write!(offset, data);
  }

  read8(offset: number): number {
    return this.barRead(offset, 1)[0]!;
  }

  read16(offset: number): number {
    return this.barRead(offset, 2).readUInt16LE(0);
  }

  read32(offset: number): number {
    return this.barRead(offset, 4).readUInt32LE(0);
  }

  write8(offset: number, value: number): void {
    this.barWrite(offset, Buffer.from([value & 0xff]));
  }

  write16(offset: number, value: number): void {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(value & 0xffff);
    this.barWrite(offset, b);
  }

  write32(offset: number, value: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(value >>> 0);
    this.barWrite(offset, b);
  }

  /** Common-cfg register helpers (offsets from {@link CommonCfg}). */
  common8(field: number): number {
    return this.read8(this.layout.common + field);
  }

  common16(field: number): number {
    return this.read16(this.layout.common + field);
  }

  common32(field: number): number {
    return this.read32(this.layout.common + field);
  }

  setCommon8(field: number, value: number): void {
    this.write8(this.layout.common + field, value);
  }

  setCommon16(field: number, value: number): void {
    this.write16(this.layout.common + field, value);
  }

  setCommon32(field: number, value: number): void {
    this.write32(this.layout.common + field, value);
  }

  get status(): number {
    return this.common8(CommonCfg.DEVICE_STATUS);
  }

  /** Reads the device's 64 feature bits. */
  deviceFeatures(): bigint {
    this.setCommon32(CommonCfg.DEVICE_FEATURE_SELECT, 0);
    const lo = this.common32(CommonCfg.DEVICE_FEATURE);
    this.setCommon32(CommonCfg.DEVICE_FEATURE_SELECT, 1);
    const hi = this.common32(CommonCfg.DEVICE_FEATURE);
    return BigInt(lo) | (BigInt(hi) << 32n);
  }

  writeDriverFeatures(features: bigint): void {
    this.setCommon32(CommonCfg.DRIVER_FEATURE_SELECT, 0);
    this.setCommon32(CommonCfg.DRIVER_FEATURE, Number(features & 0xffff_ffffn));
    this.setCommon32(CommonCfg.DRIVER_FEATURE_SELECT, 1);
    this.setCommon32(CommonCfg.DRIVER_FEATURE, Number((features >> 32n) & 0xffff_ffffn));
  }

  /** Device configuration bytes. */
  deviceConfig(offset: number, length: number): Buffer {
    return this.barRead(this.layout.device + offset, length);
  }

  // ---- bring-up ----

  /** COMMAND: memory space + bus master. */
  enableBusMaster(): void {
    this.configWrite(0x04, Buffer.from([0x06, 0x00]));
  }

  /** Offset of capability `id` in config space (the first one). */
  capability(id: number): number {
    let at = this.configRead(0x34, 1)[0]!;
    while (at !== 0) {
      const hdr = this.configRead(at, 2);
      if (hdr[0] === id) return at;
      at = hdr[1]!;
    }
    throw new Error(`capability 0x${id.toString(16)} not found`);
  }

  /** Every virtio vendor capability: cfg_type -> {bar, offset, length, extra dword, config offset}. */
  virtioCaps(): Map<number, VirtioCap> {
    return parseVirtioCaps(this.configRead(0, 256));
  }

  private findLayout(): VirtioLayout {
    return virtioLayout(this.virtioCaps());
  }

  /** Enables MSI-X in config space and gives vectors [0, count) eventfds (what QEMU does). */
  enableMsix(count: number): void {
    const cap = this.capability(0x11);
    const ctl = this.configRead(cap + 2, 2).readUInt16LE(0);
    const b = Buffer.alloc(2);
    b.writeUInt16LE((ctl | 0x8000) & ~0x4000);
    this.configWrite(cap + 2, b);
    for (let v = 0; v < count; v++) this.addEventfd(PciIrq.MSIX, v);
  }

  addEventfd(index: number, vector: number): void {
    const raw = binding.eventfd(0, binding.constants.EFD_NONBLOCK);
    const errno = this.irqs.set(
      { argsz: 24, flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, index, start: vector, count: 1, data: null },
      [new Fd(raw)],
    );
    if (errno !== 0) throw new Error(`SET_IRQS failed: ${errno}`);
    this.eventfds.set(`${index}:${vector}`, raw);
    this.device.irqsChanged(index);
  }

  /** Reads and resets the eventfd counter of (index, vector). */
  drainIrq(index: number, vector: number): number {
    const raw = this.eventfds.get(`${index}:${vector}`);
    if (raw === undefined) throw new Error(`no eventfd for ${index}:${vector}`);
    return binding.eventfdDrain(raw);
  }

  /** Resets the device (status 0) and waits for the status to read 0. */
  async reset(): Promise<void> {
    this.setCommon8(CommonCfg.DEVICE_STATUS, 0);
    await this.waitFor(() => this.status === 0, 'device_status 0');
    this.queues.length = 0;
  }

  /**
   * The driver initialisation sequence (3.1.1): reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK
   * (checked), queues, DRIVER_OK. Returns the accepted features.
   */
  async init(options: InitOptions = {}): Promise<bigint> {
    this.enableBusMaster();
    await this.reset();
    this.setCommon8(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE);
    this.setCommon8(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER);
    const offered = this.deviceFeatures();
    const features = options.features ?? offered;
    this.writeDriverFeatures(features);
    const s = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK;
    this.setCommon8(CommonCfg.DEVICE_STATUS, s);
    if ((this.status & DeviceStatus.FEATURES_OK) === 0) throw new Error(`device refused features 0x${features.toString(16)}`);
    const n = options.queues ?? this.common16(CommonCfg.NUM_QUEUES);
    const msix = options.msix ?? true;
    if (msix) {
      this.enableMsix(n + 1);
      this.setCommon16(CommonCfg.CONFIG_MSIX_VECTOR, 0);
    }
    for (let i = 0; i < n; i++) this.setupQueue(i, options.queueSize, msix ? i + 1 : undefined);
    if (!options.noDriverOk) this.setCommon8(CommonCfg.DEVICE_STATUS, s | DeviceStatus.DRIVER_OK);
    return features;
  }

  /** Allocates and programs queue `i`, enables it. */
  setupQueue(i: number, size?: number, vector?: number): DriverQueue {
    this.setCommon16(CommonCfg.QUEUE_SELECT, i);
    const max = this.common16(CommonCfg.QUEUE_SIZE);
    const n = size ?? max;
    this.setCommon16(CommonCfg.QUEUE_SIZE, n);
    const desc = this.alloc(n * Desc.SIZE, 16);
    const avail = this.alloc(availRingSize(n), 2);
    const used = this.alloc(usedRingSize(n), 4);
    const set64 = (field: number, v: number) => {
      this.setCommon32(field, v);
      this.setCommon32(field + 4, 0);
    };
    set64(CommonCfg.QUEUE_DESC, desc);
    set64(CommonCfg.QUEUE_DRIVER, avail);
    set64(CommonCfg.QUEUE_DEVICE, used);
    if (vector !== undefined) this.setCommon16(CommonCfg.QUEUE_MSIX_VECTOR, vector);
    this.setCommon16(CommonCfg.QUEUE_ENABLE, 1);
    const q = new DriverQueue(this, i, n, desc, avail, used);
    this.queues[i] = q;
    return q;
  }

  /** Waits for `count` used elements on queue `q` (reaping). */
  async waitUsed(q: DriverQueue, count = 1, timeoutMs = 5000): Promise<UsedElem[]> {
    const out: UsedElem[] = [];
    const deadline = Date.now() + timeoutMs;
    while (out.length < count) {
      out.push(...q.reap());
      if (out.length >= count) break;
      if (Date.now() > deadline) throw new Error(`timeout waiting for ${count} used element(s) on queue ${q.index} (status 0x${this.status.toString(16)})`);
      await tick();
    }
    return out;
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
    await this.device.close();
    this.irqs.clear();
    await this.dma.removeAll();
    this.memory.close();
  }
}

/** The transport features every test driver accepts by default. */
export const TRANSPORT_FEATURES = featureBit(Feature.VERSION_1) | featureBit(Feature.INDIRECT_DESC) | featureBit(Feature.EVENT_IDX);

/** One turn of the event loop. */
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
