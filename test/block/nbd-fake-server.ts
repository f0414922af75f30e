/**
 * A scripted NBD server for tests: a correct in-memory export by default, with hooks that make it
 * lie (bad handles, short reads, oversized chunks, shrinking on restart), hang, or die exactly
 * when a test wants. Listens on a UNIX socket only.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { nbdProtocol as P } from '../../lib/block';

const { Chunk, ChunkFlags, Cmd, Info, Option, Reply, TransmissionFlags: F } = P;

export interface FakeOptions {
  size?: number;
  /** Transmission flags (default: HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN | SEND_FAST_ZERO). */
  flags?: number;
  exportName?: string;
  /** Handshake flags offered (default FIXED_NEWSTYLE | NO_ZEROES). */
  handshakeFlags?: number;
  /** Answer NBD_OPT_STRUCTURED_REPLY with ACK (default true). */
  structured?: boolean;
  /** Know NBD_OPT_GO (default true). */
  go?: boolean;
  /** NBD_INFO_BLOCK_SIZE to send (default none). */
  blockSize?: { min: number; preferred: number; max: number };
  /** Reads answered in chunks of this many bytes, last chunk first (default: one chunk). */
  chunk?: number;
  /** Reply to reads with a hole chunk for all-zero chunks (default false). */
  holes?: boolean;
  /** Delay before each reply, ms (default 0). */
  delayMs?: number;
  /** Connections served at once; more are accepted and never greeted (default: no limit). */
  maxConnections?: number;
}

export interface FakeRequest extends P.Request {
  conn: number;
  data: Buffer | null;
}

/** What a hook may do with a request: reply normally (return undefined) or take it over. */
export type Hook = (req: FakeRequest, io: FakeConnection) => 'handled' | undefined | void;

export class FakeConnection {
  structured = false;
  constructor(
    readonly id: number,
    readonly socket: net.Socket,
    readonly server: FakeNbdServer,
  ) {}

  send(b: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(b);
  }

  simple(req: FakeRequest, error = 0, data?: Buffer): void {
    this.send(data ? Buffer.concat([P.encodeSimpleReply(error, req.handle), data]) : P.encodeSimpleReply(error, req.handle));
  }

  chunk(req: FakeRequest, flags: number, type: number, payload?: Buffer, length?: number): void {
    this.send(P.encodeChunk(flags, type, req.handle, payload, length));
  }

  dataChunk(req: FakeRequest, at: number, data: Buffer, done: boolean): void {
    const p = Buffer.alloc(8 + data.length);
    p.writeBigUInt64BE(BigInt(at), 0);
    data.copy(p, 8);
    this.chunk(req, done ? ChunkFlags.DONE : 0, Chunk.OFFSET_DATA, p);
  }

  holeChunk(req: FakeRequest, at: number, n: number, done: boolean): void {
    const p = Buffer.alloc(12);
    p.writeBigUInt64BE(BigInt(at), 0);
    p.writeUInt32BE(n, 8);
    this.chunk(req, done ? ChunkFlags.DONE : 0, Chunk.OFFSET_HOLE, p);
  }

  errorChunk(req: FakeRequest, errno: number, message: string, done = true): void {
    const m = Buffer.from(message);
    const p = Buffer.alloc(6 + m.length);
    p.writeUInt32BE(errno, 0);
    p.writeUInt16BE(m.length, 4);
    m.copy(p, 6);
    this.chunk(req, done ? ChunkFlags.DONE : 0, Chunk.ERROR, p);
  }

