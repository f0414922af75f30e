/**
 * Client test fixtures: a hand-rolled fake server speaking raw bytes on a UNIX socket (for
 * misbehaviour: lying sizes, extra fds, unknown ids, silence), a libvfio-user-like responder for
 * it (replaying what peer-traces/ show), and small devices for our own server.
 */
import * as fs from 'node:fs';
import { afterEach } from 'vitest';
import { VfioUserClient, type ClientOptions } from '../../lib/client';
import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { Mapping } from '../../lib/native/mapping';
import { createMemfd } from '../../lib/native/memfd';
import { Command, DeviceFlags, HeaderFlags, RegionInfoFlags } from '../../lib/protocol/constants';
import { encodeRegionInfoReply, type RegionCapability } from '../../lib/protocol/messages/region';
import type { DeviceContext, DeviceRegion, VfioUserDevice } from '../../lib/server/device';
import { tempSocketPath } from '../helpers/server';

/** A message as the fake server received it. */
export interface RawMessage {
  msgId: number;
  command: number;
  flags: number;
  error: number;
  payload: Buffer;
  /** Raw fds that came with it (closed by {@link FakeServer.close} unless taken). */
  fds: number[];
}

export type FakeHandler = (msg: RawMessage, fake: FakeServer) => void;

export function header(msgId: number, command: number, size: number, flags = 0, error = 0): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt16LE(msgId, 0);
  h.writeUInt16LE(command, 2);
  h.writeUInt32LE(size, 4);
  h.writeUInt32LE(flags, 8);
  h.writeUInt32LE(error, 12);
  return h;
}

export const isReply = (m: RawMessage): boolean => (m.flags & HeaderFlags.TYPE_MASK) === HeaderFlags.TYPE_REPLY;

/**
 * A one-client fake vfio-user server on a temporary socket path. Every message the client sends
 * is recorded in `received` and handed to `handler`, which answers with {@link FakeServer.reply}
 * (or not at all). Server-to-client commands go out with {@link FakeServer.command}.
 */
export class FakeServer {
  readonly received: RawMessage[] = [];
  readonly path: string;
  handler: FakeHandler;
  /** Errors thrown by the handler (a test bug); checked by tests that care. */
  readonly errors: unknown[] = [];
  private readonly dir: string;
  private listenFd: Fd | null;
  private readonly listenPoller: InstanceType<typeof binding.Poller>;
  private connFd: Fd | null = null;
  private connPoller: InstanceType<typeof binding.Poller> | null = null;
  private pendingFds: number[] = [];
  private nextId = 1;
  private waiters: { pred: (m: RawMessage) => boolean; resolve: (m: RawMessage) => void }[] = [];
  private clientGone: (() => void)[] = [];
  reading = true;
  disconnected = false;

  constructor(handler: FakeHandler) {
    this.handler = handler;
    const t = tempSocketPath('fake.sock');
    this.dir = t.dir;
    this.path = t.path;
    this.listenFd = new Fd(binding.unixListen(this.path, 4));
    this.listenPoller = new binding.Poller(this.listenFd.value, () => this.accept());
    this.listenPoller.start(binding.pollEvents.READABLE);
  }

  private accept(): void {
    if (this.listenFd === null) return;
    const raw = binding.unixAccept(this.listenFd.value);
    if (raw < 0) return;
    if (this.connFd !== null) {
      new Fd(raw).close();
      return;
    }
    this.connFd = new Fd(raw);
    this.connPoller = new binding.Poller(raw, () => this.readSome());
    this.resume();
  }

  /** Stop reading the socket (its buffer fills up and the client's sends queue). */
  pause(): void {
    this.reading = false;
    this.connPoller?.stop();
  }

  resume(): void {
    this.reading = true;
    this.connPoller?.start(binding.pollEvents.READABLE | binding.pollEvents.DISCONNECT);
    if (this.connFd !== null) setImmediate(() => this.readSome());
  }

