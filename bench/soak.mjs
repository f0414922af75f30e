#!/usr/bin/env node
// The standing soak: a hostile client against real servers, run as child processes through the
// CLI exactly as a user starts them (`vfio-user serve gpio`, `serve nvme --size 64M --busy-poll
// 50`, `serve nvme --size 64M --doorbells mmap`, `serve virtio-blk`). It sends mutated and random
// messages across many connections, with random fds attached (memfd, eventfd, /dev/zero, a socket, a pipe), oversized,
// overlapping and > 4 GiB DMA maps, memory truncated under the server's feet, and NVMe register
// and doorbell abuse on an enabled controller. After EVERY connection a fresh client must get a
// VERSION reply and a config-space read within 5 s, and the server process must still be there.
//
//   npm run build:ts && npm run soak -- [--messages 1000000] [--connections N] [--seed S]
//                                       [--servers gpio,nvme,nvme-mmap,virtio-blk] [--skip ATTACK,...]
//                                       [--deadline-ms 5000] [--json] [--quiet] [--list]
//
// Prints live progress (messages/s) on stderr and a JSON report on stdout: messages, connections,
// crashes (the server process exited or was killed by a signal), hangs (a liveness check failed,
// or the server stopped reading for 10 s), and for each server its fd count (/proc/PID/fd) and RSS
// (/proc/PID/status VmRSS) before the first connection and after the last. A crashed or hung
// server is restarted and the soak goes on, so one run reports every attack that still hurts.
// Exit status: 0 when there were no crashes, no hangs and every server's fds are back to baseline.
//
// Runs against the compiled package in dist/ (protocol encoders for valid base messages, the
// native binding for raw sendmsg with SCM_RIGHTS), never the sources.
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI = path.join(ROOT, 'dist', 'cli', 'main.js');
if (!fs.existsSync(CLI)) {
  console.error('soak: dist/ is missing: run `npm run build:ts` first');
  process.exit(2);
}
const { binding, WOULD_BLOCK } = require('../dist/native/binding.js');
const P = require('../dist/protocol/index.js');
const { enableValue } = require('../dist/drivers/nvme/registers.js');
const { Reg, Cc, Csts, sqTailDoorbell, cqHeadDoorbell, AdminOpcode, IoOpcode } = require('../dist/nvme/index.js');

const { Command, HeaderFlags, DmaMapFlags, DmaUnmapFlags, IrqSetFlags, DeviceFeature, DirtyPagesFlags, Errno, PciRegion } = P;
const CONFIG = PciRegion.CONFIG;
const BAR0 = PciRegion.BAR0;
const GiB = 2 ** 30;

// ---- attacks --------------------------------------------------------------------------------------

/**
 * Every attack, by the name `--skip` takes. The bulk generators make most of the messages; the
 * others are short targeted sequences, a few per connection. `servers` limits where one applies.
 */
const ATTACKS = {
  'valid': { what: 'valid messages of every client command with random fields', bulk: 5 },
  'mutated': { what: 'valid messages with bytes flipped and fields overwritten', bulk: 6, ends: 1 },
  'random-header': { what: 'random command numbers, flags and payloads; wrong-direction commands and replies', bulk: 2, ends: 1 },
  'fds': { what: 'random fds (memfd, eventfd, /dev/zero, socket, pipe) on random messages, also more than max_msg_fds', bulk: 1 },
  'garbage': { what: 'random bytes', ends: 1 },
  'lying-size': { what: 'a header size larger or smaller than what follows', ends: 2 },
  'truncated': { what: 'half a message, then the client hangs up', end: true },
  'pre-version': { what: 'mutated and random messages before (or instead of) VERSION' },
  'burst': { what: 'many clients at once, each proposing VERSION (the device is busy)' },
  'dma-oversized': { what: 'DMA maps larger than their fd, past its end, unaligned, of /dev/zero, pipes and sockets, and a device DMA beyond the end of the file' },
  'dma-overlap': { what: 'overlapping and duplicate DMA maps, partial and stray unmaps, DMA to an unmapped range' },
  'dma-4g': { what: 'DMA maps of 4, 5 and 8 GiB, and device DMA above the 4 GiB line', needsMemory: true },
  'dma-truncate': { what: 'the client shrinks a memfd it mapped, then makes the device DMA there', servers: ['nvme', 'nvme-mmap'] },
  'irqs': { what: 'SET_IRQS with random fds, counts, indexes and actions' },
  'config': { what: 'config space garbage: command register, BARs, capabilities' },
  'reset': { what: 'DEVICE_RESET in the middle of things' },
  'nvme-regs': { what: 'after VERSION, DMA_MAP and CC.EN: garbage to CC, AQA, ASQ, ACQ, INTMS/INTMC and the rest of the register page', servers: ['nvme', 'nvme-mmap'] },
  'nvme-doorbells': { what: 'garbage SQEs (admin and I/O), wild doorbell values, doorbells of queues that do not exist, unaligned doorbell accesses', servers: ['nvme', 'nvme-mmap'] },
  'doorbell-mmap': { what: 'map the server\'s doorbell page and store garbage into it', servers: ['nvme-mmap'] },
  'doorbell-truncate': { what: 'ftruncate the server\'s doorbell memfd (to 0, and larger), then ring a doorbell', servers: ['nvme-mmap'] },
};

const SERVERS = {
  gpio: ['gpio'],
  // Busy polling here: the hostile client's traffic also goes through the poller's busy turns.
  nvme: ['nvme', '--size', '64M', '--busy-poll', '50'],
  'nvme-mmap': ['nvme', '--size', '64M', '--doorbells', 'mmap'],
  'virtio-blk': ['virtio-blk', '--size', '64M', '--queues', '2'],
};

// ---- options --------------------------------------------------------------------------------------

const { values: opts } = parseArgs({
  options: {
    messages: { type: 'string', default: '1000000' },
    connections: { type: 'string' },
    seed: { type: 'string' },
    servers: { type: 'string', default: Object.keys(SERVERS).join(',') },
    skip: { type: 'string', multiple: true, default: [] },
    'deadline-ms': { type: 'string', default: '5000' },
    json: { type: 'boolean', default: false },
    quiet: { type: 'boolean', default: false },
    list: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
});
if (opts.help) {
  console.log(fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n').slice(1, 22).map((l) => l.replace(/^\/\/ ?/, '')).join('\n'));
  process.exit(0);
}
if (opts.list) {
  for (const [name, a] of Object.entries(ATTACKS)) console.log(`${name.padEnd(18)} ${a.what}${a.servers ? ` (${a.servers.join(', ')})` : ''}`);
  process.exit(0);
}
const TOTAL = Number(opts.messages);
const CONNECTIONS = opts.connections === undefined ? Math.max(3, Math.round(TOTAL / 500)) : Number(opts.connections);
const SEED = opts.seed === undefined ? (Date.now() ^ (process.pid << 16)) >>> 0 : Number(opts.seed) >>> 0;
const DEADLINE_MS = Number(opts['deadline-ms']);
const skipped = new Set(opts.skip.flatMap((s) => s.split(',')).filter((s) => s !== ''));
for (const s of skipped) if (!(s in ATTACKS)) fail(`unknown attack '${s}' for --skip (see --list)`);
const serverNames = opts.servers.split(',').filter((s) => s !== '');
for (const s of serverNames) if (!(s in SERVERS)) fail(`unknown server '${s}' (known: ${Object.keys(SERVERS).join(', ')})`);
if (!Number.isSafeInteger(TOTAL) || TOTAL < 1) fail('--messages must be a positive integer');
if (!Number.isSafeInteger(CONNECTIONS) || CONNECTIONS < 1) fail('--connections must be a positive integer');

function fail(message) {
  console.error(`soak: ${message}`);
  process.exit(2);
}

// ---- small things ---------------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const tick = () => new Promise((resolve) => setImmediate(resolve));

/** mulberry32: a small seeded PRNG, so a run can be repeated with --seed. */
function prng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const r = {
    next,
    int: (n) => Math.floor(next() * n),
    range: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)),
    chance: (p) => next() < p,
    pick: (list) => list[Math.floor(next() * list.length)],
    u32: () => (next() * 4294967296) >>> 0,
    u64: () => (BigInt(r.u32()) << 32n) | BigInt(r.u32()),
    bytes: (n) => {
      const b = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i++) b[i] = (next() * 256) | 0;
      return b;
    },
    weighted: (entries) => {
      let total = 0;
      for (const [, w] of entries) total += w;
      let x = next() * total;
      for (const [v, w] of entries) if ((x -= w) < 0) return v;
      return entries[entries.length - 1][0];
    },
  };
  return r;
}

const INTERESTING_U32 = [0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 24, 31, 32, 63, 64, 255, 256, 4095, 4096, 4097, 65535, 65536, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];
const INTERESTING_U64 = [0n, 1n, 4095n, 4096n, 1n << 32n, (1n << 32n) + 4096n, 5n << 30n, 1n << 36n, 1n << 47n, 1n << 52n, 1n << 53n, 1n << 63n, (1n << 64n) - 4096n, (1n << 64n) - 1n];

