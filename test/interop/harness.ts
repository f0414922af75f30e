/**
 * Interop harness: boots a Linux guest under QEMU 11.1 (whose `vfio-user-pci` device is a real
 * vfio-user client) with an initramfs built at test time, and returns what the guest printed.
 *
 * Everything it runs comes from the cache that `scripts/setup-interop.sh` fills from Debian's
 * packages (see ../../../shared/peers.md): a trixie root with qemu-system-x86 from
 * trixie-backports, run through its own loader; Debian 12's kernel with a few modules;
 * busybox-static; fio with its libraries.
 *
 * The guest's /init (busybox sh) mounts proc, sys and devtmpfs, loads the requested modules in
 * dependency order, runs the test's script, prints `HARNESS-DONE rc=N` and powers off. A script
 * reports values with lines `RESULT key=value ...`, collected into `BootResult.results`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { promisify } from 'node:util';

const gzip = promisify(zlib.gzip);

/** The cache directory; the same default and variable as scripts/setup-interop.sh. */
export function interopDir(): string {
  return process.env['VFIO_USER_INTEROP_DIR'] || '/var/cache/vfio-user-interop';
}

function paths(dir = interopDir()) {
  const root = path.join(dir, 'qemu-root');
  const guest = path.join(dir, 'guest');
  return {
    dir,
    stamp: path.join(dir, '.complete'),
    manifest: path.join(dir, 'manifest'),
    root,
    loader: path.join(root, 'usr/lib64/ld-linux-x86-64.so.2'),
    libDir: path.join(root, 'usr/lib/x86_64-linux-gnu'),
    qemu: path.join(root, 'usr/bin/qemu-system-x86_64'),
    qemuModules: path.join(root, 'usr/lib/x86_64-linux-gnu/qemu'),
    biosDirs: [path.join(root, 'usr/share/seabios'), path.join(root, 'usr/share/qemu')],
    guest,
    vmlinuz: path.join(guest, 'vmlinuz'),
    vmlinux: path.join(guest, 'vmlinux'),
    kernelVersion: path.join(guest, 'kernel-version'),
    busybox: path.join(guest, 'busybox'),
    modules: path.join(guest, 'modules'),
    fio: path.join(guest, 'fio'),
  };
}

const SETUP_HINT = 'run `bash scripts/setup-interop.sh` (as root) to fetch QEMU 11.1 and the guest';

/**
 * Whether the interop cache is complete; `reason` says what is missing when it is not. Tests skip
 * on `ok: false` only on a developer machine: with VFIO_USER_REQUIRE_INTEROP=1 (set by .ci/run,
 * which installs the cache) a missing cache throws, so CI fails instead of skipping.
 */
export function interopAvailable(): { ok: boolean; reason?: string } {
  const result = checkInterop();
  if (!result.ok && process.env.VFIO_USER_REQUIRE_INTEROP === '1') {
    throw new Error(`interop tests are required here (VFIO_USER_REQUIRE_INTEROP=1) but ${result.reason}`);
  }
  return result;
}

function checkInterop(): { ok: boolean; reason?: string } {
  if (process.platform !== 'linux' || process.arch !== 'x64') {
    return { ok: false, reason: `interop tests need linux/x64, not ${process.platform}/${process.arch}` };
  }
  const p = paths();
  if (!fs.existsSync(p.stamp)) {
    return { ok: false, reason: `interop cache not found at ${p.dir} (no ${path.basename(p.stamp)}): ${SETUP_HINT}` };
  }
  const required = [p.loader, p.qemu, p.vmlinuz, p.kernelVersion, p.busybox, p.fio];
  for (const f of required) {
    if (!fs.existsSync(f)) return { ok: false, reason: `interop cache incomplete: ${f} is missing: ${SETUP_HINT}` };
  }
  try {
    fs.accessSync(p.loader, fs.constants.X_OK);
  } catch {
    return { ok: false, reason: `${p.loader} is not executable` };
  }
  return { ok: true };
}

/** The text of the cache's manifest (what was fetched, with versions), or '' when absent. */
export function interopManifest(): string {
  try {
    return fs.readFileSync(paths().manifest, 'utf8');
  } catch {
    return '';
  }
}

