/**
 * The admin command set: Identify, Create/Delete I/O Submission and Completion Queue, Get/Set
 * Features, Get Log Page, Asynchronous Event Request, Abort and Doorbell Buffer Config. The state
 * those commands own (feature values, the Error Information log, pending asynchronous events) is in
 * admin-state.ts.
 *
 * Every handler returns an NVMe status for the completion (see lib/nvme/constants.ts); a guest mistake is
 * never an exception. Handlers reach the controller only through {@link AdminContext}.
 *
 * @packageDocumentation
 */
import type { DmaSpace } from '../../server/dma';
import {
  AdminOpcode,
  Cns,
  Csi,
  FeatureId,
  FeatureSelect,
  LogId,
  NSID_ALL,
  Status,
} from '../../nvme/constants';
import { copyToGuest, copyToGuestSync, mapPrp } from './prp';
import type { CompletionQueue, QueuedRequest, SubmissionQueue } from './queues';
import { DEFERRED, type HandlerResult } from './request';
import { FwSlotLog, IDENTIFY_SIZE, IdCtrlNvm, SQE_FUSE_MASK, SQE_PSDT_MASK, SmartLog } from '../../nvme/structs';
import {
  writeFirmwareSlotLog,
  writeIdentifyController,
  writeIdentifyNamespace,
  writeIdentifyNamespaceIndependent,
  writeNamespaceDescriptors,
  writeSmartLog,
  type ControllerIdentity,
  type HealthCounters,
  type NamespaceIdentity,
} from './builders';
import { SENSORS, type AsyncEvents, type ErrorLog, type Features } from './admin-state';

/** The one namespace this controller has. */
export const NSID = 1;

/** What admin commands need from the controller. */
export interface AdminContext {
  readonly dma: DmaSpace;
  /** Memory page size (CC.MPS) in bytes. */
  readonly pageSize: number;
  /** Largest data transfer (MDTS) in bytes; Infinity when unlimited. */
  readonly maxTransfer: number;
  /** Largest queue size in entries (CAP.MQES + 1). */
  readonly maxQueueEntries: number;
  /** Highest I/O queue identifier. */
  readonly maxQueues: number;
  /** MSI-X vectors (one per completion queue). */
  readonly vectors: number;
  readonly msixEnabled: boolean;
  readonly controllerIdentity: ControllerIdentity;
  readonly namespaceIdentity: NamespaceIdentity;
  readonly features: Features;
  readonly errors: ErrorLog;
  readonly events: AsyncEvents;
  sq(qid: number): SubmissionQueue | null;
  cq(qid: number): CompletionQueue | null;
  /** True while any I/O queue exists. */
  readonly hasIoQueues: boolean;
  /** Creates a queue; returns INVALID_FIELD if its memory is unreachable. */
  createCq(qid: number, size: number, iova: number, vector: number, ien: boolean): number;
  createSq(qid: number, size: number, iova: number, cq: CompletionQueue): number;
  /** Deletes `sq` once its commands are done, then calls `done`. */
  deleteSq(sq: SubmissionQueue, done: () => void): void;
  deleteCq(cq: CompletionQueue): void;
  /** Doorbell Buffer Config with the two page addresses. */
  configureShadowDoorbells(dbs: number, eis: number): number;
  /** Current SMART counters. */
  health(): HealthCounters;
  /** The composite temperature or thresholds changed: re-evaluate the temperature warning. */
  temperatureChanged(): void;
  /** Posts the completion of a request that a handler deferred. */
  finish(req: QueuedRequest, status: number): void;
}

// ---- features ----

/** TMPSEL value for every sensor at once (Set Features, Temperature Threshold). */
const TMPSEL_ALL = 0xf;

// ---- dispatch ----

/** Runs one admin command. */
export function adminCommand(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  if ((req.flags & (SQE_FUSE_MASK | SQE_PSDT_MASK)) !== 0) return Status.INVALID_FIELD;
  switch (req.opcode) {
    case AdminOpcode.IDENTIFY:
      return identify(ctx, req);
    case AdminOpcode.CREATE_CQ:
      return createCq(ctx, req);
    case AdminOpcode.CREATE_SQ:
      return createSq(ctx, req);
    case AdminOpcode.DELETE_SQ:
      return deleteSq(ctx, req);
    case AdminOpcode.DELETE_CQ:
      return deleteCq(ctx, req);
    case AdminOpcode.GET_FEATURES:
      return getFeatures(ctx, req);
    case AdminOpcode.SET_FEATURES:
      return setFeatures(ctx, req);
    case AdminOpcode.GET_LOG_PAGE:
      return getLogPage(ctx, req);
    case AdminOpcode.ASYNC_EVENT:
      return ctx.events.submit(req);
    case AdminOpcode.ABORT:
      return abort(ctx, req);
    case AdminOpcode.DBBUF:
      return ctx.configureShadowDoorbells(req.prp1, req.prp2);
    default:
      return Status.INVALID_OPCODE;
  }
}

