/**
 * SET_IRQS MASK/UNMASK eventfds, honoured by the server (reference §3.8; Linux VFIO's INTx
 * "resample" eventfd): the client signals them and the server watches them, masking or unmasking
 * the vector exactly as the NONE/BOOL actions do. An INTx line still asserted fires again when its
 * unmask eventfd is signalled (the end of interrupt of a level-triggered line). The server never
 * signals these eventfds itself.
 */
import { describe, it, expect } from 'vitest';
import { EventFd } from '../../lib/native/eventfd';
import { Command, IrqSetFlags, PciIrq } from '../../lib/protocol/constants';
import { PciDevice } from '../../lib/pci/device';
import { VfioUserClient } from '../../lib/client/client';
import { countOpenFds, useFdLeakCheck } from '../helpers/fds';
import { defer, eventually, serve, setIrqs, setup, sleep, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

const { DATA_NONE, DATA_EVENTFD, ACTION_MASK, ACTION_UNMASK, ACTION_TRIGGER } = IrqSetFlags;
const { INTX, MSI } = PciIrq;

function eventfds(n: number): EventFd[] {
  const list = Array.from({ length: n }, () => EventFd.create());
  defer(() => list.forEach((e) => e.close()));
  return list;
}

const values = (list: EventFd[]) => list.map((e) => e.fd.value);

describe('SET_IRQS MASK/UNMASK eventfds (server side)', () => {
  it('masks and unmasks a vector when the client signals them; a masked interrupt waits', async () => {
    const { client, device } = await setup();
    const [trigger, mask, unmask] = eventfds(3);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSI, 2, 1), [trigger!.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_MASK, MSI, 2, 1), [mask!.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_UNMASK, MSI, 2, 1), [unmask!.fd.value])).toBeInstanceOf(Buffer);
    const irqs = device.ctx!.irqs;
    expect(irqs.trigger(MSI, 2)).toBe(true);
    expect(trigger!.drain()).toBe(1);

    mask!.signal();
    await eventually(() => expect(irqs.isMasked(MSI, 2)).toBe(true));
    expect(irqs.trigger(MSI, 2)).toBe(false);
    expect(trigger!.drain()).toBe(0);

    unmask!.signal();
    await eventually(() => expect(irqs.isMasked(MSI, 2)).toBe(false));
    expect(trigger!.drain()).toBe(1); // the pending one, once
  });

  it('never signals the MASK/UNMASK eventfds itself', async () => {
    const { client } = await setup();
    const [mask, unmask] = eventfds(2);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_MASK, MSI, 0, 1), [mask!.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_UNMASK, MSI, 0, 1), [unmask!.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_MASK, MSI, 0, 1))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_NONE | ACTION_UNMASK, MSI, 0, 1))).toBeInstanceOf(Buffer);
    expect([mask!.drain(), unmask!.drain()]).toEqual([0, 0]);
  });

  it('stops watching an eventfd that was replaced or de-assigned, and closes it', async () => {
    const { client, device } = await setup();
    const [trigger, old, fresh] = eventfds(3);
    const open = countOpenFds();
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_TRIGGER, MSI, 0, 1), [trigger!.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_MASK, MSI, 0, 1), [old!.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_MASK, MSI, 0, 1), [fresh!.fd.value])).toBeInstanceOf(Buffer);
    expect(countOpenFds()).toBe(open + 2);
    old!.signal();
    await sleep(20);
    expect(device.ctx!.irqs.isMasked(MSI, 0)).toBe(false);
    // Zero fds de-assigns.
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(DATA_EVENTFD | ACTION_MASK, MSI, 0, 1))).toBeInstanceOf(Buffer);
    expect(countOpenFds()).toBe(open + 1);
    fresh!.signal();
    await sleep(20);
    expect(device.ctx!.irqs.isMasked(MSI, 0)).toBe(false);
  });

  it('closes the watched eventfds when the client goes away', async () => {
    const { server } = await serve();
    const open = countOpenFds();
    const client = await VfioUserClient.connect(server.path);
    const [unmask] = await client.irqs.setActionEventfds(MSI, 'unmask', 1, 1);
    expect(unmask).toBeDefined();
    const gone = new Promise((r) => server.once('disconnect', r));
    client.close();
    await gone;
    expect(countOpenFds()).toBe(open);
  });
});

describe('INTx resample eventfd (PciDevice)', () => {
  class Line extends PciDevice {
    constructor() {
      super({ vendorId: 0x1b36, deviceId: 0x0005, classCode: 0xff0000, interruptPin: 1 });
    }
  }

  it('fires the line again on a resample signal while it is asserted, not after it dropped', async () => {
    const { server, device } = await serve(new Line());
    const client = await VfioUserClient.connect(server.path);
    defer(() => client.close());
    await client.enableIrqs(INTX, 1);
    const [resample] = await client.irqs.setActionEventfds(INTX, 'unmask');
    const fired: number[] = [];
    client.on('irq', (index, vector, count) => fired.push(count));
    device.setIntx(true);
    await eventually(() => expect(fired.length).toBe(1));
    // The guest's EOI: KVM signals the resample eventfd; the line is still high, so it fires again.
    resample!.signal();
    await eventually(() => expect(fired.length).toBe(2));
    device.setIntx(false);
    resample!.signal();
    await sleep(30);
    expect(fired.length).toBe(2);
  });
});
