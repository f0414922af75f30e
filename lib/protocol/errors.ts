/**
 * The two error classes of the protocol layer.
 *
 * - {@link ProtocolError}: input that does not follow the protocol (truncated, oversized or
 *   inconsistent bytes, wrong JSON types, impossible negotiation). Thrown by every decoder. Its
 *   `errno` is what a receiver should put in an error reply (almost always `EINVAL`, as
 *   libvfio-user does). Whether the connection survives is the caller's decision: a bad header
 *   is judged by `validateHeader`, a failed `VERSION` always ends the connection.
 * - {@link VfioUserError}: a peer answered a command with an error reply (reference 1.10).
 *
 * Encoders do not throw these: handing an encoder a value that does not fit its field is a bug in
 * the caller and throws `RangeError`/`TypeError` ("Expected <field> to be ...").
 *
 * @packageDocumentation
 */
import { Errno, Limits, commandName, errnoName } from './constants';

/** Options of {@link ProtocolError}. */
export interface ProtocolErrorOptions {
  /** errno to report to the peer; default `EINVAL`. */
  errno?: number;
  /** Wire field (spec spelling) that was wrong, e.g. `'argsz'` or `'capabilities.max_msg_fds'`. */
  field?: string;
  /**
   * The connection cannot continue after this error: close it (after the error reply, if one is
   * due, as for a failed `VERSION`). Default false: answer the one message and go on.
   */
  fatal?: boolean;
  /** Underlying error, if any. */
  cause?: unknown;
}

/**
 * Malformed protocol input. The message names the message and the field, e.g.
 * `"REGION_WRITE request: count 8 disagrees with 4 data bytes"`.
 */
export class ProtocolError extends Error {
  override readonly name = 'ProtocolError';
  /** errno for the error reply (positive, default `EINVAL` = 22). */
  readonly errno: number;
  /** Name of `errno`, e.g. `'EINVAL'`. */
  readonly code: string;
  /** The offending wire field, when one is to blame. */
  readonly field: string | undefined;
  /** The connection must be closed (see {@link ProtocolErrorOptions.fatal}). */
  readonly fatal: boolean;

  constructor(message: string, options: ProtocolErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.errno = options.errno ?? Errno.EINVAL;
    this.code = errnoName(this.errno);
    this.field = options.field;
    this.fatal = options.fatal ?? false;
  }
}

/**
 * An error reply from the peer: the command `command` with id `msgId` failed with `errno`.
 * `errno` is normalised as libvfio-user does: 0 or anything above 4096 becomes `EINVAL`.
 */
export class VfioUserError extends Error {
  override readonly name = 'VfioUserError';
  /** Positive errno from the reply's `error` field. */
  readonly errno: number;
  /** Name of `errno`, e.g. `'ENOENT'`. */
  readonly code: string;
  /** Command number of the failed command. */
  readonly command: number;
  /** `msg_id` of the failed command. */
  readonly msgId: number;

  constructor(errno: number, command: number, msgId: number, message?: string) {
    const e = normalizeErrno(errno);
    super(message ?? `${commandName(command)} (msg_id ${String(msgId)}) failed: ${errnoName(e)}`);
    this.errno = e;
    this.code = errnoName(e);
    this.command = command;
    this.msgId = msgId;
  }

  /** Name of {@link VfioUserError.command}, e.g. `'DMA_UNMAP'`. */
  get commandName(): string {
    return commandName(this.command);
  }
}

/**
 * The errno a received error reply stands for: the `error` field if it is in 1..4096, else `EINVAL`
 * (reference 1.4: the spec allows the Error flag with `error` 0; LVU clamps out-of-range values).
 */
export function normalizeErrno(error: number): number {
  return Number.isInteger(error) && error > 0 && error <= Limits.MAX_ERRNO ? error : Errno.EINVAL;
}
