export { VfioUserServer, type ServerOptions, type VfioUserServerEvents } from './server';
export type { VfioUserDevice, DeviceRegion, DeviceContext, ResetReason, AccessResult } from './device';
export { DmaSpace, DmaError, type DmaRegion, type DmaBuffer, type DmaTransport, type DmaListener } from './dma';
export { IrqTable, type IrqIndexInfo } from './irq';
export { checkIoEventfd, type IoEventfd, type IoEventfdSize } from './ioeventfd';
export { listeningSocket, systemdListenFds, SD_LISTEN_FDS_START, type ListeningSocket } from './listen-fd';
export { QUIESCE_BUSY, FORCED_QUIESCE_WAIT_MS, Quiescer, type QuiesceReason } from './quiesce';
export { Migration, type MigrationHooks, type MigrationSaver, type MigrationLoader } from './migration';
export { stateStreamHooks, MigrationRefusedError, STATE_FORMAT_VERSION, type StatefulDevice, type BulkData } from './state-stream';
