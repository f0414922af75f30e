/**
 * Device ioeventfds (reference §3.6; libvfio-user's vfu_create_ioeventfd): what a device registers
 * is checked, reported by DEVICE_GET_REGION_IO_FDS in the spec's 40-byte layout (libvfio-user's
 * 48-byte layout when an entry has shadow memory), with shared fds sent once, in the two-step argsz
 * exchange; requests are validated as libvfio-user does; our client signals them instead of
 * sending REGION_WRITE, and the device's EventFd sees the signal (and the value in shadow memory).
 */
import { describe, it, expect } from 'vitest';
import { EventFd } from '../../lib/native/eventfd';
import { Fd } from '../../lib/native/fd';
import { Mapping } from '../../lib/native/mapping';
import { createMemfd } from '../../lib/native/memfd';
import { Command, Errno, IoFdType, KvmIoeventfdFlags, RegionInfoFlags } from '../../lib/protocol/constants';
import { decodeRegionIoFdsReply } from '../../lib/protocol/messages/region';
import { encodeVersion } from '../../lib/protocol/messages/version';
import { Connection } from '../../lib/transport/connection';
import { binding } from '../../lib/native/binding';
import { checkIoEventfd, type IoEventfd } from '../../lib/server/ioeventfd';
import { VfioUserClient } from '../../lib/client/client';
import { PciDevice } from '../../lib/pci/device';
import { TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { defer, eventually, serve, setup, u32s, useTeardown } from './support';

useFdLeakCheck();
useTeardown();

const W = RegionInfoFlags.READ | RegionInfoFlags.WRITE;

function eventfd(): EventFd {
  const e = EventFd.create();
  defer(() => e.close());
  return e;
}

/** A sealed one-page memfd mapped here: shadow memory. */
function shadowPage(): { fd: Fd; bytes: Buffer } {
  const fd = createMemfd('test-shadow', 4096, { sealSize: true });
  const m = Mapping.map(fd, 0, 4096);
  defer(() => {
    m.unmapNow();
    fd.close();
  });
  return { fd, bytes: m.bytes };
}

function request(index: number, argsz = 1024, flags = 0, count = 0): Buffer {
  return u32s(argsz, flags, index, count);
}

describe('checkIoEventfd', () => {
  it('accepts what libvfio-user accepts and says why it refuses the rest', () => {
    const e = eventfd();
    const shadow = shadowPage();
    const ok = (x: Partial<IoEventfd>, size = 4096, flags = W) => checkIoEventfd({ offset: 0, size: 4, fd: e.fd, ...x } as IoEventfd, size, flags);
    expect(ok({})).toBeNull();
    expect(ok({ size: 0, offset: 4095 })).toBeNull();
    expect(ok({ size: 8, datamatch: 0xffff_ffff_ffff_ffffn })).toBeNull();
    expect(ok({ shadow: { fd: shadow.fd, offset: 8 } })).toBeNull();
    expect(ok({ size: 3 as 4 })).toMatch(/size 3/);
    expect(ok({ offset: -4 })).toMatch(/offset/);
    expect(ok({ offset: 4094 })).toMatch(/outside/);
    expect(ok({}, 4096, RegionInfoFlags.READ)).toMatch(/not writable/);
    expect(ok({ size: 0, datamatch: 1 })).toMatch(/needs a size/);
    expect(ok({ size: 1, datamatch: 256 })).toMatch(/does not fit/);
    expect(ok({ fd: shadow.fd })).toMatch(/not an eventfd/);
    expect(ok({ shadow: { fd: shadow.fd, offset: 6 } })).toMatch(/multiple of 4/);
    expect(ok({ shadow: { fd: shadow.fd, offset: 4096 } })).toMatch(/past the end/);
    expect(ok({ shadow: { fd: e.fd, offset: 0 } })).toMatch(/not a regular file/);
    const first: IoEventfd = { offset: 0, size: 4, fd: e.fd };
    expect(checkIoEventfd({ offset: 0, size: 4, fd: e.fd }, 4096, W, [first])).toMatch(/second ioeventfd/);
    expect(checkIoEventfd({ offset: 0, size: 4, fd: e.fd, datamatch: 1 }, 4096, W, [first])).toBeNull();
  });
});

describe('DEVICE_GET_REGION_IO_FDS: refused', () => {
  it('refuses non-zero flags or count, an unimplemented region, and fds with the request', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.DEVICE_GET_REGION_IO_FDS, request(0, 1024, 1))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_REGION_IO_FDS, request(0, 1024, 0, 1))).toBe(Errno.EINVAL);
    expect(await client.msg(Command.DEVICE_GET_REGION_IO_FDS, request(1))).toBe(Errno.EINVAL);
    const stray = eventfd();
    expect(await client.msg(Command.DEVICE_GET_REGION_IO_FDS, request(0), [stray.fd.value])).toBe(Errno.EINVAL);
  });

  it('answers EINVAL, and reports the device, when its list does not hold together', async () => {
    const device = new TestDevice();
    const e = eventfd();
    device.regions[0]!.ioeventfds = [{ offset: 4094, size: 4, fd: e.fd }];
    const { client, server } = await setup(device);
    const errors: unknown[] = [];
    server.on('error', (err) => errors.push(err));
    expect(await client.msg(Command.DEVICE_GET_REGION_IO_FDS, request(0))).toBe(Errno.EINVAL);
    expect(String(errors[0])).toMatch(/region 0: ioeventfd 0: .*outside/);
  });

  it('notices an eventfd the device closed after a first, good answer', async () => {
    const device = new TestDevice();
    const e = EventFd.create();
    device.regions[0]!.ioeventfds = [{ offset: 0, size: 4, fd: e.fd }];
    const { client, server } = await setup(device);
    const errors: unknown[] = [];
    server.on('error', (err) => errors.push(err));
    const first = await client.conn.request(Command.DEVICE_GET_REGION_IO_FDS, request(0));
    Fd.closeAll(first.fds);
    e.close();
    expect(await client.msg(Command.DEVICE_GET_REGION_IO_FDS, request(0))).toBe(Errno.EINVAL);
    expect(String(errors[0])).toMatch(/ioeventfd 0: its fd is closed/);
  });
});

