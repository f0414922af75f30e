/**
 * `NvmeDriver`: a userspace NVMe host driver over a {@link VfioUserClient}, in the spirit of
 * SPDK's vfio-user NVMe driver (`lib/nvme/nvme_vfio_user.c` over `nvme_pcie`): the controller is a
 * PCI function reached through vfio-user regions, its queues live in client DMA memory (memfd
 * shared with the server), interrupts arrive as MSI-X eventfds.
 *
 * Bring-up ({@link NvmeDriver.open}), as Linux's `nvme_pci_enable` + `nvme_enable_ctrl` and SPDK's
 * controller state machine do it:
 * 1. Config space: an NVMe class code (01:08:02); BARs sized and given addresses as firmware does
 *    ({@link PciFunction.enable}: servers that model real PCI decode a BAR only at its address),
 *    then memory space and bus mastering on.
 * 2. CAP and VS from BAR0. The controller is disabled (CC.EN 0; if it was still enabling, its
 *    CSTS.RDY 1 is awaited first) and CSTS.RDY 0 awaited, each within CAP.TO.
 * 3. MSI-X: one eventfd per vector (DEVICE_SET_IRQS), table entries programmed unmasked, enable.
 * 4. Admin queue in DMA memory: AQA, ASQ, ACQ; then CC (EN, 4 KiB pages, NVM command set,
 *    64/16-byte entries) and CSTS.RDY 1 awaited within CAP.TO (CSTS.CFS fails it).
 * 5. Identify Controller, the active namespace list and each namespace; Set Features (Number of
 *    Queues).
 *
 * I/O queue pairs come from {@link NvmeDriver.createIoQueuePair} (Create I/O CQ, then SQ);
 * {@link NvmeDriver.close} deletes them, shuts the controller down (CC.SHN normal, CSTS.SHST
 * complete awaited), disables MSI-X and releases every eventfd, mapping and DMA range the driver
 * took. The client itself stays open: it belongs to the caller.
 *
 * Keeping queues across connections: with a client made with the `reconnect` option, a lost
 * connection leaves the driver waiting (commands stay outstanding, doorbells written meanwhile are
 * kept in the rings); after {@link VfioUserClient.reconnect} it maps the doorbells again, reads
 * CSTS (which also tells a server keeping the device that its client is back), rings every
 * doorbell with its current value and reaps what completed meanwhile. A controller that lost its
 * state (a restarted server) fails every outstanding command with {@link NvmeAbortedError}
 * 'ECONNRESET'. {@link NvmeDriver.prepareMove} and {@link NvmeDriver.completeMove} move the driver
 * to another client (a migration destination), the queues going on where they were.
 *
 * Errors: an admin command the controller fails rejects with {@link NvmeError}; a register
 * handshake that does not finish within CAP.TO rejects with an Error whose `code` is
 * 'ETIMEDOUT'; a device that is not an NVMe controller is 'ENODEV'; vfio-user failures are the
 * client's errors. When the connection ends every outstanding command fails with
 * {@link NvmeAbortedError} ('ECONNRESET').
 *
 * @packageDocumentation
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { performance } from 'node:perf_hooks';
import { debuglog } from 'node:util';
import type { VfioUserClient } from '../../client/client';
import type { DmaMemory } from '../../client/dma';
import { PciFunction } from '../../client/pci';
import { ClassCode } from '../../pci/ids';
import { PciIrq, PciRegion } from '../../protocol/constants';
import { AdminOpcode, Cns, FeatureId } from '../../nvme/constants';
import { Aqa, Cc, Csts, Reg, Shn, Shst, sqTailDoorbell } from '../../nvme/registers';
import { IDENTIFY_SIZE, Oacs } from '../../nvme/structs';
import { IoEventfdDoorbells, MappedDoorbells, MessageDoorbells, ShadowDoorbells, type DoorbellKind, type DoorbellWriter } from './doorbells';
import { NvmeAbortedError } from './errors';
import { parseIdentifyController, parseIdentifyNamespace, parseNamespaceList, type IdentifyController, type NamespaceInfo } from './identify';
import { QueuePair, queueDeleted, type CompletionMode, type Completion, type NvmeCommand, type SubmitOptions } from './queue';
import { decodeCap, decodeVersion, enableValue, type ControllerCapabilities, type ControllerVersion } from './registers';

const debug = debuglog('vfio-user:nvme');

/** The BAR holding the controller registers. */
const BAR0 = PciRegion.BAR0;
/** Doorbells looked up among the ioeventfds: the first doorbell page (NVMe 1.4: BAR0 0x1000..0x1fff). */
const BAR0_DOORBELL_END = 0x2000;
/** Most entries of an admin queue (AQA fields are 12 bits, 0's based). */
const MAX_ADMIN_ENTRIES = 4096;
/** Largest transfer the driver uses per command unless told otherwise (and MDTS allows). */
const DEFAULT_MAX_TRANSFER = 2 * 1024 * 1024;
/** Message address programmed into MSI-X entries: the x86 LAPIC window (the client emulates MSI-X). */
const MSI_ADDRESS = 0xfee00000n;

/** Options of {@link NvmeDriver.open}. */
export interface NvmeDriverOptions {
  /**
   * How completions are noticed: 'msix' (an eventfd per vector; the default when the device has
   * MSI-X), or 'poll' (busy polling of the completion queues while commands are outstanding).
   */
  completions?: CompletionMode;
  /**
   * How doorbells are written: 'mmap' (stores into the doorbell page, when the server offers it
   * as a sparse mmap area), 'ioeventfd' (a store into shadow memory and an eventfd signal, when
   * the server offers ioeventfds for the doorbells), 'message' (REGION_WRITE to BAR0), or 'auto'
   * (default: mmap if offered, else ioeventfds if offered, else messages). After a reconnect or a
   * move, ioeventfd doorbells fall back to messages.
   */
  doorbells?: 'auto' | 'mmap' | 'ioeventfd' | 'message';
  /**
   * Use shadow doorbells (Doorbell Buffer Config) for I/O queues when the controller offers them
   * (OACS bit 8) and doorbells are messages: most doorbell updates then stay in shared memory.
   * Default true.
   */
  shadowDoorbells?: boolean;
  /** I/O queues to ask for with Set Features (Number of Queues). Default 8. */
  ioQueues?: number;
  /** Admin queue size in entries (2..4096, at most CAP.MQES + 1). Default 32. */
  adminQueueEntries?: number;
  /** Timeout of admin commands in ms (default 30000). */
  adminTimeoutMs?: number;
  /** Default timeout of I/O commands in ms (default 30000; 0 = none). */
  ioTimeoutMs?: number;
  /** Limit for the CC.EN / CSTS.RDY handshakes in ms (default: CAP.TO). */
  readyTimeoutMs?: number;
  /** Largest transfer per command in bytes (default 2 MiB; never above MDTS). */
  maxTransferSize?: number;
  /** Skip the class-code check (a device that is an NVMe controller but says otherwise). */
  anyClassCode?: boolean;
}

