/**
 * Interrupt delivery on the server side (reference §3.8, §6.6; peers.md §2).
 *
 * The client owns routing: it hands us one eventfd per vector with SET_IRQS, and our only way to
 * interrupt is to signal that eventfd. This table keeps, per IRQ index, the trigger eventfds and
 * the mask state the *client* controls (SET_IRQS MASK/UNMASK). Masks a device model controls
 * itself (MSI-X table, MSI per-vector mask) live in the PCI layer, which calls {@link IrqTable.trigger}
 * only for deliverable vectors. A vector masked here records a pending bit and fires on unmask.
 *
 * MASK and UNMASK can also come as eventfds (SET_IRQS DATA_EVENTFD with ACTION_MASK/UNMASK): the
 * client signals them and the table watches them, as Linux VFIO does with an INTx "resample"
 * (unmask) eventfd: a signal masks or unmasks the vector exactly as the NONE/BOOL actions do, and
 * the device hears of it (`onChange`), so an INTx line still asserted fires again.
 */
import * as fs from 'node:fs';
import { binding } from '../native/binding';
import { EventFd } from '../native/eventfd';
import { Fd } from '../native/fd';
import { Errno, IrqInfoFlags, IrqSetFlags, PciIrq } from '../protocol/constants';
import type { SetIrqsRequest } from '../protocol/messages/irq';

/** What the device declares per IRQ index. */
export interface IrqIndexInfo {
  /** Number of vectors (0 = index not supported). */
  count: number;
  /** {@link IrqInfoFlags}; EVENTFD is always reported for a non-empty index. */
  flags?: number;
}

class IrqIndex {
  readonly triggers: (Fd | null)[];
  /** Eventfds the client signals to unmask (INTx resample) or mask a vector; watched. */
  readonly unmaskFds: (EventFd | null)[];
  readonly maskFds: (EventFd | null)[];
  readonly masked: Uint8Array;
  readonly pending: Uint8Array;

  constructor(
    readonly count: number,
    readonly flags: number,
  ) {
    this.triggers = new Array<Fd | null>(count).fill(null);
    this.unmaskFds = new Array<EventFd | null>(count).fill(null);
    this.maskFds = new Array<EventFd | null>(count).fill(null);
    this.masked = new Uint8Array(count);
    this.pending = new Uint8Array(count);
  }
}

/** Called after SET_IRQS changed an index (so the device can deliver pending work, e.g. MSI-X). */
export type IrqChangeListener = (index: number) => void;

export class IrqTable {
  private readonly indexes: IrqIndex[];
  /** Interrupts signalled, per index (for tests, stats and `vfio-user info`). */
  readonly signalled: number[];
  onChange: IrqChangeListener | null = null;

  constructor(infos: readonly IrqIndexInfo[]) {
    this.indexes = infos.map((i) => new IrqIndex(i.count, (i.flags ?? 0) | (i.count > 0 ? IrqInfoFlags.EVENTFD : 0)));
    this.signalled = infos.map(() => 0);
  }

  get numIrqs(): number {
    return this.indexes.length;
  }

  info(index: number): { count: number; flags: number } | null {
    const irq = this.indexes[index];
    return irq === undefined ? null : { count: irq.count, flags: irq.flags };
  }

  /** True if the client gave vector `vector` of `index` an eventfd. */
  hasEventfd(index: number, vector: number): boolean {
    return this.indexes[index]?.triggers[vector] != null;
  }

  /** Number of vectors of `index` that have an eventfd. */
  eventfdCount(index: number): number {
    const irq = this.indexes[index];
    return irq === undefined ? 0 : irq.triggers.reduce((n, fd) => n + (fd === null ? 0 : 1), 0);
  }

  /**
   * Raise vector `vector` of `index`: signal its eventfd, or, while the client has it masked,
   * remember it as pending. Returns true if an eventfd was signalled. A vector without an
   * eventfd drops the signal (nobody listens), as libvfio-user does.
   */
  trigger(index: number, vector: number): boolean {
    const irq = this.indexes[index];
    if (irq === undefined || vector >= irq.count) return false;
    if (irq.masked[vector] !== 0) {
      irq.pending[vector] = 1;
      return false;
    }
    const fd = irq.triggers[vector];
    if (fd == null || !signal(fd)) return false;
    this.signalled[index]!++;
    return true;
  }

