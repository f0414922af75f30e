/**
 * Migration v2 from the client's side (reference §3.16-3.18, §5): the MIGRATION feature probe,
 * MIG_DEVICE_STATE get/set, the data stream (MIG_DATA_READ/WRITE) and DMA dirty logging
 * (DMA_LOGGING_START/STOP/REPORT), as {@link VfioUserClient} methods use them. The stream is
 * opaque here: its bytes are moved, never parsed (libvfio-user devices stream whatever they like).
 *
 * @packageDocumentation
 */
import { Command, DeviceFeature, Errno, MigState, MigrationFlags } from '../protocol/constants';
import { VfioUserError } from '../protocol/errors';
import {
  decodeDeviceFeatureReply,
  decodeDmaLoggingControl,
  decodeDmaLoggingReportReply,
  decodeMigDeviceState,
  decodeMigrationFeatureData,
  dmaLoggingBitmapSize,
  encodeDeviceFeatureRequest,
  encodeDmaLoggingControl,
  encodeDmaLoggingReportRequest,
  encodeMigDeviceState,
} from '../protocol/messages/feature';
import { decodeMigDataReadReply, decodeMigDataWriteReply, encodeMigDataReadRequest, encodeMigDataWriteRequest } from '../protocol/messages/migration';
import { protocolError } from './errors';

/** Names of the migration states (reference §5.2), for messages and events. */
export const MIG_STATE_NAMES: Readonly<Record<number, string>> = {
  [MigState.ERROR]: 'ERROR',
  [MigState.STOP]: 'STOP',
  [MigState.RUNNING]: 'RUNNING',
  [MigState.STOP_COPY]: 'STOP_COPY',
  [MigState.RESUMING]: 'RESUMING',
  [MigState.RUNNING_P2P]: 'RUNNING_P2P',
  [MigState.PRE_COPY]: 'PRE_COPY',
  [MigState.PRE_COPY_P2P]: 'PRE_COPY_P2P',
};

/** Name of migration state `state` (or its number). */
export function migStateName(state: number): string {
  return MIG_STATE_NAMES[state] ?? String(state);
}

/** What the MIGRATION feature reported. */
export interface MigrationSupport {
  /** The raw {@link MigrationFlags}. */
  readonly flags: bigint;
  /** STOP, STOP_COPY and RESUMING are supported (mandatory for migration). */
  readonly stopCopy: boolean;
  /** PRE_COPY (saving while running) is supported. */
  readonly preCopy: boolean;
}

/** A range of client memory to log (DMA_LOGGING_START). */
export interface DirtyRange {
  iova: number;
  length: number;
}

/**
 * A decoded DMA_LOGGING_REPORT: pages of `[iova, iova + length)` at `pageSize` granularity the
 * device wrote since the previous report (reading clears them on the server).
 */
export class DirtyBitmap {
  /** Number of pages set. */
  readonly count: number;

  constructor(
    readonly iova: number,
    readonly length: number,
    readonly pageSize: number,
    /** u64 little-endian words: bit k (bit k % 64 of word k / 64) = page k. */
    readonly bitmap: Buffer,
  ) {
    let n = 0;
    for (let i = 0; i < bitmap.length; i++) {
      let b = bitmap[i]!;
      while (b !== 0) {
        b &= b - 1;
        n++;
      }
    }
    this.count = n;
  }

  /** Number of pages the report covers. */
  get pages(): number {
    return Math.ceil(this.length / this.pageSize);
  }

  /** True if page `k` (at `iova + k * pageSize`) was written. */
  isDirty(k: number): boolean {
    return k >= 0 && k < this.pages && (this.bitmap[k >> 3]! & (1 << (k & 7))) !== 0;
  }