export function kernelVersion(): string {
  return fs.readFileSync(paths().kernelVersion, 'utf8').trim();
}

// ----------------------------------------------------------------------------------------------
// Kernel modules: modules.dep as written by setup-interop.sh (depmod's format: each line lists a
// module's whole closure, to be loaded from last to first).

const normalizeModule = (name: string) =>
  path.basename(name).replace(/\.ko(\.(xz|zst|gz))?$/, '').replace(/-/g, '_');

interface ModuleIndex {
  /** normalized name -> path relative to /lib/modules/<version> */
  path: Map<string, string>;
  /** relative path -> its closure, in modules.dep order */
  deps: Map<string, string[]>;
  builtin: Set<string>;
}

function readModuleIndex(): ModuleIndex {
  const dir = path.join(paths().modules, kernelVersion());
  const index: ModuleIndex = { path: new Map(), deps: new Map(), builtin: new Set() };
  for (const line of fs.readFileSync(path.join(dir, 'modules.dep'), 'utf8').split('\n')) {
    const m = /^([^:]+):\s*(.*)$/.exec(line.trim());
    if (!m) continue;
    const rel = m[1]!;
    index.path.set(normalizeModule(rel), rel);
    index.deps.set(rel, m[2]!.split(/\s+/).filter(Boolean));
  }
  try {
    for (const line of fs.readFileSync(path.join(dir, 'modules.builtin'), 'utf8').split('\n')) {
      if (line.trim()) index.builtin.add(normalizeModule(line.trim()));
    }
  } catch {
    /* optional */
  }
  return index;
}

/**
 * Resolves module names (`nvme`, `gpio-pci-idio-16`, `nvme_core`...) to the paths to insmod, in
 * load order, each once. Built-in modules are skipped; an unknown module throws, listing the
 * available ones (add more with VFIO_USER_INTEROP_MODULES when running the setup script).
 */
export function resolveModules(names: string[]): string[] {
  if (names.length === 0) return [];
  const index = readModuleIndex();
  const order: string[] = [];
  const add = (rel: string) => {
    if (!order.includes(rel)) order.push(rel);
  };
  for (const name of names) {
    const n = normalizeModule(name);
    const rel = index.path.get(n);
    if (!rel) {
      if (index.builtin.has(n)) continue;
      const have = [...index.path.keys()].sort().join(', ');
      throw new Error(`kernel module ${name} is not in the interop cache (have: ${have}); ` +
        'add it with VFIO_USER_INTEROP_MODULES and rerun scripts/setup-interop.sh');
    }
    const deps = index.deps.get(rel) ?? [];
    for (let i = deps.length - 1; i >= 0; i--) add(deps[i]!);
    add(rel);
  }
  return order;
}

// ----------------------------------------------------------------------------------------------
// newc cpio writer (the initramfs format the kernel unpacks), in memory.

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

export class CpioWriter {
  private readonly chunks: Buffer[] = [];
  private readonly seen = new Set<string>();
  private ino = 1;
  private readonly mtime = Math.floor(Date.now() / 1000);

  private entry(name: string, mode: number, data: Buffer, rdev: [number, number] = [0, 0], nlink = 1) {
    const nameBuf = Buffer.from(name + '\0', 'utf8');
    const fields = [
      this.ino++, mode, 0, 0, nlink, this.mtime, data.length, 0, 0, rdev[0], rdev[1], nameBuf.length, 0,
    ];
    const header = Buffer.from('070701' + fields.map((f) => (f >>> 0).toString(16).padStart(8, '0')).join(''), 'ascii');
    this.chunks.push(header, nameBuf, Buffer.alloc(pad4(header.length + nameBuf.length)));
    if (data.length) this.chunks.push(data, Buffer.alloc(pad4(data.length)));
  }

  private parents(p: string) {
    const parts = p.split('/');
    for (let i = 1; i < parts.length; i++) this.dir(parts.slice(0, i).join('/'));
  }

  private claim(p: string): string | undefined {
    const name = p.replace(/^\/+/, '').replace(/\/+$/, '');
    if (!name || this.seen.has(name)) return undefined;
    this.parents(name);
    this.seen.add(name);
    return name;
  }

