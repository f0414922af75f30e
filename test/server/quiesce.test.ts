/**
 * Quiesce (libvfio-user's quiesce callback and vfu_device_quiesced): a device that asks is quiesced
 * before DMA_MAP, DMA_UNMAP (ALL included), DEVICE_RESET, a migration state change and the reset
 * after a hang-up, and told to carry on afterwards. It may defer ('busy', then ctx.quiesced()):
 * the command and every command after it wait, in order. A device that fails to quiesce fails the
 * command with its errno, changing nothing.
 */
import { describe, it, expect } from 'vitest';
import { VfioUserClient } from '../../lib/client/client';
import { Errno, MigState } from '../../lib/protocol/constants';
import { VfioUserError } from '../../lib/protocol/errors';
import type { DmaRegion } from '../../lib/server/dma';
import { FORCED_QUIESCE_WAIT_MS, QUIESCE_BUSY, type QuiesceReason } from '../../lib/server/quiesce';
import type { ResetReason } from '../../lib/server/device';
import { TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { defer, eventually, serve, sleep, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

type Mode = 'now' | 'busy' | { fail: number } | 'reject';

class Quiet extends TestDevice {
  readonly log: string[] = [];
  mode: Mode = 'now';
  quiesced = false;
  readonly migration = {
    setRunning: (running: boolean) => {
      this.log.push(running ? 'run' : 'stop');
    },
    save: () => new Uint8Array(0),
    load: () => {},
  };

  quiesce(reason: QuiesceReason): void | Promise<void> | typeof QUIESCE_BUSY {
    this.log.push(`quiesce ${reason}`);
    const mode = this.mode;
    if (mode === 'busy') return QUIESCE_BUSY;
    if (mode === 'reject') return Promise.reject(new Error('cannot'));
    if (typeof mode === 'object') {
      setTimeout(() => this.ctx!.quiesced!(mode.fail), 5);
      return QUIESCE_BUSY;
    }
    this.quiesced = true;
  }

  unquiesce(reason: QuiesceReason): void {
    this.quiesced = false;
    this.log.push(`unquiesce ${reason}`);
  }

  dmaMapped(r: DmaRegion): void {
    this.log.push(`mapped${this.quiesced ? ' (quiesced)' : ''} 0x${r.iova.toString(16)}`);
  }

  dmaUnmapped(r: DmaRegion): void {
    this.log.push(`unmapped${this.quiesced ? ' (quiesced)' : ''} 0x${r.iova.toString(16)}`);
  }

  override reset(reason: ResetReason): void {
    this.log.push(`reset ${reason}${this.quiesced ? ' (quiesced)' : ''}`);
  }
}

async function connected(device: Quiet) {
  const { server } = await serve(device);
  const client = await VfioUserClient.connect(server.path);
  defer(() => client.close());
  return { client, server };
}

describe('quiesce', () => {
  it('quiesces around DMA_MAP, DMA_UNMAP, UNMAP ALL, DEVICE_RESET and migration state changes', async () => {
    const device = new Quiet();
    const { client } = await connected(device);
    const mem = await client.allocateDma(0x1000, { iova: 0x100000 });
    await mem.unmap();
    await client.allocateDma(0x1000, { iova: 0x200000 });
    await client.unmapAllDma();
    await client.reset();
    expect(await client.setMigrationState(MigState.STOP)).toBe(MigState.STOP);
    expect(await client.setMigrationState(MigState.STOP)).toBe(MigState.STOP); // no change: not asked
    expect(await client.setMigrationState(MigState.RUNNING)).toBe(MigState.RUNNING);
    expect(device.log).toEqual([
      'quiesce dma-map',
      'mapped (quiesced) 0x100000',
      'unquiesce dma-map',
      'quiesce dma-unmap',
      'unmapped (quiesced) 0x100000',
      'unquiesce dma-unmap',
      'quiesce dma-map',
      'mapped (quiesced) 0x200000',
      'unquiesce dma-map',
      'quiesce dma-unmap',
      'unmapped (quiesced) 0x200000',
      'unquiesce dma-unmap',
      'quiesce reset',
      'reset client (quiesced)',
      'unquiesce reset',
      'quiesce migration',
      'stop',
      'unquiesce migration',
      'quiesce migration',
      'run',
      'unquiesce migration',
    ]);
  });

  it('waits for a deferred quiesce, holding later commands in order', async () => {
    const device = new Quiet();
    const { client, server } = await connected(device);
    device.mode = 'busy';
    const order: string[] = [];
    const map = client.allocateDma(0x1000, { iova: 0x100000 }).then(() => order.push('map'));
    const read = client.read(7, 0, 4).then(() => order.push('read'));
    await eventually(() => expect(server.quiescer.pending).toBe(true));
    await sleep(30);
    expect(order).toEqual([]);
    expect(server.dma.count).toBe(0);
    expect(device.ctx!.quiesced!()).toBe(true);
    await Promise.all([map, read]);
    expect(order).toEqual(['map', 'read']);
    expect(device.log).toEqual(['quiesce dma-map', 'mapped 0x100000', 'unquiesce dma-map']);
    expect(device.ctx!.quiesced!()).toBe(false); // nothing outstanding any more
    device.mode = 'now';
  });

  it('resets after a hang-up even if a deferred quiesce never finishes (after a bounded wait)', async () => {
    const device = new Quiet();
    const { client, server } = await connected(device);
    device.mode = 'busy';
    const started = Date.now();
    const gone = new Promise((r) => server.once('disconnect', r));
    client.close();
    await gone;
    expect(Date.now() - started).toBeGreaterThanOrEqual(FORCED_QUIESCE_WAIT_MS - 50);
    expect(device.log).toEqual(['quiesce lost-connection', 'reset lost-connection']);
    expect(server.quiescer.pending).toBe(false);
  }, 15_000);

  it('fails the command with the errno of a failed quiesce, changing nothing', async () => {
    const device = new Quiet();
    const { client, server } = await connected(device);
    device.mode = { fail: Errno.EIO };
    const err = await client.allocateDma(0x1000, { iova: 0x100000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(VfioUserError);
    expect((err as VfioUserError).errno).toBe(Errno.EIO);
    expect(server.dma.count).toBe(0);
    device.mode = 'reject';
    const err2 = await client.reset().catch((e: unknown) => e);
    expect((err2 as VfioUserError).errno).toBe(Errno.EBUSY);
    expect(device.log).toEqual(['quiesce dma-map', 'quiesce reset']);
  });

  it('quiesces before the reset after a hang-up, and resets even if that fails', async () => {
    const device = new Quiet();
    const { client, server } = await connected(device);
    await client.allocateDma(0x1000, { iova: 0x100000 });
    device.log.length = 0;
    device.mode = { fail: Errno.EBUSY };
    const gone = new Promise((r) => server.once('disconnect', r));
    client.close();
    await gone;
    expect(device.log).toEqual(['quiesce lost-connection', 'reset lost-connection', 'unmapped 0x100000']);
  });
});
