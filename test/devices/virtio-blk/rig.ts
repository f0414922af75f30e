/**
 * A test driver for {@link VirtioBlkDevice} on top of the virtio test rig: builds block requests
 * (header, data buffers, status byte) in guest memory, in whatever descriptor layout a test wants.
 */
import { RamBackend, type BlockBackend } from '../../../lib/block';
import { VirtioBlkDevice, type VirtioBlkOptions } from '../../../lib/devices/virtio-blk';
import { BlkReqHeader, BlkStatus } from '../../../lib/virtio/spec';
import { VirtioRig, type Buf, type InitOptions } from '../../virtio/rig';

export { pattern, tick } from '../../virtio/rig';

export interface BlkRigOptions extends Partial<VirtioBlkOptions> {
  /** Guest memory (default 32 MiB). */
  memory?: number;
  /** Backend size when no backend is given (default 8 MiB). */
  diskSize?: number;
}

export interface RequestOptions {
  /** Data to write (OUT) or the device-readable payload (DISCARD / WRITE_ZEROES ranges). */
  out?: Buffer;
  /** Bytes of device-writable data (IN, GET_ID). */
  inLen?: number;
  /** Split the data into this many buffers (default 1). */
  segments?: number;
  /** Use one indirect table. */
  indirect?: boolean;
  /** Put the header in two buffers (8 + 8 bytes). */
  splitHeader?: boolean;
  /** Put the status byte in the same buffer as the IN data. */
  statusWithData?: boolean;
  /** Override the data addresses (e.g. outside the maps). */
  dataAddr?: number;
  /** Override the status byte's address. */
  statusAddr?: number;
  /** Leave out the status byte / the header. */
  noStatus?: boolean;
  headerLen?: number;
  /** Reserved field of the header. */
  reserved?: number;
}

/** A request placed in guest memory. */
export interface Placed {
  head: number;
  statusAt: number;
  /** Where the IN data lands (contiguous in guest memory), and its length. */
  inAt: number;
  inLen: number;
}

export interface Done {
  status: number;
  len: number;
  /** The IN data read back. */
  data: Buffer;
}

export class BlkRig extends VirtioRig<VirtioBlkDevice> {
  constructor(options: BlkRigOptions = {}) {
    const backend: BlockBackend = options.backend ?? new RamBackend(options.diskSize ?? 8 << 20);
    const { memory, diskSize: _d, ...rest } = options;
    super(new VirtioBlkDevice({ queues: 2, ...rest, backend }), { memory: memory ?? 32 << 20 });
  }

  override init(options: InitOptions = {}): Promise<bigint> {
    return super.init(options);
  }

  /** Builds a request on queue `qi` and publishes it (no notify). */
  place(qi: number, type: number, sector: number | bigint, o: RequestOptions = {}): Placed {
    const q = this.queues[qi]!;
    const chain: Buf[] = [];
    const hlen = o.headerLen ?? BlkReqHeader.SIZE;
    const hdr = this.alloc(Math.max(hlen, BlkReqHeader.SIZE), 16);
    this.mem.writeUInt32LE(type >>> 0, hdr + BlkReqHeader.TYPE);
    this.mem.writeUInt32LE(o.reserved ?? 0, hdr + BlkReqHeader.RESERVED);
    this.mem.writeBigUInt64LE(BigInt(sector), hdr + BlkReqHeader.SECTOR);
    if (o.splitHeader) chain.push({ addr: hdr, len: 8 }, { addr: hdr + 8, len: 8 });
    else if (hlen > 0) chain.push({ addr: hdr, len: hlen });
    const segs = o.segments ?? 1;
    if (o.out !== undefined && o.out.length > 0) {
      const at = o.dataAddr ?? this.alloc(o.out.length, 512);
      if (o.dataAddr === undefined) o.out.copy(this.mem, at);
      pieces(at, o.out.length, segs).forEach(([a, n]) => chain.push({ addr: a, len: n }));
    }
    let inAt = 0;
    const inLen = o.inLen ?? 0;
    const statusInData = o.statusWithData === true && inLen > 0;
    let statusAt: number;
    if (inLen > 0) {
      inAt = o.dataAddr ?? this.alloc(inLen + 1, 512);
      if (o.dataAddr === undefined) this.mem.fill(0xee, inAt, inAt + inLen);
      const parts = pieces(inAt, inLen, segs);
      if (statusInData && !o.noStatus) {
        const last = parts[parts.length - 1]!;
        last[1] += 1;
        statusAt = inAt + inLen;
      } else statusAt = o.statusAddr ?? this.alloc(1, 1);
      parts.forEach(([a, n]) => chain.push({ addr: a, len: n, write: true }));
    } else statusAt = o.statusAddr ?? this.alloc(1, 1);
    if (!statusInData && !o.noStatus) chain.push({ addr: statusAt, len: 1, write: true });
    if (statusAt < this.memSize) this.mem[statusAt] = 0xff;
    const head = q.add(chain, { indirect: o.indirect ?? false });
    return { head, statusAt, inAt, inLen };
  }

  /** Places, kicks and waits for one request. */
  async request(qi: number, type: number, sector: number | bigint, o: RequestOptions = {}): Promise<Done> {
    const p = this.place(qi, type, sector, o);
    const q = this.queues[qi]!;
    q.kick();
    const used = await this.waitUsed(q);
    if (used[0]!.id !== p.head) throw new Error(`expected head ${p.head}, got ${used[0]!.id}`);
    return this.result(p, used[0]!.len);
  }

  result(p: Placed, len: number): Done {
    return {
      status: p.statusAt < this.memSize ? this.mem[p.statusAt]! : -1,
      len,
      data: Buffer.from(this.mem.subarray(p.inAt, p.inAt + p.inLen)),
    };
  }

  /** Builds the payload of a DISCARD / WRITE_ZEROES request. */
  static ranges(list: { sector: number | bigint; sectors: number; flags?: number }[]): Buffer {
    const b = Buffer.alloc(16 * list.length);
    list.forEach((r, i) => {
      b.writeBigUInt64LE(BigInt(r.sector), i * 16);
      b.writeUInt32LE(r.sectors >>> 0, i * 16 + 8);
      b.writeUInt32LE((r.flags ?? 0) >>> 0, i * 16 + 12);
    });
    return b;
  }
}

/** Splits `[at, at + length)` into `n` contiguous pieces (the last one takes the rest). */
function pieces(at: number, length: number, n: number): [number, number][] {
  const out: [number, number][] = [];
  const each = Math.max(1, Math.floor(length / n));
  let done = 0;
  for (let i = 0; i < n && done < length; i++) {
    const len = i === n - 1 ? length - done : Math.min(each, length - done);
    out.push([at + done, len]);
    done += len;
  }
  return out;
}

export const OK = BlkStatus.OK;
export const IOERR = BlkStatus.IOERR;
export const UNSUPP = BlkStatus.UNSUPP;
