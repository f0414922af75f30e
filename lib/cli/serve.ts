/**
 * `vfio-user serve <device> SOCKET`: serve a device model until Ctrl-C / SIGTERM.
 */
import * as path from 'node:path';
import * as readline from 'node:readline';
import * as fs from 'node:fs';
import { Idio16Device } from '../devices/gpio/idio16';
import { NvmeController } from '../devices/nvme/controller';
import { VirtioBlkDevice } from '../devices/virtio-blk/device';
import { FileBackend, NbdBackend, RamBackend, type BlockBackend, type FileBackendOptions } from '../block';
import { VfioUserServer, type ServerOptions } from '../server/server';
import { MAX_BUSY_POLL_US } from '../transport/connection';
import type { VfioUserDevice } from '../server/device';
import type { CliCommand } from './command';
import { inheritedSocket, type Inherited } from './activation';
import { listenErrorMessage, socketPathProblem } from './messages';
import { checkBlockMultiple, Provisional } from './provisional';

const USAGE = `Usage: vfio-user serve <device> SOCKET [options]
       vfio-user serve <device> [SOCKET] --fd N [options]

Serve an emulated PCI device on the UNIX socket SOCKET for a vfio-user client such as
QEMU's vfio-user-pci. Ctrl-C or SIGTERM shuts down cleanly and removes the socket.

Devices:
  gpio        ACCES PCI-IDIO-16: 16 inputs, 16 outputs, change-of-state interrupt (Linux: gpio-pci-idio-16)
  nvme        NVMe controller with one namespace (Linux: nvme)
  virtio-blk  virtio 1.2 block device (Linux: virtio_pci, virtio_blk)

nvme options:
  --size SIZE          namespace size, e.g. 1G, 512M (default 1G); RAM-backed unless --file
  --file PATH          back the namespace with a file or block device (created if missing, with
                       --size); Flush and FUA reach the disk with fdatasync
  --nbd URI            back the namespace with an NBD export, nbd://HOST[:PORT]/EXPORT or
                       nbd+unix:///EXPORT?socket=PATH (qemu-nbd, qemu-storage-daemon, nbdkit); the
                       size is the export's; I/O waits while the server is away (30 s at most)
  --nbd-connections N  NBD connections when the server allows several, 1..16 (default 4)
  --read-only          a write-protected namespace (any backend; writes fail)
  --aio ENGINE         --file I/O: io_uring, threads (libuv's thread pool) or sync (on the event
                       loop's thread; for files in memory). Default: io_uring where the kernel
                       allows it, else threads; on tmpfs or ramfs a lone request of up to 64 KiB
                       is copied in place. The ready line says which and why
  --direct             --file with O_DIRECT: no host page cache
  --queues N           I/O queue pairs, 1..64 (default 16)
  --block-size B       logical block size, 512 or 4096 (default 512)
  --serial S           serial number (default: random)
  --model M            model number
  --doorbells MODE     trap (default: every doorbell write is a message), mmap (the doorbell
                       page is shared memory the controller polls adaptively) or ioeventfd (one
                       eventfd signal per doorbell, the value in shared shadow memory; clients
                       that do not use them send messages)
  --trace FILE         append controller events (state changes, admin commands, errors) to FILE

virtio-blk options:
  --size SIZE          disk size, e.g. 1G, 512M (default 1G); RAM-backed unless --file or --nbd
  --file PATH          back the disk with a file or block device (created if missing, with --size);
                       FLUSH and write-through writes reach the disk with fdatasync
  --nbd URI            back the disk with an NBD export (URIs as for nvme); the size is the
                       export's; I/O waits while the server is away (30 s at most)
  --nbd-connections N  NBD connections when the server allows several, 1..16 (default 4)
  --aio ENGINE         --file I/O: io_uring, threads or sync (as for nvme)
  --direct             --file with O_DIRECT: no host page cache
  --queues N           request queues, 1..64 (default 4)
  --block-size B       logical block size, 512, 1024, 2048 or 4096 (default 512, or an NBD
                       export's minimum block size if larger)
  --read-only          a read-only disk (VIRTIO_BLK_F_RO; any backend)
  --serial S           device ID (GET_ID), up to 20 characters (default: random)
  --notify MODE        trap (default: every queue notify is a message), mmap (the notify page is
                       shared memory the device polls adaptively) or ioeventfd (an eventfd per
                       queue for clients that use them; others still send messages)
  --trace FILE         append device events (status changes, resets, errors) to FILE

Options:
  --mode MODE            socket file mode, octal (default 0600)
  --fd N                 serve the listening UNIX socket inherited as fd N (socket activation);
                         without --fd, a socket systemd passes (LISTEN_PID, LISTEN_FDS: fd 3) is
                         served. SOCKET may then be left out; the socket file is not removed
  --version-timeout MS   disconnect a client that sends no VERSION within MS ms of being served
                         (default 10000; 0: no limit)
  --message-timeout MS   disconnect a client that begins a message and does not finish it within
                         MS ms (default 5000; 0: no limit)
  --keep-state           keep the device's state when its client goes away (a restarting VMM
                         reconnects and carries on) instead of resetting it; the device waits,
                         suspended, until the next client maps its memory again and uses it
  --busy-poll US         after the client's messages, keep polling its socket for US microseconds
                         (0-10000; default 0, off) before sleeping: lower latency for a busy VMM,
                         at the cost of CPU while it is active
  --json                 machine-readable output: JSON lines (ready, events, answers)
  -h, --help             show this help

gpio control (stdin, one JSON object per line):
  {"inputs": 4660}       set the 16 inputs (interrupts the guest on change if it enabled IRQs)
  {"get": "outputs"}     print {"outputs": N}; {"get": "state"} prints inputs, outputs, irq
  Output changes (by the guest, or 0 on a device reset) are printed as {"event": "outputs", "value": N}.`;