const anyU32 = (r) => (r.chance(0.5) ? r.pick(INTERESTING_U32) : r.chance(0.5) ? r.int(300) : r.u32());
const anyU64 = (r) => (r.chance(0.5) ? r.pick(INTERESTING_U64) : r.chance(0.5) ? BigInt(r.int(1 << 20)) : r.u64());

function u32s(...values) {
  const b = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => b.writeUInt32LE(v >>> 0, i * 4));
  return b;
}
function u64(v) {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(v)));
  return b;
}

/** One whole message: a 16-byte header (size from the payload unless given) and the payload. */
function message(msgId, command, payload = Buffer.alloc(0), flags = 0, size = 16 + payload.length, error = 0) {
  const b = Buffer.allocUnsafe(16 + payload.length);
  b.writeUInt16LE(msgId & 0xffff, 0);
  b.writeUInt16LE(command & 0xffff, 2);
  b.writeUInt32LE(size >>> 0, 4);
  b.writeUInt32LE(flags >>> 0, 8);
  b.writeUInt32LE(error >>> 0, 12);
  payload.copy(b, 16);
  return b;
}

function versionPayload(r) {
  const caps = { max_msg_fds: 16n, max_data_xfer_size: 1048576n, pgsizes: 4096n, max_dma_maps: 65535n, migration: { max_bitmap_size: 268435456n, pgsize: 4096n }, write_multiple: true };
  if (r !== undefined && r.chance(0.2)) {
    // Odd but valid-looking capabilities.
    caps.max_msg_fds = BigInt(r.pick([0, 1, 8, 16, 64, 253, 1024]));
    caps.max_data_xfer_size = BigInt(r.pick([0, 1, 4096, 1 << 20, 1 << 26, 2 ** 32]));
  }
  return P.encodeVersion({ major: 0, minor: r !== undefined && r.chance(0.1) ? r.int(5) : 0, document: { capabilities: caps } });
}

// ---- the fds a hostile client has at hand -----------------------------------------------------------

/** One per worker: fds to attach to random messages; the kernel dups them into the server. */
class FdPool {
  constructor(tag, dir) {
    this.fds = [];
    this.kinds = [];
    const add = (fd, kind) => {
      this.fds.push(fd);
      this.kinds.push(kind);
    };
    for (const size of [0, 4096, 65536, 5000]) {
      const fd = binding.memfdCreate(`soak-${tag}-${size}`);
      fs.ftruncateSync(fd, size);
      add(fd, 'memfd');
    }
    add(binding.eventfd(0, binding.constants.EFD_NONBLOCK), 'eventfd');
    add(binding.eventfd(0, 0), 'eventfd');
    add(fs.openSync('/dev/zero', 'r+'), '/dev/zero');
    add(fs.openSync('/dev/null', 'r'), '/dev/null');
    const [a, b] = binding.socketpair();
    add(a, 'socket');
    this.peer = b;
    try {
      const fifo = path.join(dir, `fifo-${tag}`);
      execFileSync('mkfifo', [fifo]);
      add(fs.openSync(fifo, fs.constants.O_RDWR | fs.constants.O_NONBLOCK), 'pipe');
    } catch {
      // no mkfifo: no pipe in the pool
    }
    add(fs.openSync(dir, 'r'), 'directory');
  }

  random(r, n) {
    const out = [];
    for (let i = 0; i < n; i++) out.push(r.pick(this.fds));
    return out;
  }

  ofKind(kind) {
    return this.fds[this.kinds.indexOf(kind)] ?? this.fds[0];
  }

  close() {
    for (const fd of this.fds) fs.closeSync(fd);
    fs.closeSync(this.peer);
  }
}

function memfd(name, size) {
  const fd = binding.memfdCreate(name);
  fs.ftruncateSync(fd, size);
  return fd;
}

// ---- a raw client socket ----------------------------------------------------------------------------

class PeerGone extends Error {}

/**
 * A client socket driven with sendmsg/recvmsg directly. Reads everything the server sends, matches
 * replies to pending requests, answers (or, now and then, ignores) the server's DMA_READ and
 * DMA_WRITE, and closes every fd it is sent unless asked to keep them.
 */
class Wire {
  constructor(socketPath, r) {
    this.r = r;
    this.fd = binding.unixConnect(socketPath);
    this.eof = false;
    this.closed = false;
    this.replies = 0;
    this.keepFds = false;
    this.kept = [];
    this.waiters = new Map();
    this.nextId = 0x8000;
    this.buf = Buffer.alloc(0);
    this.chunk = Buffer.allocUnsafe(256 * 1024);
    this.fdsOut = new Int32Array(254);
    this.poller = new binding.Poller(this.fd, () => this.readAll());
    this.poller.start(binding.pollEvents.READABLE | binding.pollEvents.DISCONNECT);
  }

  /**
   * Sends `bytes` (with `fds` on the first byte), waiting while the socket is full. Returns the
   * bytes that went out; throws PeerGone when the server hung up, and a stall error after 10 s
   * without progress (the server stopped reading).
   */
  async send(bytes, fds = null) {
    let sent = 0;
    let since = Date.now();
    while (sent < bytes.length) {
      if (this.closed) throw new PeerGone('closed');
      let n;
      try {
        n = binding.sendmsg(this.fd, [bytes.subarray(sent)], sent === 0 ? fds : null);
      } catch (err) {
        if (err.code === 'EPIPE' || err.code === 'ECONNRESET' || err.code === 'ENOTCONN') throw new PeerGone(err.code);
        if (err.code === 'ETOOMANYREFS' || err.code === 'EBADF' || err.code === 'EINVAL') {
          fds = null; // the kernel would not carry these fds: send the bytes alone
          continue;
        }
        throw err;
      }
      if (n === WOULD_BLOCK) {
        if (Date.now() - since > 10_000) {
          const e = new Error('the server stopped reading for 10 s');
          e.stall = true;
          throw e;
        }
        await sleep(1);
      } else {
        sent += n;
        since = Date.now();
      }
    }
    return sent;
  }

  /** Sends a command and waits for its reply: { error, payload } or null (timeout or hang-up). */
  async request(command, payload, fds = null, timeoutMs = 2000) {
    const msgId = this.nextId;
    this.nextId = this.nextId === 0xffff ? 0x8000 : this.nextId + 1;
    const reply = new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiters.delete(msgId);
        resolve(null);
      }, timeoutMs);
      this.waiters.set(msgId, (m) => {
        clearTimeout(timer);
        resolve(m);
      });
    });
    try {
      await this.send(message(msgId, command, payload), fds);
    } catch (err) {
      this.waiters.get(msgId)?.(null);
      if (err instanceof PeerGone) return null;
      throw err;
    }
    return reply;
  }

  /** Waits until the server has answered everything so far (a DEVICE_GET_INFO barrier). */
  async barrier(timeoutMs = 500) {
    if (this.eof) return false;
    const reply = await this.request(Command.DEVICE_GET_INFO, P.encodeDeviceInfoRequest(), null, timeoutMs);
    return reply !== null;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.poller.close();
    fs.closeSync(this.fd);
    for (const fd of this.kept.splice(0)) fs.closeSync(fd);
    for (const resolve of [...this.waiters.values()]) resolve(null);
    this.waiters.clear();
  }

  readAll() {
    if (this.closed) return;
    for (;;) {
      let n;
      try {
        n = binding.recvmsg(this.fd, this.chunk, 0, this.chunk.length, this.fdsOut);
      } catch {
        n = 0;
      }
      for (let i = 1; i <= this.fdsOut[0]; i++) {
        if (this.keepFds) this.kept.push(this.fdsOut[i]);
        else fs.closeSync(this.fdsOut[i]);
      }
      this.fdsOut[0] = 0;
      if (n === WOULD_BLOCK) break;
      if (n === 0) {
        this.eof = true;
        this.poller.stop();
        for (const resolve of [...this.waiters.values()]) resolve(null);
        this.waiters.clear();
        break;
      }
      this.buf = this.buf.length === 0 ? Buffer.from(this.chunk.subarray(0, n)) : Buffer.concat([this.buf, this.chunk.subarray(0, n)]);
    }
    let at = 0;
    while (this.buf.length - at >= 16) {
      const size = this.buf.readUInt32LE(at + 4);
      if (size < 16) {
        this.malformed = `server sent a header with size ${size}`;
        at = this.buf.length;
        break;
      }
      if (this.buf.length - at < size) break;
      const m = this.buf.subarray(at, at + size);
      at += size;
      this.onMessage(m);
    }
    this.buf = at === this.buf.length ? Buffer.alloc(0) : this.buf.subarray(at);
  }

  onMessage(m) {
    const msgId = m.readUInt16LE(0);
    const command = m.readUInt16LE(2);
    const flags = m.readUInt32LE(8);
    const type = flags & HeaderFlags.TYPE_MASK;
    if (type === HeaderFlags.TYPE_REPLY) {
      this.replies++;
      const waiter = this.waiters.get(msgId);
      if (waiter !== undefined) {
        this.waiters.delete(msgId);
        waiter({ command, error: flags & HeaderFlags.ERROR ? m.readUInt32LE(12) || Errno.EINVAL : 0, payload: Buffer.from(m.subarray(16)) });
      }
      return;
    }
    // A command from the server: DMA_READ or DMA_WRITE for a map without an fd.
    if (this.r.chance(0.2) || this.closed) return; // a client that does not answer
    const payload = m.subarray(16);
    let reply;
    try {
      if (command === Command.DMA_READ) {
        const req = P.decodeDmaReadRequest(payload);
        reply = this.r.chance(0.1) ? null : P.encodeDmaReadReply({ address: req.address, data: Buffer.alloc(Math.min(req.count, 1 << 20), 0x5a) });
      } else if (command === Command.DMA_WRITE) {
        const req = P.decodeDmaWriteRequest(payload);
        reply = this.r.chance(0.1) ? null : P.encodeDmaWriteReply({ address: req.address, count: req.count });
      }
    } catch {
      reply = null;
    }
    const out = reply === null || reply === undefined ? message(msgId, command, Buffer.alloc(0), HeaderFlags.TYPE_REPLY | HeaderFlags.ERROR, 16, Errno.EINVAL) : message(msgId, command, reply, HeaderFlags.TYPE_REPLY);
    try {
      binding.sendmsg(this.fd, [out]);
    } catch {
      // gone
    }
  }
}

