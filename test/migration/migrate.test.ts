/**
 * migrate() between our own servers: GPIO state, refusals (another device, another geometry, a
 * truncated or corrupted stream) with the source resuming and the destination staying usable, a
 * client that dies in STOP_COPY or RESUMING, progress events and cancellation; and against a
 * libvfio-user-like server whose stream is raw bytes (interop: the client never parses it).
 */
import { describe, expect, it } from 'vitest';
import { MigrationError, PciFunction, VfioUserClient, migrate, type MigrationProgress } from '../../lib/client';
import { Idio16Device, IDIO16_BAR } from '../../lib/devices/gpio/idio16';
import { NvmeController } from '../../lib/devices/nvme/controller';
import { RamBackend } from '../../lib/block';
import { NvmeDriver } from '../../lib/drivers/nvme/controller';
import { Command, DeviceFeature, Errno, MigState, PciIrq } from '../../lib/protocol/constants';
import { VfioUserError } from '../../lib/protocol/errors';
import { useFdLeakCheck } from '../helpers/fds';
import { useServing } from './serving';
import { FakeServer, lvuHandler, type RawMessage } from '../client/fixtures';

const { STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY, ERROR } = MigState;
const MiB = 1024 * 1024;

useFdLeakCheck();
const { cleanups, serve } = useServing();

async function connect(path: string, maxDataXferSize?: number): Promise<VfioUserClient> {
  const c = await VfioUserClient.connect(path, { timeoutMs: 10_000, maxDataXferSize });
  cleanups.push(() => c.close());
  return c;
}

const nvme = (size = 8 * MiB, options: Partial<ConstructorParameters<typeof NvmeController>[0]> = {}) =>
  new NvmeController({ backend: new RamBackend(size), queues: 2, serial: 'MIG-TEST', ...options });

describe('migrate(): GPIO card', () => {
  it('moves registers, interrupt state and the PCI state; progress events; the destination runs', async () => {
    const a = await serve(new Idio16Device());
    const b = await serve(new Idio16Device());
    const src = await connect(a.socketPath);
    const dst = await connect(b.socketPath);
    const pci = await PciFunction.open(src);
    await pci.enable();
    await src.write(IDIO16_BAR, 0, Buffer.from([0xa5]), { posted: false });
    await src.write(IDIO16_BAR, 4, Buffer.from([0x3c]), { posted: false });
    await src.read(IDIO16_BAR, 2, 1); // enables the change-of-state interrupt
    a.device.setInputs(0x0f0f); // interrupt asserted: INTx level high, status bits set
    const outputs: number[] = [];
    b.device.events.on('outputs', (v) => outputs.push(v));
    const progress: MigrationProgress[] = [];
    const result = await migrate(src, dst, { onProgress: (p) => progress.push(p) });
    expect(b.device.outputs).toBe(0x3ca5);
    expect(b.device.inputs).toBe(0x0f0f);
    expect(b.device.interruptEnabled).toBe(true);
    expect(outputs).toEqual([0x3ca5]);
    // The whole config space came too: BAR2's address, COMMAND, STATUS (INTx pending).
    expect(b.device.config.barAddress(IDIO16_BAR)).toBe(a.device.config.barAddress(IDIO16_BAR));
    expect(b.device.config.command).toBe(a.device.config.command);
    expect(b.device.config.u16(6) & 0x8).toBe(0x8);
    expect(await dst.migrationState()).toBe(RUNNING);
    expect(await src.migrationState()).toBe(STOP);
    expect(result.precopyRounds).toBeGreaterThanOrEqual(1);
    expect(result.bytes).toBeGreaterThan(0);
    expect(result.downtimeMs).toBeGreaterThan(0);
    expect(progress[0]!.phase).toBe('setup');
    expect(progress.at(-1)!.phase).toBe('done');
    expect(progress.some((p) => p.phase === 'precopy')).toBe(true);
    expect(progress.some((p) => p.phase === 'stopcopy')).toBe(true);
    // The destination is a working card: a client reads the outputs through BAR2.
    const out = await dst.read(IDIO16_BAR, 0, 1);
    expect(out[0]).toBe(0xa5);
  });

  it('without PRE_COPY: STOP_COPY only', async () => {
    const a = await serve(new Idio16Device());
    const b = await serve(new Idio16Device());
    const src = await connect(a.socketPath);
    const dst = await connect(b.socketPath);
    await (await PciFunction.open(src)).enable();
    await src.write(IDIO16_BAR, 0, Buffer.from([7]), { posted: false });
    const result = await migrate(src, dst, { preCopy: false });
    expect(result.precopyRounds).toBe(0);
    expect(result.precopyBytes).toBe(0);
    expect(b.device.outputs).toBe(7);
  });
});

