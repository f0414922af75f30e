/**
 * Messages a user can act on for the failures the commands meet most: a socket path that cannot
 * be listened on or connected to, a server busy with another client, a connection that ended.
 * Each says why in words (not only an errno) and names what is in the way; the caller puts the
 * command and the socket path in front.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** The longest UNIX socket path: `sun_path` holds 108 bytes, one of them the terminating NUL. */
export const MAX_SOCKET_PATH_BYTES = 107;

type ErrnoLike = Error & { code?: unknown };

const codeOf = (err: unknown): string | undefined => {
  const code = (err as ErrnoLike | null)?.code;
  return typeof code === 'string' ? code : undefined;
};
const messageOf = (err: unknown): string => (err instanceof Error ? err.message : String(err));

/** The one-line reason a socket path is too long, or null if it fits. */
export function socketPathTooLong(socket: string): string | null {
  const n = Buffer.byteLength(socket);
  if (n <= MAX_SOCKET_PATH_BYTES) return null;
  return `the path is ${String(n)} bytes; a UNIX socket path holds at most ${String(MAX_SOCKET_PATH_BYTES)} (choose a shorter one, e.g. in /tmp or /run)`;
}

function kindOf(st: fs.Stats): string {
  if (st.isDirectory()) return 'a directory';
  if (st.isFile()) return 'a regular file';
  if (st.isSymbolicLink()) return 'a symbolic link';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  return 'not a socket';
}

function lstat(p: string): fs.Stats | null {
  try {
    return fs.lstatSync(p);
  } catch {
    return null;
  }
}

/** Why the directory that is to hold `socket` cannot, or null if it looks usable. */
function directoryProblem(socket: string): string | null {
  const dir = path.dirname(socket);
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch (err) {
    const code = codeOf(err);
    if (code === 'ENOENT') return `cannot create the socket: the directory ${dir} does not exist`;
    if (code === 'ENOTDIR') return `cannot create the socket: a component of ${dir} is not a directory`;
    if (code === 'EACCES') return `cannot create the socket: permission denied on the way to ${dir}`;
    return null;
  }
  if (!st.isDirectory()) return `cannot create the socket: ${dir} is not a directory`;
  try {
    fs.accessSync(dir, fs.constants.W_OK | fs.constants.X_OK);
  } catch {
    return `cannot create the socket: no permission to create files in ${dir}`;
  }
  return null;
}

/**
 * What stands in the way of listening on `socket` that can be seen without trying: a path over
 * {@link MAX_SOCKET_PATH_BYTES}, a missing or unwritable directory, something other than a socket
 * at the path. Null if none (the bind can still fail; see {@link listenErrorMessage}). Lets a
 * command refuse before it creates anything.
 */
export function socketPathProblem(socket: string): string | null {
  const problem = socketPathTooLong(socket) ?? directoryProblem(socket);
  if (problem !== null) return problem;
  const st = lstat(socket);
  if (st !== null && !st.isSocket()) return `${kindOf(st)} is in the way; refusing to replace it with a socket`;
  return null;
}

/** A failed listen on `socket`, as a reason that does not repeat the path. */
export function listenErrorMessage(err: unknown, socket: string): string {
  const code = codeOf(err);
  const message = messageOf(err);
  switch (code) {
    case 'ENAMETOOLONG':
      return socketPathTooLong(socket) ?? `the path is too long for a UNIX socket (at most ${String(MAX_SOCKET_PATH_BYTES)} bytes)`;
    case 'ENOENT':
    case 'ENOTDIR':
    case 'EACCES':
    case 'EPERM':
      return socketPathProblem(socket) ?? `cannot create the socket: ${message}`;
    case 'EROFS':
      return `cannot create the socket: ${path.dirname(socket)} is on a read-only file system`;
    case 'EADDRINUSE': {
      // The server's own message starts with the path.
      const own = message.startsWith(`${socket}: `) ? message.slice(socket.length + 2) : message;
      return own.includes('EADDRINUSE') ? 'the address is in use' : own;
    }
    default:
      return message;
  }
}

/** A failed connect (or VERSION negotiation) with the server on `socket`, without the path. */
export function connectErrorMessage(err: unknown, socket: string): string {
  const code = codeOf(err);
  const message = messageOf(err);
  switch (code) {
    case 'EBUSY':
      return 'the device is serving another client (a vfio-user server serves one at a time); try again once it disconnects';
    case 'ENAMETOOLONG':
      return socketPathTooLong(socket) ?? message;
    case 'ENOENT': {
      const dir = path.dirname(socket);
      if (lstat(dir) === null) return `no such socket: the directory ${dir} does not exist`;
      return 'no such socket (is the server running?)';
    }
    case 'ENOTDIR':
      return 'no such socket: a component of the path is not a directory';
    case 'ECONNREFUSED': {
      const st = lstat(socket);
      if (st !== null && !st.isSocket()) return `not a socket: it is ${kindOf(st)}`;
      return 'nothing is listening on this socket (the server has stopped, or crashed and left it behind)';
    }
    case 'EACCES':
    case 'EPERM':
      return "permission denied (the server's socket mode, 0600 by default, admits only its owner)";
    default:
      if (socketPathTooLong(socket) !== null) return socketPathTooLong(socket)!;
      return message;
  }
}

/**
 * Why a connection ended under a command (`cause` as the client reported it; null for a clean
 * end of stream): a peer that hung up, crashed or was killed reads as "the server closed the
 * connection", whatever the socket reported (ECONNRESET, EPIPE, end of stream, or a poll error).
 */
export function connectionEndedMessage(cause: Error | null): string {
  const code = codeOf(cause);
  if (cause === null || code === 'ECONNRESET' || code === 'EPIPE' || code === 'EIO' || code === 'ENOTCONN') return 'the server closed the connection';
  if (code === 'ETIMEDOUT') return `the server stopped answering (${cause.message})`;
  return `the connection ended: ${cause.message}`;
}
