/**
 * The migration stream of our own devices, and the {@link MigrationHooks} that produce and consume
 * it for any {@link StatefulDevice}. A client never looks inside (reference §5.4: the stream is
 * opaque); this is the contract between two of our servers.
 *
 * ```
 * stream  = record*                      record = u16 type | u16 flags (0) | u32 length | payload
 * HEADER  (1)  "VFUSTATE" | u32 format version | JSON { kind, identity }     always first
 * DATA    (3)  u64 offset | bytes         bulk data (a RAM namespace's blocks)
 * ZERO    (4)  u64 offset | u64 length    bulk data that reads as zeroes
 * STATE   (2)  JSON                       the device state, taken while it is stopped
 * END     (0xffff) SHA-256 of every byte before this record                  always last
 * ```
 *
 * Little-endian. A destination checks the header first: a different format version, device kind
 * or identity (IDs, geometry, queue counts: whatever {@link StatefulDevice.migrationIdentity}
 * returns) refuses the stream at once, before anything is applied. Bulk data is applied as it
 * arrives; the STATE record is only applied once END has arrived and its digest matched, so a
 * truncated or corrupted stream leaves the device as it was (bulk blocks received are written,
 * which is harmless on a fresh destination, and said so in the error).
 *
 * Bulk data moves iteratively: in PRE_COPY the first round covers everything, every later round
 * the blocks written since the previous round began ({@link BulkData.takeDirty}); a round ends
 * with an empty MIG_DATA_READ, so a client sees how much each round carried and decides when to
 * stop. At STOP_COPY the device is stopped (its I/O finished), and the rest goes: what is left of
 * the round, the blocks dirtied since, the state, END.
 *
 * @packageDocumentation
 */
import { createHash, type Hash } from 'node:crypto';
import type { MigrationHooks, MigrationLoader, MigrationSaver } from './migration';

export const STATE_MAGIC = 'VFUSTATE';
/** Version of the format above; a destination refuses any other. */
export const STATE_FORMAT_VERSION = 1;

export const RecordType = {
  HEADER: 1,
  STATE: 2,
  DATA: 3,
  ZERO: 4,
  END: 0xffff,
} as const;

const RECORD_HEADER = 8;
const DIGEST = 32;
/** Largest record payload a destination accepts (a DATA record is at most BULK_RECORD + 8). */
const MAX_RECORD = 16 * 1024 * 1024;
/** Bytes of bulk data per DATA record. */
const BULK_RECORD = 1024 * 1024;

/** A stream the destination refuses; `message` says why. */
export class MigrationRefusedError extends Error {
  override readonly name = 'MigrationRefusedError';
}

/** Data a device migrates in bulk, iteratively (a RAM namespace's blocks). */
export interface BulkData {
  /** Bytes. */
  readonly size: number;
  /** Tracking granule in bytes (a power of two, dividing `size` or not). */
  readonly granule: number;
  /** Start logging the granules written from now on (source, when a saving session begins). */
  startTracking(): void;
  stopTracking(): void;
  /** Granules written since the last call (or since tracking started), as a bitmap; clears them. */
  takeDirty(): Uint8Array;
  /** Copies `[offset, offset + dst.length)` into `dst` (holes read as zeroes). */
  read(offset: number, dst: Buffer): void;
  /** Destination: stores `src` at `offset`. */
  write(offset: number, src: Buffer): void;
  /** Destination: the range reads as zeroes. */
  zero(offset: number, length: number): void;
}

/** What a device provides to migrate with {@link stateStreamHooks}. */
export interface StatefulDevice {
  /**
   * Kind and identity: device type, IDs, geometry, queue counts. A destination whose own
   * identity differs in any field refuses the stream. JSON-serialisable.
   */
  migrationIdentity(): { kind: string } & Record<string, unknown>;
  /** Stop (false) or run (true); stopping resolves once I/O already started has finished. */
  setRunning(running: boolean): void | Promise<void>;
  /** The whole device state, taken while stopped; JSON-serialisable. */
  saveState(): unknown;
  /** Check all of `state` first, then apply it; throw (MigrationRefusedError) to refuse, changing nothing. */
  loadState(state: unknown): void | Promise<void>;
  /** Bulk data to move iteratively, or null. */
  bulkData?(): BulkData | null;
  /**
   * A saving session began (true; the transition waits for the promise, while the device still
   * runs: e.g. write back caches ahead of the stop) or ended (false).
   */
  savingChanged?(saving: boolean): void | Promise<void>;
}

