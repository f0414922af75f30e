/**
 * An eventfd: a kernel counter used as a doorbell between processes (IRQs, ioeventfds).
 * Signal adds 1; drain reads the accumulated count and resets it to 0.
 */
import { binding, type Poller } from './binding';
import { Fd } from './fd';

export interface EventFdOptions {
  /** Initial counter value (default 0). */
  initval?: number;
  /** EFD_SEMAPHORE: each drain takes 1 instead of the whole count. */
  semaphore?: boolean;
}

/** Called with the drained count (> 0), or with an error when watching failed (then stopped). */
export type EventFdListener = (count: number, error?: Error) => void;

export class EventFd {
  readonly #fd: Fd;
  #poller: Poller | undefined;

  /**
   * Takes ownership of `fd`, e.g. an eventfd received from a peer. Signal and drain never block,
   * even on an eventfd created without EFD_NONBLOCK.
   */
  constructor(fd: Fd) {
    this.#fd = fd;
  }

  /** A new non-blocking, close-on-exec eventfd. */
  static create(options: EventFdOptions = {}): EventFd {
    const { EFD_NONBLOCK, EFD_SEMAPHORE } = binding.constants;
    const flags = EFD_NONBLOCK | (options.semaphore ? EFD_SEMAPHORE : 0);
    return new EventFd(new Fd(binding.eventfd(options.initval ?? 0, flags)));
  }

  /** The owned fd (e.g. to send it to a peer; it stays owned by this object). */
  get fd(): Fd {
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd.closed;
  }

  /** Adds 1 to the counter. Returns false if the counter is full (the peer never drains it). */
  signal(): boolean {
    return binding.eventfdSignal(this.#fd.value);
  }

  /** Reads and resets the counter; 0 if nothing was signalled. */
  drain(): number {
    return binding.eventfdDrain(this.#fd.value);
  }

  /** True while a listener is installed. */
  get watching(): boolean {
    return this.#poller !== undefined;
  }

  /**
   * Calls `listener(count)` each time the eventfd is signalled (it drains the counter first).
   * One listener at a time: watching again replaces it. The listener runs on the event loop;
   * what it throws is an uncaught exception.
   */
  watch(listener: EventFdListener): void {
    this.unwatch();
    const fd = this.#fd.value;
    const poller = new binding.Poller(fd, (status, events) => {
      if (status < 0) {
        this.unwatch();
        const err = Object.assign(new Error(`poll failed on eventfd ${fd} (status ${status})`), {
          errno: -status,
          syscall: 'uv_poll',
        });
        listener(0, err);
        return;
      }
      if ((events & binding.pollEvents.READABLE) === 0) return;
      const count = binding.eventfdDrain(fd);
      if (count > 0) listener(count);
    });
    poller.start(binding.pollEvents.READABLE);
    this.#poller = poller;
  }

  /** Stops calling the listener. Idempotent. */
  unwatch(): void {
    const poller = this.#poller;
    this.#poller = undefined;
    poller?.close();
  }

  /** Stops watching, then closes the fd. Idempotent. */
  close(): void {
    this.unwatch();
    this.#fd.close();
  }
}
