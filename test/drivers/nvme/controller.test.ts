/**
 * The driver suite against the real controller model (lib/devices/nvme, `NvmeController` with a
 * RAM backend): trapped doorbells, the doorbell page mmap'd with 4 KiB blocks, and behind a
 * server that decodes BARs only at their assigned address while memory decoding is on.
 */
import { describe, expect, it } from 'vitest';
import { PciFunction, VfioUserClient } from '../../../lib/client';
import { NvmeDriver, runPerf } from '../../../lib/drivers/nvme';
import { useFdLeakCheck } from '../../helpers/fds';
import { runDriverSuite } from './suite';
import { controllerServer, hardwareControllerServer } from './fixtures';

runDriverSuite('NvmeController (RAM, trapped doorbells)', () => controllerServer());
runDriverSuite('NvmeController behind hardware-like BAR decoding', () => hardwareControllerServer());
runDriverSuite('NvmeController (RAM, mmap’d doorbells, 4 KiB blocks)', () => controllerServer({ doorbells: 'mmap', blockSize: 4096 }));

describe('NVMe driver against NvmeController: shadow doorbells', () => {
  useFdLeakCheck();

  it('keeps most doorbell updates in shared memory', async () => {
    const target = await controllerServer();
    const client = await VfioUserClient.connect(target.socketPath);
    const driver = await NvmeDriver.open(client, { ioQueues: 1 });
    try {
      expect(driver.shadowDoorbells).not.toBeNull();
      const before = { ...target.device.doorbellCounts };
      const summary = await runPerf(driver, { rw: 'randrw', bs: 4096, qd: 16, timeSec: 0.5, seed: 7 });
      expect(summary.errors).toBe(0);
      const trapped = target.device.doorbellCounts.trapped - before.trapped;
      const shadowed = target.device.doorbellCounts.shadow - before.shadow;
      expect(shadowed).toBeGreaterThan(0);
      // Far fewer register writes than I/Os (at least two doorbells per batch of completions).
      expect(trapped).toBeLessThan(summary.ios);
    } finally {
      await driver.close();
      await client.close();
      await target.stop();
    }
  });
});

describe('NVMe driver against a server that decodes BARs as hardware does', () => {
  useFdLeakCheck();

  it('assigns BAR0 and BAR4 before enabling memory decoding; no access is refused', async () => {
    const target = await hardwareControllerServer();
    const client = await VfioUserClient.connect(target.socketPath);
    try {
      const driver = await NvmeDriver.open(client, { ioQueues: 1 });
      await driver.close();
      expect(target.device.refused).toEqual([]);
      const bars = driver.pci.bars.filter((b) => b.size > 0n);
      expect(bars.map((b) => b.index)).toEqual([0, 4]);
      for (const b of bars) expect(target.controller.config.barAddress(b.index)).toBe(b.address);
      expect(bars.every((b) => b.address !== 0n && b.address % b.size === 0n)).toBe(true);
    } finally {
      await client.close();
      await target.stop();
    }
  });

  it('is refused (EINVAL) by such a server when the BARs are left unassigned', async () => {
    const target = await hardwareControllerServer();
    const client = await VfioUserClient.connect(target.socketPath);
    try {
      const pci = await PciFunction.open(client);
      await pci.enable({ assignBars: false });
      await expect(client.readUint(0, 0, 4)).rejects.toMatchObject({ code: 'EINVAL' });
      expect(target.device.refused).toEqual([{ region: 0, offset: 0, reason: 'unassigned' }]);
    } finally {
      await client.close();
      await target.stop();
    }
  });
});
