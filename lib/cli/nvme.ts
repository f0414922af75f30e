/**
 * `vfio-user nvme <identify|read|write|perf> SOCKET ...`: the userspace NVMe driver
 * (lib/drivers/nvme) as a command, against a controller served over vfio-user.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Writable } from 'node:stream';
import { VfioUserClient } from '../client/client';
import { NvmeDriver, type NvmeDriverOptions } from '../drivers/nvme/controller';
import { readBlocks, writeBlocks } from '../drivers/nvme/io';
import { RW_PATTERNS, runPerf, type PerfFigures, type PerfProgress, type PerfSummary, type RwPattern } from '../drivers/nvme/perf';
import { versionString } from '../drivers/nvme/registers';
import type { CliCommand, OptionValues } from './command';
import { connectErrorMessage, connectionEndedMessage } from './messages';

const USAGE = `Usage: vfio-user nvme <subcommand> SOCKET [options]

Drive an NVMe controller served on the vfio-user socket SOCKET from user space: BARs assigned
addresses as firmware does, controller reset and enable, admin and I/O queues in shared memory,
MSI-X or polled completions.

Subcommands:
  identify SOCKET [--json]
      Identify Controller and every active namespace.
  read SOCKET --lba N --count N [--out FILE]
      Read COUNT blocks from LBA; the raw bytes go to FILE (default: standard output). FILE is
      replaced only once every block is read: a failed read leaves it as it was.
  write SOCKET --lba N --count N --in FILE
      Write COUNT blocks at LBA from FILE ('-': standard input), which must hold exactly that.
  perf SOCKET --rw randread|randwrite|read|write|randrw --bs 4096 --qd 32 --time 10 [--queues N] [--json]
      Keep QD commands of BS bytes outstanding on each of N queues for TIME seconds (defaults:
      --bs 4096 --qd 32 --time 10 --queues 1). Progress (IOPS, MB/s) goes to standard error once
      per second; the summary (IOPS, MB/s, latency min/avg/p50/p90/p99/p99.9/max) to standard
      output. Ctrl-C ends the run early and still prints the summary.

Options:
  --nsid N                namespace (default 1)
  --rwmixread N           perf randrw: percentage of reads (default 50)
  --poll                  poll the completion queues instead of using MSI-X interrupts
                          (perf polls by default, as spdk_nvme_perf does)
  --irq                   perf: wait for MSI-X interrupts instead of polling
  --doorbells MODE        auto (default: the mmap'd doorbell page if the server offers it, else
                          its ioeventfds if it offers them, else shadow doorbells if the
                          controller offers them, else messages), mmap, ioeventfd (a shadow
                          store and an eventfd signal each), shadow (Doorbell Buffer Config),
                          message (a REGION_WRITE each)
  --json                  machine-readable output (identify, perf; read with --out; write)
  -h, --help              show this help

Numbers may be decimal or 0x-prefixed hex; --bs also takes k/m suffixes (4k, 1m).
MB/s is 10^6 bytes per second. Exit codes: 0 ok, 1 failure, 2 usage error.`;

type Values = OptionValues;

/** Options each subcommand accepts (besides --help). */
const ALLOWED: Record<string, readonly string[]> = {
  identify: ['json', 'poll', 'doorbells'],
  read: ['lba', 'count', 'out', 'nsid', 'json', 'poll', 'doorbells'],
  write: ['lba', 'count', 'in', 'nsid', 'json', 'poll', 'doorbells'],
  perf: ['rw', 'bs', 'qd', 'time', 'queues', 'nsid', 'rwmixread', 'json', 'poll', 'irq', 'doorbells'],
};

class UsageError extends Error {}

/** A failure of the device or the connection: reported after the socket path. */
class SocketFailure extends Error {}

/** A failure of a local file (--in, --out): its message names the file. */
class FileFailure extends Error {}

