import { describe, expect, it } from 'vitest';
import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { createMemfd } from '../../lib/native/memfd';
import { VfioUserClient } from '../../lib/client';
import { Command, DeviceFlags, Errno, HeaderFlags } from '../../lib/protocol/constants';
import { ProtocolError, VfioUserError } from '../../lib/protocol/errors';
import { decodeVersion } from '../../lib/protocol/messages/version';
import { countOpenFds, useFdLeakCheck } from '../helpers/fds';
import { startServer, TestDevice } from '../helpers/server';
import { connect, fakeServer, defer, useCleanup, FakeServer, LVU_2022_VERSION_JSON, header, until, type RawMessage } from './fixtures';

useFdLeakCheck();

useCleanup();

/** A VERSION reply payload carrying `json` (NUL added unless `nul` is false). */
function versionReply(json: string, minor = 2, major = 0, nul = true): Buffer {
  const text = Buffer.from(json, 'utf8');
  const b = Buffer.alloc(4 + text.length + (nul ? 1 : 0));
  b.writeUInt16LE(major, 0);
  b.writeUInt16LE(minor, 2);
  text.copy(b, 4);
  return b;
}

function replyVersion(json: string, minor = 2, major = 0, nul = true) {
  return (msg: RawMessage, fake: FakeServer) => {
    fake.reply(msg, versionReply(json, minor, major, nul));
    return true;
  };
}

function deviceInfo(flags: number, numRegions: number, numIrqs: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt32LE(16, 0);
  b.writeUInt32LE(flags, 4);
  b.writeUInt32LE(numRegions, 8);
  b.writeUInt32LE(numIrqs, 12);
  return b;
}

async function expectProtocolError(p: Promise<unknown>, match?: RegExp): Promise<ProtocolError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ProtocolError);
  if (match) expect((err as Error).message).toMatch(match);
  return err as ProtocolError;
}

async function expectErrno(p: Promise<unknown>, errno: number): Promise<VfioUserError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(VfioUserError);
  expect((err as VfioUserError).errno).toBe(errno);
  return err as VfioUserError;
}