  /** The default, correct reply. */
  reply(req: FakeRequest): void {
    const s = this.server;
    const o = s.options;
    const disk = s.disk;
    const end = req.offset + req.length;
    const bad = end > disk.length;
    const error = (errno: number) => (this.structured ? this.errorChunk(req, errno, 'bad request') : this.simple(req, errno));
    switch (req.type) {
      case Cmd.READ: {
        if (bad) return error(22);
        const data = disk.subarray(req.offset, end);
        if (!this.structured) return this.simple(req, 0, Buffer.from(data));
        const step = o.chunk ?? req.length;
        const pieces: [number, number][] = [];
        for (let at = 0; at < req.length; at += step) pieces.push([at, Math.min(step, req.length - at)]);
        pieces.reverse(); // out of order: last first
        pieces.forEach(([at, n], i) => {
          const piece = data.subarray(at, at + n);
          const done = i === pieces.length - 1;
          if (o.holes && piece.every((x) => x === 0)) this.holeChunk(req, req.offset + at, n, done);
          else this.dataChunk(req, req.offset + at, piece, done);
        });
        return;
      }
      case Cmd.WRITE:
        if (s.flags & F.READ_ONLY) return error(1);
        if (bad) return error(28);
        req.data!.copy(disk, req.offset);
        return this.simple(req);
      case Cmd.WRITE_ZEROES:
      case Cmd.TRIM:
        if (s.flags & F.READ_ONLY) return error(1);
        if (bad) return error(28);
        if (req.type === Cmd.WRITE_ZEROES && req.flags & P.CmdFlags.FAST_ZERO && s.fastZeroFails) return error(95);
        disk.fill(0, req.offset, end);
        return this.structured ? this.chunk(req, ChunkFlags.DONE, Chunk.NONE) : this.simple(req);
      case Cmd.FLUSH:
        return this.simple(req);
      default:
        return error(22);
    }
  }
}

export class FakeNbdServer {
  readonly dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-fake-'));
  readonly socket = path.join(this.dir, 'nbd.sock');
  disk: Buffer;
  flags: number;
  /** FAST_ZERO write zeroes fail with ENOTSUP. */
  fastZeroFails = false;
  readonly requests: FakeRequest[] = [];
  readonly connections: FakeConnection[] = [];
  /** Commands in flight (received, not yet replied to by the default path) per connection, maximum seen. */
  maxInFlight = 0;
  hook: Hook | null = null;
  #server: net.Server | null = null;
  #nextConn = 0;
  #inFlight = new Map<number, number>();

  constructor(readonly options: FakeOptions = {}) {
    this.disk = Buffer.alloc(options.size ?? 1 << 20);
    this.flags = options.flags ?? F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES | F.CAN_MULTI_CONN | F.SEND_FAST_ZERO;
  }

  get uri(): string {
    return `nbd+unix:///${this.options.exportName ?? ''}?socket=${this.socket}`;
  }

  /** Connections open now. */
  get open(): FakeConnection[] {
    return this.connections.filter((c) => !c.socket.destroyed);
  }

