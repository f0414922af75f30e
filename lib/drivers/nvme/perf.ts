/**
 * The perf engine behind `vfio-user nvme perf`, after `spdk_nvme_perf` and fio: N I/O queue
 * pairs, each keeping QD commands outstanding for a fixed time, with random or sequential
 * offsets aligned to the block size of the I/O, and a read/write mix.
 *
 * The I/O path allocates nothing: requests ({@link NvmeRequest}) and their data buffers are set
 * up once, each completion resubmits its own request, latencies go into a fixed log-linear
 * histogram ({@link LatencyHistogram}) and offsets come from a seeded xorshift generator. Once per
 * interval (1 s) a progress callback gets the IOPS and MB/s of that interval; the summary has
 * IOPS, throughput and latency min/avg/p50/p90/p99/p99.9/max, for all I/O and per direction.
 *
 * Units: MB/s is 10^6 bytes per second (fio's "MB/s"); MiB/s is given as well. Latency is
 * measured from the moment a command is written to its submission queue to the moment its
 * completion is reaped, in microseconds.
 *
 * @packageDocumentation
 */
import { performance } from 'node:perf_hooks';
import type { DmaMemory } from '../../client/dma';
import { IoOpcode } from '../../nvme/constants';
import type { NvmeDriver } from './controller';
import type { NamespaceInfo } from './identify';
import { MAX_BLOCKS_PER_COMMAND, prepareRead, prepareWrite } from './io';
import { NvmeRequest, type CompletionMode, type QueuePair } from './queue';

/** Access patterns, named as fio's `--rw`. */
export const RW_PATTERNS = ['randread', 'randwrite', 'read', 'write', 'randrw'] as const;
export type RwPattern = (typeof RW_PATTERNS)[number];

/**
 * Latency histogram with log-linear buckets (HdrHistogram's layout): values below 2^SUB_BITS
 * nanoseconds get exact buckets, above that every power of two is split into 2^SUB_BITS equal
 * buckets, so a bucket is at most 1/128 (0.8 %) of its value wide. Values are nanoseconds;
 * recording is a few integer operations and never allocates. Values of 2^32 ns (4.3 s) and more
 * share the last bucket (min, max and mean stay exact).
 */
const SUB_BITS = 7;
const BUCKETS = (32 - SUB_BITS + 1) << SUB_BITS;

export class LatencyHistogram {
  /** log2 of the sub-buckets per power of two. */
  static readonly SUB_BITS = SUB_BITS;
  /** Number of buckets. */
  static readonly BUCKETS = BUCKETS;
  readonly #counts = new Float64Array(BUCKETS);
  #count = 0;
  #sum = 0;
  #min = Infinity;
  #max = 0;

  /** Bucket of a value in nanoseconds. */
  static bucketOf(ns: number): number {
    const SB = SUB_BITS;
    if (ns < 1 << SB) return ns < 0 ? 0 : Math.floor(ns);
    if (ns >= 0x1_0000_0000) return BUCKETS - 1;
    const v = ns >>> 0;
    const msb = 31 - Math.clz32(v);
    const shift = msb - SB;
    return ((shift + 1) << SB) + ((v >>> shift) - (1 << SB));
  }

  /** Smallest value (ns) that falls into bucket `index`. */
  static bucketStart(index: number): number {
    const SB = SUB_BITS;
    const octave = index >>> SB;
    const sub = index & ((1 << SB) - 1);
    if (octave === 0) return sub;
    return ((1 << SB) + sub) * 2 ** (octave - 1);
  }

  /** Width of bucket `index` in ns. */
  static bucketWidth(index: number): number {
    const octave = index >>> SUB_BITS;
    return octave === 0 ? 1 : 2 ** (octave - 1);
  }