describe('connect: refusals', () => {
  it('rejects with the connect(2) error for a missing socket', async () => {
    const err = await VfioUserClient.connect('/nonexistent/vfio-user.sock').catch((e: unknown) => e);
    expect((err as NodeJS.ErrnoException).code).toBe('ENOENT');
  });

  it('rejects bad options synchronously-typed', async () => {
    await expect(VfioUserClient.connect('')).rejects.toThrow(TypeError);
    await expect(VfioUserClient.connect('/x', { maxMsgFds: 300 })).rejects.toThrow(RangeError);
    await expect(VfioUserClient.connect('/x', { timeoutMs: 0 })).rejects.toThrow(RangeError);
  });

  it('fails with the errno of a refused VERSION', async () => {
    const fake = fakeServer({ overrides: { [Command.VERSION]: (m, f) => (f.reply(m, undefined, { error: Errno.EINVAL }), true) } });
    await expectErrno(connect(fake.path), Errno.EINVAL);
  });

  it('times out on a server that never answers', async () => {
    const fake = fakeServer({ overrides: { [Command.VERSION]: () => true } });
    const t0 = Date.now();
    await expectErrno(connect(fake.path, { timeoutMs: 100 }), Errno.ETIMEDOUT);
    expect(Date.now() - t0).toBeLessThan(1000);
  });

  it('fails with ECONNRESET when the server hangs up during bring-up', async () => {
    const fake = fakeServer({ overrides: { [Command.DEVICE_GET_INFO]: (_m, f) => (f.closeClient(), true) } });
    await expectErrno(connect(fake.path), Errno.ECONNRESET);
  });

  it.each([
    ['another major', versionReply('{}', 0, 1), /major/],
    ['a minor above the proposal', versionReply('{}', 3), /minor/],
    ['JSON without NUL', versionReply('{"capabilities":{}}', 2, 0, false), /NUL/],
    ['malformed JSON', versionReply('{"capabilities":', 2), /JSON/],
    ['a string max_msg_fds', versionReply('{"capabilities":{"max_msg_fds":"8"}}'), /max_msg_fds/],
    ['max_msg_fds above 16', versionReply('{"capabilities":{"max_msg_fds":17}}'), /max_msg_fds 17/],
    ['max_data_xfer_size above 64 MiB', versionReply('{"capabilities":{"max_data_xfer_size":67108865}}'), /max_data_xfer_size/],
    ['pgsizes with low bits', versionReply('{"capabilities":{"pgsizes":4097}}'), /pgsizes/],
    ['max_dma_maps above 65535', versionReply('{"capabilities":{"max_dma_maps":65536}}'), /max_dma_maps/],
    ['a truncated payload', Buffer.from([0, 0]), /truncated|short|VERSION/],
  ])('refuses a VERSION reply with %s', async (_name, payload, match) => {
    const fake = fakeServer({ overrides: { [Command.VERSION]: (m, f) => (f.reply(m, payload), true) } });
    await expectProtocolError(connect(fake.path), match);
  });

  it('refuses (and closes) fds on a VERSION reply that does not enable twin_socket', async () => {
    const fake = fakeServer({
      overrides: {
        [Command.VERSION]: (m, f) => {
          const fd = createMemfd('stray', 4096);
          f.reply(m, versionReply('{"capabilities":{}}'), { fds: [fd.value] });
          fd.close();
          return true;
        },
      },
    });
    await expectProtocolError(connect(fake.path), /fds/);
  });

  it('refuses twin_socket without fd_index, or when it was not offered', async () => {
    const noIndex = fakeServer({ overrides: { [Command.VERSION]: replyVersion('{"capabilities":{"twin_socket":{"supported":true}}}') } });
    await expectProtocolError(connect(noIndex.path), /fd_index/);
    const notOffered = fakeServer({
      overrides: { [Command.VERSION]: replyVersion('{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}') },
    });
    await expectProtocolError(connect(notOffered.path, { twinSocket: false }), /did not offer/);
  });

  it.each([
    ['a non-PCI device', deviceInfo(DeviceFlags.RESET, 9, 5), /PCI/],
    ['101 regions', deviceInfo(DeviceFlags.PCI, 101, 5), /101 regions/],
    ['51 IRQ indexes', deviceInfo(DeviceFlags.PCI, 9, 51), /51 IRQ/],
    ['no config region', deviceInfo(DeviceFlags.PCI, 7, 5), /config/],
    ['a 12-byte payload', deviceInfo(DeviceFlags.PCI, 9, 5).subarray(0, 12), /DEVICE_GET_INFO/],
  ])('refuses DEVICE_GET_INFO describing %s', async (_name, payload, match) => {
    const fake = fakeServer({ overrides: { [Command.DEVICE_GET_INFO]: (m, f) => (f.reply(m, payload), true) } });
    await expectProtocolError(connect(fake.path), match);
  });

  it('refuses (and closes) an fd on a DEVICE_GET_INFO reply', async () => {
    const fake = fakeServer({
      overrides: {
        [Command.DEVICE_GET_INFO]: (m, f) => {
          const fd = createMemfd('stray', 4096);
          f.reply(m, deviceInfo(DeviceFlags.PCI, 9, 5), { fds: [fd.value] });
          fd.close();
          return true;
        },
      },
    });
    await expectProtocolError(connect(fake.path), /unexpected fds/);
  });

  it('refuses IRQ info with an absurd vector count or another index', async () => {
    const irq = (index: number, count: number) => (m: RawMessage, f: FakeServer) => {
      const b = Buffer.alloc(16);
      b.writeUInt32LE(16, 0);
      b.writeUInt32LE(1, 4);
      b.writeUInt32LE(index, 8);
      b.writeUInt32LE(count, 12);
      f.reply(m, b);
      return true;
    };
    const huge = fakeServer({ overrides: { [Command.DEVICE_GET_IRQ_INFO]: irq(0, 1 << 20) } });
    await expectProtocolError(connect(huge.path), /vectors/);
    const other = fakeServer({ overrides: { [Command.DEVICE_GET_IRQ_INFO]: irq(9, 1) } });
    await expectProtocolError(connect(other.path), /index 9/);
  });

  it('fails every pending call with ECONNRESET when a reply names an unknown msg_id', async () => {
    const fake = fakeServer({
      overrides: {
        [Command.DEVICE_GET_INFO]: (m, f) => {
          f.reply(m, deviceInfo(DeviceFlags.PCI, 9, 5), { msgId: (m.msgId + 100) & 0xffff });
          return true;
        },
      },
    });
    const err = await expectErrno(connect(fake.path), Errno.ECONNRESET);
    expect(err.message).toMatch(/no outstanding request/);
  });
});

