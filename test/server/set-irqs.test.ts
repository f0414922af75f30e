/**
 * DEVICE_SET_IRQS (reference §3.8, §6.6; peers.md §2): negative cases first (every refusal closes
 * every fd that came with it), then eventfd routing, device-raised interrupts, client masks and
 * client-initiated triggers. Interrupts are checked the way a client sees them: by draining the
 * eventfds it handed over.
 */
import { describe, it, expect } from 'vitest';
import { EventFd } from '../../lib/native/eventfd';
import { Command, Errno, IrqSetFlags, PciIrq } from '../../lib/protocol/constants';
import { TestDevice } from '../helpers/server';
import { countOpenFds, useFdLeakCheck } from '../helpers/fds';
import { defer, setIrqs, setup, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

const { DATA_NONE, DATA_BOOL, DATA_EVENTFD, ACTION_MASK, ACTION_UNMASK, ACTION_TRIGGER } = IrqSetFlags;
const { INTX, MSI, MSIX, ERR, REQ } = PciIrq;

function eventfds(n: number): EventFd[] {
  const list = Array.from({ length: n }, () => EventFd.create());
  defer(() => list.forEach((e) => e.close()));
  return list;
}

const values = (list: EventFd[]) => list.map((e) => e.fd.value);
const drained = (list: EventFd[]) => list.map((e) => e.drain());

class RecordingDevice extends TestDevice {
  readonly changed: number[] = [];
  irqsChanged(index: number): void {
    this.changed.push(index);
  }
}

describe('DEVICE_SET_IRQS: refused', () => {
  it('refuses a payload shorter than 20 bytes', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 1).subarray(0, 19))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, null)).toBe(Errno.EINVAL);
  });

  it('refuses argsz that is not the request size', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 1, [], 19))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 1, [], 24))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_BOOL | ACTION_TRIGGER, MSIX, 0, 2, [1, 1], 20))).toBe(Errno.EINVAL);
  });

  it('refuses flags without exactly one DATA and one ACTION bit, or with unknown bits', async () => {
    const { client } = await setup();
    for (const flags of [ACTION_TRIGGER, DATA_NONE, DATA_NONE | DATA_BOOL | ACTION_TRIGGER, DATA_NONE | ACTION_MASK | ACTION_TRIGGER, DATA_NONE | ACTION_TRIGGER | 0x40, 0]) {
      expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(flags, MSIX, 0, 1)), `flags 0x${flags.toString(16)}`).toBe(Errno.EINVAL);
    }
  });

  it('refuses DATA_BOOL whose data length disagrees with count', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_BOOL | ACTION_TRIGGER, MSIX, 0, 3, [1, 1]))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_BOOL | ACTION_TRIGGER, MSIX, 0, 1, [1, 1]))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 1, [1]))).toBe(Errno.EINVAL);
  });

  it('refuses an index at or past num_irqs', async () => {
    const { client } = await setup();
    const fds = eventfds(1);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, 5, 0, 1), values(fds))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, 0xffff_ffff, 0, 0))).toBe(Errno.EINVAL);
  });

  it('refuses start + count beyond the vector count, overflow included', async () => {
    const { client, device } = await setup();
    const fds = eventfds(3);
    for (const [start, count] of [
      [6, 3],
      [8, 1],
      [0, 9],
      [0xffff_ffff, 2],
      [1, 0xffff_ffff],
    ] as const) {
      const n = Math.min(count, 3);
      expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, start, count), values(fds.slice(0, n))), `${start}+${count}`).toBe(Errno.EINVAL);
      expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_MASK, MSIX, start, count))).toBe(Errno.EINVAL);
    }
    expect(device.ctx!.irqs.eventfdCount(MSIX)).toBe(0);
  });

  it('refuses the wrong number of eventfds and closes all of them', async () => {
    const { client, device } = await setup();
    const fds = eventfds(3);
    const open = countOpenFds();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 2), values(fds.slice(0, 1)))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 2), values(fds))).toBe(Errno.EINVAL);
    expect(countOpenFds()).toBe(open);
    expect(device.ctx!.irqs.eventfdCount(MSIX)).toBe(0);
  });

  it('refuses fds without DATA_EVENTFD and closes them', async () => {
    const { client } = await setup();
    const fds = eventfds(2);
    const open = countOpenFds();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 2), values(fds))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_BOOL | ACTION_MASK, MSIX, 0, 1, [1]), values(fds.slice(0, 1)))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 0), values(fds))).toBe(Errno.EINVAL);
    expect(countOpenFds()).toBe(open);
  });

  it('refuses count 0 unless it is NONE | TRIGGER with start 0', async () => {
    const { client, device } = await setup();
    const fds = eventfds(1);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 1), values(fds))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 0))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_MASK, MSIX, 0, 0))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_BOOL | ACTION_TRIGGER, MSIX, 0, 0))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 3, 0))).toBe(Errno.EINVAL);
    expect(device.ctx!.irqs.hasEventfd(MSIX, 0)).toBe(true);
  });

  it('allows only TRIGGER on ERR and REQ', async () => {
    const { client, device } = await setup();
    const fds = eventfds(1);
    for (const index of [ERR, REQ]) {
      for (const flags of [DATA_NONE | ACTION_MASK, DATA_NONE | ACTION_UNMASK, DATA_BOOL | ACTION_MASK, DATA_EVENTFD | ACTION_MASK, DATA_EVENTFD | ACTION_UNMASK]) {
        const data = flags & DATA_BOOL ? [1] : [];
        const withFds = flags & DATA_EVENTFD ? values(fds) : undefined;
        expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(flags, index, 0, 1, data), withFds), `index ${index} flags 0x${flags.toString(16)}`).toBe(Errno.EINVAL);
      }
      expect(device.ctx!.irqs.eventfdCount(index)).toBe(0);
    }
  });

  it('leaves the routing in place when a request is refused', async () => {
    const { client, device } = await setup(new RecordingDevice());
    const fds = eventfds(3);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 1), values(fds.slice(0, 1)))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 2), values(fds))).toBe(Errno.EINVAL);
    expect(device.ctx!.irqs.trigger(MSIX, 0)).toBe(true);
    expect(drained(fds)).toEqual([1, 0, 0]);
    expect(device.changed).toEqual([MSIX]); // only the accepted request
  });
});