  dir(p: string, mode = 0o755): this {
    const name = this.claim(p);
    if (name) this.entry(name, S_IFDIR | mode, Buffer.alloc(0), [0, 0], 2);
    return this;
  }

  file(p: string, data: string | Buffer, mode = 0o644): this {
    const name = p.replace(/^\/+/, '');
    if (this.seen.has(name)) throw new Error(`initramfs: ${p} added twice`);
    this.claim(name);
    this.entry(name, S_IFREG | mode, typeof data === 'string' ? Buffer.from(data, 'utf8') : data);
    return this;
  }

  symlink(p: string, target: string): this {
    const name = this.claim(p);
    if (name) this.entry(name, S_IFLNK | 0o777, Buffer.from(target, 'utf8'));
    return this;
  }

  chardev(p: string, major: number, minor: number, mode = 0o600): this {
    const name = this.claim(p);
    if (name) this.entry(name, S_IFCHR | mode, Buffer.alloc(0), [major, minor]);
    return this;
  }

  /** The archive, with its TRAILER!!! entry. */
  finish(): Buffer[] {
    this.entry('TRAILER!!!', 0, Buffer.alloc(0), [0, 0], 1);
    return this.chunks;
  }
}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

/** Adds a host directory tree under guest path `at`, keeping modes and symlinks. */
function addTree(cpio: CpioWriter, hostDir: string, at: string) {
  for (const ent of fs.readdirSync(hostDir, { withFileTypes: true })) {
    const host = path.join(hostDir, ent.name);
    const guest = path.posix.join(at, ent.name);
    if (ent.isSymbolicLink()) cpio.symlink(guest, fs.readlinkSync(host));
    else if (ent.isDirectory()) {
      cpio.dir(guest);
      addTree(cpio, host, guest);
    } else if (ent.isFile()) cpio.file(guest, fs.readFileSync(host), fs.statSync(host).mode & 0o7777);
  }
}

// ----------------------------------------------------------------------------------------------
// Temporary files, removed when the process exits.

// Each process keeps its files in one directory named after its pid; the first use sweeps the
// directories of processes that are gone (vitest's workers do not always run exit handlers).

const children = new Set<ChildProcess>();
let processTemp: string | undefined;
let seq = 0;
const TEMP_PREFIX = 'vfio-user-interop-';

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function sweepStale(base: string) {
  for (const name of fs.readdirSync(base)) {
    const m = new RegExp(`^${TEMP_PREFIX}(\\d+)$`).exec(name);
    if (m && Number(m[1]) !== process.pid && !pidAlive(Number(m[1]))) {
      fs.rmSync(path.join(base, name), { recursive: true, force: true });
    }
  }
}

function baseTempDir(): string {
  try {
    fs.accessSync('/dev/shm', fs.constants.W_OK);
    return '/dev/shm';
  } catch {
    return os.tmpdir();
  }
}

let exitHook = false;
function ensureExitHook() {
  if (exitHook) return;
  exitHook = true;
  process.once('exit', () => {
    for (const c of children) c.kill('SIGKILL');
    cleanupInterop();
  });
}

/** A new private directory (under /dev/shm when writable: images and archives stay in RAM). */
function trackTemp(what: string): string {
  if (!processTemp) {
    const base = baseTempDir();
    try {
      sweepStale(base);
    } catch {
      /* best effort */
    }
    processTemp = path.join(base, `${TEMP_PREFIX}${process.pid}`);
    fs.mkdirSync(processTemp, { recursive: true, mode: 0o700 });
    ensureExitHook();
  }
  const d = path.join(processTemp, `${what}-${++seq}`);
  fs.mkdirSync(d);
  return d;
}

/** Removes the harness's temporary files now (also done at exit, or by the next run's sweep). */
export function cleanupInterop(): void {
  if (processTemp) fs.rmSync(processTemp, { recursive: true, force: true });
  processTemp = undefined;
}

// ----------------------------------------------------------------------------------------------
// The initramfs.

export const DONE_MARKER = 'HARNESS-DONE';

