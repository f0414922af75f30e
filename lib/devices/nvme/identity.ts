/**
 * What an `NvmeController` is made of before it runs: its options, checked and completed with
 * defaults, and what it says about itself in Identify Controller and Identify Namespace (names,
 * limits, capacity, and namespace IDs derived from the serial number).
 *
 * @packageDocumentation
 */
import { createHash, randomBytes } from 'node:crypto';
import type { BlockBackend } from '../../block/backend';
import type { PollPolicy } from '../../pci/poller';
import { VendorId } from '../../pci/ids';
import { Dlfeat, Oacs, Oncs, VWC_FLUSH_BROADCAST, VWC_PRESENT } from '../../nvme/structs';
import type { ControllerIdentity, NamespaceIdentity } from './builders';
import { DOORBELL_MODES, type DoorbellMode } from './doorbells';
import { NVME_VERSION } from './registers';

/** Options of {@link NvmeController}. */
export interface NvmeControllerOptions {
  /** The namespace's storage; the controller owns it from now on and closes it in {@link NvmeController.close}. */
  backend: BlockBackend;
  /** I/O queue pairs, 1..64 (default 16). MSI-X vectors = queues + 1. */
  queues?: number;
  /** Logical block size (default 512). */
  blockSize?: 512 | 4096;
  /** Serial number, up to 20 ASCII characters (default: random). Namespace IDs derive from it. */
  serial?: string;
  /** Model number, up to 40 ASCII characters. */
  model?: string;
  /** Firmware revision, up to 8 ASCII characters. */
  firmware?: string;
  /** How doorbell writes reach the controller (default `'trap'`; see doorbells.ts). */
  doorbells?: DoorbellMode;
  /** Maximum Data Transfer Size: 2^mdts * 4 KiB; 0 = no limit. Default 7 (512 KiB). */
  mdts?: number;
  /** Largest I/O queue, in entries (CAP.MQES + 1), 2..65536; default 1024. */
  maxQueueEntries?: number;
  /** Polling policy for mmap'd and shadow doorbells. */
  poll?: Partial<PollPolicy>;
  /** PCI vendor and device ID (default 0x4e58:0x0001, Nutanix's vfio-user NVMe ID). */
  vendorId?: number;
  deviceId?: number;
  /** Receives one line per notable event (controller state, admin commands, errors). */
  trace?: (line: string) => void;
}

const MAX_QUEUES = 64;
const DEFAULT_QUEUES = 16;
const DEFAULT_MDTS = 7;
const DEFAULT_QUEUE_ENTRIES = 1024;
/** Kelvin: composite temperature reported, warning and critical thresholds. */
export const TEMPERATURE = 313;
export const WCTEMP = 343;
const CCTEMP = 373;
/** Asynchronous Event Request Limit and Error Log Page Entries, 0's based. */
export const AERL = 3;
export const ELPE = 63;

/** The options, checked, with their defaults filled in. */
export interface ControllerShape {
  /** I/O queue pairs. */
  queues: number;
  blockSize: 512 | 4096;
  /** log2 of the block size. */
  blockShift: number;
  /** Namespace size in blocks. */
  blocks: number;
  mdts: number;
  /** Largest queue, in entries. */
  maxQueueEntries: number;
  doorbells: DoorbellMode;
  vendorId: number;
  /** MSI-X vectors: one per completion queue (admin included). */
  vectors: number;
}