describe('DEVICE_SET_IRQS: eventfd routing', () => {
  it('replies with a bare header', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 1), values(eventfds(1)))).toEqual(Buffer.alloc(0));
  });

  it("signals the client's eventfd of exactly the vector the device raises", async () => {
    const { client, device } = await setup(new RecordingDevice());
    const fds = eventfds(3);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 2, 3), values(fds))).toBeInstanceOf(Buffer);
    const irqs = device.ctx!.irqs;
    expect(device.changed).toEqual([MSIX]);
    expect(irqs.trigger(MSIX, 3)).toBe(true);
    expect(drained(fds)).toEqual([0, 1, 0]);
    expect(irqs.trigger(MSIX, 2)).toBe(true);
    expect(irqs.trigger(MSIX, 2)).toBe(true);
    expect(drained(fds)).toEqual([2, 0, 0]);
    // Vectors without an eventfd, and other indexes, signal nothing.
    expect(irqs.trigger(MSIX, 0)).toBe(false);
    expect(irqs.trigger(MSI, 2)).toBe(false);
    expect(irqs.trigger(MSIX, 8)).toBe(false);
    expect(drained(fds)).toEqual([0, 0, 0]);
  });

  it('replaces a vector eventfd, closing the old one', async () => {
    const { client, device } = await setup();
    const [a, b] = eventfds(2);
    const open = countOpenFds();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSI, 1, 1), [a!.fd.value])).toBeInstanceOf(Buffer);
    expect(countOpenFds()).toBe(open + 1);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSI, 1, 1), [b!.fd.value])).toBeInstanceOf(Buffer);
    expect(countOpenFds()).toBe(open + 1);
    device.ctx!.irqs.trigger(MSI, 1);
    expect(drained([a!, b!])).toEqual([0, 1]);
  });

  it('de-assigns a range given DATA_EVENTFD with no fds', async () => {
    const { client, device } = await setup();
    const fds = eventfds(4);
    const open = countOpenFds();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 4), values(fds))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 1, 2))).toBeInstanceOf(Buffer);
    expect(countOpenFds()).toBe(open + 2);
    const irqs = device.ctx!.irqs;
    for (let v = 0; v < 4; v++) irqs.trigger(MSIX, v);
    expect(drained(fds)).toEqual([1, 0, 0, 1]);
  });

  it('disables a whole index with count 0 (NONE | TRIGGER), closing its fds only', async () => {
    const { client, device } = await setup();
    const msix = eventfds(8);
    const [err] = eventfds(1);
    const open = countOpenFds();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 8), values(msix))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, ERR, 0, 1), [err!.fd.value])).toBeInstanceOf(Buffer);
    expect(countOpenFds()).toBe(open + 9);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 0))).toBeInstanceOf(Buffer);
    expect(countOpenFds()).toBe(open + 1);
    const irqs = device.ctx!.irqs;
    expect(irqs.eventfdCount(MSIX)).toBe(0);
    expect(irqs.trigger(MSIX, 0)).toBe(false);
    expect(irqs.trigger(ERR, 0)).toBe(true);
    expect(err!.drain()).toBe(1);
  });

  it('routes ERR and REQ with TRIGGER', async () => {
    const { client, device } = await setup();
    const fds = eventfds(2);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, ERR, 0, 1), [fds[0]!.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, REQ, 0, 1), [fds[1]!.fd.value])).toBeInstanceOf(Buffer);
    device.ctx!.irqs.trigger(REQ, 0);
    expect(drained(fds)).toEqual([0, 1]);
  });

  it("accepts QEMU's INTx sequence", async () => {
    const { client, device } = await setup();
    const [trigger, resample] = eventfds(2);
    const msg = (flags: number, fds?: number[]) => client.msg(Command.DEVICE_SET_IRQS, setIrqs(flags, INTX, 0, 1), fds);
    expect(await msg(DATA_EVENTFD | ACTION_TRIGGER, [trigger!.fd.value])).toBeInstanceOf(Buffer);
    expect(await msg(DATA_NONE | ACTION_MASK)).toBeInstanceOf(Buffer);
    expect(await msg(DATA_EVENTFD | ACTION_UNMASK, [resample!.fd.value])).toBeInstanceOf(Buffer);
    expect(await msg(DATA_NONE | ACTION_UNMASK)).toBeInstanceOf(Buffer);
    expect(device.ctx!.irqs.trigger(INTX, 0)).toBe(true);
    expect(trigger!.drain()).toBe(1);
  });
});