// ---- valid base messages (dist/protocol encoders) and their mutations --------------------------------

const REGIONS = [0, 0, 2, 4, 7, 7, 7];

/** A structurally valid client command with random but plausible fields: [command, payload]. */
function validCommand(r, w) {
  const region = () => (r.chance(0.85) ? r.pick(REGIONS) : r.int(12));
  const offset = (index) => BigInt(r.chance(0.8) ? r.int(index === CONFIG ? 256 : 0x2000) : anyU32(r));
  const count = () => r.pick([1, 2, 4, 4, 4, 8, r.int(64), r.int(4097)]);
  switch (r.int(16)) {
    case 0:
    case 1:
    case 2: {
      const index = region();
      return [Command.REGION_READ, P.encodeRegionReadRequest({ offset: offset(index), region: index, count: count() })];
    }
    case 3:
    case 4:
    case 5: {
      const index = region();
      return [Command.REGION_WRITE, P.encodeRegionWriteRequest({ offset: offset(index), region: index, data: r.bytes(count()) })];
    }
    case 6:
      return [Command.DEVICE_GET_INFO, P.encodeDeviceInfoRequest({ argsz: r.pick([16, 16, 0, 8, 32, 0xffffffff]) })];
    case 7:
      return [Command.DEVICE_GET_REGION_INFO, P.encodeRegionInfoRequest({ index: region(), argsz: r.pick([32, 32, 64, 256, 4096, 0, 0xffffffff]) })];
    case 8:
      return [Command.DEVICE_GET_IRQ_INFO, P.encodeIrqInfoRequest({ index: r.int(7), argsz: r.pick([16, 16, 0, 1 << 20]) })];
    case 9: {
      const index = r.int(6);
      const start = r.chance(0.8) ? 0 : anyU32(r);
      const n = r.chance(0.8) ? r.int(4) : anyU32(r);
      const action = r.pick([IrqSetFlags.ACTION_TRIGGER, IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK]);
      const data = r.pick([IrqSetFlags.DATA_NONE, IrqSetFlags.DATA_BOOL, IrqSetFlags.DATA_EVENTFD]);
      const flags = data | action;
      if (data === IrqSetFlags.DATA_BOOL && n > 64) return [Command.DEVICE_SET_IRQS, u32s(20, flags, index, start, n)];
      try {
        return [Command.DEVICE_SET_IRQS, P.encodeSetIrqsRequest({ flags, index, start, count: n, data: data === IrqSetFlags.DATA_BOOL ? r.bytes(n) : null })];
      } catch {
        return [Command.DEVICE_SET_IRQS, u32s(20, flags, index, start, n)];
      }
    }
    case 10: {
      const flags = r.chance(0.8) ? DmaMapFlags.READ | DmaMapFlags.WRITE : r.int(16);
      return [Command.DMA_MAP, P.encodeDmaMapRequest({ flags, offset: r.chance(0.8) ? 0n : anyU64(r), address: BigInt(r.int(64)) * 4096n, size: BigInt(r.range(1, 16)) * 4096n })];
    }
    case 11: {
      const all = r.chance(0.1);
      return [Command.DMA_UNMAP, P.encodeDmaUnmapRequest({ flags: all ? DmaUnmapFlags.ALL : 0, address: all ? 0n : BigInt(r.int(64)) * 4096n, size: all ? 0n : BigInt(r.range(1, 16)) * 4096n })];
    }
    case 12: {
      const writes = [];
      for (let i = r.range(1, 8); i > 0; i--) {
        const index = region();
        writes.push({ offset: offset(index), region: index, data: r.bytes(r.pick([1, 2, 4, 8])) });
      }
      return [Command.REGION_WRITE_MULTI, P.encodeRegionWriteMultiRequest(writes)];
    }
    case 13: {
      const feature = r.pick([DeviceFeature.MIGRATION, DeviceFeature.MIG_DEVICE_STATE, DeviceFeature.DMA_LOGGING_START, DeviceFeature.DMA_LOGGING_STOP, DeviceFeature.DMA_LOGGING_REPORT, r.int(16)]);
      const op = r.pick([DeviceFeature.GET, DeviceFeature.SET, DeviceFeature.PROBE, DeviceFeature.PROBE | DeviceFeature.GET]);
      return [Command.DEVICE_FEATURE, P.encodeDeviceFeatureRequest({ flags: feature | op, data: r.bytes(r.pick([0, 8, 16, 24, 40])) })];
    }
    case 14: {
      const c = r.pick([Command.MIG_DATA_READ, Command.MIG_DATA_WRITE, Command.DIRTY_PAGES]);
      if (c === Command.MIG_DATA_READ) return [c, P.encodeMigDataReadRequest({ size: r.pick([0, 8, 4096, 1 << 20]) })];
      if (c === Command.MIG_DATA_WRITE) return [c, P.encodeMigDataWriteRequest({ data: r.bytes(r.int(64)) })];
      return [c, P.encodeDirtyPagesRequest({ flags: r.pick([DirtyPagesFlags.START, DirtyPagesFlags.STOP]) })];
    }
    default:
      if (w.server.startsWith('nvme') && r.chance(0.9)) {
        // BAR0 register and doorbell traffic: what an NVMe driver sends most.
        const at = r.chance(0.5) ? sqTailDoorbell(r.int(4), 4) : r.pick([Reg.CSTS, Reg.CC, Reg.CAP, Reg.VS, Reg.INTMS, Reg.INTMC]);
        return r.chance(0.5) ? [Command.REGION_READ, P.encodeRegionReadRequest({ offset: BigInt(at), region: BAR0, count: 4 })] : [Command.REGION_WRITE, P.encodeRegionWriteRequest({ offset: BigInt(at), region: BAR0, data: u32s(r.int(64)) })];
      }
      return [Command.DEVICE_RESET, P.encodeDeviceResetRequest()];
  }
}

/** A valid command whose bytes were then damaged; its size field too only with `lie`. */
function mutate(r, bytes, lie = false) {
  const b = Buffer.from(bytes);
  for (let n = r.range(1, 4); n > 0; n--) {
    const from = r.chance(0.15) ? 0 : 16; // the header only now and then: most damage is in the payload
    if (b.length <= from) break;
    const at = r.range(from, b.length - 1);
    switch (r.int(4)) {
      case 0:
        b[at] ^= 1 << r.int(8);
        break;
      case 1:
        b[at] = r.int(256);
        break;
      case 2:
        if (at + 4 <= b.length) b.writeUInt32LE(r.pick(INTERESTING_U32), at);
        break;
      default:
        if (at + 8 <= b.length) b.writeBigUInt64LE(r.pick(INTERESTING_U64), at);
    }
  }
  // The header's size still says where the next message starts, unless lying is the point.
  if (!lie || r.chance(0.5)) b.writeUInt32LE(b.length, 4);
  // Its type stays "command" too: any other type ends the connection (the server hangs up).
  if (!lie) b.writeUInt32LE(((b.readUInt32LE(8) & ~HeaderFlags.TYPE_MASK) | HeaderFlags.TYPE_COMMAND) >>> 0, 8);
  return b;
}

/**
 * The next bulk message for worker `w`: { bytes, fds }. With `ends`, one of the messages that end
 * a connection's readable stream (random bytes, a size that lies, a header that is not a command's):
 * they go last, since after them the server hangs up or reads whatever follows as their body.
 */
