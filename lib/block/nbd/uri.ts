/**
 * NBD URIs, as qemu, nbdkit and libnbd write them (the NetworkBlockDevice project's doc/uri.md):
 *
 * - `nbd://host[:port]/export`: TCP (port 10809 by default; `[::1]` for IPv6 literals);
 * - `nbd+unix:///export?socket=PATH`: a UNIX socket.
 *
 * The export name is the path after the first `/`, percent-decoded; empty for the default export.
 * TLS (`nbds`) and vsock are not supported.
 *
 * @packageDocumentation
 */
import { NBD_DEFAULT_PORT } from './protocol';

/** Where an export is: a TCP address or a UNIX socket, and its name. */
export type NbdTarget = { host: string; port: number; exportName: string } | { socket: string; exportName: string };

/** Parses an NBD URI; throws a TypeError that says what is wrong. */
export function parseNbdUri(uri: string): NbdTarget {
  const scheme = /^([a-z+]+):\/\//i.exec(uri)?.[1]?.toLowerCase();
  if (scheme === undefined) throw new TypeError(`'${uri}' is not an NBD URI (nbd://host[:port]/export or nbd+unix:///export?socket=PATH)`);
  if (scheme === 'nbds' || scheme === 'nbds+unix') throw new TypeError(`${scheme}:// (NBD over TLS) is not supported`);
  if (scheme !== 'nbd' && scheme !== 'nbd+unix' && scheme !== 'nbd+tcp') throw new TypeError(`unsupported NBD URI scheme '${scheme}://' (nbd:// or nbd+unix://)`);
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw new TypeError(`'${uri}' is not a valid URI`);
  }
  if (url.username !== '' || url.password !== '') throw new TypeError('NBD URIs carry no user or password');
  let exportName: string;
  try {
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  } catch {
    throw new TypeError(`bad percent-encoding in the export name of '${uri}'`);
  }
  const params = [...url.searchParams.keys()];
  if (scheme === 'nbd+unix') {
    if (url.host !== '') throw new TypeError(`nbd+unix:// takes no host (write nbd+unix:///${exportName}?socket=PATH)`);
    const socket = url.searchParams.get('socket');
    if (socket === null || socket === '') throw new TypeError('nbd+unix:// needs ?socket=PATH');
    const unknown = params.filter((p) => p !== 'socket');
    if (unknown.length > 0) throw new TypeError(`unknown NBD URI parameter '${unknown[0]}'`);
    return { socket, exportName };
  }
  if (params.length > 0) throw new TypeError(`unknown NBD URI parameter '${params[0]}' (socket= is for nbd+unix://)`);
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1') || 'localhost';
  const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port);
  if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new TypeError(`bad port in '${uri}'`);
  return { host, port, exportName };
}

/** The URI of a target (for messages). */
export function formatNbdTarget(t: NbdTarget): string {
  const name = encodeURIComponent(t.exportName).replace(/%2F/g, '/');
  if ('socket' in t) return `nbd+unix:///${name}?socket=${t.socket}`;
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  return `nbd://${host}${t.port === NBD_DEFAULT_PORT ? '' : `:${t.port}`}/${name}`;
}
