/**
 * Guest memory on the client side (reference §3.2, §3.3, §3.11, §3.12, §6.4).
 *
 * The client owns the memory a device may reach by DMA. Each range it grants is a
 * {@link DmaMemory}: a memfd the client creates, sized and sealed against shrinking and growing,
 * mapped here and handed to the server with `DMA_MAP` (the server mmaps the same pages: zero-copy
 * both ways); a caller's fd (a memfd, a /dev/shm or hugetlbfs file) at an offset, mapped and
 * handed over the same way; or a plain Buffer granted without an fd, which the server reaches with
 * `DMA_READ`/`DMA_WRITE` messages that this module answers. Per the spec the client answers those
 * messages for fd-backed ranges too. `DMA_UNMAP` withdraws one range, or every range at once with
 * the ALL flag.
 *
 * Server commands are checked before any byte is touched: no fds, `count` within the
 * `max_data_xfer_size` we announced (E2BIG), the whole range inside one granted range (EFAULT), the
 * permission granted (EPERM); a malformed payload gets EINVAL.
 *
 * A range keeps its own fd (the memfd, or its own open file description of the caller's file), so
 * it can be granted again: to the same server after {@link VfioUserClient.reconnect}, or to a
 * second client at the same address ({@link VfioUserClient.shareDma}, as a VMM hands guest memory
 * to a migration destination). The memory stays mapped here while any client still grants it.
 *
 * @packageDocumentation
 */
import * as fs from 'node:fs';
import { debuglog } from 'node:util';
import { binding } from '../native/binding';
import { Fd } from '../native/fd';
import { Mapping } from '../native/mapping';
import { createMemfd } from '../native/memfd';
import { Command, DmaMapFlags, DmaUnmapFlags, Errno } from '../protocol/constants';
import { ProtocolError } from '../protocol/errors';
import { encodeDmaMapRequest, encodeDmaUnmapRequest, decodeDmaUnmapReply, decodeDmaMapReply } from '../protocol/messages/dma';
import { AccessKind, createDmaAccess, readDmaAccess, writeDmaAccess } from '../protocol/messages/access';
import type { Connection, IncomingMessage } from '../transport/connection';

const debug = debuglog('vfio-user:client');

/** Life cycle of a granted range. */
export type DmaMemoryState = 'mapping' | 'mapped' | 'unmapping' | 'unmapped';

/** Options of {@link VfioUserClient.allocateDma} and {@link VfioUserClient.mapWithoutFd}. */
export interface DmaMapOptions {
  /**
   * DMA address (IOVA) of the range, a multiple of the server's smallest page size. Default: the
   * lowest free address at or above 1 MiB.
   */
  iova?: number | bigint;
  /** Grant read access only (DMA_MAP without WRITE): the device may not write. Default false. */
  readOnly?: boolean;
  /** Name of the memfd, shown in /proc (allocateDma only). */
  name?: string;
}

/** Options of {@link VfioUserClient.mapFd}. */
export interface DmaFdOptions extends Omit<DmaMapOptions, 'name'> {
  /**
   * Where the range starts in the file (DMA_MAP `offset`): a multiple of the server's page size
   * and of the file's own page size (hugetlbfs). Default 0.
   */
  fileOffset?: number | bigint;
}

/** @internal What the DMA table needs from the client. */
export interface DmaCore {
  /** Sends a command expecting no fds back; resolves with the reply payload. */
  call(command: number, body: Uint8Array, fds: readonly number[] | null): Promise<Buffer>;
  /** Smallest page size the server supports (alignment of iova and size). */
  readonly pageSize: number;
  /** Most maps the server accepts. */
  readonly maxMaps: number;
  /** Most fds the server accepts per message. */
  readonly maxSendFds: number;
  /** Largest DMA_READ/DMA_WRITE count we accept (our max_data_xfer_size). */
  readonly maxTransfer: number;
}

