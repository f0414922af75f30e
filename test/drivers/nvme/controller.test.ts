/**
 * The driver suite against the real controller model (lib/devices/nvme, `NvmeController` with a
 * RAM backend): trapped doorbells, and the doorbell page mmap'd with 4 KiB blocks.
 */
import { describe, expect, it } from 'vitest';
import { VfioUserClient } from '../../../lib/client';
import { NvmeDriver, runPerf } from '../../../lib/drivers/nvme';
import { useFdLeakCheck } from '../../helpers/fds';
import { runDriverSuite } from './suite';
import { controllerServer } from './fixtures';

runDriverSuite('NvmeController (RAM, trapped doorbells)', () => controllerServer());
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
