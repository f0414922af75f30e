/**
 * `VERSION` capabilities: parsing with the peers' type rules, defaults, encoding, and negotiation
 * (reference 1.9, 1.12, 3.1, 8.7, 8.18).
 *
 * Each side announces what it can *receive*. Parsing walks the JSON through a table of
 * `{ name, check }` entries ({@link CAPABILITY_TABLE}): a known key with a value of the wrong JSON
 * type is a {@link ProtocolError} (libvfio-user and QEMU both fail the negotiation); unknown keys are
 * ignored and reported in `ignored` (QEMU warns, libvfio-user ignores).
 *
 * Negotiation ({@link negotiate}) walks a second table ({@link NEGOTIATION_RULES}) whose rules may
 * only *lower* a limit: the effective value is never above what this side can handle, whatever the
 * peer announced (QEMU's "can only lower it" checks).
 *
 * @packageDocumentation
 */
import { Defaults, Limits, ProtocolVersion } from './constants';
import { U32_MAX, U64_MAX, checkU64, checkUint } from './codec';
import { ProtocolError } from './errors';
import { isJsonObject, type JsonObject, type JsonValue } from './json';

/** `twin_socket` capability (reference 1.9). */
export interface TwinSocketCapability {
  /** `supported` (default false). */
  supported: boolean;
  /** `fd_index`: in a server's reply, index of the twin socket's fd among the reply's fds. */
  fdIndex?: number | undefined;
}

/** Legacy `migration` capability (spec 0.9.1; still sent by QEMU and libvfio-user, reference 3.1). */
export interface MigrationCapability {
  /** `pgsize`: page size of dirty bitmaps. */
  pgsize?: number | undefined;
  /** `max_bitmap_size` (QEMU only): largest dirty bitmap in bytes. */
  maxBitmapSize?: number | undefined;
}

/** One side's capabilities with defaults applied. */
export interface Capabilities {
  /** `max_msg_fds`: most fds the announcer accepts per message (default 1). */
  maxMsgFds: number;
  /** `max_data_xfer_size`: largest data count the announcer accepts (default 1 MiB). */
  maxDataXferSize: number;
  /** `max_dma_maps` (server): most simultaneous DMA mappings (default 65535). */
  maxDmaMaps: number;
  /** `pgsizes` (server): bitmask of supported DMA page sizes (default 4096). */
  pgsizes: bigint;
  /** `write_multiple` (server): `REGION_WRITE_MULTI` accepted (default false). */
  writeMultiple: boolean;
  /** `twin_socket` (default `{ supported: false }`). */
  twinSocket: TwinSocketCapability;
  /** Legacy `migration` object, if present. */
  migration?: MigrationCapability | undefined;
}

/** Capabilities to announce: only the keys that are set are sent. */
export type CapabilitiesInput = Partial<Capabilities>;

/** Result of {@link parseCapabilities}. */
export interface ParsedCapabilities {
  /** Values with defaults applied. */
  capabilities: Capabilities;
  /** Only the keys the peer actually sent (e.g. to tell "no `max_dma_maps`" from 65535). */
  announced: CapabilitiesInput;
  /** Paths of unknown keys that were ignored, e.g. `['capabilities.foo']`. */
  ignored: string[];
}

/** Fresh capabilities holding the protocol defaults (reference 1.12). */
export function defaultCapabilities(): Capabilities {
  return {
    maxMsgFds: Defaults.MAX_MSG_FDS,
    maxDataXferSize: Defaults.MAX_DATA_XFER_SIZE,
    maxDmaMaps: Defaults.MAX_DMA_MAPS,
    pgsizes: BigInt(Defaults.PGSIZES),
    writeMultiple: false,
    twinSocket: { supported: false },
    migration: undefined,
  };
}

/** `input` completed with the defaults (for this side's own announcement). */
export function withDefaults(input: CapabilitiesInput): Capabilities {
  const d = defaultCapabilities();
  return {
    maxMsgFds: input.maxMsgFds ?? d.maxMsgFds,
    maxDataXferSize: input.maxDataXferSize ?? d.maxDataXferSize,
    maxDmaMaps: input.maxDmaMaps ?? d.maxDmaMaps,
    pgsizes: input.pgsizes ?? d.pgsizes,
    writeMultiple: input.writeMultiple ?? d.writeMultiple,
    twinSocket: input.twinSocket === undefined ? d.twinSocket : { ...input.twinSocket },
    migration: input.migration === undefined ? undefined : { ...input.migration },
  };
}

