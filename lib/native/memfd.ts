/** Anonymous shared memory (memfd), e.g. guest memory handed to a device server with DMA_MAP. */
import * as fs from 'node:fs';

import { binding } from './binding';
import { Fd } from './fd';

export interface MemfdOptions {
  /** MFD_ALLOW_SEALING, so that F_SEAL_* can later be applied (e.g. against shrinking). */
  allowSealing?: boolean;
  /**
   * Seal the size (F_SEAL_SHRINK | F_SEAL_GROW) once it is set: for memory handed to a peer,
   * who could otherwise truncate it under our mappings. Implies `allowSealing`.
   */
  sealSize?: boolean;
}

/** The seals that fix a memfd's size. */
export const SIZE_SEALS = binding.constants.F_SEAL_SHRINK | binding.constants.F_SEAL_GROW;

/**
 * A close-on-exec memfd of `size` bytes (zero-filled). `name` appears in /proc/PID/maps and
 * /proc/PID/fd for debugging only (at most 249 bytes). The fd is closed again if sizing fails.
 */
export function createMemfd(name: string, size: number, options: MemfdOptions = {}): Fd {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new RangeError('Expected second argument to be a size (an integer >= 0)');
  }
  const flags = options.allowSealing || options.sealSize ? binding.constants.MFD_ALLOW_SEALING : 0;
  const fd = new Fd(binding.memfdCreate(name, flags));
  try {
    fs.ftruncateSync(fd.value, size);
    if (options.sealSize) binding.addSeals(fd.value, SIZE_SEALS);
  } catch (err) {
    fd.close();
    throw err;
  }
  return fd;
}

/**
 * True if `fd` is sealed against shrinking (F_SEAL_SHRINK), so that mappings of it can never lose
 * pages; false for unsealed memfds and for files that cannot carry seals.
 */
export function isSealedAgainstShrinking(fd: Fd | number): boolean {
  try {
    return (binding.getSeals(fd instanceof Fd ? fd.value : fd) & binding.constants.F_SEAL_SHRINK) !== 0;
  } catch {
    return false;
  }
}

/**
 * Seals `fd`'s size (F_SEAL_SHRINK | F_SEAL_GROW) before it is handed to a peer, if it can carry
 * seals (a memfd made with MFD_ALLOW_SEALING and not yet F_SEAL_SEAL'ed). Returns whether it is
 * now sealed against shrinking. A file that cannot be sealed stays safe for this process (its
 * mappings are guarded, see {@link Mapping.poisoned}), but a peer can still shrink it.
 */
export function sealSize(fd: Fd | number): boolean {
  const raw = fd instanceof Fd ? fd.value : fd;
  try {
    binding.addSeals(raw, SIZE_SEALS);
  } catch {
    // not a memfd, or sealing not allowed: report what it has
  }
  return isSealedAgainstShrinking(raw);
}
