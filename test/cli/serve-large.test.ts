/**
 * `vfio-user serve nvme --size` with sizes past 4 GiB: a 5 GiB namespace used to abort the process
 * (a double free in the addon), and a 1 TiB sparse RAM namespace must serve as well as a small one.
 */
import { describe, it, expect } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';

const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');

async function serveAndIdentify(size: string): Promise<{ identify: string; roundTrip: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfu-large-'));
  const socket = path.join(dir, 'nvme.sock');
  const child = spawn(process.execPath, [cli, 'serve', 'nvme', socket, '--size', size], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  try {
    await new Promise<void>((resolve, reject) => {
      readline.createInterface({ input: child.stdout! }).on('line', (l) => l.includes('serving nvme') && resolve());
      child.once('exit', (code, signal) => reject(new Error(`serve exited (${code ?? signal}): ${stderr}`)));
    });
    const run = (...args: string[]) => spawnSync(process.execPath, [cli, 'nvme', ...args], { encoding: 'utf8', timeout: 30_000 });
    const identify = run('identify', socket);
    expect(identify.status, identify.stderr).toBe(0);
    // The last blocks of the disk: far past 4 GiB.
    const blocks = Number(/Namespace 1: (\d+) blocks/.exec(identify.stdout)![1]);
    const data = path.join(dir, 'in.bin');
    fs.writeFileSync(data, Buffer.alloc(4096, 0x5c));
    expect(run('write', socket, '--lba', String(blocks - 8), '--count', '8', '--in', data).status).toBe(0);
    const back = run('read', socket, '--lba', String(blocks - 8), '--count', '8', '--out', path.join(dir, 'out.bin'));
    expect(back.status, back.stderr).toBe(0);
    const roundTrip = fs.readFileSync(path.join(dir, 'out.bin')).equals(fs.readFileSync(data)) ? 'same' : 'differs';
    return { identify: identify.stdout, roundTrip };
  } finally {
    child.kill('SIGTERM');
    await new Promise((resolve) => child.once('exit', resolve));
    expect(child.signalCode === null || child.signalCode === 'SIGTERM').toBe(true);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

describe('serve nvme --size past 4 GiB', () => {
  it('--size 5G serves, and the last blocks read back what was written', async () => {
    const r = await serveAndIdentify('5G');
    expect(r.identify).toMatch(/Namespace 1: 10485760 blocks of 512 bytes/);
    expect(r.roundTrip).toBe('same');
  }, 60_000);

  it('--size 1T (sparse) serves as well', async () => {
    const r = await serveAndIdentify('1T');
    expect(r.identify).toMatch(/\(1\.00 TiB\)/);
    expect(r.roundTrip).toBe('same');
  }, 90_000);
});
