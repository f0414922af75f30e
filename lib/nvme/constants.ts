/**
 * NVMe command opcodes, completion status values, feature identifiers, log page identifiers and
 * Identify CNS values (NVM Express Base Specification 1.4 and NVM Command Set; names as in Linux's
 * `include/linux/nvme.h` so they can be grepped across implementations).
 *
 * A status here is the 15-bit Status Field of a completion queue entry without the phase tag:
 * bits 7:0 Status Code (SC), 10:8 Status Code Type (SCT), 12:11 Command Retry Delay, 13 More,
 * 14 Do Not Retry (DNR). The CQE's dword 3 carries it shifted left by one, above the phase bit.
 *
 * @packageDocumentation
 */

/** Admin command opcodes (`nvme_admin_*`). */
export const AdminOpcode = {
  DELETE_SQ: 0x00,
  CREATE_SQ: 0x01,
  GET_LOG_PAGE: 0x02,
  DELETE_CQ: 0x04,
  CREATE_CQ: 0x05,
  IDENTIFY: 0x06,
  ABORT: 0x08,
  SET_FEATURES: 0x09,
  GET_FEATURES: 0x0a,
  ASYNC_EVENT: 0x0c,
  NS_MGMT: 0x0d,
  ACTIVATE_FW: 0x10,
  DOWNLOAD_FW: 0x11,
  DEV_SELF_TEST: 0x14,
  NS_ATTACH: 0x15,
  KEEP_ALIVE: 0x18,
  DIRECTIVE_SEND: 0x19,
  DIRECTIVE_RECV: 0x1a,
  VIRTUAL_MGMT: 0x1c,
  NVME_MI_SEND: 0x1d,
  NVME_MI_RECV: 0x1e,
  DBBUF: 0x7c,
  FORMAT_NVM: 0x80,
  SECURITY_SEND: 0x81,
  SECURITY_RECV: 0x82,
  SANITIZE: 0x84,
  GET_LBA_STATUS: 0x86,
} as const;

/** NVM command set I/O opcodes (`nvme_cmd_*`). */
export const IoOpcode = {
  FLUSH: 0x00,
  WRITE: 0x01,
  READ: 0x02,
  WRITE_UNCOR: 0x04,
  COMPARE: 0x05,
  WRITE_ZEROES: 0x08,
  DSM: 0x09,
  VERIFY: 0x0c,
  RESV_REGISTER: 0x0d,
  RESV_REPORT: 0x0e,
  RESV_ACQUIRE: 0x11,
  RESV_RELEASE: 0x15,
} as const;

/** Status Code Types. */
export const Sct = {
  GENERIC: 0x0,
  COMMAND_SPECIFIC: 0x1,
  MEDIA: 0x2,
  PATH: 0x3,
} as const;

/** Do Not Retry: the same command would fail again. */
export const DNR = 0x4000;
/** More: more status information in the Error Information log page. */
export const MORE = 0x2000;

/** Builds a status from its type and code. */
export function status(sct: number, sc: number, dnr = true): number {
  return ((sct & 0x7) << 8) | (sc & 0xff) | (dnr ? DNR : 0);
}

/** Status without DNR, More and CRD: just SCT and SC. */
export function statusCode(s: number): number {
  return s & 0x7ff;
}

/** Completion statuses this controller returns (`NVME_SC_*`), DNR included where the spec means it. */
export const Status = {
  SUCCESS: 0x0000,
  // Generic command status (SCT 0)
  INVALID_OPCODE: status(Sct.GENERIC, 0x01),
  INVALID_FIELD: status(Sct.GENERIC, 0x02),
  CMDID_CONFLICT: status(Sct.GENERIC, 0x03),
  DATA_XFER_ERROR: status(Sct.GENERIC, 0x04),
  POWER_LOSS: status(Sct.GENERIC, 0x05, false),
  INTERNAL: status(Sct.GENERIC, 0x06),
  ABORT_REQ: status(Sct.GENERIC, 0x07, false),
  ABORT_QUEUE: status(Sct.GENERIC, 0x08, false),
  FUSED_FAIL: status(Sct.GENERIC, 0x09),
  FUSED_MISSING: status(Sct.GENERIC, 0x0a),
  INVALID_NS: status(Sct.GENERIC, 0x0b),
  CMD_SEQ_ERROR: status(Sct.GENERIC, 0x0c),
  SGL_INVALID_TYPE: status(Sct.GENERIC, 0x11),
  PRP_INVALID_OFFSET: status(Sct.GENERIC, 0x13),
  /** Namespace is Write Protected: a write to a read-only namespace (NSATTR bit 0). */
  NS_WRITE_PROTECTED: status(Sct.GENERIC, 0x20),
  // NVM command set generic statuses (SCT 0, 0x80..)
  LBA_RANGE: status(Sct.GENERIC, 0x80),
  CAP_EXCEEDED: status(Sct.GENERIC, 0x81),
  NS_NOT_READY: status(Sct.GENERIC, 0x82, false),
  // Command specific status (SCT 1)
  CQ_INVALID: status(Sct.COMMAND_SPECIFIC, 0x00),
  QID_INVALID: status(Sct.COMMAND_SPECIFIC, 0x01),
  QUEUE_SIZE: status(Sct.COMMAND_SPECIFIC, 0x02),
  ABORT_LIMIT: status(Sct.COMMAND_SPECIFIC, 0x03),
  ASYNC_LIMIT: status(Sct.COMMAND_SPECIFIC, 0x05),
  FIRMWARE_SLOT: status(Sct.COMMAND_SPECIFIC, 0x06),
  INVALID_VECTOR: status(Sct.COMMAND_SPECIFIC, 0x08),
  INVALID_LOG_PAGE: status(Sct.COMMAND_SPECIFIC, 0x09),
  INVALID_FORMAT: status(Sct.COMMAND_SPECIFIC, 0x0a),
  INVALID_QUEUE_DELETION: status(Sct.COMMAND_SPECIFIC, 0x0c),
  FEATURE_NOT_SAVEABLE: status(Sct.COMMAND_SPECIFIC, 0x0d),
  FEATURE_NOT_CHANGEABLE: status(Sct.COMMAND_SPECIFIC, 0x0e),
  // Media and data integrity errors (SCT 2)
  WRITE_FAULT: status(Sct.MEDIA, 0x80),
  READ_ERROR: status(Sct.MEDIA, 0x81),
  COMPARE_FAILED: status(Sct.MEDIA, 0x85),
  ACCESS_DENIED: status(Sct.MEDIA, 0x86),
} as const;