function bulkMessage(r, w, kinds = null, weights = w.bulkWeights, ends = false) {
  const kind = r.weighted(weights);
  const id = r.int(0x8000);
  let fds = null;
  if (kind === 'fds' || (w.attackOn('fds') && r.chance(0.03))) {
    fds = w.pool.random(r, r.chance(0.9) ? r.range(1, 3) : r.range(15, 20));
    kinds?.add('fds');
  }
  kinds?.add(kind);
  switch (kind) {
    case 'garbage':
      return { bytes: r.bytes(r.range(1, 96)), fds };
    case 'random-header': {
      const command = r.chance(0.7) ? r.int(21) : r.int(0x10000);
      const commandFlags = r.chance(0.8) ? HeaderFlags.TYPE_COMMAND | (r.chance(0.2) ? HeaderFlags.NO_REPLY : 0) : ((r.u32() & ~HeaderFlags.TYPE_MASK) | HeaderFlags.TYPE_COMMAND) >>> 0;
      const flags = !ends ? commandFlags : r.chance(0.5) ? HeaderFlags.TYPE_REPLY | (r.chance(0.5) ? HeaderFlags.ERROR : 0) : r.u32();
      const payload = r.bytes(r.chance(0.8) ? r.int(64) : r.int(4200));
      return { bytes: message(id, command, payload, flags, 16 + payload.length, r.chance(0.1) ? r.u32() : 0), fds };
    }
    case 'lying-size': {
      const [command, payload] = validCommand(r, w);
      const lie = r.chance(0.5) ? 16 + payload.length + r.range(1, 64) : r.chance(0.5) ? r.range(16, 15 + payload.length) : r.pick([0, 1, 15, 0x7fffffff, 0xffffffff, 1 << 20, (1 << 20) + 4097]);
      return { bytes: message(id, command, payload, 0, lie), fds };
    }
    case 'mutated': {
      const [command, payload] = validCommand(r, w);
      return { bytes: mutate(r, message(id, command, payload, r.chance(0.1) ? HeaderFlags.NO_REPLY : 0), ends), fds };
    }
    default: {
      const [command, payload] = validCommand(r, w);
      return { bytes: message(id, command, payload, r.chance(0.1) ? HeaderFlags.NO_REPLY : 0), fds };
    }
  }
}

// ---- NVMe: a controller brought up the proper way, then abused ---------------------------------------

/** Guest memory layout (offsets in the guest memfd, mapped at GUEST_IOVA). */
const GUEST_IOVA = 0x1000_0000n;
const GUEST_SIZE = 1 << 20;
const G = { asq: 0x0000, acq: 0x1000, iosq: 0x4000, iocq: 0x8000, data: 0x10000, prpList: 0xf000 };
const ADMIN_ENTRIES = 32;
const IO_ENTRIES = 64;

function regWrite(offset, value, size = 4) {
  const data = Buffer.alloc(size);
  const v = BigInt.asUintN(64, BigInt(value));
  for (let i = 0; i < size; i++) data[i] = Number((v >> BigInt(8 * i)) & 0xffn);
  return P.encodeRegionWriteRequest({ offset: BigInt(offset), region: BAR0, data });
}

/** A 64-byte submission queue entry. */
function sqe(opcode, cid, { nsid = 0, prp1 = 0n, prp2 = 0n, cdw = [] } = {}) {
  const b = Buffer.alloc(64);
  b[0] = opcode;
  b.writeUInt16LE(cid & 0xffff, 2);
  b.writeUInt32LE(nsid >>> 0, 4);
  b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(prp1)), 24);
  b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(prp2)), 32);
  cdw.forEach((v, i) => b.writeUInt32LE(v >>> 0, 40 + 4 * i));
  return b;
}

class Nvme {
  constructor(wire, guestFd, r) {
    this.wire = wire;
    this.fd = guestFd;
    this.r = r;
    this.adminTail = 0;
    this.ioTail = 0;
    this.cid = 0;
    this.sent = 0;
  }

  async req(command, payload, fds = null) {
    this.sent++;
    return this.wire.request(command, payload, fds);
  }

  async write(offset, value, size = 4) {
    return this.req(Command.REGION_WRITE, regWrite(offset, value, size));
  }

  async csts() {
    const reply = await this.req(Command.REGION_READ, P.encodeRegionReadRequest({ offset: BigInt(Reg.CSTS), region: BAR0, count: 4 }));
    return reply !== null && reply.error === 0 && reply.payload.length >= 20 ? reply.payload.readUInt32LE(16) : null;
  }

  /** Bus mastering on, admin queues in guest memory, CC.EN; true once CSTS.RDY. */
  async enable() {
    await this.req(Command.REGION_WRITE, P.encodeRegionWriteRequest({ offset: 4n, region: CONFIG, data: Buffer.from([0x06, 0x00]) }));
    await this.write(Reg.CC, 0);
    await this.write(Reg.AQA, ((ADMIN_ENTRIES - 1) << 16) | (ADMIN_ENTRIES - 1));
    await this.write(Reg.ASQ, GUEST_IOVA + BigInt(G.asq), 8);
    await this.write(Reg.ACQ, GUEST_IOVA + BigInt(G.acq), 8);
    await this.write(Reg.CC, enableValue(4096));
    this.adminTail = 0;
    for (let i = 0; i < 50; i++) {
      const csts = await this.csts();
      if (csts === null) return false;
      if (csts & Csts.RDY) return true;
      if (csts & Csts.CFS) return false;
      await sleep(2);
    }
    return false;
  }

  /** Queue an admin command and ring the admin SQ tail doorbell. */
  async admin(entry) {
    fs.writeSync(this.fd, entry, 0, 64, G.asq + this.adminTail * 64);
    this.adminTail = (this.adminTail + 1) % ADMIN_ENTRIES;
    return this.write(sqTailDoorbell(0, 4), this.adminTail);
  }

  /** One I/O queue pair (qid 1), as a driver creates it. */
  async createIoQueues() {
    await this.admin(sqe(AdminOpcode.CREATE_CQ, this.cid++, { prp1: GUEST_IOVA + BigInt(G.iocq), cdw: [((IO_ENTRIES - 1) << 16) | 1, 0x1] }));
    await this.admin(sqe(AdminOpcode.CREATE_SQ, this.cid++, { prp1: GUEST_IOVA + BigInt(G.iosq), cdw: [((IO_ENTRIES - 1) << 16) | 1, (1 << 16) | 0x1] }));
    this.ioTail = 0;
  }

  async io(entry) {
    fs.writeSync(this.fd, entry, 0, 64, G.iosq + this.ioTail * 64);
    this.ioTail = (this.ioTail + 1) % IO_ENTRIES;
    return this.write(sqTailDoorbell(1, 4), this.ioTail);
  }

  /** An address: mostly inside guest memory, sometimes anywhere. */
  addr() {
    const r = this.r;
    if (r.chance(0.7)) return GUEST_IOVA + BigInt(G.data + 4096 * r.int(0xe0) + (r.chance(0.2) ? r.int(4096) : 0));
    return r.pick([0n, 4096n, GUEST_IOVA - 4096n, GUEST_IOVA + BigInt(GUEST_SIZE) - 512n, GUEST_IOVA + BigInt(GUEST_SIZE), 5n << 30n, r.u64()]);
  }

  /** A plausible or absurd admin command. */
  randomAdmin() {
    const r = this.r;
    const opcode = r.chance(0.8) ? r.pick(Object.values(AdminOpcode)) : r.int(256);
    const cdw = [anyU32(r), anyU32(r), anyU32(r), anyU32(r), anyU32(r), anyU32(r)];
    if (opcode === AdminOpcode.IDENTIFY && r.chance(0.7)) cdw[0] = r.pick([0, 1, 2, 3, 5, 6, 0x10]);
    if (opcode === AdminOpcode.GET_LOG_PAGE && r.chance(0.7)) cdw[0] = (r.int(0x1000) << 16) | r.pick([1, 2, 3, 0xc0]);
    if ((opcode === AdminOpcode.CREATE_SQ || opcode === AdminOpcode.CREATE_CQ) && r.chance(0.7)) cdw[0] = (r.pick([0, 1, 63, 4095, 65535]) << 16) | r.int(70);
    return sqe(opcode, this.cid++, { nsid: r.chance(0.7) ? r.pick([0, 1, 1, 2, 0xffffffff]) : r.u32(), prp1: this.addr(), prp2: this.addr(), cdw });
  }

  /** A plausible or absurd read, write, flush... on namespace 1. */
  randomIo() {
    const r = this.r;
    const opcode = r.chance(0.85) ? r.pick([IoOpcode.READ, IoOpcode.WRITE, IoOpcode.WRITE, IoOpcode.FLUSH, IoOpcode.WRITE_ZEROES, IoOpcode.DSM, IoOpcode.COMPARE]) : r.int(256);
    const slba = r.chance(0.8) ? BigInt(r.int(131072)) : anyU64(r);
    const nlb = r.chance(0.8) ? r.int(16) : r.int(65536);
    const prp2 = r.chance(0.5) ? GUEST_IOVA + BigInt(G.prpList) : this.addr();
    return sqe(opcode, this.cid++, { nsid: r.chance(0.9) ? 1 : r.u32(), prp1: this.addr(), prp2, cdw: [Number(slba & 0xffffffffn), Number((slba >> 32n) & 0xffffffffn), nlb | (r.chance(0.1) ? r.u32() & 0xffff0000 : 0), 0, 0, 0] });
  }
}