  /**
   * Reads like libvfio-user: the 16-byte header alone (the fds of a message come with the recvmsg
   * that returns its first bytes), then exactly the body. So fds are attributed exactly.
   */
  private readSome(): void {
    const fdsOut = new Int32Array(254);
    for (;;) {
      if (this.connFd === null || !this.reading) return;
      const inHeader = this.hdrGot < 16;
      if (!inHeader && this.body.length === this.bodyGot) {
        this.deliver();
        continue;
      }
      const target = inHeader ? this.hdr : this.body;
      const at = inHeader ? this.hdrGot : this.bodyGot;
      let n: number;
      try {
        n = binding.recvmsg(this.connFd.value, target, at, target.length - at, fdsOut);
      } catch {
        this.dropClient();
        return;
      }
      if (n < 0) return;
      if (n === 0) {
        this.dropClient();
        return;
      }
      for (let i = 1; i <= fdsOut[0]!; i++) this.pendingFds.push(fdsOut[i]!);
      fdsOut[0] = 0;
      if (inHeader) {
        this.hdrGot += n;
        if (this.hdrGot === 16) {
          const size = this.hdr.readUInt32LE(4);
          if (size < 16) throw new Error(`fake server: bad msg_size ${size}`);
          this.body = Buffer.alloc(size - 16);
          this.bodyGot = 0;
        }
      } else {
        this.bodyGot += n;
      }
    }
  }

  private hdr = Buffer.alloc(16);
  private hdrGot = 0;
  private body = Buffer.alloc(0);
  private bodyGot = 0;