/** Feature identifiers (`NVME_FEAT_*`). */
export const FeatureId = {
  ARBITRATION: 0x01,
  POWER_MGMT: 0x02,
  LBA_RANGE: 0x03,
  TEMP_THRESH: 0x04,
  ERR_RECOVERY: 0x05,
  VOLATILE_WC: 0x06,
  NUM_QUEUES: 0x07,
  IRQ_COALESCE: 0x08,
  IRQ_CONFIG: 0x09,
  WRITE_ATOMIC: 0x0a,
  ASYNC_EVENT: 0x0b,
  AUTO_PST: 0x0c,
  HOST_MEM_BUF: 0x0d,
  TIMESTAMP: 0x0e,
  KATO: 0x0f,
  HOST_BEHAVIOR: 0x16,
  SW_PROGRESS: 0x80,
  HOST_ID: 0x81,
} as const;

/** Get Features SEL values (CDW10 bits 10:8). */
export const FeatureSelect = {
  CURRENT: 0,
  DEFAULT: 1,
  SAVED: 2,
  SUPPORTED: 3,
} as const;

/** Log page identifiers (`NVME_LOG_*`). */
export const LogId = {
  ERROR: 0x01,
  SMART: 0x02,
  FW_SLOT: 0x03,
  CHANGED_NS: 0x04,
  CMD_EFFECTS: 0x05,
} as const;

/** Identify CNS values (`NVME_ID_CNS_*`). */
export const Cns = {
  /** Identify Namespace for the NSID. */
  NS: 0x00,
  /** Identify Controller. */
  CTRL: 0x01,
  /** Active Namespace ID list. */
  NS_ACTIVE_LIST: 0x02,
  /** Namespace Identification Descriptor list. */
  NS_DESC_LIST: 0x03,
  /** NVM Set list. */
  NVMSET_LIST: 0x04,
  /** I/O Command Set specific Identify Namespace. */
  CS_NS: 0x05,
  /** I/O Command Set specific Identify Controller. */
  CS_CTRL: 0x06,
  /** I/O Command Set specific Active Namespace ID list. */
  NS_CS_ACTIVE_LIST: 0x07,
  /** I/O Command Set independent Identify Namespace. */
  NS_CS_INDEP: 0x08,
  /** Allocated Namespace ID list. */
  NS_PRESENT_LIST: 0x10,
  /** Identify Namespace for an allocated NSID. */
  NS_PRESENT: 0x11,
  /** Controllers attached to the NSID. */
  CTRL_NS_LIST: 0x12,
  /** Controllers in the subsystem. */
  CTRL_LIST: 0x13,
  /** Primary Controller Capabilities. */
  PRIMARY_CTRL_CAP: 0x14,
  /** Secondary Controller list. */
  SECONDARY_CTRL_LIST: 0x15,
  /** Namespace Granularity list. */
  NS_GRANULARITY: 0x16,
  /** UUID list. */
  UUID_LIST: 0x17,
  /** I/O Command Set data structure. */
  IOCS: 0x1c,
} as const;

/** Command Set Identifiers. */
export const Csi = {
  NVM: 0x00,
  KV: 0x01,
  ZNS: 0x02,
} as const;

/** Asynchronous event types (completion dword 0 bits 2:0). */
export const AerType = {
  ERROR: 0x0,
  SMART: 0x1,
  NOTICE: 0x2,
  VENDOR: 0x7,
} as const;

/** Asynchronous event information for AerType.ERROR. */
export const AerErrorInfo = {
  INVALID_DB_REGISTER: 0x00,
  INVALID_DB_VALUE: 0x01,
  DIAG_FAILURE: 0x02,
  PERSISTENT_INTERNAL: 0x03,
  TRANSIENT_INTERNAL: 0x04,
} as const;

/** Asynchronous event information for AerType.SMART. */
export const AerSmartInfo = {
  RELIABILITY: 0x00,
  TEMPERATURE: 0x01,
  SPARE: 0x02,
} as const;

/** SMART critical warning bits (log page 02h byte 0; Async Event Configuration bits 7:0). */
export const CriticalWarning = {
  SPARE: 1 << 0,
  TEMPERATURE: 1 << 1,
  RELIABILITY: 1 << 2,
  READ_ONLY: 1 << 3,
  VOLATILE_BACKUP: 1 << 4,
} as const;

/** NSID meaning "every namespace" (broadcast). */
export const NSID_ALL = 0xffffffff;
