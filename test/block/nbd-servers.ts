/**
 * Real NBD servers for tests and benchmarks, run as child processes: Debian's qemu-nbd (qemu-utils)
 * and nbdkit, and qemu-storage-daemon. They listen on UNIX sockets or on 127.0.0.1 only. Each can
 * be killed (SIGKILL by default) and started again on the same address, as a server crash and
 * restart would.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { NbdConnection, parseNbdUri } from '../../lib/block';

/** Path of a command on PATH, or null. */
export function which(cmd: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(':')) {
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  return null;
}

/**
 * Why the real-server tests cannot run here (null if they can). CI (VFIO_USER_REQUIRE_INTEROP=1,
 * where .ci/run installs qemu-utils and nbdkit) fails instead of skipping.
 */
export function nbdToolsMissing(...tools: string[]): string | null {
  const missing = tools.filter((t) => which(t) === null);
  if (missing.length === 0) return null;
  const reason = `${missing.join(', ')} not installed (apt-get install qemu-utils nbdkit)`;
  if (process.env.VFIO_USER_REQUIRE_INTEROP === '1') throw new Error(`NBD interop is required here but ${reason}`);
  return reason;
}

/** A free TCP port on 127.0.0.1 (closed again: a small race, fine for tests). */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((r) => server.close(r));
  return port;
}

/** Creates a qcow2 image with qemu-img. */
export function createQcow2(file: string, size: string): void {
  const r = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, size], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.stderr}`);
}

export class NbdServerProcess {
  #child: ChildProcess | null = null;
  #exited: Promise<void> = Promise.resolve();
  stderr = '';

  constructor(
    readonly name: string,
    readonly command: string,
    readonly args: readonly string[],
    /** Where clients reach it. */
    readonly uri: string,
    readonly env: NodeJS.ProcessEnv = process.env,
  ) {}

  get pid(): number | undefined {
    return this.#child?.pid;
  }

  /** Starts the server and waits until an NBD handshake succeeds. */
  async start(timeoutMs = 15_000): Promise<void> {
    const target = parseNbdUri(this.uri);
    if ('socket' in target) fs.rmSync(target.socket, { force: true });
    const child = spawn(this.command, this.args, { stdio: ['ignore', 'ignore', 'pipe'], env: this.env });
    this.#child = child;
    child.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.#exited = new Promise((resolve) => child.once('exit', () => resolve()));
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${this.name} exited: ${this.stderr}`);
      try {
        const c = await NbdConnection.connect(target, { timeoutMs: 2000 });
        await c.close();
        return;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`${this.name} not ready after ${timeoutMs} ms: ${(err as Error).message}; stderr: ${this.stderr}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /** Kills the server (SIGKILL: a crash, nothing flushed by it) and waits for it to exit. */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.#child;
    if (child === null) return;
    this.#child = null;
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    await this.#exited;
  }

  async restart(): Promise<void> {
    await this.kill();
    await this.start();
  }
}

/** qemu-nbd serving `image` (format `format`) as export `name` on a UNIX socket or 127.0.0.1:port. */
export function qemuNbd(
  image: string,
  where: { socket: string } | { port: number },
  options: { format?: string; name?: string; readOnly?: boolean; cache?: 'writeback' | 'writethrough' | 'none'; extra?: string[] } = {},
): NbdServerProcess {
  const name = options.name ?? 'disk';
  const args = ['-f', options.format ?? 'qcow2', '-x', name, '-t', '--shared=16', `--cache=${options.cache ?? 'writeback'}`, '--aio=threads'];
  if (options.readOnly) args.push('-r');
  const uri = 'socket' in where ? `nbd+unix:///${name}?socket=${where.socket}` : `nbd://127.0.0.1:${where.port}/${name}`;
  if ('socket' in where) args.push('-k', where.socket);
  else args.push('-b', '127.0.0.1', '-p', String(where.port));
  args.push(...(options.extra ?? []), image);
  return new NbdServerProcess('qemu-nbd', 'qemu-nbd', args, uri);
}

/** nbdkit with a plugin (e.g. `memory`, `['size=64M']`), on a UNIX socket or 127.0.0.1:port. */
export function nbdkit(plugin: string, pluginArgs: string[], where: { socket: string } | { port: number }, extra: string[] = []): NbdServerProcess {
  const args = ['-f', '--exit-with-parent', ...extra];
  let uri: string;
  if ('socket' in where) {
    args.push('-U', where.socket);
    uri = `nbd+unix:///?socket=${where.socket}`;
  } else {
    args.push('-i', '127.0.0.1', '-p', String(where.port));
    uri = `nbd://127.0.0.1:${where.port}/`;
  }
  args.push(plugin, ...pluginArgs);
  return new NbdServerProcess('nbdkit', 'nbdkit', args, uri);
}

/** qemu-storage-daemon from `binary` (and `loader`/`libDir` when it runs from a foreign root) exporting a qcow2 over a UNIX socket. */
export function qemuStorageDaemon(
  image: string,
  socket: string,
  run: { binary: string; loader?: string; libDir?: string; moduleDir?: string },
  name = 'disk',
): NbdServerProcess {
  const qsdArgs = [
    '--blockdev', `driver=file,node-name=file0,filename=${image},cache.direct=off`,
    '--blockdev', 'driver=qcow2,node-name=disk0,file=file0',
    '--nbd-server', `addr.type=unix,addr.path=${socket},max-connections=16`,
    '--export', `type=nbd,id=export0,node-name=disk0,name=${name},writable=on`,
  ];
  const uri = `nbd+unix:///${name}?socket=${socket}`;
  if (run.loader) {
    const env = run.moduleDir ? { ...process.env, QEMU_MODULE_DIR: run.moduleDir } : process.env;
    return new NbdServerProcess('qemu-storage-daemon', run.loader, ['--library-path', run.libDir!, run.binary, ...qsdArgs], uri, env);
  }
  return new NbdServerProcess('qemu-storage-daemon', run.binary, qsdArgs, uri);
}

/**
 * How to run qemu-storage-daemon: from the QEMU root of the interop cache when it has one (through
 * the root's loader, as the harness runs qemu-system), else Debian 12's (qemu-system-common).
 */
export function storageDaemonRun(): { binary: string; loader?: string; libDir?: string; moduleDir?: string } | null {
  const root = path.join(process.env.VFIO_USER_INTEROP_DIR || '/var/cache/vfio-user-interop', 'qemu-root');
  const binary = path.join(root, 'usr/bin/qemu-storage-daemon');
  if (fs.existsSync(binary)) {
    return {
      binary,
      loader: path.join(root, 'usr/lib64/ld-linux-x86-64.so.2'),
      libDir: path.join(root, 'usr/lib/x86_64-linux-gnu'),
      moduleDir: path.join(root, 'usr/lib/x86_64-linux-gnu/qemu'),
    };
  }
  const host = which('qemu-storage-daemon');
  return host === null ? null : { binary: host };
}
