/**
 * DEVICE_RESET (reference §3.13, §6.8): negative cases first; then the reset reaching the device,
 * the reply waiting for it, and the connection state (DMA maps, IRQ eventfds) surviving it.
 */
import { describe, it, expect } from 'vitest';
import { EventFd } from '../../lib/native/eventfd';
import { Command, DmaMapFlags, Errno, IrqSetFlags, PciIrq } from '../../lib/protocol/constants';
import { regionAccess, TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { defer, dmaMap, guestMemory, setIrqs, setup, sleep, tracked, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

describe('DEVICE_RESET: refused', () => {
  it('refuses a payload', async () => {
    const { client, device } = await setup();
    expect(await client.msg(Command.DEVICE_RESET, Buffer.alloc(1))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_RESET, Buffer.alloc(16))).toBe(Errno.EINVAL);
    expect(device.calls).toEqual([]);
  });

  it('answers EINVAL when the reset hook fails, and keeps serving', async () => {
    class Failing extends TestDevice {
      override reset(): void {
        throw new Error('reset failed');
      }
    }
    const { client, server } = await setup(new Failing());
    expect(await client.msg(Command.DEVICE_RESET)).toBe(Errno.EINVAL);
    expect(await client.msg(Command.REGION_READ, regionAccess(7, 0, 4))).toBeInstanceOf(Buffer);
    // The failing 'lost-connection' reset at teardown must not stop the cleanup either (no
    // 'error' listener: nothing may throw).
    client.close();
    await new Promise((resolve) => server.once('disconnect', resolve));
  });
});

describe('DEVICE_RESET: reset', () => {
  it("reaches the device's reset hook with reason 'client', and replies with a bare header", async () => {
    const { client, device } = await setup();
    expect(await client.msg(Command.DEVICE_RESET)).toEqual(Buffer.alloc(0));
    expect(device.calls).toEqual(['reset client']);
  });

  it('replies only when an asynchronous reset completes, holding later commands', async () => {
    class Slow extends TestDevice {
      release: () => void = () => {};
      override reset(reason: string): Promise<void> | void {
        if (reason !== 'client') return;
        this.calls.push(`reset ${reason} start`);
        return new Promise((resolve) => {
          this.release = () => {
            this.calls.push('reset done');
            resolve();
          };
        });
      }
    }
    const { client, device } = await setup(new Slow());
    const reset = tracked(client.msg(Command.DEVICE_RESET));
    const write = tracked(client.msg(Command.REGION_WRITE, regionAccess(7, 4, 1, Buffer.from([1]))));
    await sleep(30);
    expect([reset.done(), write.done()]).toEqual([false, false]);
    expect(device.calls).toEqual(['reset client start']);
    device.release();
    expect(await reset.promise).toEqual(Buffer.alloc(0));
    expect(await write.promise).toBeInstanceOf(Buffer);
    expect(device.calls).toEqual(['reset client start', 'reset done', 'config write 4 1']);
  });

  it('keeps DMA maps and IRQ eventfds', async () => {
    const { client, device } = await setup();
    const mem = guestMemory('reset', 4096);
    const efd = EventFd.create();
    defer(() => efd.close());
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, 0x1000, 4096), [mem.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ, 0x8000, 4096))).toBeInstanceOf(Buffer);
    const trigger = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER;
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(trigger, PciIrq.MSIX, 3, 1), [efd.fd.value])).toBeInstanceOf(Buffer);

    expect(await client.msg(Command.DEVICE_RESET)).toBeInstanceOf(Buffer);

    const { dma, irqs } = device.ctx!;
    expect(dma.count).toBe(2);
    mem.bytes.write('after reset');
    expect(dma.view(0x1000, 11, false).toString()).toBe('after reset');
    expect(irqs.trigger(PciIrq.MSIX, 3)).toBe(true);
    expect(efd.drain()).toBe(1);
  });

  it('resets every time it is asked', async () => {
    const { client, device } = await setup();
    for (let i = 0; i < 3; i++) expect(await client.msg(Command.DEVICE_RESET)).toBeInstanceOf(Buffer);
    expect(device.calls).toEqual(['reset client', 'reset client', 'reset client']);
  });
});
