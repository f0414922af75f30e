/** Test-file set-up shared by the migration tests: served devices and cleanups run after each test. */
import { afterEach } from 'vitest';
import type { VfioUserDevice } from '../../lib/server/device';
import { startServer } from '../helpers/server';

/**
 * Registers an afterEach that runs `cleanups` in reverse order; `serve(device)` starts a server on a
 * temporary socket that is stopped with them. Call after useFdLeakCheck(), so the check runs last.
 */
export function useServing() {
  const cleanups: (() => unknown)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  async function serve<D extends VfioUserDevice>(device: D) {
    const s = await startServer(device);
    cleanups.push(() => s.stop());
    return s as typeof s & { device: D };
  }
  return { cleanups, serve };
}
