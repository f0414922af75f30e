/**
 * Server fixtures: a tiny test device, a server on a temporary socket, and a raw client that sends
 * hand-built payloads and returns the reply bytes or the errno.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { binding } from '../../lib/native/binding';
import { Fd } from '../../lib/native/fd';
import { Connection } from '../../lib/transport/connection';
import { VfioUserServer, type ServerOptions } from '../../lib/server/server';
import type { DeviceContext, DeviceRegion, VfioUserDevice } from '../../lib/server/device';
import { Command, DeviceFlags, RegionInfoFlags } from '../../lib/protocol/constants';
import { VfioUserError } from '../../lib/protocol/errors';
import { encodeVersion } from '../../lib/protocol/messages/version';

export function tempSocketPath(name = 'vfio-user.sock'): { dir: string; path: string } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-test-'));
  return { dir, path: path.join(dir, name) };
}

/** A device with a 256-byte config region (7) and a 4 KiB RAM-like BAR0, plus a log of calls. */
export class TestDevice implements VfioUserDevice {
  readonly flags = DeviceFlags.PCI | DeviceFlags.RESET;
  readonly config = Buffer.alloc(256);
  readonly bar0 = Buffer.alloc(4096);
  readonly calls: string[] = [];
  ctx: DeviceContext | null = null;
  readonly regions: (DeviceRegion | null)[];
  readonly irqs = [{ count: 1 }, { count: 4 }, { count: 8 }, { count: 1 }, { count: 1 }];

  constructor() {
    const mem = (buf: Buffer, name: string): DeviceRegion => ({
      size: buf.length,
      flags: RegionInfoFlags.READ | RegionInfoFlags.WRITE,
      read: (offset, dst) => {
        buf.copy(dst, 0, offset, offset + dst.length);
      },
      write: (offset, src) => {
        this.calls.push(`${name} write ${offset} ${src.length}`);
        src.copy(buf, offset);
      },
    });
    this.config.writeUInt16LE(0x1234, 0);
    this.config.writeUInt16LE(0x5678, 2);
    this.regions = [mem(this.bar0, 'bar0'), null, null, null, null, null, null, mem(this.config, 'config'), null];
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
  }

  reset(reason: string): void {
    this.calls.push(`reset ${reason}`);
  }
}

export interface RawClient {
  conn: Connection;
  /** Send `command` with `payload` (and fds); resolve with the reply payload, or the errno. */
  msg(command: number, payload?: Uint8Array | null, fds?: number[]): Promise<Buffer | number>;
  close(): void;
}

/** Connect to `socketPath`; if `negotiate`, do a VERSION exchange like QEMU's first. */
export async function rawClient(socketPath: string, negotiate = true): Promise<RawClient> {
  const conn = new Connection(new Fd(binding.unixConnect(socketPath)), { name: 'raw-client', maxSendFds: 16 });
  const client: RawClient = {
    conn,
    msg: async (command, payload, fds) => {
      try {
        const r = await conn.request(command, payload ?? null, { fds: fds ?? null });
        Fd.closeAll(r.fds);
        return r.payload;
      } catch (err) {
        if (err instanceof VfioUserError) return err.errno;
        throw err;
      }
    },
    close: () => conn.close(),
  };
  if (negotiate) {
    const reply = await client.msg(Command.VERSION, qemuVersionRequest());
    if (typeof reply === 'number') throw new Error(`VERSION failed: errno ${reply}`);
  }
  return client;
}

/** QEMU 11.1's VERSION proposal (peers.md §2). */
export function qemuVersionRequest(): Buffer {
  return encodeVersion({
    major: 0,
    minor: 0,
    document: {
      capabilities: {
        max_msg_fds: 16n,
        max_data_xfer_size: 1048576n,
        pgsizes: 4096n,
        max_dma_maps: 65535n,
        migration: { max_bitmap_size: 268435456n, pgsize: 4096n },
        write_multiple: true,
      },
    },
  });
}

export async function startServer(device: VfioUserDevice = new TestDevice(), options: ServerOptions = {}) {
  const { dir, path: socketPath } = tempSocketPath();
  const server = await VfioUserServer.listen(socketPath, device, options);
  return {
    server,
    socketPath,
    device,
    async stop() {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

export function regionAccess(region: number, offset: number, count: number, data?: Uint8Array): Buffer {
  const b = Buffer.alloc(16 + (data?.length ?? 0));
  b.writeBigUInt64LE(BigInt(offset), 0);
  b.writeUInt32LE(region, 8);
  b.writeUInt32LE(count, 12);
  if (data) b.set(data, 16);
  return b;
}
