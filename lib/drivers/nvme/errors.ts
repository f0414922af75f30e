/**
 * Errors of the NVMe driver.
 *
 * - {@link NvmeError}: the controller completed a command with a non-zero status. It carries the
 *   decoded Status Field (SCT, SC, DNR, More, CRD), the opcode, queue and command identifier, so a
 *   caller can branch on `sct`/`sc` (or on `code`, the Linux-style name such as `LBA_RANGE`).
 * - {@link NvmeTimeoutError} (`code` 'ETIMEDOUT'): no completion within the command timeout. The
 *   command identifier stays reserved until the controller completes it or is reset.
 * - {@link NvmeAbortedError} (`code` 'ECONNRESET' or 'ECANCELED'): the queue was deleted, the
 *   controller reset, or the vfio-user connection ended while the command was outstanding.
 *
 * @packageDocumentation
 */
import { Sct } from '../../nvme/constants';

/** A decoded completion Status Field (CQE dword 3 bits 31:17, without the phase tag). */
export interface StatusField {
  /** Status Code Type (0 generic, 1 command specific, 2 media and data integrity, 3 path). */
  readonly sct: number;
  /** Status Code. */
  readonly sc: number;
  /** Do Not Retry. */
  readonly dnr: boolean;
  /** More information in the Error Information log page. */
  readonly more: boolean;
  /** Command Retry Delay index (0: none). */
  readonly crd: number;
}

/** Decodes a 15-bit Status Field (phase tag already removed). */
export function decodeStatus(status: number): StatusField {
  return {
    sct: (status >>> 8) & 0x7,
    sc: status & 0xff,
    crd: (status >>> 11) & 0x3,
    more: (status & 0x2000) !== 0,
    dnr: (status & 0x4000) !== 0,
  };
}

/** Status names by `SCT << 8 | SC`, spelled as Linux's `NVME_SC_*` without the prefix. */
const STATUS_NAMES = new Map<number, string>([
  [0x000, 'SUCCESS'],
  [0x001, 'INVALID_OPCODE'],
  [0x002, 'INVALID_FIELD'],
  [0x003, 'CMDID_CONFLICT'],
  [0x004, 'DATA_XFER_ERROR'],
  [0x005, 'POWER_LOSS'],
  [0x006, 'INTERNAL'],
  [0x007, 'ABORT_REQ'],
  [0x008, 'ABORT_QUEUE'],
  [0x009, 'FUSED_FAIL'],
  [0x00a, 'FUSED_MISSING'],
  [0x00b, 'INVALID_NS'],
  [0x00c, 'CMD_SEQ_ERROR'],
  [0x00d, 'SGL_INVALID_LAST'],
  [0x00e, 'SGL_INVALID_COUNT'],
  [0x00f, 'SGL_INVALID_DATA'],
  [0x010, 'SGL_INVALID_METADATA'],
  [0x011, 'SGL_INVALID_TYPE'],
  [0x012, 'CMB_INVALID_USE'],
  [0x013, 'PRP_INVALID_OFFSET'],
  [0x014, 'ATOMIC_WU_EXCEEDED'],
  [0x015, 'OP_DENIED'],
  [0x016, 'SGL_INVALID_OFFSET'],
  [0x018, 'HOST_ID_INCONSIST'],
  [0x019, 'KA_TIMEOUT_EXPIRED'],
  [0x01a, 'KA_TIMEOUT_INVALID'],
  [0x01b, 'ABORTED_PREEMPT_ABORT'],
  [0x01c, 'SANITIZE_FAILED'],
  [0x01d, 'SANITIZE_IN_PROGRESS'],
  [0x01e, 'SGL_INVALID_GRANULARITY'],
  [0x01f, 'CMD_NOT_SUP_CMB_QUEUE'],
  [0x020, 'NS_WRITE_PROTECTED'],
  [0x021, 'CMD_INTERRUPTED'],
  [0x022, 'TRANSIENT_TR_ERR'],
  [0x080, 'LBA_RANGE'],
  [0x081, 'CAP_EXCEEDED'],
  [0x082, 'NS_NOT_READY'],
  [0x083, 'RESERVATION_CONFLICT'],
  [0x084, 'FORMAT_IN_PROGRESS'],
  [0x100, 'CQ_INVALID'],
  [0x101, 'QID_INVALID'],
  [0x102, 'QUEUE_SIZE'],
  [0x103, 'ABORT_LIMIT'],
  [0x105, 'ASYNC_LIMIT'],
  [0x106, 'FIRMWARE_SLOT'],
  [0x107, 'FIRMWARE_IMAGE'],
  [0x108, 'INVALID_VECTOR'],
  [0x109, 'INVALID_LOG_PAGE'],
  [0x10a, 'INVALID_FORMAT'],
  [0x10b, 'FW_NEEDS_CONV_RESET'],
  [0x10c, 'INVALID_QUEUE'],
  [0x10d, 'FEATURE_NOT_SAVEABLE'],
  [0x10e, 'FEATURE_NOT_CHANGEABLE'],
  [0x10f, 'FEATURE_NOT_PER_NS'],
  [0x110, 'FW_NEEDS_SUBSYS_RESET'],
  [0x111, 'FW_NEEDS_RESET'],
  [0x112, 'FW_NEEDS_MAX_TIME'],
  [0x113, 'FW_ACTIVATE_PROHIBITED'],
  [0x114, 'OVERLAPPING_RANGE'],
  [0x115, 'NS_INSUFFICIENT_CAP'],
  [0x116, 'NS_ID_UNAVAILABLE'],
  [0x118, 'NS_ALREADY_ATTACHED'],
  [0x119, 'NS_IS_PRIVATE'],
  [0x11a, 'NS_NOT_ATTACHED'],
  [0x11b, 'THIN_PROV_NOT_SUPP'],
  [0x11c, 'CTRL_LIST_INVALID'],
  [0x11d, 'SELT_TEST_IN_PROGRESS'],
  [0x11e, 'BP_WRITE_PROHIBITED'],
  [0x11f, 'CTRL_ID_INVALID'],
  [0x120, 'SEC_CTRL_STATE_INVALID'],
  [0x121, 'CTRL_RES_NUM_INVALID'],
  [0x122, 'RES_ID_INVALID'],
  [0x123, 'PMR_SAN_PROHIBITED'],
  [0x124, 'ANA_GROUP_ID_INVALID'],
  [0x125, 'ANA_ATTACH_FAILED'],
  [0x180, 'BAD_ATTRIBUTES'],
  [0x181, 'INVALID_PI'],
  [0x182, 'READ_ONLY'],
  [0x183, 'ONCS_NOT_SUPPORTED'],
  [0x280, 'WRITE_FAULT'],
  [0x281, 'READ_ERROR'],
  [0x282, 'GUARD_CHECK'],
  [0x283, 'APPTAG_CHECK'],
  [0x284, 'REFTAG_CHECK'],
  [0x285, 'COMPARE_FAILED'],
  [0x286, 'ACCESS_DENIED'],
  [0x287, 'UNWRITTEN_BLOCK'],
  [0x300, 'INTERNAL_PATH_ERROR'],
  [0x301, 'ANA_PERSISTENT_LOSS'],
  [0x302, 'ANA_INACCESSIBLE'],
  [0x303, 'ANA_TRANSITION'],
  [0x360, 'CTRL_PATH_ERROR'],
  [0x370, 'HOST_PATH_ERROR'],
  [0x371, 'HOST_ABORTED_CMD'],
]);

