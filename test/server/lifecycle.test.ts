/**
 * VfioUserServer's life cycle (reference §1.2, §6.1, §6.3): the socket file, one client at a
 * time, and what a hang-up leaves behind (nothing: maps unmapped, eventfds closed, the device told).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, it, expect } from 'vitest';
import { binding } from '../../lib/native/binding';
import { EventFd } from '../../lib/native/eventfd';
import { Fd } from '../../lib/native/fd';
import { Command, DmaMapFlags, Errno, IrqSetFlags, PciIrq } from '../../lib/protocol/constants';
import { VfioUserServer } from '../../lib/server/server';
import { rawClient, regionAccess, TestDevice, tempSocketPath } from '../helpers/server';
import { countOpenFds, useFdLeakCheck } from '../helpers/fds';
import { closed, connect, defer, deviceInfo, dmaMap, guestMemory, mappingsOf, message, RawSocket, serve, setIrqs, sleep, tracked, useTeardown, versionPayload } from './support';

useFdLeakCheck();
useTeardown();

function tempDir(): { dir: string; path: string } {
  const t = tempSocketPath();
  defer(() => fs.rmSync(t.dir, { recursive: true, force: true }));
  return t;
}

async function listen(socketPath: string, device: TestDevice = new TestDevice(), mode?: number) {
  const server = await VfioUserServer.listen(socketPath, device, mode === undefined ? {} : { mode });
  defer(() => server.close());
  return server;
}

const disconnected = (server: VfioUserServer) => new Promise<Error | null>((resolve) => server.once('disconnect', resolve));

describe('socket file', () => {
  it('is created with mode 0600, or the mode asked for', async () => {
    const a = tempDir();
    await listen(a.path);
    expect(fs.statSync(a.path).mode & 0o777).toBe(0o600);
    expect(fs.statSync(a.path).isSocket()).toBe(true);
    const b = tempDir();
    await listen(b.path, new TestDevice(), 0o660);
    expect(fs.statSync(b.path).mode & 0o777).toBe(0o660);
  });

  it("refuses to take over a live server's socket, which keeps serving undisturbed", async () => {
    const { path: socketPath } = tempDir();
    const device = new TestDevice();
    await listen(socketPath, device);
    await expect(VfioUserServer.listen(socketPath, new TestDevice())).rejects.toMatchObject({ code: 'EADDRINUSE' });
    // A client connecting right away is served, although the refused server's liveness probe
    // may still hold the live server's attention, and the probe reset nothing.
    const client = await connect(socketPath);
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
    expect(device.calls).toEqual([]);
  });

  it('replaces a stale socket file nobody listens on', async () => {
    const { path: socketPath } = tempDir();
    new Fd(binding.unixListen(socketPath, 1)).close();
    expect(fs.statSync(socketPath).isSocket()).toBe(true);
    await listen(socketPath);
    const client = await connect(socketPath);
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
  });

  it('refuses to replace a file that is not a socket, and leaves it alone', async () => {
    const { dir, path: socketPath } = tempDir();
    fs.writeFileSync(socketPath, 'precious');
    await expect(VfioUserServer.listen(socketPath, new TestDevice())).rejects.toMatchObject({ code: 'EADDRINUSE' });
    expect(fs.readFileSync(socketPath, 'utf8')).toBe('precious');
    const sub = path.join(dir, 'sub');
    fs.mkdirSync(sub);
    await expect(VfioUserServer.listen(sub, new TestDevice())).rejects.toMatchObject({ code: 'EADDRINUSE' });
  });

  it('is removed by close(), which disconnects the client and closes the device', async () => {
    let deviceClosed = 0;
    class Closing extends TestDevice {
      close(): void {
        deviceClosed++;
      }
    }
    const { path: socketPath } = tempDir();
    const server = await VfioUserServer.listen(socketPath, new Closing());
    const client = await rawClient(socketPath);
    defer(() => client.close());
    const fds = countOpenFds();
    await server.close();
    await server.close(); // idempotent
    expect(fs.existsSync(socketPath)).toBe(false);
    await closed(client.conn);
    expect(deviceClosed).toBe(1);
    expect(countOpenFds()).toBe(fds - 3); // listening socket, both ends of the connection
  });
});

describe('one client at a time', () => {
  it('turns a second client away with EBUSY; the first keeps working', async () => {
    const { socketPath, server, device } = await serve();
    const rejects: number[] = [];
    server.on('reject', () => rejects.push(1));
    const first = await connect(socketPath);
    const second = await connect(socketPath, false);
    expect(await second.msg(Command.VERSION, Buffer.from([0, 0, 0, 0]))).toBe(Errno.EBUSY);
    await closed(second.conn);
    expect(rejects).toEqual([1]);
    expect(await first.msg(Command.REGION_WRITE, regionAccess(7, 4, 1, Buffer.from([9])))).toBeInstanceOf(Buffer);
    expect(device.config[4]).toBe(9);
    expect(device.calls).toEqual(['config write 4 1']);
  });

  it('serves a client that connects in the same instant the previous one hangs up', async () => {
    const { socketPath, device } = await serve();
    const first = await rawClient(socketPath);
    // New connection and hang-up are pending together when the server next looks (the
    // connection first, so that the accept is likely handled before the hang-up is read).
    const raw = new RawSocket(socketPath);
    first.close();
    raw.send(message(0, Command.VERSION, versionPayload(0, 0, '{}')));
    expect(await raw.next()).toMatchObject({ flags: 1, error: 0 });
    raw.send(message(1, Command.DEVICE_GET_INFO, deviceInfo()));
    expect(await raw.next()).toMatchObject({ msgId: 1, flags: 1, error: 0 });
    expect(device.calls).toEqual(['reset lost-connection']);
  });

  it('serves a client that connects while the previous one is still being cleaned up', async () => {
    class SlowReset extends TestDevice {
      override async reset(reason: string): Promise<void> {
        this.calls.push(`reset ${reason}`);
        if (reason === 'lost-connection') await sleep(80);
      }
    }
    const { socketPath, server, device } = await serve(new SlowReset());
    const first = await rawClient(socketPath);
    const gone = disconnected(server);
    first.close();
    await sleep(10);
    expect(device.calls).toEqual(['reset lost-connection']);
    const next = tracked(connect(socketPath));
    await gone;
    const client = await next.promise;
    expect(await client.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
  });
});

describe('after the client hangs up', () => {
  it('drops maps and eventfds, resets the device, and serves the next client', async () => {
    const { socketPath, server, device } = await serve();
    const events: string[] = [];
    server.on('connect', () => events.push('connect'));
    server.on('disconnect', (err) => events.push(`disconnect ${String(err)}`));
    const mem = guestMemory('hangup', 4 * 4096);
    const efds = [EventFd.create(), EventFd.create()];
    defer(() => efds.forEach((e) => e.close()));
    const baseline = countOpenFds();

    const client = await rawClient(socketPath);
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, 0, 4 * 4096), [mem.fd.value])).toBeInstanceOf(Buffer);
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ, 0x100000, 4096))).toBeInstanceOf(Buffer);
    const trigger = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER;
    expect(await client.msg(Command.DEVICE_SET_IRQS, setIrqs(trigger, PciIrq.MSIX, 0, 2), efds.map((e) => e.fd.value))).toBeInstanceOf(Buffer);
    expect(mappingsOf('hangup')).toBe(2);
    expect(countOpenFds()).toBe(baseline + 4); // both socket ends, two eventfds

    const gone = disconnected(server);
    client.close();
    expect(await gone).toBeNull();
    expect(events).toEqual(['connect', 'disconnect null']);
    expect(countOpenFds()).toBe(baseline);
    expect(mappingsOf('hangup')).toBe(1);
    const { dma, irqs } = device.ctx!;
    expect(dma.count).toBe(0);
    expect(irqs.eventfdCount(PciIrq.MSIX)).toBe(0);
    expect(device.calls).toEqual(['reset lost-connection']);
    expect(server.connected).toBe(false);

    const next = await connect(socketPath);
    expect(await next.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
    expect(server.connected).toBe(true);
  });

  it('lets the reset release DMA the device still holds, then unmaps', async () => {
    class Holding extends TestDevice {
      held: { release(): void } | null = null;
      override reset(reason: string): void {
        this.calls.push(`reset ${reason}`);
        this.held?.release();
      }
    }
    const { socketPath, server, device } = await serve(new Holding());
    const mem = guestMemory('held', 4096);
    const client = await rawClient(socketPath);
    expect(await client.msg(Command.DMA_MAP, dmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, 0, 4096), [mem.fd.value])).toBeInstanceOf(Buffer);
    device.held = device.ctx!.dma.acquire(0, 4096, true);
    const gone = disconnected(server);
    client.close();
    await gone;
    expect(mappingsOf('held')).toBe(1);
  });

  it('survives a hang-up in the middle of a slow command', async () => {
    let finish: () => void = () => {};
    const device = new TestDevice();
    device.regions[2] = { size: 16, flags: 3, read: () => new Promise<void>((resolve) => (finish = resolve)), write: () => {} };
    const { socketPath, server } = await serve(device);
    const client = await rawClient(socketPath);
    const pending = client.msg(Command.REGION_READ, regionAccess(2, 0, 4));
    await sleep(10);
    const gone = disconnected(server);
    client.close();
    expect(await pending).toBe(Errno.ECONNRESET);
    await gone;
    finish();
    const next = await connect(socketPath);
    expect(await next.msg(Command.REGION_READ, regionAccess(7, 0, 4))).toBeInstanceOf(Buffer);
  });

  it('survives a hang-up in the middle of a message, and counts it as an error', async () => {
    const { socketPath, server } = await serve();
    const raw = new RawSocket(socketPath);
    raw.send(Buffer.from([0, 0, 1, 0, 199, 0, 0, 0, 0, 0])); // 10 bytes of a VERSION header
    await sleep(10);
    const gone = disconnected(server);
    raw.close();
    expect(await gone).toMatchObject({ message: expect.stringMatching(/mid-message/) });
    const next = await connect(socketPath);
    expect(await next.msg(Command.DEVICE_GET_INFO, deviceInfo())).toBeInstanceOf(Buffer);
  });

  it('does not reset the device for a connection that never negotiated', async () => {
    const { socketPath, server, device } = await serve();
    const raw = new RawSocket(socketPath);
    await sleep(10);
    const gone = disconnected(server);
    raw.close();
    await gone;
    expect(device.calls).toEqual([]);
  });
});
