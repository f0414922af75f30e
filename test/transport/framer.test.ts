import { describe, it, expect } from 'vitest';
import { emptyFramedMessage, Framer, FramingError } from '../../lib/transport/framer';

/** A message with a valid header and a recognisable payload. */
function message(msgId: number, command: number, payloadLength: number, flags = 0): Buffer {
  const buf = Buffer.alloc(16 + payloadLength);
  buf.writeUInt16LE(msgId, 0);
  buf.writeUInt16LE(command, 2);
  buf.writeUInt32LE(16 + payloadLength, 4);
  buf.writeUInt32LE(flags, 8);
  for (let i = 0; i < payloadLength; i++) buf[16 + i] = (msgId * 7 + i) & 0xff;
  return buf;
}

interface Seen {
  msgId: number;
  command: number;
  payload: Buffer;
  fds: number[] | null;
  oversized: boolean;
}

function drain(framer: Framer): Seen[] {
  const out: Seen[] = [];
  const m = emptyFramedMessage();
  while (framer.next(m)) {
    out.push({
      msgId: m.msgId,
      command: m.command,
      payload: Buffer.from(m.data.subarray(m.payloadOffset, m.payloadOffset + m.payloadLength)),
      fds: m.fds,
      oversized: m.oversized,
    });
  }
  return out;
}

