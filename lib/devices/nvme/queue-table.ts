/**
 * The controller's queues by identifier: which submission and completion queues exist, their
 * round-robin order, the Delete I/O SQ commands waiting for a queue to drain, and the shadow
 * doorbell buffer the host registered for them.
 *
 * @packageDocumentation
 */
import type { CompletionQueue, ShadowDoorbells, SubmissionQueue } from './queues';

export class QueueTable {
  readonly sqs: (SubmissionQueue | null)[];
  readonly cqs: (CompletionQueue | null)[];
  /** Existing queues, admin first, in creation order (round-robin order). */
  activeSqs: SubmissionQueue[] = [];
  activeCqs: CompletionQueue[] = [];
  /** Where the next round-robin pass over {@link activeSqs} starts. */
  rr = 0;
  /** Doorbell Buffer Config: the shadow doorbells and EventIdx, or null. */
  shadow: ShadowDoorbells | null = null;
  /** Delete I/O SQ commands waiting for their queue's commands, by queue: the command's CID. */
  readonly deletions = new Map<SubmissionQueue, number>();

  /** Room for the admin queue pair and `ioQueues` I/O queue pairs. */
  constructor(ioQueues: number) {
    this.sqs = new Array<SubmissionQueue | null>(ioQueues + 1).fill(null);
    this.cqs = new Array<CompletionQueue | null>(ioQueues + 1).fill(null);
  }

  sq(qid: number): SubmissionQueue | null {
    return this.sqs[qid] ?? null;
  }

  cq(qid: number): CompletionQueue | null {
    return this.cqs[qid] ?? null;
  }

  get hasIoQueues(): boolean {
    return this.activeSqs.length > 1 || this.activeCqs.length > 1;
  }

  /** The admin queue pair of a controller being enabled: the only queues. */
  setAdmin(sq: SubmissionQueue, cq: CompletionQueue): void {
    cq.sqCount = 1;
    this.cqs[0] = cq;
    this.sqs[0] = sq;
    this.activeCqs = [cq];
    this.activeSqs = [sq];
  }

  addCq(cq: CompletionQueue): void {
    this.cqs[cq.id] = cq;
    this.activeCqs.push(cq);
  }

  addSq(sq: SubmissionQueue): void {
    this.sqs[sq.id] = sq;
    this.activeSqs.push(sq);
    sq.cq.sqCount++;
  }

  removeSq(sq: SubmissionQueue): void {
    this.sqs[sq.id] = null;
    this.activeSqs = this.activeSqs.filter((q) => q !== sq);
    sq.cq.sqCount--;
  }

  removeCq(cq: CompletionQueue): void {
    this.cqs[cq.id] = null;
    this.activeCqs = this.activeCqs.filter((q) => q !== cq);
  }

  /** Forgets every queue, deletion and shadow doorbell (controller reset). */
  clear(): void {
    this.sqs.fill(null);
    this.cqs.fill(null);
    this.activeSqs = [];
    this.activeCqs = [];
    this.rr = 0;
    this.shadow = null;
    this.deletions.clear();
  }
}