export const serveCommand: CliCommand = {
  name: 'serve',
  summary: 'serve an emulated device (gpio, nvme, virtio-blk) on a UNIX socket',
  usage: USAGE,
  options: {
    mode: { type: 'string' },
    fd: { type: 'string' },
    'version-timeout': { type: 'string' },
    'message-timeout': { type: 'string' },
    'keep-state': { type: 'boolean' },
    'busy-poll': { type: 'string' },
    json: { type: 'boolean' },
    size: { type: 'string' },
    file: { type: 'string' },
    queues: { type: 'string' },
    'block-size': { type: 'string' },
    serial: { type: 'string' },
    model: { type: 'string' },
    trace: { type: 'string' },
    doorbells: { type: 'string' },
    notify: { type: 'string' },
    'read-only': { type: 'boolean' },
    nbd: { type: 'string' },
    'nbd-connections': { type: 'string' },
    aio: { type: 'string' },
    direct: { type: 'boolean' },
  },
  async run(positionals, values) {
    const [device, given] = positionals;
    try {
      inherited = inheritedSocket(values.fd === undefined ? undefined : String(values.fd), given);
    } catch (err) {
      console.error(`vfio-user serve: ${(err as Error).message}\n\n${USAGE}`);
      return 2;
    }
    const socket = given ?? inherited?.path;
    if (device === undefined || socket === undefined || positionals.length > 2) {
      const why = device === undefined ? 'a device and a SOCKET are required' : socket === undefined ? 'SOCKET is required' : `unexpected argument '${positionals[2]!}'`;
      console.error(`vfio-user serve: ${why}\n\n${USAGE}`);
      return 2;
    }
    const mode = values.mode === undefined ? 0o600 : parseInt(String(values.mode), 8);
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) {
      console.error(`vfio-user serve: --mode must be an octal file mode, got '${String(values.mode)}'`);
      return 2;
    }
    const options: ServerOptions = { mode, keepState: values['keep-state'] === true };
    try {
      const versionTimeoutMs = intOption(values, 'version-timeout', 0, 0x7fffffff);
      const messageTimeoutMs = intOption(values, 'message-timeout', 0, 0x7fffffff);
      if (versionTimeoutMs !== undefined) options.versionTimeoutMs = versionTimeoutMs;
      if (messageTimeoutMs !== undefined) options.messageTimeoutMs = messageTimeoutMs;
      const busyPollUs = intOption(values, 'busy-poll', 0, MAX_BUSY_POLL_US);
      if (busyPollUs !== undefined) options.busyPollUs = busyPollUs;
    } catch (err) {
      console.error(`vfio-user serve: ${(err as Error).message}`);
      return 2;
    }
    const json = values.json === true;
    const own = DEVICE_OPTIONS[device];
    if (own !== undefined) {
      const foreign = Object.keys(values).find((k) => values[k] !== undefined && !own.includes(k) && Object.values(DEVICE_OPTIONS).some((o) => o.includes(k)));
      if (foreign !== undefined) {
        const takers = Object.keys(DEVICE_OPTIONS).filter((d) => DEVICE_OPTIONS[d]!.includes(foreign));
        console.error(`vfio-user serve ${device}: --${foreign} does not apply to ${device} (only to ${takers.join(', ')})\n\n${USAGE}`);
        return 2;
      }
      // Before anything is made: a socket that cannot be bound is known now.
      const problem = inherited !== null ? null : socketPathProblem(path.resolve(socket));
      if (problem !== null) {
        console.error(`vfio-user serve ${device}: ${path.resolve(socket)}: ${problem}`);
        return 1;
      }
    }
    /** Runs a server to its end; one that could not start takes back the files made for it. */
    const serve = async (running: Promise<number>): Promise<number> => {
      try {
        return await running;
      } catch (err) {
        provisional.rollback();
        console.error(`vfio-user serve ${device}: ${path.resolve(socket)}: ${listenErrorMessage(err, path.resolve(socket))}`);
        return 1;
      }
    };
    if (device === 'gpio') return serve(serveGpio(path.resolve(socket), options, json));
    if (device === 'nvme') {
      let controller: NvmeController;
      try {
        controller = await nvmeFromOptions(values);
      } catch (err) {
        provisional.rollback();
        console.error(`vfio-user serve nvme: ${(err as Error).message}`);
        return 2;
      }
      return serve(serveDisk(path.resolve(socket), options, json, 'nvme', controller, controller.backend, controller.backend.size, values));
    }
    if (device === 'virtio-blk') {
      let disk: VirtioBlkDevice;
      try {
        disk = await virtioBlkFromOptions(values);
      } catch (err) {
        provisional.rollback();
        console.error(`vfio-user serve virtio-blk: ${(err as Error).message}`);
        return 2;
      }
      return serve(serveDisk(path.resolve(socket), options, json, 'virtio-blk', disk, disk.backend, disk.capacity * 512, values));
    }
    console.error(`vfio-user serve: unknown device '${device}' (known: gpio, nvme, virtio-blk)`);
    return 2;
  },
};