export interface InitramfsOptions {
  /** busybox sh script run after the modules are loaded; its exit status is reported. */
  script: string;
  /** Kernel modules to load first (dependencies are added and ordered from modules.dep). */
  modules: string[];
  /** More guest files: absolute guest path -> content (mode 0644, or give {data, mode}). */
  extraFiles?: Record<string, string | Buffer | { data: string | Buffer; mode: number }>;
  /** Include fio and its libraries (about 87 MB uncompressed: ~1 s more to boot). */
  withFio?: boolean;
  /** gzip level, 1 by default (the archive is built for one boot). */
  compressionLevel?: number;
  /** Where to write the archive (default: a new temporary directory). */
  outFile?: string;
}

function initScript(kver: string, modules: string[], withFio: boolean): string {
  const insmods = modules
    .map((m) => `insmod /lib/modules/${kver}/${m} || echo "HARNESS-INSMOD-FAILED ${path.basename(m)}"`)
    .join('\n');
  return `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root${withFio ? ' LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu/ceph' : ''}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo /sbin/modprobe > /proc/sys/kernel/modprobe
echo "HARNESS-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
${insmods}
cd /root
sh /harness/script.sh
rc=$?
echo "${DONE_MARKER} rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
`;
}

/**
 * Builds the initramfs for a boot and returns its path: a gzip'ed newc cpio with busybox, /init,
 * the script, the cached modules and `extraFiles`; with `withFio`, preceded by an uncompressed
 * newc archive of fio and its libraries (the kernel unpacks concatenated archives in turn).
 */
export async function buildInitramfs(opts: InitramfsOptions): Promise<string> {
  const p = paths();
  const kver = kernelVersion();
  const modules = resolveModules(opts.modules);
  const cpio = new CpioWriter();
  for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'proc', 'sys', 'dev', 'tmp', 'run', 'root', 'etc', 'harness']) {
    cpio.dir(d);
  }
  cpio.chardev('dev/console', 5, 1);
  cpio.chardev('dev/null', 1, 3, 0o666);
  cpio.file('bin/busybox', fs.readFileSync(p.busybox), 0o755);
  cpio.file('init', initScript(kver, modules, !!opts.withFio), 0o755);
  cpio.file('harness/script.sh', opts.script, 0o755);
  const modDir = path.join(p.modules, kver);
  for (const f of ['modules.dep', 'modules.builtin', 'modules.order']) {
    if (fs.existsSync(path.join(modDir, f))) cpio.file(`lib/modules/${kver}/${f}`, fs.readFileSync(path.join(modDir, f)));
  }
  // Every module in the cache goes in (a few hundred KiB), so modprobe works in scripts too.
  const index = readModuleIndex();
  for (const rel of index.deps.keys()) cpio.file(`lib/modules/${kver}/${rel}`, fs.readFileSync(path.join(modDir, rel)));
  for (const [guestPath, v] of Object.entries(opts.extraFiles ?? {})) {
    if (typeof v === 'string' || Buffer.isBuffer(v)) cpio.file(guestPath, v);
    else cpio.file(guestPath, v.data, v.mode);
  }
  const gz = await gzip(Buffer.concat(cpio.finish()), { level: opts.compressionLevel ?? 1 });
  const out = opts.outFile ?? path.join(trackTemp('initramfs'), 'initramfs.img');
  // The kernel unpacks concatenated archives in order, each compressed or not: fio's (built once
  // per process, uncompressed: gzip would cost ~1.2 s here and ~1.5 s of inflating in the TCG
  // guest) goes first, so the test's own files win over it.
  fs.writeFileSync(out, opts.withFio ? Buffer.concat([fioSegment(), gz]) : gz);
  return out;
}

let fioArchive: Buffer | undefined;
/** fio and its libraries as one uncompressed newc archive, built on first use and kept for the process. */
function fioSegment(): Buffer {
  if (!fioArchive) {
    const cpio = new CpioWriter();
    addTree(cpio, paths().fio, '');
    fioArchive = Buffer.concat(cpio.finish());
  }
  return fioArchive;
}

// ----------------------------------------------------------------------------------------------
// Booting.

export interface VfioUserSocket {
  path: string;
  /** More vfio-user-pci properties, e.g. { 'x-msg-timeout': 20000 } or { id: 'dev0' }. */
  props?: Record<string, unknown>;
}