describe('DEVICE_SET_IRQS: masks and client triggers', () => {
  it('keeps a masked vector pending and delivers it once on unmask', async () => {
    const { client, device } = await setup();
    const fds = eventfds(2);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSI, 0, 2), values(fds))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_MASK, MSI, 1, 1))).toBeInstanceOf(Buffer);
    const irqs = device.ctx!.irqs;
    expect(irqs.trigger(MSI, 1)).toBe(false);
    expect(irqs.trigger(MSI, 1)).toBe(false);
    expect(irqs.trigger(MSI, 0)).toBe(true);
    expect(drained(fds)).toEqual([1, 0]);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_UNMASK, MSI, 1, 1))).toBeInstanceOf(Buffer);
    expect(drained(fds)).toEqual([0, 1]);
    // Nothing pending any more: a second unmask delivers nothing.
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_UNMASK, MSI, 1, 1))).toBeInstanceOf(Buffer);
    expect(drained(fds)).toEqual([0, 0]);
  });

  it('masks only the vectors DATA_BOOL selects', async () => {
    const { client, device } = await setup();
    const fds = eventfds(4);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSI, 0, 4), values(fds))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_BOOL | ACTION_MASK, MSI, 0, 4, [1, 0, 1, 0]))).toBeInstanceOf(Buffer);
    for (let v = 0; v < 4; v++) device.ctx!.irqs.trigger(MSI, v);
    expect(drained(fds)).toEqual([0, 1, 0, 1]);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_BOOL | ACTION_UNMASK, MSI, 0, 4, [0, 0, 1, 0]))).toBeInstanceOf(Buffer);
    expect(drained(fds)).toEqual([0, 0, 1, 0]);
  });

  it('signals every vector in range for a client NONE | TRIGGER', async () => {
    const { client } = await setup();
    const fds = eventfds(4);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 4), values(fds))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 1, 2))).toBeInstanceOf(Buffer);
    expect(drained(fds)).toEqual([0, 1, 1, 0]);
  });

  it('signals the vectors DATA_BOOL selects for a client BOOL | TRIGGER', async () => {
    const { client } = await setup();
    const fds = eventfds(3);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 5, 3), values(fds))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_BOOL | ACTION_TRIGGER, MSIX, 5, 3, [1, 0, 2]))).toBeInstanceOf(Buffer);
    expect(drained(fds)).toEqual([1, 0, 1]);
  });

  it('forgets masks and pending bits when the index is disabled', async () => {
    const { client, device } = await setup();
    const fds = eventfds(1);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 1), values(fds))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_MASK, MSIX, 0, 1))).toBeInstanceOf(Buffer);
    device.ctx!.irqs.trigger(MSIX, 0);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 0))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 1), values(fds))).toBeInstanceOf(Buffer);
    expect(drained(fds)).toEqual([0]);
    expect(device.ctx!.irqs.trigger(MSIX, 0)).toBe(true);
    expect(drained(fds)).toEqual([1]);
  });
});