/** The options only some devices take (the rest apply to every device). */
const DEVICE_OPTIONS: Record<string, readonly string[]> = {
  gpio: [],
  nvme: ['size', 'file', 'queues', 'block-size', 'serial', 'model', 'trace', 'doorbells', 'read-only', 'nbd', 'nbd-connections', 'aio', 'direct'],
  'virtio-blk': ['size', 'file', 'queues', 'block-size', 'serial', 'trace', 'notify', 'read-only', 'nbd', 'nbd-connections', 'aio', 'direct'],
};

/** The listening socket inherited (--fd, systemd), served instead of binding SOCKET; or null. */
let inherited: Inherited | null = null;

/** Listen on `socket`, or serve the inherited socket. */
async function listenOn(socket: string, device: VfioUserDevice, options: ServerOptions): Promise<VfioUserServer> {
  if (inherited !== null) return VfioUserServer.fromFd(inherited.fd, device, options);
  return VfioUserServer.listen(socket, device, options);
}

/** The files made for the server (--file, --trace), removed again if it does not start. */
const provisional = new Provisional();

function qemuOption(socket: string): string {
  return `-device '${JSON.stringify({ driver: 'vfio-user-pci', socket: { path: socket, type: 'unix' } })}'`;
}

async function serveGpio(socket: string, options: ServerOptions, json: boolean): Promise<number> {
  const device = new Idio16Device();
  const server = await listenOn(socket, device, options);
  const say = sayer(json);
  reportServer(server, say);
  device.events.on('outputs', (value) => say({ event: 'outputs', value }, `outputs 0x${value.toString(16).padStart(4, '0')}`));
  device.events.on('irq', (enabled) => say({ event: 'irq', enabled }, `interrupt ${enabled ? 'enabled' : 'disabled'}`));

  const input = readline.createInterface({ input: process.stdin, terminal: false });
  input.on('line', (line) => {
    if (line.trim() === '') return;
    let cmd: { inputs?: unknown; get?: unknown };
    try {
      cmd = JSON.parse(line) as typeof cmd;
    } catch {
      say({ error: 'not JSON' }, `error: not JSON: ${line}`);
      return;
    }
    if (typeof cmd.inputs === 'number' && Number.isInteger(cmd.inputs) && cmd.inputs >= 0 && cmd.inputs <= 0xffff) {
      device.setInputs(cmd.inputs);
      say({ inputs: device.inputs }, `inputs 0x${device.inputs.toString(16).padStart(4, '0')}`);
    } else if (cmd.get === 'outputs') {
      say({ outputs: device.outputs }, `outputs 0x${device.outputs.toString(16).padStart(4, '0')}`);
    } else if (cmd.get === 'state') {
      const state = { inputs: device.inputs, outputs: device.outputs, irq: device.interruptEnabled };
      say(state, JSON.stringify(state));
    } else {
      say({ error: 'unknown command' }, `error: expected {"inputs": 0..65535} or {"get": "outputs"|"state"}`);
    }
  });

  return runUntilSignalled(server, 'gpio', say, 'stopped: socket removed', () => input.close(), {
    obj: { event: 'ready', device: 'gpio', socket, qemu: qemuOption(socket) },
    text: `vfio-user: serving gpio (ACCES PCI-IDIO-16) on ${socket}\nattach with: ${qemuOption(socket)}`,
  });
}

