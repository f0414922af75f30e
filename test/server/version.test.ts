/**
 * VERSION (reference §3.1): negative cases first, then negotiation results and the reply size rule
 * (the reply is never longer than the request: QEMU sizes its receive buffer by its request).
 */
import { describe, it, expect } from 'vitest';
import { Command, Errno } from '../../lib/protocol/constants';
import { EventFd } from '../../lib/native/eventfd';
import { regionAccess, TestDevice } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';
import { closed, connect, defer, deviceInfo, message, RawSocket, serve, setup, useTeardown, versionPayload } from './support';
import type { MigrationHooks } from '../../lib/server/migration';

useFdLeakCheck();
useTeardown();

/** QEMU 11.1's VERSION proposal, byte for byte (reference §3.1): 178 bytes of JSON. */
const QEMU_JSON =
  '{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},' +
  '"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,' +
  '"max_dma_maps":65535,"write_multiple":true}}';

function parseReply(payload: Buffer): { major: number; minor: number; json: Record<string, unknown> | null } {
  const major = payload.readUInt16LE(0);
  const minor = payload.readUInt16LE(2);
  if (payload.length === 4) return { major, minor, json: null };
  expect(payload[payload.length - 1]).toBe(0);
  return { major, minor, json: JSON.parse(payload.subarray(4, payload.length - 1).toString('utf8')) as Record<string, unknown> };
}

/** A fresh un-negotiated client; VERSION with `payload` (and fds) -> reply payload or errno. */
async function version(payload: Buffer, fds?: number[], device = new TestDevice()) {
  const { client } = await setup(device, {}, false);
  const reply = await client.msg(Command.VERSION, payload, fds);
  return { client, reply };
}

/** The request was refused with EINVAL and the server hung up. */
async function expectRefusedAndClosed(payload: Buffer, fds?: number[]) {
  const { client, reply } = await version(payload, fds);
  expect(reply).toBe(Errno.EINVAL);
  await closed(client.conn);
  expect(client.conn.state).toBe('closed');
}

class MigratableDevice extends TestDevice {
  readonly migration: MigrationHooks = { setRunning: () => {}, save: () => Buffer.alloc(0), load: () => {} };
}

describe('VERSION: refused', () => {
  it('closes the connection on a command before VERSION', async () => {
    const { client } = await setup(undefined, {}, false);
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBe(Errno.EINVAL);
    await closed(client.conn);
    expect(client.conn.state).toBe('closed');
  });

  it('closes the connection on a REGION_READ before VERSION, without executing it', async () => {
    const { client, device } = await setup(undefined, {}, false);
    expect(await client.msg(Command.REGION_WRITE, regionAccess(7, 0, 1, Buffer.from([0xff])))).toBe(Errno.EINVAL);
    await closed(client.conn);
    expect(device.config[0]).toBe(0x34);
  });

  it('refuses VERSION carrying an fd (and closes that fd)', async () => {
    const efd = EventFd.create();
    defer(() => efd.close());
    await expectRefusedAndClosed(versionPayload(0, 0, '{}'), [efd.fd.value]);
  });

  it('refuses a payload shorter than major + minor', async () => {
    await expectRefusedAndClosed(Buffer.from([0, 0]));
  });

  it('refuses JSON that does not parse', async () => {
    await expectRefusedAndClosed(versionPayload(0, 0, '{"capabilities":'));
  });

  it('refuses JSON without its NUL', async () => {
    await expectRefusedAndClosed(versionPayload(0, 0, '{}', false));
  });

  it('refuses a NUL that is not the last byte', async () => {
    await expectRefusedAndClosed(Buffer.concat([versionPayload(0, 0, '{}'), Buffer.from('  ')]));
  });

  it('refuses JSON that is not an object', async () => {
    await expectRefusedAndClosed(versionPayload(0, 0, '[1,2]'));
  });

  it('refuses bytes that are not UTF-8', async () => {
    await expectRefusedAndClosed(Buffer.concat([versionPayload(0, 0, null), Buffer.from([0x7b, 0xff, 0x7d, 0])]));
  });

  it('refuses capabilities of the wrong JSON type', async () => {
    await expectRefusedAndClosed(versionPayload(0, 0, '{"capabilities":{"max_msg_fds":"16"}}'));
    await expectRefusedAndClosed(versionPayload(0, 0, '{"capabilities":[]}'));
  });

  it('refuses an impossible capability value (max_data_xfer_size 0)', async () => {
    await expectRefusedAndClosed(versionPayload(0, 0, '{"capabilities":{"max_data_xfer_size":0}}'));
  });

  it('refuses major 1', async () => {
    await expectRefusedAndClosed(versionPayload(1, 0, '{}'));
  });

  it('answers a second VERSION with EINVAL and keeps serving', async () => {
    const { client } = await setup();
    expect(await client.msg(Command.VERSION, versionPayload(0, 0, QEMU_JSON))).toBe(Errno.EINVAL);
    expect(client.conn.state).toBe('open');
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
  });
});

