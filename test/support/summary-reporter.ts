/**
 * Prints a plain closing line, "N passed, N failed, N skipped", after vitest's own report, so CI
 * tools that read a run's last line know how the run went. A crash cannot hide in it: a test that
 * never finished because its worker died, a file that failed to load or collect, a failed hook and
 * every unhandled error each count as a failure, and a line above the summary names them. Skipped
 * tests are grouped by the reason the run gave for them.
 */
import * as path from 'node:path';
import type { Reporter, SerializedError, TestCase, TestModule, TestRunEndReason, TestSuite, Vitest } from 'vitest/node';

/** The reason a skip message in a file's console output gives, e.g. "[interop] skipping: no QEMU". */
const SKIP_LOG = /\bskipp(?:ing|ed)\b[\s:-]*(.*)/i;
const MAX_LINES = 8;

export default class SummaryReporter implements Reporter {
  private vitest: Vitest | undefined;
  /** moduleId → the reason its console output gave for skipping. */
  private readonly skipLogs = new Map<string, string>();

  onInit(vitest: Vitest): void {
    this.vitest = vitest;
  }

  onUserConsoleLog(log: { content: string; taskId?: string }): void {
    if (log.taskId === undefined || this.vitest === undefined) return;
    const match = SKIP_LOG.exec(log.content);
    if (match === null) return;
    const entity = this.vitest.state.getReportedEntityById(log.taskId);
    if (entity === undefined) return;
    const moduleId = entity.type === 'module' ? entity.moduleId : entity.module.moduleId;
    if (!this.skipLogs.has(moduleId)) this.skipLogs.set(moduleId, match[1].trim() || 'no reason given');
  }

  onTestRunEnd(
    testModules: ReadonlyArray<TestModule>,
    unhandledErrors: ReadonlyArray<SerializedError> = [],
    reason?: TestRunEndReason,
  ): void {
    let passed = 0;
    let failed = 0;
    let skipped = 0;
    const problems: string[] = [];
    const skips = new Map<string, { count: number; files: Set<string> }>();
    const failedModules = new Set<string>();
    const crashedModules: string[] = [];

    for (const module of testModules) {
      const file = this.relative(module.moduleId);
      let moduleFailures = 0;
      let unfinished = 0;
      // A suite whose beforeAll/afterAll failed: one failure; vitest reports its tests as skipped.
      const failedSuites = new Set<TestSuite>();
      for (const suite of module.children.allSuites()) {
        const errors = suite.errors();
        if (errors.length === 0) continue;
        failedSuites.add(suite);
        moduleFailures++;
        problems.push(`error in ${file} > ${suite.fullName}: ${describeError(errors[0]!)}`);
      }
      for (const test of module.children.allTests()) {
        const result = test.result();
        if (result.state === 'passed') passed++;
        else if (result.state === 'failed') moduleFailures++;
        else if (result.state === 'skipped') {
          skipped++;
          const failedSuite = enclosing(test, failedSuites);
          const why =
            result.note ??
            (failedSuite !== null
              ? `"${clip(failedSuite.fullName)}" failed to set up`
              : test.options.mode === 'todo'
                ? 'todo'
                : this.skipLogs.get(module.moduleId) ?? 'no reason given');
          const group = skips.get(why) ?? { count: 0, files: new Set<string>() };
          group.count++;
          group.files.add(file);
          skips.set(why, group);
        } else unfinished++; // pending: its worker ended before the test did
      }
      const state = module.state();
      const errors = module.errors();
      if (unfinished > 0 || state === 'pending' || state === 'queued') {
        // The file never finished: its worker crashed, or the run was interrupted around it.
        const count = Math.max(unfinished, 1);
        moduleFailures += count;
        crashedModules.push(file);
        const what = reason === 'interrupted' ? 'interrupted' : 'crashed';
        problems.push(`${what}: ${file} (${count} test${count === 1 ? '' : 's'} did not finish)`);
      }
      if (errors.length > 0) {
        // A load or collection error, or a failing beforeAll/afterAll.
        if (moduleFailures === 0) moduleFailures = 1;
        problems.push(`error in ${file}: ${describeError(errors[0]!)}`);
      } else if (state === 'failed' && moduleFailures === 0) {
        moduleFailures = 1;
        problems.push(`failed: ${file}`);
      }
      if (moduleFailures > 0) failedModules.add(module.moduleId);
      failed += moduleFailures;
    }

    for (const error of unhandledErrors) {
      const testPath = (error as { VITEST_TEST_PATH?: unknown }).VITEST_TEST_PATH;
      const owner = typeof testPath === 'string' ? testPath : undefined;
      if (owner !== undefined) {
        problems.push(`unhandled error in ${this.relative(owner)}: ${describeError(error)}`);
        if (!failedModules.has(owner)) {
          failedModules.add(owner);
          failed++;
        }
      } else if (isWorkerExit(error) && crashedModules.length > 0) {
        // vitest's "Worker exited unexpectedly": the crashed file above already counts it.
        problems.push(`unhandled error: ${describeError(error)} (${crashedModules.join(', ')})`);
      } else {
        problems.push(`unhandled error: ${describeError(error)}`);
        failed++;
      }
    }

    const lines: string[] = [];
    const groups = [...skips].sort((a, b) => b[1].count - a[1].count);
    for (const [why, group] of groups.slice(0, MAX_LINES)) {
      const files = [...group.files];
      const where = files.length === 1 ? files[0] : `${files[0]} and ${files.length - 1} more`;
      lines.push(`skipped ${group.count}: ${clip(why)} (${where})`);
    }
    if (groups.length > MAX_LINES) lines.push(`skipped: ${groups.length - MAX_LINES} more reasons`);
    lines.push(...problems.slice(0, MAX_LINES * 4));
    if (problems.length > MAX_LINES * 4) lines.push(`and ${problems.length - MAX_LINES * 4} more problems`);
    lines.push(`${passed} passed, ${failed} failed, ${skipped} skipped`);
    process.stdout.write(`\n${lines.join('\n')}\n`);
  }

  private relative(file: string): string {
    const root = this.vitest?.config.root ?? process.cwd();
    return path.relative(root, file) || file;
  }
}

/** The innermost suite of `failed` that holds `test`, or null. */
function enclosing(test: TestCase, failed: ReadonlySet<TestSuite>): TestSuite | null {
  for (let parent = test.parent; parent.type === 'suite'; parent = parent.parent) {
    if (failed.has(parent)) return parent;
  }
  return null;
}

function isWorkerExit(error: SerializedError): boolean {
  const cause = (error as { cause?: { message?: unknown } }).cause;
  return /worker/i.test(String(error.message)) || /worker exited/i.test(String(cause?.message ?? ''));
}

function describeError(error: SerializedError): string {
  const cause = (error as { cause?: { message?: unknown } }).cause;
  const type = (error as { type?: unknown }).type;
  const prefix = typeof type === 'string' && type !== '' ? `${type}: ` : '';
  const because = typeof cause?.message === 'string' ? ` (${cause.message})` : '';
  return clip(`${prefix}${error.name ?? 'Error'}: ${firstLine(String(error.message))}${because}`);
}

function firstLine(text: string): string {
  const newline = text.indexOf('\n');
  return newline === -1 ? text : text.slice(0, newline);
}

function clip(text: string): string {
  const line = firstLine(text);
  return line.length > 160 ? `${line.slice(0, 157)}...` : line;
}