type Say = (obj: Record<string, unknown>, text: string) => void;

/** Prints one line per event: JSON with --json, text otherwise. */
function sayer(json: boolean): Say {
  return (obj, text) => console.log(json ? JSON.stringify(obj) : text);
}

/** The server's own events, as every `serve` prints them. */
function reportServer(server: VfioUserServer, say: Say): void {
  server.on('connect', () => say({ event: 'connect' }, 'client connected'));
  server.on('disconnect', (err: Error | null) => say({ event: 'disconnect', error: err?.message ?? null }, `client disconnected${err ? `: ${err.message}` : ''}`));
  server.on('migration-refused', (err: Error) => say({ event: 'migration-refused', reason: err.message }, `migration stream refused: ${err.message}`));
}

/**
 * Serves until SIGINT or SIGTERM, then closes the server (which drains in-flight I/O and closes
 * the device and its backend) and resolves with the exit status. The ready line is printed only
 * once the signal handlers are in place: a supervisor may stop us as soon as it sees it.
 */
function runUntilSignalled(server: VfioUserServer, device: string, say: Say, stopped: string, beforeClose: (() => void) | null, ready: { obj: Record<string, unknown>; text: string }): Promise<number> {
  return new Promise<number>((resolve) => {
    const stop = () => {
      beforeClose?.();
      void server.close().then(
        () => {
          say({ event: 'stopped' }, stopped);
          resolve(0);
        },
        (err: unknown) => {
          console.error(`vfio-user serve ${device}: shutdown failed: ${(err as Error).message}`);
          resolve(1);
        },
      );
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    say(ready.obj, ready.text);
  });
}

/** Parse "1G", "512M", "64K", "4096" (bytes). */
export function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]i?B?)?$/i.exec(text.trim());
  if (!m) throw new Error(`bad size '${text}' (examples: 1G, 512M, 1073741824)`);
  const unit = (m[2] ?? '').charAt(0).toUpperCase();
  const scale = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[unit]!;
  const size = Number(m[1]) * scale;
  if (!Number.isSafeInteger(size) || size <= 0) throw new Error(`bad size '${text}'`);
  return size;
}

function intOption(values: Record<string, unknown>, name: string, min: number, max: number): number | undefined {
  const raw = values[name];
  if (raw === undefined) return undefined;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) throw new Error(`--${name} must be an integer from ${min} to ${max}, got '${String(raw)}'`);
  return n;
}

