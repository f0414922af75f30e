/**
 * Shared pieces of the server tests: a per-test server/client setup with teardown, hand-built
 * request payloads (little-endian fields written one by one, never through lib/protocol encoders,
 * so the tests check the wire layout themselves), a raw socket for framing-level abuse, and small
 * waiting helpers.
 */
import * as fs from 'node:fs';
import { afterEach, expect } from 'vitest';
import { binding, WOULD_BLOCK } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { Mapping } from '../../lib/native/mapping';
import { createMemfd } from '../../lib/native/memfd';
import { DmaError } from '../../lib/server/dma';
import type { Connection } from '../../lib/transport/connection';
import type { VfioUserDevice } from '../../lib/server/device';
import type { ServerOptions, VfioUserServer } from '../../lib/server/server';
import { rawClient, startServer, TestDevice, type RawClient } from '../helpers/server';

// ---- setup and teardown ----

let cleanups: (() => unknown)[] = [];

/**
 * Registers the teardown of everything {@link setup} and {@link defer} created. Call it after
 * useFdLeakCheck(), so the leak check runs after the teardown (after-hooks run in reverse order).
 */
export function useTeardown(): void {
  afterEach(async () => {
    const list = cleanups.reverse();
    cleanups = [];
    for (const c of list) await c();
  });
}

/** Run `fn` at teardown (last deferred runs first). */
export function defer(fn: () => unknown): void {
  cleanups.push(fn);
}

export interface Setup<D extends VfioUserDevice> {
  server: VfioUserServer;
  socketPath: string;
  device: D;
  client: RawClient;
}

/** A server for `device` and a raw client that negotiated like QEMU (unless `negotiate` is false). */
export async function setup(device?: undefined, options?: ServerOptions, negotiate?: boolean): Promise<Setup<TestDevice>>;
export async function setup<D extends VfioUserDevice>(device: D, options?: ServerOptions, negotiate?: boolean): Promise<Setup<D>>;
export async function setup<D extends VfioUserDevice>(device?: D, options: ServerOptions = {}, negotiate = true): Promise<Setup<D>> {
  const s = await startServer(device ?? new TestDevice(), options);
  defer(s.stop);
  const client = await rawClient(s.socketPath, negotiate);
  defer(() => client.close());
  return { server: s.server, socketPath: s.socketPath, device: s.device as D, client };
}

interface Served<D> {
  server: VfioUserServer;
  socketPath: string;
  device: D;
}

/** A server for `device` with no client yet. */
export async function serve(device?: undefined, options?: ServerOptions): Promise<Served<TestDevice>>;
export async function serve<D extends VfioUserDevice>(device: D, options?: ServerOptions): Promise<Served<D>>;
export async function serve<D extends VfioUserDevice>(device?: D, options: ServerOptions = {}): Promise<Served<D>> {
  const s = await startServer(device ?? new TestDevice(), options);
  defer(s.stop);
  return { server: s.server, socketPath: s.socketPath, device: s.device as D };
}

/** Another raw client on `socketPath`, closed at teardown. */
export async function connect(socketPath: string, negotiate = true): Promise<RawClient> {
  const client = await rawClient(socketPath, negotiate);
  defer(() => client.close());
  return client;
}

// ---- waiting ----

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Retry `check` until it stops throwing (or `timeoutMs` passes, then throw its last error). */
export async function eventually(check: () => unknown, timeoutMs = 2000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    try {
      await check();
      return;
    } catch (err) {
      if (Date.now() > until) throw err;
      await sleep(5);
    }
  }
}

/** Resolves when `conn` is closed (at once if it already is). */
export function closed(conn: Connection): Promise<Error | null> {
  if (conn.state === 'closed') return Promise.resolve(null);
  return new Promise((resolve) => conn.once('close', (err: Error | null) => resolve(err)));
}

/** A promise with a flag saying whether it settled yet. */
export function tracked<T>(p: Promise<T>): { promise: Promise<T>; done: () => boolean } {
  let settled = false;
  const promise = p.finally(() => {
    settled = true;
  });
  return { promise, done: () => settled };
}

/** Lines of /proc/self/maps that map the memfd called `name` (a munmap makes them go away). */
export function mappingsOf(name: string): number {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => l.endsWith(`/memfd:${name} (deleted)`) || l.endsWith(`/memfd:${name}`)).length;
}