function record(type: number, payload: Uint8Array): Buffer[] {
  const h = Buffer.alloc(RECORD_HEADER);
  h.writeUInt16LE(type, 0);
  h.writeUInt32LE(payload.length, 4);
  return [h, Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength)];
}

/** The HEADER record payload. */
function headerPayload(identity: { kind: string } & Record<string, unknown>): Buffer {
  const json = Buffer.from(JSON.stringify(identity), 'utf8');
  const out = Buffer.alloc(12 + json.length);
  out.write(STATE_MAGIC, 0, 'latin1');
  out.writeUInt32LE(STATE_FORMAT_VERSION, 8);
  json.copy(out, 12);
  return out;
}

/** Iterates the granules of one bulk round in order, as runs of consecutive set bits. */
class Round {
  private next = 0;
  constructor(
    private readonly bitmap: Uint8Array | null,
    private readonly granules: number,
  ) {}

  /** Next run [first, end) of at most `maxGranules`, or null when the round is done. */
  take(maxGranules: number): [number, number] | null {
    const bits = this.bitmap;
    let g = this.next;
    if (bits !== null) {
      while (g < this.granules) {
        if (bits[g >> 3] === 0) g = (g | 7) + 1;
        else if ((bits[g >> 3]! & (1 << (g & 7))) === 0) g++;
        else break;
      }
    }
    if (g >= this.granules) {
      this.next = g;
      return null;
    }
    let end = g + 1;
    while (end < this.granules && end - g < maxGranules && (bits === null || (bits[end >> 3]! & (1 << (end & 7))) !== 0)) end++;
    this.next = end;
    return [g, end];
  }

  /** Merges another bitmap of the same size into what is still ahead. */
  static merge(a: Uint8Array, b: Uint8Array): Uint8Array {
    for (let i = 0; i < a.length; i++) a[i]! |= b[i]!;
    return a;
  }

  /** The granules not yet taken, as a bitmap. */
  remaining(): Uint8Array {
    const out = new Uint8Array(Math.ceil(this.granules / 8));
    const from = this.next;
    if (from >= this.granules) return out;
    if (this.bitmap === null) out.fill(0xff);
    else out.set(this.bitmap.subarray(0, out.length));
    // Clear what was taken: whole bytes, then the bits of the byte `from` falls in.
    out.fill(0, 0, from >> 3);
    out[from >> 3]! &= ~((1 << (from & 7)) - 1) & 0xff;
    // Bits past the last granule stay clear.
    if (this.granules % 8 !== 0) out[out.length - 1]! &= (1 << (this.granules % 8)) - 1;
    return out;
  }
}

/** Produces the stream of one saving session. */
class StateSaver implements MigrationSaver {
  private readonly queue: Buffer[] = [];
  private queued = 0;
  private readonly hash: Hash = createHash('sha256');
  private round: Round | null = null;
  /** The client drained the current round (an empty read went out): the next read starts another. */
  private roundOver = false;
  /** The device stopped: the final round is under way. */
  private finalising = false;
  /** STATE and END are queued. */
  private ended = false;
  private readonly granules: number;
  private readonly zero: Buffer;

  constructor(
    private readonly device: StatefulDevice,
    private readonly bulk: BulkData | null,
  ) {
    this.push(RecordType.HEADER, headerPayload(device.migrationIdentity()));
    this.granules = bulk === null ? 0 : Math.ceil(bulk.size / bulk.granule);
    this.zero = Buffer.alloc(bulk?.granule ?? 0);
    if (bulk !== null) {
      bulk.startTracking();
      this.round = new Round(null, this.granules);
    }
  }