// ---- targeted attacks ---------------------------------------------------------------------------------

/** DMA_MAP of `fd` (or none): `[reply, messages sent]`. */
async function dmaMap(wire, fd, address, size, { offset = 0n, flags = DmaMapFlags.READ | DmaMapFlags.WRITE } = {}) {
  const payload = P.encodeDmaMapRequest({ flags, offset: BigInt(offset), address: BigInt(address), size: BigInt(size) });
  return wire.request(Command.DMA_MAP, payload, fd === null ? null : [fd]);
}
async function dmaUnmap(wire, address, size, flags = 0) {
  return wire.request(Command.DMA_UNMAP, P.encodeDmaUnmapRequest({ flags, address: BigInt(address), size: BigInt(size) }));
}

/** Each targeted attack: (ctx) => messages sent. ctx: { wire, r, w, nvme (enabled) | null, guest }. */
const TARGETED = {
  async 'dma-oversized'({ wire, r, w, nvme }) {
    let sent = 0;
    const small = memfd('soak-small', 65536);
    try {
      const base = 0x2000_0000n;
      // Larger than the file, past its end, unaligned, and maps of fds that are not memory.
      const tries = [
        [small, base, 1 << 20, 0n],
        [small, base + 0x10_0000n, 1n << 40n, 0n],
        [small, base + 0x20_0000n, 4096, 1n << 20n],
        [small, base + 0x30_0000n, 4096, 123n],
        [small, base + 0x40_0000n + 5n, 4096, 0n],
        [small, base + 0x50_0000n, 0, 0n],
        [w.pool.ofKind('/dev/zero'), base + 0x60_0000n, 1 << 20, 0n],
        [w.pool.ofKind('pipe'), base + 0x70_0000n, 4096, 0n],
        [w.pool.ofKind('socket'), base + 0x80_0000n, 4096, 0n],
        [w.pool.ofKind('eventfd'), base + 0x90_0000n, 4096, 0n],
        [w.pool.ofKind('directory'), base + 0xa0_0000n, 4096, 0n],
        [null, base + 0xb0_0000n, 1n << 52n, 0n],
        [small, (1n << 64n) - 4096n, 8192, 0n],
      ];
      for (const [fd, address, size, offset] of tries) {
        await dmaMap(wire, fd, address, size, { offset });
        sent++;
      }
      // Two fds on one map.
      await wire.request(Command.DMA_MAP, P.encodeDmaMapRequest({ flags: 3, address: base + 0xc0_0000n, size: 4096n }), [small, small]);
      sent++;
      if (nvme !== null) {
        // If the server took the first (oversized) map, this Identify lands past the end of the file.
        await nvme.admin(sqe(AdminOpcode.IDENTIFY, nvme.cid++, { prp1: base + 0x8_0000n, cdw: [1] }));
        await nvme.admin(sqe(AdminOpcode.IDENTIFY, nvme.cid++, { prp1: base + 0x60_0000n, cdw: [1] }));
        sent += 2;
        await wire.barrier();
        sent++;
      }
    } finally {
      fs.closeSync(small);
    }
    return sent;
  },

  async 'dma-overlap'({ wire, r, nvme }) {
    let sent = 0;
    const fd = memfd('soak-overlap', 1 << 20);
    try {
      const base = 0x3000_0000n;
      const maps = [
        [base, 65536, 0n],
        [base + 0x8000n, 65536, 0n], // overlaps the first
        [base, 65536, 0n], // the same again
        [base + 0x1000n, 4096, 4096n], // inside the first
        [base - 4096n, 8192, 0n], // straddles its start
        [base + 0x10000n, 65536, 65536n], // adjacent
      ];
      for (const [address, size, offset] of maps) {
        await dmaMap(wire, fd, address, size, { offset });
        sent++;
      }
      const unmaps = [
        [base + 0x4000n, 4096], // a part of a map
        [base + 0x100000n, 4096], // nothing there
        [base, 65536],
        [base, 65536], // twice
        [base - 4096n, 1n << 40n],
      ];
      for (const [address, size] of unmaps) {
        await dmaUnmap(wire, address, size);
        sent++;
      }
      if (nvme !== null) {
        // DMA to the range just unmapped.
        await nvme.admin(sqe(AdminOpcode.IDENTIFY, nvme.cid++, { prp1: base + 0x2000n, cdw: [1] }));
        sent++;
      }
      if (r.chance(0.5)) {
        await dmaUnmap(wire, 0n, 0n, DmaUnmapFlags.ALL);
        sent++;
      }
    } finally {
      fs.closeSync(fd);
    }
    return sent;
  },

  async 'dma-4g'({ wire, r, nvme }) {
    let sent = 0;
    const size = r.pick([4 * GiB, 4 * GiB + 4096, 5 * GiB, 8 * GiB]);
    const fd = memfd('soak-big', size); // sparse: costs nothing until touched
    try {
      const base = 1n << 40n;
      const map = await dmaMap(wire, fd, base, size);
      sent++;
      if (map !== null && map.error === 0 && nvme !== null) {
        // The device DMAs above the 4 GiB line of the map, and at its very end.
        await nvme.admin(sqe(AdminOpcode.IDENTIFY, nvme.cid++, { prp1: base + BigInt(size) - 8192n, cdw: [1] }));
        await nvme.admin(sqe(AdminOpcode.IDENTIFY, nvme.cid++, { prp1: base + (1n << 32n) + 4096n, cdw: [1] }));
        sent += 2;
        await wire.barrier();
        sent++;
      }
      await dmaUnmap(wire, base, size);
      sent++;
    } finally {
      fs.closeSync(fd);
    }
    return sent;
  },

  async 'dma-truncate'({ wire, r, nvme, guest }) {
    if (nvme === null) return 0;
    let sent = 0;
    if (r.chance(0.5)) {
      // A second map, shrunk, then an Identify into it.
      const fd = memfd('soak-shrink', 1 << 20);
      try {
        const base = 0x4000_0000n;
        const map = await dmaMap(wire, fd, base, 1 << 20);
        sent++;
        fs.ftruncateSync(fd, 0);
        if (map !== null && map.error === 0) {
          await nvme.admin(sqe(AdminOpcode.IDENTIFY, nvme.cid++, { prp1: base + 0x8000n, cdw: [1] }));
          sent++;
          await wire.barrier();
          sent++;
        }
      } finally {
        fs.closeSync(fd);
      }
    } else {
      // The guest memory holding the admin queues, shrunk under the controller: the next doorbell
      // makes it read a submission queue that is no longer there.
      fs.ftruncateSync(guest.fd, 0);
      guest.truncated = true;
      await nvme.write(sqTailDoorbell(0, 4), (nvme.adminTail + 1) % ADMIN_ENTRIES);
      sent++;
      await wire.barrier();
      sent++;
    }
    return sent;
  },

  async irqs({ wire, r, w }) {
    let sent = 0;
    for (let n = r.range(2, 8); n > 0; n--) {
      const index = r.int(6);
      const count = r.chance(0.8) ? r.range(1, 4) : r.pick([0, 17, 64, 2048, 0xffffffff]);
      const fds = w.pool.random(r, Math.min(count, r.chance(0.8) ? 4 : 20));
      const flags = IrqSetFlags.DATA_EVENTFD | r.pick([IrqSetFlags.ACTION_TRIGGER, IrqSetFlags.ACTION_TRIGGER, IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK]);
      await wire.request(Command.DEVICE_SET_IRQS, u32s(20, flags, index, r.chance(0.8) ? 0 : anyU32(r), count), fds.length > 0 ? fds : null);
      sent++;
    }
    return sent;
  },

  async config({ wire, r }) {
    let sent = 0;
    for (let n = r.range(4, 16); n > 0; n--) {
      const offset = r.chance(0.7) ? r.pick([0x04, 0x06, 0x0c, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x30, 0x34, 0x3c, 0x40, 0x50, 0x70, 0x80, 0x90, 0xa0]) + r.int(4) : r.int(4200);
      const size = r.pick([1, 2, 4, 4, 8]);
      const data = r.chance(0.3) ? Buffer.alloc(size, 0xff) : r.bytes(size);
      await wire.request(Command.REGION_WRITE, P.encodeRegionWriteRequest({ offset: BigInt(offset), region: CONFIG, data }));
      sent++;
    }
    return sent;
  },

  async reset({ wire, r, nvme }) {
    if (nvme !== null && r.chance(0.5)) {
      // In the middle of I/O.
      await nvme.io(nvme.randomIo());
      await nvme.io(nvme.randomIo());
    }
    await wire.request(Command.DEVICE_RESET, P.encodeDeviceResetRequest());
    if (nvme !== null) await nvme.enable(); // the rest of the connection has a controller again
    return 1;
  },

  async 'nvme-regs'({ wire, r, nvme }) {
    if (nvme === null) return 0;
    let sent = 0;
    const regs = [Reg.CC, Reg.AQA, Reg.ASQ, Reg.ASQ + 4, Reg.ACQ, Reg.ACQ + 4, Reg.INTMS, Reg.INTMC, Reg.CAP, Reg.VS, Reg.CSTS, Reg.NSSR, 0x38, 0x3c, 0x40, 0x44, 0x48, 0x50, 0x58, 0xe00];
    for (let n = r.range(8, 40); n > 0; n--) {
      const at = r.chance(0.8) ? r.pick(regs) : r.int(0x1000);
      const size = r.pick([4, 4, 4, 8, 1, 2, 3]);
      const value = r.pick([0n, 1n, BigInt(enableValue(4096)), BigInt(Cc.EN | (1 << Cc.SHN_SHIFT)), BigInt(Cc.EN | (2 << Cc.SHN_SHIFT)), BigInt(anyU32(r)), anyU64(r), GUEST_IOVA + 3n, 1n << 52n]);
      const data = Buffer.alloc(size);
      for (let i = 0; i < size; i++) data[i] = Number((value >> BigInt(8 * i)) & 0xffn);
      await wire.request(Command.REGION_WRITE, P.encodeRegionWriteRequest({ offset: BigInt(at), region: BAR0, data }));
      sent++;
      if (r.chance(0.3)) {
        await nvme.admin(nvme.randomAdmin());
        sent++;
      }
    }
    return sent;
  },

  async 'nvme-doorbells'({ wire, r, nvme }) {
    if (nvme === null) return 0;
    let sent = 0;
    if (r.chance(0.7)) {
      await nvme.createIoQueues();
      sent += 2;
    }
    // Some entries in the PRP list page, pointing anywhere.
    const list = Buffer.alloc(4096);
    for (let i = 0; i < 512; i++) list.writeBigUInt64LE(BigInt.asUintN(64, nvme.addr()), i * 8);
    fs.writeSync(nvme.fd, list, 0, 4096, G.prpList);
    for (let n = r.range(10, 60); n > 0; n--) {
      switch (r.int(6)) {
        case 0:
        case 1:
          await nvme.admin(nvme.randomAdmin());
          break;
        case 2:
        case 3:
          await nvme.io(nvme.randomIo());
          break;
        case 4: {
          // A wild doorbell value, or the doorbell of a queue that does not exist.
          const qid = r.chance(0.5) ? r.int(3) : r.pick([2, 63, 64, 65, 511, 1023]);
          const at = r.chance(0.5) ? sqTailDoorbell(qid, 4) : cqHeadDoorbell(qid, 4);
          await nvme.write(at, r.pick([0, 1, ADMIN_ENTRIES, ADMIN_ENTRIES - 1, IO_ENTRIES, 0xffff, 0x10000, 0xffffffff, r.u32()]));
          break;
        }
        default: {
          // Unaligned and odd-sized doorbell accesses, and reads.
          const at = 0x1000 + r.int(0x1000);
          if (r.chance(0.5)) await wire.request(Command.REGION_READ, P.encodeRegionReadRequest({ offset: BigInt(at), region: BAR0, count: r.pick([1, 2, 3, 4, 8, 16]) }));
          else await wire.request(Command.REGION_WRITE, P.encodeRegionWriteRequest({ offset: BigInt(at), region: BAR0, data: r.bytes(r.pick([1, 2, 3, 8, 16])) }));
        }
      }
      sent++;
      // Garbage straight into the queues in guest memory, behind the controller's back.
      if (r.chance(0.1)) fs.writeSync(nvme.fd, r.bytes(64), 0, 64, r.pick([G.asq, G.acq, G.iosq, G.iocq]) + 64 * r.int(ADMIN_ENTRIES));
    }
    return sent;
  },

  async 'doorbell-mmap'({ wire, r }) {
    const area = await doorbellFd(wire);
    if (area === null) return 1;
    try {
      const mem = binding.mmap(area.fd, area.fileOffset, area.size, binding.constants.PROT_READ | binding.constants.PROT_WRITE);
      const words = new Uint32Array(mem);
      for (let n = r.range(16, 256); n > 0; n--) words[r.int(words.length)] = r.chance(0.5) ? r.u32() : r.int(128);
      await sleep(r.int(5)); // let the controller's poller see them
      binding.munmap(mem);
    } catch {
      // the server would not let us map it: fine
    } finally {
      fs.closeSync(area.fd);
    }
    return 1;
  },

  async 'doorbell-truncate'({ wire, r, nvme }) {
    const area = await doorbellFd(wire);
    if (area === null) return 1;
    let sent = 1;
    try {
      fs.ftruncateSync(area.fd, r.chance(0.8) ? 0 : 1 << 30);
    } catch {
      // sealed against shrinking and growing: the defence this attack checks for
    } finally {
      fs.closeSync(area.fd);
    }
    // The server touches its doorbell page: a trapped doorbell write, and its poller.
    await wire.request(Command.REGION_WRITE, regWrite(sqTailDoorbell(0, 4), 1));
    await wire.request(Command.REGION_READ, P.encodeRegionReadRequest({ offset: BigInt(sqTailDoorbell(0, 4)), region: BAR0, count: 4 }));
    sent += 2;
    if (nvme !== null) {
      await nvme.admin(nvme.randomAdmin());
      sent++;
    }
    await sleep(15);
    return sent;
  },

  async burst({ w, r }) {
    // Many clients at once; one at most is served, the rest get EBUSY or wait their turn.
    const n = r.range(4, 24);
    const wires = [];
    for (let i = 0; i < n; i++) {
      try {
        wires.push(new Wire(w.proc.socket, r));
      } catch {
        // EAGAIN from a full backlog: what the attack is about
      }
    }
    await Promise.all(wires.map((c) => (r.chance(0.8) ? c.request(Command.VERSION, versionPayload(), null, 1000) : null)));
    for (const c of wires) c.close();
    return wires.length;
  },
};

