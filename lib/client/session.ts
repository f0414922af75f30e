/** A client's session with its device: bring-up, loss of the connection, reconnection, release of all it holds. */
import { debuglog } from 'node:util';
import type { Fd } from '../native/fd';
import { Command, Errno } from '../protocol/constants';
import { VfioUserError } from '../protocol/errors';
import type { Negotiated } from '../protocol/capabilities';
import type { VersionMessage } from '../protocol/messages/version';
import { checkDeviceInfo, fetchIrqs, fetchRegions, getDeviceInfo, type DeviceSummary } from './device';
import { DmaTable } from './dma';
import { protocolError } from './errors';
import { IrqChannels, type IrqEvent } from './irqs';
import { ClientLink } from './link';
import { negotiateVersion } from './negotiate';
import type { ClientSettings } from './options';
import { RegionIo } from './region-io';

const debug = debuglog('vfio-user:client');

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/** @internal What the session reports to the client (which emits them as its events). */
export interface SessionEvents {
  irq(event: IrqEvent): void;
  close(error: Error | null): void;
  disconnect(error: Error): void;
  reconnect(): void;
}

/**
 * @internal Everything one client holds for its device, and the one place it is set up, kept
 * across a lost connection (`reconnect` option) and released. A lost connection closes the session
 * unless it is reconnectable or dropped on purpose; then it waits, 'disconnected', for
 * {@link ClientSession.reconnect}, which repeats the bring-up against the kept state.
 */
export class ClientSession {
  readonly settings: ClientSettings;
  readonly link: ClientLink;
  readonly io: RegionIo;
  readonly dma: DmaTable;
  readonly #events: SessionEvents;
  /** Set while the session drops the current connection on purpose. */
  #dropping = false;
  #reconnecting: Promise<void> | null = null;
  #negotiated: Readonly<Negotiated> | null = null;
  #serverVersion: VersionMessage | null = null;
  #device: DeviceSummary | null = null;
  #irqs: IrqChannels | null = null;

  /** Takes `socket` (connected, not yet negotiated); {@link ClientSession.bringUp} comes next. */
  constructor(socket: Fd, settings: ClientSettings, events: SessionEvents) {
    this.settings = settings;
    this.#events = events;
    this.link = new ClientLink(socket, settings, {
      serve: (msg, conn) => this.dma.serve(msg, conn),
      lost: (error) => this.#lost(error),
    });
    this.io = new RegionIo(this.link, () => this.negotiated, settings);
    const self = this;
    this.dma = new DmaTable({
      call: (command, body, fds) => this.link.request(command, body, { fds }),
      get pageSize() {
        return self.pageSize();
      },
      get maxMaps() {
        return self.#negotiated?.maxDmaMaps ?? 0;
      },
      get maxSendFds() {
        return self.link.maxSendFds;
      },
      get maxTransfer() {
        return settings.maxDataXferSize;
      },
    });
  }

  get negotiated(): Readonly<Negotiated> {
    return connected(this.#negotiated);
  }

  get serverVersion(): VersionMessage {
    return connected(this.#serverVersion);
  }

  get device(): DeviceSummary {
    return connected(this.#device);
  }

  get irqs(): IrqChannels {
    return connected(this.#irqs);
  }

  /** True while a reconnect is under way. */
  get reconnecting(): boolean {
    return this.#reconnecting !== null;
  }

  /** The server's smallest page size (4096 before VERSION or for an unusable `pgsizes`). */
  pageSize(): number {
    const pgsizes = this.#negotiated?.pgsizes ?? 4096n;
    const lowest = pgsizes & -pgsizes;
    return lowest > 0n && lowest <= MAX_SAFE ? Number(lowest) : 4096;
  }

  /** QEMU's bring-up (see the client's module comment). */
  async bringUp(): Promise<void> {
    await this.#version();
    const info = await getDeviceInfo(this.link);
    this.#device = checkDeviceInfo(info);
    this.io.replaceRegions(await fetchRegions(this.link, info.numRegions));
    if (this.link.state === 'closed') {
      // The connection ended while the answers were decoded: nothing will release them later.
      this.io.replaceRegions([]);
      throw new VfioUserError(Errno.ECONNRESET, Command.DEVICE_GET_REGION_INFO, 0, 'connection closed during bring-up');
    }

    const irqInfos = await fetchIrqs(this.link, info.numIrqs, this.settings.name);
    const self = this;
    this.#irqs = new IrqChannels(irqInfos, {
      call: (command, body, fds) => this.link.request(command, body, { fds }),
      get maxSendFds() {
        return self.link.maxSendFds;
      },
      onIrq: (e) => this.#events.irq(e),
    });

    await this.io.decidePosting();
    if (this.link.state !== 'open') throw new VfioUserError(Errno.ECONNRESET, Command.VERSION, 0, 'connection closed during bring-up');
    debug('%s: up: %d regions, %d IRQ indexes, posted writes %s', this.settings.name, info.numRegions, info.numIrqs, this.io.postingAllowed ? 'on' : 'off');
  }

  /** VERSION on the current connection; on success the link is open. */
  async #version(): Promise<void> {
    const { negotiated, server, twinFd } = await negotiateVersion(this.link, this.settings);
    this.#negotiated = negotiated;
    this.#serverVersion = server;
    this.link.adopt(negotiated, twinFd);
    debug('%s: negotiated %d.%d: %o', this.settings.name, negotiated.major, negotiated.minor, negotiated);
  }

  /** The connection ended: close the session, or (reconnectable) wait for reconnect() keeping everything. */
  #lost(error: Error): void {
    const state = this.link.state;
    if (state === 'closed') return;
    if (!this.settings.reconnect && !this.#dropping) {
      this.shutdown(error);
      return;
    }
    if (state === 'disconnected') return;
    debug('%s: disconnected: %s', this.settings.name, error.message);
    this.link.drop(error);
    this.#events.disconnect(error);
  }