describe('migrate(): refusals leave both devices usable', () => {
  it('a destination with another namespace size refuses the header; the source resumes its I/O', async () => {
    const a = await serve(nvme(8 * MiB));
    const b = await serve(nvme(4 * MiB));
    const src = await connect(a.socketPath);
    const dst = await connect(b.socketPath);
    const driver = await NvmeDriver.open(src, { ioQueues: 1 });
    const qp = await driver.createIoQueuePair({ depth: 8 });
    const buf = await driver.allocateBuffer(4096);
    const err = (await migrate(src, dst).catch((e: unknown) => e)) as MigrationError;
    expect(err).toBeInstanceOf(MigrationError);
    expect(err.phase).toBe('precopy');
    expect(err.sourceState).toBe(RUNNING);
    expect(err.destinationState).toBe(RUNNING);
    expect(err.cause).toBeInstanceOf(VfioUserError);
    expect((err.cause as VfioUserError).errno).toBe(Errno.EINVAL);
    expect(b.server.migration!.lastError!.message).toMatch(/another device: blocks 16384 \(here: 8192\)/);
    // The source carries on.
    buf.bytes.fill(0x5a);
    await qp.submit({ opcode: 0x01, nsid: 1, cdw12: 7 }, { data: { iova: buf.iova, length: 4096 } });
    await driver.close();
    // The destination is usable by a plain client.
    const other = await NvmeDriver.open(dst, { ioQueues: 1 });
    expect(other.namespace(1).nsze).toBe(8192);
    await other.close();
  });

  it.each([
    ['block size', { blockSize: 4096 as const }, /blockSize 512 \(here: 4096\)/],
    ['queue count', { queues: 3 }, /queues 2 \(here: 3\)/],
    ['serial', { serial: 'OTHER' }, /serial "MIG-TEST" \(here: "OTHER"\)/],
    ['doorbell mode', { doorbells: 'mmap' as const }, /doorbells "trap" \(here: "mmap"\)/],
  ])('a destination with another %s refuses', async (_what, options, reason) => {
    const a = await serve(nvme());
    const b = await serve(nvme(8 * MiB, options));
    const src = await connect(a.socketPath);
    const dst = await connect(b.socketPath);
    const err = (await migrate(src, dst).catch((e: unknown) => e)) as MigrationError;
    expect(err).toBeInstanceOf(MigrationError);
    expect(b.server.migration!.lastError!.message).toMatch(reason);
    expect([err.sourceState, err.destinationState]).toEqual([RUNNING, RUNNING]);
  });

  it('another kind of device refuses', async () => {
    const a = await serve(new Idio16Device());
    const b = await serve(nvme());
    const src = await connect(a.socketPath);
    const dst = await connect(b.socketPath);
    const err = (await migrate(src, dst).catch((e: unknown) => e)) as MigrationError;
    expect(err).toBeInstanceOf(MigrationError);
    expect(b.server.migration!.lastError!.message).toMatch(/another device: kind "idio16" \(here: "nvme"\)/);
    expect(await dst.migrationState()).toBe(RUNNING);
    expect(await src.migrationState()).toBe(RUNNING);
  });

  /** The whole stream of a GPIO card, read by hand. */
  async function streamOf(src: VfioUserClient): Promise<Buffer> {
    await src.setMigrationState(STOP_COPY);
    const parts: Buffer[] = [];
    for (;;) {
      const chunk = await src.readMigrationData();
      if (chunk.length === 0) break;
      parts.push(chunk);
    }
    await src.setMigrationState(RUNNING);
    return Buffer.concat(parts);
  }

  /** Two GPIO cards served; the source's outputs set to 0x42; its whole stream, for the destination. */
  async function streamOfTwoCards() {
    const a = await serve(new Idio16Device());
    const b = await serve(new Idio16Device());
    const src = await connect(a.socketPath);
    const dst = await connect(b.socketPath);
    await (await PciFunction.open(src)).enable();
    await src.write(IDIO16_BAR, 0, Buffer.from([0x42]), { posted: false });
    return { b, dst, stream: await streamOf(src) };
  }

  it('a truncated stream: STOP fails, the destination goes to ERROR with nothing loaded, a reset recovers it', async () => {
    const { b, dst, stream } = await streamOfTwoCards();
    await dst.setMigrationState(RESUMING);
    await dst.writeMigrationData(stream.subarray(0, stream.length - 10));
    const failed = await dst.setMigrationState(RUNNING).catch((e: unknown) => e);
    expect((failed as VfioUserError).errno).toBe(Errno.EINVAL);
    expect(await dst.migrationState()).toBe(ERROR);
    expect(b.server.migration!.lastError!.message).toMatch(/truncated migration stream/);
    expect(b.device.outputs).toBe(0);
    await dst.reset();
    expect(await dst.migrationState()).toBe(RUNNING);
    expect((await dst.read(IDIO16_BAR, 0, 1))[0]).toBe(0);
  });

  it('a corrupted stream: the END digest does not match, MIG_DATA_WRITE fails, nothing is loaded', async () => {
    const { b, dst, stream } = await streamOfTwoCards();
    // Flip a byte inside the STATE record's JSON (still valid JSON: a digit).
    const text = stream.toString('latin1');
    const at = text.indexOf('"outputs":66');
    expect(at).toBeGreaterThan(0);
    const bad = Buffer.from(stream);
    bad[at + 10] = '7'.charCodeAt(0);
    await dst.setMigrationState(RESUMING);
    const write = await dst.writeMigrationData(bad).catch((e: unknown) => e);
    expect((write as VfioUserError).errno).toBe(Errno.EINVAL);
    expect(b.server.migration!.lastError!.message).toMatch(/digest does not match/);
    // Further data is refused too, and STOP fails: ERROR, recovered by a reset.
    expect(((await dst.writeMigrationData(Buffer.alloc(4)).catch((e: unknown) => e)) as VfioUserError).errno).toBe(Errno.EINVAL);
    expect(((await dst.setMigrationState(STOP).catch((e: unknown) => e)) as VfioUserError).errno).toBe(Errno.EINVAL);
    expect(await dst.migrationState()).toBe(ERROR);
    expect(b.device.outputs).toBe(0);
    await dst.reset();
    expect(await dst.migrationState()).toBe(RUNNING);
  });

  it('garbage instead of a stream is refused at the first write', async () => {
    const b = await serve(new Idio16Device());
    const dst = await connect(b.socketPath);
    await dst.setMigrationState(RESUMING);
    expect(((await dst.writeMigrationData(Buffer.from('not a vfio-user stream at all')).catch((e: unknown) => e)) as VfioUserError).errno).toBe(Errno.EINVAL);
    expect(b.server.migration!.lastError!.message).toMatch(/no header|bad magic/);
  });

  it('a failure inside the downtime (beforeResume throws): the source runs again, the destination is set running', async () => {
    const a = await serve(new Idio16Device());
    const b = await serve(new Idio16Device());
    const src = await connect(a.socketPath);
    const dst = await connect(b.socketPath);
    const err = (await migrate(src, dst, {
      beforeResume: () => {
        throw new Error('the VMM could not wire the destination');
      },
    }).catch((e: unknown) => e)) as MigrationError;
    expect(err).toBeInstanceOf(MigrationError);
    expect(err.phase).toBe('resume');
    expect(err.message).toMatch(/could not wire/);
    // The source was in STOP_COPY: it runs again. The destination had loaded the state (STOP): it
    // is set running (usable; which of the two the VMM keeps is its call).
    expect(err.sourceState).toBe(RUNNING);
    expect(err.destinationState).toBe(RUNNING);
    expect(a.device.stopped).toBe(false);
    expect(b.device.stopped).toBe(false);
  });

  it('a cancelled migration resumes the source', async () => {
    const a = await serve(new Idio16Device());
    const b = await serve(new Idio16Device());
    const src = await connect(a.socketPath);
    const dst = await connect(b.socketPath);
    const ac = new AbortController();
    ac.abort();
    const err = (await migrate(src, dst, { signal: ac.signal }).catch((e: unknown) => e)) as MigrationError;
    expect(err).toBeInstanceOf(MigrationError);
    expect(err.message).toMatch(/cancelled/);
    expect(await src.migrationState()).toBe(RUNNING);
    expect(await dst.migrationState()).toBe(RUNNING);
  });
});

