import { describe, it, expect, afterEach } from 'vitest';
import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { Connection, IncomingMessage } from '../../lib/transport/connection';
import { Command, Errno, HeaderFlags } from '../../lib/protocol/constants';
import { VfioUserError } from '../../lib/protocol/errors';
import { useFdLeakCheck, isOpen } from '../helpers/fds';

useFdLeakCheck();

const open: Connection[] = [];
const rawFds: Fd[] = [];
afterEach(() => {
  for (const c of open.splice(0)) c.close();
  for (const fd of rawFds.splice(0)) fd.close();
});

function pair(optsA = {}, optsB = {}): [Connection, Connection] {
  const [a, b] = binding.socketpair();
  const ca = new Connection(new Fd(a), { name: 'a', ...optsA });
  const cb = new Connection(new Fd(b), { name: 'b', ...optsB });
  open.push(ca, cb);
  return [ca, cb];
}

/** A Connection facing a raw socket the test drives byte by byte. */
function rawPair(opts = {}): [Connection, number] {
  const [a, b] = binding.socketpair();
  const conn = new Connection(new Fd(a), { name: 'conn', ...opts });
  open.push(conn);
  const raw = new Fd(b);
  rawFds.push(raw);
  return [conn, raw.value];
}

function header(msgId: number, command: number, size: number, flags = 0, error = 0): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt16LE(msgId, 0);
  h.writeUInt16LE(command, 2);
  h.writeUInt32LE(size, 4);
  h.writeUInt32LE(flags, 8);
  h.writeUInt32LE(error, 12);
  return h;
}

function sendRaw(fd: number, bytes: Buffer, fds: number[] | null = null): void {
  expect(binding.sendmsg(fd, [bytes], fds)).toBe(bytes.length);
}

/** Reads whatever is queued on a raw socket (waits until `min` bytes are there). */
async function readRaw(fd: number, min: number): Promise<Buffer> {
  const buf = Buffer.alloc(1 << 20);
  const fdsOut = new Int32Array(8);
  let have = 0;
  for (let spins = 0; have < min && spins < 1000; spins++) {
    const n = binding.recvmsg(fd, buf, have, buf.length - have, fdsOut);
    if (n > 0) have += n;
    else await new Promise((r) => setTimeout(r, 2));
  }
  return buf.subarray(0, have);
}

const tick = (ms = 5) => new Promise((r) => setTimeout(r, ms));

function echoServer(conn: Connection): void {
  conn.onRequest = (msg, c) => c.reply(msg, Buffer.from(msg.payload));
}