  async started(): Promise<void> {
    await this.device.savingChanged?.(true);
  }

  read(max: number, stopped: boolean): Uint8Array {
    if (stopped && !this.finalising) this.finalise();
    if (!stopped && this.roundOver && this.queued === 0) {
      this.roundOver = false;
      if (this.bulk !== null) this.round = new Round(this.bulk.takeDirty(), this.granules);
    }
    while (this.queued < max && this.round !== null) {
      if (!this.produce(max - this.queued)) this.round = null;
    }
    if (this.finalising && this.round === null && !this.ended) this.end();
    if (this.queued === 0) {
      if (!stopped) this.roundOver = true;
      return EMPTY;
    }
    return this.take(max);
  }

  close(): void {
    this.bulk?.stopTracking();
    this.queue.length = 0;
    this.queued = 0;
    void this.device.savingChanged?.(false);
  }

  /** Stopped: the rest of the round plus what was dirtied since (produced as read), then the state and END. */
  private finalise(): void {
    this.finalising = true;
    this.roundOver = false;
    if (this.bulk === null) return;
    const dirty = this.bulk.takeDirty();
    this.bulk.stopTracking();
    this.round = new Round(this.round === null ? dirty : Round.merge(this.round.remaining(), dirty), this.granules);
  }

  private end(): void {
    this.ended = true;
    this.push(RecordType.STATE, Buffer.from(JSON.stringify(this.device.saveState()), 'utf8'));
    this.queue.push(...record(RecordType.END, this.hash.digest()));
    this.queued += RECORD_HEADER + DIGEST;
  }

  /** Queues the next record(s) of the round (about `budget` bytes); false when the round is done. */
  private produce(budget: number): boolean {
    const bulk = this.bulk!;
    const g = bulk.granule;
    const run = this.round!.take(Math.max(1, Math.floor(Math.min(BULK_RECORD, budget) / g)));
    if (run === null) return false;
    const offset = run[0] * g;
    const length = Math.min(bulk.size, run[1] * g) - offset;
    const data = Buffer.allocUnsafe(length);
    bulk.read(offset, data);
    // Runs of zero granules go as ZERO records, the rest as DATA.
    let at = 0;
    while (at < length) {
      const zero = this.isZero(data, at);
      let end = at + g;
      while (end < length && this.isZero(data, end) === zero) end += g;
      end = Math.min(end, length);
      if (zero) {
        const p = Buffer.alloc(16);
        p.writeBigUInt64LE(BigInt(offset + at), 0);
        p.writeBigUInt64LE(BigInt(end - at), 8);
        this.push(RecordType.ZERO, p);
      } else {
        const p = Buffer.allocUnsafe(8 + end - at);
        p.writeBigUInt64LE(BigInt(offset + at), 0);
        data.copy(p, 8, at, end);
        this.push(RecordType.DATA, p);
      }
      at = end;
    }
    return true;
  }

  private isZero(data: Buffer, at: number): boolean {
    const n = Math.min(this.zero.length, data.length - at);
    return data.compare(this.zero, 0, n, at, at + n) === 0;
  }

  private push(type: number, payload: Buffer): void {
    for (const part of record(type, payload)) {
      this.hash.update(part);
      this.queue.push(part);
      this.queued += part.length;
    }
  }

  private take(max: number): Buffer {
    const parts: Buffer[] = [];
    let n = 0;
    while (n < max && this.queue.length > 0) {
      const head = this.queue[0]!;
      const room = max - n;
      if (head.length <= room) {
        parts.push(head);
        this.queue.shift();
        n += head.length;
      } else {
        parts.push(head.subarray(0, room));
        this.queue[0] = head.subarray(room);
        n += room;
      }
    }
    this.queued -= n;
    // Queued buffers are never written again: the first one can go out as it is.
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts, n);
  }
}

const EMPTY = new Uint8Array(0);