  private deliver(): void {
    const h = this.hdr;
    const msg: RawMessage = {
      msgId: h.readUInt16LE(0),
      command: h.readUInt16LE(2),
      flags: h.readUInt32LE(8),
      error: h.readUInt32LE(12),
      payload: this.body,
      fds: this.pendingFds,
    };
    this.pendingFds = [];
    this.hdrGot = 0;
    this.body = Buffer.alloc(0);
    this.bodyGot = 0;
    this.received.push(msg);
    for (const w of [...this.waiters]) {
      if (w.pred(msg)) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(msg);
      }
    }
    if (!isReply(msg)) {
      try {
        this.handler(msg, this);
      } catch (err) {
        this.errors.push(err);
      }
    }
  }

  private dropClient(): void {
    this.connPoller?.close();
    this.connPoller = null;
    this.connFd?.close();
    this.connFd = null;
    this.disconnected = true;
    for (const f of this.clientGone.splice(0)) f();
  }

  /** Resolves when the client hangs up. */
  gone(): Promise<void> {
    if (this.disconnected) return Promise.resolve();
    return new Promise((resolve) => this.clientGone.push(resolve));
  }

  /** Resolves with the first message (received from now on, or already) matching `pred`. */
  waitFor(pred: (m: RawMessage) => boolean, includePast = true): Promise<RawMessage> {
    if (includePast) {
      const m = this.received.find(pred);
      if (m !== undefined) return Promise.resolve(m);
    }
    return new Promise((resolve) => this.waiters.push({ pred, resolve }));
  }

  /** Sends raw bytes with one sendmsg (whole, or the test fails). */
  send(bytes: Buffer, fds: number[] | null = null): void {
    if (this.connFd === null) throw new Error('fake server: no client');
    const n = binding.sendmsg(this.connFd.value, [bytes], fds);
    if (n !== bytes.length) throw new Error(`fake server: sent ${n} of ${bytes.length} bytes`);
  }

  /** Answers `msg` (same id and command unless overridden). */
  reply(
    msg: RawMessage,
    payload: Buffer = Buffer.alloc(0),
    opts: { fds?: number[]; error?: number; msgId?: number; command?: number; flags?: number } = {},
  ): void {
    if ((msg.flags & HeaderFlags.NO_REPLY) !== 0 && opts.msgId === undefined) return;
    const flags = opts.flags ?? (HeaderFlags.TYPE_REPLY | (opts.error ? HeaderFlags.ERROR : 0));
    const h = header(opts.msgId ?? msg.msgId, opts.command ?? msg.command, 16 + payload.length, flags, opts.error ?? 0);
    this.send(Buffer.concat([h, payload]), opts.fds ?? null);
  }

  /** Sends a server-to-client command (ids count from 1); resolves with the client's reply. */
  command(command: number, payload: Buffer, fds: number[] | null = null): Promise<RawMessage> {
    const id = this.nextId++;
    const reply = this.waitFor((m) => isReply(m) && m.msgId === id && m.command === command, false);
    this.send(Buffer.concat([header(id, command, 16 + payload.length), payload]), fds);
    return reply;
  }

  /** Hangs up on the client. */
  closeClient(): void {
    this.dropClient();
  }

  close(): void {
    this.listenPoller.close();
    this.listenFd?.close();
    this.listenFd = null;
    this.dropClient();
    for (const m of this.received) Fd.closeAll(m.fds.splice(0));
    Fd.closeAll(this.pendingFds.splice(0));
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// A libvfio-user-like responder (peers.md §3, peer-traces/)

/** libvfio-user's VERSION reply JSON (2026 build; the 2022 one has spaces, see peer-traces). */
export const LVU_VERSION_JSON = '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}';
export const LVU_2022_VERSION_JSON = '{ "capabilities": { "max_msg_fds": 8, "max_data_xfer_size": 1048576, "migration": { "pgsize": 4096 } } }';

export interface FakeRegion {
  flags: number;
  size: number;
  offset?: bigint;
  capabilities?: RegionCapability[];
  /** Fds to attach to the complete reply (fresh ones each time: they are given away). */
  fds?: () => number[];
}

export interface LvuOptions {
  versionJson?: string;
  /** minor = min(client's, this); libvfio-user 2022: 1, since 2023: 2. */
  maxMinor?: number;
  deviceFlags?: number;
  regions?: (FakeRegion | null)[];
  irqCounts?: number[];
  config?: Buffer;
  /** Per-command overrides; return true when the message was handled. */
  overrides?: Partial<Record<number, (msg: RawMessage, fake: FakeServer) => boolean | void>>;
  /**
   * Model real PCI (QEMU's device models over vfio-user, shared/peers.md §5): these BARs answer
   * the config-space sizing probe, COMMAND's IO/MEMORY/MASTER bits are writable, and a BAR
   * access fails with EINVAL unless the BAR holds an address and its decoding is on. Regions
   * default to the BARs (plus config) and `config` to a header with these BARs' type bits.
   */
  hardware?: HardwareBars;
}

/** A BAR of {@link LvuOptions.hardware}: a power-of-two size. */
export interface FakeBar {
  size: number;
  kind?: 'memory' | 'io';
  is64?: boolean;
  prefetchable?: boolean;
}

export interface HardwareBars {
  bars: Partial<Record<number, FakeBar>>;
  /** Every refused BAR access, as `BARn+offset: reason` (filled by the handler). */
  refused?: string[];
}

/** Config space and per-byte write masks for {@link HardwareBars}. */
export function hardwareConfig(hw: HardwareBars): { config: Buffer; wmask: Buffer; regions: (FakeRegion | null)[] } {
  const config = Buffer.alloc(256);
  const wmask = Buffer.alloc(256);
  config.writeUInt16LE(0x1b36, 0);
  config.writeUInt16LE(0x00ff, 2);
  wmask.writeUInt16LE(0x0007, 4); // IO | MEMORY | MASTER
  const regions: (FakeRegion | null)[] = new Array<FakeRegion | null>(9).fill(null);
  regions[7] = { flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE, size: 256 };
  for (const [key, bar] of Object.entries(hw.bars)) {
    if (bar === undefined) continue;
    const i = Number(key);
    const at = 0x10 + 4 * i;
    const mask = BigInt.asUintN(64, ~BigInt(bar.size - 1));
    if (bar.kind === 'io') {
      config.writeUInt32LE(0x1, at);
      wmask.writeUInt32LE(Number(mask & 0xfffffffcn), at);
    } else {
      config.writeUInt32LE((bar.is64 ? 0x4 : 0) | (bar.prefetchable ? 0x8 : 0), at);
      wmask.writeUInt32LE(Number(mask & 0xfffffff0n), at);
      if (bar.is64) wmask.writeUInt32LE(Number(mask >> 32n), at + 4);
    }
    regions[i] = { flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE, size: bar.size };
  }
  return { config, wmask, regions };
}

/** Why BAR `index` of a {@link hardwareConfig} does not decode now, or null if it does. */
function barRefusal(hw: HardwareBars, config: Buffer, index: number): string | null {
  const bar = hw.bars[index];
  if (bar === undefined) return 'no BAR';
  const command = config.readUInt16LE(4);
  if ((command & (bar.kind === 'io' ? 0x1 : 0x2)) === 0) return 'decoding off';
  const lo = config.readUInt32LE(0x10 + 4 * index);
  const address = (BigInt(lo >>> 0) & (bar.kind === 'io' ? 0xfffffffcn : 0xfffffff0n)) | (bar.is64 ? BigInt(config.readUInt32LE(0x14 + 4 * index)) << 32n : 0n);
  return address === 0n ? 'invalid address 0x0' : null;
}

/** Config space of the gpio sample seen in peer-traces: IDs 0x494f/0x0dc8, absent BARs read 1. */
export function lvuConfig(): Buffer {
  const c = Buffer.alloc(256);
  c.writeUInt16LE(0x494f, 0);
  c.writeUInt16LE(0x0dc8, 2);
  for (let i = 0; i < 6; i++) c.writeUInt32LE(0x00000001, 0x10 + 4 * i);
  c[0x3d] = 1;
  return c;
}

/** Region table of the HEAD gpio sample: BAR2 256-byte I/O, config 256 bytes, 9 regions. */
export function lvuRegions(): (FakeRegion | null)[] {
  const r: (FakeRegion | null)[] = new Array<FakeRegion | null>(9).fill(null);
  r[2] = { flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE, size: 0x100 };
  r[7] = { flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE, size: 0x100 };
  return r;
}

/**
 * A handler answering like libvfio-user: VERSION with its JSON and `min(client, maxMinor)`;
 * DEVICE_GET_INFO flags PCI|RESET; region info with the truncated first step (no fd, CAPS off) for
 * chains that do not fit; REGION_READ echo + data (count 0: bare header); REGION_WRITE echo;
 * DMA_MAP bare header; DMA_UNMAP 24-byte echo or ENOENT; SET_IRQS/RESET bare; anything else EINVAL.
 */
export function lvuHandler(options: LvuOptions = {}): FakeHandler {
  const hw = options.hardware;
  const hwConfig = hw && hardwareConfig(hw);
  const regions = options.regions ?? hwConfig?.regions ?? lvuRegions();
  const irqCounts = options.irqCounts ?? [1, 0, 0, 1, 0];
  const config = options.config ?? hwConfig?.config ?? lvuConfig();
  const bars = new Map<number, Buffer>();
  const maps = new Set<string>();
  return (msg, fake) => {
    const override = options.overrides?.[msg.command];
    if (override !== undefined && override(msg, fake) === true) return;
    const p = msg.payload;
    switch (msg.command) {
      case Command.VERSION: {
        const minor = Math.min(p.readUInt16LE(2), options.maxMinor ?? 2);
        const json = Buffer.from(options.versionJson ?? LVU_VERSION_JSON, 'utf8');
        const body = Buffer.alloc(4 + json.length + 1);
        body.writeUInt16LE(0, 0);
        body.writeUInt16LE(minor, 2);
        json.copy(body, 4);
        fake.reply(msg, body);
        return;
      }
      case Command.DEVICE_GET_INFO: {
        const b = Buffer.alloc(16);
        b.writeUInt32LE(16, 0);
        b.writeUInt32LE(options.deviceFlags ?? DeviceFlags.PCI | DeviceFlags.RESET, 4);
        b.writeUInt32LE(regions.length, 8);
        b.writeUInt32LE(irqCounts.length, 12);
        fake.reply(msg, b);
        return;
      }
      case Command.DEVICE_GET_REGION_INFO: {
        const argsz = p.readUInt32LE(0);
        const index = p.readUInt32LE(8);
        if (index >= regions.length) return fake.reply(msg, undefined, { error: 22 });
        const r = regions[index];
        const info = { flags: r?.flags ?? 0, index, size: BigInt(r?.size ?? 0), offset: r?.offset ?? 0n, capabilities: r?.capabilities ?? [] };
        const body = encodeRegionInfoReply(info, argsz);
        const complete = body.readUInt32LE(0) <= argsz && (info.capabilities.length > 0);
        fake.reply(msg, body, { fds: complete && r?.fds ? r.fds() : [] });
        return;
      }
      case Command.DEVICE_GET_IRQ_INFO: {
        const index = p.readUInt32LE(8);
        if (index >= irqCounts.length) return fake.reply(msg, undefined, { error: 22 });
        const b = Buffer.alloc(16);
        b.writeUInt32LE(16, 0);
        b.writeUInt32LE(1, 4);
        b.writeUInt32LE(index, 8);
        b.writeUInt32LE(irqCounts[index]!, 12);
        fake.reply(msg, b);
        return;
      }
      case Command.REGION_READ: {
        const offset = Number(p.readBigUInt64LE(0));
        const region = p.readUInt32LE(8);
        const count = p.readUInt32LE(12);
        const size = regions[region]?.size ?? 0;
        if (offset + count > size) return fake.reply(msg, undefined, { error: 22 });
        if (hw && region < 6) {
          const why = barRefusal(hw, config, region);
          if (why !== null) return (hw.refused?.push(`BAR${region}+${offset}: ${why}`), fake.reply(msg, undefined, { error: 22 }));
        }
        if (count === 0) return fake.reply(msg);
        const src = region === 7 ? config : (bars.get(region) ?? Buffer.alloc(size));
        fake.reply(msg, Buffer.concat([p.subarray(0, 16), src.subarray(offset, offset + count)]));
        return;
      }
      case Command.REGION_WRITE: {
        const offset = Number(p.readBigUInt64LE(0));
        const region = p.readUInt32LE(8);
        const count = p.readUInt32LE(12);
        const size = regions[region]?.size ?? 0;
        if (offset + count > size || p.length !== 16 + count) return fake.reply(msg, undefined, { error: 22 });
        if (hw && region < 6) {
          const why = barRefusal(hw, config, region);
          if (why !== null) return (hw.refused?.push(`BAR${region}+${offset}: ${why}`), fake.reply(msg, undefined, { error: 22 }));
        }
        if (region === 7 && hwConfig) {
          for (let i = 0; i < count; i++) {
            const m = hwConfig.wmask[offset + i]!;
            config[offset + i] = (config[offset + i]! & ~m) | (p[16 + i]! & m);
          }
        }
        if (region !== 7) {
          if (!bars.has(region)) bars.set(region, Buffer.alloc(size));
          p.copy(bars.get(region)!, offset, 16);
        }
        fake.reply(msg, p.subarray(0, 16));
        return;
      }
      case Command.DMA_MAP: {
        maps.add(`${p.readBigUInt64LE(16)}:${p.readBigUInt64LE(24)}`);
        fake.reply(msg);
        return;
      }
      case Command.DMA_UNMAP: {
        const key = `${p.readBigUInt64LE(8)}:${p.readBigUInt64LE(16)}`;
        if (!maps.delete(key)) return fake.reply(msg, undefined, { error: 2 });
        fake.reply(msg, p.subarray(0, 24));
        return;
      }
      case Command.DEVICE_SET_IRQS:
      case Command.DEVICE_RESET:
        fake.reply(msg);
        return;
      default:
        fake.reply(msg, undefined, { error: 22 });
    }
  };
}

// ---------------------------------------------------------------------------------------------
// Devices for our own server

/**
 * A PCI device whose BAR0 (16 KiB) is a memfd: registers in the first 4 KiB are trapped
 * (REGION_READ/WRITE), [0x1000, 0x3000) is offered as a sparse-mmap area. BAR2 is plain memory.
 */
export class MmapDevice implements VfioUserDevice {
  readonly flags = DeviceFlags.PCI | DeviceFlags.RESET;
  readonly config = Buffer.alloc(256);
  readonly memfd: Fd;
  readonly mapping: Mapping;
  readonly bar2 = Buffer.alloc(4096);
  readonly regions: (DeviceRegion | null)[];
  readonly irqs = [{ count: 1 }, { count: 0 }, { count: 4 }, { count: 0 }, { count: 0 }];
  ctx: DeviceContext | null = null;

  constructor() {
    this.memfd = createMemfd('mmap-device-bar0', 16384);
    this.mapping = Mapping.map(this.memfd, 0, 16384);
    this.config.writeUInt16LE(0x1b36, 0);
    this.config.writeUInt16LE(0x0010, 2);
    const bytes = () => this.mapping.bytes;
    this.regions = [
      {
        size: 16384,
        flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
        read: (offset, dst) => {
          bytes().copy(dst, 0, offset, offset + dst.length);
        },
        write: (offset, src) => {
          src.copy(bytes(), offset);
        },
        mmap: { fd: this.memfd, fileOffset: 0, areas: [{ offset: 0x1000, size: 0x2000 }] },
      },
      null,
      {
        size: 4096,
        flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
        read: (offset, dst) => {
          this.bar2.copy(dst, 0, offset, offset + dst.length);
        },
        write: (offset, src) => {
          src.copy(this.bar2, offset);
        },
      },
      null,
      null,
      null,
      null,
      {
        size: 256,
        flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
        read: (offset, dst) => {
          this.config.copy(dst, 0, offset, offset + dst.length);
        },
        write: (offset, src) => {
          src.copy(this.config, offset);
        },
      },
      null,
    ];
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
  }

  reset(): void {}

  close(): void {
    this.mapping.unmapNow();
    this.memfd.close();
  }
}

export const tick = (ms = 5): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` until true (or fails after `ms`). */
export async function until(cond: () => boolean, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await tick(2);
  }
}

// ---- per-test teardown shared by the client test files ----

const cleanups: (() => unknown)[] = [];

/** Run `fn` after the current test (in reverse order of registration). */
export function defer(fn: () => unknown): void {
  cleanups.push(fn);
}

/** Registers the afterEach hook that runs everything {@link defer}red; call once per file. */
export function useCleanup(): void {
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
}

/** A libvfio-user-like fake server, closed after the test. */
export function fakeServer(options: LvuOptions = {}): FakeServer {
  const fake = new FakeServer(lvuHandler(options));
  defer(() => fake.close());
  return fake;
}

/** Our client on `path` (1 s reply timeout unless overridden), closed after the test. */
export async function connect(path: string, options: ClientOptions = {}): Promise<VfioUserClient> {
  const client = await VfioUserClient.connect(path, { timeoutMs: 1000, ...options });
  defer(() => client.close());
  return client;
}

/** The rejection reason of `p`, or null if it resolved. */
export function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => null,
    (e: unknown) => e,
  );
}