/** Options of {@link NvmeDriver.createIoQueuePair}. */
export interface IoQueuePairOptions {
  /** Ring size in entries, 2..MQES + 1 (default: `depth` + 1, else min(256, MQES + 1)). */
  entries?: number;
  /** Commands outstanding at once (entries - 1). */
  depth?: number;
  /** Completion mode of this pair (default: the driver's). */
  completions?: CompletionMode;
  /** MSI-X vector (default: one per pair while vectors last, then shared round robin). */
  vector?: number;
  /** Default command timeout in ms (default: the driver's ioTimeoutMs). */
  timeoutMs?: number;
}

/** Options of {@link NvmeDriver.close}. */
export interface CloseOptions {
  /** Normal shutdown (CC.SHN) before releasing (default true). */
  shutdown?: boolean;
  /**
   * How long outstanding I/O may take to finish before its queues are deleted anyway (default
   * 5000 ms); what is still outstanding then fails with {@link NvmeAbortedError} 'ECANCELED'.
   */
  drainTimeoutMs?: number;
}

function codeError(code: string, message: string): Error {
  return Object.assign(new Error(message), { code });
}

/** A controller driven from user space. */
export class NvmeDriver {
  #client: VfioUserClient;
  #pci: PciFunction;
  readonly cap: ControllerCapabilities;
  readonly version: ControllerVersion;
  /** Memory page size in use (CC.MPS), bytes. */
  readonly pageSize: number;
  /** How completions are noticed by default. */
  readonly completions: CompletionMode;