// ---------------------------------------------------------------------------------------------
// Parsing: the {name, check} table

function fail(path: string, problem: string): never {
  throw new ProtocolError(`VERSION: ${path} ${problem}`, { field: path });
}

/** A JSON integer literal in `[0, max]`; as a number (max must be safe). */
function integer(v: JsonValue, path: string, max: number): number {
  if (typeof v !== 'bigint') fail(path, `must be a JSON integer, got ${describe(v)}`);
  if (v < 0n || v > BigInt(max)) fail(path, `${v.toString()} is out of range [0, ${String(max)}]`);
  return Number(v);
}

function boolean(v: JsonValue, path: string): boolean {
  if (typeof v !== 'boolean') fail(path, `must be a JSON boolean, got ${describe(v)}`);
  return v;
}

function object(v: JsonValue, path: string): JsonObject {
  if (!isJsonObject(v)) fail(path, `must be a JSON object, got ${describe(v)}`);
  return v;
}

function describe(v: JsonValue): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'number') return `the non-integer ${String(v)}`;
  if (typeof v === 'bigint') return `the integer ${v.toString()}`;
  return `a ${typeof v}`;
}

/** State a table entry's check writes into. */
interface ParseState {
  out: Capabilities;
  announced: CapabilitiesInput;
  ignored: string[];
}

/** One known key of a capability object and its type check. */
export interface CapabilityEntry {
  /** Wire name, e.g. `'max_msg_fds'`. */
  readonly name: string;
  /** Validates `value` (at JSON path `path`) and stores it; throws {@link ProtocolError}. */
  readonly check: (value: JsonValue, path: string, state: ParseState) => void;
}

const TWIN_SOCKET_TABLE: readonly CapabilityEntry[] = [
  { name: 'supported', check: (v, p, s) => { s.out.twinSocket.supported = boolean(v, p); } },
  { name: 'fd_index', check: (v, p, s) => { s.out.twinSocket.fdIndex = integer(v, p, 0x7fffffff); } },
];

const MIGRATION_TABLE: readonly CapabilityEntry[] = [
  { name: 'pgsize', check: (v, p, s) => { s.out.migration!.pgsize = integer(v, p, Number.MAX_SAFE_INTEGER); } },
  { name: 'max_bitmap_size', check: (v, p, s) => { s.out.migration!.maxBitmapSize = integer(v, p, Number.MAX_SAFE_INTEGER); } },
];

/**
 * The known members of `capabilities` and their JSON types (reference 3.1): integers for
 * `max_msg_fds`, `max_data_xfer_size`, `max_dma_maps`, `pgsizes`, `migration.pgsize` and
 * `migration.max_bitmap_size`, `twin_socket.fd_index`; booleans for `write_multiple` and
 * `twin_socket.supported`; objects for `twin_socket` and `migration`.
 */
export const CAPABILITY_TABLE: readonly CapabilityEntry[] = [
  {
    name: 'max_msg_fds',
    check: (v, p, s) => { s.out.maxMsgFds = s.announced.maxMsgFds = integer(v, p, U32_MAX); },
  },
  {
    name: 'max_data_xfer_size',
    check: (v, p, s) => { s.out.maxDataXferSize = s.announced.maxDataXferSize = integer(v, p, Number.MAX_SAFE_INTEGER); },
  },
  {
    name: 'max_dma_maps',
    check: (v, p, s) => { s.out.maxDmaMaps = s.announced.maxDmaMaps = integer(v, p, U32_MAX); },
  },
  {
    name: 'pgsizes',
    check: (v, p, s) => {
      if (typeof v !== 'bigint') fail(p, `must be a JSON integer, got ${describe(v)}`);
      if (v < 0n || v > U64_MAX) fail(p, `${v.toString()} is not a u64`);
      s.out.pgsizes = s.announced.pgsizes = v;
    },
  },
  {
    name: 'write_multiple',
    check: (v, p, s) => { s.out.writeMultiple = s.announced.writeMultiple = boolean(v, p); },
  },
  {
    name: 'twin_socket',
    check: (v, p, s) => {
      walk(object(v, p), p, TWIN_SOCKET_TABLE, s);
      s.announced.twinSocket = { ...s.out.twinSocket };
    },
  },
  {
    name: 'migration',
    check: (v, p, s) => {
      const o = object(v, p);
      s.out.migration = {};
      walk(o, p, MIGRATION_TABLE, s);
      s.announced.migration = { ...s.out.migration };
    },
  },
];

