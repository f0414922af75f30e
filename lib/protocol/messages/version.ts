/**
 * `VERSION` (command 1), request and reply (reference 3.1). Both directions share one layout:
 *
 * ```
 * off size field
 *  0   2   major
 *  2   2   minor
 *  4   n   data    optional UTF-8 JSON followed by a NUL byte (the NUL counts in msg_size)
 * ```
 *
 * The JSON is parsed strictly ({@link parseJson}) and its capabilities are type-checked and
 * defaulted ({@link parseCapabilities}).
 *
 * @packageDocumentation
 */
import { PayloadSize } from '../constants';
import { Reader, Writer, checkUint } from '../codec';
import { ProtocolError } from '../errors';
import { parseCapabilities, capabilitiesToJson, type Capabilities, type CapabilitiesInput } from '../capabilities';
import { parseJson, stringifyJson, type JsonObject, type JsonValue } from '../json';

/** A decoded `VERSION` payload. */
export interface VersionMessage {
  /** `major` (u16). */
  major: number;
  /** `minor` (u16). */
  minor: number;
  /** Capabilities with defaults applied. */
  capabilities: Capabilities;
  /** The capability keys the sender actually included. */
  announced: CapabilitiesInput;
  /** Unknown keys that were ignored (JSON paths). */
  ignored: string[];
  /** The parsed JSON document (integers as `bigint`), or `null` when the message has no data. */
  document: JsonValue | null;
}

/** What to put in a `VERSION` message. */
export interface VersionInit {
  major: number;
  minor: number;
  /** Capabilities to announce (only set keys are sent). Ignored when `document` is given. */
  capabilities?: CapabilitiesInput;
  /**
   * The whole JSON document to send instead of `{"capabilities":{...}}`; `null` sends no data at
   * all (legal, but peers prefer JSON: reference 3.1 step 6).
   */
  document?: JsonObject | null;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function jsonText(v: VersionInit): string | null {
  if (v.document === null) return null;
  if (v.document !== undefined) return stringifyJson(v.document);
  return stringifyJson(v.capabilities === undefined ? {} : { capabilities: capabilitiesToJson(v.capabilities) });
}

/** Payload size of {@link encodeVersion}'s output: 4 + JSON bytes + NUL. */
export function versionPayloadSize(v: VersionInit): number {
  const text = jsonText(v);
  return PayloadSize.VERSION_FIXED + (text === null ? 0 : Buffer.byteLength(text, 'utf8') + 1);
}

/**
 * Encodes a `VERSION` payload: `major`, `minor`, compact JSON and its NUL
 * (`{"capabilities":{...}}`, or `{}` with no capabilities).
 */
export function encodeVersion(v: VersionInit): Buffer {
  checkUint(v.major, 0xffff, 'major');
  checkUint(v.minor, 0xffff, 'minor');
  const text = jsonText(v);
  const json = text === null ? null : Buffer.from(text, 'utf8');
  const w = Writer.alloc(PayloadSize.VERSION_FIXED + (json === null ? 0 : json.byteLength + 1));
  w.u16(v.major, 'major').u16(v.minor, 'minor');
  if (json !== null) w.bytes(json, 'data').u8(0, 'data NUL');
  return w.finish();
}

/**
 * Decodes a `VERSION` payload.
 *
 * @throws {ProtocolError} (`EINVAL`) if shorter than 4 bytes, if data is present but does not end
 * with NUL (both peers require it), is not UTF-8, is not a JSON object, or a known capability has
 * the wrong JSON type.
 */
export function decodeVersion(payload: Uint8Array, what = 'VERSION'): VersionMessage {
  const r = new Reader(payload, what);
  const major = r.u16('major');
  const minor = r.u16('minor');
  let document: JsonValue | null = null;
  if (r.remaining > 0) {
    const data = r.rest('data');
    if (data[data.byteLength - 1] !== 0) r.fail('data', 'is not NUL-terminated');
    let text: string;
    try {
      text = utf8.decode(data.subarray(0, data.byteLength - 1));
    } catch (cause) {
      throw new ProtocolError(`${what}: data is not valid UTF-8`, { field: 'data', cause });
    }
    document = parseJson(text, what);
  }
  const parsed = parseCapabilities(document);
  return { major, minor, ...parsed, document };
}

/** Encodes a `VERSION` request (client -> server). */
export const encodeVersionRequest = encodeVersion;
/** Decodes a `VERSION` request. */
export const decodeVersionRequest = (payload: Uint8Array): VersionMessage => decodeVersion(payload, 'VERSION request');
/** Encodes a `VERSION` reply; keep it no longer than the request (reference 3.1 step 6). */
export const encodeVersionReply = encodeVersion;
/** Decodes a `VERSION` reply. */
export const decodeVersionReply = (payload: Uint8Array): VersionMessage => decodeVersion(payload, 'VERSION reply');