/** Consumes the stream of one loading session. */
class StateLoader implements MigrationLoader {
  private readonly hash: Hash = createHash('sha256');
  /** Bytes of the record being assembled: its header, then its payload. */
  private readonly head = Buffer.alloc(RECORD_HEADER);
  private headFill = 0;
  private type = 0;
  private payload: Buffer | null = null;
  private payloadFill = 0;
  private records = 0;
  private bulkBytes = 0;
  private state: unknown = undefined;
  private ended = false;

  constructor(
    private readonly device: StatefulDevice,
    private readonly bulk: BulkData | null,
  ) {}

  write(data: Buffer): void {
    let at = 0;
    while (at < data.length) {
      if (this.ended) throw new MigrationRefusedError(`${data.length - at} bytes after the end of the stream`);
      if (this.payload === null) {
        const n = Math.min(RECORD_HEADER - this.headFill, data.length - at);
        data.copy(this.head, this.headFill, at, at + n);
        this.headFill += n;
        at += n;
        if (this.headFill < RECORD_HEADER) return;
        this.begin();
        if (this.payload!.length > 0) continue;
      } else {
        const n = Math.min(this.payload.length - this.payloadFill, data.length - at);
        data.copy(this.payload, this.payloadFill, at, at + n);
        this.payloadFill += n;
        at += n;
      }
      if (this.payloadFill === this.payload!.length) this.complete();
    }
  }

  async finish(): Promise<void> {
    if (this.records === 0) throw new MigrationRefusedError('empty migration stream');
    if (!this.ended) {
      const partial = this.bulkBytes > 0 ? ` (${this.bulkBytes} bytes of bulk data were written)` : '';
      throw new MigrationRefusedError(`truncated migration stream: no END record after ${this.records} records${partial}`);
    }
    if (this.state === undefined) throw new MigrationRefusedError('migration stream without a STATE record');
    await this.device.loadState(this.state);
  }

  abort(): void {
    this.payload = null;
    this.state = undefined;
  }

  private begin(): void {
    const h = this.head;
    this.type = h.readUInt16LE(0);
    const flags = h.readUInt16LE(2);
    const length = h.readUInt32LE(4);
    if (this.records === 0 && this.type !== RecordType.HEADER) throw new MigrationRefusedError('not a vfio-user device state stream (no header)');
    if (flags !== 0) throw new MigrationRefusedError(`record ${this.records}: unknown flags 0x${flags.toString(16)}`);
    if (length > MAX_RECORD) throw new MigrationRefusedError(`record ${this.records}: ${length} bytes exceed ${MAX_RECORD}`);
    this.payload = Buffer.allocUnsafe(length);
    this.payloadFill = 0;
  }

  private complete(): void {
    const type = this.type;
    const p = this.payload!;
    this.payload = null;
    this.headFill = 0;
    if (type === RecordType.END) {
      if (p.length !== DIGEST || !p.equals(this.hash.digest())) {
        const partial = this.bulkBytes > 0 ? ` (${this.bulkBytes} bytes of bulk data were written)` : '';
        throw new MigrationRefusedError(`corrupted migration stream: the digest does not match${partial}`);
      }
      this.ended = true;
      this.records++;
      return;
    }
    this.hash.update(this.head);
    this.hash.update(p);
    this.records++;
    switch (type) {
      case RecordType.HEADER:
        if (this.records !== 1) throw new MigrationRefusedError('a second header');
        this.checkHeader(p);
        return;
      case RecordType.STATE:
        if (this.state !== undefined) throw new MigrationRefusedError('a second STATE record');
        try {
          this.state = JSON.parse(p.toString('utf8'));
        } catch {
          throw new MigrationRefusedError('the STATE record is not valid JSON');
        }
        return;
      case RecordType.DATA:
      case RecordType.ZERO:
        this.applyBulk(type, p);
        return;
      default:
        throw new MigrationRefusedError(`record ${this.records - 1}: unknown type ${type}`);
    }
  }

