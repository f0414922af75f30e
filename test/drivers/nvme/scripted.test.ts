/**
 * The driver suite against the scripted controller (test/drivers/nvme/scripted-device.ts), in its
 * default shape and with the doorbell page offered for mmap.
 */
import { runDriverSuite } from './suite';
import { scriptedServer } from './fixtures';

runDriverSuite('the scripted controller', () => scriptedServer());
runDriverSuite('the scripted controller with mmap’d doorbells and 4 KiB blocks', () => scriptedServer({ mmapDoorbells: true, blockSize: 4096, blocks: 2048 }));