/** DEVICE_GET_REGION_INFO of BAR0 with its fd (mmap doorbells): { fd, fileOffset, size } or null. */
async function doorbellFd(wire) {
  wire.keepFds = true;
  const reply = await wire.request(Command.DEVICE_GET_REGION_INFO, P.encodeRegionInfoRequest({ index: BAR0, argsz: 256 }));
  wire.keepFds = false;
  const fd = wire.kept.pop();
  for (const extra of wire.kept.splice(0)) fs.closeSync(extra);
  if (fd === undefined) return null;
  if (reply === null || reply.error !== 0) {
    fs.closeSync(fd);
    return null;
  }
  try {
    const info = P.decodeRegionInfoReply(reply.payload);
    const sparse = info.capabilities.find((c) => Array.isArray(c.areas));
    const first = sparse?.areas[0];
    if (first === undefined) throw new Error('no sparse area');
    return { fd, fileOffset: Number(info.offset) + Number(first.offset), size: Number(first.size) };
  } catch {
    fs.closeSync(fd);
    return null;
  }
}

// ---- a server under test ------------------------------------------------------------------------------

class ServerProc {
  constructor(name, dir) {
    this.name = name;
    this.dir = dir;
    this.generation = 0;
    this.processes = [];
  }

  async start() {
    this.generation++;
    this.socket = path.join(this.dir, `${this.name}-${this.generation}.sock`);
    const child = spawn(process.execPath, [CLI, 'serve', SERVERS[this.name][0], this.socket, ...SERVERS[this.name].slice(1), '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    this.exit = null;
    this.events = { connect: 0, disconnect: 0 };
    this.stderr = '';
    const proc = { pid: child.pid, args: SERVERS[this.name], exit: null };
    this.proc = proc;
    this.processes.push(proc);
    const exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => {
        this.exit = { code, signal };
        proc.exit = { code, signal };
        resolve();
      });
    });
    this.exited = exited;
    child.stderr.setEncoding('utf8').on('data', (s) => (this.stderr = (this.stderr + s).slice(-4000)));
    let ready;
    const isReady = new Promise((resolve) => (ready = resolve));
    let pending = '';
    child.stdout.setEncoding('utf8').on('data', (s) => {
      pending += s;
      let nl;
      while ((nl = pending.indexOf('\n')) !== -1) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        let event;
        try {
          event = JSON.parse(line).event;
        } catch {
          continue;
        }
        if (event === 'ready') ready();
        else if (event === 'connect') this.events.connect++;
        else if (event === 'disconnect') this.events.disconnect++;
      }
    });
    const timeout = sleep(15_000).then(() => 'timeout');
    const how = await Promise.race([isReady.then(() => 'ready'), exited.then(() => 'exited'), timeout]);
    if (how !== 'ready') throw new Error(`soak: ${this.name} server did not start (${how}): ${this.stderr.trim()}`);
  }

  get alive() {
    return this.exit === null;
  }

  fds() {
    try {
      return fs.readdirSync(`/proc/${this.child.pid}/fd`).length;
    } catch {
      return null;
    }
  }

  rssKiB() {
    try {
      const m = /^VmRSS:\s+(\d+)\s+kB$/m.exec(fs.readFileSync(`/proc/${this.child.pid}/status`, 'utf8'));
      return m === null ? null : Number(m[1]);
    } catch {
      return null;
    }
  }

  /** Waits until every client that connected has been cleaned up and the fd count holds still. */
  async settle(timeoutMs = 3000) {
    const end = Date.now() + timeoutMs;
    let last = -1;
    let steady = 0;
    while (Date.now() < end && this.alive) {
      const fds = this.fds();
      steady = fds === last && this.events.disconnect >= this.events.connect ? steady + 1 : 0;
      if (steady >= 3) return;
      last = fds;
      await sleep(30);
    }
  }

  async stop() {
    if (!this.alive) return;
    this.child.kill('SIGTERM');
    const done = await Promise.race([this.exited.then(() => true), sleep(5000).then(() => false)]);
    if (!done) {
      this.child.kill('SIGKILL');
      await this.exited;
    }
  }
}