  /** The dirty pages as runs `{ iova, length }` (consecutive pages merged, clipped to the range). */
  *ranges(): IterableIterator<DirtyRange> {
    const pages = this.pages;
    let k = 0;
    while (k < pages) {
      if (this.bitmap[k >> 3] === 0) {
        k = (k | 7) + 1;
        continue;
      }
      if (!this.isDirty(k)) {
        k++;
        continue;
      }
      let end = k + 1;
      while (end < pages && this.isDirty(end)) end++;
      const start = this.iova + k * this.pageSize;
      yield { iova: start, length: Math.min(this.iova + this.length, this.iova + end * this.pageSize) - start };
      k = end;
    }
  }
}

/** @internal What the migration calls need from the client. */
export interface MigrationCore {
  /** Sends a command expecting no fds back; resolves with the reply payload. */
  call(command: number, body: Uint8Array, timeoutMs?: number): Promise<Buffer>;
  /** Largest data chunk one MIG_DATA_READ/WRITE may carry (the smaller of both sides' limits). */
  readonly maxChunk: number;
}

/** GET of `feature`: the reply's data (its flags checked). */
async function featureGet(core: MigrationCore, feature: number, dataLength: number, requestData?: Uint8Array, timeoutMs?: number): Promise<Buffer> {
  const flags = DeviceFeature.GET | feature;
  const payload = await core.call(Command.DEVICE_FEATURE, encodeDeviceFeatureRequest({ argsz: 8 + dataLength, flags, data: requestData }), timeoutMs);
  const reply = decodeDeviceFeatureReply(payload);
  if (reply.flags !== flags) throw protocolError(`DEVICE_FEATURE reply: flags 0x${reply.flags.toString(16)} for a GET of 0x${flags.toString(16)}`, 'flags');
  return Buffer.from(reply.data);
}

/** SET of `feature` with `data`: the reply's data (the echo, perhaps adjusted by the server). */
async function featureSet(core: MigrationCore, feature: number, data: Uint8Array | undefined, timeoutMs?: number): Promise<Buffer> {
  const flags = DeviceFeature.SET | feature;
  const payload = await core.call(Command.DEVICE_FEATURE, encodeDeviceFeatureRequest({ flags, data }), timeoutMs);
  // A header-only reply (some servers) is taken as the echo.
  if (payload.length === 0) return Buffer.from(data ?? []);
  const reply = decodeDeviceFeatureReply(payload);
  if (reply.flags !== flags) throw protocolError(`DEVICE_FEATURE reply: flags 0x${reply.flags.toString(16)} for a SET of 0x${flags.toString(16)}`, 'flags');
  return Buffer.from(reply.data);
}

/** GET MIGRATION; null when the device refuses (it cannot migrate). */
export async function probeMigration(core: MigrationCore, timeoutMs?: number): Promise<MigrationSupport | null> {
  let data: Buffer;
  try {
    data = await featureGet(core, DeviceFeature.MIGRATION, 8, undefined, timeoutMs);
  } catch (err) {
    if (err instanceof VfioUserError && err.errno !== Errno.ETIMEDOUT && err.errno !== Errno.ECONNRESET) return null;
    throw err;
  }
  const flags = decodeMigrationFeatureData(data);
  return { flags, stopCopy: (flags & BigInt(MigrationFlags.STOP_COPY)) !== 0n, preCopy: (flags & BigInt(MigrationFlags.PRE_COPY)) !== 0n };
}

/** GET MIG_DEVICE_STATE. */
export async function getMigrationState(core: MigrationCore, timeoutMs?: number): Promise<number> {
  return decodeMigDeviceState(await featureGet(core, DeviceFeature.MIG_DEVICE_STATE, 8, undefined, timeoutMs)).deviceState;
}

