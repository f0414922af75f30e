/**
 * Open-fd accounting for tests: snapshot /proc/self/fd and compare, so a test that leaks (or
 * closes someone else's) fd fails.
 */
import * as fs from 'node:fs';
import { afterEach, beforeEach, expect } from 'vitest';

const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;

/** fd number -> what it points at (readlink of /proc/self/fd/N). */
export function openFds(): Map<number, string> {
  const fds = new Map<number, string>();
  for (const name of fs.readdirSync('/proc/self/fd')) {
    try {
      fds.set(Number(name), fs.readlinkSync(`/proc/self/fd/${name}`));
    } catch {
      // the directory handle readdir used, already closed again
    }
  }
  return fds;
}

export function countOpenFds(): number {
  return openFds().size;
}

/** Differences between two snapshots, as readable lines ('+7 socket:[123]', '-9 ...'). */
export function diffFds(before: Map<number, string>, after: Map<number, string>): string[] {
  const lines: string[] = [];
  for (const [fd, target] of after) {
    if (before.get(fd) !== target) lines.push(`+${fd} ${target}`);
  }
  for (const [fd, target] of before) {
    if (after.get(fd) !== target) lines.push(`-${fd} ${target}`);
  }
  return lines.sort();
}

/** Runs `fn` and fails if the set of open fds changed. */
export async function expectNoFdLeak(fn: () => unknown): Promise<void> {
  const before = openFds();
  await fn();
  expect(diffFds(before, openFds())).toEqual([]);
}

/** Registers hooks that fail each test of the enclosing suite/file that leaves fds changed. */
export function useFdLeakCheck(): void {
  let before = new Map<number, string>();
  beforeEach(() => {
    before = openFds();
  });
  afterEach(() => {
    expect(diffFds(before, openFds()), 'open fds changed during the test').toEqual([]);
  });
}

/** The open-file flags of `fd` (the `flags:` line of /proc/self/fdinfo/N, octal). */
export function fdFlags(fd: number): number {
  const info = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  const match = /^flags:\s+([0-7]+)$/m.exec(info);
  if (!match) throw new Error(`no flags in /proc/self/fdinfo/${fd}`);
  return parseInt(match[1]!, 8);
}

export function isCloexec(fd: number): boolean {
  return (fdFlags(fd) & O_CLOEXEC) !== 0;
}

export function isNonBlocking(fd: number): boolean {
  return (fdFlags(fd) & O_NONBLOCK) !== 0;
}

/** True if `fd` is open in this process. */
export function isOpen(fd: number): boolean {
  try {
    fs.lstatSync(`/proc/self/fd/${fd}`);
    return true;
  } catch {
    return false;
  }
}