  listen(): Promise<void> {
    const server = net.createServer((s) => this.#serve(s));
    this.#server = server;
    return new Promise((resolve) => server.listen(this.socket, resolve));
  }

  /** Stops listening and drops every connection (the server died). */
  async kill(): Promise<void> {
    const server = this.#server;
    this.#server = null;
    for (const c of this.connections) c.socket.destroy();
    for (const c of this.ignored) c.destroy();
    if (server) await new Promise((resolve) => server.close(resolve));
    fs.rmSync(this.socket, { force: true });
  }

  async close(): Promise<void> {
    await this.kill();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  /** Connections accepted beyond maxConnections (held, never greeted). */
  readonly ignored: net.Socket[] = [];

  #serve(socket: net.Socket): void {
    if (this.options.maxConnections !== undefined && this.open.length >= this.options.maxConnections) {
      socket.on('error', () => {});
      this.ignored.push(socket);
      return;
    }
    const conn = new FakeConnection(this.#nextConn++, socket, this);
    this.connections.push(conn);
    socket.on('error', () => {});
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    const o = this.options;
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(P.NBDMAGIC, 0);
    greeting.writeBigUInt64BE(P.IHAVEOPT, 8);
    greeting.writeUInt16BE(o.handshakeFlags ?? P.HandshakeFlags.FIXED_NEWSTYLE | P.HandshakeFlags.NO_ZEROES, 16);
    socket.write(greeting);
    let noZeroes = false;
    const optReply = (option: number, type: number, data = Buffer.alloc(0)) => {
      const h = Buffer.alloc(20);
      h.writeBigUInt64BE(P.OPTION_REPLY_MAGIC, 0);
      h.writeUInt32BE(option, 8);
      h.writeUInt32BE(type >>> 0, 12);
      h.writeUInt32BE(data.length, 16);
      socket.write(Buffer.concat([h, data]));
    };
    const exportInfo = () => {
      const b = Buffer.alloc(12);
      b.writeUInt16BE(Info.EXPORT, 0);
      b.writeBigUInt64BE(BigInt(this.disk.length), 2);
      b.writeUInt16BE(this.flags, 10);
      return b;
    };
    socket.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          noZeroes = (buf.readUInt32BE(0) & 2) !== 0;
          buf = buf.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buf.length < 16) return;
          const option = buf.readUInt32BE(8);
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          const data = buf.subarray(16, 16 + len);
          buf = buf.subarray(16 + len);
          if (option === Option.STRUCTURED_REPLY) {
            if (o.structured ?? true) {
              conn.structured = true;
              optReply(option, Reply.ACK);
            } else optReply(option, Reply.ERR_UNSUP);
          } else if (option === Option.GO) {
            if (!(o.go ?? true)) {
              optReply(option, Reply.ERR_UNSUP);
              continue;
            }
            const nameLen = data.readUInt32BE(0);
            const name = data.toString('utf8', 4, 4 + nameLen);
            if (name !== (o.exportName ?? '')) {
              optReply(option, Reply.ERR_UNKNOWN, Buffer.from(`no export ${name}`));
              continue;
            }
            optReply(option, Reply.INFO, exportInfo());
            if (o.blockSize) {
              const b = Buffer.alloc(14);
              b.writeUInt16BE(Info.BLOCK_SIZE, 0);
              b.writeUInt32BE(o.blockSize.min, 2);
              b.writeUInt32BE(o.blockSize.preferred, 6);
              b.writeUInt32BE(o.blockSize.max, 10);
              optReply(option, Reply.INFO, b);
            }
            optReply(option, Reply.ACK);
            phase = 'transmission';
          } else if (option === Option.EXPORT_NAME) {
            if (data.toString('utf8') !== (o.exportName ?? '')) {
              socket.destroy();
              return;
            }
            const b = Buffer.alloc(noZeroes ? 10 : 134);
            b.writeBigUInt64BE(BigInt(this.disk.length), 0);
            b.writeUInt16BE(this.flags, 8);
            socket.write(b);
            phase = 'transmission';
          } else {
            optReply(option, Reply.ERR_UNSUP);
          }
        } else {
          if (buf.length < 28) return;
          const r = P.decodeRequest(buf);
          const dataLen = r.type === Cmd.WRITE ? r.length : 0;
          if (buf.length < 28 + dataLen) return;
          const req: FakeRequest = { ...r, conn: conn.id, data: dataLen > 0 ? Buffer.from(buf.subarray(28, 28 + dataLen)) : null };
          buf = buf.subarray(28 + dataLen);
          if (req.type === Cmd.DISC) {
            socket.end();
            return;
          }
          this.requests.push(req);
          if (this.hook?.(req, conn) === 'handled') continue;
          const n = (this.#inFlight.get(conn.id) ?? 0) + 1;
          this.#inFlight.set(conn.id, n);
          this.maxInFlight = Math.max(this.maxInFlight, n);
          const answer = () => {
            this.#inFlight.set(conn.id, this.#inFlight.get(conn.id)! - 1);
            conn.reply(req);
          };
          if (o.delayMs) setTimeout(answer, o.delayMs);
          else answer();
        }
      }
    });
  }
}

/** Requests of a type. */
export function ofType(server: FakeNbdServer, type: number): FakeRequest[] {
  return server.requests.filter((r) => r.type === type);
}