  /**
   * Apply a decoded SET_IRQS request with the fds that came with it. Takes ownership of `fds`
   * (they are kept or closed here, on every path). Returns 0 or an errno.
   */
  set(req: SetIrqsRequest, fds: Fd[]): number {
    const irq = this.indexes[req.index];
    const errno = this.validate(irq, req, fds.length);
    if (errno !== 0 || irq === undefined) {
      Fd.closeAll(fds);
      return errno || Errno.EINVAL;
    }
    const data = req.flags & IrqSetFlags.DATA_TYPE_MASK;
    const action = req.flags & IrqSetFlags.ACTION_TYPE_MASK;
    const { start, count } = req;

    if (data === IrqSetFlags.DATA_EVENTFD) {
      // The client chooses what it sends: anything but an eventfd would fail (or block) later.
      if (!fds.every(isEventfd)) {
        Fd.closeAll(fds);
        return Errno.EINVAL;
      }
      // Zero fds de-assigns the range (reference §3.8).
      if (action === IrqSetFlags.ACTION_TRIGGER) {
        for (let i = 0; i < count; i++) replace(irq.triggers, start + i, fds.length === 0 ? null : fds[i]!);
      } else {
        const mask = action === IrqSetFlags.ACTION_MASK;
        const table = mask ? irq.maskFds : irq.unmaskFds;
        for (let i = 0; i < count; i++) replace(table, start + i, fds.length === 0 ? null : this.watchAction(fds[i]!, req.index, start + i, mask));
      }
    } else if (action === IrqSetFlags.ACTION_TRIGGER) {
      if (data === IrqSetFlags.DATA_NONE && count === 0) {
        this.disable(irq);
      } else {
        for (let i = 0; i < count; i++) if (data === IrqSetFlags.DATA_NONE || req.data![i] !== 0) this.trigger(req.index, start + i);
      }
    } else {
      const mask = action === IrqSetFlags.ACTION_MASK;
      for (let i = 0; i < count; i++) {
        if (data === IrqSetFlags.DATA_BOOL && req.data![i] === 0) continue;
        this.setMasked(req.index, start + i, mask);
      }
    }
    this.onChange?.(req.index);
    return 0;
  }

  /** True while the client has vector `vector` of `index` masked. */
  isMasked(index: number, vector: number): boolean {
    return this.indexes[index]?.masked[vector] === 1;
  }

  /** Mask or unmask a vector as the client asked; unmasking delivers what became pending. */
  setMasked(index: number, vector: number, masked: boolean): void {
    const irq = this.indexes[index]!;
    irq.masked[vector] = masked ? 1 : 0;
    if (!masked && irq.pending[vector] !== 0) {
      irq.pending[vector] = 0;
      this.trigger(index, vector);
    }
  }

  /** Close every eventfd the client gave us (disconnect); masks and pending bits are cleared. */
  clear(): void {
    for (const irq of this.indexes) this.disable(irq);
  }

  /** Watch a MASK/UNMASK eventfd: each signal acts on the vector, then tells the device. */
  private watchAction(fd: Fd, index: number, vector: number, mask: boolean): EventFd {
    const efd = new EventFd(fd);
    efd.watch((count) => {
      if (count === 0) return; // the watch failed (the fd went bad): ignore it from now on
      const irq = this.indexes[index];
      if (irq === undefined || (mask ? irq.maskFds : irq.unmaskFds)[vector] !== efd) return;
      this.setMasked(index, vector, mask);
      this.onChange?.(index);
    });
    return efd;
  }

  private disable(irq: IrqIndex): void {
    for (let i = 0; i < irq.count; i++) {
      replace(irq.triggers, i, null);
      replace(irq.maskFds, i, null);
      replace(irq.unmaskFds, i, null);
    }
    irq.masked.fill(0);
    irq.pending.fill(0);
  }

  private validate(irq: IrqIndex | undefined, req: SetIrqsRequest, fdCount: number): number {
    if (irq === undefined) return Errno.EINVAL;
    const data = req.flags & IrqSetFlags.DATA_TYPE_MASK;
    const action = req.flags & IrqSetFlags.ACTION_TYPE_MASK;
    // count 0 is only meaningful as "disable everything" (NONE|TRIGGER, start 0).
    if (req.count === 0) return data === IrqSetFlags.DATA_NONE && action === IrqSetFlags.ACTION_TRIGGER && req.start === 0 && fdCount === 0 ? 0 : Errno.EINVAL;
    if (req.start >= irq.count || req.count > irq.count - req.start) return Errno.EINVAL;
    // ERR and REQ can only be triggered, eventfd registrations included (reference §3.8, §4.4).
    if ((req.index === PciIrq.ERR || req.index === PciIrq.REQ) && action !== IrqSetFlags.ACTION_TRIGGER) return Errno.EINVAL;
    if (data === IrqSetFlags.DATA_EVENTFD) return fdCount === 0 || fdCount === req.count ? 0 : Errno.EINVAL;
    if (fdCount !== 0) return Errno.EINVAL;
    return 0;
  }
}

/** Signal an eventfd; false (never an exception) if the write failed. */
function signal(fd: Fd): boolean {
  try {
    return binding.eventfdSignal(fd.value);
  } catch {
    return false;
  }
}

/** True if `fd` is an eventfd (its /proc link reads "anon_inode:[eventfd]"). */
function isEventfd(fd: Fd): boolean {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd.value}`) === 'anon_inode:[eventfd]';
  } catch {
    return false;
  }
}

function replace<T extends Fd | EventFd>(table: (T | null)[], i: number, fd: T | null): void {
  const old = table[i];
  if (old != null && old !== fd) old.close();
  table[i] = fd;
}
