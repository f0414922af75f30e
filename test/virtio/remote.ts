/**
 * A guest-side virtio-blk driver over a vfio-user socket, for a device served by another process
 * (`vfio-user serve virtio-blk`) or by a server in this one: our {@link VfioUserClient}, guest
 * memory it allocates and DMA-maps at iova 0, the rig's {@link DriverQueue}s, notifies as
 * REGION_WRITEs, and completions found by polling the used rings. Interrupts are optional: MSI-X
 * with a vector per queue (0 for configuration changes), INTx, or none; the client's eventfds
 * receive them ({@link VfioUserClient.waitForIrq}).
 */
import { PciFunction, VfioUserClient, type DmaMemory } from '../../lib/client';
import { PciIrq, PciRegion } from '../../lib/protocol/constants';
import { BlkReqHeader, CommonCfg, Desc, DeviceStatus, Feature, VIRTIO_MSI_NO_VECTOR, availRingSize, featureBit, usedRingSize } from '../../lib/virtio/spec';
import { DriverQueue, PAGE, parseVirtioCaps, virtioLayout, type Buf, type QueueHost, type VirtioLayout } from './rig';

/** The MSI-X message address a driver programs (x86 LAPIC); vfio-user delivers vectors by eventfd regardless. */
const MSI_ADDRESS = 0xfee00000n;

export interface RemoteRequest {
  /** Data to write (OUT) or the ranges of a DISCARD / WRITE_ZEROES. */
  out?: Buffer;
  /** Bytes to read (IN, GET_ID). */
  inLen?: number;
  /** Split the data into this many buffers (default 1). */
  segments?: number;
  /** Use an indirect table. */
  indirect?: boolean;
  /** The queue (default 0). */
  queue?: number;
}

export interface RemoteInit {
  /** Features to accept (default: everything offered). */
  features?: bigint;
  /** Entries per queue (default: the device's maximum, at most 64). */
  queueSize?: number;
  /** Queues to set up (default 1). */
  queues?: number;
  /** `'msix'`: vector i + 1 for queue i, 0 for configuration changes; `'intx'`; `'none'` (default). */
  interrupts?: 'msix' | 'intx' | 'none';
}

export interface RemoteDone {
  status: number;
  /** The used element's length (bytes the device wrote). */
  len: number;
  data: Buffer;
}

export class RemoteBlk implements QueueHost {
  readonly mem: Buffer;
  readonly queues: DriverQueue[] = [];
  features = 0n;
  private next = PAGE;
  /** Per queue: used elements reaped but not yet claimed by their request, by head. */
  private readonly done: Map<number, number>[] = [];
  /** Where request memory starts (after the rings): {@link recycle} goes back there. */
  private dataStart = PAGE;
  private failure: Error | null = null;

  private constructor(
    readonly client: VfioUserClient,
    readonly fn: PciFunction,
    readonly layout: VirtioLayout,
    memory: DmaMemory,
  ) {
    this.mem = memory.bytes;
  }

  /** Connects, enables memory decoding and bus mastering, and maps `memory` bytes of guest memory. */
  static async connect(socket: string, memory = 16 << 20): Promise<RemoteBlk> {
    const client = await VfioUserClient.connect(socket);
    try {
      const fn = await PciFunction.open(client);
      await fn.enable();
      const layout = virtioLayout(parseVirtioCaps(fn.config));
      return new RemoteBlk(client, fn, layout, await client.allocateDma(memory, { iova: 0 }));
    } catch (err) {
      await client.close();
      throw err;
    }
  }

  alloc(bytes: number, align = PAGE): number {
    const at = Math.ceil(this.next / align) * align;
    if (at + bytes > this.mem.length) throw new Error('remote: out of guest memory');
    this.next = at + bytes;
    this.mem.fill(0, at, at + bytes);
    return at;
  }

  /** A notify (posted when the region allows); an error surfaces at the next request. */
  barWrite(offset: number, data: Buffer): void {
    this.client.write(PciRegion.BAR4, offset, data).catch((err: unknown) => (this.failure ??= err as Error));
  }

  private common(field: number, size: 1 | 2 | 4): Promise<number> {
    return this.client.readUint(PciRegion.BAR4, this.layout.common + field, size);
  }

  private setCommon(field: number, size: 1 | 2 | 4, value: number): Promise<void> {
    return this.client.writeUint(PciRegion.BAR4, this.layout.common + field, size, value, { posted: false });
  }

  /** Device configuration bytes. */
  config(offset: number, length: number): Promise<Buffer> {
    return this.client.read(PciRegion.BAR4, this.layout.device + offset, length);
  }