describe('Framer', () => {
  it('rejects a header whose size is below 16 (stream corrupt)', () => {
    const framer = new Framer(4096);
    const bad = message(1, 9, 0);
    bad.writeUInt32LE(15, 4);
    framer.push(bad);
    expect(() => framer.next(emptyFramedMessage())).toThrow(FramingError);
  });

  it('frames a message split at every byte boundary, with its fds attached to the first piece', () => {
    const msgs = [message(1, 2, 32), message(2, 9, 16), message(3, 10, 1000)];
    const stream = Buffer.concat(msgs);
    for (let cut = 1; cut < stream.length; cut++) {
      const framer = new Framer(1 << 20);
      framer.push(stream.subarray(0, cut), cut <= 16 ? [100] : null);
      const first = drain(framer);
      framer.push(stream.subarray(cut));
      const seen = [...first, ...drain(framer)];
      expect(seen.map((s) => s.msgId)).toEqual([1, 2, 3]);
      seen.forEach((s, i) => expect(s.payload.equals(msgs[i]!.subarray(16))).toBe(true));
      // The fds came with bytes in which message 1 began.
      expect(seen[0]!.fds).toEqual(cut <= 16 ? [100] : null);
      expect(framer.strayFds).toEqual([]);
    }
  });

  it('frames many messages that arrive in one read', () => {
    const framer = new Framer(1 << 20);
    const msgs = Array.from({ length: 500 }, (_, i) => message(i, 9, i % 40));
    framer.push(Buffer.concat(msgs));
    const seen = drain(framer);
    expect(seen).toHaveLength(500);
    seen.forEach((s, i) => {
      expect(s.msgId).toBe(i);
      expect(s.payload.equals(msgs[i]!.subarray(16))).toBe(true);
    });
  });

  it('gives the fds of one read to the last message that begins in it', () => {
    const framer = new Framer(1 << 20);
    const a = message(1, 9, 8);
    const b = message(2, 2, 32);
    const c = message(3, 2, 32);
    // One read holds all of a and the start of b; the fds are b's (the sender sent b with fds).
    const ab = Buffer.concat([a, b]);
    framer.push(ab.subarray(0, a.length + 5), [7, 8]);
    framer.push(Buffer.concat([ab.subarray(a.length + 5), c]), [9]);
    const seen = drain(framer);
    expect(seen.map((s) => s.fds)).toEqual([null, [7, 8], [9]]);
  });

  it('hands out fds that arrive with the middle of a message as stray', () => {
    const framer = new Framer(1 << 20);
    const m = message(1, 10, 64);
    framer.push(m.subarray(0, 20));
    framer.push(m.subarray(20, 40), [42]);
    framer.push(m.subarray(40));
    expect(drain(framer).map((s) => s.fds)).toEqual([null]);
    expect(framer.strayFds).toEqual([42]);
  });

  it('reports an oversized message by its header and skips its payload as it arrives', () => {
    const framer = new Framer(1024);
    const big = message(5, 10, 5000);
    const after = message(6, 9, 4);
    const stream = Buffer.concat([big, after]);
    const seen: Seen[] = [];
    for (let at = 0; at < stream.length; at += 333) {
      framer.push(stream.subarray(at, at + 333), at === 0 ? [3] : null);
      seen.push(...drain(framer));
    }
    expect(seen.map((s) => [s.msgId, s.oversized, s.payload.length])).toEqual([
      [5, true, 0],
      [6, false, 4],
    ]);
    expect(seen[0]!.fds).toEqual([3]);
    // The framer never buffered the oversized payload.
    expect(framer.buffer.length).toBeLessThanOrEqual(64 * 1024);
  });

  it('grows for a large message and keeps the bytes intact across compaction', () => {
    const framer = new Framer(2 << 20);
    const msgs = [message(1, 9, 10), message(2, 10, (1 << 20) + 7), message(3, 9, 3)];
    const stream = Buffer.concat(msgs);
    const seen: Seen[] = [];
    for (let at = 0; at < stream.length; at += 70_000) {
      framer.push(stream.subarray(at, at + 70_000));
      seen.push(...drain(framer));
    }
    expect(seen.map((s) => s.msgId)).toEqual([1, 2, 3]);
    seen.forEach((s, i) => expect(s.payload.equals(msgs[i]!.subarray(16))).toBe(true));
  });

  it('owns no buffer until bytes arrive, a few KiB for small messages, and grows once for bulk', () => {
    const framer = new Framer(1 << 20);
    expect(framer.buffer.length).toBe(0);
    // Room is made in a scratch buffer shared by every framer; nothing arrived, nothing is kept.
    framer.prepare();
    const scratch = framer.buffer;
    expect(scratch.length).toBeGreaterThan(0);
    expect(new Framer(1 << 20).buffer.length).toBe(0);
    framer.push(message(1, 1, 200));
    expect(framer.buffer).not.toBe(scratch);
    expect(framer.buffer.length).toBeLessThanOrEqual(4096);
    expect(drain(framer).map((s) => s.msgId)).toEqual([1]);
    // Reads that fill the room: the buffer grows once, then stays (no allocation per message).
    const bulk = Buffer.concat(Array.from({ length: 400 }, (_, i) => message(i, 2, 64)));
    framer.push(bulk);
    expect(drain(framer)).toHaveLength(400);
    const grown = framer.buffer;
    expect(grown.length).toBe(64 * 1024);
    framer.push(bulk);
    expect(drain(framer)).toHaveLength(400);
    expect(framer.buffer).toBe(grown);
  });

  it('counts framed messages and says whether one is partly received', () => {
    const framer = new Framer(1024);
    const m = message(1, 2, 40);
    framer.push(m.subarray(0, 10));
    expect([framer.partial, framer.framed]).toEqual([true, 0]);
    framer.push(m.subarray(10));
    expect(drain(framer)).toHaveLength(1);
    expect([framer.partial, framer.framed]).toEqual([false, 1]);
    // An oversized message counts at its header and stays partial until its payload is skipped.
    const big = message(2, 2, 2000);
    framer.push(big.subarray(0, 100));
    expect(drain(framer)).toHaveLength(1);
    expect([framer.partial, framer.framed]).toEqual([true, 2]);
    framer.push(big.subarray(100));
    expect(drain(framer)).toHaveLength(0);
    expect(framer.partial).toBe(false);
  });

  it('drainFds returns fds of messages never completed', () => {
    const framer = new Framer(1 << 20);
    framer.push(message(1, 2, 32).subarray(0, 20), [11, 12]);
    expect(drain(framer)).toEqual([]);
    expect(framer.drainFds()).toEqual([11, 12]);
  });
});
