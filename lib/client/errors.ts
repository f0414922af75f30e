/** How the client's calls fail: a caller's bad index, a reply that breaks the protocol, the first of parallel failures. */
import { Errno } from '../protocol/constants';
import { ProtocolError } from '../protocol/errors';

/** A reply that breaks the protocol: the call fails with EPROTO and the connection stays up. */
export function protocolError(message: string, field: string): ProtocolError {
  return new ProtocolError(message, { field, errno: Errno.EPROTO });
}

/** Waits for every promise; rejects with the first failure in order. Never leaves one unhandled. */
export async function settleAll<T>(calls: Promise<T>[]): Promise<T[]> {
  const results = await Promise.allSettled(calls);
  const out: T[] = [];
  for (const r of results) {
    if (r.status === 'rejected') throw r.reason;
    out.push(r.value);
  }
  return out;
}

/** @throws {RangeError} unless `index` is an integer in [0, count): a caller's mistake, thrown synchronously. */
export function checkIndex(index: number, count: number, what: string): void {
  if (!Number.isInteger(index) || index < 0 || index >= count) {
    throw new RangeError(`Expected a ${what} index below ${String(count)}, got ${String(index)}`);
  }
}
