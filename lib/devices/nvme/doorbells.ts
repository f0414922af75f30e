/**
 * The doorbell page (BAR0 0x1000..0x1fff) and how the controller learns of new doorbell values.
 *
 * Three modes (`doorbells` option of the controller):
 *
 * - `'trap'` (default, correct with any client): the page is plain memory in this process. Every
 *   doorbell write arrives as a REGION_WRITE and is processed at once. Nothing polls, unless the
 *   guest registered shadow doorbells (see below).
 * - `'mmap'`: the page is backed by a memfd that the client may map (one fd for BAR0, the page
 *   offered as the only sparse-mmap area, page-aligned). Guest stores then land in shared memory
 *   without a message, so the controller polls the page (an `AdaptivePoller`, lib/pci/poller.ts). REGION_WRITEs to
 *   the page still work: they store into the same memory and are processed at once.
 * - `'ioeventfd'`: the page is backed by a memfd, not offered for mmap but as the shadow memory of
 *   one ioeventfd per doorbell (DEVICE_GET_REGION_IO_FDS, libvfio-user's shadow ioeventfds, all
 *   sharing one eventfd). A client that uses them stores the doorbell value into the page and
 *   signals the eventfd (one syscall, no message, no reply); the controller wakes on the eventfd
 *   ({@link EventFd.watch}) and reads the page, so nothing polls. REGION_WRITEs (clients that do
 *   not use the ioeventfds) store into the same memory and are processed at once. The eventfd and
 *   the memfd are replaced when a client goes away ({@link DoorbellPage.renew}), so a departed
 *   client's copies reach nothing.
 *
 * Shadow doorbells (Doorbell Buffer Config) work in both modes: the I/O queues' tails and heads
 * are read from guest memory while polling, and EventIdx tells the guest when it must ring the
 * real doorbell. In `'trap'` mode this lets the controller sleep with no timer at all when idle:
 * before sleeping it publishes EventIdx = the tails it has seen and re-reads the shadow tails
 * (closing the race with a guest that submitted meanwhile); the guest's next submission then rings
 * the real doorbell, which arrives as a REGION_WRITE and wakes the poller.
 *
 * ## Polling policy (measured by test/devices/nvme/polling.test.ts)
 *
 * | phase | entered                           | next poll                             |
 * |-------|-----------------------------------|---------------------------------------|
 * | spin  | on any work or doorbell activity   | `setImmediate`                        |
 * | short | `spinUs` (200 µs) without work     | `setTimeout(shortMs = 1)`             |
 * | long  | `shortForMs` (100 ms) without work | `setTimeout(longMs = 10)`             |
 * | sleep | trap mode only: EventIdx armed     | none: a trapped doorbell wakes it     |
 *
 * Any REGION access to BAR0 (a trapped register or doorbell) and every completion posted count as
 * activity and bring the poller back to spin. Measured on the 2-core CI machine, from a store into
 * the mapped doorbell page to the completion entry (4 KiB read, RAM backend, in-process):
 * spin ~0.015 ms; short median ~0.1 ms (worst ~1-4 ms); long median ~2.5-4.5 ms (worst ~9 ms);
 * the trapped REGION_WRITE callback path ~0.012 ms (plus the socket round trip in real use). Idle
 * in the long phase: 100 polls/s, about 1 % of one core. Spinning costs a core while the guest is
 * busy, so the spin window is kept short: under TCG the guest competes with us for the same two
 * cores. In a Linux guest (QEMU 11.1, mmap mode) most I/O doorbells arrive through the shadow
 * buffer and the mapped page, a handful as messages before the client maps the page.
 *
 * @packageDocumentation
 */
import { EventFd } from '../../native/eventfd';
import { createMemfd } from '../../native/memfd';
import { Mapping } from '../../native/mapping';
import type { Fd } from '../../native/fd';
import type { IoEventfd } from '../../server/ioeventfd';
import { DOORBELL_OFFSET } from '../../nvme/registers';
import { BAR0_SIZE, DOORBELL_PAGE_SIZE } from './registers';

export type DoorbellMode = 'trap' | 'mmap' | 'ioeventfd';

export const DOORBELL_MODES: readonly DoorbellMode[] = ['trap', 'mmap', 'ioeventfd'];

/** A memfd covering BAR0 (region offset = file offset) and our mapping of its doorbell page. */
interface SharedPage {
  fd: Fd;
  mapping: Mapping;
}