/** Scratch for building data structures before they go to the guest (one command at a time). */
const scratch = Buffer.alloc(IDENTIFY_SIZE);

/** Sends `length` bytes of `src` to the command's PRPs. */
function sendData(ctx: AdminContext, req: QueuedRequest, src: Buffer, length: number): HandlerResult {
  if (length > ctx.maxTransfer) return Status.INVALID_FIELD;
  const status = mapPrp(ctx.dma, req.prp1, req.prp2, length, ctx.pageSize, req.segs);
  if (status !== Status.SUCCESS) return status;
  const data = src.subarray(0, length);
  const sync = copyToGuestSync(ctx.dma, req.segs, data);
  if (sync !== null) return sync;
  // Some page is in a message-only map: copy, since the scratch may be reused meanwhile.
  return copyToGuest(ctx.dma, req.segs, Buffer.from(data));
}

function identify(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  const cns = req.cdw10 & 0xff;
  const csi = req.cdw11 >>> 24;
  const nsid = req.nsid;
  const out = scratch;
  out.fill(0);
  switch (cns) {
    case Cns.CTRL:
      writeIdentifyController(out, ctx.controllerIdentity);
      break;
    case Cns.NS:
      if (nsid !== NSID) return Status.INVALID_NS;
      writeIdentifyNamespace(out, ctx.namespaceIdentity);
      break;
    case Cns.NS_ACTIVE_LIST:
    case Cns.NS_CS_ACTIVE_LIST:
      if (cns === Cns.NS_CS_ACTIVE_LIST && csi !== Csi.NVM) return Status.INVALID_FIELD;
      if (nsid >= 0xfffffffe) return Status.INVALID_NS;
      if (nsid < NSID) out.writeUInt32LE(NSID, 0);
      break;
    case Cns.NS_DESC_LIST:
      if (nsid !== NSID) return Status.INVALID_NS;
      writeNamespaceDescriptors(out, ctx.namespaceIdentity);
      break;
    case Cns.CS_NS:
      if (nsid !== NSID) return Status.INVALID_NS;
      if (csi !== Csi.NVM) return Status.INVALID_FIELD;
      break; // the NVM command set specific namespace fields are all zero here
    case Cns.CS_CTRL:
      if (csi !== Csi.NVM) return Status.INVALID_FIELD;
      out[IdCtrlNvm.VSL] = 0;
      out[IdCtrlNvm.WZSL] = 0; // no Write Zeroes limit beyond MDTS
      out[IdCtrlNvm.DMRL] = 0; // Dataset Management: up to 256 ranges
      break;
    case Cns.NS_CS_INDEP:
      if (nsid !== NSID) return Status.INVALID_NS;
      writeIdentifyNamespaceIndependent(out, ctx.namespaceIdentity);
      break;
    default:
      return Status.INVALID_FIELD;
  }
  return sendData(ctx, req, out, IDENTIFY_SIZE);
}

// ---- queues ----

/** Common checks of Create I/O SQ/CQ; a status or SUCCESS. */
function checkQueueShape(ctx: AdminContext, req: QueuedRequest, size: number): number {
  if (size < 2 || size > ctx.maxQueueEntries) return Status.QUEUE_SIZE;
  if ((req.cdw11 & 0x1) === 0) return Status.INVALID_FIELD; // CAP.CQR: physically contiguous only
  if (req.prp1 < 0) return Status.INVALID_FIELD;
  if (req.prp1 % ctx.pageSize !== 0) return Status.PRP_INVALID_OFFSET;
  return Status.SUCCESS;
}

function createCq(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  const qid = req.cdw10 & 0xffff;
  const size = (req.cdw10 >>> 16) + 1;
  const ien = (req.cdw11 & 0x2) !== 0;
  const vector = req.cdw11 >>> 16;
  if (qid === 0 || qid > ctx.maxQueues || ctx.cq(qid) !== null) return Status.QID_INVALID;
  const shape = checkQueueShape(ctx, req, size);
  if (shape !== Status.SUCCESS) return shape;
  if (vector >= ctx.vectors || (!ctx.msixEnabled && vector !== 0)) return Status.INVALID_VECTOR;
  return ctx.createCq(qid, size, req.prp1, vector, ien);
}