// ---- hand-built payloads (reference §3; offsets are payload offsets) ----

export function u32s(...values: number[]): Buffer {
  const b = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => b.writeUInt32LE(v >>> 0, i * 4));
  return b;
}

export function u64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
}

/** VERSION: major, minor, then `json` + NUL (no data at all when `json` is null). */
export function versionPayload(major: number, minor: number, json: string | null, nul = true): Buffer {
  const head = Buffer.alloc(4);
  head.writeUInt16LE(major, 0);
  head.writeUInt16LE(minor, 2);
  if (json === null) return head;
  return Buffer.concat([head, Buffer.from(json, 'utf8'), nul ? Buffer.from([0]) : Buffer.alloc(0)]);
}

/** DMA_MAP: argsz, flags, offset, address, size (32 bytes). */
export function dmaMap(flags: number, address: bigint | number, size: bigint | number, offset: bigint | number = 0, argsz = 32): Buffer {
  return Buffer.concat([u32s(argsz, flags), u64(offset), u64(address), u64(size)]);
}

/** DMA_UNMAP: argsz, flags, address, size (24 bytes). */
export function dmaUnmap(flags: number, address: bigint | number, size: bigint | number, argsz = 24): Buffer {
  return Buffer.concat([u32s(argsz, flags), u64(address), u64(size)]);
}

/** DEVICE_GET_INFO request: argsz, flags, num_regions, num_irqs. */
export function deviceInfo(argsz = 16): Buffer {
  return u32s(argsz, 0, 0, 0);
}

/** DEVICE_GET_REGION_INFO request: argsz, flags, index, cap_offset, size, offset. */
export function regionInfo(index: number, argsz = 32): Buffer {
  return Buffer.concat([u32s(argsz, 0, index, 0), u64(0), u64(0)]);
}

/** DEVICE_GET_IRQ_INFO request: argsz, flags, index, count. */
export function irqInfo(index: number, argsz = 16): Buffer {
  return u32s(argsz, 0, index, 0);
}

/** DEVICE_SET_IRQS: argsz (default: the real size), flags, index, start, count, BOOL data. */
export function setIrqs(flags: number, index: number, start: number, count: number, data?: number[], argsz?: number): Buffer {
  const bytes = Buffer.from(data ?? []);
  return Buffer.concat([u32s(argsz ?? 20 + bytes.length, flags, index, start, count), bytes]);
}

/** DEVICE_FEATURE: argsz, flags, data. */
export function feature(argsz: number, flags: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  return Buffer.concat([u32s(argsz, flags), data]);
}

/** REGION_WRITE_MULTI: wr_cnt, then per write offset(8) region(4) count(4) data(8). */
export function writeMulti(writes: { offset: number; region: number; data: number[]; count?: number }[], wrCnt = writes.length): Buffer {
  const parts = [u64(wrCnt)];
  for (const w of writes) {
    const data = Buffer.alloc(8);
    Buffer.from(w.data).copy(data);
    parts.push(u64(w.offset), u32s(w.region, w.count ?? w.data.length), data);
  }
  return Buffer.concat(parts);
}

/** A whole message: header (msg_id, command, msg_size, flags, error) + payload. */
export function message(msgId: number, command: number, payload: Uint8Array = Buffer.alloc(0), flags = 0, size?: number): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt16LE(msgId, 0);
  h.writeUInt16LE(command, 2);
  h.writeUInt32LE(size ?? 16 + payload.length, 4);
  h.writeUInt32LE(flags, 8);
  h.writeUInt32LE(0, 12);
  return Buffer.concat([h, payload]);
}

// ---- a raw socket, for bytes the Connection class would never send ----

export interface RawMessage {
  msgId: number;
  command: number;
  size: number;
  flags: number;
  error: number;
  payload: Buffer;
}

/** A connected unix socket driven with the addon's sendmsg/recvmsg directly. */
export class RawSocket {
  private readonly fd: Fd;
  private readonly poller: InstanceType<typeof binding.Poller>;
  private buf = Buffer.alloc(0);
  private eof = false;
  private wake: (() => void) | null = null;
  /** Fds received (the server never sends any here except region-info fds); closed by close(). */
  readonly fds: number[] = [];

