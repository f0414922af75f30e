/** VERSION from the client's side: what we announce, QEMU's ceilings on the reply, the twin socket's fd. */
import { Fd } from '../native/fd';
import { Command } from '../protocol/constants';
import { negotiate, withDefaults, type CapabilitiesInput, type Negotiated } from '../protocol/capabilities';
import { decodeVersionReply, encodeVersionRequest, type VersionMessage } from '../protocol/messages/version';
import { protocolError } from './errors';
import type { Caller } from './link';
import { ClientLimits, type ClientSettings } from './options';

/** @internal What VERSION settled. */
export interface VersionOutcome {
  /** The negotiated version and limits (frozen). */
  readonly negotiated: Readonly<Negotiated>;
  /** The server's reply as it sent it (defaults applied). */
  readonly server: VersionMessage;
  /** The twin socket the server handed over, if twin_socket was negotiated: the caller owns it. */
  readonly twinFd: Fd | null;
}

/**
 * @internal Proposes `settings.version` with our capabilities and checks the reply against QEMU's
 * ceilings. Every fd of the reply but the twin socket's is closed, all of them on failure.
 *
 * @throws {ProtocolError} for a reply out of range or one that does not negotiate.
 */
export async function negotiateVersion(caller: Caller, settings: ClientSettings): Promise<VersionOutcome> {
  const announce: CapabilitiesInput = { maxMsgFds: settings.maxMsgFds, maxDataXferSize: settings.maxDataXferSize };
  // Say we can use REGION_WRITE_MULTI, as QEMU does. It also sizes our request: a server may
  // not reply with more than we sent, and its reply names write_multiple and the twin socket.
  if (settings.writeMultiple) announce.writeMultiple = true;
  if (settings.twinSocket) announce.twinSocket = { supported: true };
  const { major, minor } = settings.version;
  const body = encodeVersionRequest({ major, minor, capabilities: announce });
  const { reply, fds } = await caller.call(
    Command.VERSION,
    body,
    (msg) => {
      const decoded = decodeVersionReply(msg.payload);
      return { reply: decoded, fds: msg.takeAllFds() };
    },
    { allowFds: true },
  );
  try {
    const caps = reply.capabilities;
    if (caps.maxMsgFds > ClientLimits.MAX_SERVER_MSG_FDS) {
      throw protocolError(`VERSION reply: max_msg_fds ${String(caps.maxMsgFds)} exceeds ${String(ClientLimits.MAX_SERVER_MSG_FDS)}`, 'capabilities.max_msg_fds');
    }
    if (caps.maxDataXferSize > ClientLimits.MAX_SERVER_DATA_XFER_SIZE) {
      throw protocolError(`VERSION reply: max_data_xfer_size ${String(caps.maxDataXferSize)} exceeds 64 MiB`, 'capabilities.max_data_xfer_size');
    }
    if (caps.maxDmaMaps > ClientLimits.MAX_SERVER_DMA_MAPS) {
      throw protocolError(`VERSION reply: max_dma_maps ${String(caps.maxDmaMaps)} exceeds ${String(ClientLimits.MAX_SERVER_DMA_MAPS)}`, 'capabilities.max_dma_maps');
    }
    const local = {
      major,
      minor,
      capabilities: withDefaults({ ...announce, twinSocket: { supported: settings.twinSocket } }),
    };
    const n = negotiate({ role: 'client', local, peer: { major: reply.major, minor: reply.minor, capabilities: caps }, peerFds: fds.length });
    let kept: Fd | null = null;
    if (n.twinSocket) {
      kept = fds[n.twinSocketFdIndex!]!;
    } else if (fds.length > 0) {
      throw protocolError(`VERSION reply: carries ${String(fds.length)} fds without enabling twin_socket`, 'fds');
    }
    Fd.closeAll(fds.filter((fd) => fd !== kept));
    return { negotiated: Object.freeze(n), server: reply, twinFd: kept };
  } catch (err) {
    Fd.closeAll(fds);
    throw err;
  }
}