const TYPE_NAMES = ['generic', 'command specific', 'media error', 'path error'];

/** The name of status `sct`/`sc` (`LBA_RANGE`, ...), or `SCT_x_SC_0xyy` for one we do not know. */
export function statusName(sct: number, sc: number): string {
  return STATUS_NAMES.get(((sct & 0x7) << 8) | (sc & 0xff)) ?? `SCT_${String(sct)}_SC_0x${sc.toString(16).padStart(2, '0')}`;
}

/** Where a failed command came from. */
export interface CommandOrigin {
  /** Queue identifier (0 = admin). */
  readonly qid: number;
  /** Command identifier. */
  readonly cid: number;
  /** Opcode. */
  readonly opcode: number;
}

/**
 * A command completed with an error status. `code` is the status name (e.g. 'LBA_RANGE',
 * 'INVALID_FIELD'); `sct`/`sc` are the raw codes; `dnr` says whether a retry can succeed.
 */
export class NvmeError extends Error {
  override readonly name = 'NvmeError';
  readonly code: string;
  readonly sct: number;
  readonly sc: number;
  readonly dnr: boolean;
  readonly more: boolean;
  readonly crd: number;
  /** The Status Field as it was in the CQE (15 bits, phase removed). */
  readonly status: number;
  readonly qid: number;
  readonly cid: number;
  readonly opcode: number;
  /** Completion dword 0 (command specific; e.g. the failing parameter of some admin commands). */
  readonly dw0: number;

  constructor(status: number, origin: CommandOrigin, dw0 = 0) {
    const f = decodeStatus(status);
    const name = statusName(f.sct, f.sc);
    const kind = TYPE_NAMES[f.sct] ?? `type ${String(f.sct)}`;
    super(
      `NVMe ${origin.qid === 0 ? 'admin' : 'I/O'} command 0x${origin.opcode.toString(16).padStart(2, '0')} ` +
        `(qid ${String(origin.qid)}, cid ${String(origin.cid)}) failed: ${name} (${kind} status, SCT ${String(f.sct)} SC 0x${f.sc.toString(16).padStart(2, '0')}${f.dnr ? ', DNR' : ''})`,
    );
    this.code = name;
    this.sct = f.sct;
    this.sc = f.sc;
    this.dnr = f.dnr;
    this.more = f.more;
    this.crd = f.crd;
    this.status = status & 0x7fff;
    this.qid = origin.qid;
    this.cid = origin.cid;
    this.opcode = origin.opcode;
    this.dw0 = dw0;
  }

  /** True for a generic-status LBA Out of Range. */
  get isLbaRange(): boolean {
    return this.sct === Sct.GENERIC && this.sc === 0x80;
  }
}

/** No completion came within the timeout; `code` is 'ETIMEDOUT'. */
export class NvmeTimeoutError extends Error {
  override readonly name = 'NvmeTimeoutError';
  readonly code = 'ETIMEDOUT';
  constructor(
    readonly qid: number,
    readonly cid: number,
    readonly opcode: number,
    timeoutMs: number,
  ) {
    super(`NVMe command 0x${opcode.toString(16).padStart(2, '0')} (qid ${String(qid)}, cid ${String(cid)}) did not complete within ${String(timeoutMs)} ms`);
  }
}

/**
 * The command will never complete: its queue was deleted or its controller reset ('ECANCELED'),
 * or the connection to the device ended ('ECONNRESET').
 */
export class NvmeAbortedError extends Error {
  override readonly name = 'NvmeAbortedError';
  constructor(
    readonly code: 'ECANCELED' | 'ECONNRESET',
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}
