/**
 * `vfio-user nvme ...` as a user runs it: the compiled CLI (npm test builds dist/ first) in a
 * child process, against the scripted controller served by this process.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { controllerServer, hardwareControllerServer, scriptedServer, type NvmeTarget } from './fixtures';
import type { ScriptedNvmeDevice } from './scripted-device';

const cli = path.join(__dirname, '..', '..', '..', 'dist', 'cli', 'main.js');

interface Run {
  status: number | null;
  stdout: Buffer;
  stderr: string;
}

/** Runs the CLI without blocking this process's event loop (it serves the controller). */
function run(args: string[], input?: Buffer): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => (err += b.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('error', reject);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout: Buffer.concat(out), stderr: err });
    });
    if (input !== undefined) child.stdin.end(input);
    else child.stdin.end();
  });
}

describe('vfio-user nvme (CLI)', () => {
  let target: NvmeTarget & { device: ScriptedNvmeDevice };
  let dir: string;

  beforeAll(async () => {
    target = await scriptedServer({ blocks: 8192, blockSize: 512 });
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-nvme-cli-'));
  });

  afterAll(async () => {
    await target.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('has --help for nvme and every subcommand, naming their options', async () => {
    for (const args of [['nvme', '--help'], ['nvme', 'identify', '--help'], ['nvme', 'read', '--help'], ['nvme', 'write', '--help'], ['nvme', 'perf', '--help']]) {
      const r = await run(args);
      expect(r.status, args.join(' ')).toBe(0);
      const text = r.stdout.toString();
      for (const s of ['identify SOCKET [--json]', 'read SOCKET --lba N --count N [--out FILE]', 'write SOCKET --lba N --count N --in FILE']) expect(text).toContain(s);
      expect(text).toContain('perf SOCKET --rw randread|randwrite|read|write|randrw --bs 4096 --qd 32 --time 10 [--queues N] [--json]');
    }
    expect((await run(['--help'])).stdout.toString()).toMatch(/nvme/);
  });

  it('refuses bad usage with exit code 2', async () => {
    const s = target.socketPath;
    for (const args of [
      ['nvme'],
      ['nvme', 'frobnicate', s],
      ['nvme', 'identify'],
      ['nvme', 'identify', s, 'extra'],
      ['nvme', 'read', s, '--count', '1'],
      ['nvme', 'read', s, '--lba', '0'],
      ['nvme', 'read', s, '--lba', '-1', '--count', '1'],
      ['nvme', 'read', s, '--lba', '0', '--count', '0'],
      ['nvme', 'read', s, '--lba', '0', '--count', '1', '--json'],
      ['nvme', 'write', s, '--lba', '0', '--count', '1'],
      ['nvme', 'perf', s],
      ['nvme', 'perf', s, '--rw', 'sideways'],
      ['nvme', 'perf', s, '--rw', 'read', '--lba', '3'],
      ['nvme', 'perf', s, '--rw', 'read', '--qd', 'many'],
      ['nvme', 'perf', s, '--rw', 'read', '--time', '0'],
      ['nvme', 'identify', s, '--doorbells', 'smoke'],
      ['nvme', 'identify', s, '--doorbells', 'mmap', '--count', '1'],
      ['nvme', 'identify', s, '--bogus'],
    ]) {
      const r = await run(args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr.length).toBeGreaterThan(0);
    }
  });

  it('fails with exit code 1 when the socket does not answer', async () => {
    const r = await run(['nvme', 'identify', path.join(dir, 'nobody.sock')]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/nobody\.sock: no such socket \(is the server running\?\)/);
  });

  it('identifies the controller, as text and as JSON', async () => {
    const text = await run(['nvme', 'identify', target.socketPath]);
    expect(text.status).toBe(0);
    const out = text.stdout.toString();
    expect(out).toContain('Controller: vfio-user scripted NVMe');
    expect(out).toContain('SCRIPTED0001');
    expect(out).toMatch(/Namespace 1: 8192 blocks of 512 bytes/);

    const json = await run(['nvme', 'identify', target.socketPath, '--json']);
    expect(json.status).toBe(0);
    const info = JSON.parse(json.stdout.toString()) as {
      controller: { serial: string; model: string; nn: number };
      version: string;
      ioQueues: number;
      namespaces: { nsid: number; nsze: number; blockSize: number }[];
    };
    expect(info.controller).toMatchObject({ serial: 'SCRIPTED0001', nn: 1 });
    expect(info.version).toBe('1.4.0');
    expect(info.ioQueues).toBe(target.device.maxIoQueues);
    expect(info.namespaces).toEqual([expect.objectContaining({ nsid: 1, nsze: 8192, blockSize: 512 })]);
  });

  it('writes a file and reads it back (to a file and to standard output)', async () => {
    const data = randomBytes(300 * 512);
    const inFile = path.join(dir, 'in.bin');
    const outFile = path.join(dir, 'out.bin');
    fs.writeFileSync(inFile, data);
    const w = await run(['nvme', 'write', target.socketPath, '--lba', '1000', '--count', '300', '--in', inFile]);
    expect(w.stderr).toMatch(/wrote 300 blocks/);
    expect(w.status).toBe(0);
    expect(target.device.storage.subarray(1000 * 512, 1300 * 512).equals(data)).toBe(true);

    const r = await run(['nvme', 'read', target.socketPath, '--lba', '1000', '--count', '300', '--out', outFile, '--json']);
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout.toString())).toMatchObject({ nsid: 1, lba: 1000, count: 300, bytes: 300 * 512 });
    expect(fs.readFileSync(outFile).equals(data)).toBe(true);

    const s = await run(['nvme', 'read', target.socketPath, '--lba', '0x3e8', '--count', '7', '--poll']);
    expect(s.status).toBe(0);
    expect(s.stdout.equals(data.subarray(0, 7 * 512))).toBe(true);

    // Standard input, JSON report.
    const more = randomBytes(2 * 512);
    const j = await run(['nvme', 'write', target.socketPath, '--lba', '5', '--count', '2', '--in', '-', '--json'], more);
    expect(j.status).toBe(0);
    expect(JSON.parse(j.stdout.toString())).toEqual({ nsid: 1, lba: 5, count: 2, bytes: 1024 });
    expect(target.device.storage.subarray(5 * 512, 7 * 512).equals(more)).toBe(true);
  });

  it('refuses short input and ranges outside the namespace (exit 1)', async () => {
    const small = path.join(dir, 'small.bin');
    fs.writeFileSync(small, Buffer.alloc(100));
    const w = await run(['nvme', 'write', target.socketPath, '--lba', '0', '--count', '1', '--in', small]);
    expect(w.status).toBe(1);
    expect(w.stderr).toMatch(/holds 100 bytes/);
    const r = await run(['nvme', 'read', target.socketPath, '--lba', '8190', '--count', '4']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/outside namespace 1/);
    const missing = await run(['nvme', 'write', target.socketPath, '--lba', '0', '--count', '1', '--in', path.join(dir, 'none.bin')]);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/ENOENT/);
  });

  it('runs perf with live progress on stderr and a JSON summary on stdout', async () => {
    const r = await run(['nvme', 'perf', target.socketPath, '--rw', 'randrw', '--bs', '4096', '--qd', '16', '--time', '2.2', '--queues', '2', '--json']);
    expect(r.stderr.split('\n').filter((l) => l.startsWith('{"progress"')).length).toBeGreaterThanOrEqual(2);
    expect(r.status).toBe(0);
    const s = JSON.parse(r.stdout.toString()) as Record<string, unknown> & { latencyUs: Record<string, number>; read: { ios: number }; write: { ios: number } };
    expect(s).toMatchObject({ rw: 'randrw', bs: 4096, qd: 16, queues: 2, errors: 0 });
    expect(s.iops as number).toBeGreaterThan(0);
    expect(s.mbps as number).toBeGreaterThan(0);
    expect(Object.keys(s.latencyUs).sort()).toEqual(['avg', 'max', 'min', 'p50', 'p90', 'p99', 'p999'].sort());
    expect(s.read.ios).toBeGreaterThan(0);
    expect(s.write.ios).toBeGreaterThan(0);
  });

  it('runs perf with a text summary like spdk_nvme_perf', async () => {
    const r = await run(['nvme', 'perf', target.socketPath, '--rw', 'read', '--bs', '8k', '--qd', '4', '--time', '1.1', '--poll']);
    expect(r.status).toBe(0);
    expect(r.stderr).toMatch(/IOPS .* MB\/s/);
    const out = r.stdout.toString();
    expect(out).toMatch(/vfio-user nvme perf: read, bs 8192, qd 4, 1 queue\(s\)/);
    expect(out).toMatch(/polled completions/);
    expect(out).toMatch(/total: [0-9.]+ IOPS, [0-9.]+ MB\/s/);
    expect(out).toMatch(/latency \(us\): min [0-9.]+ +avg [0-9.]+ +p50 [0-9.]+ +p90 [0-9.]+ +p99 [0-9.]+ +p99\.9 [0-9.]+ +max [0-9.]+/);
    expect(out).toMatch(/errors: 0/);
  });
});

