// `'ioeventfd'` notifications: every queue's notify address offered as an ioeventfd for BAR4.
// Through region accesses (the rig), and end to end: our client asks for the ioeventfds and its
// notify writes become eventfd signals, not messages.
import { afterEach, describe, expect, it } from 'vitest';
import { RamBackend } from '../../lib/block';
import { VfioUserClient } from '../../lib/client';
import { VirtioBlkDevice } from '../../lib/devices/virtio-blk';
import { binding } from '../../lib/native/binding';
import { PciRegion } from '../../lib/protocol/constants';
import { VirtioPciLayout } from '../../lib/virtio/pci';
import { startServer } from '../helpers/server';
import { EchoDevice } from './echo';
import { VirtioRig, pattern } from './rig';

const rigs: VirtioRig<EchoDevice>[] = [];
afterEach(async () => {
  for (const r of rigs.splice(0)) await r.close();
});

function chain(r: VirtioRig) {
  const src = r.alloc(16, 8);
  pattern(16, 1).copy(r.mem, src);
  return [{ addr: src, len: 16 }, { addr: r.alloc(16, 8), len: 16, write: true }];
}

describe('ioeventfd notifications', () => {
  it('offers one eventfd per queue notify address; a signal processes that queue', async () => {
    const r = new VirtioRig(new EchoDevice({ notify: 'ioeventfd', queues: 2 }));
    rigs.push(r);
    const list = r.device.regions[PciRegion.BAR4]!.ioeventfds!;
    expect(list.map((e) => [e.offset, e.size])).toEqual([
      [VirtioPciLayout.NOTIFY, 0],
      [VirtioPciLayout.NOTIFY + 4, 0],
    ]);
    expect(new Set(list.map((e) => e.fd.value)).size).toBe(2);
    await r.init();
    const q = r.queues[1]!;
    q.add(chain(r));
    binding.eventfdSignal(list[1]!.fd.value);
    const [used] = await r.waitUsed(q);
    expect(used!.len).toBe(16);
    expect(r.device.counters).toMatchObject({ ioeventfds: 1, notifies: 0 });
    // A client that ignores them still notifies with REGION_WRITE.
    q.add(chain(r));
    q.kick();
    await r.waitUsed(q);
    expect(r.device.counters.notifies).toBe(1);
  });

  it('replaces the eventfds when a client goes away, and closes them with the device', async () => {
    const device = new EchoDevice({ notify: 'ioeventfd' });
    const r = new VirtioRig(device);
    const before = device.regions[PciRegion.BAR4]!.ioeventfds!;
    await device.reset('lost-connection');
    const after = device.regions[PciRegion.BAR4]!.ioeventfds!;
    expect(before.every((e) => e.fd.closed)).toBe(true);
    expect(after.every((e) => !e.fd.closed)).toBe(true);
    await device.reset('client');
    expect(device.regions[PciRegion.BAR4]!.ioeventfds).toBe(after);
    // keepState: the client goes and the device is kept for the next one; its copies go too.
    await device.suspend();
    const kept = device.regions[PciRegion.BAR4]!.ioeventfds!;
    expect(after.every((e) => e.fd.closed)).toBe(true);
    expect(kept.every((e) => !e.fd.closed)).toBe(true);
    await r.close();
    expect(kept.every((e) => e.fd.closed)).toBe(true);
  });

  it('end to end: our client signals the eventfd instead of sending REGION_WRITE', async () => {
    const device = new VirtioBlkDevice({ backend: new RamBackend(1 << 20), notify: 'ioeventfd', queues: 2 });
    const s = await startServer(device);
    try {
      const client = await VfioUserClient.connect(s.socketPath);
      try {
        const set = await client.useIoEventfds(PciRegion.BAR4);
        expect(set.subRegions.length).toBe(2);
        await client.writeUint(PciRegion.BAR4, VirtioPciLayout.NOTIFY + 4, 2, 1);
        const deadline = Date.now() + 2000;
        while (device.counters.ioeventfds === 0 && Date.now() < deadline) await new Promise((res) => setTimeout(res, 5));
        expect(device.counters).toMatchObject({ ioeventfds: 1, notifies: 0 });
        client.stopIoEventfds(PciRegion.BAR4);
        await client.writeUint(PciRegion.BAR4, VirtioPciLayout.NOTIFY, 2, 0, { posted: false });
        expect(device.counters.notifies).toBe(1);
      } finally {
        client.close();
      }
    } finally {
      await s.stop();
    }
  });
});