export interface BootOptions {
  /** One vfio-user-pci device per socket path (QEMU connects to each at startup). */
  sockets?: Array<string | VfioUserSocket>;
  initramfs: string;
  memoryMiB?: number;
  /** Virtual CPUs (default 1). */
  cpus?: number;
  /** Kill QEMU after this long (default 20 s); the result then has timedOut: true. */
  timeoutMs?: number;
  extraQemuArgs?: string[];
  /**
   * Boot the decompressed kernel (vmlinux) through its PVH entry when the cache has it (default):
   * about 2.5 s faster under TCG than the bzImage, which spends that decompressing itself. SeaBIOS
   * runs either way. false boots vmlinuz exactly as ../../../shared/peers.md shows.
   */
  pvh?: boolean;
  /** Extra kernel command line, after the harness's own. */
  append?: string;
  /** Each console line as it arrives (\r stripped). */
  onLine?: (line: string) => void;
  /** Called once QEMU is spawned (e.g. to watch it or kill it early). */
  onSpawn?: (child: ChildProcess) => void;
  /**
   * Adds QEMU's own emulated NVMe controller (serial "ref") backed by a raw image: the reference
   * device for side-by-side comparisons. The image is created sparse (in /dev/shm when writable,
   * else the temp dir) unless `image` names one; a created image is deleted after the boot unless
   * `keepImage` is set. `driveOptions` are appended to -drive (e.g. 'cache=unsafe,aio=threads'),
   * `deviceOptions` to -device nvme (e.g. 'max_ioqpairs=4').
   */
  qemuNvme?: { sizeMiB: number; image?: string; keepImage?: boolean; driveOptions?: string; deviceOptions?: string };
}

export interface BootResult {
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  /** Everything the guest wrote to its serial console. */
  output: string;
  lines: string[];
  /** QEMU's own stderr (device realize errors and the like). */
  stderr: string;
  /** Merged `RESULT key=value` pairs printed by the script. */
  results: Record<string, string>;
  /** The script's exit status, or null if the guest never got to the end. */
  scriptExitCode: number | null;
  /** Modules whose insmod failed. */
  insmodFailures: string[];
  durationMs: number;
  /** The qemuNvme image, when one was kept. */
  qemuNvmeImage?: string;
  /** The full command that ran. */
  command: string[];
}

/** Parses `RESULT key=value key2="quoted value"` lines into one object (later keys win). */
export function parseResults(lines: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of lines) {
    const at = line.indexOf('RESULT ');
    if (at < 0 || (at > 0 && !/\s/.test(line[at - 1]!))) continue;
    const re = /([A-Za-z0-9_.:-]+)=("([^"]*)"|\S*)/g;
    let m: RegExpExecArray | null;
    while ((m = re.exec(line.slice(at + 7)))) out[m[1]!] = m[3] ?? m[2]!;
  }
  return out;
}

/** The program and arguments that run the cache's QEMU, and the environment it needs. */
export function qemuCommand(args: string[]): { file: string; args: string[]; env: NodeJS.ProcessEnv } {
  const p = paths();
  return {
    file: p.loader,
    args: ['--library-path', p.libDir, p.qemu, ...p.biosDirs.flatMap((d) => ['-L', d]), ...args],
    env: { ...process.env, QEMU_MODULE_DIR: p.qemuModules },
  };
}

