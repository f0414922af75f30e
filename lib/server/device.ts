/**
 * What a device model gives the server: the device-agnostic contract between
 * {@link VfioUserServer} (which speaks the protocol) and a model (which never sees a socket, a
 * message or an fd). `PciDevice` (lib/pci) implements it for PCI devices.
 */
import type { Fd } from '../native/fd';
import type { DmaRegion, DmaSpace } from './dma';
import type { IoEventfd } from './ioeventfd';
import type { IrqIndexInfo, IrqTable } from './irq';
import type { MigrationHooks } from './migration';
import type { QUIESCE_BUSY, QuiesceReason } from './quiesce';

/** 0 for success, or a positive errno the client gets in the error reply. */
export type AccessResult = number | void;

/** A region the client can access with REGION_READ / REGION_WRITE (and perhaps mmap). */
export interface DeviceRegion {
  /** Size in bytes; 0 = not implemented. */
  readonly size: number;
  /** {@link RegionInfoFlags} READ / WRITE (MMAP and CAPS are derived). */
  readonly flags: number;
  /**
   * Serve a read of `dst.length` bytes at `offset` (already checked to lie inside the region).
   * May return a promise; later commands wait for it (the protocol executes in order).
   */
  read?(offset: number, dst: Buffer): AccessResult | Promise<AccessResult>;
  /** Serve a write of `src` at `offset` (checked to lie inside the region). */
  write?(offset: number, src: Buffer): AccessResult | Promise<AccessResult>;
  /** Shared memory the client may mmap: the file, where the region starts in it, and the areas. */
  readonly mmap?: {
    readonly fd: Fd;
    readonly fileOffset: number;
    readonly areas: readonly { readonly offset: number; readonly size: number }[];
  };
  /** Device-specific regions (index >= 9) carry a type capability. */
  readonly type?: { readonly type: number; readonly subtype: number };
  /**
   * ioeventfds offered for parts of the region (DEVICE_GET_REGION_IO_FDS; see ioeventfd.ts), read
   * at each query: assign a new array to change them. Writes they stand for may still arrive as
   * REGION_WRITE from clients that do not use them.
   */
  ioeventfds?: readonly IoEventfd[];
}

/** Handed to the device once: its view of the client's memory and interrupt routing. */
export interface DeviceContext {
  readonly dma: DmaSpace;
  readonly irqs: IrqTable;
  /**
   * Finish a deferred quiesce ({@link VfioUserDevice.quiesce} returned `'busy'`): 0 (default) when
   * quiesced, else the errno the waiting command fails with. False if none was outstanding.
   * (Always there when a VfioUserServer serves the device; test rigs may leave it out.)
   */
  quiesced?(errno?: number): boolean;
}

export interface VfioUserDevice {
  /** {@link DeviceFlags}: PCI, plus RESET if {@link VfioUserDevice.reset} exists. */
  readonly flags: number;
  /** Region index -> region (null or size 0 = not implemented). Length = num_regions. */
  readonly regions: readonly (DeviceRegion | null)[];
  /** IRQ index -> vector count and flags. Length = num_irqs. */
  readonly irqs: readonly IrqIndexInfo[];
  /** Present if the device can migrate. */
  readonly migration?: MigrationHooks;
  /** Called once by the server that serves this device. */
  attach(ctx: DeviceContext): void;
  /** DEVICE_RESET (and, by default, a client disconnect). Resolve when the reset is complete. */
  reset?(reason: ResetReason): void | Promise<void>;
  /**
   * The client went away and the server keeps the device's state for the next one (the
   * `keepState` server option) instead of resetting it: stop DMA and interrupts, let I/O already
   * started finish (its completions are kept for the next client), and resolve; the client's maps
   * and eventfds are dropped after that. The device carries on by itself once the next client uses
   * it (PciDevice: the first access to one of its BARs, a reset, or a migration state change).
   */
  suspend?(): void | Promise<void>;
  /** The client changed IRQ routing for `index` (e.g. gave an MSI-X vector its eventfd). */
  irqsChanged?(index: number): void;
  /**
   * The client mapped memory (DMA_MAP accepted): `region.iova`, `region.size`, `region.flags`
   * (READ/WRITE protection), `region.mapping` (null: reached by DMA_READ/WRITE messages).
   */
  dmaMapped?(region: DmaRegion): void;
  /**
   * The client takes a map back (DMA_UNMAP, UNMAP ALL, or it went away): the range is already
   * unreachable for new DMA, its memory still mapped; release what you hold of it. The unmap (and
   * the reply to the client) waits for the promise.
   */
  dmaUnmapped?(region: DmaRegion): void | Promise<void>;
  /**
   * Quiesce before DMA_MAP, DMA_UNMAP, DEVICE_RESET, a migration state change or the reset after
   * a hang-up (libvfio-user's quiesce callback; quiesce.ts): stop starting DMA and interrupts, and
   * return when quiesced (or a promise), or `'busy'` and call `ctx.quiesced()` later. The command,
   * and every command after it, waits.
   */
  quiesce?(reason: QuiesceReason): void | Promise<void> | typeof QUIESCE_BUSY;
  /** The command the device quiesced for is done: carry on. */
  unquiesce?(reason: QuiesceReason): void;
  /** The server is closing for good: release device resources. */
  close?(): void | Promise<void>;
}

/** Why a device is reset. */
export type ResetReason = 'client' | 'lost-connection' | 'flr';