/**
 * The liveness check: a fresh client gets a VERSION reply and reads the config space's first
 * dword, all within the deadline. The device may be busy for a moment while the server cleans up
 * after the last client (EBUSY or a refused connect): retried within the deadline.
 */
async function liveness(proc, r, expected) {
  const t0 = Date.now();
  const end = t0 + DEADLINE_MS;
  let why = 'no answer';
  while (Date.now() < end) {
    if (!proc.alive) return { ok: false, ms: Date.now() - t0, why: 'the server process is gone' };
    let wire;
    try {
      wire = new Wire(proc.socket, r);
    } catch (err) {
      why = `connect: ${err.code ?? err.message}`;
      await sleep(10);
      continue;
    }
    try {
      const v = await wire.request(Command.VERSION, versionPayload(), null, end - Date.now());
      if (v === null) {
        why = wire.eof ? 'hung up on VERSION' : 'no VERSION reply';
        if (!wire.eof) break;
        await sleep(5);
        continue;
      }
      if (v.error !== 0) {
        why = `VERSION: errno ${v.error}`;
        await sleep(5);
        continue;
      }
      const c = await wire.request(Command.REGION_READ, P.encodeRegionReadRequest({ offset: 0n, region: CONFIG, count: 4 }), null, Math.max(1, end - Date.now()));
      if (c === null || c.error !== 0 || c.payload.length !== 20) {
        why = c === null ? 'no config read reply' : `config read: errno ${c.error}`;
        break;
      }
      const ids = c.payload.readUInt32LE(16);
      if (expected.ids === undefined) expected.ids = ids;
      if (ids !== expected.ids) return { ok: false, ms: Date.now() - t0, why: `config IDs 0x${ids.toString(16)}, expected 0x${expected.ids.toString(16)}` };
      return { ok: true, ms: Date.now() - t0 };
    } finally {
      wire.close();
    }
  }
  return { ok: false, ms: Date.now() - t0, why };
}

// ---- one worker per server ------------------------------------------------------------------------------

const totals = { messages: 0, connections: 0, liveness: 0, attacks: {} };
const crashes = [];
const hangs = [];

class Worker {
  constructor(name, index, dir, budgets) {
    this.server = name;
    this.r = prng((SEED + Math.imul(index + 1, 0x9e3779b9)) >>> 0);
    this.proc = new ServerProc(name, dir);
    this.pool = new FdPool(`${name}`, dir);
    this.budgets = budgets;
    this.expected = {};
    this.liveMs = [];
    this.messages = 0;
    this.connections = 0;
    this.replies = 0;
    this.hangups = 0;
    this.enabled = 0;
    const applies = (n) => !skipped.has(n) && (ATTACKS[n].servers === undefined || ATTACKS[n].servers.includes(name));
    this.bulkWeights = Object.entries(ATTACKS).filter(([n, a]) => a.bulk !== undefined && applies(n)).map(([n, a]) => [n, a.bulk]);
    if (this.bulkWeights.length === 0) this.bulkWeights = [['valid', 1]];
    this.endWeights = Object.entries(ATTACKS).filter(([n, a]) => a.ends !== undefined && applies(n)).map(([n, a]) => [n, a.ends]);
    this.framedWeights = this.bulkWeights.filter(([n]) => n === 'valid' || n === 'fds' || n === 'random-header');
    if (this.framedWeights.length === 0) this.framedWeights = [['valid', 1]];
    this.targeted = Object.keys(TARGETED).filter(applies);
    this.attackOn = (n) => applies(n);
  }

  async start() {
    await this.proc.start();
    // The baseline: after one client came and went, so what the first connection sets up lazily
    // (code, buffers, the pools of the libuv thread) is in it.
    await this.check(null);
    await this.proc.settle();
    this.before = { fds: this.proc.fds(), rssKiB: this.proc.rssKiB() };
    this.proc.proc.before = this.before;
  }

  /** After a connection: the server must be alive and must answer a fresh client. */
  async check(connection) {
    const live = await liveness(this.proc, this.r, this.expected);
    totals.liveness++;
    this.liveMs.push(live.ms);
    if (!this.proc.alive || !live.ok) {
      await sleep(50); // let an exit be reported
      const record = { server: this.server, pid: this.proc.child.pid, connection: connection?.index ?? null, attacks: connection?.attacks ?? [], seed: SEED };
      if (!this.proc.alive) {
        crashes.push({ ...record, exit: this.proc.exit, stderr: this.proc.stderr.trim().split('\n').slice(-6).join('\n') });
      } else {
        hangs.push({ ...record, why: live.why, ms: live.ms });
      }
      if (!opts.quiet) console.error(`soak: ${this.server}: ${this.proc.alive ? `HANG (${live.why})` : `CRASH ${JSON.stringify(this.proc.exit)}`} after connection ${record.connection} [${record.attacks.join(', ')}]`);
      await this.proc.stop();
      this.proc.proc.after = { fds: null, rssKiB: null };
      await this.proc.start();
      await this.check(null);
      await this.proc.settle();
      this.proc.proc.before = { fds: this.proc.fds(), rssKiB: this.proc.rssKiB() };
    }
  }

  async run() {
    // A connection the server ended early leaves part of its budget: the next one carries it.
    const queue = [...this.budgets];
    let carry = 0;
    let extra = 0;
    while (queue.length > 0 || (carry > 0 && extra++ < this.budgets.length + 10)) {
      const budget = (queue.shift() ?? 0) + carry;
      const connection = { index: totals.connections++, attacks: [] };
      let sent = 0;
      try {
        sent = await this.connection(budget, connection);
      } catch (err) {
        if (err.stall) hangs.push({ server: this.server, pid: this.proc.child.pid, connection: connection.index, attacks: connection.attacks, why: err.message, seed: SEED });
        else if (!(err instanceof PeerGone)) throw err;
        sent = connection.sent ?? sent;
      }
      this.current = null;
      carry = Math.max(0, budget - sent);
      this.messages += sent;
      totals.messages += sent;
      this.connections++;
      connection.attacks.push(...(connection.kinds ?? []));
      for (const a of new Set(connection.attacks)) totals.attacks[a] = (totals.attacks[a] ?? 0) + 1;
      await this.check(connection);
    }
  }

