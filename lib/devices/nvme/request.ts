/**
 * One command in flight: the fields of its submission queue entry (copied out of guest memory when
 * it is fetched, so the host may reuse the slot at once), its data segments and views, and its
 * result. Each submission queue keeps a pool of these, so fetching a command allocates nothing.
 *
 * `Queue` is the type of the submission queue a request belongs to (queues.ts, where
 * `QueuedRequest` names the pair): this module leaves it open so that it needs nothing of the queue
 * that pools it, and the handlers that only read a command's fields (io.ts) need no queue at all.
 *
 * @packageDocumentation
 */
import { Sqe } from '../../nvme/structs';
import { Segments, Transfer, joinU64 } from './prp';

/** Where an SQE outside a ring's dword view is copied to be read (little-endian dwords, as the rings). */
const SCRATCH_WORDS = new Int32Array(Sqe.SIZE / 4);
const SCRATCH = Buffer.from(SCRATCH_WORDS.buffer);

export class Request<Queue = unknown> {
  /** The controller generation it was fetched in; completions of an older one are dropped. */
  epoch = 0;
  opcode = 0;
  /** Byte 1 of the SQE: FUSE (1:0) and PSDT (7:6). */
  flags = 0;
  cid = 0;
  nsid = 0;
  cdw10 = 0;
  cdw11 = 0;
  cdw12 = 0;
  cdw13 = 0;
  cdw14 = 0;
  cdw15 = 0;
  /** PRP entries as Numbers (-1: above 2^53, unmapped by definition). */
  prp1 = 0;
  prp2 = 0;
  /** The status to post (kept while the completion waits for room in its CQ). */
  status = 0;
  /** Completion dwords 0 and 1 (command specific results). */
  dw0 = 0;
  dw1 = 0;
  /** Starting LBA for the Error Information log (0 when not applicable). */
  lba = 0;
  readonly segs = new Segments();
  readonly xfer = new Transfer();
  /** Read/Write in flight: direction and length, for the shared completion callbacks below. */
  ioWrite = false;
  ioBytes = 0;
  /**
   * Callbacks made once per pooled Request (not per command) so that settling a command's promise
   * allocates no closure: set by the I/O path and by the controller on first use.
   */
  onIoDone: (() => number) | null = null;
  onIoFailed: ((err: unknown) => number) | null = null;
  onSettled: ((status: number) => void) | null = null;
  onFailed: ((err: unknown) => void) | null = null;

  constructor(readonly sq: Queue) {}

  /**
   * Copies the 64-byte SQE at byte `offset` of `ring` (no allocation). `words` is an Int32Array
   * over the same memory when the ring has one (dword loads); else the entry is copied to a
   * scratch first.
   */
  load(ring: Buffer, offset: number, words: Int32Array | null): void {
    let w = offset >> 2;
    if (words === null || (offset & 3) !== 0) {
      ring.copy(SCRATCH, 0, offset, offset + Sqe.SIZE);
      words = SCRATCH_WORDS;
      w = 0;
    }
    const dw0 = words[w + (Sqe.OPC >> 2)]!;
    this.opcode = dw0 & 0xff;
    this.flags = (dw0 >>> 8) & 0xff;
    this.cid = dw0 >>> 16;
    this.nsid = words[w + (Sqe.NSID >> 2)]! >>> 0;
    this.prp1 = joinU64(words[w + (Sqe.PRP1 >> 2)]!, words[w + (Sqe.PRP1 >> 2) + 1]!);
    this.prp2 = joinU64(words[w + (Sqe.PRP2 >> 2)]!, words[w + (Sqe.PRP2 >> 2) + 1]!);
    this.cdw10 = words[w + (Sqe.CDW10 >> 2)]! >>> 0;
    this.cdw11 = words[w + (Sqe.CDW11 >> 2)]! >>> 0;
    this.cdw12 = words[w + (Sqe.CDW12 >> 2)]! >>> 0;
    this.cdw13 = words[w + (Sqe.CDW13 >> 2)]! >>> 0;
    this.cdw14 = words[w + (Sqe.CDW14 >> 2)]! >>> 0;
    this.cdw15 = words[w + (Sqe.CDW15 >> 2)]! >>> 0;
    this.status = 0;
    this.dw0 = 0;
    this.dw1 = 0;
    this.lba = 0;
  }

  /** Releases data views (after the I/O, or when the command is dropped). */
  done(): void {
    this.xfer.release();
    this.segs.reset();
  }
}

/**
 * A handler's result: a status (the completion is posted now), a promise of one, or
 * {@link DEFERRED}: the handler kept the request and will complete it later itself (an
 * Asynchronous Event Request waiting for an event, a Delete I/O SQ waiting for its commands).
 */
export type HandlerResult = number | Promise<number>;

/** See {@link HandlerResult}. */
export const DEFERRED = -1;
