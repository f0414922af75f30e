/** Anonymous shared memory (memfd), e.g. guest memory handed to a device server with DMA_MAP. */
import * as fs from 'node:fs';

import { binding } from './binding';
import { Fd } from './fd';

export interface MemfdOptions {
  /** MFD_ALLOW_SEALING, so that F_SEAL_* can later be applied (e.g. against shrinking). */
  allowSealing?: boolean;
}

/**
 * A close-on-exec memfd of `size` bytes (zero-filled). `name` appears in /proc/PID/maps and
 * /proc/PID/fd for debugging only (at most 249 bytes). The fd is closed again if sizing fails.
 */
export function createMemfd(name: string, size: number, options: MemfdOptions = {}): Fd {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new RangeError('Expected second argument to be a size (an integer >= 0)');
  }
  const flags = options.allowSealing ? binding.constants.MFD_ALLOW_SEALING : 0;
  const fd = new Fd(binding.memfdCreate(name, flags));
  try {
    fs.ftruncateSync(fd.value, size);
  } catch (err) {
    fd.close();
    throw err;
  }
  return fd;
}
