/**
 * Many devices, one process: 8 NVMe controllers (trap, mmap and ioeventfd doorbells mixed; MSI-X
 * and polled completions mixed) and 8 PCI-IDIO-16 GPIO cards, each on its own VfioUserServer in
 * this process, driven at once by 16 clients in the same process (8 NvmeDrivers, 8 plain
 * VfioUserClients). Every device gets I/O at the same time, with data that names the device, and
 * every observation must come from its own device: namespace data, identity, interrupt counts,
 * GPIO inputs and outputs, and the controllers' own counters. Small namespaces keep it quick.
 */
import { describe, it, expect } from 'vitest';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { VfioUserClient, PciFunction } from '../../lib/client';
import { NvmeController } from '../../lib/devices/nvme';
import { Idio16Device, IDIO16_BAR } from '../../lib/devices/gpio/idio16';
import { RamBackend } from '../../lib/block';
import { NvmeDriver, readBlocks, writeBlocks, type QueuePair } from '../../lib/drivers/nvme';
import { PciIrq } from '../../lib/protocol/constants';
import { VfioUserServer } from '../../lib/server/server';
import { tempSocketPath } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

const N = 8;
const BLOCKS = 64; // 512-byte blocks written and read back per controller per round
const ROUNDS = 8;
const GPIO_CHANGES = 4;
const MODES = ['trap', 'mmap', 'ioeventfd'] as const;

/** Resolves with the next interrupt `client` reports on INTx. */
function nextIrq(client: VfioUserClient): Promise<void> {
  return new Promise((resolve) => {
    const on = (index: number) => {
      if (index !== PciIrq.INTX) return;
      client.off('irq', on);
      resolve();
    };
    client.on('irq', on);
  });
}