describe('a client that dies in the middle', () => {
  it('in STOP_COPY: the NVMe source runs again for the next, plain client', async () => {
    const a = await serve(nvme());
    const src = await connect(a.socketPath);
    const driver = await NvmeDriver.open(src, { ioQueues: 1 });
    await driver.createIoQueuePair({ depth: 4 });
    await src.setMigrationState(PRE_COPY);
    await src.readMigrationData();
    await src.setMigrationState(STOP_COPY);
    await src.readMigrationData(4096);
    expect(a.device.stopped).toBe(true);
    const gone = new Promise((r) => a.server.once('disconnect', r));
    await src.close();
    await gone;
    expect(a.device.stopped).toBe(false);
    // A client that knows nothing of migration finds a working controller.
    const next = await connect(a.socketPath);
    expect(await next.migrationState()).toBe(RUNNING);
    const d2 = await NvmeDriver.open(next, { ioQueues: 1 });
    const qp = await d2.createIoQueuePair({ depth: 4 });
    const buf = await d2.allocateBuffer(4096);
    buf.bytes.fill(0x11);
    await qp.submit({ opcode: 0x01, nsid: 1, cdw12: 7 }, { data: { iova: buf.iova, length: 4096 } });
    buf.bytes.fill(0);
    await qp.submit({ opcode: 0x02, nsid: 1, cdw12: 7 }, { data: { iova: buf.iova, length: 4096 } });
    expect(buf.bytes.every((b) => b === 0x11)).toBe(true);
    await d2.close();
  });

  it('in RESUMING: the destination runs for the next client, nothing of the half stream loaded', async () => {
    const a = await serve(new Idio16Device());
    const b = await serve(new Idio16Device());
    const src = await connect(a.socketPath);
    await (await PciFunction.open(src)).enable();
    await src.write(IDIO16_BAR, 0, Buffer.from([0x99]), { posted: false });
    const dst = await connect(b.socketPath);
    await dst.setMigrationState(RESUMING);
    await src.setMigrationState(STOP_COPY);
    await dst.writeMigrationData(await src.readMigrationData(64));
    const gone = new Promise((r) => b.server.once('disconnect', r));
    await dst.close();
    await gone;
    expect(b.device.stopped).toBe(false);
    const next = await connect(b.socketPath);
    expect(await next.migrationState()).toBe(RUNNING);
    expect((await next.read(IDIO16_BAR, 0, 1))[0]).toBe(0);
    await src.setMigrationState(RUNNING);
    expect(a.device.outputs).toBe(0x99);
  });
});

