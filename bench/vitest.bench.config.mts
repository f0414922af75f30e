import { defineConfig } from 'vitest/config';

// Benchmarks that need the TypeScript test harness (a QEMU guest) run under vitest, outside
// `npm test`: `npm run bench:guest`.
export default defineConfig({
  test: {
    include: ['bench/**/*.bench-test.ts'],
    pool: 'forks',
    testTimeout: 900_000,
    fileParallelism: false,
  },
});
