import { describe, it, expect, afterEach } from 'vitest';
import { PciDevice } from '../../lib/pci/device';
import { Command, Errno, PciRegion } from '../../lib/protocol/constants';
import { rawClient, regionAccess, startServer } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();
let stop: (() => Promise<void>) | null = null;
afterEach(async () => {
  await stop?.();
  stop = null;
});

describe('expansion ROM', () => {
  it('serves the image read-only on region 6 and sizes the ROM BAR as QEMU probes it', async () => {
    const image = Buffer.from('\x55\xaaOPTION-ROM', 'latin1');
    const device = new PciDevice({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0xff0000, rom: image });
    const s = await startServer(device);
    stop = s.stop;
    const client = await rawClient(s.socketPath);
    const read = (await client.msg(Command.REGION_READ, regionAccess(PciRegion.ROM, 0, image.length))) as Buffer;
    expect(read.subarray(16).equals(image)).toBe(true);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(PciRegion.ROM, 0, 1, Buffer.from([0])))).toBe(Errno.EINVAL);
    // ROM BAR sizing: write all-ones (address bits), read back the 2 KiB size mask.
    await client.msg(Command.REGION_WRITE, regionAccess(PciRegion.CONFIG, 0x30, 4, Buffer.from([0xfe, 0xff, 0xff, 0xff])));
    const probe = (await client.msg(Command.REGION_READ, regionAccess(PciRegion.CONFIG, 0x30, 4))) as Buffer;
    expect(probe.readUInt32LE(16) >>> 0).toBe(0xfffff800);
    client.close();
  });
});