// ---- interop: a libvfio-user-like server whose stream is raw BAR bytes ----

/**
 * libvfio-user's migration v2 as its sample `server` does it (samples/server.c): PRE_COPY streams
 * BAR1 (0x3000 bytes), STOP_COPY streams BAR1 and then BAR0 (8 bytes), RESUMING takes BAR1 then
 * BAR0; MIG_DATA_READ replies are padded to the requested size (only `size` counts); features are
 * refused with EINVAL when absent; DMA_LOGGING_REPORT must name exactly one map.
 */
function lvuMigration(bar1: Buffer, bar0: Buffer, log: string[]) {
  let state: number = RUNNING;
  let sent = 0;
  let received = 0;
  const maps: { iova: bigint; size: bigint }[] = [];
  const reply = (fake: FakeServer, msg: RawMessage, body?: Buffer, error = 0) => fake.reply(msg, body, error ? { error } : undefined);
  const featureReply = (flags: number, data: Buffer) => {
    const b = Buffer.alloc(8 + data.length);
    b.writeUInt32LE(8 + data.length, 0);
    b.writeUInt32LE(flags, 4);
    data.copy(b, 8);
    return b;
  };
  const total = () => bar1.length + (state === STOP_COPY ? bar0.length : 0);
  const overrides: Partial<Record<number, (msg: RawMessage, fake: FakeServer) => boolean | void>> = {
    [Command.DMA_MAP]: (msg, fake) => {
      maps.push({ iova: msg.payload.readBigUInt64LE(16), size: msg.payload.readBigUInt64LE(24) });
      reply(fake, msg);
      return true;
    },
    [Command.DEVICE_FEATURE]: (msg, fake) => {
      const p = msg.payload;
      const flags = p.readUInt32LE(4);
      const feature = flags & 0xffff;
      const data = p.subarray(8);
      if (flags & DeviceFeature.PROBE) return (reply(fake, msg, Buffer.from(p)), true);
      if (feature === DeviceFeature.MIGRATION && flags & DeviceFeature.GET) {
        const d = Buffer.alloc(8);
        d.writeBigUInt64LE(5n);
        return (reply(fake, msg, featureReply(flags, d)), true);
      }
      if (feature === DeviceFeature.MIG_DEVICE_STATE) {
        if (flags & DeviceFeature.SET) {
          const to = data.readUInt32LE(0);
          log.push(`state ${to}`);
          if (to === STOP_COPY || to === PRE_COPY || to === RESUMING) {
            sent = 0;
            received = 0;
          }
          if (to === RUNNING && state === RESUMING && received !== bar1.length + bar0.length) return (reply(fake, msg, undefined, Errno.EINVAL), true);
          state = to;
        }
        const d = Buffer.alloc(8);
        d.writeUInt32LE(state, 0);
        d.writeUInt32LE(0xffffffff, 4);
        return (reply(fake, msg, featureReply(flags, d)), true);
      }
      if (feature === DeviceFeature.DMA_LOGGING_START) return (reply(fake, msg, Buffer.from(p)), true);
      if (feature === DeviceFeature.DMA_LOGGING_STOP) return (reply(fake, msg, Buffer.from(p)), true);
      if (feature === DeviceFeature.DMA_LOGGING_REPORT) {
        const iova = data.readBigUInt64LE(0);
        const length = data.readBigUInt64LE(8);
        const page = data.readBigUInt64LE(16);
        if (!maps.some((m) => m.iova === iova && m.size === length)) return (reply(fake, msg, undefined, Errno.EINVAL), true);
        const bitmap = Buffer.alloc(Number(((length / page + 63n) / 64n) * 8n));
        bitmap[0] = 0b101; // pages 0 and 2 written
        return (reply(fake, msg, featureReply(flags, Buffer.concat([data.subarray(0, 24), bitmap]))), true);
      }
      reply(fake, msg, undefined, Errno.EINVAL);
      return true;
    },
    [Command.MIG_DATA_READ]: (msg, fake) => {
      const size = msg.payload.readUInt32LE(4);
      if (state !== PRE_COPY && state !== STOP_COPY) return (reply(fake, msg, undefined, Errno.EINVAL), true);
      const n = Math.min(size, total() - sent);
      const all = state === STOP_COPY ? Buffer.concat([bar1, bar0]) : bar1;
      // Padded to the requested size, as libvfio-user does.
      const body = Buffer.alloc(8 + size);
      body.writeUInt32LE(8 + n, 0);
      body.writeUInt32LE(n, 4);
      all.copy(body, 8, sent, sent + n);
      sent += n;
      reply(fake, msg, body);
      return true;
    },
    [Command.MIG_DATA_WRITE]: (msg, fake) => {
      if (state !== RESUMING) return (reply(fake, msg, undefined, Errno.EINVAL), true);
      const size = msg.payload.readUInt32LE(4);
      const chunk = msg.payload.subarray(8, 8 + size);
      const all = Buffer.concat([bar1, bar0]);
      if (received + size > all.length) return (reply(fake, msg, undefined, Errno.EINVAL), true);
      chunk.copy(all, received);
      all.copy(bar1, 0, 0, bar1.length);
      all.copy(bar0, 0, bar1.length);
      received += size;
      reply(fake, msg);
      return true;
    },
  };
  return { overrides, maps };
}