describe('DEVICE_GET_REGION_IO_FDS: offered', () => {
  it('reports plain ioeventfds in 40-byte entries, a shared eventfd once, in two steps', async () => {
    const device = new TestDevice();
    const a = eventfd();
    const b = eventfd();
    device.regions[0]!.ioeventfds = [
      { offset: 0x10, size: 4, fd: a.fd },
      { offset: 0x20, size: 2, fd: b.fd, datamatch: 0xbeef },
      { offset: 0x30, size: 0, fd: a.fd },
    ];
    const { client } = await setup(device);
    // First step: argsz 16 gets the fixed part with the full argsz and count, no fds.
    const first = await client.conn.request(Command.DEVICE_GET_REGION_IO_FDS, request(0, 16));
    expect(first.fds).toHaveLength(0);
    expect(first.payload).toEqual(u32s(16 + 3 * 40, 0, 0, 3));
    const r = await client.conn.request(Command.DEVICE_GET_REGION_IO_FDS, request(0, 16 + 3 * 40));
    defer(() => Fd.closeAll(r.fds));
    const reply = decodeRegionIoFdsReply(r.payload);
    expect(reply.entrySize).toBe(40);
    expect(r.fds).toHaveLength(2);
    expect(reply.subRegions.map((s) => [Number(s.offset), Number(s.size), s.fdIndex, s.type, s.flags, s.datamatch])).toEqual([
      [0x10, 4, 0, IoFdType.IOEVENTFD, 0, 0n],
      [0x20, 2, 1, IoFdType.IOEVENTFD, KvmIoeventfdFlags.DATAMATCH, 0xbeefn],
      [0x30, 0, 0, IoFdType.IOEVENTFD, 0, 0n],
    ]);
    // The fds are copies of the device's eventfds: a signal through one reaches the device.
    expect(binding.eventfdSignal(r.fds[1]!.value)).toBe(true);
    expect(b.drain()).toBe(1);
    expect(a.drain()).toBe(0);
  });

  it('reports shadow ioeventfds in 48-byte entries (type 2) with the memory fd', async () => {
    const device = new TestDevice();
    const e = eventfd();
    const shadow = shadowPage();
    device.regions[0]!.ioeventfds = [
      { offset: 0x100, size: 4, fd: e.fd, shadow: { fd: shadow.fd, offset: 0x100 } },
      { offset: 0x104, size: 4, fd: e.fd, shadow: { fd: shadow.fd, offset: 0x104 } },
      { offset: 0x200, size: 4, fd: e.fd },
    ];
    const { client } = await setup(device);
    const r = await client.conn.request(Command.DEVICE_GET_REGION_IO_FDS, request(0));
    defer(() => Fd.closeAll(r.fds));
    const reply = decodeRegionIoFdsReply(r.payload);
    expect(reply.entrySize).toBe(48);
    expect(r.fds).toHaveLength(2);
    expect(reply.subRegions.map((s) => [s.type, s.fdIndex, s.shadowMemFdIndex, s.shadowOffset])).toEqual([
      [IoFdType.IOEVENTFD_SHADOW, 0, 1, 0x100n],
      [IoFdType.IOEVENTFD_SHADOW, 0, 1, 0x104n],
      [IoFdType.IOEVENTFD, 0, 0, 0n],
    ]);
  });

  it('offers nothing to a client that accepts no fds', async () => {
    const device = new TestDevice();
    const e = eventfd();
    device.regions[0]!.ioeventfds = [{ offset: 0, size: 4, fd: e.fd }];
    const { socketPath } = await serve(device);
    const conn = new Connection(new Fd(binding.unixConnect(socketPath)), { name: 'no-fds', maxSendFds: 0 });
    defer(() => conn.close());
    const v = await conn.request(Command.VERSION, encodeVersion({ major: 0, minor: 0, document: { capabilities: { max_msg_fds: 0n } } }));
    Fd.closeAll(v.fds);
    const r = await conn.request(Command.DEVICE_GET_REGION_IO_FDS, request(0));
    expect(r.fds).toHaveLength(0);
    expect(r.payload).toEqual(u32s(16, 0, 0, 0));
  });

  it('lets our client signal them instead of sending REGION_WRITE; the device reads the shadow value', async () => {
    const device = new TestDevice();
    const e = eventfd();
    const shadow = shadowPage();
    device.regions[0]!.ioeventfds = [{ offset: 0x40, size: 4, fd: e.fd, shadow: { fd: shadow.fd, offset: 0x40 } }];
    const rung: number[] = [];
    e.watch(() => rung.push(shadow.bytes.readUInt32LE(0x40)));
    const { socketPath } = await serve(device);
    const client = await VfioUserClient.connect(socketPath);
    defer(() => client.close());
    const set = await client.useIoEventfds(0);
    expect(set.entrySize).toBe(48);
    for (const v of [7, 8, 9]) await client.writeUint(0, 0x40, 4, v);
    await eventually(() => expect(rung.at(-1)).toBe(9));
    expect(set.signalled).toBe(3);
    // Writes it does not stand for still go as messages.
    await client.writeUint(0, 0x44, 4, 5, { posted: false });
    expect(device.calls.filter((c) => c.startsWith('bar0 write'))).toEqual(['bar0 write 68 4']);
  });
});

