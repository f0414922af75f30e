/**
 * A verifying random read/write workload through {@link NvmeDriver}, for migration and reconnect
 * tests: every write puts a block-specific pattern (LBA and a version) in a 4 KiB block, every
 * read checks the block holds the version last written (blocks with an operation in flight are
 * not touched by another), and {@link Workload.verifyAll} reads everything back at the end.
 */
import type { DmaMemory } from '../../lib/client/dma';
import type { NvmeDriver } from '../../lib/drivers/nvme/controller';
import type { NamespaceInfo } from '../../lib/drivers/nvme/identify';
import { read, write } from '../../lib/drivers/nvme/io';
import type { QueuePair } from '../../lib/drivers/nvme/queue';

export const BLOCK = 4096;

/** Fills `dst` (4 KiB) with the pattern of `lba` at `version` (version 0 = never written = zeroes). */
export function pattern(dst: Buffer, lba: number, version: number): void {
  if (version === 0) {
    dst.fill(0);
    return;
  }
  const words = new Uint32Array(dst.buffer, dst.byteOffset, BLOCK / 4);
  let x = (Math.imul(lba, 2654435761) ^ Math.imul(version, 40503)) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  words[0] = lba >>> 0;
  words[1] = version >>> 0;
}

export class Workload {
  readonly versions: Uint32Array;
  private readonly busy: Uint8Array;
  private running = false;
  private workers: Promise<void>[] = [];
  ops = 0;
  writes = 0;
  reads = 0;
  ioErrors = 0;
  mismatches: string[] = [];
  private rng = 0x9e3779b9;
  private readonly expect = Buffer.alloc(BLOCK);

  constructor(
    private readonly driver: NvmeDriver,
    private readonly qp: QueuePair,
    private readonly ns: NamespaceInfo,
    /** Blocks of 4 KiB the workload uses (from LBA 0). */
    readonly blocks: number,
    private readonly buffers: DmaMemory,
  ) {
    this.versions = new Uint32Array(blocks);
    this.busy = new Uint8Array(blocks);
  }

  get lbasPerBlock(): number {
    return BLOCK / this.ns.blockSize;
  }

  private random(n: number): number {
    let x = this.rng;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.rng = x >>> 0;
    return this.rng % n;
  }

  /**
   * Starts `depth` workers (each with its own 4 KiB slot of `buffers`); with `opsPerSecond`, paced
   * to about that many operations per second in all.
   */
  start(depth: number, writeShare = 0.5, opsPerSecond = 0): void {
    this.running = true;
    const pause = opsPerSecond > 0 ? (depth * 1000) / opsPerSecond : 0;
    for (let w = 0; w < depth; w++) this.workers.push(this.worker(w, writeShare, pause));
  }

  async stop(): Promise<void> {
    this.running = false;
    await Promise.all(this.workers);
    this.workers = [];
  }

  private async worker(slot: number, writeShare: number, pauseMs: number): Promise<void> {
    const buf = this.buffers.bytes.subarray(slot * BLOCK, (slot + 1) * BLOCK);
    const ref = { iova: this.buffers.iovaOf(slot * BLOCK), length: BLOCK };
    while (this.running) {
      let block = this.random(this.blocks);
      for (let tries = 0; this.busy[block] === 1 && tries < 64; tries++) block = this.random(this.blocks);
      if (this.busy[block] === 1) {
        await new Promise((r) => setImmediate(r));
        continue;
      }
      this.busy[block] = 1;
      const lba = block * this.lbasPerBlock;
      try {
        if (this.random(1000) < writeShare * 1000) {
          const version = this.versions[block]! + 1;
          pattern(buf, block, version);
          await write(this.qp, this.ns, lba, this.lbasPerBlock, ref);
          this.versions[block] = version;
          this.writes++;
        } else {
          await read(this.qp, this.ns, lba, this.lbasPerBlock, ref);
          this.check(block, buf);
          this.reads++;
        }
        this.ops++;
      } catch (err) {
        this.ioErrors++;
        if (this.ioErrors < 5) this.mismatches.push(`I/O error at block ${block}: ${(err as Error).message}`);
      } finally {
        this.busy[block] = 0;
      }
      if (pauseMs > 0) await new Promise((r) => setTimeout(r, pauseMs));
    }
  }

  private check(block: number, got: Buffer): void {
    pattern(this.expect, block, this.versions[block]!);
    if (!got.equals(this.expect)) {
      const v = got.readUInt32LE(4);
      this.mismatches.push(`block ${block}: holds version ${got.readUInt32LE(0) === block ? v : 'garbage'}, expected ${this.versions[block]}`);
    }
  }

  /** Reads every block back (after stop()) and checks it; returns the number of blocks verified. */
  async verifyAll(): Promise<number> {
    const ref = { iova: this.buffers.iova, length: BLOCK };
    const buf = this.buffers.bytes.subarray(0, BLOCK);
    for (let block = 0; block < this.blocks; block++) {
      await read(this.qp, this.ns, block * this.lbasPerBlock, this.lbasPerBlock, ref);
      this.check(block, buf);
    }
    return this.blocks;
  }

  /** Checks the blocks straight in a backend's bytes (e.g. the destination's RAM disk). */
  verifyBytes(bytes: Buffer): number {
    let bad = 0;
    for (let block = 0; block < this.blocks; block++) {
      pattern(this.expect, block, this.versions[block]!);
      if (!bytes.subarray(block * BLOCK, (block + 1) * BLOCK).equals(this.expect)) bad++;
    }
    return bad;
  }

  /** Writes every block once (versions 1), `depth` at a time. */
  async fill(depth = 16): Promise<void> {
    let next = 0;
    const worker = async (slot: number) => {
      const buf = this.buffers.bytes.subarray(slot * BLOCK, (slot + 1) * BLOCK);
      const ref = { iova: this.buffers.iovaOf(slot * BLOCK), length: BLOCK };
      while (next < this.blocks) {
        const block = next++;
        pattern(buf, block, 1);
        await write(this.qp, this.ns, block * this.lbasPerBlock, this.lbasPerBlock, ref);
        this.versions[block] = 1;
      }
    };
    await Promise.all(Array.from({ length: depth }, (_, i) => worker(i)));
  }
}