describe('interop: a libvfio-user-like v2 device (opaque stream)', () => {
  it('STOP_COPY only: BAR1 and BAR0 bytes move as they are, padded replies read by size', async () => {
    const log: string[] = [];
    const srcBar1 = Buffer.alloc(0x3000, 0x61);
    const srcBar0 = Buffer.from('01234567');
    const s = lvuMigration(srcBar1, srcBar0, log);
    const d = lvuMigration(Buffer.alloc(0x3000), Buffer.alloc(8), log);
    const fs = new FakeServer(lvuHandler({ overrides: s.overrides }));
    const fd = new FakeServer(lvuHandler({ overrides: d.overrides }));
    cleanups.push(() => fs.close(), () => fd.close());
    // 64 KiB transfers: the fake sends each (padded) reply with one sendmsg.
    const src = await connect(fs.path, 65536);
    const dst = await connect(fd.path, 65536);
    expect(src.migrationChunkSize).toBe(65536);
    const mem = await src.allocateDma(4 * 4096);
    const pages: number[] = [];
    const result = await migrate(src, dst, { preCopy: false, onDirty: (m, bitmap) => void pages.push(...[...bitmap.ranges()].map((r) => (r.iova - m.iova) / 4096)) });
    expect(result.stopCopyBytes).toBe(0x3008);
    expect(result.bytes).toBe(0x3008);
    // The destination got exactly the bytes (its own check: it accepts RUNNING only then).
    expect(log).toEqual([`state ${RESUMING}`, `state ${STOP_COPY}`, `state ${STOP}`, `state ${RUNNING}`, `state ${STOP}`]);
    expect(pages).toEqual([0, 2]);
    expect(result.finalDirtyPages).toBe(2);
    expect(mem.mapped).toBe(true);
  });

  it('a source whose PRE_COPY stream differs from its STOP_COPY stream still moves in order', async () => {
    const log: string[] = [];
    const s = lvuMigration(Buffer.alloc(0x3000, 0x62), Buffer.from('abcdefgh'), log);
    const fs = new FakeServer(lvuHandler({ overrides: s.overrides }));
    cleanups.push(() => fs.close());
    const src = await connect(fs.path, 65536);
    // Our own server as the destination receives the opaque bytes and refuses them: not our format.
    const b = await serve(new Idio16Device());
    const dst = await connect(b.socketPath);
    const err = (await migrate(src, dst).catch((e: unknown) => e)) as MigrationError;
    expect(err).toBeInstanceOf(MigrationError);
    expect(b.server.migration!.lastError!.message).toMatch(/not a vfio-user device state stream/);
    // The libvfio-user-like source was put back to RUNNING.
    expect(log.at(-1)).toBe(`state ${RUNNING}`);
    expect(err.sourceState).toBe(RUNNING);
    expect(err.destinationState).toBe(RUNNING);
  });

  it('a device without migration is refused before anything changes', async () => {
    const fs = new FakeServer(lvuHandler());
    cleanups.push(() => fs.close());
    const src = await connect(fs.path);
    const b = await serve(new Idio16Device());
    const dst = await connect(b.socketPath);
    expect(await src.migrationSupport()).toBeNull();
    const err = (await migrate(src, dst).catch((e: unknown) => e)) as MigrationError;
    expect(err.message).toMatch(/source device cannot migrate/);
    expect(await dst.migrationState()).toBe(RUNNING);
    void PciIrq;
  });
});
