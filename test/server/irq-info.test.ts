/**
 * DEVICE_GET_IRQ_INFO (reference §3.7): negative cases first, then the reply per index.
 */
import { describe, it, expect } from 'vitest';
import { Command, Errno, IrqInfoFlags, PciIrq } from '../../lib/protocol/constants';
import { TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { irqInfo, setup, u32s, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

const { EVENTFD, MASKABLE, AUTOMASKED } = IrqInfoFlags;

describe('DEVICE_GET_IRQ_INFO: refused', () => {
  it('refuses a payload that is not 16 bytes', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, irqInfo(0).subarray(0, 12))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, Buffer.concat([irqInfo(0), Buffer.alloc(4)]))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, null)).toBe(Errno.EINVAL);
  });

  it('refuses argsz below 16', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, irqInfo(0, 15))).toBe(Errno.EINVAL);
  });

  it('refuses an index at or past num_irqs', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, irqInfo(PciIrq.NUM))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, irqInfo(0xffff_ffff))).toBe(Errno.EINVAL);
  });
});

describe('DEVICE_GET_IRQ_INFO: reply', () => {
  it('reports each index: argsz 16, EVENTFD, the vector count', async () => {
    const { client } = await setup();
    const counts = [1, 4, 8, 1, 1];
    for (let index = 0; index < 5; index++) {
      expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, irqInfo(index, 4096))).toEqual(u32s(16, EVENTFD, index, counts[index]!));
    }
  });

  it("reports the device's flags, and no EVENTFD for an index without vectors", async () => {
    class Device extends TestDevice {
      override readonly irqs = [{ count: 1, flags: MASKABLE | AUTOMASKED }, { count: 0 }, { count: 2048 }, { count: 0 }, { count: 0 }];
    }
    const { client } = await setup(new Device());
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, irqInfo(0))).toEqual(u32s(16, EVENTFD | MASKABLE | AUTOMASKED, 0, 1));
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, irqInfo(1))).toEqual(u32s(16, 0, 1, 0));
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, irqInfo(2))).toEqual(u32s(16, EVENTFD, 2, 2048));
    expect(await client.msg(Command.DEVICE_GET_IRQ_INFO, irqInfo(4))).toEqual(u32s(16, 0, 4, 0));
  });
});
