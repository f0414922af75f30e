/** What the device is: DEVICE_GET_INFO within QEMU's ceilings, region and IRQ info, region ioeventfd sets. */
import { debuglog } from 'node:util';
import { Fd } from '../native/fd';
import { Command, DeviceFlags, IrqInfoFlags, PciRegion, commandName } from '../protocol/constants';
import { decodeDeviceInfoReply, encodeDeviceInfoRequest, type DeviceInfoReply } from '../protocol/messages/device';
import { decodeIrqInfoReply, encodeIrqInfoRequest } from '../protocol/messages/irq';
import { decodeRegionInfoReply, decodeRegionIoFdsReply, encodeRegionInfoRequest, encodeRegionIoFdsRequest } from '../protocol/messages/region';
import { protocolError, settleAll } from './errors';
import { RegionIoFds, buildRegionIoFds } from './iofds';
import { MAX_IRQ_VECTORS, irqIndexInfo, type IrqIndexInfo } from './irqs';
import type { Body } from '../transport/connection';
import type { Caller, CallSpec } from './link';
import { ClientLimits } from './options';
import { buildRegionRecord, releaseRegionRecord, type RegionRecord } from './regions';

const debug = debuglog('vfio-user:client');

/** What `DEVICE_GET_INFO` reported. */
export interface DeviceSummary {
  /** {@link DeviceFlags} (PCI, RESET). */
  readonly flags: number;
  /** Number of region indexes. */
  readonly numRegions: number;
  /** Number of IRQ indexes. */
  readonly numIrqs: number;
  /** The device supports DEVICE_RESET. */
  readonly resettable: boolean;
}

/** @internal `DEVICE_GET_INFO`, unchecked (it has no side effect: also a barrier round trip). */
export function getDeviceInfo(caller: Caller, spec?: CallSpec): Promise<DeviceInfoReply> {
  return caller.call(Command.DEVICE_GET_INFO, encodeDeviceInfoRequest(), (msg) => decodeDeviceInfoReply(msg.payload), spec);
}

/**
 * @internal The summary of a `DEVICE_GET_INFO` reply a client can work with.
 *
 * @throws {ProtocolError} for a non-PCI device, more than 100 regions or 50 IRQ indexes, or no config space.
 */
export function checkDeviceInfo(info: DeviceInfoReply): DeviceSummary {
  if ((info.flags & DeviceFlags.PCI) === 0) {
    throw protocolError(`DEVICE_GET_INFO reply: flags 0x${info.flags.toString(16)} do not describe a PCI device`, 'flags');
  }
  if (info.numRegions > ClientLimits.MAX_REGIONS) {
    throw protocolError(`DEVICE_GET_INFO reply: ${String(info.numRegions)} regions exceed the limit of ${String(ClientLimits.MAX_REGIONS)}`, 'num_regions');
  }
  if (info.numRegions <= PciRegion.CONFIG) {
    throw protocolError(`DEVICE_GET_INFO reply: ${String(info.numRegions)} regions leave no config space (index 7)`, 'num_regions');
  }
  if (info.numIrqs > ClientLimits.MAX_IRQS) {
    throw protocolError(`DEVICE_GET_INFO reply: ${String(info.numIrqs)} IRQ indexes exceed the limit of ${String(ClientLimits.MAX_IRQS)}`, 'num_irqs');
  }
  return Object.freeze({
    flags: info.flags,
    numRegions: info.numRegions,
    numIrqs: info.numIrqs,
    resettable: (info.flags & DeviceFlags.RESET) !== 0,
  });
}

/** @internal Region info of every index below `count`, asked in parallel; on failure none is kept open. */
export async function fetchRegions(caller: Caller, count: number): Promise<RegionRecord[]> {
  const regions = await Promise.allSettled(range(count).map((i) => fetchRegion(caller, i)));
  const failed = regions.find((r) => r.status === 'rejected');
  if (failed !== undefined) {
    for (const r of regions) if (r.status === 'fulfilled') releaseRegionRecord(r.value);
    throw (failed as PromiseRejectedResult).reason;
  }
  return regions.map((r) => (r as PromiseFulfilledResult<RegionRecord>).value);
}

/** @internal `DEVICE_GET_REGION_INFO` of `index` with QEMU's two-step `argsz` exchange; the record holds the reply's fds. */
export function fetchRegion(caller: Caller, index: number): Promise<RegionRecord> {
  return askGrowing(caller, Command.DEVICE_GET_REGION_INFO, index, 32, undefined, {
    encode: (argsz) => encodeRegionInfoRequest({ index, argsz }),
    decode: decodeRegionInfoReply,
    accept(reply, fds) {
      if (reply.index !== index) {
        Fd.closeAll(fds);
        throw protocolError(`DEVICE_GET_REGION_INFO reply: index ${String(reply.index)} answers a query for ${String(index)}`, 'index');
      }
      return reply.truncated ? null : buildRegionRecord(reply, fds);
    },
    checkGrowth(argsz, asked) {
      if (argsz <= asked) {
        throw protocolError(`DEVICE_GET_REGION_INFO reply: argsz ${String(argsz)} fitted the request but only 32 bytes came`, 'argsz');
      }
      if (argsz > ClientLimits.MAX_REGION_INFO_ARGSZ) {
        throw protocolError(`DEVICE_GET_REGION_INFO reply: argsz ${String(argsz)} exceeds ${String(ClientLimits.MAX_REGION_INFO_ARGSZ)}`, 'argsz');
      }
    },
  });
}

