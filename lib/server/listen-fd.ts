/**
 * Inherited listening sockets (socket activation): what an fd handed to us is, checked before a
 * server takes it, and the fds systemd passes (`sd_listen_fds`: `LISTEN_PID`, `LISTEN_FDS`, fds
 * from 3 on).
 *
 * A listening UNIX stream socket is recognised in `/proc/net/unix` by its inode (the socket's
 * `st_ino`): flag `__SO_ACCEPTCON` (0x10000) and type `SOCK_STREAM` (1); the same line gives the
 * path it is bound to, if any.
 *
 * @packageDocumentation
 */
import * as fs from 'node:fs';
import * as os from 'node:os';

/** The first fd systemd passes (`SD_LISTEN_FDS_START`). */
export const SD_LISTEN_FDS_START = 3;

const SO_ACCEPTCON = 0x10000;
const SOCK_STREAM = 1;

/** What {@link listeningSocket} found. */
export interface ListeningSocket {
  /** The path it is bound to, `@name` for an abstract address, or null for none. */
  readonly path: string | null;
}

function codeError(code: string, message: string): Error {
  return Object.assign(new Error(message), { code, errno: (os.constants.errno as Record<string, number>)[code] });
}

/**
 * Checks that `fd` is a listening UNIX stream socket of this process and says where it is bound.
 * @throws EBADF for an fd that is not open, ENOTSOCK for something that is not a socket, EINVAL for
 * a socket that is not a listening UNIX stream socket.
 */
export function listeningSocket(fd: number): ListeningSocket {
  if (!Number.isInteger(fd) || fd < 0) throw new TypeError(`Expected an fd number, got ${String(fd)}`);
  let st: fs.BigIntStats;
  try {
    st = fs.fstatSync(fd, { bigint: true });
  } catch (err) {
    throw codeError('EBADF', `fd ${fd} is not open (${(err as Error).message})`);
  }
  if (!st.isSocket()) throw codeError('ENOTSOCK', `fd ${fd} is not a socket`);
  let table: string;
  try {
    table = fs.readFileSync('/proc/net/unix', 'utf8');
  } catch (err) {
    throw codeError('EINVAL', `fd ${fd}: /proc/net/unix cannot be read to check the socket (${(err as Error).message})`);
  }
  const inode = st.ino.toString();
  for (const line of table.split('\n').slice(1)) {
    // Num RefCount Protocol Flags Type St Inode [Path]
    const f = line.trim().split(/\s+/);
    if (f.length < 7 || f[6] !== inode) continue;
    const flags = parseInt(f[3]!, 16);
    const type = parseInt(f[4]!, 16);
    if (type !== SOCK_STREAM) throw codeError('EINVAL', `fd ${fd} is a UNIX socket but not a stream socket`);
    if ((flags & SO_ACCEPTCON) === 0) throw codeError('EINVAL', `fd ${fd} is a UNIX stream socket that is not listening`);
    return { path: f.length > 7 ? line.trim().split(/\s+/).slice(7).join(' ') : null };
  }
  throw codeError('EINVAL', `fd ${fd} is a socket, but not a UNIX socket`);
}

/**
 * The listening fds systemd passed to this process (`LISTEN_PID` is our pid and `LISTEN_FDS`
 * counts them, from fd 3), or [] when none were. With `unset`, the variables are removed (as
 * `sd_listen_fds(1)` does) so that children do not take them for theirs.
 */
export function systemdListenFds(env: NodeJS.ProcessEnv = process.env, unset = false): number[] {
  const pid = env.LISTEN_PID;
  const count = env.LISTEN_FDS;
  if (pid === undefined || count === undefined) return [];
  if (unset) {
    delete env.LISTEN_PID;
    delete env.LISTEN_FDS;
    delete env.LISTEN_FDNAMES;
  }
  if (!/^\d+$/.test(pid) || Number(pid) !== process.pid) return [];
  if (!/^\d+$/.test(count)) return [];
  return Array.from({ length: Number(count) }, (_, i) => SD_LISTEN_FDS_START + i);
}
