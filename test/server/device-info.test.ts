/**
 * DEVICE_GET_INFO (reference §3.4): negative cases first, then the reply fields.
 */
import { describe, it, expect } from 'vitest';
import { Command, DeviceFlags, Errno } from '../../lib/protocol/constants';
import { TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { deviceInfo, setup, u32s, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

describe('DEVICE_GET_INFO: refused', () => {
  it('refuses a payload that is not 16 bytes', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_INFO, null)).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo().subarray(0, 15))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_INFO, Buffer.concat([deviceInfo(), Buffer.alloc(4)]))).toBe(Errno.EINVAL);
  });

  it('refuses argsz below 16', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo(15))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo(0))).toBe(Errno.EINVAL);
  });
});

describe('DEVICE_GET_INFO: reply', () => {
  it('reports argsz 16, PCI | RESET, 9 regions and 5 IRQ indexes', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toEqual(u32s(16, DeviceFlags.PCI | DeviceFlags.RESET, 9, 5));
  });

  it('answers 16 bytes whatever larger argsz the client allows', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo(4096))).toEqual(u32s(16, 3, 9, 5));
  });

  it("reports the device's own flags and table sizes", async () => {
    class Small extends TestDevice {
      override readonly flags = DeviceFlags.PCI;
      override readonly irqs = [{ count: 1 }, { count: 0 }, { count: 2 }];
    }
    const device = new Small();
    device.regions.push(null, null, null); // 12 regions: 9 fixed + 3 device-specific
    const { client } = await setup(device);
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toEqual(u32s(16, DeviceFlags.PCI, 12, 3));
  });
});