/** @internal IRQ info of every index below `count`, asked in parallel. */
export function fetchIrqs(caller: Caller, count: number, name: string): Promise<IrqIndexInfo[]> {
  return settleAll(range(count).map((i) => fetchIrq(caller, i, name)));
}

/** @internal `DEVICE_GET_IRQ_INFO` of `index`, checked; `name` labels debug output. */
export async function fetchIrq(caller: Caller, index: number, name: string): Promise<IrqIndexInfo> {
  const reply = await caller.call(Command.DEVICE_GET_IRQ_INFO, encodeIrqInfoRequest({ index }), (msg) => decodeIrqInfoReply(msg.payload));
  if (reply.index !== index) {
    throw protocolError(`DEVICE_GET_IRQ_INFO reply: index ${String(reply.index)} answers a query for ${String(index)}`, 'index');
  }
  if (reply.count > MAX_IRQ_VECTORS) {
    throw protocolError(`DEVICE_GET_IRQ_INFO reply: ${String(reply.count)} vectors exceed ${String(MAX_IRQ_VECTORS)}`, 'count');
  }
  if (reply.count > 0 && (reply.flags & IrqInfoFlags.EVENTFD) === 0) {
    debug('%s: IRQ index %d does not report EVENTFD', name, index);
  }
  return irqIndexInfo(reply);
}

/**
 * @internal `DEVICE_GET_REGION_IO_FDS` of region `index` (`regionSize` bytes), with the two-step
 * `argsz` exchange; the caller owns the result.
 *
 * @throws {ProtocolError} for a reply that does not hold together (its fds are closed).
 */
export function fetchRegionIoFds(caller: Caller, index: number, regionSize: number, timeoutMs: number | undefined): Promise<RegionIoFds> {
  return askGrowing(caller, Command.DEVICE_GET_REGION_IO_FDS, index, 16, timeoutMs, {
    encode: (argsz) => encodeRegionIoFdsRequest({ index, argsz }),
    decode: decodeRegionIoFdsReply,
    accept: (reply, fds) => (reply.truncated ? null : buildRegionIoFds(index, regionSize, reply, fds)),
    checkGrowth(argsz, asked) {
      if (argsz <= asked || argsz > ClientLimits.MAX_REGION_INFO_ARGSZ) {
        throw protocolError(`DEVICE_GET_REGION_IO_FDS reply: argsz ${String(argsz)} after asking for ${String(asked)}`, 'argsz');
      }
    },
  });
}

/** One query of the two-step `argsz` exchange (what differs between the commands that use it). */
interface GrowingQuery<R, T> {
  encode(argsz: number): Body;
  decode(payload: Uint8Array): R;
  /** The result of a complete reply (it takes `fds`), or null for a truncated one; throws (closing `fds`) for a wrong answer. */
  accept(reply: R, fds: Fd[]): T | null;
  /** Throws unless a truncated reply's `argsz` is worth asking again with. */
  checkGrowth(argsz: number, asked: number): void;
}

/**
 * QEMU's two-step `argsz` exchange for region `index`: ask with `first` bytes; a truncated reply
 * names the `argsz` the full answer needs, and we ask once more with that. A reply longer than
 * asked for is refused; the fds of a truncated reply are closed.
 */
async function askGrowing<R extends { argsz: number }, T>(caller: Caller, command: number, index: number, first: number, timeoutMs: number | undefined, query: GrowingQuery<R, T>): Promise<T> {
  const name = commandName(command);
  let argsz = first;
  for (let attempt = 0; attempt < 2; attempt++) {
    const asked = argsz;
    const { reply, fds } = await caller.call(
      command,
      query.encode(asked),
      (msg) => {
        if (msg.payloadLength > asked) {
          throw protocolError(`${name} reply: ${String(msg.payloadLength)} bytes exceed the argsz ${String(asked)} asked for`, 'argsz');
        }
        return { reply: query.decode(msg.payload), fds: msg.takeAllFds() };
      },
      { allowFds: true, timeoutMs },
    );
    const result = query.accept(reply, fds);
    if (result !== null) return result;
    // Step one of QEMU's exchange: only the fixed part; ask again with the full argsz.
    Fd.closeAll(fds);
    query.checkGrowth(reply.argsz, asked);
    argsz = reply.argsz;
  }
  throw protocolError(`${name}: region ${String(index)} still truncated at argsz ${String(argsz)}`, 'argsz');
}

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}
