// Live migration of an NVMe controller between two servers while I/O runs.
//
//   node examples/migrate-nvme.mjs                 two `vfio-user serve nvme` processes, 64 MiB RAM
//   node examples/migrate-nvme.mjs SRC DST         two servers already listening on SRC and DST
//                                                  (same --size, --block-size, --queues and --serial)
//   options: --size 256M (namespace, own servers only), --seconds 1 (I/O before and after)
//
// A verifying random read/write workload at queue depth 16 runs through NvmeDriver against the
// source; the device moves to the destination (PRE_COPY rounds while the workload goes on, then
// STOP_COPY); the driver moves with it inside the downtime and carries on; at the end every block is
// read back and checked. Prints one JSON line: downtimeMs, precopyRounds, bytes, ioErrors, verified.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { VfioUserClient, NvmeDriver, migrate, nvmeDriver } from 'vfio-user';

const BLOCK = 4096;
const DEPTH = 16;
const argv = process.argv.slice(2);
const option = (name, fallback) => {
  const i = argv.indexOf(`--${name}`);
  if (i < 0) return fallback;
  const value = argv[i + 1];
  argv.splice(i, 2);
  return value;
};
const size = option('size', '64M');
const seconds = Number(option('seconds', '1'));
let [srcPath, dstPath] = argv;

// ---- two servers, each its own process (unless given) ----
const children = [];
let dir = null;
async function serve(name) {
  dir ??= mkdtempSync(join(tmpdir(), 'vfio-user-migrate-'));
  const socket = join(dir, `${name}.sock`);
  const cli = join(dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli', 'main.js');
  const child = spawn(process.execPath, [cli, 'serve', 'nvme', socket, '--size', size, '--queues', '4', '--serial', 'MIGRATE-EXAMPLE', '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  const lines = createInterface({ input: child.stdout });
  await new Promise((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`the ${name} server exited (${code})`)));
    lines.on('line', (line) => {
      if (line.includes('"ready"')) resolve();
    });
  });
  return socket;
}
if (srcPath === undefined || dstPath === undefined) [srcPath, dstPath] = await Promise.all([serve('source'), serve('destination')]);

// ---- the workload ----
function pattern(dst, block, version) {
  if (version === 0) return dst.fill(0);
  const words = new Uint32Array(dst.buffer, dst.byteOffset, BLOCK / 4);
  let x = (Math.imul(block, 2654435761) ^ Math.imul(version, 40503)) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  words[0] = block;
  words[1] = version;
}

const source = await VfioUserClient.connect(srcPath);
const destination = await VfioUserClient.connect(dstPath);
const driver = await NvmeDriver.open(source, { ioQueues: 1 });
const qp = await driver.createIoQueuePair({ depth: DEPTH });
const ns = driver.namespace(1);
const perBlock = BLOCK / ns.blockSize;
const blocks = Math.floor((ns.nsze * ns.blockSize) / BLOCK);
const memory = await driver.allocateBuffer(DEPTH * BLOCK);
const versions = new Uint32Array(blocks);
const busy = new Uint8Array(blocks);
const expected = Buffer.alloc(BLOCK);
const stats = { reads: 0, writes: 0, ioErrors: 0, mismatches: 0 };
let running = true;
let seed = 0x2545f491;
const random = (n) => {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) % n;
};
const slot = (i) => ({ bytes: memory.bytes.subarray(i * BLOCK, (i + 1) * BLOCK), ref: { iova: memory.iovaOf(i * BLOCK), length: BLOCK } });
const check = (block, bytes) => {
  pattern(expected, block, versions[block]);
  if (!bytes.equals(expected)) stats.mismatches++;
};

// Every block written once, so the first PRE_COPY round has the whole disk to move.
let next = 0;
await Promise.all(
  Array.from({ length: DEPTH }, async (_, i) => {
    const { bytes, ref } = slot(i);
    while (next < blocks) {
      const block = next++;
      pattern(bytes, block, 1);
      await nvmeDriver.write(qp, ns, block * perBlock, perBlock, ref);
      versions[block] = 1;
    }
  }),
);

const worker = async (i) => {
  const { bytes, ref } = slot(i);
  while (running) {
    const block = random(blocks);
    if (busy[block]) continue;
    busy[block] = 1;
    try {
      if (random(2) === 0) {
        pattern(bytes, block, versions[block] + 1);
        await nvmeDriver.write(qp, ns, block * perBlock, perBlock, ref);
        versions[block]++;
        stats.writes++;
      } else {
        await nvmeDriver.read(qp, ns, block * perBlock, perBlock, ref);
        check(block, bytes);
        stats.reads++;
      }
    } catch (err) {
      stats.ioErrors++;
      if (stats.ioErrors === 1) console.error(`I/O error: ${err.message}`);
    } finally {
      busy[block] = 0;
    }
  }
};
const workers = Array.from({ length: DEPTH }, (_, i) => worker(i));

// ---- the migration, with the workload running ----
let code = 1;
try {
  await sleep(seconds * 1000);
  await driver.prepareMove(destination);
  const result = await migrate(source, destination, { beforeResume: () => driver.completeMove() });
  await sleep(seconds * 1000);
  running = false;
  await Promise.all(workers);
  await source.close();

  // Every block back from the destination.
  const { bytes, ref } = slot(0);
  let verifiedBlocks = 0;
  for (let block = 0; block < blocks; block++) {
    await nvmeDriver.read(qp, ns, block * perBlock, perBlock, ref);
    check(block, bytes);
    verifiedBlocks++;
  }
  const verified = stats.mismatches === 0 && stats.ioErrors === 0 && verifiedBlocks === blocks && driver.client === destination;
  console.log(
    JSON.stringify({
      downtimeMs: Number(result.downtimeMs.toFixed(2)),
      precopyRounds: result.precopyRounds,
      bytes: result.bytes,
      ioErrors: stats.ioErrors,
      verified,
      blocks: verifiedBlocks,
      mismatches: stats.mismatches,
      reads: stats.reads,
      writes: stats.writes,
      stopCopyBytes: result.stopCopyBytes,
      dirtyPages: result.dirtyPages,
      converged: result.converged,
      totalMs: Number(result.totalMs.toFixed(1)),
    }),
  );
  code = verified ? 0 : 1;
} catch (err) {
  console.error(err);
} finally {
  running = false;
  await Promise.allSettled(workers);
  await driver.close().catch(() => undefined);
  await source.close();
  await destination.close();
  for (const child of children) child.kill('SIGTERM');
  await Promise.all(children.map((c) => (c.exitCode === null ? new Promise((r) => c.once('exit', r)) : null)));
  if (dir !== null) rmSync(dir, { recursive: true, force: true });
}
process.exit(code);
