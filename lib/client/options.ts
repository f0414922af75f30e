/** What a caller may choose for a client (checked, with defaults), and QEMU's fixed ceilings on a server. */
import { Limits, ProtocolVersion } from '../protocol/constants';

/** QEMU's defences against a hostile server (reference §1.12, §6.9; hw/vfio-user). */
export const ClientLimits = {
  /** Most region indexes accepted in DEVICE_GET_INFO (QEMU: VFIO_USER_MAX_REGIONS). */
  MAX_REGIONS: 100,
  /** Most IRQ indexes accepted in DEVICE_GET_INFO (QEMU: VFIO_USER_MAX_IRQS). */
  MAX_IRQS: 50,
  /** Largest server `max_msg_fds` accepted. */
  MAX_SERVER_MSG_FDS: Limits.QEMU_MAX_MSG_FDS,
  /** Largest server `max_data_xfer_size` accepted (64 MiB). */
  MAX_SERVER_DATA_XFER_SIZE: Limits.QEMU_MAX_DATA_XFER_SIZE,
  /** Largest server `max_dma_maps` accepted. */
  MAX_SERVER_DMA_MAPS: 65535,
  /** Largest region-info `argsz` we ask for (libvfio-user refuses above 1 MiB; real chains are tiny). */
  MAX_REGION_INFO_ARGSZ: 64 * 1024,
  /** Most writes per REGION_WRITE_MULTI (QEMU: VFIO_USER_MULTI_MAX). */
  MAX_WRITE_MULTI: 200,
} as const;

/** Options of {@link VfioUserClient.connect}. */
export interface ClientOptions {
  /**
   * Version to propose. Default 0.2; `{ major: 0, minor: 0 }` proposes what QEMU does. Any reply
   * with the same major and a minor not above the proposed one is accepted.
   */
  version?: { major: number; minor: number };
  /** Most fds we accept per message, announced as `max_msg_fds` (default 16, QEMU's value). */
  maxMsgFds?: number;
  /** Largest DMA_READ/DMA_WRITE we accept, announced as `max_data_xfer_size` (default 1 MiB). */
  maxDataXferSize?: number;
  /** Reply timeout of every request in ms (default 5000, QEMU's `x-msg-timeout`). */
  timeoutMs?: number;
  /** Offer a twin socket for the server's commands (reference §1.9). Default true. */
  twinSocket?: boolean;
  /** Post writes to memory BARs (No_reply), as QEMU does unless `x-no-posted-writes`. Default true. */
  postedWrites?: boolean;
  /** Coalesce small posted writes into REGION_WRITE_MULTI while congested, if the server allows. Default true. */
  writeMultiple?: boolean;
  /** Bytes queued for the socket above which the connection counts as congested (default 64 KiB). */
  congestionThreshold?: number;
  /**
   * Largest data chunk of one REGION_WRITE (default 64 KiB, and never above the negotiated
   * `max_data_xfer_size`): libvfio-user refuses a message that does not arrive whole (§1.5).
   */
  writeChunkSize?: number;
  /** A label for debug output (`NODE_DEBUG=vfio-user:*`). */
  name?: string;
  /**
   * Survive the connection ending (a server restarted, or one keeping its device for the next
   * client): instead of releasing everything, the client emits `'disconnect'` and keeps its DMA
   * memory, eventfds and state until {@link VfioUserClient.reconnect} or
   * {@link VfioUserClient.close}. Default false: the end of the connection closes the client.
   */
  reconnect?: boolean;
}

/** Options of a write. */
export interface WriteOptions {
  /**
   * Allow posting (No_reply) when the region qualifies: a memory BAR, posted writes enabled, and
   * no region of the device mappable (reference §1.8). Default true; false always waits for the
   * reply. A posted write resolves once queued; the server's errors for it are never seen.
   */
  posted?: boolean;
}

/** Options of single requests. */
export interface CallOptions {
  /** Reply timeout in ms for this request (default: the client's). */
  timeoutMs?: number;
}

/** @internal {@link ClientOptions} with every default applied. */
export type ClientSettings = Readonly<Required<Omit<ClientOptions, 'version'>> & { version: { major: number; minor: number } }>;

const DEFAULT_XFER = 1024 * 1024;
const DEFAULT_CHUNK = 64 * 1024;
const DEFAULT_CONGESTION = 64 * 1024;

/** @throws {TypeError}/{RangeError} for an option out of its range. */
export function checkClientOptions(options: ClientOptions): void {
  checkInt(options.maxMsgFds, 'maxMsgFds', 0, Limits.SCM_MAX_FD);
  checkInt(options.maxDataXferSize, 'maxDataXferSize', 1, Limits.QEMU_MAX_DATA_XFER_SIZE);
  checkInt(options.timeoutMs, 'timeoutMs', 1, 0x7fffffff);
  checkInt(options.congestionThreshold, 'congestionThreshold', 0, Number.MAX_SAFE_INTEGER);
  checkInt(options.writeChunkSize, 'writeChunkSize', 1, Limits.QEMU_MAX_DATA_XFER_SIZE);
  if (options.version !== undefined) {
    checkInt(options.version.major, 'version.major', 0, 0xffff);
    checkInt(options.version.minor, 'version.minor', 0, 0xffff);
  }
}

/** The options (checked by {@link checkClientOptions}) with their defaults. */
export function clientSettings(options: ClientOptions): ClientSettings {
  return {
    version: options.version ?? { major: ProtocolVersion.MAJOR, minor: ProtocolVersion.MINOR },
    maxMsgFds: options.maxMsgFds ?? Limits.QEMU_MAX_MSG_FDS,
    maxDataXferSize: options.maxDataXferSize ?? DEFAULT_XFER,
    timeoutMs: options.timeoutMs ?? 5000,
    twinSocket: options.twinSocket ?? true,
    postedWrites: options.postedWrites ?? true,
    writeMultiple: options.writeMultiple ?? true,
    congestionThreshold: options.congestionThreshold ?? DEFAULT_CONGESTION,
    writeChunkSize: options.writeChunkSize ?? DEFAULT_CHUNK,
    name: options.name ?? 'vfio-user-client',
    reconnect: options.reconnect === true,
  };
}

function checkInt(value: unknown, name: string, min: number, max: number): void {
  if (value === undefined) return;
  if (typeof value !== 'number') throw new TypeError(`Expected options.${name} to be a number`);
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`Expected options.${name} to be an integer in [${String(min)}, ${String(max)}], got ${String(value)}`);
  }
}