describe('Connection: request and reply', () => {
  it('matches a reply to its request and copies the payload for the promise API', async () => {
    const [client, server] = pair();
    echoServer(server);
    const reply = await client.request(Command.REGION_READ, Buffer.from('hello'));
    expect(reply.payload.toString()).toBe('hello');
    expect(reply.fds).toEqual([]);
  });

  it('rejects with the errno of an error reply', async () => {
    const [client, server] = pair();
    server.onRequest = (msg, c) => c.replyError(msg, Errno.ENOENT);
    const err = await client.request(Command.DMA_UNMAP, Buffer.alloc(24)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(VfioUserError);
    expect((err as VfioUserError).errno).toBe(Errno.ENOENT);
    expect((err as VfioUserError).command).toBe(Command.DMA_UNMAP);
  });

  it('treats an error reply with error 0 as EINVAL', async () => {
    const [conn, raw] = rawPair({ firstMsgId: 5 });
    const p = conn.request(Command.DEVICE_GET_INFO, Buffer.alloc(16));
    await readRaw(raw, 32);
    sendRaw(raw, header(5, Command.DEVICE_GET_INFO, 16, HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, 0));
    await expect(p).rejects.toMatchObject({ errno: Errno.EINVAL });
  });

  it('answers 10,000 pipelined requests in order, and keeps msg_ids unique while outstanding', async () => {
    const [client, server] = pair();
    const seenIds = new Set<number>();
    server.onRequest = (msg, c) => {
      seenIds.add(msg.msgId);
      c.reply(msg, Buffer.from(msg.payload));
    };
    const n = 10_000;
    const replies = await Promise.all(
      Array.from({ length: n }, (_, i) => {
        const b = Buffer.alloc(4);
        b.writeUInt32LE(i);
        return client.request(Command.REGION_READ, b);
      }),
    );
    replies.forEach((r, i) => expect(r.payload.readUInt32LE(0)).toBe(i));
    expect(seenIds.size).toBe(n);
    expect(client.inFlight).toBe(0);
  });

  it('serves the peer\'s commands while its own requests are in flight (both directions)', async () => {
    const [a, b] = pair();
    // b answers a's request only after a has answered b's request: a must not stall.
    a.onRequest = (msg, c) => c.reply(msg, Buffer.from('from-a'));
    b.onRequest = (msg, c) => {
      const kept = msg.detach();
      void c.request(Command.DMA_READ, Buffer.alloc(16)).then((r) => {
        c.reply(kept, Buffer.concat([Buffer.from('b-got-'), r.payload]));
      });
    };
    const reply = await a.request(Command.REGION_READ, Buffer.alloc(16));
    expect(reply.payload.toString()).toBe('b-got-from-a');
  });

  it('sends a message with several body parts as one message', async () => {
    const [client, server] = pair();
    echoServer(server);
    const reply = await client.request(Command.REGION_WRITE, [Buffer.from('ab'), Buffer.from('cd'), Buffer.from('ef')]);
    expect(reply.payload.toString()).toBe('abcdef');
  });

  it('posted (No_reply) commands run in order and get no reply, even on error', async () => {
    const [conn, raw] = rawPair();
    const [client, server] = pair();
    const order: number[] = [];
    server.onRequest = (msg, c) => {
      order.push(msg.payload.readUInt8(0));
      if (msg.noReply) c.replyError(msg, Errno.EINVAL);
      else c.reply(msg);
    };
    client.post(Command.REGION_WRITE, Buffer.from([1]));
    client.post(Command.REGION_WRITE, Buffer.from([2]));
    await client.request(Command.REGION_WRITE, Buffer.from([3]));
    expect(order).toEqual([1, 2, 3]);

    conn.post(Command.REGION_WRITE, Buffer.from([9]));
    const bytes = await readRaw(raw, 17);
    expect(bytes.readUInt32LE(8)).toBe(HeaderFlags.NO_REPLY);
  });
});

describe('Connection: failures', () => {
  it('times out a request that gets no reply, and drops the late reply quietly', async () => {
    const [conn, raw] = rawPair({ requestTimeoutMs: 50 });
    const started = Date.now();
    const err = await conn.request(Command.DEVICE_RESET).catch((e: unknown) => e);
    expect((err as VfioUserError).errno).toBe(Errno.ETIMEDOUT);
    expect(Date.now() - started).toBeGreaterThanOrEqual(45);
    const req = await readRaw(raw, 16);
    sendRaw(raw, header(req.readUInt16LE(0), Command.DEVICE_RESET, 16, HeaderFlags.TYPE_REPLY));
    await tick(20);
    expect(conn.state).toBe('open');
  });

  it('keeps the msg_ids of timed-out requests reserved while the request table grows', async () => {
    const [conn, raw] = rawPair({ requestTimeoutMs: 50 });
    const timedOut = await Promise.all([1, 2, 3].map(() => conn.request(Command.DEVICE_RESET).catch((e: unknown) => e)));
    expect(timedOut.map((e) => (e as VfioUserError).errno)).toEqual([Errno.ETIMEDOUT, Errno.ETIMEDOUT, Errno.ETIMEDOUT]);
    const old = await readRaw(raw, 48);
    const oldIds = [0, 16, 32].map((at) => old.readUInt16LE(at));
    // 100 more in flight: the table grows from 16 slots to 256 with the expired ones in it.
    const pending = Array.from({ length: 100 }, () => conn.request(Command.REGION_READ, null, { timeoutMs: 60_000 }));
    const sent = await readRaw(raw, 100 * 16);
    const ids = Array.from({ length: 100 }, (_, i) => sent.readUInt16LE(i * 16));
    expect(new Set([...ids, ...oldIds]).size).toBe(103);
    // Late replies to the timed-out ones are dropped quietly; the rest are matched.
    for (const id of oldIds) sendRaw(raw, header(id, Command.DEVICE_RESET, 16, HeaderFlags.TYPE_REPLY));
    for (const id of ids.reverse()) sendRaw(raw, header(id, Command.REGION_READ, 16, HeaderFlags.TYPE_REPLY));
    expect(await Promise.all(pending)).toHaveLength(100);
    expect(conn.state).toBe('open');
    expect(conn.inFlight).toBe(0);
  });

  it('closes a connection whose peer starts a message and stops (messageTimeoutMs)', async () => {
    const [conn, raw] = rawPair({ messageTimeoutMs: 100 });
    conn.onRequest = (msg, c) => c.reply(msg);
    const closed = new Promise<Error | null>((r) => conn.once('close', r));
    // Whole messages, however far apart, are no stall.
    sendRaw(raw, header(1, Command.DEVICE_GET_INFO, 16));
    await tick(250);
    expect(conn.state).toBe('open');
    sendRaw(raw, header(2, Command.DEVICE_GET_INFO, 32).subarray(0, 8));
    expect(await closed).toMatchObject({ errno: Errno.ETIMEDOUT });
  });

  it('fails every pending request when the peer closes, including mid-message', async () => {
    const [conn, raw] = rawPair();
    const p1 = conn.request(Command.REGION_READ, Buffer.alloc(16));
    const p2 = conn.request(Command.REGION_READ, Buffer.alloc(16));
    await readRaw(raw, 64);
    // Half a reply, then hang up.
    sendRaw(raw, header(0, Command.REGION_READ, 36, HeaderFlags.TYPE_REPLY).subarray(0, 10));
    rawFds.pop()!.close();
    const closed = new Promise<Error | null>((r) => conn.once('close', r));
    await expect(p1).rejects.toMatchObject({ errno: Errno.ECONNRESET });
    await expect(p2).rejects.toMatchObject({ errno: Errno.ECONNRESET });
    expect((await closed)?.message).toMatch(/mid-message/);
    await expect(conn.request(Command.REGION_READ)).rejects.toMatchObject({ errno: Errno.ECONNRESET });
  });

  it('closes the connection on a reply to no outstanding request', async () => {
    const [conn, raw] = rawPair();
    const closed = new Promise<Error | null>((r) => conn.once('close', r));
    sendRaw(raw, header(77, Command.REGION_READ, 16, HeaderFlags.TYPE_REPLY));
    const err = await closed;
    expect(err).toMatchObject({ errno: Errno.EPROTO });
  });

  it('closes the connection on a message size below the header size', async () => {
    const [conn, raw] = rawPair();
    const closed = new Promise<Error | null>((r) => conn.once('close', r));
    sendRaw(raw, header(1, Command.REGION_READ, 8));
    expect(await closed).toMatchObject({ errno: Errno.EPROTO });
  });

  it('closes the connection on an unknown message type', async () => {
    const [conn, raw] = rawPair();
    const closed = new Promise<Error | null>((r) => conn.once('close', r));
    sendRaw(raw, header(1, Command.REGION_READ, 16, 0x2));
    expect(await closed).toMatchObject({ errno: Errno.EPROTO });
  });

  it('answers an oversized command with EINVAL without buffering it, closes its fds, and goes on', async () => {
    const [conn, raw] = rawPair({ maxMessageSize: 4096 });
    let handled = 0;
    echoServer(conn);
    conn.onRequest = (msg, c) => {
      handled++;
      c.reply(msg);
    };
    const [e1] = [binding.eventfd(0, 0)];
    const big = Buffer.concat([header(3, Command.REGION_WRITE, 16 + 100_000), Buffer.alloc(100_000)]);
    let sent = 0;
    let first = true;
    while (sent < big.length) {
      const n = binding.sendmsg(raw, [big.subarray(sent)], first ? [e1] : null);
      if (n > 0) {
        sent += n;
        first = false;
      }
      await tick(1);
    }
    binding.eventfdSignal(e1);
    new Fd(e1).close();
    sendRaw(raw, header(4, Command.DEVICE_RESET, 16));
    const replies = await readRaw(raw, 32);
    expect(replies.readUInt16LE(0)).toBe(3);
    expect(replies.readUInt32LE(8)).toBe(HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR);
    expect(replies.readUInt32LE(12)).toBe(Errno.EINVAL);
    expect(replies.readUInt16LE(16)).toBe(4);
    expect(handled).toBe(1);
    // useFdLeakCheck verifies the received copy of the eventfd was closed.
  });

  it('answers a command with more fds than allowed with EINVAL and closes them all', async () => {
    const [conn, raw] = rawPair({ maxRecvFds: 1 });
    conn.onRequest = () => {
      throw new Error('must not be dispatched');
    };
    const fds = [binding.eventfd(0, 0), binding.eventfd(0, 0)];
    sendRaw(raw, Buffer.concat([header(1, Command.DEVICE_SET_IRQS, 36), Buffer.alloc(20)]), fds);
    const reply = await readRaw(raw, 16);
    expect(reply.readUInt32LE(12)).toBe(Errno.EINVAL);
    Fd.closeAll(fds);
  });

  it('closes fds a handler did not take, and hands over those it took', async () => {
    const [client, server] = pair({ maxSendFds: 4 });
    let taken: Fd | null = null;
    let fdsSeen = 0;
    server.onRequest = (msg, c) => {
      fdsSeen = msg.fdCount;
      taken = msg.takeFd(1);
      c.reply(msg);
    };
    const fds = [binding.eventfd(0, 0), binding.eventfd(0, 0), binding.eventfd(0, 0)];
    await client.request(Command.DEVICE_SET_IRQS, Buffer.alloc(20), { fds });
    expect(fdsSeen).toBe(3);
    expect(taken).not.toBeNull();
    const takenFd = taken!.value;
    expect(isOpen(takenFd)).toBe(true);
    // The taken fd is the second eventfd: signalling it is seen through the original.
    binding.eventfdSignal(takenFd);
    expect(binding.eventfdDrain(fds[1]!)).toBe(1);
    taken!.close();
    Fd.closeAll(fds);
  });

  it('a handler that throws gets the peer an EINVAL reply and the connection keeps serving', async () => {
    const [client, server] = pair();
    let calls = 0;
    server.onRequest = (msg, c) => {
      if (calls++ === 0) throw new Error('device bug');
      c.reply(msg, Buffer.from('ok'));
    };
    const errors: unknown[] = [];
    server.on('handlerError', (e) => errors.push(e));
    await expect(client.request(Command.REGION_READ)).rejects.toMatchObject({ errno: Errno.EINVAL });
    expect((await client.request(Command.REGION_READ)).payload.toString()).toBe('ok');
    expect(errors).toHaveLength(1);
  });

  it('a connection with no handler answers commands with ENOSYS', async () => {
    const [client] = pair();
    await expect(client.request(Command.DMA_READ, Buffer.alloc(16))).rejects.toMatchObject({ errno: Errno.ENOSYS });
  });

  it('refuses to send more fds than the peer accepts', () => {
    const [client] = pair({ maxSendFds: 1 });
    const fds = [binding.eventfd(0, 0), binding.eventfd(0, 0)];
    try {
      expect(() => client.send(Command.DEVICE_SET_IRQS, Buffer.alloc(20), fds, () => {})).toThrow(RangeError);
    } finally {
      Fd.closeAll(fds);
    }
  });
});

describe('Connection: framing over a real socket', () => {
  it('frames a command that arrives one byte per sendmsg, with its fd on the first byte', async () => {
    const [conn, raw] = rawPair();
    let got: { payload: string; fd: boolean } | null = null;
    conn.onRequest = (msg: IncomingMessage, c) => {
      got = { payload: msg.payload.toString(), fd: msg.fdCount === 1 };
      c.reply(msg);
    };
    const efd = binding.eventfd(0, 0);
    const msg = Buffer.concat([header(9, Command.DMA_MAP, 16 + 32), Buffer.alloc(32, 0x61)]);
    for (let i = 0; i < msg.length; i++) {
      sendRaw(raw, msg.subarray(i, i + 1), i === 0 ? [efd] : null);
      if (i % 7 === 0) await tick(1);
    }
    new Fd(efd).close();
    await readRaw(raw, 16);
    expect(got).toEqual({ payload: 'a'.repeat(32), fd: true });
  });

  it('queues when the socket is full, reports backpressure, and delivers everything in order', async () => {
    const [conn, raw] = rawPair({ highWaterMark: 64 * 1024 });
    const chunk = Buffer.alloc(60_000);
    const total = 40;
    for (let i = 0; i < total; i++) {
      chunk.writeUInt32LE(i, 0);
      conn.post(Command.REGION_WRITE, chunk);
    }
    expect(conn.writableNeedDrain).toBe(true);
    const drained = new Promise<void>((r) => conn.once('drain', () => r()));
    // Read it all back and check every message arrived whole and in order.
    const buf = Buffer.alloc(4 << 20);
    const fdsOut = new Int32Array(4);
    let have = 0;
    const want = total * (16 + chunk.length);
    for (let spins = 0; have < want && spins < 5000; spins++) {
      const n = binding.recvmsg(raw, buf, have, buf.length - have, fdsOut);
      if (n > 0) have += n;
      else await tick(1);
    }
    await drained;
    expect(have).toBe(want);
    for (let i = 0; i < total; i++) {
      const at = i * (16 + chunk.length);
      expect(buf.readUInt32LE(at + 4)).toBe(16 + chunk.length);
      expect(buf.readUInt32LE(at + 16)).toBe(i);
    }
    expect(conn.writableNeedDrain).toBe(false);
  });
});

describe('busy polling', () => {
  it('takes 0..10000 microseconds, as an option or later; anything else is a RangeError', async () => {
    // A refused option leaves the socket to the caller, who closes it.
    const [x, y] = binding.socketpair();
    expect(() => new Connection(new Fd(x), { busyPollUs: -1 })).toThrow(RangeError);
    new Fd(x).close();
    new Fd(y).close();
    const [a, b] = pair({ busyPollUs: 200 });
    expect(a.busyPollUs).toBe(200);
    expect(() => (a.busyPollUs = 10001)).toThrow(RangeError);
    expect(() => (a.busyPollUs = 1.5)).toThrow(RangeError);
    a.busyPollUs = 0;
    expect(a.busyPollUs).toBe(0);
    // Requests and replies still flow with busy polling on (both ends in this process).
    b.busyPollUs = 50;
    echoServer(b);
    const reply = await a.request(Command.REGION_READ, Buffer.from('ping'));
    expect(reply.payload.toString()).toBe('ping');
  });
});
