// The closing summary line is what CI reads to judge a run, so a crashed worker, a file that
// cannot load and an unhandled error must each show there as a failure, never as a skip or as
// nothing. Each case runs vitest as a child process on a fixture file of its own.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const ROOT = path.resolve(__dirname, '../..');
const CONFIG = path.join(__dirname, 'fixtures', 'vitest.config.mts');
const VITEST = path.join(ROOT, 'node_modules', 'vitest', 'vitest.mjs');
const SUMMARY = /^(\d+) passed, (\d+) failed, (\d+) skipped$/;

const cacheRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-summary-'));
afterAll(() => fs.rmSync(cacheRoot, { recursive: true, force: true }));

interface Run {
  code: number | null;
  lines: string[];
  summary: { passed: number; failed: number; skipped: number };
}

/** Runs the fixture files whose names contain `filter`; no core files from the aborting one. */
function runFixtures(filter: string): Promise<Run> {
  const cache = fs.mkdtempSync(path.join(cacheRoot, `${filter}-`));
  return new Promise((resolve, reject) => {
    const child = spawn(
      '/bin/sh',
      ['-c', 'ulimit -c 0; exec "$@"', 'sh', process.execPath, VITEST, 'run', '--config', CONFIG, filter],
      { cwd: ROOT, env: { ...process.env, NO_COLOR: '1', CI: '1', SUMMARY_FIXTURE_CACHE: cache }, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let stdout = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.resume();
    child.on('error', reject);
    child.on('close', (code) => {
      const lines = stdout.trimEnd().split('\n');
      const match = SUMMARY.exec(lines[lines.length - 1] ?? '');
      if (match === null) {
        reject(new Error(`no summary as the last line of:\n${stdout}`));
        return;
      }
      const [passed, failed, skipped] = match.slice(1).map(Number);
      resolve({ code, lines, summary: { passed, failed, skipped } });
    });
  });
}

describe('summary reporter', () => {
  it('ends a clean run with "N passed, 0 failed, 0 skipped" and exit code 0', async () => {
    const run = await runFixtures('pass');
    expect(run.summary).toEqual({ passed: 1, failed: 0, skipped: 0 });
    expect(run.code).toBe(0);
  });

  it('counts a test whose worker aborted as a failure and names the file', async () => {
    const run = await runFixtures('crash');
    expect(run.code).not.toBe(0);
    expect(run.summary).toEqual({ passed: 0, failed: 1, skipped: 0 });
    expect(run.lines).toContain('crashed: crash.fixture.ts (1 test did not finish)');
  });

  it('counts a test that calls process.exit as a failure', async () => {
    const run = await runFixtures('exit');
    expect(run.summary).toEqual({ passed: 0, failed: 1, skipped: 0 });
  });

  it('counts a file that fails to load as a failure and says why', async () => {
    const run = await runFixtures('load');
    expect(run.summary).toEqual({ passed: 0, failed: 1, skipped: 0 });
    expect(run.lines.some((line) => line.startsWith('error in load.fixture.ts') && line.includes('cannot load this file'))).toBe(true);
  });

  it('counts a suite whose beforeAll failed as a failure and says why its tests were skipped', async () => {
    const run = await runFixtures('hook');
    expect(run.code).not.toBe(0);
    expect(run.summary).toEqual({ passed: 1, failed: 1, skipped: 2 });
    expect(run.lines.some((line) => line.startsWith('error in hook.fixture.ts > a suite whose setup fails') && line.includes('setup failed'))).toBe(true);
    expect(run.lines).toContain('skipped 2: "a suite whose setup fails" failed to set up (hook.fixture.ts)');
  });

  it('counts an unhandled error as a failure even when every test passed', async () => {
    const run = await runFixtures('unhandled');
    expect(run.code).not.toBe(0);
    expect(run.summary).toEqual({ passed: 2, failed: 1, skipped: 0 });
    expect(run.lines.some((line) => line.startsWith('unhandled error in unhandled.fixture.ts') && line.includes('thrown from a timer'))).toBe(true);
  });

  it('groups skipped tests by the reason the run gave', async () => {
    const run = await runFixtures('skips');
    expect(run.summary).toEqual({ passed: 0, failed: 0, skipped: 4 });
    expect(run.lines).toContain('skipped 2: qemu-system-x86_64 not found (skips.fixture.ts)');
    expect(run.lines).toContain('skipped 1: no /dev/kvm (skips.fixture.ts)');
    expect(run.lines).toContain('skipped 1: todo (skips.fixture.ts)');
  });
});
