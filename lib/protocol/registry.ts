/**
 * Payload decoders by command number, for generic consumers (tracing, logging, fuzzing, a
 * dispatcher that decodes before handing over). Handlers that know their command call the
 * specific decoder directly.
 *
 * @packageDocumentation
 */
import { Command, commandName, isKnownCommand, type CommandNumber } from './constants';
import { ProtocolError } from './errors';
import * as access from './messages/access';
import * as device from './messages/device';
import * as dirty from './messages/dirty';
import * as dma from './messages/dma';
import * as feature from './messages/feature';
import * as irq from './messages/irq';
import * as migration from './messages/migration';
import * as region from './messages/region';
import * as reset from './messages/reset';
import * as version from './messages/version';

/** The request and reply decoders of one command. */
export interface PayloadDecoders {
  readonly request: (payload: Uint8Array) => unknown;
  readonly reply: (payload: Uint8Array) => unknown;
}

/** Decoders for every command 1-18. */
export const PAYLOAD_DECODERS: Readonly<Record<CommandNumber, PayloadDecoders>> = Object.freeze({
  [Command.VERSION]: { request: version.decodeVersionRequest, reply: version.decodeVersionReply },
  [Command.DMA_MAP]: { request: dma.decodeDmaMapRequest, reply: dma.decodeDmaMapReply },
  [Command.DMA_UNMAP]: { request: dma.decodeDmaUnmapRequest, reply: dma.decodeDmaUnmapReply },
  [Command.DEVICE_GET_INFO]: { request: device.decodeDeviceInfoRequest, reply: device.decodeDeviceInfoReply },
  [Command.DEVICE_GET_REGION_INFO]: { request: region.decodeRegionInfoRequest, reply: region.decodeRegionInfoReply },
  [Command.DEVICE_GET_REGION_IO_FDS]: { request: region.decodeRegionIoFdsRequest, reply: region.decodeRegionIoFdsReply },
  [Command.DEVICE_GET_IRQ_INFO]: { request: irq.decodeIrqInfoRequest, reply: irq.decodeIrqInfoReply },
  [Command.DEVICE_SET_IRQS]: { request: irq.decodeSetIrqsRequest, reply: irq.decodeSetIrqsReply },
  [Command.REGION_READ]: { request: access.decodeRegionReadRequest, reply: access.decodeRegionReadReply },
  [Command.REGION_WRITE]: { request: access.decodeRegionWriteRequest, reply: access.decodeRegionWriteReply },
  [Command.DMA_READ]: { request: access.decodeDmaReadRequest, reply: access.decodeDmaReadReply },
  [Command.DMA_WRITE]: { request: access.decodeDmaWriteRequest, reply: access.decodeDmaWriteReply },
  [Command.DEVICE_RESET]: { request: reset.decodeDeviceResetRequest, reply: reset.decodeDeviceResetReply },
  [Command.DIRTY_PAGES]: { request: dirty.decodeDirtyPagesRequest, reply: dirty.decodeDirtyPagesReply },
  [Command.REGION_WRITE_MULTI]: { request: access.decodeRegionWriteMultiRequest, reply: access.decodeRegionWriteMultiReply },
  [Command.DEVICE_FEATURE]: { request: feature.decodeDeviceFeatureRequest, reply: feature.decodeDeviceFeatureReply },
  [Command.MIG_DATA_READ]: { request: migration.decodeMigDataReadRequest, reply: migration.decodeMigDataReadReply },
  [Command.MIG_DATA_WRITE]: { request: migration.decodeMigDataWriteRequest, reply: migration.decodeMigDataWriteReply },
});

/**
 * Decodes the payload of a command (`reply` false) or of a successful reply (`reply` true).
 *
 * @throws {ProtocolError} for an unknown command or a malformed payload.
 */
export function decodePayload(command: number, reply: boolean, payload: Uint8Array): unknown {
  if (!isKnownCommand(command)) throw new ProtocolError(`${commandName(command)}: unknown command`, { field: 'command' });
  const d = PAYLOAD_DECODERS[command];
  return reply ? d.reply(payload) : d.request(payload);
}
