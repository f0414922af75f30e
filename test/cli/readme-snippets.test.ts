/**
 * Two README snippets run as written (against the built package): the hand-made device is an
 * honest PCI function (`vfio-user info` finds no BARs or ROM it does not have), and the Transport
 * snippet reads back the capabilities the server really has.
 */
import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import ts from 'typescript';
import { Idio16Device } from '../../lib/devices/gpio/idio16';
import { VfioUserServer } from '../../lib/server/server';
import { tempSocketPath } from '../helpers/server';
import { runCli } from './run';

const root = path.join(__dirname, '..', '..');

/** The first ```ts block after the heading `heading` in README.md. */
function readmeBlock(heading: string): string {
  const text = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const at = text.indexOf(`\n${heading}\n`);
  expect(at, heading).toBeGreaterThanOrEqual(0);
  const m = /```ts\n([\s\S]*?)\n```/.exec(text.slice(at));
  return m![1]!;
}

/** The block as an ES module importing the built package, with its socket path replaced. */
function runnable(code: string, dir: string, socket: string): string {
  const js = ts.transpileModule(code, { compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 } }).outputText;
  const file = path.join(dir, 'snippet.mjs');
  const entry = pathToFileURL(path.join(root, 'dist', 'index.mjs')).href;
  expect(js).toContain("from 'vfio-user'");
  expect(js).toContain("'/tmp/dev.sock'");
  fs.writeFileSync(file, js.replaceAll("from 'vfio-user'", `from '${entry}'`).replaceAll("'/tmp/dev.sock'", JSON.stringify(socket)));
  return file;
}

function node(file: string) {
  const child = spawn(process.execPath, [file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
  return { child, exited, out: () => stdout, err: () => stderr };
}

describe('README snippets', () => {
  it('the device of "Serve a device" has no BARs, ROM or capabilities it does not model', async () => {
    const { dir, path: socket } = tempSocketPath('dev.sock');
    const snippet = node(runnable(readmeBlock('## Serve a device (server side)'), dir, socket));
    try {
      for (let i = 0; i < 200 && !fs.existsSync(socket); i++) await new Promise((resolve) => setTimeout(resolve, 25));
      const r = await runCli(['info', socket, '--json']);
      expect(r.code, r.stderr + snippet.err()).toBe(0);
      const report = JSON.parse(r.stdout) as { pci: { vendorId: string; deviceId: string; bars: unknown[]; rom: unknown; capabilities: unknown[] }; regions: { name: string; size: number }[] };
      expect(report.pci).toMatchObject({ vendorId: '0x1b36', deviceId: '0x0005', bars: [], rom: null, capabilities: [] });
      expect(report.regions.filter((g) => g.size > 0).map((g) => g.name)).toEqual(['CONFIG']);
      expect(snippet.out()).toContain('client connected');
    } finally {
      snippet.child.kill('SIGTERM');
      await snippet.exited;
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('"Transport" reads back the capabilities the server has (as info shows them)', async () => {
    const { dir, path: socket } = tempSocketPath('dev.sock');
    const server = await VfioUserServer.listen(socket, new Idio16Device());
    try {
      const snippet = node(runnable(readmeBlock('## Transport'), dir, socket));
      expect(await snippet.exited, snippet.err()).toBe(0);
      expect(snippet.out()).toMatch(/maxMsgFds: 16\b/);
      expect(snippet.out()).toMatch(/maxDataXferSize: 1048576\b/);
      expect(snippet.out()).toMatch(/writeMultiple: true\b/);
    } finally {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