  /** Records one value in nanoseconds. */
  record(ns: number): void {
    this.#counts[LatencyHistogram.bucketOf(ns)]!++;
    this.#count++;
    this.#sum += ns;
    if (ns < this.#min) this.#min = ns;
    if (ns > this.#max) this.#max = ns;
  }

  /** Adds every value of `other`. */
  merge(other: LatencyHistogram): void {
    const o = other.#counts;
    for (let i = 0; i < o.length; i++) this.#counts[i]! += o[i]!;
    this.#count += other.#count;
    this.#sum += other.#sum;
    if (other.#min < this.#min) this.#min = other.#min;
    if (other.#max > this.#max) this.#max = other.#max;
  }

  get count(): number {
    return this.#count;
  }

  /** Exact mean, min and max in ns (0 when empty). */
  get mean(): number {
    return this.#count === 0 ? 0 : this.#sum / this.#count;
  }

  get min(): number {
    return this.#count === 0 ? 0 : this.#min;
  }

  get max(): number {
    return this.#max;
  }

  /**
   * The value at percentile `p` (0..100) in ns: the middle of the bucket holding the
   * ceil(p% x count)-th smallest value, clamped to [min, max] (so p100 is the exact max).
   */
  percentile(p: number): number {
    if (this.#count === 0) return 0;
    const rank = Math.max(1, Math.ceil((p / 100) * this.#count));
    let seen = 0;
    const counts = this.#counts;
    for (let i = 0; i < counts.length; i++) {
      seen += counts[i]!;
      if (seen >= rank) {
        const mid = LatencyHistogram.bucketStart(i) + (LatencyHistogram.bucketWidth(i) - 1) / 2;
        return Math.min(this.#max, Math.max(this.#min, mid));
      }
    }
    return this.#max;
  }

  reset(): void {
    this.#counts.fill(0);
    this.#count = 0;
    this.#sum = 0;
    this.#min = Infinity;
    this.#max = 0;
  }
}

/** Latency statistics in microseconds. */
export interface LatencySummary {
  min: number;
  avg: number;
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  max: number;
}

/** Summarises a histogram in microseconds (3 decimals). */
export function latencySummary(h: LatencyHistogram): LatencySummary {
  const us = (ns: number) => Math.round(ns) / 1000;
  return {
    min: us(h.min),
    avg: us(h.mean),
    p50: us(h.percentile(50)),
    p90: us(h.percentile(90)),
    p99: us(h.percentile(99)),
    p999: us(h.percentile(99.9)),
    max: us(h.max),
  };
}

/** Options of {@link runPerf}. */
export interface PerfOptions {
  rw: RwPattern;
  /** Bytes per I/O: a multiple of the namespace's block size, at most the transfer size. */
  bs: number;
  /** Commands outstanding per queue (1..MQES). */
  qd: number;
  /** Run time in seconds (> 0). */
  timeSec: number;
  /** I/O queue pairs (default 1). */
  queues?: number;
  /** Namespace (default 1). */
  nsid?: number;
  /** Percentage of reads for randrw (default 50). */
  rwmixread?: number;
  /** Completion mode of the queues (default: the driver's). */
  completions?: CompletionMode;
  /** Seed of the offset generator (default: from the clock). */
  seed?: number;
  /** Progress period in ms (default 1000). */
  progressIntervalMs?: number;
  /** Called once per period while the run lasts. */
  onProgress?: (progress: PerfProgress) => void;
  /** Stops the run early (outstanding I/O still completes; the summary covers what ran). */
  signal?: AbortSignal;
}

/** One progress report: the last interval, and totals so far. */
export interface PerfProgress {
  /** Seconds since the start. */
  elapsedSec: number;
  /** Length of the interval in seconds. */
  intervalSec: number;
  /** I/O completed in the interval, and per second. */
  ios: number;
  iops: number;
  readIops: number;
  writeIops: number;
  /** Throughput of the interval in MB/s (10^6 bytes) and MiB/s. */
  mbps: number;
  mibps: number;
  /** I/O completed since the start, and failures. */
  totalIos: number;
  errors: number;
}

/** Figures of one direction (or of everything). */
export interface PerfFigures {
  ios: number;
  bytes: number;
  iops: number;
  mbps: number;
  mibps: number;
  latencyUs: LatencySummary;
}

/** The result of a run. */
export interface PerfSummary extends PerfFigures {
  rw: RwPattern;
  bs: number;
  qd: number;
  queues: number;
  nsid: number;
  rwmixread: number;
  completions: CompletionMode;
  /** How doorbells reached the controller: the mmap'd page, ioeventfds, shadow doorbells, or messages. */
  doorbells: 'mmap' | 'ioeventfd' | 'shadow' | 'message';
  /** Seconds from the first submission to the last completion. */
  elapsedSec: number;
  /** Commands that completed with an error status, timed out or were aborted. */
  errors: number;
  /** The first failure's message, if any. */
  firstError: string | null;
  read: PerfFigures;
  write: PerfFigures;
}

/** xorshift32 (Marsaglia): a seedable, allocation-free generator. */
class XorShift {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0 || 0x9e3779b9;
  }

  next(): number {
    let x = this.#s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#s = x >>> 0;
    return this.#s;
  }

  /** Uniform integer in [0, n) for n up to 2^53 (two draws above 2^32). */
  below(n: number): number {
    if (n <= 0x1_0000_0000) return Math.floor((this.next() / 0x1_0000_0000) * n);
    const r = this.next() * 0x20_0000 + (this.next() >>> 11);
    return r % n;
  }
}

function figures(ios: number, bytes: number, seconds: number, hist: LatencyHistogram): PerfFigures {
  const s = seconds > 0 ? seconds : 1;
  const round = (v: number, digits: number) => Math.round(v * 10 ** digits) / 10 ** digits;
  return {
    ios,
    bytes,
    iops: round(ios / s, 1),
    mbps: round(bytes / s / 1e6, 2),
    mibps: round(bytes / s / 1048576, 2),
    latencyUs: latencySummary(hist),
  };
}

function checkInt(name: string, value: number, min: number, max: number): void {
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`Expected ${name} to be an integer in [${String(min)}, ${String(max)}], got ${String(value)}`);
  }
}

/**
 * Runs a workload on `driver` and resolves with its summary. Creates its own I/O queue pairs and
 * buffers and deletes them afterwards.
 *
 * @throws {RangeError} for options the controller cannot serve (bs not a multiple of the block
 * size or above the transfer size, qd above MQES, more queues than granted, ...).
 */
export async function runPerf(driver: NvmeDriver, options: PerfOptions): Promise<PerfSummary> {
  const nsid = options.nsid ?? 1;
  const ns: NamespaceInfo = driver.namespace(nsid);
  const queues = options.queues ?? 1;
  const rwmixread = options.rwmixread ?? 50;
  if (!(RW_PATTERNS as readonly string[]).includes(options.rw)) throw new RangeError(`Expected rw to be one of ${RW_PATTERNS.join(', ')}, got '${String(options.rw)}'`);
  checkInt('bs', options.bs, ns.blockSize, Math.min(driver.maxTransferSize, MAX_BLOCKS_PER_COMMAND * ns.blockSize));
  if (options.bs % ns.blockSize !== 0) throw new RangeError(`Expected bs to be a multiple of the ${String(ns.blockSize)}-byte block size, got ${String(options.bs)}`);
  checkInt('qd', options.qd, 1, driver.maxQueueEntries - 1);
  const free = driver.ioQueuesGranted - driver.ioQueues.size;
  checkInt('queues', queues, 1, Math.max(1, free));
  if (queues > free) throw new RangeError(`the controller has ${String(free)} free I/O queues, ${String(queues)} asked`);
  checkInt('rwmixread', rwmixread, 0, 100);
  if (!(options.timeSec > 0) || !Number.isFinite(options.timeSec)) throw new RangeError(`Expected a run time > 0 seconds, got ${String(options.timeSec)}`);
  const blocksPerIo = options.bs / ns.blockSize;
  const units = Math.floor(ns.nsze / blocksPerIo);
  if (units < 1) throw new RangeError(`namespace ${String(nsid)} (${String(ns.nsze)} blocks) is smaller than one ${String(options.bs)}-byte I/O`);

  const random = options.rw === 'randread' || options.rw === 'randwrite' || options.rw === 'randrw';
  const readShare = options.rw === 'randread' || options.rw === 'read' ? 100 : options.rw === 'randrw' ? rwmixread : 0;
  const rng = new XorShift(options.seed ?? (Date.now() ^ (performance.now() * 1000)));

  const pairs: QueuePair[] = [];
  const buffers: DmaMemory[] = [];
  try {
    for (let q = 0; q < queues; q++) {
      const qp = await driver.createIoQueuePair({ depth: options.qd, ...(options.completions ? { completions: options.completions } : {}) });
      pairs.push(qp);
      const mem = await driver.allocateBuffer(options.qd * options.bs);
      buffers.push(mem);
      // Something other than zeroes to write (and to see overwritten by reads).
      const bytes = mem.bytes;
      for (let i = 0; i + 4 <= bytes.length; i += 4) bytes.writeUInt32LE(rng.next(), i);
    }

    const readHist = new LatencyHistogram();
    const writeHist = new LatencyHistogram();
    let reads = 0;
    let writes = 0;
    let errors = 0;
    let firstError: string | null = null;
    let inflight = 0;
    let cursor = 0;
    let stopping = false;
    let lastCompletion = 0;
    let intervalReads = 0;
    let intervalWrites = 0;
    let finish: () => void = () => undefined;
    const done = new Promise<void>((resolve) => {
      finish = resolve;
    });

    const requests: NvmeRequest[] = [];
    const start = performance.now();
    const deadline = start + options.timeSec * 1000;

    const issue = (req: NvmeRequest): void => {
      const q = req.tag >>> 16;
      const slot = req.tag & 0xffff;
      const qp = pairs[q]!;
      const iova = buffers[q]!.iova + slot * options.bs;
      let unit: number;
      if (random) unit = rng.below(units);
      else {
        unit = cursor;
        cursor = cursor + 1 === units ? 0 : cursor + 1;
      }
      const lba = unit * blocksPerIo;
      const isRead = readShare === 100 || (readShare > 0 && rng.below(100) < readShare);
      if (isRead) prepareRead(req, ns, lba, blocksPerIo, iova);
      else prepareWrite(req, ns, lba, blocksPerIo, iova);
      inflight++;
      qp.submitRequest(req);
    };

    const onComplete = (req: NvmeRequest): void => {
      inflight--;
      const now = performance.now();
      lastCompletion = now;
      if (req.error !== null || req.status !== 0) {
        errors++;
        if (firstError === null) {
          firstError = req.error !== null ? req.error.message : `status 0x${req.status.toString(16)} (opcode 0x${req.opcode.toString(16)})`;
        }
        // A queue that is gone will not come back.
        if (req.error !== null && (req.error as { code?: string }).code !== 'ETIMEDOUT') stopping = true;
      } else {
        const latency = (now - req.submittedAt) * 1e6;
        if (req.opcode === IoOpcode.READ) {
          reads++;
          intervalReads++;
          readHist.record(latency);
        } else {
          writes++;
          intervalWrites++;
          writeHist.record(latency);
        }
      }
      if (!stopping && now < deadline) issue(req);
      else {
        stopping = true;
        if (inflight === 0) finish();
      }
    };

    for (let q = 0; q < queues; q++) {
      for (let slot = 0; slot < options.qd; slot++) {
        const req = new NvmeRequest();
        req.tag = (q << 16) | slot;
        req.onComplete = onComplete;
        requests.push(req);
      }
    }

    const period = options.progressIntervalMs ?? 1000;
    let lastTick = start;
    const progress = options.onProgress;
    const timer = setInterval(() => {
      const now = performance.now();
      const interval = (now - lastTick) / 1000;
      lastTick = now;
      const ios = intervalReads + intervalWrites;
      const bytes = ios * options.bs;
      const p: PerfProgress = {
        elapsedSec: Math.round((now - start) / 10) / 100,
        intervalSec: Math.round(interval * 1000) / 1000,
        ios,
        iops: Math.round(ios / interval),
        readIops: Math.round(intervalReads / interval),
        writeIops: Math.round(intervalWrites / interval),
        mbps: Math.round((bytes / interval / 1e6) * 100) / 100,
        mibps: Math.round((bytes / interval / 1048576) * 100) / 100,
        totalIos: reads + writes,
        errors,
      };
      intervalReads = 0;
      intervalWrites = 0;
      progress?.(p);
    }, period);
    // A deadline check independent of completions (a device that stops answering).
    const stopTimer = setTimeout(() => {
      stopping = true;
      if (inflight === 0) finish();
    }, options.timeSec * 1000 + 10);
    const onAbort = (): void => {
      stopping = true;
      if (inflight === 0) finish();
    };
    options.signal?.addEventListener('abort', onAbort);
    if (options.signal?.aborted) stopping = true;

    try {
      if (!stopping) for (const req of requests) issue(req);
      if (inflight === 0) finish();
      await done;
    } finally {
      clearInterval(timer);
      clearTimeout(stopTimer);
      options.signal?.removeEventListener('abort', onAbort);
    }

    const elapsed = Math.max(0, ((lastCompletion > 0 ? lastCompletion : performance.now()) - start) / 1000);
    const all = new LatencyHistogram();
    all.merge(readHist);
    all.merge(writeHist);
    const total = figures(reads + writes, (reads + writes) * options.bs, elapsed, all);
    return {
      rw: options.rw,
      bs: options.bs,
      qd: options.qd,
      queues,
      nsid,
      rwmixread: options.rw === 'randrw' ? rwmixread : readShare,
      completions: pairs[0]?.mode ?? driver.completions,
      doorbells: driver.shadowDoorbells !== null ? 'shadow' : driver.doorbellKind,
      elapsedSec: Math.round(elapsed * 1000) / 1000,
      ...total,
      errors,
      firstError,
      read: figures(reads, reads * options.bs, elapsed, readHist),
      write: figures(writes, writes * options.bs, elapsed, writeHist),
    };
  } finally {
    for (const qp of pairs) await driver.deleteIoQueuePair(qp, { drain: true }).catch(() => undefined);
    for (const mem of buffers) await driver.freeBuffer(mem).catch(() => undefined);
  }
}