function createSq(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  const qid = req.cdw10 & 0xffff;
  const size = (req.cdw10 >>> 16) + 1;
  const cqid = req.cdw11 >>> 16;
  if (qid === 0 || qid > ctx.maxQueues || ctx.sq(qid) !== null) return Status.QID_INVALID;
  const cq = cqid === 0 || cqid > ctx.maxQueues ? null : ctx.cq(cqid);
  if (cq === null) return Status.CQ_INVALID;
  const shape = checkQueueShape(ctx, req, size);
  if (shape !== Status.SUCCESS) return shape;
  return ctx.createSq(qid, size, req.prp1, cq);
}

function deleteSq(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  const qid = req.cdw10 & 0xffff;
  const sq = qid === 0 ? null : ctx.sq(qid);
  if (sq === null) return Status.QID_INVALID;
  ctx.deleteSq(sq, () => ctx.finish(req, Status.SUCCESS));
  return DEFERRED;
}

function deleteCq(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  const qid = req.cdw10 & 0xffff;
  const cq = qid === 0 ? null : ctx.cq(qid);
  if (cq === null) return Status.QID_INVALID;
  if (cq.sqCount > 0) return Status.INVALID_QUEUE_DELETION;
  ctx.deleteCq(cq);
  return Status.SUCCESS;
}

function abort(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  const sqid = req.cdw10 & 0xffff;
  const cid = req.cdw10 >>> 16;
  // Only requests that have not started can be aborted: outstanding AERs. Anything else is
  // already being executed and completes normally (dword 0 bit 0: not aborted).
  req.dw0 = sqid === 0 && ctx.events.abort(cid) ? 0 : 1;
  return Status.SUCCESS;
}

// ---- features ----

/** Features this controller implements. */
const SUPPORTED_FEATURES = new Set<number>([
  FeatureId.ARBITRATION,
  FeatureId.POWER_MGMT,
  FeatureId.TEMP_THRESH,
  FeatureId.ERR_RECOVERY,
  FeatureId.VOLATILE_WC,
  FeatureId.NUM_QUEUES,
  FeatureId.IRQ_COALESCE,
  FeatureId.IRQ_CONFIG,
  FeatureId.WRITE_ATOMIC,
  FeatureId.ASYNC_EVENT,
]);

/** Current (or, with `defaults`, default) value of feature `fid`, or a status if it cannot be read. */
function featureValue(ctx: AdminContext, fid: number, cdw11: number, f: Features): number | { status: number } {
  switch (fid) {
    case FeatureId.ARBITRATION:
      return f.arbitration;
    case FeatureId.POWER_MGMT:
      return f.powerState;
    case FeatureId.TEMP_THRESH: {
      const tmpsel = (cdw11 >>> 16) & 0xf;
      const thsel = (cdw11 >>> 20) & 0x3;
      if (tmpsel >= SENSORS || thsel > 1) return { status: Status.INVALID_FIELD };
      const value = thsel === 0 ? f.tempOver[tmpsel]! : f.tempUnder[tmpsel]!;
      return value | (tmpsel << 16) | (thsel << 20);
    }
    case FeatureId.ERR_RECOVERY:
      return f.errorRecovery;
    case FeatureId.VOLATILE_WC:
      return f.writeCache ? 1 : 0;
    case FeatureId.NUM_QUEUES: {
      const n = ctx.maxQueues - 1;
      return (n | (n << 16)) >>> 0;
    }
    case FeatureId.IRQ_COALESCE:
      return f.coalescing;
    case FeatureId.IRQ_CONFIG: {
      const iv = cdw11 & 0xffff;
      if (iv >= ctx.vectors) return { status: Status.INVALID_FIELD };
      return iv | (f.coalescingDisabled[iv]! << 16);
    }
    case FeatureId.WRITE_ATOMIC:
      return f.writeAtomicity;
    case FeatureId.ASYNC_EVENT:
      return f.asyncEventConfig;
    default:
      return { status: Status.INVALID_FIELD };
  }
}

function getFeatures(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  const fid = req.cdw10 & 0xff;
  const sel = (req.cdw10 >>> 8) & 0x7;
  if (!SUPPORTED_FEATURES.has(fid)) return Status.INVALID_FIELD;
  if (sel === FeatureSelect.SUPPORTED) {
    // Not saveable (bit 0); Error Recovery is namespace specific (bit 1); all changeable (bit 2).
    req.dw0 = (fid === FeatureId.ERR_RECOVERY ? 0x2 : 0) | 0x4;
    return Status.SUCCESS;
  }
  if (sel > FeatureSelect.SUPPORTED) return Status.INVALID_FIELD;
  // Default and saved values are the same: nothing is saveable.
  const f = sel === FeatureSelect.CURRENT ? ctx.features : ctx.features.defaults;
  const v = featureValue(ctx, fid, req.cdw11, f);
  if (typeof v !== 'number') return v.status;
  req.dw0 = v >>> 0;
  return Status.SUCCESS;
}