/**
 * The file covers all of BAR0 so that region offset = file offset; only the doorbell page is ever
 * mapped (by us and by the client). Nothing else is stored in it. Its size is sealed: a client
 * that could shrink it would make our own loads of it raise SIGBUS.
 */
function sharedPage(): SharedPage {
  const fd = createMemfd('vfio-user-nvme-doorbells', BAR0_SIZE, { sealSize: true });
  try {
    return { fd, mapping: Mapping.map(fd, DOORBELL_OFFSET, DOORBELL_PAGE_SIZE) };
  } catch (err) {
    fd.close();
    throw err;
  }
}

/** Storage of the doorbell registers. */
export class DoorbellPage {
  bytes: Buffer;
  words: Int32Array;
  /** For `'mmap'`: the BAR0 region's shared-memory description (offered to the client). */
  readonly mmap: { fd: Fd; fileOffset: number; areas: { offset: number; size: number }[] } | undefined;
  /** For `'ioeventfd'`: what the eventfd's watcher calls when a client rang (values in the page). */
  onRing: (() => void) | null = null;
  /** For `'ioeventfd'`: eventfd wake-ups so far (several doorbells may share one). */
  rings = 0;
  private shared: SharedPage | null;
  private eventfd: EventFd | null = null;
  private list: IoEventfd[] = [];

  /** @param doorbells for `'ioeventfd'`: how many doorbells (from offset 0 of the page) get one. */
  constructor(
    readonly mode: DoorbellMode,
    private readonly doorbells = 0,
  ) {
    if (mode === 'mmap' || mode === 'ioeventfd') {
      this.shared = sharedPage();
      this.bytes = this.shared.mapping.bytes;
      this.mmap = mode === 'mmap' ? { fd: this.shared.fd, fileOffset: 0, areas: [{ offset: DOORBELL_OFFSET, size: DOORBELL_PAGE_SIZE }] } : undefined;
      if (mode === 'ioeventfd') this.arm();
    } else {
      this.shared = null;
      this.bytes = Buffer.alloc(DOORBELL_PAGE_SIZE);
      this.mmap = undefined;
    }
    this.words = new Int32Array(this.bytes.buffer, this.bytes.byteOffset, DOORBELL_PAGE_SIZE / 4);
  }

  /**
   * For `'ioeventfd'`: the BAR0 ioeventfds, one per doorbell (4 bytes at 0x1000 + 4i), sharing
   * one eventfd, each with its slot of the page as shadow memory.
   */
  get ioeventfds(): readonly IoEventfd[] {
    return this.list;
  }

  /**
   * For `'ioeventfd'`: a new eventfd and a new memfd (holding the page's current values), so that
   * copies a departed client kept reach nothing; returns the new {@link ioeventfds}.
   */
  renew(): readonly IoEventfd[] {
    if (this.mode !== 'ioeventfd' || this.shared === null) return this.list;
    const old = this.shared;
    const next = sharedPage();
    next.mapping.bytes.set(old.mapping.bytes);
    this.shared = next;
    this.bytes = next.mapping.bytes;
    this.words = new Int32Array(this.bytes.buffer, this.bytes.byteOffset, DOORBELL_PAGE_SIZE / 4);
    this.eventfd?.close();
    this.arm();
    old.mapping.unmapNow();
    old.fd.close();
    return this.list;
  }

  /** A fresh eventfd, watched, and the ioeventfd list over the current memfd. */
  private arm(): void {
    const eventfd = EventFd.create();
    eventfd.watch((count) => {
      if (count === 0) return; // the watch failed: nothing more will ring
      this.rings++;
      this.onRing?.();
    });
    this.eventfd = eventfd;
    const shadow = this.shared!.fd;
    this.list = Array.from({ length: this.doorbells }, (_, i) => ({
      offset: DOORBELL_OFFSET + 4 * i,
      size: 4 as const,
      fd: eventfd.fd,
      shadow: { fd: shadow, offset: DOORBELL_OFFSET + 4 * i },
    }));
  }

  /** The doorbell at dword `index` (as the guest last stored it). */
  read(index: number): number {
    return Atomics.load(this.words, index) >>> 0;
  }

  write(index: number, value: number): void {
    Atomics.store(this.words, index, value | 0);
  }

  /** Every doorbell back to 0 (controller reset). */
  clear(): void {
    this.bytes.fill(0);
  }

  close(): void {
    this.eventfd?.close();
    this.eventfd = null;
    this.shared?.mapping.unmapNow();
    this.shared?.fd.close();
    this.shared = null;
  }
}