/**
 * A range of client memory the device may access by DMA.
 *
 * `bytes` is the memory itself: for a range from {@link VfioUserClient.allocateDma} it is a shared
 * mapping of a memfd the server maps too (a store here is visible to the device at once, and
 * vice versa); for {@link VfioUserClient.mapWithoutFd} it is the caller's Buffer, which the device
 * reaches through messages. After {@link DmaMemory.unmap} the memfd mapping is gone: its views
 * read as length 0 and `bytes` throws.
 */
export class DmaMemory {
  /** First DMA address of the range. */
  readonly iova: number;
  /** Length in bytes (a multiple of the server's page size). */
  readonly size: number;
  /** {@link DmaMapFlags} READ, plus WRITE unless read-only. */
  readonly flags: number;
  /** True if the memory was handed to the server as an fd (zero-copy), false for message-only. */
  readonly shared: boolean;
  /** Offset of the range in the fd it was granted with (0 for memory the client allocated). */
  readonly fileOffset: bigint;
  /** @internal */
  state: DmaMemoryState = 'mapping';
  /** @internal */
  readonly mapping: Mapping | null;
  /** @internal */
  unmapping: Promise<void> | null = null;
  /** @internal Our own fd of the memory (to grant it again), or null (message-only, or not reopenable). */
  fd: Fd | null;
  /** @internal The clients' tables that grant this range. */
  readonly grants = new Set<DmaTable>();
  readonly #buffer: Buffer | null;

  /** @internal Created by the client only. */
  constructor(table: DmaTable, iova: number, size: number, flags: number, mapping: Mapping | null, buffer: Buffer | null, fileOffset = 0n, fd: Fd | null = null) {
    this.grants.add(table);
    this.iova = iova;
    this.size = size;
    this.flags = flags;
    this.mapping = mapping;
    this.#buffer = buffer;
    this.shared = mapping !== null;
    this.fileOffset = fileOffset;
    this.fd = fd;
  }

  /**
   * The memory (zero-copy). Throws once an fd-backed range is unmapped. A read-only range of a
   * caller's fd ({@link VfioUserClient.mapFd}) is mapped read-only here too: writing it throws.
   */
  get bytes(): Buffer {
    if (this.mapping !== null) return this.mapping.bytes;
    return this.#buffer!;
  }

  /** True until {@link DmaMemory.unmap} (or the client) released the range. */
  get mapped(): boolean {
    return this.state === 'mapping' || this.state === 'mapped';
  }

  /** The device may write the range. */
  get writable(): boolean {
    return (this.flags & DmaMapFlags.WRITE) !== 0;
  }

  /** DMA address of byte `offset` of the range (for descriptors, PRPs, ...). */
  iovaOf(offset = 0): number {
    if (!Number.isInteger(offset) || offset < 0 || offset > this.size) {
      throw new RangeError(`Expected an offset within the ${String(this.size)}-byte range, got ${String(offset)}`);
    }
    return this.iova + offset;
  }

  /**
   * Withdraws the range: `DMA_UNMAP`, then the local mapping is released. Local resources are
   * released even when the server answers with an error (e.g. ENOENT: it did not know the range),
   * and the error is then reported. Idempotent: later calls return the same promise.
   *
   * @throws {VfioUserError} the server's errno, ETIMEDOUT, or ECONNRESET.
   * @throws {ProtocolError} if the reply does not echo the range.
   */
  unmap(): Promise<void> {
    if (this.unmapping !== null) return this.unmapping;
    if (this.state === 'unmapped' || this.grants.size === 0) return (this.unmapping = Promise.resolve());
    this.unmapping = settleFirstError([...this.grants].map((t) => t.withdrawFrom(this)));
    return this.unmapping;
  }
}

