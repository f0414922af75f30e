// `vfio-user serve --keep-state`: the device keeps its state for the next client; and the
// 'migration-refused' line says why a migration stream was refused.
import { afterEach, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { PciFunction, VfioUserClient } from '../../lib/client';
import { IDIO16_BAR } from '../../lib/devices/gpio/idio16';
import { MigState } from '../../lib/protocol/constants';

const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');
const children: ChildProcess[] = [];
const dirs: string[] = [];
afterEach(async () => {
  for (const c of children.splice(0)) {
    if (c.exitCode === null) {
      c.kill('SIGTERM');
      await new Promise((r) => c.once('exit', r));
    }
  }
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

/** `vfio-user serve ...args --json`; resolves with its socket and its JSON lines as they come. */
async function serve(device: string, ...args: string[]): Promise<{ socket: string; lines: Record<string, unknown>[] }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-cli-mig-'));
  dirs.push(dir);
  const socket = path.join(dir, `${device}.sock`);
  const child = spawn(process.execPath, [cli, 'serve', device, socket, ...args, '--json'], { stdio: ['pipe', 'pipe', 'inherit'] });
  children.push(child);
  const lines: Record<string, unknown>[] = [];
  await new Promise<void>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`serve exited with ${code}`)));
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const obj = JSON.parse(line) as Record<string, unknown>;
      lines.push(obj);
      if (obj.event === 'ready') resolve();
    });
  });
  return { socket, lines };
}

const until = async (cond: () => boolean) => {
  for (let i = 0; i < 500 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  expect(cond()).toBe(true);
};

describe('vfio-user serve --keep-state', () => {
  it('keeps the GPIO outputs for the next client; without it they reset', async () => {
    for (const keep of [true, false]) {
      const { socket, lines } = await serve('gpio', ...(keep ? ['--keep-state'] : []));
      const first = await VfioUserClient.connect(socket);
      await (await PciFunction.open(first)).enable();
      await first.write(IDIO16_BAR, 0, Buffer.from([0x3c]), { posted: false });
      await first.close();
      await until(() => lines.some((l) => l.event === 'disconnect'));
      const next = await VfioUserClient.connect(socket);
      expect((await next.read(IDIO16_BAR, 0, 1))[0]).toBe(keep ? 0x3c : 0);
      await next.close();
    }
  });

  it('prints why a migration stream was refused', async () => {
    const { socket, lines } = await serve('gpio');
    const client = await VfioUserClient.connect(socket);
    await client.setMigrationState(MigState.RESUMING);
    await expect(client.writeMigrationData(Buffer.from('nonsense, not a stream'))).rejects.toMatchObject({ code: 'EINVAL' });
    await until(() => lines.some((l) => l.event === 'migration-refused'));
    expect(lines.find((l) => l.event === 'migration-refused')!.reason).toMatch(/not a vfio-user device state stream/);
    await client.close();
  });
});
