/**
 * Running the compiled `vfio-user` command (npm test builds dist/ first) in a child process,
 * without blocking this process's event loop (tests serve devices from it).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import * as readline from 'node:readline';

export const cli = path.join(__dirname, '..', '..', 'dist', 'cli', 'main.js');

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `vfio-user ...args` to completion (killed after `timeoutMs`). */
export function runCli(args: string[], options: { input?: Buffer | string; timeoutMs?: number; cwd?: string } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, ...args], { stdio: ['pipe', 'pipe', 'pipe'], cwd: options.cwd });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 20_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    child.stdin.end(options.input);
  });
}

/** A long-running `vfio-user` (a server): its stdout lines as they come, and a way to stop it. */
export interface CliProcess {
  child: ChildProcess;
  lines: string[];
  stderr(): string;
  /** Resolves with the first line (seen so far or later) that matches. */
  waitForLine(re: RegExp): Promise<string>;
  /** Resolves with the exit code (null: killed by a signal). */
  exited: Promise<number | null>;
}

export function startCli(args: string[]): CliProcess {
  const child = spawn(process.execPath, [cli, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  const lines: string[] = [];
  const waiters: { re: RegExp; resolve: (line: string) => void }[] = [];
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  readline.createInterface({ input: child.stdout! }).on('line', (line) => {
    lines.push(line);
    for (const w of [...waiters]) {
      if (w.re.test(line)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(line);
      }
    }
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return {
    child,
    lines,
    stderr: () => stderr,
    waitForLine(re) {
      const seen = lines.find((l) => re.test(l));
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        waiters.push({ re, resolve });
        void exited.then((code) => reject(new Error(`vfio-user ${args.join(' ')} exited (${String(code)}) before printing ${String(re)}; stderr: ${stderr}`)));
      });
    },
    exited,
  };
}
