/**
 * Replays of the libvfio-user server behaviour recorded in shared/peer-traces/ (QEMU 11.1 against
 * libvfio-user's gpio sample, HEAD and 2022 builds), with our client in QEMU's seat.
 */
import { describe, expect, it } from 'vitest';
import { createMemfd } from '../../lib/native/memfd';
import { PciFunction, VfioUserClient } from '../../lib/client';
import { Command, DeviceFlags, Errno, HeaderFlags, PciIrq, RegionInfoFlags } from '../../lib/protocol/constants';
import { VfioUserError } from '../../lib/protocol/errors';
import { sparseMmapCap } from '../../lib/protocol/messages/region';
import { useFdLeakCheck } from '../helpers/fds';
import { startServer, TestDevice } from '../helpers/server';
import { defer, useCleanup, FakeServer, LVU_2022_VERSION_JSON, LVU_VERSION_JSON, lvuHandler, lvuRegions, type RawMessage } from './fixtures';

useFdLeakCheck();

useCleanup();

const summary = (m: RawMessage): string => {
  const p = m.payload;
  switch (m.command) {
    case Command.DEVICE_GET_REGION_INFO:
      return `REGION_INFO ${p.readUInt32LE(8)} argsz=${p.readUInt32LE(0)}`;
    case Command.DEVICE_GET_IRQ_INFO:
      return `IRQ_INFO ${p.readUInt32LE(8)}`;
    case Command.REGION_READ:
      return `READ ${p.readUInt32LE(8)}+0x${p.readBigUInt64LE(0).toString(16)} ${p.readUInt32LE(12)}`;
    default:
      return `cmd ${m.command}`;
  }
};

describe('libvfio-user HEAD gpio sample (peer-traces)', () => {
  it('brings the device up like QEMU and runs its session', async () => {
    const fake = new FakeServer(lvuHandler({ versionJson: LVU_VERSION_JSON }));
    defer(() => fake.close());
    const client = await VfioUserClient.connect(fake.path, { version: { major: 0, minor: 0 } });
    defer(() => client.close());

    // VERSION 0.0 -> 0.0; then info for every region (QEMU skips 6 and 8) and IRQ index.
    expect(client.negotiated.minor).toBe(0);
    expect(fake.received.map(summary)).toEqual([
      'cmd 1',
      'cmd 4',
      ...Array.from({ length: 9 }, (_, i) => `REGION_INFO ${i} argsz=32`),
      ...Array.from({ length: 5 }, (_, i) => `IRQ_INFO ${i}`),
      'READ 7+0x10 24',
    ]);
    expect(client.region(2)).toMatchObject({ size: 0x100, readable: true, writable: true });
    expect(client.region(0).size).toBe(0);
    expect(client.irqs.info.map((i) => i.count)).toEqual([1, 0, 0, 1, 0]);
    // Absent BARs read 0x00000001 and BAR2 is an I/O BAR: nothing is ever posted.
    const fn = await PciFunction.open(client);
    expect(fn.header).toMatchObject({ vendorId: 0x494f, deviceId: 0x0dc8, interruptPin: 1 });
    await client.write(2, 0, Buffer.from([0xff]));
    const gpio = fake.received.at(-1)!;
    expect(gpio.command).toBe(Command.REGION_WRITE);
    expect(gpio.flags & HeaderFlags.NO_REPLY).toBe(0);

    // INTx as QEMU wires it, then ERR; disable all; reset.
    await client.enableIrqs(PciIrq.INTX, 1);
    await client.maskIrqs(PciIrq.INTX);
    await client.unmaskIrqs(PciIrq.INTX);
    await client.enableIrqs(PciIrq.ERR, 1);
    await client.disableIrqs(PciIrq.INTX);
    await client.reset();
    const sets = fake.received.filter((m) => m.command === Command.DEVICE_SET_IRQS);
    expect(sets.map((m) => `${m.payload.readUInt32LE(4).toString(16)}/${m.payload.readUInt32LE(8)}/${m.payload.readUInt32LE(16)}/${m.fds.length}`)).toEqual([
      '24/0/1/1',
      '9/0/1/0',
      '11/0/1/0',
      '24/3/1/1',
      '21/0/0/0',
    ]);
    expect(fake.received.at(-1)!.command).toBe(Command.DEVICE_RESET);

    // Guest memory: RAM with fds, a ROM range read-only without one, pipelined; bare DMA_MAP
    // replies; DMA_UNMAP echoes its 24 bytes.
    const [low, rom, high] = await Promise.all([
      client.allocateDma(0xc0000, { iova: 0 }),
      client.mapWithoutFd(Buffer.alloc(0x20000), { iova: 0xc0000, readOnly: true }),
      client.allocateDma(0x100000, { iova: 0x100000 }),
    ]);
    const maps = fake.received.filter((m) => m.command === Command.DMA_MAP);
    expect(maps.map((m) => [m.payload.readUInt32LE(4), m.payload.readBigUInt64LE(16), m.fds.length])).toEqual([
      [3, 0n, 1],
      [1, 0xc0000n, 0],
      [3, 0x100000n, 1],
    ]);
    await Promise.all([low.unmap(), rom.unmap(), high.unmap()]);
    expect(client.dmaMaps).toHaveLength(0);
  });

  it('gets ENOENT for a range it unmaps twice on the server (trace: unmap of unknown maps)', async () => {
    const fake = new FakeServer(lvuHandler());
    defer(() => fake.close());
    const client = await VfioUserClient.connect(fake.path);
    defer(() => client.close());
    const mem = await client.allocateDma(4096, { iova: 0x5000 });
    // Someone else (a previous session) already removed it on the server.
    fake.handler = lvuHandler({ overrides: { [Command.DMA_UNMAP]: (m, f) => (f.reply(m, undefined, { error: Errno.ENOENT }), true) } });
    const err = (await mem.unmap().catch((e: unknown) => e)) as VfioUserError;
    expect(err).toBeInstanceOf(VfioUserError);
    expect(err.code).toBe('ENOENT');
  });
});

