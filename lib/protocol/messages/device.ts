/**
 * `DEVICE_GET_INFO` (4), request and reply (reference 3.4). Both are 16 bytes:
 *
 * ```
 *  0  4 argsz        request: largest reply accepted (>= 16); reply: 16
 *  4  4 flags        reply: DeviceFlags (RESET, PCI)
 *  8  4 num_regions  reply: number of region indexes (LVU: 9, LVU-2022: 10)
 * 12  4 num_irqs     reply: number of IRQ indexes (5 for PCI)
 * ```
 *
 * Unlike the kernel's `vfio_device_info` there is no `cap_offset`.
 *
 * @packageDocumentation
 */
import { PayloadSize } from '../constants';
import { Reader, Writer } from '../codec';

/** `DEVICE_GET_INFO` request and reply (same layout). */
export interface DeviceInfo {
  argsz: number;
  /** `flags`: {@link DeviceFlags} (0 in the request). */
  flags: number;
  /** `num_regions` (0 in the request). */
  numRegions: number;
  /** `num_irqs` (0 in the request). */
  numIrqs: number;
}

/** Alias: the request has the reply's layout with zeroes. */
export type DeviceInfoRequest = DeviceInfo;
/** Alias: `DEVICE_GET_INFO` reply. */
export type DeviceInfoReply = DeviceInfo;

function encode(m: Partial<DeviceInfo>): Buffer {
  return Writer.alloc(PayloadSize.DEVICE_INFO)
    .u32(m.argsz ?? PayloadSize.DEVICE_INFO, 'argsz')
    .u32(m.flags ?? 0, 'flags')
    .u32(m.numRegions ?? 0, 'numRegions')
    .u32(m.numIrqs ?? 0, 'numIrqs')
    .finish();
}

function decode(payload: Uint8Array, what: string): DeviceInfo {
  const r = new Reader(payload, what);
  const argsz = r.u32('argsz');
  const flags = r.u32('flags');
  const numRegions = r.u32('num_regions');
  const numIrqs = r.u32('num_irqs');
  r.end();
  if (argsz < PayloadSize.DEVICE_INFO) r.fail('argsz', `${String(argsz)} is below ${String(PayloadSize.DEVICE_INFO)}`);
  return { argsz, flags, numRegions, numIrqs };
}

/** Encodes a `DEVICE_GET_INFO` request (`argsz` default 16, other fields 0). */
export function encodeDeviceInfoRequest(m: Partial<DeviceInfo> = {}): Buffer {
  return encode(m);
}

/**
 * Decodes a `DEVICE_GET_INFO` request.
 *
 * @throws {ProtocolError} unless exactly 16 bytes with `argsz` >= 16 (libvfio-user's check).
 */
export function decodeDeviceInfoRequest(payload: Uint8Array): DeviceInfoRequest {
  return decode(payload, 'DEVICE_GET_INFO request');
}

/** Encodes a `DEVICE_GET_INFO` reply (`argsz` default 16). */
export function encodeDeviceInfoReply(m: Omit<DeviceInfo, 'argsz'> & { argsz?: number }): Buffer {
  return encode(m);
}

/**
 * Decodes a `DEVICE_GET_INFO` reply.
 *
 * @throws {ProtocolError} unless exactly 16 bytes with `argsz` >= 16.
 */
export function decodeDeviceInfoReply(payload: Uint8Array): DeviceInfoReply {
  return decode(payload, 'DEVICE_GET_INFO reply');
}
