import { describe, expect, it } from 'vitest';
import { EventFd } from '../../lib/native/eventfd';
import { Mapping } from '../../lib/native/mapping';
import { createMemfd } from '../../lib/native/memfd';
import { Command, Errno, IoFdType, KvmIoeventfdFlags, PciRegion } from '../../lib/protocol/constants';
import { ProtocolError } from '../../lib/protocol/errors';
import { encodeRegionIoFdsReply, type IoFdSubRegion } from '../../lib/protocol/messages/region';
import { useFdLeakCheck } from '../helpers/fds';
import { startServer, TestDevice } from '../helpers/server';
import { connect, defer, fakeServer, rejection, useCleanup, type FakeServer, type RawMessage } from './fixtures';

useFdLeakCheck();

useCleanup();

/** A 4 KiB BAR0 (no mmap), config space: enough for region accesses. */
const REGIONS = [{ flags: 3, size: 0x1000 }, null, null, null, null, null, null, { flags: 3, size: 256 }, null];

/**
 * A fake server that answers DEVICE_GET_REGION_IO_FDS for BAR0 as libvfio-user does: the first
 * step (argsz 16) gets the fixed part with the full argsz and no fds, the second the entries and
 * `fds()` (the client receives duplicates).
 */
function ioFdsServer(subRegions: IoFdSubRegion[], fds: () => number[], entrySize: 40 | 48 = 40): FakeServer {
  return fakeServer({
    regions: REGIONS,
    overrides: {
      [Command.DEVICE_GET_REGION_IO_FDS]: (m: RawMessage, f: FakeServer) => {
        const argsz = m.payload.readUInt32LE(0);
        const index = m.payload.readUInt32LE(8);
        const body = encodeRegionIoFdsReply({ index, subRegions: index === 0 ? subRegions : [], entrySize }, argsz);
        const complete = body.length === body.readUInt32LE(0);
        f.reply(m, body, { fds: complete && index === 0 ? fds() : [] });
        return true;
      },
    },
  });
}

/** The fd itself: sendmsg passes the receiver a duplicate and leaves ours open. */
const dup = (fd: number): number => fd;

const regionWrites = (fake: FakeServer) => fake.received.filter((m) => m.command === Command.REGION_WRITE && m.payload.readUInt32LE(8) === 0);

