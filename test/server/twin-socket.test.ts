/**
 * Twin-socket mode (reference §1.9, §3.1): the server accepts a client's twin_socket offer with a
 * fresh socket pair whose client end goes with the VERSION reply (fd_index 0); its own commands
 * (DMA_READ/DMA_WRITE) and their replies then use that socket only. Negative cases first.
 */
import { describe, it, expect, vi } from 'vitest';
import * as fs from 'node:fs';
import { VfioUserClient, type ClientOptions } from '../../lib/client';
import { binding, WOULD_BLOCK } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { Command, DmaMapFlags, Errno, RegionInfoFlags } from '../../lib/protocol/constants';
import type { VfioUserServer } from '../../lib/server/server';
import { Connection, type Reply } from '../../lib/transport/connection';
import { TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { closed, connect, defer, deviceInfo, dmaErrno, dmaMap, eventually, serve, tracked, useTeardown, versionPayload } from './support';

useFdLeakCheck();
useTeardown();

/** What our client proposes (lib/client): 102 bytes of payload, so the reply has to fit in that. */
const OFFER = '{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"twin_socket":{"supported":true}}}';
const IOVA = 0x100000;

function json(payload: Buffer): Record<string, unknown> {
  expect(payload[payload.length - 1]).toBe(0);
  return JSON.parse(payload.subarray(4, payload.length - 1).toString('utf8')) as Record<string, unknown>;
}

function capsOf(reply: Reply): Record<string, unknown> {
  return json(reply.payload).capabilities as Record<string, unknown>;
}

/** A raw client that sent VERSION with `document`; the reply's fds are closed at teardown. */
async function rawVersion(socketPath: string, document = OFFER) {
  const client = await connect(socketPath, false);
  const request = versionPayload(0, 2, document);
  const reply = await client.conn.request(Command.VERSION, request);
  defer(() => Fd.closeAll(reply.fds));
  return { client, request, reply };
}

/** The twin socket's client end, driven by a Connection of its own. */
function twinOf(reply: Reply, onRequest: Connection['onRequest'] = null): Connection {
  expect(reply.fds).toHaveLength(1);
  const twin = new Connection(reply.fds[0]!, { name: 'raw-twin' });
  twin.onRequest = onRequest;
  defer(() => twin.close());
  return twin;
}

async function ourClient(socketPath: string, options: ClientOptions = {}): Promise<VfioUserClient> {
  const client = await VfioUserClient.connect(socketPath, { timeoutMs: 2000, ...options });
  defer(() => client.close());
  return client;
}

/** Every request the server's connections send from now on, as [connection name, command]. */
function recordRequests(): () => [string, number][] {
  const spy = vi.spyOn(Connection.prototype, 'request');
  defer(() => spy.mockRestore());
  return () => spy.mock.calls.map((args, i) => [(spy.mock.contexts[i] as Connection).name, args[0]]);
}

const dmaCommands = (log: [string, number][]) => log.filter(([, c]) => c === Command.DMA_READ || c === Command.DMA_WRITE);

const disconnected = (server: VfioUserServer) => new Promise<Error | null>((resolve) => server.once('disconnect', resolve));

/** A socket fd's inode label (socket:[N]), to tell a socket from other fds. */
const isSocket = (fd: Fd) => fs.readlinkSync(`/proc/self/fd/${fd.value}`).startsWith('socket:');

describe('twin socket: not enabled', () => {
  it('is not offered to a client that did not ask (QEMU), and no fd goes with the reply', async () => {
    const { server, socketPath } = await serve();
    const { reply } = await rawVersion(socketPath, '{"capabilities":{"max_msg_fds":16}}');
    expect(reply.fds).toHaveLength(0);
    expect(capsOf(reply).twin_socket).toBeUndefined();
    expect(server.negotiated?.twinSocket).toBe(false);
  });

  it('is not enabled for a client offering it with max_msg_fds 0 (it could not receive the fd)', async () => {
    const { server, socketPath } = await serve();
    const { reply, client } = await rawVersion(socketPath, '{"capabilities":{"max_msg_fds":0,"twin_socket":{"supported":true}}}');
    expect(reply.fds).toHaveLength(0);
    expect(capsOf(reply).twin_socket).toBeUndefined();
    expect(server.negotiated).toMatchObject({ twinSocket: false, maxSendFds: 0 });
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
  });

  it('is not enabled for our client with maxMsgFds 0, which then works on one socket', async () => {
    const { server, socketPath } = await serve();
    const client = await ourClient(socketPath, { maxMsgFds: 0 });
    expect(client.twinSocket).toBe(false);
    expect(server.negotiated?.twinSocket).toBe(false);
  });

  it('is not enabled when the reply would not fit in the request, which bounds the reply', async () => {
    const { server, socketPath } = await serve();
    const { reply, request } = await rawVersion(socketPath, '{"capabilities":{"twin_socket":{"supported":true}}}');
    expect(reply.payload.length).toBeLessThanOrEqual(request.length);
    expect(reply.fds).toHaveLength(0);
    expect(capsOf(reply).twin_socket).toBeUndefined();
    expect(capsOf(reply).max_msg_fds).toBe(16);
    expect(server.negotiated?.twinSocket).toBe(false);
  });

  it('keeps a limit the client must know (a smaller max_data_xfer_size) next to the twin socket', async () => {
    // Our client's request (max_msg_fds, max_data_xfer_size, write_multiple, twin_socket) leaves
    // room for both in the reply; a request too short for both is covered above.
    const { server, socketPath } = await serve(new TestDevice(), { maxDataXferSize: 65536 });
    const client = await ourClient(socketPath);
    expect(client.negotiated.maxDataXferSize).toBe(65536);
    expect(client.twinSocket).toBe(true);
    expect(server.negotiated?.twinSocket).toBe(true);
  });

  it('answers a command sent on the twin socket with EINVAL; the session goes on', async () => {
    const { server, socketPath } = await serve();
    const { reply, client } = await rawVersion(socketPath);
    const twin = twinOf(reply);
    await expect(twin.request(Command.DEVICE_GET_INFO, deviceInfo())).rejects.toMatchObject({ errno: Errno.EINVAL });
    await expect(twin.request(Command.VERSION, versionPayload(0, 2, OFFER))).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect(twin.state).toBe('open');
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
    expect(server.connected).toBe(true);
  });
});

describe('twin socket: the session ends with either socket', () => {
  it('ends when the client closes the twin socket; the next client is served', async () => {
    const { server, socketPath, device } = await serve();
    const { reply, client } = await rawVersion(socketPath);
    expect(server.negotiated?.twinSocket).toBe(true);
    const gone = disconnected(server);
    // Only our copy of the client's end was closed after the reply, or no EOF would come.
    reply.fds[0]!.close();
    expect(await gone).toBeNull();
    await closed(client.conn);
    expect(device.calls).toEqual(['reset lost-connection']);
    expect(server.connected).toBe(false);

    const next = await ourClient(socketPath);
    expect(next.twinSocket).toBe(true);
    expect(server.negotiated?.twinSocket).toBe(true);
    expect(next.device.numRegions).toBe(9);
  });

  it('closes the twin socket when the main one closes (cleanup once)', async () => {
    const { server, socketPath, device } = await serve();
    const { reply, client } = await rawVersion(socketPath);
    const twin = twinOf(reply);
    const gone = disconnected(server);
    let disconnects = 0;
    server.on('disconnect', () => disconnects++);
    client.close();
    expect(await gone).toBeNull();
    expect(await closed(twin)).toBeNull();
    await eventually(() => expect(device.calls).toEqual(['reset lost-connection']));
    expect(disconnects).toBe(1);
  });

  it('fails a DMA in flight on the twin socket when it closes', async () => {
    const { socketPath, device } = await serve();
    const { reply, client } = await rawVersion(socketPath);
    let asked = 0;
    const twin = twinOf(reply, () => {
      asked++; // never answered
    });
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, IOVA, 4096))).toBeInstanceOf(Buffer);
    const io = tracked(device.ctx!.dma.read(IOVA, Buffer.alloc(16)));
    await eventually(() => expect(asked).toBe(1));
    expect(io.done()).toBe(false);
    twin.close();
    expect(await dmaErrno(() => io.promise)).toBe(Errno.ECONNRESET);
    await closed(client.conn);
  });

  it("serves the next client after ours hangs up, and the server's close() ends a twin session", async () => {
    const { server, socketPath } = await serve();
    const first = await ourClient(socketPath);
    expect(first.twinSocket).toBe(true);
    const gone = disconnected(server);
    await first.close();
    expect(await gone).toBeNull();
    const second = await ourClient(socketPath);
    expect(second.twinSocket).toBe(true);
    const ended = new Promise<Error | null>((resolve) => second.once('close', resolve));
    await server.close();
    await ended;
  });
});