async function nvmeFromOptions(values: Record<string, string | boolean | undefined>): Promise<NvmeController> {
  const doorbells = values.doorbells ?? 'trap';
  if (doorbells !== 'trap' && doorbells !== 'mmap' && doorbells !== 'ioeventfd') throw new Error(`--doorbells must be trap, mmap or ioeventfd, got '${String(doorbells)}'`);
  const queues = intOption(values, 'queues', 1, 64);
  const traceFd = values.trace === undefined ? null : provisional.openTrace(String(values.trace));
  const { backend, blockSize } = await openDisk(values, [512, 4096]);
  return onBackend(backend, () =>
    new NvmeController({
      backend,
      doorbells,
      blockSize: blockSize as 512 | 4096,
      ...(queues !== undefined ? { queues } : {}),
      ...(values.serial !== undefined ? { serial: String(values.serial) } : {}),
      ...(values.model !== undefined ? { model: String(values.model) } : {}),
      ...(traceFd !== null ? { trace: traceLines(traceFd) } : {}),
    }),
  );
}

/**
 * The backend of a disk (either device) from --nbd, --file or --size (RAM), with --read-only and
 * --nbd-connections, and its logical block size: --block-size (one of `blockSizes`), else 512,
 * raised to the smallest of `blockSizes` that an NBD export's minimum block size allows.
 */
async function openDisk(values: Record<string, string | boolean | undefined>, blockSizes: readonly number[]): Promise<{ backend: BlockBackend; blockSize: number }> {
  const size = values.size === undefined ? undefined : parseSize(String(values.size));
  const given = intOption(values, 'block-size', 512, 4096);
  if (given !== undefined && !blockSizes.includes(given)) throw new Error(`--block-size must be ${blockSizes.slice(0, -1).join(', ')} or ${String(blockSizes.at(-1))}`);
  let blockSize = given ?? 512;
  const readOnly = values['read-only'] === true;
  if (values.nbd !== undefined) {
    if (values.file !== undefined || size !== undefined) throw new Error('--nbd takes neither --file nor --size (the size is the export\'s)');
    const connections = intOption(values, 'nbd-connections', 1, 16);
    const nbd = await NbdBackend.open(String(values.nbd), { readOnly, ...(connections !== undefined ? { connections } : {}) });
    try {
      if (nbd.minBlock > blockSize) {
        const fit = blockSizes.find((b) => b >= nbd.minBlock);
        if (given !== undefined || fit === undefined) throw new Error(`the NBD export's minimum block size is ${nbd.minBlock}`);
        blockSize = fit;
      }
      checkBlockMultiple(`the NBD export's size, ${nbd.size} bytes,`, nbd.size, blockSize);
    } catch (err) {
      await nbd.close(); // its sockets would keep the process alive
      throw err;
    }
    return { backend: nbd, blockSize };
  }
  if (values.file !== undefined) return { backend: provisional.openBacking(String(values.file), { size, blockSize, readOnly, ...fileIoOptions(values) }), blockSize };
  if (size !== undefined) checkBlockMultiple(`--size ${size}`, size, blockSize);
  return { backend: new RamBackend(size ?? 2 ** 30, { readOnly }), blockSize };
}

/** --aio and --direct, for a FileBackend. */
function fileIoOptions(values: Record<string, string | boolean | undefined>): Pick<FileBackendOptions, 'engine' | 'direct'> {
  const aio = values.aio;
  if (aio !== undefined && aio !== 'io_uring' && aio !== 'threads' && aio !== 'sync') throw new Error(`--aio must be io_uring, threads or sync, got '${String(aio)}'`);
  if ((aio !== undefined || values.direct === true) && values.file === undefined) throw new Error('--aio and --direct need --file');
  return { engine: aio === 'threads' ? 'threadpool' : aio === 'io_uring' || aio === 'sync' ? aio : 'auto', direct: values.direct === true };
}