function integer(values: Values, name: string, options: { min?: number; max?: number; fallback?: number; suffixes?: boolean } = {}): number {
  const raw = values[name];
  if (raw === undefined) {
    if (options.fallback !== undefined) return options.fallback;
    throw new UsageError(`--${name} is required`);
  }
  const text = String(raw).trim().toLowerCase();
  let scale = 1;
  let digits = text;
  if (options.suffixes === true && /^[0-9]+[km]$/.test(text)) {
    scale = text.endsWith('k') ? 1024 : 1024 * 1024;
    digits = text.slice(0, -1);
  }
  const value = /^0x[0-9a-f]+$/.test(digits) ? parseInt(digits, 16) : /^[0-9]+$/.test(digits) ? Number(digits) : NaN;
  const n = value * scale;
  if (!Number.isSafeInteger(n) || n < (options.min ?? 0) || n > (options.max ?? Number.MAX_SAFE_INTEGER)) {
    const min = options.min ?? 0;
    const what = options.max !== undefined ? `an integer in [${String(min)}, ${String(options.max)}]` : min > 0 ? `an integer >= ${String(min)}` : 'a non-negative integer';
    throw new UsageError(`--${name} must be ${what}, got '${String(raw)}'`);
  }
  return n;
}

function seconds(values: Values, name: string, fallback: number): number {
  const raw = values[name];
  if (raw === undefined) return fallback;
  const n = Number(String(raw));
  if (!Number.isFinite(n) || n <= 0 || n > 86400) throw new UsageError(`--${name} must be a number of seconds in (0, 86400], got '${String(raw)}'`);
  return n;
}

function driverOptions(values: Values, extra: NvmeDriverOptions): NvmeDriverOptions {
  const mode = values.doorbells === undefined ? 'auto' : String(values.doorbells);
  if (mode !== 'auto' && mode !== 'mmap' && mode !== 'ioeventfd' && mode !== 'shadow' && mode !== 'message') {
    throw new UsageError(`--doorbells must be auto, mmap, ioeventfd, shadow or message, got '${mode}'`);
  }
  return {
    doorbells: mode === 'shadow' ? 'message' : mode,
    shadowDoorbells: mode !== 'message',
    ...(values.poll === true ? { completions: 'poll' as const } : {}),
    ...extra,
  };
}

/** How the connection under a command ended, if it did before the command was done. */
interface ConnectionState {
  ended: { cause: Error | null } | null;
}

/** `message (CODE)`, unless the message already names the code. */
function withCode(err: unknown): string {
  const e = err as Error & { code?: unknown };
  const message = e instanceof Error ? e.message : String(err);
  return typeof e.code === 'string' && !message.includes(e.code) ? `${message} (${e.code})` : message;
}

/**
 * Connects, opens the driver, runs `fn`, and always closes both. Failures of the server or the
 * connection come out as {@link SocketFailure}s with a message a user can act on (a refused
 * connect, a busy server, a server that went away mid-command); local file errors pass through.
 */
async function withDriver<T>(socket: string, options: NvmeDriverOptions, fn: (driver: NvmeDriver, connection: ConnectionState) => Promise<T>): Promise<T> {
  let client: VfioUserClient;
  try {
    client = await VfioUserClient.connect(socket);
  } catch (err) {
    throw new SocketFailure(connectErrorMessage(err, socket), { cause: err });
  }
  const connection: ConnectionState = { ended: null };
  let closing = false;
  client.once('close', (cause: Error | null) => {
    if (!closing) connection.ended = { cause };
  });
  try {
    const driver = await NvmeDriver.open(client, options);
    try {
      return await fn(driver, connection);
    } finally {
      closing = true;
      // After the server went away there is nothing left to shut down cleanly.
      await driver.close().catch((err: unknown) => {
        if (connection.ended === null) throw err;
      });
    }
  } catch (err) {
    if (err instanceof FileFailure || err instanceof UsageError || typeof (err as { path?: unknown }).path === 'string') throw err;
    if (connection.ended !== null) throw new SocketFailure(connectionEndedMessage(connection.ended.cause), { cause: err });
    throw new SocketFailure(withCode(err), { cause: err });
  } finally {
    closing = true;
    await client.close();
  }
}

/** The doorbells a driver writes: the mmap'd page, ioeventfds, shadow doorbells, or messages. */
function doorbellMode(d: NvmeDriver): 'mmap' | 'ioeventfd' | 'shadow' | 'message' {
  return d.shadowDoorbells !== null ? 'shadow' : d.doorbellKind;
}

function writeAll(stream: Writable, data: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    stream.write(data, (err) => (err ? reject(err) : resolve()));
  });
}

async function readStdin(): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