  /** Reset, feature negotiation, queues, interrupts, DRIVER_OK (3.1.1). Returns the accepted features. */
  async init(options: RemoteInit = {}): Promise<bigint> {
    await this.setCommon(CommonCfg.DEVICE_STATUS, 1, 0);
    for (let i = 0; (await this.common(CommonCfg.DEVICE_STATUS, 1)) !== 0; i++) {
      if (i > 500) throw new Error('remote: the device did not reset');
      await new Promise((res) => setTimeout(res, 10));
    }
    let status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER;
    await this.setCommon(CommonCfg.DEVICE_STATUS, 1, status);
    let offered = 0n;
    for (const half of [0, 1]) {
      await this.setCommon(CommonCfg.DEVICE_FEATURE_SELECT, 4, half);
      offered |= BigInt(await this.common(CommonCfg.DEVICE_FEATURE, 4)) << BigInt(32 * half);
    }
    this.features = options.features ?? offered;
    for (const half of [0, 1]) {
      await this.setCommon(CommonCfg.DRIVER_FEATURE_SELECT, 4, half);
      await this.setCommon(CommonCfg.DRIVER_FEATURE, 4, Number((this.features >> BigInt(32 * half)) & 0xffff_ffffn));
    }
    status |= DeviceStatus.FEATURES_OK;
    await this.setCommon(CommonCfg.DEVICE_STATUS, 1, status);
    if (((await this.common(CommonCfg.DEVICE_STATUS, 1)) & DeviceStatus.FEATURES_OK) === 0) throw new Error(`remote: features 0x${this.features.toString(16)} refused`);
    const queues = options.queues ?? 1;
    const interrupts = options.interrupts ?? 'none';
    if (interrupts === 'msix') {
      await this.client.enableIrqs(PciIrq.MSIX, queues + 1);
      for (let v = 0; v <= queues; v++) await this.fn.writeMsixVector(v, { address: MSI_ADDRESS, data: v, masked: false });
      await this.fn.setMsixEnabled(true);
      await this.setCommon(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0);
    } else if (interrupts === 'intx') {
      await this.client.enableIrqs(PciIrq.INTX, 1);
    }
    this.queues.length = 0;
    for (let i = 0; i < queues; i++) this.queues.push(await this.setupQueue(i, options.queueSize, interrupts === 'msix' ? i + 1 : VIRTIO_MSI_NO_VECTOR));
    await this.setCommon(CommonCfg.DEVICE_STATUS, 1, status | DeviceStatus.DRIVER_OK);
    return this.features;
  }

  private async setupQueue(index: number, queueSize: number | undefined, vector: number): Promise<DriverQueue> {
    await this.setCommon(CommonCfg.QUEUE_SELECT, 2, index);
    const size = queueSize ?? Math.min(64, await this.common(CommonCfg.QUEUE_SIZE, 2));
    await this.setCommon(CommonCfg.QUEUE_SIZE, 2, size);
    const desc = this.alloc(size * Desc.SIZE, 16);
    const avail = this.alloc(availRingSize(size), 2);
    const used = this.alloc(usedRingSize(size), 4);
    for (const [field, at] of [[CommonCfg.QUEUE_DESC, desc], [CommonCfg.QUEUE_DRIVER, avail], [CommonCfg.QUEUE_DEVICE, used]] as const) {
      await this.client.writeUint64(PciRegion.BAR4, this.layout.common + field, BigInt(at), { posted: false });
    }
    await this.setCommon(CommonCfg.QUEUE_MSIX_VECTOR, 2, vector);
    if ((await this.common(CommonCfg.QUEUE_MSIX_VECTOR, 2)) !== vector) throw new Error(`remote: queue ${index} refused MSI-X vector ${vector}`);
    await this.setCommon(CommonCfg.QUEUE_ENABLE, 2, 1);
    this.dataStart = this.next;
    return new DriverQueue(this, index, size, desc, avail, used);
  }

  /** The ISR status byte (reading it clears it and deasserts INTx). */
  isr(): Promise<number> {
    return this.client.readUint(PciRegion.BAR4, this.layout.isr, 1);
  }

  /** True if `bit` was negotiated. */
  has(bit: number): boolean {
    return (this.features & featureBit(bit)) !== 0n;
  }

  /** One request (header, data, status byte), notified and waited for. */
  async request(type: number, sector: number, o: RemoteRequest = {}): Promise<RemoteDone> {
    if (o.indirect && !this.has(Feature.INDIRECT_DESC)) throw new Error('remote: INDIRECT_DESC not negotiated');
    const hdr = this.alloc(BlkReqHeader.SIZE, 16);
    this.mem.writeUInt32LE(type, hdr + BlkReqHeader.TYPE);
    this.mem.writeBigUInt64LE(BigInt(sector), hdr + BlkReqHeader.SECTOR);
    const chain: Buf[] = [{ addr: hdr, len: BlkReqHeader.SIZE }];
    const data = o.out ?? Buffer.alloc(0);
    const inLen = o.inLen ?? 0;
    const dataAt = this.alloc(data.length + inLen, 512);
    data.copy(this.mem, dataAt);
    const segments = o.segments ?? 1;
    const piece = Math.ceil((data.length + inLen) / segments);
    for (let done = 0; done < data.length + inLen; done += piece) {
      chain.push({ addr: dataAt + done, len: Math.min(piece, data.length + inLen - done), write: inLen > 0 });
    }
    const statusAt = this.alloc(1, 1);
    this.mem[statusAt] = 0xff;
    chain.push({ addr: statusAt, len: 1, write: true });
    const queue = this.queues[o.queue ?? 0]!;
    const head = queue.add(chain, { indirect: o.indirect ?? false });
    queue.kick();
    const len = await this.waitFor(queue, head);
    return { status: this.mem[statusAt]!, len, data: Buffer.from(this.mem.subarray(dataAt, dataAt + inLen)) };
  }

  /** Polls the used ring until `head` comes back. */
  private async waitFor(queue: DriverQueue, head: number, timeoutMs = 20_000): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    const done = this.done[queue.index] ?? (this.done[queue.index] = new Map());
    for (;;) {
      for (const e of queue.reap()) done.set(e.id, e.len);
      const len = done.get(head);
      if (len !== undefined) {
        done.delete(head);
        return len;
      }
      if (this.failure !== null) throw this.failure;
      if (Date.now() > deadline) throw new Error(`remote: request ${head} not completed in ${timeoutMs} ms (status 0x${(await this.common(CommonCfg.DEVICE_STATUS, 1)).toString(16)})`);
      await new Promise((res) => setTimeout(res, 1));
    }
  }

  /** Frees the guest memory used by requests so far (none may be in flight). */
  recycle(): void {
    if (this.queues.some((q) => q.inFlight > 0)) throw new Error('remote: requests in flight');
    this.next = this.dataStart;
  }

  async close(): Promise<void> {
    await this.client.close();
  }
}
