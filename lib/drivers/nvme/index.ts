/**
 * A userspace NVMe host driver over a vfio-user client: {@link NvmeDriver} (controller bring-up,
 * admin commands, I/O queue pairs), {@link QueuePair} (rings, CIDs, doorbells, completions), the
 * NVM command set helpers and the perf engine.
 *
 * ```ts
 * const client = await VfioUserClient.connect('/run/nvme.sock');
 * const nvme = await NvmeDriver.open(client);
 * const ns = nvme.namespace(1);
 * const qp = await nvme.createIoQueuePair({ depth: 32 });
 * const buf = await nvme.allocateBuffer(4096);
 * await read(qp, ns, 0, 4096 / ns.blockSize, dmaSlice(buf));
 * await nvme.close();
 * await client.close();
 * ```
 *
 * @packageDocumentation
 */
export { NvmeDriver, type NvmeDriverOptions, type IoQueuePairOptions, type CloseOptions } from './controller';
export {
  QueuePair,
  NvmeRequest,
  SQE_BYTES,
  CQE_BYTES,
  type Completion,
  type CompletionMode,
  type NvmeCommand,
  type QueueLayout,
  type SubmitOptions,
} from './queue';
export { NvmeError, NvmeTimeoutError, NvmeAbortedError, decodeStatus, statusName, type StatusField, type CommandOrigin } from './errors';
export { buildPrps, dmaSlice, maxPrpEntries, prpListPages, type DataRef, type DmaSlice, type PrpPair } from './prp';
export {
  read,
  write,
  flush,
  writeZeroes,
  deallocate,
  readBlocks,
  writeBlocks,
  prepareRead,
  prepareWrite,
  Rw,
  Dsm,
  MAX_BLOCKS_PER_COMMAND,
  type BlockRange,
  type RwOptions,
  type TransferOptions,
} from './io';
export { parseIdentifyController, parseIdentifyNamespace, parseNamespaceList, type IdentifyController, type NamespaceInfo, type LbaFormat } from './identify';
export {
  decodeCap,
  decodeVersion,
  versionString,
  sqTailDoorbell,
  cqHeadDoorbell,
  enableValue,
  type ControllerCapabilities,
  type ControllerVersion,
} from './registers';
export { IoEventfdDoorbells, MappedDoorbells, MessageDoorbells, ShadowDoorbells, needEvent, type DoorbellKind, type DoorbellWriter } from './doorbells';
export {
  runPerf,
  latencySummary,
  LatencyHistogram,
  RW_PATTERNS,
  type RwPattern,
  type PerfOptions,
  type PerfProgress,
  type PerfSummary,
  type PerfFigures,
  type LatencySummary,
} from './perf';