/** Waits for all; rejects with the first failure. */
async function settleFirstError(calls: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(calls);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

/** Our own open file description of `fd`'s file (for a later DMA_MAP), or null if it cannot be reopened. */
function reopen(fd: number, readOnly: boolean): Fd | null {
  try {
    return new Fd(fs.openSync(`/proc/self/fd/${fd}`, readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR));
  } catch (err) {
    debug('cannot reopen fd %d for later grants: %s', fd, (err as Error).message);
    return null;
  }
}

const AUTO_IOVA_BASE = 0x10_0000;
const MAX_IOVA = Number.MAX_SAFE_INTEGER;

/** @internal The granted ranges, sorted by iova, and the DMA_READ/DMA_WRITE service over them. */
export class DmaTable {
  #entries: DmaMemory[] = [];
  readonly #access = createDmaAccess();
  readonly #echo = Buffer.alloc(16);
  readonly #readBody: Buffer[] = [this.#echo, this.#echo];

  constructor(private readonly core: DmaCore) {}

  /** Ranges currently granted (or being granted), in address order. */
  list(): readonly DmaMemory[] {
    return this.#entries;
  }

  async allocate(size: number, options: DmaMapOptions = {}): Promise<DmaMemory> {
    if (!Number.isSafeInteger(size) || size < 1) throw new RangeError(`Expected a size (an integer >= 1), got ${String(size)}`);
    if (this.core.maxSendFds < 1) throw new RangeError('the server accepts no file descriptors (max_msg_fds 0): use mapWithoutFd');
    const length = roundUp(size, this.core.pageSize);
    const iova = this.#place(length, options.iova);
    // Sealed against shrinking and growing: the server's mapping can never lose its pages, and
    // a server that checks seals (QEMU's memory-backend-memfd sets them too) can rely on it.
    const fd = createMemfd(options.name ?? `vfio-user-dma-${iova.toString(16)}`, length, { sealSize: true });
    let mapping: Mapping;
    try {
      mapping = Mapping.map(fd, 0, length, binding.constants.PROT_READ | binding.constants.PROT_WRITE);
    } catch (err) {
      fd.close();
      throw err;
    }
    const flags = DmaMapFlags.READ | (options.readOnly ? 0 : DmaMapFlags.WRITE);
    // The memfd stays open with the range: it is what a reconnect or a second client maps.
    const mem = new DmaMemory(this, iova, length, flags, mapping, null, 0n, fd);
    await this.#grant(mem, fd);
    return mem;
  }

  async mapBuffer(buffer: Buffer, options: DmaMapOptions = {}): Promise<DmaMemory> {
    if (!Buffer.isBuffer(buffer)) throw new TypeError('Expected first argument to be a Buffer');
    const page = this.core.pageSize;
    if (buffer.length === 0 || buffer.length % page !== 0) {
      throw new RangeError(`Expected the buffer length to be a non-zero multiple of the ${String(page)}-byte page size, got ${String(buffer.length)}`);
    }
    const iova = this.#place(buffer.length, options.iova);
    const flags = DmaMapFlags.READ | (options.readOnly ? 0 : DmaMapFlags.WRITE);
    const mem = new DmaMemory(this, iova, buffer.length, flags, null, buffer);
    await this.#grant(mem, null);
    return mem;
  }

  async mapFd(fd: Fd | number, size: number, options: DmaFdOptions = {}): Promise<DmaMemory> {
    const raw = fd instanceof Fd ? fd.value : fd;
    if (!Number.isSafeInteger(raw) || raw < 0) throw new TypeError('Expected first argument to be an fd (an Fd or an integer >= 0)');
    if (this.core.maxSendFds < 1) throw new RangeError('the server accepts no file descriptors (max_msg_fds 0): use mapWithoutFd');
    const page = this.core.pageSize;
    if (!Number.isSafeInteger(size) || size < 1 || size % page !== 0) {
      throw new RangeError(`Expected the size to be a non-zero multiple of the ${String(page)}-byte page size, got ${String(size)}`);
    }
    const at = options.fileOffset ?? 0;
    if ((typeof at !== 'number' && typeof at !== 'bigint') || (typeof at === 'number' && !Number.isSafeInteger(at)) || at < 0 || BigInt(at) % BigInt(page) !== 0n) {
      throw new RangeError(`Expected fileOffset to be a multiple of the ${String(page)}-byte page size (>= 0), got ${String(at)}`);
    }
    const fileOffset = BigInt(at);
    const iova = this.#place(size, options.iova);
    const prot = binding.constants.PROT_READ | (options.readOnly ? 0 : binding.constants.PROT_WRITE);
    // Throws for a range past the end of the file, or an fd that cannot be mapped so.
    const mapping = Mapping.map(raw, fileOffset, size, prot);
    const flags = DmaMapFlags.READ | (options.readOnly ? 0 : DmaMapFlags.WRITE);
    const mem = new DmaMemory(this, iova, size, flags, mapping, null, fileOffset, reopen(raw, options.readOnly === true));
    await this.#grant(mem, raw);
    return mem;
  }

  /**
   * Grants `mem` (a range of another client, or of this one before a reconnect) to this server at
   * the same address, with the same fd and permissions: DMA_MAP again. The memory itself is the
   * same pages; it stays mapped here while any client grants it.
   */
  async share(mem: DmaMemory): Promise<void> {
    if (!mem.mapped) throw new RangeError('the range is no longer mapped');
    if (this.#entries.includes(mem)) return;
    if (mem.shared && mem.fd === null) throw new RangeError(`the range at 0x${mem.iova.toString(16)} has no fd of its own to grant again`);
    if (mem.shared && this.core.maxSendFds < 1) throw new RangeError('the server accepts no file descriptors (max_msg_fds 0)');
    const clash = this.#entries.find((e) => e.iova < mem.iova + mem.size && mem.iova < e.iova + e.size);
    if (clash !== undefined) throw new RangeError(`DMA range 0x${mem.iova.toString(16)}+0x${mem.size.toString(16)} overlaps the map at 0x${clash.iova.toString(16)}`);
    mem.grants.add(this);
    this.#insert(mem);
    try {
      await this.#send(mem, mem.fd);
    } catch (err) {
      this.#remove(mem);
      this.#drop(mem);
      throw err;
    }
  }

  /**
   * After a reconnect: DMA_MAP every range of this table again, in address order (the new
   * connection's server knows none of them). Rejects with the first failure after trying all.
   */
  async regrantAll(): Promise<void> {
    const failures: unknown[] = [];
    for (const mem of [...this.#entries]) {
      if (!mem.mapped) continue;
      try {
        if (mem.shared && mem.fd === null) throw new RangeError(`the range at 0x${mem.iova.toString(16)} has no fd of its own to grant again`);
        await this.#send(mem, mem.fd);
      } catch (err) {
        failures.push(err);
      }
    }
    if (failures.length > 0) throw failures[0];
  }

  /**
   * `DMA_UNMAP` with the ALL flag: the server drops every map at once; every range of this table
   * is released locally whatever the server answers (as {@link DmaMemory.unmap} does).
   */
  async unmapAll(): Promise<void> {
    const all = [...this.#entries];
    // A range another client also grants stays mapped (there).
    const own = all.filter((mem) => mem.grants.size === 1);
    for (const mem of own) mem.state = 'unmapping';
    const done = (async () => {
      try {
        const payload = await this.core.call(Command.DMA_UNMAP, encodeDmaUnmapRequest({ flags: DmaUnmapFlags.ALL, address: 0n, size: 0n }), null);
        if (payload.length > 0) {
          const echo = decodeDmaUnmapReply(payload);
          if (echo.address !== 0n || echo.size !== 0n) {
            throw new ProtocolError('DMA_UNMAP reply: does not echo the ALL request', { field: 'flags', errno: Errno.EPROTO });
          }
        }
      } finally {
        for (const mem of all) {
          this.#remove(mem);
          this.#release(mem);
        }
      }
    })();
    for (const mem of own) mem.unmapping ??= done;
    await done;
  }

  /** @internal DMA_UNMAP of `mem` from this table's server, then this grant is dropped (see {@link DmaMemory.unmap}). */
  withdrawFrom(mem: DmaMemory): Promise<void> {
    if (!this.#entries.includes(mem)) {
      this.#drop(mem);
      return Promise.resolve();
    }
    return this.#withdraw(mem);
  }

  /** Drops every range locally (the connection is gone; the server forgets them by itself). */
  releaseAll(): void {
    const all = this.#entries;
    this.#entries = [];
    for (const mem of all) this.#release(mem);
  }

  // ---- the server's DMA_READ / DMA_WRITE ----

  /** Answers one server command (synchronously; `msg` is valid only during the call). */
  serve(msg: IncomingMessage, conn: Connection): void {
    const write = msg.command === Command.DMA_WRITE;
    if (!write && msg.command !== Command.DMA_READ) {
      debug('server sent command %d, which a client does not serve', msg.command);
      conn.replyError(msg, Errno.ENOSYS);
      return;
    }
    if (msg.fdCount !== 0) {
      debug('DMA command %d carried %d fds', msg.command, msg.fdCount);
      conn.replyError(msg, Errno.EINVAL);
      return;
    }
    const a = this.#access;
    try {
      const view = new DataView(msg.data.buffer, msg.data.byteOffset, msg.data.byteLength);
      readDmaAccess(view, msg.payloadOffset, msg.payloadLength, write ? AccessKind.WRITE_REQUEST : AccessKind.READ_REQUEST, a);
    } catch (err) {
      debug('malformed DMA command: %s', (err as Error).message);
      conn.replyError(msg, Errno.EINVAL);
      return;
    }
    if (a.count > this.core.maxTransfer) {
      conn.replyError(msg, Errno.E2BIG);
      return;
    }
    const mem = this.#find(a.address, a.count);
    if (mem === null) {
      debug('DMA %s of 0x%s+%d outside every granted range', write ? 'write' : 'read', a.address.toString(16), a.count);
      conn.replyError(msg, Errno.EFAULT);
      return;
    }
    if ((mem.flags & (write ? DmaMapFlags.WRITE : DmaMapFlags.READ)) === 0) {
      conn.replyError(msg, Errno.EPERM);
      return;
    }
    const start = Number(a.address) - mem.iova;
    const bytes = mem.bytes;
    writeDmaAccess(this.#echo, 0, { address: a.address, count: a.count });
    if (write) {
      bytes.set(a.data!, start);
      conn.reply(msg, this.#echo);
    } else {
      this.#readBody[1] = bytes.subarray(start, start + a.count);
      conn.reply(msg, this.#readBody);
      this.#readBody[1] = this.#echo;
    }
  }

  // ---- internals ----

  /** The live range holding all of `[address, address + count)`, or null. */
  #find(address: bigint, count: number): DmaMemory | null {
    if (address > BigInt(MAX_IOVA)) return null;
    const at = Number(address);
    const list = this.#entries;
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (list[mid]!.iova <= at) lo = mid + 1;
      else hi = mid;
    }
    const mem = list[lo - 1];
    if (mem === undefined || mem.state === 'unmapped') return null;
    // Both sides are below 2^53 + 2^32, where the BigInt comparison is exact.
    if (address + BigInt(count) > BigInt(mem.iova + mem.size)) return null;
    return mem;
  }

  /** Validates or picks the iova of a new range of `length` bytes (RangeError on misuse). */
  #place(length: number, wanted: number | bigint | undefined): number {
    const page = this.core.pageSize;
    if (this.#entries.length >= this.core.maxMaps) {
      throw new RangeError(`the server accepts at most ${String(this.core.maxMaps)} DMA maps`);
    }
    if (wanted === undefined) {
      let at = AUTO_IOVA_BASE;
      for (const e of this.#entries) {
        if (e.iova + e.size <= at) continue;
        if (e.iova >= at + length) break;
        at = roundUp(e.iova + e.size, page);
      }
      if (at + length > MAX_IOVA) throw new RangeError('no free DMA address range is large enough');
      return at;
    }
    const iova = typeof wanted === 'bigint' ? (wanted <= BigInt(MAX_IOVA) ? Number(wanted) : -1) : wanted;
    if (!Number.isSafeInteger(iova) || iova < 0 || iova + length > MAX_IOVA) {
      throw new RangeError(`Expected iova to be an integer in [0, 2^53 - size), got ${String(wanted)}`);
    }
    if (iova % page !== 0) throw new RangeError(`Expected iova 0x${iova.toString(16)} to be a multiple of the ${String(page)}-byte page size`);
    const clash = this.#entries.find((e) => e.iova < iova + length && iova < e.iova + e.size);
    if (clash !== undefined) {
      throw new RangeError(`DMA range 0x${iova.toString(16)}+0x${length.toString(16)} overlaps the map at 0x${clash.iova.toString(16)}+0x${clash.size.toString(16)}`);
    }
    return iova;
  }

  async #grant(mem: DmaMemory, fd: Fd | number | null): Promise<void> {
    this.#insert(mem);
    try {
      await this.#send(mem, fd);
    } catch (err) {
      this.#remove(mem);
      this.#release(mem);
      throw err;
    }
    if (mem.state === 'mapping') mem.state = 'mapped';
  }

  /** One DMA_MAP of `mem` with `fd` (null: message-only). */
  async #send(mem: DmaMemory, fd: Fd | number | null): Promise<void> {
    const body = encodeDmaMapRequest({ flags: mem.flags, offset: mem.fileOffset, address: BigInt(mem.iova), size: BigInt(mem.size) });
    const payload = await this.core.call(Command.DMA_MAP, body, fd === null ? null : [fd instanceof Fd ? fd.value : fd]);
    decodeDmaMapReply(payload);
  }

  async #withdraw(mem: DmaMemory): Promise<void> {
    // A range still being granted is withdrawn once its DMA_MAP has been answered.
    mem.state = 'unmapping';
    try {
      const payload = await this.core.call(
        Command.DMA_UNMAP,
        encodeDmaUnmapRequest({ flags: 0, address: BigInt(mem.iova), size: BigInt(mem.size) }),
        null,
      );
      // libvfio-user and our server echo the request; a header-only reply is accepted too.
      if (payload.length > 0) {
        const echo = decodeDmaUnmapReply(payload);
        if (echo.address !== BigInt(mem.iova) || echo.size !== BigInt(mem.size)) {
          throw new ProtocolError(
            `DMA_UNMAP reply: echoes 0x${echo.address.toString(16)}+0x${echo.size.toString(16)}, not 0x${mem.iova.toString(16)}+0x${mem.size.toString(16)}`,
            { field: 'address', errno: Errno.EPROTO },
          );
        }
      }
    } finally {
      this.#remove(mem);
      this.#release(mem);
    }
  }

  #insert(mem: DmaMemory): void {
    const list = this.#entries;
    let i = 0;
    while (i < list.length && list[i]!.iova < mem.iova) i++;
    list.splice(i, 0, mem);
  }

  #remove(mem: DmaMemory): void {
    const i = this.#entries.indexOf(mem);
    if (i >= 0) this.#entries.splice(i, 1);
  }

  /** Drops this table's grant of `mem`; the memory goes when no client grants it any more. */
  #release(mem: DmaMemory): void {
    this.#drop(mem);
  }

  #drop(mem: DmaMemory): void {
    mem.grants.delete(this);
    if (mem.grants.size > 0) {
      // Still granted to another client: still mapped.
      if (mem.state === 'unmapping') mem.state = 'mapped';
      return;
    }
    mem.state = 'unmapped';
    mem.mapping?.unmapNow();
    mem.fd?.close();
    mem.fd = null;
  }
}

function roundUp(value: number, to: number): number {
  return Math.ceil(value / to) * to;
}