describe('twin socket: enabled', () => {
  it('sends the client end as fd 0 with "twin_socket":{"supported":true,"fd_index":0}, within the request size', async () => {
    const { server, socketPath } = await serve();
    const { reply, request } = await rawVersion(socketPath);
    expect(reply.payload.length).toBeLessThanOrEqual(request.length);
    expect(reply.fds).toHaveLength(1);
    expect(isSocket(reply.fds[0]!)).toBe(true);
    const caps = capsOf(reply);
    expect(caps.twin_socket).toEqual({ supported: true, fd_index: 0 });
    expect(caps.max_msg_fds).toBe(16);
    expect(server.negotiated).toMatchObject({ twinSocket: true, twinSocketFdIndex: 0 });
  });

  it('keeps the client end open until a queued VERSION reply has gone (then closes it)', async () => {
    const { server, socketPath, device } = await serve();
    // The first sendmsg carrying an fd (the VERSION reply) finds the socket "full": it is queued.
    const real = binding.sendmsg.bind(binding);
    let blocked = 0;
    const spy = vi.spyOn(binding, 'sendmsg').mockImplementation((fd, iov, fds) => {
      if (fds != null && fds.length > 0 && blocked === 0) {
        blocked++;
        return WOULD_BLOCK;
      }
      return real(fd, iov, fds);
    });
    defer(() => spy.mockRestore());
    const { reply, client } = await rawVersion(socketPath);
    expect(blocked).toBe(1);
    expect(capsOf(reply).twin_socket).toEqual({ supported: true, fd_index: 0 });
    const twin = twinOf(reply, (msg, conn) => conn.reply(msg));
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, IOVA, 4096))).toBeInstanceOf(Buffer);
    await device.ctx!.dma.write(IOVA, Buffer.from([1]));
    // Our copy of the client's end was closed once sent: closing the twin ends the session.
    const gone = disconnected(server);
    twin.close();
    expect(await gone).toBeNull();
  });

  it('announces every capability besides, when the request leaves room', async () => {
    const { socketPath } = await serve();
    const long = `{"capabilities":{"max_msg_fds":16,"twin_socket":{"supported":true}},"x":"${'a'.repeat(200)}"}`;
    const { reply } = await rawVersion(socketPath, long);
    expect(capsOf(reply)).toMatchObject({ max_msg_fds: 16, max_data_xfer_size: 1048576, pgsizes: 4096, max_dma_maps: 65535, write_multiple: true });
    expect(capsOf(reply).twin_socket).toEqual({ supported: true, fd_index: 0 });
  });

  it('is used by our client by default: DMA through a map without fd goes over the twin socket', async () => {
    const { server, socketPath, device } = await serve();
    const client = await ourClient(socketPath);
    expect(client.twinSocket).toBe(true);
    expect(server.negotiated?.twinSocket).toBe(true);
    const memory = Buffer.alloc(0x3000);
    await client.mapWithoutFd(memory, { iova: IOVA });
    const log = recordRequests();
    const dma = device.ctx!.dma;

    await dma.write(IOVA + 0x10, Buffer.from('written by the device'));
    expect(memory.toString('utf8', 0x10, 0x10 + 21)).toBe('written by the device');
    memory.write('from the client', 0x2000);
    const got = Buffer.alloc(15);
    await dma.read(IOVA + 0x2000, got);
    expect(got.toString()).toBe('from the client');

    expect(dmaCommands(log())).toEqual([
      ['client-twin', Command.DMA_WRITE],
      ['client-twin', Command.DMA_READ],
    ]);
    // The main connection carried none of it, and the client's traffic still works there.
    expect(await client.read(7, 0, 4)).toEqual(Buffer.from([0x34, 0x12, 0x78, 0x56]));
  });

  it('splits transfers above max_data_xfer_size into several DMA messages, all on the twin socket', async () => {
    const { socketPath, device } = await serve();
    const client = await ourClient(socketPath);
    const size = 0x280000; // 2.5 MiB: three messages each way at 1 MiB
    const memory = Buffer.alloc(size);
    await client.mapWithoutFd(memory, { iova: IOVA });
    const log = recordRequests();
    const pattern = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4) pattern.writeUInt32LE(i, i);
    await device.ctx!.dma.write(IOVA, pattern);
    expect(memory.equals(pattern)).toBe(true);
    const back = Buffer.alloc(size);
    await device.ctx!.dma.read(IOVA, back);
    expect(back.equals(pattern)).toBe(true);
    const sent = dmaCommands(log());
    expect(sent).toHaveLength(6);
    expect(sent.every(([name]) => name === 'client-twin')).toBe(true);
  });

  it('lets a device do DMA while it handles a command of the client', async () => {
    // Region 1: writing an IOVA makes the device copy 16 bytes from there into BAR0 by DMA.
    const device = new TestDevice();
    device.regions[1] = {
      size: 8,
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
      read: () => {},
      write: async (_offset, src) => {
        await device.ctx!.dma.read(Number(src.readBigUInt64LE(0)), device.bar0.subarray(0, 16));
      },
    };
    const { socketPath } = await serve(device);
    const client = await ourClient(socketPath);
    const memory = Buffer.alloc(0x1000);
    memory.write('fetched by DMA!!', 0x800);
    await client.mapWithoutFd(memory, { iova: IOVA });
    const log = recordRequests();
    await client.write(1, 0, u64(IOVA + 0x800), { posted: false });
    expect(device.bar0.toString('utf8', 0, 16)).toBe('fetched by DMA!!');
    expect(dmaCommands(log())).toEqual([['client-twin', Command.DMA_READ]]);
  });

  it('uses the main socket instead when our client does not offer it (twinSocket: false)', async () => {
    const { server, socketPath, device } = await serve();
    const client = await ourClient(socketPath, { twinSocket: false });
    expect(client.twinSocket).toBe(false);
    expect(server.negotiated?.twinSocket).toBe(false);
    const memory = Buffer.alloc(0x2000);
    await client.mapWithoutFd(memory, { iova: IOVA });
    const log = recordRequests();
    await device.ctx!.dma.write(IOVA + 0x1000, Buffer.from('one socket'));
    expect(memory.toString('utf8', 0x1000, 0x100a)).toBe('one socket');
    const got = Buffer.alloc(10);
    await device.ctx!.dma.read(IOVA + 0x1000, got);
    expect(got.toString()).toBe('one socket');
    expect(dmaCommands(log())).toEqual([
      ['client', Command.DMA_WRITE],
      ['client', Command.DMA_READ],
    ]);
  });

  it("matches the client's replies on the twin socket, error replies included", async () => {
    const { socketPath, device } = await serve();
    const { reply, client } = await rawVersion(socketPath);
    twinOf(reply, (msg, conn) => {
      if (msg.command === Command.DMA_READ) conn.replyError(msg, Errno.EFAULT);
      else conn.reply(msg);
    });
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, IOVA, 4096))).toBeInstanceOf(Buffer);
    expect(await dmaErrno(() => device.ctx!.dma.read(IOVA, Buffer.alloc(8)))).toBe(Errno.EFAULT);
    await device.ctx!.dma.write(IOVA, Buffer.from([1, 2, 3]));
    expect(client.conn.state).toBe('open');
  });
});

function u64(v: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
}