describe('PciDevice.setIoEventfds', () => {
  class Card extends PciDevice {
    constructor() {
      super({ vendorId: 0x1b36, deviceId: 0x0005, classCode: 0xff0000, bars: { 0: { size: 4096, read: () => {}, write: () => {} } } });
    }
  }

  it('checks every entry against the BAR, replaces the list, and the server reports it', async () => {
    const card = new Card();
    const e = eventfd();
    expect(() => card.setIoEventfds(1, [])).toThrow(/BAR 1 does not exist/);
    expect(() => card.setIoEventfds(6, [])).toThrow(RangeError);
    expect(() => card.setIoEventfds(0, [{ offset: 4092, size: 8, fd: e.fd }])).toThrow(/BAR 0: ioeventfd 0: .*outside/);
    card.setIoEventfds(0, [{ offset: 0x10, size: 4, fd: e.fd }, { offset: 0x20, size: 4, fd: e.fd, datamatch: 7 }]);
    card.setIoEventfds(0, [{ offset: 0x30, size: 2, fd: e.fd }]);
    const { client } = await setup(card);
    const r = await client.conn.request(Command.DEVICE_GET_REGION_IO_FDS, request(0));
    defer(() => Fd.closeAll(r.fds));
    expect(decodeRegionIoFdsReply(r.payload).subRegions.map((s) => [Number(s.offset), Number(s.size)])).toEqual([[0x30, 2]]);
  });
});