/** SET MIG_DEVICE_STATE: resolves with the state the server reports (the target on success). */
export async function setMigrationState(core: MigrationCore, state: number, timeoutMs?: number): Promise<number> {
  const data = await featureSet(core, DeviceFeature.MIG_DEVICE_STATE, encodeMigDeviceState({ deviceState: state, dataFd: 0xffff_ffff }), timeoutMs);
  const reached = decodeMigDeviceState(data).deviceState;
  if (reached !== state) throw protocolError(`MIG_DEVICE_STATE: the server reports ${migStateName(reached)} after a successful SET to ${migStateName(state)}`, 'device_state');
  return reached;
}

/**
 * One MIG_DATA_READ of at most `max` bytes (default: the largest chunk allowed). Empty means "no
 * more for now" in PRE_COPY and "the end" in STOP_COPY. Trusts the reply's `size`, not its length
 * (libvfio-user pads the reply to the requested size).
 */
export async function readMigrationData(core: MigrationCore, max = core.maxChunk, timeoutMs?: number): Promise<Buffer> {
  const size = Math.min(max, core.maxChunk);
  const payload = await core.call(Command.MIG_DATA_READ, encodeMigDataReadRequest({ size }), timeoutMs);
  const reply = decodeMigDataReadReply(payload);
  if (reply.size > size) throw protocolError(`MIG_DATA_READ reply: ${reply.size} bytes for a read of ${size}`, 'size');
  return Buffer.from(reply.data);
}

/** MIG_DATA_WRITE of `data`, in chunks of at most the largest chunk allowed, in order. */
export async function writeMigrationData(core: MigrationCore, data: Uint8Array, timeoutMs?: number): Promise<void> {
  for (let at = 0; at < data.length; at += core.maxChunk) {
    const chunk = data.subarray(at, Math.min(data.length, at + core.maxChunk));
    decodeMigDataWriteReply(await core.call(Command.MIG_DATA_WRITE, encodeMigDataWriteRequest({ data: chunk }), timeoutMs));
  }
}

/** DMA_LOGGING_START: resolves with the page size the server chose. */
export async function startDirtyLogging(core: MigrationCore, pageSize: number, ranges: readonly DirtyRange[], timeoutMs?: number): Promise<number> {
  const data = encodeDmaLoggingControl({ pageSize: BigInt(pageSize), ranges: ranges.map((r) => ({ iova: BigInt(r.iova), length: BigInt(r.length) })) });
  const reply = await featureSet(core, DeviceFeature.DMA_LOGGING_START, data, timeoutMs);
  const chosen = Number(decodeDmaLoggingControl(reply).pageSize);
  if (!Number.isSafeInteger(chosen) || chosen < 1 || (chosen & (chosen - 1)) !== 0) {
    throw protocolError(`DMA_LOGGING_START reply: page size ${chosen} is not a power of two`, 'page_size');
  }
  return chosen;
}

/** DMA_LOGGING_STOP. */
export async function stopDirtyLogging(core: MigrationCore, timeoutMs?: number): Promise<void> {
  await featureSet(core, DeviceFeature.DMA_LOGGING_STOP, undefined, timeoutMs);
}

/** DMA_LOGGING_REPORT of `[iova, iova + length)` (one DMA map, for libvfio-user) at `pageSize`. */
export async function dirtyReport(core: MigrationCore, iova: number, length: number, pageSize: number, timeoutMs?: number): Promise<DirtyBitmap> {
  const request = { iova: BigInt(iova), length: BigInt(length), pageSize: BigInt(pageSize) };
  const bitmapBytes = dmaLoggingBitmapSize(request.length, request.pageSize);
  const data = await featureGet(core, DeviceFeature.DMA_LOGGING_REPORT, 24 + bitmapBytes, encodeDmaLoggingReportRequest(request), timeoutMs);
  const reply = decodeDmaLoggingReportReply(data);
  if (reply.iova !== request.iova || reply.length !== request.length || reply.pageSize !== request.pageSize) {
    throw protocolError('DMA_LOGGING_REPORT reply: does not echo the range asked for', 'iova');
  }
  return new DirtyBitmap(iova, length, pageSize, Buffer.from(reply.bitmap));
}