describe('libvfio-user 2022 server sample (peer-traces)', () => {
  it('accepts 0.1, ten regions, an 8-byte BAR0 and BAR1 mappable with one fd per area', async () => {
    const files = [createMemfd('bar1-a', 0x3000), createMemfd('bar1-b', 0x3000)];
    defer(() => files.forEach((f) => f.close()));
    const regions = [...lvuRegions(), null];
    regions[0] = { flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE, size: 8 };
    regions[1] = {
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP,
      size: 0x3000,
      capabilities: [
        sparseMmapCap([
          { offset: 0x1000n, size: 0x1000n },
          { offset: 0x2000n, size: 0x1000n },
        ]),
      ],
      fds: () => files.map((f) => f.value),
    };
    const fake = new FakeServer(lvuHandler({ versionJson: LVU_2022_VERSION_JSON, maxMinor: 1, regions }));
    defer(() => fake.close());
    const client = await VfioUserClient.connect(fake.path);
    defer(() => client.close());
    expect(client.negotiated.minor).toBe(1);
    expect(client.device.numRegions).toBe(10);
    expect(client.region(0).size).toBe(8);
    expect(client.region(1)).toMatchObject({ mappable: true, areas: [{ offset: 0x1000, size: 0x1000 }, { offset: 0x2000, size: 0x1000 }] });
    expect(client.postedWrites).toBe(false);
    const mapped = client.mmapRegion(1);
    expect(mapped.areas.map((a) => a.size)).toEqual([0x1000, 0x1000]);
  });
});

describe('reset', () => {
  it('resets our server\'s device, keeping DMA maps and eventfds', async () => {
    const device = new TestDevice();
    const s = await startServer(device);
    defer(s.stop);
    const client = await VfioUserClient.connect(s.socketPath);
    defer(() => client.close());
    const mem = await client.allocateDma(4096);
    await client.enableIrqs(PciIrq.MSIX, 2);
    await client.reset();
    expect(device.calls).toContain('reset client');
    expect(s.server.dma.count).toBe(1);
    expect(s.server.irqs.eventfdCount(PciIrq.MSIX)).toBe(2);
    expect(mem.mapped).toBe(true);
  });

  it('refuses to reset a device without RESET, and reports a failed reset', async () => {
    const noReset = new FakeServer(lvuHandler({ deviceFlags: DeviceFlags.PCI }));
    defer(() => noReset.close());
    const a = await VfioUserClient.connect(noReset.path);
    defer(() => a.close());
    const e1 = (await a.reset().catch((e: unknown) => e)) as VfioUserError;
    expect(e1.errno).toBe(Errno.ENOTSUP);
    expect(noReset.received.some((m) => m.command === Command.DEVICE_RESET)).toBe(false);

    const failing = new FakeServer(lvuHandler({ overrides: { [Command.DEVICE_RESET]: (m, f) => (f.reply(m, undefined, { error: Errno.EIO }), true) } }));
    defer(() => failing.close());
    const b = await VfioUserClient.connect(failing.path);
    defer(() => b.close());
    const e2 = (await b.reset().catch((e: unknown) => e)) as VfioUserError;
    expect(e2.errno).toBe(Errno.EIO);
    expect(e2.command).toBe(Command.DEVICE_RESET);
  });
});