describe('connect: bring-up', () => {
  it('negotiates 0.2 with our server and learns regions and IRQs', async () => {
    const device = new TestDevice();
    const s = await startServer(device);
    defer(s.stop);
    const client = await connect(s.socketPath);
    expect(client.negotiated.major).toBe(0);
    expect(client.negotiated.minor).toBe(2);
    expect(client.negotiated.maxSendFds).toBe(16);
    expect(client.twinSocket).toBe(true); // our server accepts the twin socket our client offers
    expect(client.device).toMatchObject({ numRegions: 9, numIrqs: 5, resettable: true });
    expect(client.regions.map((r) => r.size)).toEqual([4096, 0, 0, 0, 0, 0, 0, 256, 0]);
    expect(client.region(0)).toMatchObject({ readable: true, writable: true, mmapFlag: false, mappable: false });
    expect(client.irqs.info.map((i) => i.count)).toEqual([1, 4, 8, 1, 1]);
    // No region is mappable and BAR0's register reads 0 (a memory BAR): writes to it are posted.
    expect(client.postedWrites).toBe(true);
    expect(s.server.negotiated?.minor).toBe(2);
  });

  it('proposes 0.0 like QEMU when asked', async () => {
    const s = await startServer(new TestDevice());
    defer(s.stop);
    const client = await connect(s.socketPath, { version: { major: 0, minor: 0 } });
    expect(client.negotiated.minor).toBe(0);
    expect(s.server.negotiated?.minor).toBe(0);
  });

  it('sends VERSION first, as msg_id 0, with NUL-terminated JSON capabilities', async () => {
    const fake = fakeServer();
    await connect(fake.path, { maxMsgFds: 4, maxDataXferSize: 65536 });
    const v = fake.received[0]!;
    expect(v.command).toBe(Command.VERSION);
    expect(v.msgId).toBe(0);
    expect(v.payload[v.payload.length - 1]).toBe(0);
    const decoded = decodeVersion(v.payload);
    expect(decoded.minor).toBe(2);
    expect(decoded.announced).toMatchObject({ maxMsgFds: 4, maxDataXferSize: 65536, twinSocket: { supported: true } });
    expect(decoded.announced.migration).toBeUndefined();
    // Later ids count up from 1.
    expect(fake.received[1]!.msgId).toBe(1);
  });

  it('accepts libvfio-user 2022 (0.1, spaced JSON, 10 regions) and keeps its limits', async () => {
    const regions = new Array(10).fill(null);
    regions[7] = { flags: 0, size: 256 };
    const fake = fakeServer({ versionJson: LVU_2022_VERSION_JSON, maxMinor: 1, regions });
    const client = await connect(fake.path);
    expect(client.negotiated.minor).toBe(1);
    expect(client.negotiated.maxSendFds).toBe(8);
    expect(client.negotiated.maxDataXferSize).toBe(1048576);
    expect(client.serverCapabilities.migration?.pgsize).toBe(4096);
    expect(client.device.numRegions).toBe(10);
    // Config space with flags 0 (some libvfio-user builds) is still read normally.
    expect(client.region(7)).toMatchObject({ size: 256, readable: false });
    const ids = await client.read(7, 0, 4);
    expect(ids.readUInt16LE(0)).toBe(0x494f);
  });

  it('uses a twin socket when the server enables it: DMA commands arrive and are answered there', async () => {
    const twin: { fd: Fd | null } = { fd: null };
    const fake = fakeServer({
      overrides: {
        [Command.VERSION]: (m, f) => {
          const [a, b] = binding.socketpair();
          twin.fd = new Fd(a);
          f.reply(m, versionReply('{"capabilities":{"max_msg_fds":8,"twin_socket":{"supported":true,"fd_index":0}}}'), { fds: [b] });
          new Fd(b).close();
          return true;
        },
      },
    });
    defer(() => twin.fd?.close());
    const client = await connect(fake.path);
    expect(client.twinSocket).toBe(true);
    const mem = await client.mapWithoutFd(Buffer.alloc(4096, 0x5a), { iova: 0x40000 });
    // DMA_READ of 4 bytes at 0x40010 on the twin socket, id 1.
    const req = Buffer.alloc(16);
    req.writeBigUInt64LE(0x40010n, 0);
    req.writeBigUInt64LE(4n, 8);
    const fd = twin.fd!.value;
    expect(binding.sendmsg(fd, [header(1, Command.DMA_READ, 32), req])).toBe(32);
    const reply = Buffer.alloc(64);
    let got = 0;
    await until(() => {
      const n = binding.recvmsg(fd, reply, got, reply.length - got, new Int32Array(4));
      if (n > 0) got += n;
      return got >= 36;
    });
    expect(reply.readUInt16LE(0)).toBe(1);
    expect(reply.readUInt32LE(4)).toBe(36);
    expect(reply.readUInt32LE(8) & HeaderFlags.TYPE_MASK).toBe(HeaderFlags.TYPE_REPLY);
    expect(reply.readBigUInt64LE(16)).toBe(0x40010n);
    expect(reply.subarray(32, 36)).toEqual(Buffer.alloc(4, 0x5a));
    await mem.unmap();
    // The twin socket belongs to the connection: closing it ends the client.
    const closed = new Promise<Error | null>((r) => client.once('close', r));
    twin.fd!.close();
    expect(await closed).toBeInstanceOf(VfioUserError);
    expect(client.closed).toBe(true);
  });

  it('leaves the fd count unchanged after connect, use and close', async () => {
    const before = countOpenFds();
    const device = new TestDevice();
    const s = await startServer(device);
    const client = await VfioUserClient.connect(s.socketPath);
    await client.write(0, 0, Buffer.from([1, 2, 3, 4]));
    const mem = await client.allocateDma(8192);
    await client.enableIrqs(2, 8);
    expect(await client.read(0, 0, 4)).toEqual(Buffer.from([1, 2, 3, 4]));
    expect(countOpenFds()).toBeGreaterThan(before);
    const disconnected = new Promise((r) => s.server.once('disconnect', r));
    await client.close();
    await disconnected;
    expect(mem.mapped).toBe(false);
    expect(() => mem.bytes).toThrow();
    await s.stop();
    expect(countOpenFds()).toBe(before);
  });

  it('emits close with ECONNRESET and fails pending calls when the server hangs up', async () => {
    const fake = fakeServer({ overrides: { [Command.REGION_READ]: (m) => m.payload.readUInt32LE(12) === 4 } });
    const client = await connect(fake.path);
    const closed = new Promise<Error | null>((r) => client.once('close', r));
    const pending = client.read(7, 0, 4);
    await fake.waitFor((m) => m.command === Command.REGION_READ && m.payload.readUInt32LE(12) === 4);
    fake.closeClient();
    await expectErrno(pending, Errno.ECONNRESET);
    const err = await closed;
    expect((err as VfioUserError).errno).toBe(Errno.ECONNRESET);
    await expectErrno(client.read(7, 0, 4), Errno.ECONNRESET);
    expect(() => client.mmapRegion(7)).toThrow(VfioUserError);
  });
});
