/**
 * `DEVICE_RESET` (13): no payload in either direction (reference 3.13). It is the only command
 * that may be sent without a payload (`validateHeader` knows this).
 *
 * @packageDocumentation
 */
import { EMPTY, decodeEmpty } from '../codec';

/** Encodes a `DEVICE_RESET` request (empty). */
export function encodeDeviceResetRequest(): Buffer {
  return EMPTY;
}

/** Decodes a `DEVICE_RESET` request; any payload is a {@link ProtocolError}. */
export function decodeDeviceResetRequest(payload: Uint8Array): null {
  return decodeEmpty(payload, 'DEVICE_RESET request');
}

/** Encodes a `DEVICE_RESET` reply (empty). */
export function encodeDeviceResetReply(): Buffer {
  return EMPTY;
}

/** Decodes a `DEVICE_RESET` reply; any payload is a {@link ProtocolError}. */
export function decodeDeviceResetReply(payload: Uint8Array): null {
  return decodeEmpty(payload, 'DEVICE_RESET reply');
}