/** How a file is read and written, for the ready line (`inlineMaxBytes`: requests done in place, when not all are). */
function fileIoReport(file: FileBackend): { engine: string; note?: string; inlineMaxBytes?: number; direct: boolean } {
  const partlyInline = file.inlineMax > 0 && Number.isFinite(file.inlineMax);
  return { engine: file.engine, ...(file.engineNote !== undefined ? { note: file.engineNote } : {}), ...(partlyInline ? { inlineMaxBytes: file.inlineMax } : {}), direct: file.direct };
}

/** Builds a device on `backend`; if that fails (a bad option), the backend is closed: an NBD backend's sockets would keep the process alive. */
async function onBackend<T>(backend: BlockBackend, make: () => T): Promise<T> {
  try {
    return make();
  } catch (err) {
    await backend.close().catch(() => {});
    throw err;
  }
}

/** Appends each line, timestamped, to the trace file. */
function traceLines(fd: number): (line: string) => void {
  return (line) => fs.writeSync(fd, `${new Date().toISOString()} ${line}\n`);
}

/**
 * Serves a disk device until signalled: the ready line names its size and backing, and an NBD
 * backend's losses and returns are reported as events.
 */
async function serveDisk(socket: string, options: ServerOptions, json: boolean, name: string, device: VfioUserDevice, backend: BlockBackend, sizeBytes: number, values: Record<string, unknown>): Promise<number> {
  const server = await listenOn(socket, device, options).catch(async (err: unknown) => {
    await backend.close().catch(() => {}); // an NBD backend's sockets would keep the process alive
    throw err;
  });
  const say = sayer(json);
  const nbd = backend instanceof NbdBackend ? backend : null;
  // `backing` keeps its first-wave form ("file PATH", "nbd URI", "RAM"; ", read-only"): scripts
  // parse it. How a file is read and written goes in a field of its own.
  const fileIo = backend instanceof FileBackend ? fileIoReport(backend) : null;
  const fileText = fileIo === null ? '' : `, ${fileIo.engine}${fileIo.note !== undefined ? ` (${fileIo.note})` : ''}${fileIo.direct ? ', O_DIRECT' : ''}`;
  const readOnly = backend.readOnly === true ? ', read-only' : '';
  const backing = `${nbd !== null ? `nbd ${nbd.uri}` : values.file !== undefined ? `file ${String(values.file)}` : 'RAM'}${readOnly}`;
  const backingText = `${nbd !== null ? `nbd ${nbd.uri}` : values.file !== undefined ? `file ${String(values.file)}${fileText}` : 'RAM'}${readOnly}`;
  nbd?.on('disconnect', (err: Error) => say({ event: 'nbd-disconnect', error: err.message }, `NBD server lost (${err.message}): I/O waits while reconnecting`));
  nbd?.on('reconnect', () => say({ event: 'nbd-reconnect' }, 'NBD server back: I/O resumes'));
  reportServer(server, say);
  return runUntilSignalled(server, name, say, 'stopped: data flushed, socket removed', null, {
    obj: { event: 'ready', device: name, socket, sizeBytes, backing, ...(fileIo !== null ? { fileIo } : {}), qemu: qemuOption(socket) },
    text: `vfio-user: serving ${name} (${(sizeBytes / 2 ** 30).toFixed(2)} GiB, ${backingText}) on ${socket}\nattach with: ${qemuOption(socket)}`,
  });
}

async function virtioBlkFromOptions(values: Record<string, string | boolean | undefined>): Promise<VirtioBlkDevice> {
  const queues = intOption(values, 'queues', 1, 64);
  const notify = values.notify ?? 'trap';
  if (notify !== 'trap' && notify !== 'mmap' && notify !== 'ioeventfd') throw new Error(`--notify must be trap, mmap or ioeventfd, got '${String(notify)}'`);
  const traceFd = values.trace === undefined ? null : provisional.openTrace(String(values.trace));
  const { backend, blockSize } = await openDisk(values, [512, 1024, 2048, 4096]);
  return onBackend(backend, () =>
    new VirtioBlkDevice({
      backend,
      notify,
      blockSize,
      ...(queues !== undefined ? { queues } : {}),
      ...(values.serial !== undefined ? { serial: String(values.serial) } : {}),
      ...(traceFd !== null ? { trace: traceLines(traceFd) } : {}),
    }),
  );
}