describe('vfio-user nvme (CLI) against NvmeController', () => {
  it('picks shadow doorbells by default and plain messages when told', async () => {
    const target = await controllerServer({ size: 4 * 1024 * 1024 });
    try {
      const auto = await run(['nvme', 'identify', target.socketPath, '--json']);
      expect(auto.status).toBe(0);
      expect(JSON.parse(auto.stdout.toString())).toMatchObject({ doorbells: 'shadow', namespaces: [{ nsid: 1, nsze: 8192 }] });
      const plain = await run(['nvme', 'perf', target.socketPath, '--rw', 'randwrite', '--qd', '8', '--time', '0.5', '--doorbells', 'message', '--json']);
      expect(plain.status).toBe(0);
      expect(JSON.parse(plain.stdout.toString())).toMatchObject({ doorbells: 'message', errors: 0 });
      const shadow = await run(['nvme', 'perf', target.socketPath, '--rw', 'randread', '--qd', '8', '--time', '0.5', '--json']);
      expect(shadow.status).toBe(0);
      expect(JSON.parse(shadow.stdout.toString())).toMatchObject({ doorbells: 'shadow', errors: 0 });
    } finally {
      await target.stop();
    }
  });
});

describe('vfio-user nvme (CLI) against a server that decodes BARs as hardware does', () => {
  it('identifies, writes and reads', async () => {
    const target = await hardwareControllerServer({ size: 4 * 1024 * 1024 });
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-nvme-cli-'));
    try {
      const id = await run(['nvme', 'identify', target.socketPath, '--json']);
      expect(id.stderr).toBe('');
      expect(id.status).toBe(0);
      expect(JSON.parse(id.stdout.toString())).toMatchObject({ controller: { serial: 'HARDWARE' }, namespaces: [{ nsid: 1, nsze: 8192 }] });
      const data = randomBytes(16 * 512);
      const inFile = path.join(dir, 'in.bin');
      fs.writeFileSync(inFile, data);
      const w = await run(['nvme', 'write', target.socketPath, '--lba', '100', '--count', '16', '--in', inFile]);
      expect(w.status, w.stderr).toBe(0);
      const r = await run(['nvme', 'read', target.socketPath, '--lba', '100', '--count', '16']);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout.equals(data)).toBe(true);
      expect(target.device.refused).toEqual([]);
    } finally {
      await target.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
