/**
 * DMA notifications (libvfio-user's dma_register / dma_unregister callbacks): a device hears of
 * every map the client adds (iova, length, protection, shared or message-only) and of every map it
 * takes back — DMA_UNMAP, UNMAP ALL, or the client going away — after the range became unreachable
 * for new DMA and before its memory is unmapped; the unmap and its reply wait for the hook.
 */
import { describe, it, expect } from 'vitest';
import { VfioUserClient } from '../../lib/client/client';
import { DmaMapFlags } from '../../lib/protocol/constants';
import type { DmaRegion } from '../../lib/server/dma';
import { TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { defer, eventually, serve, sleep, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

class Listening extends TestDevice {
  readonly events: string[] = [];
  /** What the unmap hook saw: the range still reachable? its memory still mapped? */
  readonly seen: { reachable: boolean; firstByte: number }[] = [];
  hold: Promise<void> | null = null;

  dmaMapped(r: DmaRegion): void {
    this.events.push(`map 0x${r.iova.toString(16)}+0x${r.size.toString(16)} ${protection(r.flags)} ${r.mapping === null ? 'messages' : 'shared'}`);
  }

  async dmaUnmapped(r: DmaRegion): Promise<void> {
    this.events.push(`unmap 0x${r.iova.toString(16)}+0x${r.size.toString(16)}`);
    this.seen.push({ reachable: this.ctx!.dma.find(r.iova) !== null, firstByte: r.mapping === null ? -1 : r.mapping.bytes[0]! });
    await this.hold;
  }
}

const protection = (flags: number) => `${flags & DmaMapFlags.READ ? 'r' : '-'}${flags & DmaMapFlags.WRITE ? 'w' : '-'}`;

async function connected(device: TestDevice): Promise<{ client: VfioUserClient; server: Awaited<ReturnType<typeof serve>>['server'] }> {
  const { server } = await serve(device);
  const client = await VfioUserClient.connect(server.path);
  defer(() => client.close());
  return { client, server };
}

describe('DMA notifications', () => {
  it('tells the device of each map with its iova, length and protection', async () => {
    const device = new Listening();
    const { client } = await connected(device);
    await client.allocateDma(0x4000, { iova: 0x100000 });
    await client.allocateDma(0x1000, { iova: 0x200000, readOnly: true });
    await client.mapWithoutFd(Buffer.alloc(0x2000), { iova: 0x300000 });
    expect(device.events).toEqual(['map 0x100000+0x4000 rw shared', 'map 0x200000+0x1000 r- shared', 'map 0x300000+0x2000 rw messages']);
  });

  it('tells the device of an unmap before the memory goes, and the reply waits for it', async () => {
    const device = new Listening();
    const { client } = await connected(device);
    const mem = await client.allocateDma(0x1000, { iova: 0x100000 });
    mem.bytes[0] = 0x5a;
    let release!: () => void;
    device.hold = new Promise((r) => (release = r));
    let done = false;
    const unmapped = mem.unmap().then(() => (done = true));
    await eventually(() => expect(device.seen).toHaveLength(1));
    // Unreachable for new DMA, still mapped for what the device holds.
    expect(device.seen[0]).toEqual({ reachable: false, firstByte: 0x5a });
    await sleep(20);
    expect(done).toBe(false);
    release();
    await unmapped;
    expect(device.events.at(-1)).toBe('unmap 0x100000+0x1000');
  });

  it('tells the device of every map on UNMAP ALL and when the client goes away; not of failed or repeated maps', async () => {
    const device = new Listening();
    const { client, server } = await connected(device);
    await client.allocateDma(0x1000, { iova: 0x100000 });
    await client.allocateDma(0x1000, { iova: 0x101000 });
    await client.unmapAllDma();
    expect(device.events.filter((e) => e.startsWith('unmap')).sort()).toEqual(['unmap 0x100000+0x1000', 'unmap 0x101000+0x1000']);
    device.events.length = 0;
    await client.allocateDma(0x2000, { iova: 0x400000 });
    await expect(client.allocateDma(0x1000, { iova: 0x401000 })).rejects.toThrow();
    expect(device.events).toEqual(['map 0x400000+0x2000 rw shared']);
    const gone = new Promise((r) => server.once('disconnect', r));
    client.close();
    await gone;
    expect(device.events).toEqual(['map 0x400000+0x2000 rw shared', 'unmap 0x400000+0x2000']);
  });

  it('reports a hook that throws, and the map stands', async () => {
    const device = new Listening();
    device.dmaMapped = () => {
      throw new Error('device bug');
    };
    const { client, server } = await connected(device);
    const errors: unknown[] = [];
    server.on('error', (err) => errors.push(err));
    const mem = await client.allocateDma(0x1000, { iova: 0x100000 });
    expect(String(errors[0])).toMatch(/device bug/);
    expect(server.dma.find(0x100000)).not.toBeNull();
    await mem.unmap();
  });
});