describe('VERSION: negotiation', () => {
  it('answers minor 0 with 0.0 (QEMU) and minor 2 with 0.2', async () => {
    for (const minor of [0, 2]) {
      const { reply } = await version(versionPayload(0, minor, '{}'));
      const r = parseReply(reply as Buffer);
      expect([r.major, r.minor]).toEqual([0, minor]);
    }
  });

  it('answers a newer minor with its own (0.2)', async () => {
    const { reply } = await version(versionPayload(0, 7, QEMU_JSON));
    expect(parseReply(reply as Buffer).minor).toBe(2);
  });

  it('echoes msg_id and command, Type = reply', async () => {
    const { socketPath } = await serve();
    const raw = new RawSocket(socketPath);
    raw.send(message(0x4321, Command.VERSION, versionPayload(0, 0, '{}')));
    const m = await raw.next();
    expect(m).toMatchObject({ msgId: 0x4321, command: Command.VERSION, flags: 1, error: 0 });
  });

  it("keeps the reply to QEMU's exact 199-byte request within 199 bytes", async () => {
    const request = versionPayload(0, 0, QEMU_JSON);
    expect(16 + request.length).toBe(199);
    for (const device of [new TestDevice(), new MigratableDevice()]) {
      const { reply } = await version(request, undefined, device);
      const payload = reply as Buffer;
      expect(16 + payload.length).toBeLessThanOrEqual(199);
      const r = parseReply(payload);
      expect([r.major, r.minor]).toEqual([0, 0]);
      const caps = r.json!.capabilities as Record<string, unknown>;
      expect(caps.max_msg_fds).toBe(16);
      expect(caps.max_data_xfer_size).toBe(1048576);
    }
  });

  it('answers a short request ({} + NUL) with {} + NUL', async () => {
    const { reply } = await version(versionPayload(0, 0, '{}'));
    expect(reply).toEqual(versionPayload(0, 0, '{}'));
  });

  it('answers a request without JSON with major and minor only', async () => {
    const { reply } = await version(versionPayload(0, 0, null));
    expect(reply).toEqual(versionPayload(0, 0, null));
  });

  it('never answers longer than the request, whatever its length', async () => {
    // Requests of every size class between "no JSON" and QEMU's, padded with a string member.
    for (const pad of [0, 1, 5, 20, 40, 60, 80, 100, 110, 115, 120, 125, 130, 160]) {
      const json = `{"x":"${'a'.repeat(pad)}"}`;
      const request = versionPayload(0, 0, json);
      const { reply, client } = await version(request, undefined, new MigratableDevice());
      const payload = reply as Buffer;
      expect(payload.length, `request of ${request.length} bytes`).toBeLessThanOrEqual(request.length);
      const r = parseReply(payload);
      expect(r.major).toBe(0);
      // What fits is kept, max_msg_fds first (it is the limit that matters most).
      if (payload.length > 40) expect((r.json!.capabilities as Record<string, unknown>).max_msg_fds).toBe(16);
      client.close();
    }
  });

  it('announces every capability when the request leaves room', async () => {
    const long = versionPayload(0, 0, `{"x":"${'a'.repeat(300)}"}`);
    const { reply } = await version(long, undefined, new MigratableDevice());
    const caps = parseReply(reply as Buffer).json!.capabilities as Record<string, unknown>;
    expect(caps).toMatchObject({ max_msg_fds: 16, max_data_xfer_size: 1048576, pgsizes: 4096, max_dma_maps: 65535, write_multiple: true });
    expect(caps.migration).toMatchObject({ pgsize: 4096 });
  });

  it("applies the client's max_data_xfer_size to region accesses", async () => {
    const { client } = await setup(undefined, {}, false);
    const r = await client.msg(Command.VERSION, versionPayload(0, 0, '{"capabilities":{"max_data_xfer_size":16}}'));
    expect(r).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.REGION_READ, regionAccess(7, 0, 16))).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.REGION_READ, regionAccess(7, 0, 17))).toBe(Errno.EINVAL);
  });

  it('serves a new client after a failed negotiation', async () => {
    const { client, socketPath } = await setup(undefined, {}, false);
    expect(await client.msg(Command.VERSION, versionPayload(1, 0, '{}'))).toBe(Errno.EINVAL);
    await closed(client.conn);
    const next = await connect(socketPath);
    expect(await next.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
  });

  it('announces the migration capability only for a migratable device', async () => {
    const long = versionPayload(0, 0, `{"x":"${'a'.repeat(300)}"}`);
    const { reply } = await version(long);
    expect((parseReply(reply as Buffer).json!.capabilities as Record<string, unknown>).migration).toBeUndefined();
  });
});