  /** Ends the connection on purpose, keeping everything for reconnect() even without the `reconnect` option. */
  #drop(error: Error): void {
    this.#dropping = true;
    try {
      this.#lost(error);
    } finally {
      this.#dropping = false;
    }
  }

  /** Drops an open connection as a crashed VMM's would end (see {@link VfioUserClient.disconnect}). */
  disconnect(): void {
    if (this.link.state !== 'open') return;
    this.link.flush();
    this.#drop(new VfioUserError(Errno.ECONNRESET, 0, 0, 'disconnected by the client'));
  }

  /** Connects to `path` and re-establishes the session; one at a time (see {@link VfioUserClient.reconnect}). */
  reconnect(path: string): Promise<void> {
    if (this.link.state === 'closed') return Promise.reject(new VfioUserError(Errno.ECONNRESET, 0, 0, 'the client is closed'));
    this.#reconnecting ??= this.#reattach(path).finally(() => {
      this.#reconnecting = null;
    });
    return this.#reconnecting;
  }

  async #reattach(path: string): Promise<void> {
    const state = this.link.state;
    if (state === 'open' || state === 'connecting') {
      this.link.flush();
      this.#drop(new VfioUserError(Errno.ECONNRESET, 0, 0, 'dropped to reconnect'));
    }
    const before = this.#device!;
    try {
      // A client made without the `reconnect` option still reconnects when asked to.
      this.link.restart(path);
      this.#negotiated = null;
      await this.#version();
      const info = await getDeviceInfo(this.link);
      if (info.flags !== before.flags || info.numRegions !== before.numRegions || info.numIrqs !== before.numIrqs) {
        throw protocolError(
          `reconnect: the device has ${String(info.numRegions)} regions and ${String(info.numIrqs)} IRQ indexes (flags 0x${info.flags.toString(16)}), not ${String(before.numRegions)} and ${String(before.numIrqs)} (0x${before.flags.toString(16)})`,
          'num_regions',
        );
      }
      this.io.replaceRegions(await fetchRegions(this.link, info.numRegions));
      const irqInfos = await fetchIrqs(this.link, info.numIrqs, this.settings.name);
      irqInfos.forEach((i, k) => {
        if (i.count !== this.irqs.info[k]!.count) throw protocolError(`reconnect: IRQ index ${String(k)} has ${String(i.count)} vectors, not ${String(this.irqs.info[k]!.count)}`, 'count');
      });
      this.io.dropIoFds();
      await this.io.decidePosting();
      await this.dma.regrantAll();
      await this.irqs.resendAll();
    } catch (err) {
      if (this.link.state !== 'closed') {
        this.#drop(err as Error);
        if (!this.settings.reconnect) this.shutdown(err as Error);
      }
      throw err;
    }
    debug('%s: reconnected', this.settings.name);
    this.#events.reconnect();
  }

  /** Hands batched writes to the socket, then releases everything (see {@link VfioUserClient.close}). */
  close(): void {
    if (this.link.state === 'closed') return;
    try {
      this.link.flush();
    } finally {
      this.shutdown(null);
    }
  }

  /** Releases everything: sockets (failing pending calls), eventfds, ioeventfds, regions, DMA; then `close`. */
  shutdown(error: Error | null): void {
    if (this.link.state === 'closed') return;
    this.#reconnecting = null;
    if (error !== null) debug('%s: closing: %s', this.settings.name, error.message);
    this.link.close(error);
    this.#irqs?.closeAll();
    this.io.release();
    this.dma.releaseAll();
    this.#events.close(error);
  }
}

function connected<T>(value: T | null): T {
  if (value === null) throw new Error('the client is not connected yet');
  return value;
}