  /** One hostile client: returns the messages it sent. */
  async connection(budget, connection) {
    const r = this.r;
    const state = connection;
    this.current = state;
    state.sent = 0;
    state.kinds = new Set();
    let wire;
    for (let i = 0; ; i++) {
      try {
        wire = new Wire(this.proc.socket, r);
        break;
      } catch (err) {
        if (i > 200 || !this.proc.alive) throw new PeerGone(`connect: ${err.code}`);
        await sleep(5);
      }
    }
    let guest = null;
    try {
      if (!skipped.has('pre-version') && r.chance(0.06)) {
        // No VERSION at all: the server must refuse everything, or hang up.
        state.attacks.push('pre-version');
        const n = Math.min(budget, r.range(1, 24));
        for (let i = 0; i < n && !wire.eof; i++) {
          const m = r.chance(0.3) ? mutate(r, message(r.int(0x8000), Command.VERSION, versionPayload(r)), r.chance(0.2)) : bulkMessage(r, this, state.kinds, this.bulkWeights, r.chance(0.1)).bytes;
          await wire.send(m);
          state.sent++;
        }
        await sleep(2);
        return state.sent;
      }
      for (let tries = 0; ; tries++) {
        const v = await wire.request(Command.VERSION, versionPayload(r));
        state.sent++;
        if (v !== null && v.error === 0) break;
        wire.close();
        if (tries > 50 || !this.proc.alive) return state.sent;
        await sleep(10);
        try {
          wire = new Wire(this.proc.socket, r);
        } catch (err) {
          throw new PeerGone(`connect: ${err.code}`);
        }
      }

      // Guest memory, and for NVMe a controller enabled the proper way: the ground the targeted
      // attacks stand on.
      let nvme = null;
      if (r.chance(0.8)) {
        guest = { fd: memfd('soak-guest', GUEST_SIZE), truncated: false };
        const map = await dmaMap(wire, guest.fd, GUEST_IOVA, GUEST_SIZE);
        state.sent++;
        if (map !== null && map.error === 0 && this.server.startsWith('nvme') && r.chance(0.85)) {
          const candidate = new Nvme(wire, guest.fd, r);
          const ready = await candidate.enable();
          state.sent += candidate.sent;
          candidate.sent = 0;
          if (ready) {
            nvme = candidate;
            this.enabled++;
          }
        }
      }

      // A few targeted attacks, interleaved with bulk messages that keep the stream's framing
      // (the targeted ones need their replies), then the rest of the bulk: anything goes.
      const targeted = [];
      for (let k = r.range(0, 3); k > 0 && this.targeted.length > 0; k--) targeted.push(r.pick(this.targeted));
      const framed = Math.floor((budget - state.sent) * r.next() * 0.5);
      const ending = this.endWeights.length > 0 && r.chance(0.7) ? Math.min(budget - state.sent - 1, r.range(1, 3)) : 0;
      for (let s = 0; s <= targeted.length; s++) {
        const n = s < targeted.length ? Math.floor(framed / (targeted.length + 1)) : budget - state.sent - Math.max(0, ending);
        await this.bulk(wire, n, state, s < targeted.length ? this.framedWeights : this.bulkWeights);
        if (s < targeted.length && !wire.eof) {
          const name = targeted[s];
          state.attacks.push(name);
          if (name === 'dma-truncate' && guest === null) continue;
          const before = nvme?.sent ?? 0;
          state.sent += await TARGETED[name]({ wire, r, w: this, nvme, guest });
          state.sent += (nvme?.sent ?? 0) - before;
          if (guest?.truncated) nvme = null;
        }
      }
      // The stream's last messages: what the server may rightly hang up on, or read on past.
      for (let i = 0; i < ending && !wire.eof; i++) {
        const m = bulkMessage(r, this, state.kinds, this.endWeights, true);
        await wire.send(m.bytes, m.fds);
        state.sent++;
      }
      if (!wire.eof && this.attackOn('truncated') && r.chance(0.15)) {
        // Half a message, then gone.
        state.attacks.push('truncated');
        const [command, payload] = validCommand(r, this);
        const m = message(r.int(0x8000), command, payload);
        await wire.send(m.subarray(0, r.range(1, m.length - 1)));
        state.sent++;
      } else if (!wire.eof) {
        await wire.barrier(200);
        state.sent++;
      }
      return state.sent;
    } finally {
      this.replies += wire.replies;
      if (wire.eof) this.hangups++;
      wire.close();
      if (guest !== null) fs.closeSync(guest.fd);
    }
  }

  /** `n` bulk messages, sent in batches; those carrying fds go alone (fds ride the first byte). */
  async bulk(wire, n, state, weights) {
    const r = this.r;
    let left = n;
    while (left > 0 && !wire.eof) {
      const batch = [];
      const size = Math.min(left, r.range(1, 48));
      let bytes = 0;
      for (let i = 0; i < size; i++) {
        const m = bulkMessage(r, this, state.kinds, weights);
        if (m.fds !== null && m.fds.length > 0) {
          if (batch.length > 0) break;
          await wire.send(m.bytes, m.fds);
          batch.push(m.bytes);
          bytes = -1;
          break;
        }
        batch.push(m.bytes);
        bytes += m.bytes.length;
      }
      if (bytes >= 0) await wire.send(batch.length === 1 ? batch[0] : Buffer.concat(batch, bytes));
      left -= batch.length;
      state.sent += batch.length;
      await tick(); // let replies (and the server's DMA requests) in
    }
  }

  async finish() {
    await this.proc.settle();
    this.after = { fds: this.proc.fds(), rssKiB: this.proc.rssKiB() };
    this.proc.proc.after = this.after;
    await this.proc.stop();
    this.pool.close();
  }

  report() {
    const ms = [...this.liveMs].sort((a, b) => a - b);
    const q = (p) => ms[Math.min(ms.length - 1, Math.floor(p * ms.length))] ?? null;
    const last = this.proc.processes[this.proc.processes.length - 1];
    return {
      name: this.server,
      command: `vfio-user serve ${SERVERS[this.server][0]} SOCK ${SERVERS[this.server].slice(1).join(' ')}`.trim(),
      messages: this.messages,
      connections: this.connections,
      replies: this.replies,
      hungUpOn: this.hangups,
      ...(this.server.startsWith('nvme') ? { controllerEnabled: this.enabled } : {}),
      restarts: this.proc.processes.length - 1,
      fds: { before: last.before?.fds ?? null, after: last.after?.fds ?? null },
      rssKiB: { before: last.before?.rssKiB ?? null, after: last.after?.rssKiB ?? null },
      liveness: { checks: ms.length, p50Ms: q(0.5), p99Ms: q(0.99), maxMs: ms[ms.length - 1] ?? null },
      processes: this.proc.processes.map((p) => ({ pid: p.pid, exit: p.exit, before: p.before ?? null, after: p.after ?? null })),
    };
  }
}

/** Message budgets per connection: random around the mean, summing to exactly TOTAL. */
function plan(r) {
  const budgets = [];
  let left = TOTAL;
  for (let i = 0; i < CONNECTIONS; i++) {
    const mean = left / (CONNECTIONS - i);
    const b = i === CONNECTIONS - 1 ? left : Math.max(1, Math.min(left - (CONNECTIONS - i - 1), Math.round(mean * (0.25 + 1.5 * r.next()))));
    budgets.push(b);
    left -= b;
  }
  return budgets;
}

// ---- main ---------------------------------------------------------------------------------------------

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-soak-'));
const ownFds = () => fs.readdirSync('/proc/self/fd').length;
let ownFdsBefore = null;
let ownFdsAfter = null;
const t0 = Date.now();
const budgets = plan(prng(SEED));
const workers = serverNames.map((name, i) => new Worker(name, i, dir, budgets.filter((_, k) => k % serverNames.length === i)));
let progress = null;
let exitCode = 0;
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => {
    // Leave no server behind.
    for (const w of workers) if (w.proc.child !== undefined && w.proc.alive) w.proc.child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
    process.exit(130);
  });
}
try {
  await Promise.all(workers.map((w) => w.start()));
  ownFdsBefore = ownFds();
  const started = Date.now();
  let lastAt = started;
  let lastMessages = 0;
  if (!opts.quiet) {
    progress = setInterval(() => {
      const now = Date.now();
      const messages = totals.messages + workers.reduce((n, w) => n + (w.current?.sent ?? 0), 0);
      const rate = ((messages - lastMessages) * 1000) / (now - lastAt);
      lastAt = now;
      lastMessages = messages;
      console.error(`soak: ${messages}/${TOTAL} messages, ${totals.connections} connections, ${Math.round(rate)} msg/s, crashes ${crashes.length}, hangs ${hangs.length}`);
    }, 1000);
  }
  await Promise.all(workers.map((w) => w.run()));
  const seconds = (Date.now() - started) / 1000;
  if (progress !== null) clearInterval(progress);
  ownFdsAfter = ownFds();
  await Promise.all(workers.map((w) => w.finish()));
  const servers = workers.map((w) => w.report());
  const fdsBack = servers.every((s) => s.fds.before !== null && s.fds.after === s.fds.before);
  const report = {
    messages: totals.messages,
    connections: totals.connections,
    crashes: crashes.length,
    hangs: hangs.length,
    fdsBackToBaseline: fdsBack,
    seconds: Number(seconds.toFixed(1)),
    messagesPerSecond: Math.round(totals.messages / seconds),
    livenessChecks: totals.liveness,
    seed: SEED,
    skipped: [...skipped],
    servers,
    crashDetails: crashes,
    hangDetails: hangs,
    attacks: totals.attacks,
    soakFds: { before: ownFdsBefore, after: ownFdsAfter },
    machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model ?? null, loadavg: os.loadavg().map((l) => Number(l.toFixed(2))), node: process.version, totalMemGiB: Number((os.totalmem() / GiB).toFixed(1)) },
  };
  console.log(opts.json ? JSON.stringify(report) : JSON.stringify(report, null, 2));
  exitCode = crashes.length === 0 && hangs.length === 0 && fdsBack ? 0 : 1;
} catch (err) {
  console.error(`soak: ${err.stack ?? err}`);
  exitCode = 2;
} finally {
  if (progress !== null) clearInterval(progress);
  await Promise.all(workers.map((w) => w.proc.stop().catch(() => {})));
  fs.rmSync(dir, { recursive: true, force: true });
}
process.exit(exitCode);
