/**
 * Types shared by the MSI and MSI-X delivery policies.
 *
 * The device model decides *whether* a vector may fire (enable, masks, pending bits); the server
 * layer decides *how* (write the vector's eventfd, reference 6.6). They meet in a
 * {@link DeliverFn} supplied by the server.
 *
 * @packageDocumentation
 */

/**
 * Sends vector `vector` now (the server writes its eventfd). Return `false` when it could not be
 * sent, typically because the client registered no eventfd for it: the vector then becomes
 * pending and is sent by a later `retryPending()` (call it after DEVICE_SET_IRQS adds eventfds).
 * Returning nothing (or `true`) means sent.
 */
export type DeliverFn = (vector: number) => boolean | void;

/** What `trigger(vector)` did. */
export type TriggerResult =
  /** Handed to the {@link DeliverFn}, which accepted it. */
  | 'delivered'
  /** Masked or undeliverable: the pending bit is set; it fires when unmasked or retried. */
  | 'pending'
  /** The interrupt mode is disabled (or the vector is not enabled): nothing recorded. */
  | 'disabled'
  /** Undeliverable and the capability has no pending bits to record it (MSI without masking). */
  | 'dropped';

/** The default {@link DeliverFn}: nothing is wired yet, so everything stays pending. */
export const NOT_WIRED: DeliverFn = () => false;

/** Throws RangeError unless `vector` is an integer in `[0, count)`. */
export function checkVector(vector: number, count: number): void {
  if (!Number.isInteger(vector) || vector < 0 || vector >= count) {
    throw new RangeError(`Expected a vector from 0 to ${count - 1}, got ${vector}`);
  }
}
