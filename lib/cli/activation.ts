/**
 * Socket activation for `vfio-user serve`: the listening socket to serve when one is inherited,
 * from `--fd N` or from systemd (`LISTEN_PID` / `LISTEN_FDS`, fds from 3 on), checked before
 * anything else is made.
 */
import * as path from 'node:path';
import { listeningSocket, systemdListenFds } from '../server/listen-fd';

/** An inherited listening socket: its fd and where it is bound. */
export interface Inherited {
  readonly fd: number;
  readonly path: string;
}

/**
 * The inherited socket to serve, or null to bind SOCKET as usual. systemd's variables are removed
 * from the environment either way (children must not take them for theirs).
 *
 * @throws Error (a usage problem) for a bad --fd, several sockets from systemd, an fd that is not
 * a listening UNIX stream socket bound to a path, or a SOCKET that names another socket.
 */
export function inheritedSocket(fdOption: string | undefined, socket: string | undefined): Inherited | null {
  const fromSystemd = systemdListenFds(process.env, true);
  let fd: number;
  if (fdOption !== undefined) {
    if (!/^\d+$/.test(fdOption) || Number(fdOption) > 0x7fffffff) throw new Error(`--fd must be a file descriptor number, got '${fdOption}'`);
    fd = Number(fdOption);
  } else if (fromSystemd.length === 0) {
    return null;
  } else if (fromSystemd.length > 1) {
    throw new Error(`systemd passed ${fromSystemd.length} sockets (LISTEN_FDS=${fromSystemd.length}); serve one with --fd ${fromSystemd.join('|')}`);
  } else {
    fd = fromSystemd[0]!;
  }
  const found = listeningSocket(fd);
  if (found.path === null || found.path.startsWith('@')) throw new Error(`fd ${fd} is a listening socket with no path (vfio-user clients connect to a path)`);
  if (socket !== undefined && path.resolve(socket) !== found.path) throw new Error(`fd ${fd} listens on ${found.path}, not on ${path.resolve(socket)}`);
  return { fd, path: found.path };
}