/** Boots the guest and resolves when QEMU exits (or is killed on timeout). Never rejects for a guest failure. */
export async function bootGuest(opts: BootOptions): Promise<BootResult> {
  const p = paths();
  const mem = opts.memoryMiB ?? 512;
  const kernel = opts.pvh !== false && fs.existsSync(p.vmlinux) ? p.vmlinux : p.vmlinuz;
  const args = [
    '-machine', 'q35', '-accel', 'tcg', '-cpu', 'max', '-m', `${mem}M`, '-smp', String(opts.cpus ?? 1),
    // Guest RAM must be a shared memfd: that is what lets QEMU hand its fd to the server in DMA_MAP.
    '-object', `memory-backend-memfd,id=mem,size=${mem}M,share=on`, '-machine', 'memory-backend=mem',
    // -nodefaults: q35's default AHCI CD-ROM would stall SeaBIOS for ~30 s under TCG.
    '-nodefaults', '-display', 'none', '-serial', 'stdio', '-no-reboot',
    '-kernel', kernel, '-initrd', opts.initramfs,
    '-append', `console=ttyS0 panic=-1 quiet${opts.append ? ' ' + opts.append : ''}`,
  ];
  for (const s of opts.sockets ?? []) {
    const sock = typeof s === 'string' ? { path: s } : s;
    args.push('-device', JSON.stringify({
      driver: 'vfio-user-pci', socket: { path: sock.path, type: 'unix' }, ...(sock.props ?? {}),
    }));
  }
  let image: string | undefined;
  let removeImage = false;
  if (opts.qemuNvme) {
    image = opts.qemuNvme.image ?? path.join(trackTemp('nvme'), 'nvme.img');
    removeImage = !opts.qemuNvme.image && !opts.qemuNvme.keepImage;
    if (!fs.existsSync(image) || fs.statSync(image).size !== opts.qemuNvme.sizeMiB * 1024 * 1024) {
      const fd = fs.openSync(image, 'w');
      fs.ftruncateSync(fd, opts.qemuNvme.sizeMiB * 1024 * 1024);
      fs.closeSync(fd);
    }
    const extra = opts.qemuNvme.driveOptions ? ',' + opts.qemuNvme.driveOptions : '';
    const device = opts.qemuNvme.deviceOptions ? ',' + opts.qemuNvme.deviceOptions : '';
    args.push('-drive', `file=${image},if=none,id=nvm,format=raw${extra}`, '-device', `nvme,serial=ref,drive=nvm${device}`);
  }
  args.push(...(opts.extraQemuArgs ?? []));

  const cmd = qemuCommand(args);
  const started = Date.now();
  const child = spawn(cmd.file, cmd.args, { env: cmd.env, stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(child);
  ensureExitHook();
  opts.onSpawn?.(child);

  const lines: string[] = [];
  let output = '';
  let partial = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    output += chunk;
    partial += chunk;
    let nl: number;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, nl).replace(/\r+$/, '');
      partial = partial.slice(nl + 1);
      lines.push(line);
      opts.onLine?.(line);
    }
  });
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => {
    stderr += chunk;
  });

  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, opts.timeoutMs ?? 20_000);

  const [exitCode, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => {
    child.once('error', (err) => {
      stderr += `spawn failed: ${err.message}\n`;
      resolve([null, null]);
    });
    child.once('close', (code, sig) => resolve([code, sig]));
  });
  clearTimeout(timer);
  children.delete(child);
  if (partial) {
    const line = partial.replace(/\r+$/, '');
    lines.push(line);
    opts.onLine?.(line);
  }
  if (image && removeImage) fs.rmSync(image, { force: true });

  let scriptExitCode: number | null = null;
  const insmodFailures: string[] = [];
  for (const line of lines) {
    const done = new RegExp(`${DONE_MARKER} rc=(\\d+)`).exec(line);
    if (done) scriptExitCode = Number(done[1]);
    const fail = /HARNESS-INSMOD-FAILED (\S+)/.exec(line);
    if (fail) insmodFailures.push(fail[1]!);
  }
  const result: BootResult = {
    exitCode, signal, timedOut, output, lines, stderr,
    results: parseResults(lines), scriptExitCode, insmodFailures,
    durationMs: Date.now() - started,
    command: [cmd.file, ...cmd.args],
  };
  if (image && !removeImage) result.qemuNvmeImage = image;
  return result;
}

/** Guest shell: wait up to `seconds` for `path` to exist (e.g. a device node), else exit 1. */
export function waitForPathScript(guestPath: string, seconds = 10): string {
  return `i=0; while [ ! -e ${guestPath} ]; do i=$((i+1)); [ $i -gt ${seconds * 10} ] && ` +
    `{ echo "RESULT missing=${guestPath}"; exit 1; }; sleep 0.1; done`;
}

/** A short description of a boot for assertion messages: exit, timing and the output's tail. */
export function describeBoot(r: BootResult, tailLines = 40): string {
  return [
    `exit=${r.exitCode} signal=${r.signal} timedOut=${r.timedOut} script rc=${r.scriptExitCode} ` +
      `in ${r.durationMs} ms`,
    '--- console (tail) ---', ...r.lines.slice(-tailLines),
    '--- qemu stderr ---', r.stderr.trim(),
  ].join('\n');
}