  private checkHeader(p: Buffer): void {
    if (p.length < 12 || p.toString('latin1', 0, 8) !== STATE_MAGIC) throw new MigrationRefusedError('not a vfio-user device state stream (bad magic)');
    const version = p.readUInt32LE(8);
    if (version !== STATE_FORMAT_VERSION) throw new MigrationRefusedError(`stream format version ${version}; this server reads version ${STATE_FORMAT_VERSION}`);
    let theirs: Record<string, unknown>;
    try {
      theirs = JSON.parse(p.toString('utf8', 12)) as Record<string, unknown>;
    } catch {
      throw new MigrationRefusedError('the stream header is not valid JSON');
    }
    const ours = this.device.migrationIdentity() as Record<string, unknown>;
    const differences: string[] = [];
    for (const key of new Set([...Object.keys(ours), ...Object.keys(theirs ?? {})])) {
      const a = JSON.stringify(theirs?.[key]);
      const b = JSON.stringify(ours[key]);
      if (a !== b) differences.push(`${key} ${a ?? 'absent'} (here: ${b ?? 'absent'})`);
    }
    if (differences.length > 0) throw new MigrationRefusedError(`the stream is for another device: ${differences.join(', ')}`);
  }

  private applyBulk(type: number, p: Buffer): void {
    const bulk = this.bulk;
    if (bulk === null) throw new MigrationRefusedError('bulk data for a device that has none');
    if (p.length < 8 || (type === RecordType.ZERO && p.length !== 16)) throw new MigrationRefusedError('malformed bulk record');
    const offset = Number(p.readBigUInt64LE(0));
    const length = type === RecordType.ZERO ? Number(p.readBigUInt64LE(8)) : p.length - 8;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset + length > bulk.size) {
      throw new MigrationRefusedError(`bulk data at ${offset}+${length} is outside the ${bulk.size} bytes here`);
    }
    if (type === RecordType.ZERO) bulk.zero(offset, length);
    else bulk.write(offset, p.subarray(8));
    this.bulkBytes += length;
  }
}

/**
 * Migration hooks for `device`, streaming the format above (PRE_COPY offered). The device's bulk
 * data, if any, is tracked from the start of a saving session to its end.
 */
export function stateStreamHooks(device: StatefulDevice): MigrationHooks {
  return {
    preCopy: true,
    setRunning: (running) => device.setRunning(running),
    saver: () => new StateSaver(device, device.bulkData?.() ?? null),
    loader: () => new StateLoader(device, device.bulkData?.() ?? null),
  };
}

// ---- helpers for JSON device state ----

/** Bytes as base64 (for JSON state). */
export function toBase64(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
}

/** base64 from a state field, checked to decode to `length` bytes. @throws MigrationRefusedError */
export function fromBase64(value: unknown, length: number, what: string): Buffer {
  if (typeof value !== 'string') throw new MigrationRefusedError(`${what}: expected base64 bytes`);
  const out = Buffer.from(value, 'base64');
  if (out.length !== length) throw new MigrationRefusedError(`${what}: ${out.length} bytes, expected ${length}`);
  return out;
}

/** A state field that must be an integer in [min, max]. @throws MigrationRefusedError */
export function intField(value: unknown, what: string, min = 0, max = 0xffff_ffff): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new MigrationRefusedError(`${what}: expected an integer in [${min}, ${max}], got ${JSON.stringify(value)}`);
  }
  return value;
}

/** A state field that must be an object. @throws MigrationRefusedError */
export function objectField(value: unknown, what: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new MigrationRefusedError(`${what}: expected an object`);
  return value as Record<string, unknown>;
}

/** A state field that must be an array. @throws MigrationRefusedError */
export function arrayField(value: unknown, what: string, maxLength = 1 << 20): unknown[] {
  if (!Array.isArray(value) || value.length > maxLength) throw new MigrationRefusedError(`${what}: expected an array of at most ${maxLength} entries`);
  return value;
}

/** A state field that must be a boolean. @throws MigrationRefusedError */
export function boolField(value: unknown, what: string): boolean {
  if (typeof value !== 'boolean') throw new MigrationRefusedError(`${what}: expected a boolean`);
  return value;
}