function walk(obj: JsonObject, path: string, table: readonly CapabilityEntry[], state: ParseState): void {
  for (const key of Object.keys(obj)) {
    const entry = table.find((e) => e.name === key);
    const p = `${path}.${key}`;
    if (entry === undefined) state.ignored.push(p);
    else entry.check(obj[key]!, p, state);
  }
}

/**
 * Reads the capabilities out of a parsed `VERSION` JSON document (`null` = no JSON at all).
 *
 * The document must be an object; `capabilities`, if present, an object; known keys must have
 * their JSON types; missing keys take their defaults; unknown keys (at any level) are ignored.
 *
 * @throws {ProtocolError} (`EINVAL`) naming the offending path, e.g. `capabilities.max_msg_fds`.
 */
export function parseCapabilities(document: JsonValue | null): ParsedCapabilities {
  const state: ParseState = { out: defaultCapabilities(), announced: {}, ignored: [] };
  if (document === null) return { capabilities: state.out, announced: state.announced, ignored: state.ignored };
  const top = object(document, 'document');
  for (const key of Object.keys(top)) {
    if (key === 'capabilities') walk(object(top[key]!, key), key, CAPABILITY_TABLE, state);
    else state.ignored.push(key);
  }
  return { capabilities: state.out, announced: state.announced, ignored: state.ignored };
}

/**
 * The `capabilities` JSON object announcing `input` (compact, keys in the order the peers use:
 * `max_msg_fds`, `max_data_xfer_size`, `pgsizes`, `max_dma_maps`, `write_multiple`,
 * `twin_socket`, `migration`). Unset keys are left out.
 *
 * @throws {RangeError}/{TypeError} for values that cannot be announced.
 */
