import { defineConfig } from 'vitest/config';

// Each test file runs in its own forked process: native handles, fds and mappings
// never leak between files, and a crash in one file cannot hide another's results.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    testTimeout: 20_000,
    hookTimeout: 60_000,
    reporters: ['default', './test/support/summary-reporter.ts'],
  },
});