/** Checks `options` (a RangeError names the first bad one) and fills in the defaults. */
export function controllerShape(options: NvmeControllerOptions): ControllerShape {
  const queues = options.queues ?? DEFAULT_QUEUES;
  if (!Number.isInteger(queues) || queues < 1 || queues > MAX_QUEUES) throw new RangeError(`Expected queues from 1 to ${MAX_QUEUES}, got ${queues}`);
  const blockSize = options.blockSize ?? 512;
  if (blockSize !== 512 && blockSize !== 4096) throw new RangeError(`Expected blockSize 512 or 4096, got ${String(blockSize)}`);
  const mdts = options.mdts ?? DEFAULT_MDTS;
  if (!Number.isInteger(mdts) || mdts < 0 || mdts > 16) throw new RangeError(`Expected mdts from 0 to 16, got ${mdts}`);
  const entries = options.maxQueueEntries ?? DEFAULT_QUEUE_ENTRIES;
  if (!Number.isInteger(entries) || entries < 2 || entries > 65536) throw new RangeError(`Expected maxQueueEntries from 2 to 65536, got ${entries}`);
  const blocks = Math.floor(options.backend.size / blockSize);
  if (blocks < 1) throw new RangeError(`The backend (${options.backend.size} bytes) holds no ${blockSize}-byte block`);
  const mode = options.doorbells ?? 'trap';
  if (!DOORBELL_MODES.includes(mode)) throw new RangeError(`Expected doorbells 'trap', 'mmap' or 'ioeventfd', got ${String(mode)}`);
  return {
    queues,
    blockSize,
    blockShift: blockSize === 512 ? 9 : 12,
    blocks,
    mdts,
    maxQueueEntries: entries,
    doorbells: mode,
    vendorId: options.vendorId ?? VendorId.NUTANIX,
    vectors: queues + 1,
  };
}

/** What Identify Controller and Identify Namespace say about a controller of this shape. */
export function identities(options: NvmeControllerOptions, shape: ControllerShape): { controller: ControllerIdentity; namespace: NamespaceIdentity } {
  const serial = options.serial ?? `VU${randomBytes(6).toString('hex').toUpperCase()}`;
  const model = options.model ?? 'vfio-user NVMe controller';
  const firmware = options.firmware ?? '0.1.0';
  const ids = deriveIds(serial, model);
  const controller: ControllerIdentity = {
    vendorId: shape.vendorId,
    subsystemVendorId: shape.vendorId,
    serial,
    model,
    firmware,
    mdts: shape.mdts,
    cntlid: 1,
    aerl: AERL,
    acl: 3,
    elpe: ELPE,
    wctemp: WCTEMP,
    cctemp: CCTEMP,
    capacity: shape.blocks * shape.blockSize,
    subnqn: `nqn.2014-08.org.nvmexpress:uuid:${ids.uuidText}`,
    oncs: Oncs.COMPARE | Oncs.DSM | Oncs.WRITE_ZEROES,
    oacs: Oacs.DBBUF,
    vwc: VWC_PRESENT | VWC_FLUSH_BROADCAST,
    version: NVME_VERSION,
  };
  const zeroes = options.backend.discardZeroes === true;
  const namespace: NamespaceIdentity = {
    blocks: shape.blocks,
    lbads: shape.blockShift,
    dlfeat: zeroes ? Dlfeat.READ_ZEROES | Dlfeat.WZ_DEAC : Dlfeat.NOT_REPORTED,
    nguid: ids.nguid,
    eui64: ids.eui64,
    uuid: ids.uuid,
    npwg: Math.max(1, 4096 >> shape.blockShift),
    writeProtected: options.backend.readOnly === true,
  };
  return { controller, namespace };
}

/** Namespace IDs and the subsystem UUID, derived from serial and model (stable, unique per serial). */
function deriveIds(serial: string, model: string): { nguid: Buffer; eui64: Buffer; uuid: Buffer; uuidText: string } {
  const h = createHash('sha256').update(`vfio-user nvme\0${serial}\0${model}`).digest();
  const nguid = Buffer.from(h.subarray(0, 16));
  const eui64 = Buffer.from(h.subarray(16, 24));
  eui64[0] = (eui64[0]! & 0xfc) | 0x02; // locally administered, unicast
  const uuid = Buffer.from(createHash('sha256').update(`vfio-user nvme uuid\0${serial}\0${model}`).digest().subarray(0, 16));
  uuid[6] = (uuid[6]! & 0x0f) | 0x80; // version 8 (custom)
  uuid[8] = (uuid[8]! & 0x3f) | 0x80; // RFC 4122 variant
  const x = uuid.toString('hex');
  const uuidText = `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
  return { nguid, eui64, uuid, uuidText };
}