export function capabilitiesToJson(input: CapabilitiesInput): JsonObject {
  const o: JsonObject = {};
  if (input.maxMsgFds !== undefined) {
    checkUint(input.maxMsgFds, U32_MAX, 'maxMsgFds');
    o.max_msg_fds = BigInt(input.maxMsgFds);
  }
  if (input.maxDataXferSize !== undefined) {
    checkUint(input.maxDataXferSize, Number.MAX_SAFE_INTEGER, 'maxDataXferSize');
    o.max_data_xfer_size = BigInt(input.maxDataXferSize);
  }
  if (input.pgsizes !== undefined) {
    checkU64(input.pgsizes, 'pgsizes');
    o.pgsizes = input.pgsizes;
  }
  if (input.maxDmaMaps !== undefined) {
    checkUint(input.maxDmaMaps, U32_MAX, 'maxDmaMaps');
    o.max_dma_maps = BigInt(input.maxDmaMaps);
  }
  if (input.writeMultiple !== undefined) o.write_multiple = Boolean(input.writeMultiple);
  if (input.twinSocket !== undefined) {
    const t: JsonObject = { supported: Boolean(input.twinSocket.supported) };
    if (input.twinSocket.fdIndex !== undefined) {
      checkUint(input.twinSocket.fdIndex, 0x7fffffff, 'twinSocket.fdIndex');
      t.fd_index = BigInt(input.twinSocket.fdIndex);
    }
    o.twin_socket = t;
  }
  if (input.migration !== undefined) {
    const m: JsonObject = {};
    if (input.migration.pgsize !== undefined) {
      checkUint(input.migration.pgsize, Number.MAX_SAFE_INTEGER, 'migration.pgsize');
      m.pgsize = BigInt(input.migration.pgsize);
    }
    if (input.migration.maxBitmapSize !== undefined) {
      checkUint(input.migration.maxBitmapSize, Number.MAX_SAFE_INTEGER, 'migration.maxBitmapSize');
      m.max_bitmap_size = BigInt(input.migration.maxBitmapSize);
    }
    o.migration = m;
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// Negotiation: the "may only lower" table

/** Protocol version and capabilities of one side, as sent in (or decoded from) `VERSION`. */
export interface VersionInfo {
  major: number;
  minor: number;
  capabilities: Capabilities;
}

/**
 * This side's ceilings. A peer's announcement can only lower the effective limit below these.
 * Defaults: {@link DEFAULT_NEGOTIATION_LIMITS}.
 */
export interface NegotiationLimits {
  /** Most fds we will ever attach to one message (Linux `SCM_MAX_FD` = 253). */
  maxMsgFds: number;
  /** Largest data transfer we will ever make or accept (64 MiB, QEMU's ceiling). */
  maxDataXferSize: number;
  /** Most DMA mappings we consider (65535, QEMU's ceiling). */
  maxDmaMaps: number;
  /** Largest legacy dirty bitmap (256 MiB, QEMU's default). */
  maxBitmapSize: number;
}

/** Default {@link NegotiationLimits}. */
export const DEFAULT_NEGOTIATION_LIMITS: Readonly<NegotiationLimits> = Object.freeze({
  maxMsgFds: Limits.SCM_MAX_FD,
  maxDataXferSize: Limits.QEMU_MAX_DATA_XFER_SIZE,
  maxDmaMaps: Defaults.MAX_DMA_MAPS,
  maxBitmapSize: Defaults.MAX_BITMAP_SIZE,
});

/** The outcome of a `VERSION` exchange: what this side may do on the connection. */
export interface Negotiated {
  /** Agreed major version (always 0). */
  major: number;
  /** Agreed minor version (server answers `min(client, own)`). */
  minor: number;
  /** Most fds we may attach to one message we send (the peer's `max_msg_fds`, lowered). */
  maxSendFds: number;
  /** Most fds we accept per received message (our own `max_msg_fds`). */
  maxRecvFds: number;
  /**
   * Largest `count`/`size` of any data transfer in either direction: min of both announcements and
   * our ceiling (reference 1.12 recommendation, 8.22).
   */
  maxDataXferSize: number;
  /** Most simultaneous DMA mappings (the server's announcement, lowered). */
  maxDmaMaps: number;
  /** DMA page sizes (the server's announcement). */
  pgsizes: bigint;
  /** `REGION_WRITE_MULTI` may be used (the server announced it and the client wants it). */
  writeMultiple: boolean;
  /** Server-to-client commands use a twin socket (reference 1.9). */
  twinSocket: boolean;
  /** Index of the twin socket's fd among the `VERSION` reply's fds, when `twinSocket`. */
  twinSocketFdIndex: number | undefined;
  /** Legacy dirty-bitmap page size: the smaller of both announcements, if any side sent one. */
  migrationPgsize: number | undefined;
  /** Largest legacy dirty bitmap (QEMU's `max_bitmap_size`, lowered). */
  maxBitmapSize: number;
}

/** Everything a negotiation rule sees. */
export interface NegotiationContext {
  readonly role: 'client' | 'server';
  readonly local: VersionInfo;
  readonly peer: VersionInfo;
  readonly limits: NegotiationLimits;
  /** Number of fds that came with the peer's `VERSION` message (client role), if known. */
  readonly peerFds: number | undefined;
  readonly out: Negotiated;
}

/** One negotiation rule: checks the peer's announcement and lowers `out`'s limit. */
export interface NegotiationRule {
  readonly name: string;
  readonly check: (ctx: NegotiationContext) => void;
}

function refuse(name: string, problem: string): never {
  throw new ProtocolError(`VERSION: ${name} ${problem}`, { field: `capabilities.${name}` });
}

/** Server-announced capabilities: the server's value is the one that applies. */
const serverSide = (ctx: NegotiationContext): Capabilities =>
  ctx.role === 'server' ? ctx.local.capabilities : ctx.peer.capabilities;

/**
 * The negotiation rules (reference 1.12, 3.1; QEMU's `caps_parse` validators):
 *
 * - `max_msg_fds`: we send at most min(peer's value, our ceiling);
 * - `max_data_xfer_size`: must be >= 1; effective = min(ours, peer's, ceiling);
 * - `max_dma_maps`: the server's value, lowered to the ceiling;
 * - `pgsizes`: the server's value; must be non-zero and a multiple of 4096 (no page below 4 KiB);
 * - `write_multiple`: the server's value (a client uses it only if it announced or defaulted it);
 * - `twin_socket`: server role: enabled iff we and the client support it and the client accepts
 *   fds; client role: the server may only enable it if we offered it, and must name an `fd_index`
 *   (within the received fds, when their number is known), else the client must close;
 * - `migration`: `pgsize` a non-zero multiple of 4096, the smaller one wins; `max_bitmap_size`
 *   may only lower the default.
 */
export const NEGOTIATION_RULES: readonly NegotiationRule[] = [
  {
    name: 'max_msg_fds',
    check: (ctx) => {
      ctx.out.maxSendFds = Math.min(ctx.peer.capabilities.maxMsgFds, ctx.limits.maxMsgFds);
      ctx.out.maxRecvFds = ctx.local.capabilities.maxMsgFds;
    },
  },
  {
    name: 'max_data_xfer_size',
    check: (ctx) => {
      const peer = ctx.peer.capabilities.maxDataXferSize;
      if (peer < 1) refuse('max_data_xfer_size', 'must be at least 1');
      ctx.out.maxDataXferSize = Math.min(ctx.local.capabilities.maxDataXferSize, peer, ctx.limits.maxDataXferSize);
    },
  },
  {
    name: 'max_dma_maps',
    check: (ctx) => {
      ctx.out.maxDmaMaps = Math.min(serverSide(ctx).maxDmaMaps, ctx.limits.maxDmaMaps);
    },
  },
  {
    name: 'pgsizes',
    check: (ctx) => {
      const p = serverSide(ctx).pgsizes;
      if (p === 0n || (p & BigInt(Limits.MIN_PGSIZE - 1)) !== 0n) {
        refuse('pgsizes', `0x${p.toString(16)} must be non-zero with no page size below ${String(Limits.MIN_PGSIZE)}`);
      }
      ctx.out.pgsizes = p;
    },
  },
  {
    name: 'write_multiple',
    check: (ctx) => {
      ctx.out.writeMultiple = serverSide(ctx).writeMultiple;
    },
  },
  {
    name: 'twin_socket',
    check: (ctx) => {
      const mine = ctx.local.capabilities.twinSocket;
      const theirs = ctx.peer.capabilities.twinSocket;
      if (ctx.role === 'server') {
        ctx.out.twinSocket = mine.supported && theirs.supported && ctx.peer.capabilities.maxMsgFds > 0;
        ctx.out.twinSocketFdIndex = ctx.out.twinSocket ? (mine.fdIndex ?? 0) : undefined;
        return;
      }
      if (!theirs.supported) return;
      if (!mine.supported) refuse('twin_socket', 'enabled by the server although the client did not offer it');
      const i = theirs.fdIndex;
      if (i === undefined) refuse('twin_socket', 'is supported but names no fd_index');
      if (ctx.peerFds !== undefined && i >= ctx.peerFds) {
        refuse('twin_socket', `fd_index ${String(i)} but the reply carried ${String(ctx.peerFds)} fds`);
      }
      ctx.out.twinSocket = true;
      ctx.out.twinSocketFdIndex = i;
    },
  },
  {
    name: 'migration',
    check: (ctx) => {
      const peer = ctx.peer.capabilities.migration;
      const mine = ctx.local.capabilities.migration;
      const pg = peer?.pgsize;
      if (pg !== undefined && (pg === 0 || pg % Limits.MIN_PGSIZE !== 0)) {
        refuse('migration', `pgsize ${String(pg)} must be a non-zero multiple of ${String(Limits.MIN_PGSIZE)}`);
      }
      const sizes = [pg, mine?.pgsize].filter((x): x is number => x !== undefined);
      ctx.out.migrationPgsize = sizes.length === 0 ? undefined : Math.min(...sizes);
      ctx.out.maxBitmapSize = Math.min(
        peer?.maxBitmapSize ?? Defaults.MAX_BITMAP_SIZE,
        mine?.maxBitmapSize ?? Defaults.MAX_BITMAP_SIZE,
        ctx.limits.maxBitmapSize,
      );
    },
  },
];

/** Options of {@link negotiate}. */
export interface NegotiateOptions {
  /** Which side we are. */
  role: 'client' | 'server';
  /** Client: what we proposed. Server: the highest version we speak (default 0.2) and our capabilities. */
  local: VersionInfo;
  /** Client: the server's reply. Server: the client's proposal. */
  peer: VersionInfo;
  /** Our ceilings (default {@link DEFAULT_NEGOTIATION_LIMITS}). */
  limits?: Partial<NegotiationLimits>;
  /** Client role: number of fds received with the `VERSION` reply (checks `twin_socket.fd_index`). */
  peerFds?: number;
}

/**
 * Negotiates version and limits (reference 3.1):
 *
 * - the majors must be equal (server: the client proposed a major we do not speak; client: the
 *   server changed it);
 * - client role: the reply's minor must not exceed the proposed one; server role: the agreed minor
 *   is `min(client, ours)`;
 * - then every rule of {@link NEGOTIATION_RULES}.
 *
 * @throws {ProtocolError} (`EINVAL`): the connection must be closed (after an error reply, for a
 * server).
 */
export function negotiate(options: NegotiateOptions): Negotiated {
  const { role, local, peer } = options;
  if (peer.major !== local.major) {
    throw new ProtocolError(`VERSION: major ${String(peer.major)} is not ${String(local.major)}`, { field: 'major' });
  }
  if (role === 'client' && peer.minor > local.minor) {
    throw new ProtocolError(`VERSION: reply minor ${String(peer.minor)} is newer than the proposed ${String(local.minor)}`, { field: 'minor' });
  }
  const out: Negotiated = {
    major: local.major,
    minor: Math.min(local.minor, peer.minor),
    maxSendFds: Defaults.MAX_MSG_FDS,
    maxRecvFds: Defaults.MAX_MSG_FDS,
    maxDataXferSize: Defaults.MAX_DATA_XFER_SIZE,
    maxDmaMaps: Defaults.MAX_DMA_MAPS,
    pgsizes: BigInt(Defaults.PGSIZES),
    writeMultiple: false,
    twinSocket: false,
    twinSocketFdIndex: undefined,
    migrationPgsize: undefined,
    maxBitmapSize: Defaults.MAX_BITMAP_SIZE,
  };
  const ctx: NegotiationContext = {
    role,
    local,
    peer,
    limits: { ...DEFAULT_NEGOTIATION_LIMITS, ...options.limits },
    peerFds: options.peerFds,
    out,
  };
  for (const rule of NEGOTIATION_RULES) rule.check(ctx);
  return out;
}

/**
 * The capabilities a server puts in its `VERSION` reply: its own announcement `own`, with
 * `twin_socket` present only when the negotiation enabled it (then `{ supported: true, fd_index }`):
 * it is never offered unasked (reference 1.9, 3.1 step 5). Keep the encoded reply no longer than
 * the request (compare `versionPayloadSize` with the request's payload length, 3.1 step 6).
 */
export function serverReplyCapabilities(own: CapabilitiesInput, negotiated: Pick<Negotiated, 'twinSocket' | 'twinSocketFdIndex'>): CapabilitiesInput {
  const out: CapabilitiesInput = { ...own };
  delete out.twinSocket;
  if (negotiated.twinSocket) out.twinSocket = { supported: true, fdIndex: negotiated.twinSocketFdIndex ?? 0 };
  return out;
}

/** The version this implementation speaks, for {@link VersionInfo.major}/`minor`. */
export const LOCAL_VERSION = Object.freeze({ major: ProtocolVersion.MAJOR, minor: ProtocolVersion.MINOR });