  constructor(socketPath: string) {
    this.fd = new Fd(binding.unixConnect(socketPath));
    this.poller = new binding.Poller(this.fd.value, () => this.readAll());
    this.poller.start(binding.pollEvents.READABLE | binding.pollEvents.DISCONNECT);
    defer(() => this.close());
  }

  /** One sendmsg of `bytes` with `fds`; the whole message must go (it is small). */
  send(bytes: Uint8Array, fds: number[] | null = null): void {
    const n = binding.sendmsg(this.fd.value, [bytes], fds);
    expect(n).toBe(bytes.length);
  }

  /** Send `bytes` however many sendmsg calls it takes (for messages larger than the socket buffer). */
  async sendAll(bytes: Uint8Array): Promise<void> {
    let sent = 0;
    while (sent < bytes.length) {
      const n = binding.sendmsg(this.fd.value, [bytes.subarray(sent)]);
      if (n === WOULD_BLOCK) await sleep(1);
      else sent += n;
    }
  }

  /** The next whole message, or null at end of stream; rejects after `timeoutMs`. */
  async next(timeoutMs = 2000): Promise<RawMessage | null> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      if (this.buf.length >= 16) {
        const size = this.buf.readUInt32LE(4);
        if (size >= 16 && this.buf.length >= size) {
          const m = this.buf.subarray(0, size);
          this.buf = this.buf.subarray(size);
          return {
            msgId: m.readUInt16LE(0),
            command: m.readUInt16LE(2),
            size,
            flags: m.readUInt32LE(8),
            error: m.readUInt32LE(12),
            payload: Buffer.from(m.subarray(16)),
          };
        }
      }
      if (this.eof) return null;
      const left = until - Date.now();
      if (left <= 0) throw new Error('no message within the timeout');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = null;
    }
  }

  /** Nothing arrives within `ms` (and the stream is still open). */
  async expectSilence(ms = 50): Promise<void> {
    await sleep(ms);
    expect(this.buf.length).toBe(0);
    expect(this.eof).toBe(false);
  }

  /** Resolves once the server closed its end (EOF), with whatever bytes were still unread. */
  async expectClosed(timeoutMs = 2000): Promise<void> {
    for (;;) {
      const m = await this.next(timeoutMs);
      if (m === null) return;
    }
  }

  get isClosedByPeer(): boolean {
    return this.eof;
  }

  close(): void {
    if (this.fd.closed) return;
    this.poller.close();
    this.fd.close();
    Fd.closeAll(this.fds.splice(0));
  }

  private readAll(): void {
    const chunk = Buffer.alloc(64 * 1024);
    const fdsOut = new Int32Array(32);
    for (;;) {
      let n: number;
      try {
        n = binding.recvmsg(this.fd.value, chunk, 0, chunk.length, fdsOut);
      } catch {
        n = 0;
      }
      for (let i = 1; i <= fdsOut[0]!; i++) this.fds.push(fdsOut[i]!);
      fdsOut[0] = 0;
      if (n === WOULD_BLOCK) break;
      if (n === 0) {
        this.eof = true;
        this.poller.stop();
        break;
      }
      this.buf = Buffer.concat([this.buf, chunk.subarray(0, n)]);
    }
    this.wake?.();
  }
}

/** A raw socket that already did a VERSION exchange (QEMU's 0.0 proposal, msg_id 0). */
export async function negotiatedRawSocket(socketPath: string): Promise<RawSocket> {
  const s = new RawSocket(socketPath);
  s.send(message(0, 1, versionPayload(0, 0, '{"capabilities":{"max_msg_fds":16}}')));
  const reply = await s.next();
  expect(reply?.flags).toBe(1);
  return s;
}

// ---- guest memory and DMA errors ----

/** A memfd of `size` bytes, mapped on the client's side too; both closed at teardown. */
export function guestMemory(name: string, size: number): { fd: Fd; bytes: Buffer } {
  const fd = createMemfd(name, size);
  const mapping = Mapping.map(fd, 0, size);
  defer(() => {
    mapping.unmapNow();
    fd.close();
  });
  return { fd, bytes: mapping.bytes };
}

/** The errno of the DmaError `fn` throws (or rejects with); fails if it does not. */
export async function dmaErrno(fn: () => unknown): Promise<number> {
  try {
    await fn();
  } catch (err) {
    expect(err).toBeInstanceOf(DmaError);
    return (err as DmaError).errno;
  }
  throw new Error('expected a DmaError');
}