  /** Doorbells of the admin queue (and the fallback of shadow doorbells). */
  #doorbells: DoorbellWriter;
  /** Doorbells of I/O queues: the shadow doorbells when configured, else `#doorbells`. */
  #ioDoorbells: DoorbellWriter;
  #shadow: ShadowDoorbells | null = null;
  #shadowMemory: DmaMemory | null = null;
  #admin: QueuePair | null = null;
  #adminMemory: DmaMemory | null = null;
  #controller: IdentifyController | null = null;
  #namespaces = new Map<number, NamespaceInfo>();
  #maxTransfer = 0;
  #ioQueuesGranted = 0;
  readonly #queues = new Map<number, QueuePair>();
  /** qids of pairs being created (memory not granted yet). */
  readonly #creating = new Set<number>();
  readonly #queueMemory = new Map<QueuePair, DmaMemory>();
  readonly #buffers = new Set<DmaMemory>();
  /** Queue pairs by MSI-X vector. */
  #byVector: QueuePair[][] = [];
  #vectors = 0;
  #nextVector = 1;
  readonly #options: NvmeDriverOptions;
  #state: 'opening' | 'ready' | 'closing' | 'closed' = 'opening';
  #failure: Error | null = null;
  readonly #onIrq = (index: number, vector: number): void => this.#irq(index, vector);
  readonly #onClientClose = (err: Error | null): void => this.#lost(err);
  readonly #onDisconnect = (): void => {
    debug('connection lost: waiting for a reconnect');
  };
  readonly #onReconnect = (): void => {
    const done = this.#reattach();
    done.catch((err: unknown) => this.#fatal(err as Error));
    this.#reattaching = done;
  };
  /** Settles when the work after the last reconnect is done. */
  #reattaching: Promise<void> = Promise.resolve();
  /** A move to another client is under way: doorbell failures on the old one do not matter. */
  #move: { client: VfioUserClient; pci: PciFunction } | null = null;

  private constructor(client: VfioUserClient, pci: PciFunction, cap: ControllerCapabilities, version: ControllerVersion, pageSize: number, completions: CompletionMode, options: NvmeDriverOptions) {
    this.#client = client;
    this.#pci = pci;
    this.cap = cap;
    this.version = version;
    this.pageSize = pageSize;
    this.completions = completions;
    this.#options = options;
    this.#doorbells = new MessageDoorbells(client, BAR0, (err) => this.#fatal(err));
    this.#ioDoorbells = this.#doorbells;
  }

  /**
   * Brings the controller up (see the module comment) and identifies it.
   *
   * @throws an Error with `code` 'ENODEV' if the device is not an NVMe controller (class code,
   * BAR0 too small, no NVM command set), 'ETIMEDOUT' if CSTS.RDY does not follow CC.EN within
   * CAP.TO, 'EIO' if the controller reports a fatal status (CSTS.CFS) or reads as all ones.
   * @throws {NvmeError} if an admin command of the bring-up fails.
   */
  static async open(client: VfioUserClient, options: NvmeDriverOptions = {}): Promise<NvmeDriver> {
    const pci = await PciFunction.open(client);
    if (!options.anyClassCode && pci.header.classCode !== ClassCode.STORAGE_NVME) {
      throw codeError('ENODEV', `not an NVMe controller: class code 0x${pci.header.classCode.toString(16).padStart(6, '0')} (expected 0x010802)`);
    }
    if (client.regions.length <= BAR0 || client.region(BAR0).size < 0x1000 + 8) {
      throw codeError('ENODEV', 'BAR0 is missing or too small for the NVMe registers and doorbells');
    }
    await pci.enable({ memory: true, busMaster: true });
    const lo = await client.readUint(BAR0, Reg.CAP, 4);
    const hi = await client.readUint(BAR0, Reg.CAP + 4, 4);
    if (lo === 0xffffffff && hi === 0xffffffff) throw codeError('EIO', 'CAP reads as all ones: the controller is not responding');
    const cap = decodeCap(lo, hi);
    if ((cap.commandSets & 0x1) === 0) throw codeError('ENODEV', 'the controller does not support the NVM command set (CAP.CSS)');
    const version = decodeVersion(await client.readUint(BAR0, Reg.VS, 4));
    const pageSize = Math.max(4096, cap.minPageSize);
    if (pageSize > cap.maxPageSize) throw codeError('ENODEV', `no usable memory page size (CAP.MPSMIN ${String(cap.minPageSize)}, MPSMAX ${String(cap.maxPageSize)})`);

    const msix = client.irqs.info[PciIrq.MSIX];
    const hasMsix = pci.msix !== null && msix !== undefined && msix.count > 0;
    let completions = options.completions ?? (hasMsix ? 'msix' : 'poll');
    if (completions === 'msix' && !hasMsix) {
      debug('the device has no MSI-X: polling for completions');
      completions = 'poll';
    }
    const driver = new NvmeDriver(client, pci, cap, version, pageSize, completions, options);
    try {
      await driver.#bringUp();
    } catch (err) {
      await driver.#release();
      throw err;
    }
    return driver;
  }

  // ---- what the controller is ----

  /** The client the controller is reached through (another one after {@link NvmeDriver.completeMove}). */
  get client(): VfioUserClient {
    return this.#client;
  }

  /** The PCI function (config space) of the controller. */
  get pci(): PciFunction {
    return this.#pci;
  }

  /**
   * Settles when the driver has caught up after the client's last reconnect; rejects (ECONNRESET)
   * if the controller did not keep its state.
   */
  get reattached(): Promise<void> {
    return this.#reattaching;
  }

  /** Identify Controller, as read at bring-up. */
  get controller(): IdentifyController {
    if (this.#controller === null) throw new Error('the controller is not identified yet');
    return this.#controller;
  }

  /** Active namespaces, by NSID. */
  get namespaces(): ReadonlyMap<number, NamespaceInfo> {
    return this.#namespaces;
  }

  /** Namespace `nsid`. @throws {RangeError} if it is not active. */
  namespace(nsid = 1): NamespaceInfo {
    const ns = this.#namespaces.get(nsid);
    if (ns === undefined) throw new RangeError(`namespace ${String(nsid)} is not active (active: ${[...this.#namespaces.keys()].join(', ') || 'none'})`);
    return ns;
  }

  /** Largest transfer per command in bytes: min(MDTS, the driver's limit). */
  get maxTransferSize(): number {
    return this.#maxTransfer;
  }

  /** Most entries an I/O queue may have (CAP.MQES + 1). */
  get maxQueueEntries(): number {
    return this.cap.maxQueueEntries;
  }

  /** I/O queues the controller granted (Set Features, Number of Queues). */
  get ioQueuesGranted(): number {
    return this.#ioQueuesGranted;
  }

  /** MSI-X vectors in use (0 when polling). */
  get vectors(): number {
    return this.#vectors;
  }

  /** How doorbells are written ('mmap', 'ioeventfd' or 'message'). */
  get doorbellKind(): DoorbellKind {
    return this.#doorbells.kind;
  }

  /** The shadow doorbells of the I/O queues (with their counters), or null if not in use. */
  get shadowDoorbells(): ShadowDoorbells | null {
    return this.#shadow;
  }

  /** The admin queue pair. */
  get admin(): QueuePair {
    if (this.#admin === null) throw new Error('the admin queue is not set up');
    return this.#admin;
  }

  /** The I/O queue pairs, by qid. */
  get ioQueues(): ReadonlyMap<number, QueuePair> {
    return this.#queues;
  }

  /** True until {@link NvmeDriver.close} (or the connection ended). */
  get open(): boolean {
    return this.#state === 'ready';
  }

  // ---- admin commands ----

  /** Submits an admin command. @throws {NvmeError} for an error status. */
  adminCommand(cmd: NvmeCommand, options: SubmitOptions = {}): Promise<Completion> {
    this.#assertUsable();
    return this.admin.submit(cmd, { timeoutMs: this.#options.adminTimeoutMs ?? 30_000, ...options });
  }

  /** Identify with CNS `cns` (4096 bytes back). */
  async identify(cns: number, nsid = 0, cdw11 = 0): Promise<Buffer> {
    const c = await this.adminCommand({ opcode: AdminOpcode.IDENTIFY, nsid, cdw10: cns & 0xff, cdw11 }, { receive: IDENTIFY_SIZE });
    return c.data!;
  }

  /** Identify Controller (CNS 01h), decoded. */
  async identifyController(): Promise<IdentifyController> {
    return parseIdentifyController(await this.identify(Cns.CTRL));
  }

  /** Identify Namespace (CNS 00h) of `nsid`, decoded; null for an inactive NSID. */
  async identifyNamespace(nsid: number): Promise<NamespaceInfo | null> {
    return parseIdentifyNamespace(nsid, await this.identify(Cns.NS, nsid));
  }

  /**
   * Active NSIDs: the Active Namespace ID list (CNS 02h) on NVMe 1.1 and later, else 1..NN
   * (capped at 1024).
   */
  async activeNamespaces(): Promise<number[]> {
    const v = this.version;
    if (v.major > 1 || (v.major === 1 && v.minor >= 1)) return parseNamespaceList(await this.identify(Cns.NS_ACTIVE_LIST, 0));
    const nn = Math.min(this.controller.nn, 1024);
    return Array.from({ length: nn }, (_, i) => i + 1);
  }

  /** Get Features `fid`; resolves with completion dword 0. */
  async getFeatures(fid: number, cdw11 = 0, nsid = 0): Promise<number> {
    return (await this.adminCommand({ opcode: AdminOpcode.GET_FEATURES, nsid, cdw10: fid & 0xff, cdw11 })).dw0;
  }

  /** Set Features `fid` with dword 11 `value`; resolves with completion dword 0. */
  async setFeatures(fid: number, value: number, nsid = 0): Promise<number> {
    return (await this.adminCommand({ opcode: AdminOpcode.SET_FEATURES, nsid, cdw10: fid & 0xff, cdw11: value >>> 0 })).dw0;
  }

  /**
   * Set Features, Number of Queues: asks for `count` I/O submission and completion queues and
   * returns how many the controller granted (the smaller of the two counts, at most `count`).
   */
  async setNumQueues(count: number): Promise<number> {
    if (!Number.isInteger(count) || count < 1 || count > 65535) throw new RangeError(`Expected an I/O queue count in [1, 65535], got ${String(count)}`);
    const dw0 = await this.setFeatures(FeatureId.NUM_QUEUES, ((count - 1) | ((count - 1) << 16)) >>> 0);
    const nsqa = (dw0 & 0xffff) + 1;
    const ncqa = (dw0 >>> 16) + 1;
    this.#ioQueuesGranted = Math.min(count, nsqa, ncqa);
    debug('Number of Queues: asked %d, granted %d SQs / %d CQs', count, nsqa, ncqa);
    return this.#ioQueuesGranted;
  }

  /** Get Log Page `lid` (up to one slot page of data). */
  async getLogPage(lid: number, length: number, nsid = 0xffffffff): Promise<Buffer> {
    const numd = length / 4 - 1;
    if (!Number.isInteger(numd) || numd < 0) throw new RangeError(`Expected a log length that is a positive multiple of 4, got ${String(length)}`);
    const c = await this.adminCommand(
      { opcode: AdminOpcode.GET_LOG_PAGE, nsid, cdw10: ((lid & 0xff) | ((numd & 0xffff) << 16)) >>> 0, cdw11: numd >>> 16 },
      { receive: length },
    );
    return c.data!;
  }

  // ---- I/O queues ----

  /**
   * Creates an I/O queue pair (Create I/O Completion Queue, then Create I/O Submission Queue) in
   * fresh DMA memory, with the lowest free qid.
   *
   * @throws {RangeError} for a size outside 2..MQES + 1, or when every granted queue is in use.
   * @throws {NvmeError} if the controller refuses either command (the CQ is deleted again).
   */
  async createIoQueuePair(options: IoQueuePairOptions = {}): Promise<QueuePair> {
    this.#assertUsable();
    const max = this.cap.maxQueueEntries;
    const entries = options.entries ?? (options.depth !== undefined ? options.depth + 1 : Math.min(256, max));
    if (!Number.isInteger(entries) || entries < 2 || entries > max) {
      throw new RangeError(`Expected an I/O queue of 2..${String(max)} entries (CAP.MQES + 1), got ${String(entries)}`);
    }
    let qid = 1;
    while (this.#queues.has(qid) || this.#creating.has(qid)) qid++;
    if (qid > this.#ioQueuesGranted) {
      throw new RangeError(`all ${String(this.#ioQueuesGranted)} I/O queues the controller granted are in use`);
    }
    const mode = options.completions ?? this.completions;
    if (mode === 'msix' && this.#vectors === 0) throw new RangeError('MSI-X completions need MSI-X vectors: the driver is polling');
    let vector = 0;
    if (mode === 'msix') {
      if (options.vector !== undefined) {
        if (!Number.isInteger(options.vector) || options.vector < 0 || options.vector >= this.#vectors) {
          throw new RangeError(`Expected an MSI-X vector below ${String(this.#vectors)}, got ${String(options.vector)}`);
        }
        vector = options.vector;
      } else if (this.#vectors > 1) {
        vector = this.#nextVector;
        this.#nextVector = this.#nextVector + 1 >= this.#vectors ? 1 : this.#nextVector + 1;
      }
    }
    const layout = QueuePair.layout(entries, this.pageSize, this.#maxTransfer);
    // Reserved while the memory is granted: a concurrent call picks the next qid.
    this.#creating.add(qid);
    let memory: DmaMemory;
    try {
      memory = await this.client.allocateDma(layout.size, { name: `nvme-ioq${String(qid)}` });
    } finally {
      this.#creating.delete(qid);
    }
    const qp = new QueuePair({
      qid,
      entries,
      memory,
      layout,
      pageSize: this.pageSize,
      maxTransfer: this.#maxTransfer,
      doorbellStride: this.cap.doorbellStride,
      doorbells: this.#ioDoorbells,
      mode,
      vector,
      timeoutMs: options.timeoutMs ?? this.#options.ioTimeoutMs ?? 30_000,
    });
    // Reserve the qid (and the vector route) before the first await on the controller.
    this.#queues.set(qid, qp);
    this.#queueMemory.set(qp, memory);
    if (mode === 'msix') (this.#byVector[vector] ??= []).push(qp);
    const size = (entries - 1) << 16;
    try {
      await this.adminCommand({
        opcode: AdminOpcode.CREATE_CQ,
        prp1: qp.cqIova,
        cdw10: (qid | size) >>> 0,
        // PC (physically contiguous), IEN (interrupts enabled), IV (vector).
        cdw11: (0x1 | (mode === 'msix' ? 0x2 : 0) | (vector << 16)) >>> 0,
      });
      try {
        await this.adminCommand({ opcode: AdminOpcode.CREATE_SQ, prp1: qp.sqIova, cdw10: (qid | size) >>> 0, cdw11: (0x1 | (qid << 16)) >>> 0 });
      } catch (err) {
        await this.adminCommand({ opcode: AdminOpcode.DELETE_CQ, cdw10: qid }).catch(() => undefined);
        throw err;
      }
    } catch (err) {
      this.#forget(qp);
      qp.abort(queueDeleted(qid));
      await memory.unmap().catch(() => undefined);
      throw err;
    }
    debug('I/O queue pair %d: %d entries, %s, vector %d', qid, entries, mode, vector);
    return qp;
  }

  /**
   * Deletes an I/O queue pair (Delete I/O SQ, then CQ) and releases its memory. With `drain`
   * (default) outstanding commands finish first (for at most `drainTimeoutMs`, if given); the rest
   * fail with {@link NvmeAbortedError} 'ECANCELED'.
   */
  async deleteIoQueuePair(qp: QueuePair, options: { drain?: boolean; drainTimeoutMs?: number } = {}): Promise<void> {
    if (this.#queues.get(qp.qid) !== qp) return;
    if (options.drain ?? true) {
      const limit = options.drainTimeoutMs;
      if (limit === undefined) await qp.idle();
      else {
        const ac = new AbortController();
        await Promise.race([qp.idle(), sleep(limit, undefined, { signal: ac.signal }).catch(() => undefined)]);
        ac.abort();
      }
    }
    if (this.#queues.get(qp.qid) !== qp) return;
    this.#forget(qp);
    try {
      if (this.#state === 'ready' || this.#state === 'closing') {
        await this.adminCommand({ opcode: AdminOpcode.DELETE_SQ, cdw10: qp.qid });
        // Completions of commands the deletion aborted, if the controller posted any.
        qp.poll();
        await this.adminCommand({ opcode: AdminOpcode.DELETE_CQ, cdw10: qp.qid });
        this.#shadow?.forgetQueue(qp.qid);
      }
    } finally {
      qp.abort(queueDeleted(qp.qid));
      const memory = this.#queueMemory.get(qp);
      this.#queueMemory.delete(qp);
      await memory?.unmap().catch(() => undefined);
    }
  }

  // ---- buffers ----

  /**
   * DMA memory for data buffers (rounded up to the page size), released by {@link NvmeDriver.close}
   * or {@link NvmeDriver.freeBuffer}.
   */
  async allocateBuffer(size: number): Promise<DmaMemory> {
    this.#assertUsable();
    const mem = await this.client.allocateDma(size, { name: 'nvme-data' });
    this.#buffers.add(mem);
    return mem;
  }

  /** Releases a buffer of {@link NvmeDriver.allocateBuffer}. */
  async freeBuffer(mem: DmaMemory): Promise<void> {
    if (!this.#buffers.delete(mem)) return;
    await mem.unmap();
  }

  // ---- reset and close ----

  /**
   * Controller reset: every I/O queue pair is abandoned (its commands fail with
   * {@link NvmeAbortedError} 'ECANCELED'), the controller is disabled and enabled again with a
   * fresh admin queue, and identified again. I/O queue pairs must be created again afterwards.
   */
  async reset(): Promise<void> {
    this.#assertUsable();
    this.#state = 'opening';
    for (const qp of [...this.#queues.values()]) {
      this.#forget(qp);
      qp.abort(new NvmeAbortedError('ECANCELED', `I/O queue pair ${String(qp.qid)} was dropped by a controller reset`));
      const memory = this.#queueMemory.get(qp);
      this.#queueMemory.delete(qp);
      await memory?.unmap().catch(() => undefined);
    }
    this.#admin?.abort(new NvmeAbortedError('ECANCELED', 'the admin queue was dropped by a controller reset'));
    this.#admin = null;
    // A reset forgets the Doorbell Buffer Config.
    this.#shadow?.close();
    this.#shadow = null;
    this.#ioDoorbells = this.#doorbells;
    await this.#disable();
    await this.#enable();
    await this.#identifyAll();
    this.#state = 'ready';
  }

  /**
   * Deletes the I/O queue pairs, shuts the controller down (CC.SHN normal; CSTS.SHST complete
   * awaited within CAP.TO), disables MSI-X and releases every eventfd, mapping and DMA range the
   * driver holds. Idempotent. If the connection is gone, only local resources are released.
   */
  async close(options: CloseOptions = {}): Promise<void> {
    if (this.#state === 'closed' || this.#state === 'closing') return;
    const usable = this.#state === 'ready' && !this.client.closed && this.#failure === null;
    this.#state = 'closing';
    try {
      if (usable) {
        for (const qp of [...this.#queues.values()]) {
          try {
            await this.deleteIoQueuePair(qp, { drain: true, drainTimeoutMs: options.drainTimeoutMs ?? 5000 });
          } catch (err) {
            debug('deleting I/O queue pair %d failed: %s', qp.qid, (err as Error).message);
          }
        }
        if (options.shutdown ?? true) {
          try {
            await this.#shutdown();
          } catch (err) {
            debug('shutdown failed: %s', (err as Error).message);
          }
        }
      }
    } finally {
      await this.#release();
    }
  }

  // ---- bring-up ----

  async #bringUp(): Promise<void> {
    this.#listen(this.client);
    this.#setUpDoorbells();
    await this.#setUpIoEventfds();
    // I/O queues use the same writer unless shadow doorbells are set up later.
    this.#ioDoorbells = this.#doorbells;
    await this.#disable();
    if (this.completions === 'msix') await this.#setUpMsix();
    await this.#enable();
    await this.#identifyAll();
    this.#state = 'ready';
  }

  #setUpDoorbells(): void {
    const want = this.#options.doorbells ?? 'auto';
    if (want === 'message' || want === 'ioeventfd') return;
    const info = this.client.region(BAR0);
    const first = sqTailDoorbell(0, this.cap.doorbellStride);
    if (info.mappable) {
      try {
        const region = this.client.mmapRegion(BAR0);
        const mapped = MappedDoorbells.from(region, first, this.#doorbells);
        if (mapped !== null) {
          this.#doorbells = mapped;
          debug('doorbells: mapped BAR0 0x%s..0x%s', mapped.range.start.toString(16), mapped.range.end.toString(16));
          return;
        }
        region.unmap();
      } catch (err) {
        if (want === 'mmap') throw err;
        debug('doorbells: mapping BAR0 failed (%s); using messages', (err as Error).message);
      }
    }
    if (want === 'mmap') throw codeError('ENODEV', 'the server does not offer the doorbell page of BAR0 for mmap');
  }

  /**
   * ioeventfds for the doorbells (DEVICE_GET_REGION_IO_FDS on BAR0), when wanted and offered and
   * the doorbell page is not mapped: each doorbell is then a shadow store and an eventfd signal.
   */
  async #setUpIoEventfds(): Promise<void> {
    const want = this.#options.doorbells ?? 'auto';
    if (this.#doorbells.kind !== 'message' || (want !== 'auto' && want !== 'ioeventfd')) return;
    const first = sqTailDoorbell(0, this.cap.doorbellStride);
    let writer: IoEventfdDoorbells | null = null;
    try {
      const set = await this.client.useIoEventfds(BAR0);
      writer = IoEventfdDoorbells.from(set, first, (BAR0_DOORBELL_END - first) >>> 2, this.#doorbells);
      if (writer === null) this.client.stopIoEventfds(BAR0);
    } catch (err) {
      if (want === 'ioeventfd') throw err;
      debug('doorbells: DEVICE_GET_REGION_IO_FDS failed (%s); using messages', (err as Error).message);
      return;
    }
    if (writer === null) {
      if (want === 'ioeventfd') throw codeError('ENODEV', 'the server offers no ioeventfds for the doorbells of BAR0');
      return;
    }
    this.#doorbells = writer;
    debug('doorbells: %d ioeventfds', writer.covered);
  }

  async #setUpMsix(): Promise<void> {
    const msix = this.pci.msix!;
    const available = Math.min(msix.tableSize, this.client.irqs.info[PciIrq.MSIX]!.count);
    const wanted = 1 + (this.#options.ioQueues ?? 8);
    const vectors = Math.max(1, Math.min(available, wanted));
    await this.client.enableIrqs(PciIrq.MSIX, vectors);
    this.client.on('irq', this.#onIrq);
    for (let v = 0; v < vectors; v++) {
      await this.pci.writeMsixVector(v, { address: MSI_ADDRESS, data: v, masked: false });
    }
    await this.pci.setMsixEnabled(true);
    this.#vectors = vectors;
    this.#byVector = Array.from({ length: vectors }, () => []);
    debug('MSI-X: %d vectors', vectors);
  }

  /** CC.EN 0, then CSTS.RDY 0 (SPDK: a controller still enabling is let finish first). */
  async #disable(): Promise<void> {
    const cc = await this.#reg(Reg.CC);
    let csts = await this.#reg(Reg.CSTS);
    if ((cc & Cc.EN) !== 0 && (csts & Csts.RDY) === 0) {
      try {
        await this.#waitCsts((v) => (v & Csts.RDY) !== 0, 'CSTS.RDY to become 1 (finishing an earlier enable)');
      } catch (err) {
        debug('%s; disabling anyway', (err as Error).message);
      }
      csts = await this.#reg(Reg.CSTS);
    }
    if ((cc & Cc.EN) !== 0) await this.client.writeUint(BAR0, Reg.CC, 4, (cc & ~Cc.EN) >>> 0);
    if ((cc & Cc.EN) !== 0 || (csts & Csts.RDY) !== 0) {
      await this.#waitCsts((v) => (v & Csts.RDY) === 0, 'CSTS.RDY to become 0 after CC.EN was cleared');
    }
  }

  /** Admin queue registers, CC with EN, and CSTS.RDY 1. */
  async #enable(): Promise<void> {
    const entries = this.#options.adminQueueEntries ?? 32;
    if (!Number.isInteger(entries) || entries < 2 || entries > Math.min(MAX_ADMIN_ENTRIES, this.cap.maxQueueEntries)) {
      throw new RangeError(`Expected an admin queue of 2..${String(Math.min(MAX_ADMIN_ENTRIES, this.cap.maxQueueEntries))} entries, got ${String(entries)}`);
    }
    const layout = QueuePair.layout(entries, this.pageSize, this.pageSize, Math.max(this.pageSize, IDENTIFY_SIZE));
    if (this.#adminMemory === null || this.#adminMemory.size < layout.size || !this.#adminMemory.mapped) {
      await this.#adminMemory?.unmap().catch(() => undefined);
      this.#adminMemory = null;
      this.#adminMemory = await this.client.allocateDma(layout.size, { name: 'nvme-adminq' });
    }
    const memory = this.#adminMemory;
    memory.bytes.fill(0, 0, layout.size);
    const admin = new QueuePair({
      qid: 0,
      entries,
      memory,
      layout,
      pageSize: this.pageSize,
      maxTransfer: this.pageSize,
      doorbellStride: this.cap.doorbellStride,
      doorbells: this.#doorbells,
      mode: this.completions,
      vector: 0,
      timeoutMs: this.#options.adminTimeoutMs ?? 30_000,
    });
    this.#admin = admin;
    if (this.completions === 'msix') this.#byVector[0] = [admin];
    const aqa = ((entries - 1) & Aqa.ASQS_MASK) | (((entries - 1) << Aqa.ACQS_SHIFT) & Aqa.ACQS_MASK);
    await this.client.writeUint(BAR0, Reg.AQA, 4, aqa >>> 0);
    await this.#writeReg64(Reg.ASQ, admin.sqIova);
    await this.#writeReg64(Reg.ACQ, admin.cqIova);
    await this.client.writeUint(BAR0, Reg.CC, 4, enableValue(this.pageSize));
    await this.#waitCsts((v) => (v & Csts.RDY) !== 0, 'CSTS.RDY to become 1 after CC.EN was set');
  }

  async #identifyAll(): Promise<void> {
    const ctrl = await this.identifyController();
    this.#controller = ctrl;
    await this.#setUpShadowDoorbells();
    if ((ctrl.sqes & 0xf) > 6 || (ctrl.sqes >>> 4) < 6 || (ctrl.cqes & 0xf) > 4 || (ctrl.cqes >>> 4) < 4) {
      // 0 means "not reported" on some controllers; anything else must admit 64/16-byte entries.
      if (ctrl.sqes !== 0 || ctrl.cqes !== 0) throw codeError('ENODEV', `the controller does not support 64-byte SQ / 16-byte CQ entries (SQES 0x${ctrl.sqes.toString(16)}, CQES 0x${ctrl.cqes.toString(16)})`);
    }
    const limit = this.#options.maxTransferSize ?? DEFAULT_MAX_TRANSFER;
    const mdts = ctrl.mdts === 0 ? Infinity : this.cap.minPageSize * 2 ** ctrl.mdts;
    this.#maxTransfer = Math.max(this.pageSize, Math.min(limit, mdts));
    this.#namespaces = new Map();
    for (const nsid of await this.activeNamespaces()) {
      const ns = await this.identifyNamespace(nsid);
      if (ns !== null) this.#namespaces.set(nsid, ns);
    }
    const wanted = this.#options.ioQueues ?? 8;
    if (wanted > 0) await this.setNumQueues(wanted);
    debug('controller %s %s: %d namespaces, MDTS %d bytes, %d I/O queues', ctrl.model, ctrl.serial, this.#namespaces.size, this.#maxTransfer, this.#ioQueuesGranted);
  }

  /**
   * Doorbell Buffer Config: one page of shadow doorbells and one of EventIdx values (PRP1, PRP2),
   * for controllers that offer it while doorbells are messages. Failure only means no shadows.
   */
  async #setUpShadowDoorbells(): Promise<void> {
    if (this.#options.shadowDoorbells === false || this.#doorbells.kind !== 'message') return;
    if ((this.controller.oacs & Oacs.DBBUF) === 0) return;
    try {
      this.#shadowMemory ??= await this.client.allocateDma(2 * this.pageSize, { name: 'nvme-dbbuf' });
      const mem = this.#shadowMemory;
      mem.bytes.fill(0, 0, 2 * this.pageSize);
      await this.adminCommand({ opcode: AdminOpcode.DBBUF, prp1: mem.iovaOf(0), prp2: mem.iovaOf(this.pageSize) });
      const bytes = mem.bytes;
      this.#shadow = new ShadowDoorbells(
        bytes.subarray(0, this.pageSize),
        bytes.subarray(this.pageSize, 2 * this.pageSize),
        sqTailDoorbell(0, this.cap.doorbellStride),
        this.cap.doorbellStride,
        this.#doorbells,
      );
      this.#ioDoorbells = this.#shadow;
      debug('shadow doorbells at 0x%s, EventIdx at 0x%s', mem.iovaOf(0).toString(16), mem.iovaOf(this.pageSize).toString(16));
    } catch (err) {
      debug('Doorbell Buffer Config failed (%s): doorbells stay messages', (err as Error).message);
    }
  }

  async #shutdown(): Promise<void> {
    const cc = await this.#reg(Reg.CC);
    if ((cc & Cc.EN) === 0) return;
    await this.client.writeUint(BAR0, Reg.CC, 4, ((cc & ~Cc.SHN_MASK) | (Shn.NORMAL << Cc.SHN_SHIFT)) >>> 0);
    await this.#waitCsts((v) => ((v & Csts.SHST_MASK) >>> Csts.SHST_SHIFT) === Shst.COMPLETE, 'CSTS.SHST to report shutdown complete', Math.max(this.cap.timeoutMs, 5000));
  }

  /** Releases everything local; tells the server what it still can (best effort). */
  async #release(): Promise<void> {
    this.#state = 'closing';
    const aborted = this.#failure ?? new NvmeAbortedError('ECANCELED', 'the NVMe driver was closed');
    for (const qp of [...this.#queues.values()]) {
      this.#forget(qp);
      qp.abort(aborted);
    }
    this.#admin?.abort(aborted);
    this.#unlisten(this.client);
    if (this.#move !== null) this.#unlisten(this.#move.client);
    this.#move = null;
    this.#shadow?.close();
    this.#shadow = null;
    this.#doorbells.close();
    const live = !this.client.closed;
    if (live && this.#vectors > 0) {
      try {
        await this.pci.setMsixEnabled(false);
      } catch (err) {
        debug('disabling MSI-X failed: %s', (err as Error).message);
      }
    }
    // Eventfds: closed by disabling the index (locally even if the server refuses).
    if (live && this.client.irqs.enabledVectors(PciIrq.MSIX).length > 0) {
      await this.client.disableIrqs(PciIrq.MSIX).catch((err: unknown) => debug('disabling MSI-X eventfds failed: %s', (err as Error).message));
    }
    this.#vectors = 0;
    this.#byVector = [];
    const memories = [...this.#queueMemory.values(), ...this.#buffers];
    if (this.#adminMemory !== null) memories.push(this.#adminMemory);
    if (this.#shadowMemory !== null) memories.push(this.#shadowMemory);
    this.#queueMemory.clear();
    this.#buffers.clear();
    this.#adminMemory = null;
    this.#shadowMemory = null;
    await Promise.all(memories.map((m) => m.unmap().catch(() => undefined)));
    this.#state = 'closed';
  }

  // ---- events ----

  #irq(index: number, vector: number): void {
    if (index !== PciIrq.MSIX) return;
    const qps = this.#byVector[vector];
    if (qps === undefined) return;
    for (let i = 0; i < qps.length; i++) qps[i]!.poll();
  }

  /** The connection ended: fail everything outstanding and release local resources. */
  #lost(err: Error | null): void {
    if (this.#state === 'closed') return;
    this.#failure = new NvmeAbortedError('ECONNRESET', `the connection to the NVMe controller ended${err ? `: ${err.message}` : ''}`, { cause: err });
    for (const qp of this.#queues.values()) qp.abort(this.#failure);
    this.#admin?.abort(this.#failure);
    // A close() in progress releases by itself.
    if (this.#state !== 'closing') void this.#release();
  }

  /** A doorbell could not be written: the queues cannot make progress. */
  #fatal(err: Error): void {
    // Not while the connection is being replaced: every doorbell is rung again afterwards.
    if (this.client.disconnected || this.#move !== null) {
      debug('doorbell write failed while reconnecting or moving (rung again later): %s', err.message);
      return;
    }
    if (this.#failure !== null) return;
    debug('doorbell write failed: %s', err.message);
    this.#failure = new NvmeAbortedError('ECONNRESET', `a doorbell write failed: ${err.message}`, { cause: err });
    for (const qp of this.#queues.values()) qp.abort(this.#failure);
    this.#admin?.abort(this.#failure);
  }

  // ---- reconnecting and moving ----

  #listen(client: VfioUserClient): void {
    client.on('close', this.#onClientClose);
    client.on('disconnect', this.#onDisconnect);
    client.on('reconnect', this.#onReconnect);
  }

  #unlisten(client: VfioUserClient): void {
    client.off('irq', this.#onIrq);
    client.off('close', this.#onClientClose);
    client.off('disconnect', this.#onDisconnect);
    client.off('reconnect', this.#onReconnect);
  }

  /** Doorbell writers for the current client (mapped page if wanted and offered), given to every queue. */
  #rebuildDoorbells(): void {
    this.#doorbells.close();
    this.#doorbells = new MessageDoorbells(this.client, BAR0, (err) => this.#fatal(err));
    this.#setUpDoorbells();
    if (this.#shadow !== null && this.#shadowMemory !== null) {
      this.#shadow.close();
      const bytes = this.#shadowMemory.bytes;
      this.#shadow = new ShadowDoorbells(bytes.subarray(0, this.pageSize), bytes.subarray(this.pageSize, 2 * this.pageSize), sqTailDoorbell(0, this.cap.doorbellStride), this.cap.doorbellStride, this.#doorbells);
      this.#ioDoorbells = this.#shadow;
    } else {
      this.#ioDoorbells = this.#doorbells;
    }
    this.#admin?.setDoorbells(this.#doorbells);
    for (const qp of this.#queues.values()) qp.setDoorbells(this.#ioDoorbells);
  }

  /** Every doorbell rung with its current value, and everything posted meanwhile reaped. */
  #kick(): void {
    this.#admin?.kick();
    for (const qp of this.#queues.values()) qp.kick();
  }

  /** After the client reconnected: doorbells again, then carry on if the controller kept its state. */
  async #reattach(): Promise<void> {
    if (this.#state === 'closed' || this.#state === 'closing') return;
    this.#rebuildDoorbells();
    // A register read: a server keeping the device resumes it at the first BAR access.
    const csts = await this.#reg(Reg.CSTS);
    const cc = await this.#reg(Reg.CC);
    if (csts === 0xffffffff || (csts & Csts.RDY) === 0 || (csts & Csts.CFS) !== 0 || (cc & Cc.EN) === 0) {
      const why = new NvmeAbortedError('ECONNRESET', `the controller did not keep its state across the reconnect (CC 0x${cc.toString(16)}, CSTS 0x${csts.toString(16)})`);
      this.#failure = why;
      for (const qp of this.#queues.values()) qp.abort(why);
      this.#admin?.abort(why);
      throw why;
    }
    this.#kick();
    debug('reattached: queues carry on');
  }

  /**
   * First half of moving to `destination` (a migration destination, or another connection to a
   * device that keeps its state), done before the device stops: grants every DMA range the
   * driver uses (queues, admin queue, shadow doorbells, buffers) to the destination at the same
   * addresses, gives it eventfds for the MSI-X vectors, and reads its config space. Doorbell
   * failures on the current client are ignored from now until {@link NvmeDriver.completeMove}.
   */
  async prepareMove(destination: VfioUserClient): Promise<void> {
    this.#assertUsable();
    if (destination === this.client) throw new TypeError('Expected another client to move to');
    const pci = await PciFunction.open(destination);
    const memories = [...this.#queueMemory.values(), ...this.#buffers];
    if (this.#adminMemory !== null) memories.push(this.#adminMemory);
    if (this.#shadowMemory !== null) memories.push(this.#shadowMemory);
    for (const mem of memories.sort((a, b) => a.iova - b.iova)) await destination.shareDma(mem);
    if (this.#vectors > 0) {
      await destination.enableIrqs(PciIrq.MSIX, this.#vectors);
      destination.on('irq', this.#onIrq);
    }
    this.#move = { client: destination, pci };
  }

  /**
   * Second half of a move (inside a migration's downtime: `migrate`'s `beforeResume`): from now on
   * the driver uses the destination. Doorbells are set up on it and rung with their current
   * values (a device that does not run yet takes them when it does), and the queues are reaped.
   * The old client is left to its owner (its maps are released when it closes).
   */
  completeMove(): void {
    const move = this.#move;
    if (move === null) throw new Error('prepareMove() first');
    const old = this.client;
    this.#unlisten(old);
    this.#client = move.client;
    this.#pci = move.pci;
    this.#move = null;
    this.#listen(this.client);
    if (this.#vectors > 0) this.client.on('irq', this.#onIrq);
    this.#rebuildDoorbells();
    this.#kick();
  }

  /** A move that will not happen (the migration failed): stay on the current client. */
  async cancelMove(): Promise<void> {
    const move = this.#move;
    if (move === null) return;
    this.#move = null;
    move.client.off('irq', this.#onIrq);
    this.#kick();
  }

  #forget(qp: QueuePair): void {
    if (this.#queues.get(qp.qid) === qp) this.#queues.delete(qp.qid);
    const list = this.#byVector[qp.vector];
    if (list !== undefined) {
      const i = list.indexOf(qp);
      if (i >= 0) list.splice(i, 1);
    }
  }

  #assertUsable(): void {
    if (this.#failure !== null) throw this.#failure;
    if (this.#state === 'closed') throw new NvmeAbortedError('ECANCELED', 'the NVMe driver is closed');
  }

  // ---- registers ----

  #reg(offset: number): Promise<number> {
    return this.client.readUint(BAR0, offset, 4);
  }

  async #writeReg64(offset: number, value: number): Promise<void> {
    await this.client.writeUint(BAR0, offset, 4, value % 0x1_0000_0000);
    await this.client.writeUint(BAR0, offset + 4, 4, Math.floor(value / 0x1_0000_0000));
  }

  /**
   * Polls CSTS until `done(csts)`, within `limitMs` (default: the ready timeout, CAP.TO).
   * @throws code 'EIO' for CSTS.CFS or an all-ones read, 'ETIMEDOUT' when the time is up.
   */
  async #waitCsts(done: (csts: number) => boolean, what: string, limitMs?: number): Promise<void> {
    const limit = limitMs ?? this.#options.readyTimeoutMs ?? Math.max(this.cap.timeoutMs, 500);
    const start = performance.now();
    for (let attempt = 0; ; attempt++) {
      const csts = await this.#reg(Reg.CSTS);
      if (csts === 0xffffffff) throw codeError('EIO', `CSTS reads as all ones while waiting for ${what}: the controller is not responding`);
      if (done(csts)) return;
      if ((csts & Csts.CFS) !== 0) throw codeError('EIO', `controller fatal status (CSTS.CFS) while waiting for ${what}`);
      const elapsed = performance.now() - start;
      if (elapsed >= limit) throw codeError('ETIMEDOUT', `timed out after ${String(Math.round(elapsed))} ms waiting for ${what} (CAP.TO ${String(this.cap.timeoutMs)} ms)`);
      await sleep(Math.min(10, attempt));
    }
  }
}