function human(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? String(v) : v.toFixed(2)} ${units[i]!}`;
}

// ---- identify ----

async function identify(socket: string, values: Values): Promise<number> {
  const json = values.json === true;
  // Polling: no eventfds are needed to read a few structures. Ask for every queue to learn the limit.
  const info = await withDriver(socket, driverOptions(values, { completions: 'poll', ioQueues: 65535 }), (d) =>
    Promise.resolve({
      controller: d.controller,
      version: versionString(d.version),
      capabilities: {
        maxQueueEntries: d.cap.maxQueueEntries,
        contiguousQueuesRequired: d.cap.contiguousQueuesRequired,
        timeoutMs: d.cap.timeoutMs,
        doorbellStride: d.cap.doorbellStride,
        minPageSize: d.cap.minPageSize,
        maxPageSize: d.cap.maxPageSize,
        subsystemReset: d.cap.subsystemReset,
      },
      maxTransferSize: d.maxTransferSize,
      ioQueues: d.ioQueuesGranted,
      doorbells: d.shadowDoorbells !== null ? 'shadow' : d.doorbellKind,
      namespaces: [...d.namespaces.values()],
    }),
  );
  if (json) {
    console.log(JSON.stringify(info, null, 2));
    return 0;
  }
  const c = info.controller;
  const hex = (n: number, w = 4) => `0x${n.toString(16).padStart(w, '0')}`;
  const lines = [
    `Controller: ${c.model}`,
    `  serial number     ${c.serial}`,
    `  firmware          ${c.firmware}`,
    `  vendor            ${hex(c.vid)} (subsystem ${hex(c.ssvid)})`,
    `  NVMe version      ${info.version}`,
    `  controller id     ${String(c.cntlid)}`,
    `  subsystem NQN     ${c.subnqn || '(none)'}`,
    `  max transfer      ${human(info.maxTransferSize)}${c.mdts === 0 ? ' (MDTS: no limit)' : ` (MDTS ${String(c.mdts)})`}`,
    `  queue entries     ${String(info.capabilities.maxQueueEntries)} max (CAP.MQES + 1)`,
    `  I/O queues        ${String(info.ioQueues)}`,
    `  ready timeout     ${String(info.capabilities.timeoutMs)} ms (CAP.TO)`,
    `  doorbells         ${info.doorbells === 'mmap' ? "mmap'd page" : info.doorbells === 'ioeventfd' ? 'ioeventfds (shadow store + eventfd signal)' : info.doorbells === 'shadow' ? 'shadow doorbells (Doorbell Buffer Config)' : 'REGION_WRITE messages'} (stride ${String(info.capabilities.doorbellStride)})`,
    `  ONCS              ${hex(c.oncs)}${c.oncs & 0x4 ? ' dsm' : ''}${c.oncs & 0x8 ? ' write-zeroes' : ''}`,
    `  volatile cache    ${c.vwc & 1 ? 'yes' : 'no'}`,
    `  namespaces        ${String(c.nn)}`,
  ];
  for (const ns of info.namespaces) {
    lines.push(
      `Namespace ${String(ns.nsid)}: ${String(ns.nsze)} blocks of ${String(ns.blockSize)} bytes (${human(ns.capacity)})`,
      `  format            ${String(ns.format)} of ${String(ns.lbaFormats.length)}${ns.metadataSize ? `, ${String(ns.metadataSize)} metadata bytes` : ''}`,
      `  NGUID             ${ns.nguid}`,
      `  EUI-64            ${ns.eui64}`,
    );
  }
  console.log(lines.join('\n'));
  return 0;
}

// ---- read / write ----

/** Blocks moved per pass through the driver (bounds memory for large ranges). */
const SEGMENT_BYTES = 16 * 1024 * 1024;

/** A file to write `--out` into: a temporary file beside it, renamed over it only on success. */
class OutputFile {
  readonly fd: number;
  private done = false;

  private constructor(
    readonly target: string,
    /** The temporary file, or null when writing to `target` itself (not a regular file). */
    private readonly temp: string | null,
  ) {
    this.fd = fs.openSync(temp ?? target, temp === null ? 'w' : 'wx', this.mode());
  }

  /** Opens before connecting, so a bad path fails first. */
  static open(target: string): OutputFile {
    let st: fs.Stats | null = null;
    try {
      st = fs.statSync(target);
    } catch {
      // Not there yet: made by the rename.
    }
    // A device or a FIFO (/dev/null, a pipe) is written in place: it cannot be replaced.
    if (st !== null && !st.isFile()) return new OutputFile(target, null);
    const temp = path.join(path.dirname(target), `.${path.basename(target)}.${String(process.pid)}.tmp`);
    return new OutputFile(target, temp);
  }

  private mode(): number {
    try {
      return fs.statSync(this.target).mode & 0o7777; // keep the mode of the file being replaced
    } catch {
      return 0o666;
    }
  }

  write(data: Uint8Array): void {
    for (let at = 0; at < data.length; ) at += fs.writeSync(this.fd, data, at, data.length - at);
  }

  /** Every byte is written: the file replaces `target`. */
  commit(): void {
    fs.closeSync(this.fd);
    this.done = true;
    if (this.temp !== null) fs.renameSync(this.temp, this.target);
  }

  /** The read failed: `target` stays as it was. */
  discard(): void {
    if (this.done) return;
    this.done = true;
    fs.closeSync(this.fd);
    if (this.temp !== null) fs.rmSync(this.temp, { force: true });
  }
}

async function readCommand(socket: string, values: Values): Promise<number> {
  const lba = integer(values, 'lba');
  const count = integer(values, 'count', { min: 1 });
  const nsid = integer(values, 'nsid', { min: 1, max: 0xfffffffe, fallback: 1 });
  const outPath = values.out === undefined ? null : String(values.out);
  const json = values.json === true;
  if (json && outPath === null) throw new UsageError('--json needs --out (the data goes to standard output otherwise)');
  const out = outPath === null || outPath === '-' ? null : OutputFile.open(outPath);
  const sink = async (data: Buffer): Promise<void> => {
    if (out === null) {
      // The next segment reuses the buffer: give the stream its own copy.
      await writeAll(process.stdout, Buffer.from(data));
      return;
    }
    out.write(data);
  };
  let bytes = 0;
  try {
    await withDriver(socket, driverOptions(values, { ioQueues: 1 }), async (d) => {
      const ns = d.namespace(nsid);
      if (lba + count > ns.nsze) throw new RangeError(`blocks ${String(lba)}..${String(lba + count - 1)} are outside namespace ${String(nsid)} (${String(ns.nsze)} blocks)`);
      const qp = await d.createIoQueuePair({ depth: Math.min(32, d.maxQueueEntries - 1) });
      const perSegment = Math.max(1, Math.floor(SEGMENT_BYTES / ns.blockSize));
      const buf = Buffer.alloc(Math.min(count, perSegment) * ns.blockSize);
      for (let done = 0; done < count; ) {
        const n = Math.min(perSegment, count - done);
        const part = buf.subarray(0, n * ns.blockSize);
        await readBlocks(d, qp, ns, lba + done, n, part, { inflight: 8 });
        await sink(part);
        bytes += part.length;
        done += n;
      }
    });
    out?.commit();
  } finally {
    out?.discard();
  }
  if (json) console.log(JSON.stringify({ nsid, lba, count, bytes, out: outPath }));
  return 0;
}

async function writeCommand(socket: string, values: Values): Promise<number> {
  const lba = integer(values, 'lba');
  const count = integer(values, 'count', { min: 1 });
  const nsid = integer(values, 'nsid', { min: 1, max: 0xfffffffe, fallback: 1 });
  if (values.in === undefined) throw new UsageError('--in FILE is required (use - for standard input)');
  const inPath = String(values.in);
  const inName = inPath === '-' ? 'standard input' : inPath;
  const json = values.json === true;
  const stdin = inPath === '-' ? await readStdin() : null;
  const fd = stdin === null ? fs.openSync(inPath, 'r') : -1;
  let bytes = 0;
  try {
    await withDriver(socket, driverOptions(values, { ioQueues: 1 }), async (d) => {
      const ns = d.namespace(nsid);
      if (lba + count > ns.nsze) throw new RangeError(`blocks ${String(lba)}..${String(lba + count - 1)} are outside namespace ${String(nsid)} (${String(ns.nsze)} blocks)`);
      const need = count * ns.blockSize;
      const have = stdin !== null ? stdin.length : fs.fstatSync(fd).size;
      const blocks = `${String(count)} block${count === 1 ? '' : 's'} of ${String(ns.blockSize)} bytes (${String(need)})`;
      if (have < need) throw new FileFailure(`${inName} holds ${String(have)} bytes, less than --count ${blocks}`);
      if (have > need) {
        const whole = have % ns.blockSize === 0 ? `--count ${String(have / ns.blockSize)} writes all of it` : `it is not a whole number of ${String(ns.blockSize)}-byte blocks`;
        throw new FileFailure(`${inName} holds ${String(have)} bytes, more than --count ${blocks}; refusing to write only the start of it (${whole})`);
      }
      const qp = await d.createIoQueuePair({ depth: Math.min(32, d.maxQueueEntries - 1) });
      const perSegment = Math.max(1, Math.floor(SEGMENT_BYTES / ns.blockSize));
      const buf = Buffer.alloc(Math.min(count, perSegment) * ns.blockSize);
      for (let done = 0; done < count; ) {
        const n = Math.min(perSegment, count - done);
        const part = buf.subarray(0, n * ns.blockSize);
        const at = done * ns.blockSize;
        if (stdin !== null) stdin.copy(part, 0, at, at + part.length);
        else {
          let got = 0;
          while (got < part.length) {
            const r = fs.readSync(fd, part, got, part.length - got, at + got);
            if (r === 0) throw new FileFailure(`${inPath} ended early at byte ${String(at + got)}`);
            got += r;
          }
        }
        await writeBlocks(d, qp, ns, lba + done, n, part, { inflight: 8 });
        bytes += part.length;
        done += n;
      }
    });
  } finally {
    if (fd >= 0) fs.closeSync(fd);
  }
  if (json) console.log(JSON.stringify({ nsid, lba, count, bytes }));
  else console.error(`wrote ${String(count)} blocks (${String(bytes)} bytes) at LBA ${String(lba)} of namespace ${String(nsid)}`);
  return 0;
}

// ---- perf ----

function progressLine(p: PerfProgress): string {
  return `[${p.elapsedSec.toFixed(1).padStart(6)}s] ${String(p.iops).padStart(9)} IOPS ${p.mbps.toFixed(2).padStart(10)} MB/s  (read ${String(p.readIops)}, write ${String(p.writeIops)} IOPS${p.errors ? `, ${String(p.errors)} errors` : ''})`;
}

function figuresLines(label: string, f: PerfFigures): string[] {
  const l = f.latencyUs;
  const us = (v: number) => v.toFixed(2);
  return [
    `${label}: ${f.iops.toFixed(1)} IOPS, ${f.mbps.toFixed(2)} MB/s (${f.mibps.toFixed(2)} MiB/s), ${String(f.ios)} I/Os`,
    `  latency (us): min ${us(l.min)}  avg ${us(l.avg)}  p50 ${us(l.p50)}  p90 ${us(l.p90)}  p99 ${us(l.p99)}  p99.9 ${us(l.p999)}  max ${us(l.max)}`,
  ];
}

function summaryText(s: PerfSummary): string {
  const lines = [
    `vfio-user nvme perf: ${s.rw}${s.rw === 'randrw' ? ` (${String(s.rwmixread)}% reads)` : ''}, bs ${String(s.bs)}, qd ${String(s.qd)}, ${String(s.queues)} queue(s), namespace ${String(s.nsid)}, ${s.elapsedSec.toFixed(2)} s, ${s.completions === 'msix' ? 'MSI-X' : 'polled'} completions, ${s.doorbells} doorbells`,
    ...figuresLines('total', s),
  ];
  if (s.read.ios > 0 && s.write.ios > 0) lines.push(...figuresLines('read ', s.read), ...figuresLines('write', s.write));
  lines.push(`errors: ${String(s.errors)}${s.firstError ? ` (first: ${s.firstError})` : ''}`);
  return lines.join('\n');
}

async function perf(socket: string, values: Values): Promise<number> {
  if (values.rw === undefined) throw new UsageError(`--rw is required (${RW_PATTERNS.join(', ')})`);
  const rw = String(values.rw);
  if (!(RW_PATTERNS as readonly string[]).includes(rw)) throw new UsageError(`--rw must be one of ${RW_PATTERNS.join(', ')}, got '${rw}'`);
  const bs = integer(values, 'bs', { min: 1, fallback: 4096, suffixes: true });
  const qd = integer(values, 'qd', { min: 1, max: 65535, fallback: 32 });
  const timeSec = seconds(values, 'time', 10);
  const queues = integer(values, 'queues', { min: 1, max: 65535, fallback: 1 });
  const nsid = integer(values, 'nsid', { min: 1, max: 0xfffffffe, fallback: 1 });
  const rwmixread = integer(values, 'rwmixread', { min: 0, max: 100, fallback: 50 });
  const json = values.json === true;
  const abort = new AbortController();
  const onSignal = () => abort.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    // Polled completions by default, like spdk_nvme_perf: the run measures the device and the
    // path to it, not interrupt wake-ups, and is far steadier on a small machine (--irq for those).
    const completions = values.irq === true ? ('msix' as const) : ('poll' as const);
    let ended: string | null = null;
    const summary = await withDriver(socket, driverOptions(values, { ioQueues: queues, completions }), async (d, connection) => {
      // As set up: a connection lost mid-run takes the shadow doorbells down with it.
      const doorbells = doorbellMode(d);
      const result = await runPerf(d, {
        rw: rw as RwPattern,
        bs,
        qd,
        timeSec,
        queues,
        nsid,
        rwmixread,
        signal: abort.signal,
        onProgress: (p) => process.stderr.write(`${json ? JSON.stringify({ progress: p }) : progressLine(p)}\n`),
      });
      if (connection.ended !== null) ended = connectionEndedMessage(connection.ended.cause);
      return { ...result, doorbells, ...(ended !== null ? { firstError: ended } : {}) };
    });
    console.log(json ? JSON.stringify(summary, null, 2) : summaryText(summary));
    if (ended !== null) console.error(`vfio-user nvme perf: ${socket}: ${String(ended)} after ${summary.elapsedSec.toFixed(2)} s; the summary covers the I/O completed until then`);
    return summary.errors > 0 || ended !== null ? 1 : 0;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

// ---- the command ----

export const nvmeCommand: CliCommand = {
  name: 'nvme',
  summary: 'drive an NVMe controller over vfio-user (identify, read, write, perf)',
  usage: USAGE,
  options: {
    json: { type: 'boolean' },
    lba: { type: 'string' },
    count: { type: 'string' },
    out: { type: 'string' },
    in: { type: 'string' },
    rw: { type: 'string' },
    bs: { type: 'string' },
    qd: { type: 'string' },
    time: { type: 'string' },
    queues: { type: 'string' },
    nsid: { type: 'string' },
    rwmixread: { type: 'string' },
    poll: { type: 'boolean' },
    irq: { type: 'boolean' },
    doorbells: { type: 'string' },
  },
  async run(positionals, values) {
    const [sub, socket, ...extra] = positionals;
    if (sub === undefined || ALLOWED[sub] === undefined) {
      const why = sub === undefined ? 'a subcommand is required' : `unknown subcommand '${sub}'`;
      console.error(`vfio-user nvme: ${why} (${Object.keys(ALLOWED).join(', ')})\n\n${USAGE}`);
      return 2;
    }
    const wrong = Object.keys(values).filter((k) => values[k] !== undefined && k !== 'help' && !ALLOWED[sub]!.includes(k));
    if (socket === undefined || extra.length > 0 || wrong.length > 0) {
      const why = socket === undefined ? 'SOCKET is required' : extra.length > 0 ? `unexpected argument '${extra[0]!}'` : `--${wrong[0]!} does not apply to '${sub}'`;
      console.error(`vfio-user nvme ${sub}: ${why}\n\n${USAGE}`);
      return 2;
    }
    try {
      switch (sub) {
        case 'identify':
          return await identify(socket, values);
        case 'read':
          return await readCommand(socket, values);
        case 'write':
          return await writeCommand(socket, values);
        default:
          return await perf(socket, values);
      }
    } catch (err) {
      if (err instanceof UsageError) {
        console.error(`vfio-user nvme ${sub}: ${err.message}\n\n${USAGE}`);
        return 2;
      }
      console.error(`vfio-user nvme ${sub}: ${err instanceof SocketFailure ? `${socket}: ${err.message}` : withCode(err)}`);
      return 1;
    }
  },
};