describe('DEVICE_GET_REGION_IO_FDS', () => {
  it('is empty for our server (which offers no ioeventfds yet), and writes still go as messages', async () => {
    const device = new TestDevice();
    const s = await startServer(device);
    defer(s.stop);
    const client = await connect(s.socketPath);
    const set = await client.useIoEventfds(PciRegion.BAR0);
    expect(set.subRegions).toEqual([]);
    await client.writeUint(0, 0x10, 4, 0x1234, { posted: false });
    expect(device.bar0.readUInt32LE(0x10)).toBe(0x1234);
    client.stopIoEventfds(0);
    expect(set.closed).toBe(true);
  });

  it('takes ioeventfds in two steps and signals them for the writes they stand for', async () => {
    const doorbell = EventFd.create();
    const matched = EventFd.create();
    defer(() => (doorbell.close(), matched.close()));
    const subRegions: IoFdSubRegion[] = [
      { offset: 0x100n, size: 4n, fdIndex: 0, type: IoFdType.IOEVENTFD, flags: 0, datamatch: 0n },
      { offset: 0x200n, size: 2n, fdIndex: 1, type: IoFdType.IOEVENTFD, flags: KvmIoeventfdFlags.DATAMATCH, datamatch: 0xbeefn },
    ];
    const fake = ioFdsServer(subRegions, () => [dup(doorbell.fd.value), dup(matched.fd.value)]);
    const client = await connect(fake.path);
    const set = await client.useIoEventfds(0);
    const queries = fake.received.filter((m) => m.command === Command.DEVICE_GET_REGION_IO_FDS);
    expect(queries.map((m) => m.payload.readUInt32LE(0))).toEqual([16, 16 + 2 * 40]);
    expect(set.entrySize).toBe(40);
    expect(set.subRegions.map((s) => [s.offset, s.size, s.type, s.flags, s.datamatch])).toEqual([
      [0x100n, 4n, 0, 0, 0n],
      [0x200n, 2n, 0, 1, 0xbeefn],
    ]);

    await client.writeUint(0, 0x100, 4, 7, { posted: false });
    await client.writeUint(0, 0x100, 4, 8);
    await client.writeUint(0, 0x200, 2, 0xbeef);
    expect(doorbell.drain()).toBe(2);
    expect(matched.drain()).toBe(1);
    expect(set.signalled).toBe(3);
    // Not what they stand for: other width, other value, other offset -> messages.
    await client.writeUint(0, 0x100, 2, 7, { posted: false });
    await client.writeUint(0, 0x200, 2, 0xdead, { posted: false });
    await client.writeUint(0, 0x104, 4, 7, { posted: false });
    await client.flush();
    expect(regionWrites(fake).map((m) => [Number(m.payload.readBigUInt64LE(0)), m.payload.readUInt32LE(12)])).toEqual([
      [0x100, 2],
      [0x200, 2],
      [0x104, 4],
    ]);
    expect(doorbell.drain()).toBe(0);
    expect(matched.drain()).toBe(0);

    // Stopped: messages again.
    client.stopIoEventfds(0);
    await client.writeUint(0, 0x100, 4, 9, { posted: false });
    expect(regionWrites(fake)).toHaveLength(4);
    expect(doorbell.drain()).toBe(0);
  });

  it('stores the value into shadow memory before signalling a shadow ioeventfd (libvfio-user 48-byte entries)', async () => {
    const efd = EventFd.create();
    const shadow = createMemfd('shadow', 0x2000);
    defer(() => (efd.close(), shadow.close()));
    const subRegions: IoFdSubRegion[] = [
      { offset: 0x808n, size: 0n, fdIndex: 0, type: IoFdType.IOEVENTFD_SHADOW, flags: 0, datamatch: 0n, shadowMemFdIndex: 1, shadowOffset: 0x1010n },
    ];
    const fake = ioFdsServer(subRegions, () => [dup(efd.fd.value), dup(shadow.value)], 48);
    const client = await connect(fake.path);
    const set = await client.useIoEventfds(0);
    expect(set.entrySize).toBe(48);
    expect(set.subRegions[0]).toMatchObject({ type: IoFdType.IOEVENTFD_SHADOW, shadowOffset: 0x1010n });
    await client.writeUint(0, 0x808, 4, 0x2a);
    expect(efd.drain()).toBe(1);
    const view = Mapping.map(shadow, 0x1000, 0x1000);
    defer(() => view.unmapNow());
    expect(view.bytes.readUInt32LE(0x10)).toBe(0x2a);
    expect(regionWrites(fake)).toHaveLength(0);
  });

  it('refuses replies that do not hold together, closing their fds', async () => {
    const efd = EventFd.create();
    const memfd = createMemfd('not-an-eventfd', 4096);
    defer(() => (efd.close(), memfd.close()));
    const cases: [IoFdSubRegion[], () => number[], RegExp][] = [
      [[{ offset: 0n, size: 4n, fdIndex: 1, type: 0, flags: 0, datamatch: 0n }], () => [dup(efd.fd.value)], /refers to fd 1/],
      [[{ offset: 0n, size: 3n, fdIndex: 0, type: 0, flags: 0, datamatch: 0n }], () => [dup(efd.fd.value)], /size 3/],
      [[{ offset: 0xffen, size: 4n, fdIndex: 0, type: 0, flags: 0, datamatch: 0n }], () => [dup(efd.fd.value)], /outside/],
      [[{ offset: 0n, size: 4n, fdIndex: 0, type: 0, flags: 0, datamatch: 0n }], () => [dup(memfd.value)], /not an eventfd/],
      [[{ offset: 0n, size: 4n, fdIndex: 0, type: 0, flags: 0, datamatch: 0n }], () => [dup(efd.fd.value), dup(efd.fd.value)], /carries 2 fds/],
      [[{ offset: 0n, size: 4n, fdIndex: 0, type: 7, flags: 0, datamatch: 0n }], () => [dup(efd.fd.value)], /unknown type/],
    ];
    for (const [subRegions, fds, message] of cases) {
      const fake = ioFdsServer(subRegions, fds);
      const client = await connect(fake.path);
      const err = await rejection(client.useIoEventfds(0));
      expect(err, String(message)).toBeInstanceOf(ProtocolError);
      expect((err as Error).message).toMatch(message);
      await client.close();
    }
  });

  it('reports the server\'s refusal (libvfio-user: EINVAL) and range errors', async () => {
    const fake = fakeServer({ regions: REGIONS });
    const client = await connect(fake.path);
    expect(await rejection(client.queryRegionIoFds(0))).toMatchObject({ errno: Errno.EINVAL });
    await expect(client.queryRegionIoFds(42)).rejects.toThrow(RangeError);
  });
});
