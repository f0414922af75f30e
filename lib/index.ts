/**
 * vfio-user for Node.js: both sides of the vfio-user protocol and device models on top of it.
 *
 * - `VfioUserServer` + `VfioUserDevice`: serve a device on a UNIX socket (lib/server).
 * - `Connection`: the framed, fd-passing message transport both sides use (lib/transport).
 * - `protocol`: every message's encode/decode pair, constants and errors (lib/protocol).
 * - `native`: the addon's typed face — owned fds, mmap'd memory, eventfds, memfds (lib/native).
 *
 * @packageDocumentation
 */
export * from './server';
export { Connection, IncomingMessage, type ConnectionOptions, type Reply, type ReplyCallback, type RequestOptions, type Body } from './transport/connection';
export { VfioUserError, ProtocolError } from './protocol/errors';
export * as protocol from './protocol';
export * as native from './native';