describe('many devices in one process', () => {
  it('8 NVMe + 8 GPIO servers, 16 clients at once, I/O on all of them, no cross-talk', async () => {
    const dirs: string[] = [];
    const servers: VfioUserServer[] = [];
    const clients: VfioUserClient[] = [];
    const drivers: NvmeDriver[] = [];
    try {
      // ---- 16 servers ----
      const nvme = Array.from({ length: N }, (_, i) => new NvmeController({ backend: new RamBackend(1 << 20), queues: 2, serial: `MANY-NVME-${i}`, doorbells: MODES[i % MODES.length] }));
      const gpio = Array.from({ length: N }, () => new Idio16Device());
      const listen = async (device: NvmeController | Idio16Device, name: string): Promise<string> => {
        const { dir, path } = tempSocketPath(name);
        dirs.push(dir);
        servers.push(await VfioUserServer.listen(path, device));
        return path;
      };
      const nvmeSockets = await Promise.all(nvme.map((d, i) => listen(d, `nvme${i}.sock`)));
      const gpioSockets = await Promise.all(gpio.map((d, i) => listen(d, `gpio${i}.sock`)));

      // ---- 16 clients, all connected at once ----
      const nvmeClients = await Promise.all(nvmeSockets.map((s) => VfioUserClient.connect(s)));
      const gpioClients = await Promise.all(gpioSockets.map((s) => VfioUserClient.connect(s)));
      clients.push(...nvmeClients, ...gpioClients);
      expect(servers.every((s) => s.connected)).toBe(true);
      drivers.push(
        ...(await Promise.all(nvmeClients.map((c, i) => NvmeDriver.open(c, { ioQueues: 1, completions: i % 2 === 0 ? 'msix' : 'poll' })))),
      );
      const pcis = await Promise.all(gpioClients.map((c) => PciFunction.open(c)));
      await Promise.all(pcis.map((p) => p.enable({ memory: true })));
      await Promise.all(gpioClients.map((c) => c.enableIrqs(PciIrq.INTX, 1)));

      // Each driver sees its own controller, in the mode it was given.
      drivers.forEach((d, i) => {
        expect(d.controller.serial.trim()).toBe(`MANY-NVME-${i}`);
        expect(d.doorbellKind).toBe(MODES[i % MODES.length] === 'trap' ? 'message' : MODES[i % MODES.length]);
      });

      // ---- NVMe: every controller at once, data that names the device and the round ----
      const written = drivers.map(() => 0);
      const qps: QueuePair[] = [];
      const nvmeWork = drivers.map(async (driver, i) => {
        const ns = driver.namespace(1);
        const qp = await driver.createIoQueuePair({ depth: 8 });
        qps[i] = qp;
        for (let round = 0; round < ROUNDS; round++) {
          const data = randomBytes(BLOCKS * ns.blockSize);
          for (let b = 0; b < BLOCKS; b++) data.writeUInt32LE((i << 16) | (round << 8) | b, b * ns.blockSize);
          const lba = round * BLOCKS;
          // Several commands in flight per controller, on every controller at once.
          const part = BLOCKS / 4;
          await Promise.all([0, 1, 2, 3].map((k) => writeBlocks(driver, qp, ns, lba + k * part, part, data.subarray(k * part * ns.blockSize, (k + 1) * part * ns.blockSize))));
          written[i]! += BLOCKS;
          const back = Buffer.alloc(data.length);
          await Promise.all([0, 1, 2, 3].map((k) => readBlocks(driver, qp, ns, lba + k * part, part, back.subarray(k * part * ns.blockSize, (k + 1) * part * ns.blockSize))));
          expect(back.equals(data), `controller ${i} round ${round}`).toBe(true);
        }
        // Everything written by this driver, and only that, is on its controller.
        const all = Buffer.alloc(ROUNDS * BLOCKS * ns.blockSize);
        await readBlocks(driver, qp, ns, 0, ROUNDS * BLOCKS, all);
        for (let round = 0; round < ROUNDS; round++) {
          for (let b = 0; b < BLOCKS; b++) expect(all.readUInt32LE((round * BLOCKS + b) * ns.blockSize) >>> 16).toBe(i);
        }
      });

      // ---- GPIO: inputs, outputs and interrupts of every card at once ----
      const irqs = gpioClients.map(() => 0);
      gpioClients.forEach((c, i) => c.on('irq', (index) => index === PciIrq.INTX && irqs[i]!++));
      const gpioWork = gpioClients.map(async (client, i) => {
        const card = gpio[i]!;
        card.setInputs(0x1100 + i);
        expect((await client.readUint(IDIO16_BAR, 1, 1)) | ((await client.readUint(IDIO16_BAR, 5, 1)) << 8)).toBe(0x1100 + i);
        await client.writeUint(IDIO16_BAR, 0, 1, 0xa0 + i, { posted: false });
        await client.writeUint(IDIO16_BAR, 4, 1, 0x50 + i, { posted: false });
        expect(card.outputs).toBe(((0x50 + i) << 8) | (0xa0 + i));
        await client.readUint(IDIO16_BAR, 2, 1); // enables the change-of-state interrupt
        for (let k = 1; k <= GPIO_CHANGES; k++) {
          const irq = nextIrq(client);
          card.setInputs(0x1100 + i + (k << 4));
          await irq;
          expect(await client.readUint(IDIO16_BAR, 6, 1)).not.toBe(0);
          await client.writeUint(IDIO16_BAR, 1, 1, 0, { posted: false }); // clear the interrupt
        }
      });

      await Promise.all([...nvmeWork, ...gpioWork]);

      // ---- no cross-talk in what the devices saw ----
      // Each controller counted exactly the blocks its own driver wrote.
      nvme.forEach((c, i) => expect(c.stats.units512Written, `controller ${i}`).toBe(written[i]!));
      expect(written).toEqual(drivers.map(() => ROUNDS * BLOCKS));
      expect(irqs).toEqual(gpioClients.map(() => GPIO_CHANGES));
      gpio.forEach((card, i) => {
        expect(card.outputs).toBe(((0x50 + i) << 8) | (0xa0 + i));
        expect(card.inputs).toBe(0x1100 + i + (GPIO_CHANGES << 4));
      });
      // ---- clients leaving affect nobody else: the even ones hang up while the odd ones work ----
      const extra = async (i: number) => {
        const driver = drivers[i]!;
        const ns = driver.namespace(1);
        const qp = qps[i]!;
        const data = randomBytes(16 * ns.blockSize);
        await writeBlocks(driver, qp, ns, 1024, 16, data);
        const back = Buffer.alloc(data.length);
        await readBlocks(driver, qp, ns, 1024, 16, back);
        expect(back.equals(data), `controller ${i} after the others left`).toBe(true);
        expect((await gpioClients[i]!.readUint(IDIO16_BAR, 5, 1)) << 8).toBe((0x1100 + i + (GPIO_CHANGES << 4)) & 0xff00);
      };
      const gone = servers.filter((_, k) => k % N % 2 === 0).map((s) => new Promise((r) => s.once('disconnect', r)));
      await Promise.all([
        ...drivers.map(async (d, i) => {
          if (i % 2 !== 0) return extra(i);
          await d.close();
          nvmeClients[i]!.close();
          gpioClients[i]!.close();
        }),
      ]);
      await Promise.all(gone);
      expect(servers.map((s) => s.connected)).toEqual(servers.map((_, k) => k % 2 === 1));

      // The ioeventfd controllers were rung through their own eventfds only.
      nvme.forEach((c, i) => {
        const rings = c['doorbellPage'].rings as number;
        if (MODES[i % MODES.length] === 'ioeventfd') expect(rings, `controller ${i}`).toBeGreaterThan(0);
        else expect(rings, `controller ${i}`).toBe(0);
      });
    } finally {
      await Promise.all(drivers.map((d) => d.close().catch(() => undefined)));
      for (const c of clients) c.close();
      await Promise.all(servers.map((s) => s.close()));
      for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
    }
  }, 60_000);
});