function setFeatures(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  const fid = req.cdw10 & 0xff;
  const save = (req.cdw10 >>> 31) !== 0;
  const v = req.cdw11;
  const f = ctx.features;
  if (!SUPPORTED_FEATURES.has(fid)) return Status.INVALID_FIELD;
  if (save) return Status.FEATURE_NOT_SAVEABLE;
  switch (fid) {
    case FeatureId.ARBITRATION:
      f.arbitration = v >>> 0;
      break;
    case FeatureId.POWER_MGMT:
      if ((v & 0x1f) !== 0) return Status.INVALID_FIELD; // only PS0 exists (NPSS = 0)
      f.powerState = v & 0xff;
      break;
    case FeatureId.TEMP_THRESH: {
      const tmpth = v & 0xffff;
      const tmpsel = (v >>> 16) & 0xf;
      const thsel = (v >>> 20) & 0x3;
      if ((tmpsel >= SENSORS && tmpsel !== TMPSEL_ALL) || thsel > 1) return Status.INVALID_FIELD;
      const table = thsel === 0 ? f.tempOver : f.tempUnder;
      if (tmpsel === TMPSEL_ALL) table.fill(tmpth);
      else table[tmpsel] = tmpth;
      ctx.temperatureChanged();
      break;
    }
    case FeatureId.ERR_RECOVERY:
      if ((v & 0x10000) !== 0) return Status.INVALID_FIELD; // DULBE needs NSFEAT.DAE
      f.errorRecovery = v & 0xffff;
      break;
    case FeatureId.VOLATILE_WC:
      f.writeCache = (v & 0x1) !== 0;
      break;
    case FeatureId.NUM_QUEUES: {
      const nsqr = v & 0xffff;
      const ncqr = v >>> 16;
      if (nsqr === 0xffff || ncqr === 0xffff) return Status.INVALID_FIELD;
      if (ctx.hasIoQueues) return Status.CMD_SEQ_ERROR;
      const n = ctx.maxQueues - 1;
      req.dw0 = (n | (n << 16)) >>> 0;
      break;
    }
    case FeatureId.IRQ_COALESCE:
      f.coalescing = v & 0xffff;
      break;
    case FeatureId.IRQ_CONFIG: {
      const iv = v & 0xffff;
      if (iv >= ctx.vectors) return Status.INVALID_FIELD;
      f.coalescingDisabled[iv] = (v >>> 16) & 0x1;
      break;
    }
    case FeatureId.WRITE_ATOMIC:
      f.writeAtomicity = v & 0x1;
      break;
    case FeatureId.ASYNC_EVENT:
      // Critical warnings only; this controller sends no notices (OAES = 0).
      f.asyncEventConfig = v & 0xff;
      ctx.temperatureChanged();
      break;
  }
  return Status.SUCCESS;
}

// ---- log pages ----

/** Log pages larger than the scratch buffer are built here. */
let logBuffer = Buffer.alloc(IDENTIFY_SIZE);

function getLogPage(ctx: AdminContext, req: QueuedRequest): HandlerResult {
  const lid = req.cdw10 & 0xff;
  const rae = (req.cdw10 & 0x8000) !== 0;
  const numd = ((((req.cdw11 & 0xffff) << 16) | (req.cdw10 >>> 16)) >>> 0) + 1;
  const length = numd * 4;
  const offset = req.cdw12 + req.cdw13 * 0x1_0000_0000;
  if (offset % 4 !== 0) return Status.INVALID_FIELD;
  if (length > ctx.maxTransfer) return Status.INVALID_FIELD;
  let size: number;
  switch (lid) {
    case LogId.ERROR:
      size = ctx.errors.size;
      break;
    case LogId.SMART:
      if (req.nsid !== 0 && req.nsid !== NSID_ALL) return Status.INVALID_FIELD; // no per-namespace SMART (LPA bit 0)
      size = SmartLog.SIZE;
      break;
    case LogId.FW_SLOT:
      size = FwSlotLog.SIZE;
      break;
    default:
      return Status.INVALID_LOG_PAGE;
  }
  if (offset >= size) return Status.INVALID_FIELD;
  const total = Math.max(size, offset + length);
  if (logBuffer.length < total) logBuffer = Buffer.alloc(Math.max(total, logBuffer.length * 2));
  const buf = logBuffer;
  buf.fill(0, 0, total);
  if (lid === LogId.ERROR) ctx.errors.write(buf);
  else if (lid === LogId.SMART) writeSmartLog(buf, ctx.health());
  else writeFirmwareSlotLog(buf, ctx.controllerIdentity.firmware);
  const status = sendData(ctx, req, buf.subarray(offset, offset + length), length);
  if (!rae) ctx.events.logRead(lid);
  return status;
}
