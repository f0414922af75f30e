import { describe, expect, it } from 'vitest';
import { checkDeviceInfo, fetchIrqs, fetchRegion } from '../../lib/client/device';
import type { Caller, CallSpec } from '../../lib/client/link';
import { ClientLimits, checkClientOptions, clientSettings } from '../../lib/client/options';
import { Command, DeviceFlags, Errno, RegionInfoFlags } from '../../lib/protocol/constants';
import { ProtocolError } from '../../lib/protocol/errors';
import { encodeIrqInfoReply } from '../../lib/protocol/messages/irq';
import { decodeRegionInfoRequest, encodeRegionInfoReply } from '../../lib/protocol/messages/region';
import type { Body, IncomingMessage } from '../../lib/transport/connection';

/** A Caller that answers each request with `answer(command, body)`, fd-less, and records what was asked. */
function fakeCaller(answer: (command: number, body: Buffer) => Buffer): Caller & { asked: { command: number; body: Buffer }[] } {
  const asked: { command: number; body: Buffer }[] = [];
  return {
    asked,
    call<T>(command: number, body: Body, parse: (reply: IncomingMessage) => T, _spec?: CallSpec): Promise<T> {
      const bytes = Buffer.concat(body === null || body === undefined ? [] : body instanceof Uint8Array ? [body] : [...body]);
      asked.push({ command, body: bytes });
      const payload = answer(command, bytes);
      const reply = { payload, payloadLength: payload.length, fdCount: 0, takeAllFds: () => [] } as unknown as IncomingMessage;
      try {
        return Promise.resolve(parse(reply));
      } catch (err) {
        return Promise.reject(err as Error);
      }
    },
  };
}

const PCI = DeviceFlags.PCI;

describe('client device info (device.ts)', () => {
  it('summarises a PCI device and refuses what QEMU refuses, with EPROTO and the field', () => {
    expect(checkDeviceInfo({ argsz: 16, flags: PCI | DeviceFlags.RESET, numRegions: 9, numIrqs: 5 })).toEqual({ flags: PCI | DeviceFlags.RESET, numRegions: 9, numIrqs: 5, resettable: true });
    const cases: [flags: number, numRegions: number, numIrqs: number, field: string][] = [
      [0, 9, 5, 'flags'],
      [PCI, ClientLimits.MAX_REGIONS + 1, 5, 'num_regions'],
      [PCI, 7, 5, 'num_regions'],
      [PCI, 9, ClientLimits.MAX_IRQS + 1, 'num_irqs'],
    ];
    for (const [flags, numRegions, numIrqs, field] of cases) {
      let error: unknown;
      try {
        checkDeviceInfo({ argsz: 16, flags, numRegions, numIrqs });
      } catch (err) {
        error = err;
      }
      expect(error).toBeInstanceOf(ProtocolError);
      expect(error).toMatchObject({ errno: Errno.EPROTO, field });
    }
  });

  it('asks for region info twice when the first answer is truncated, with the argsz the server named', async () => {
    const init = { flags: RegionInfoFlags.READ, index: 2, size: 0x1000n, capabilities: [{ kind: 'type' as const, version: 1, type: 1, subtype: 2 }] };
    const caller = fakeCaller((_command, body) => encodeRegionInfoReply(init, decodeRegionInfoRequest(body).argsz));
    const record = await fetchRegion(caller, 2);
    expect(caller.asked.map((a) => decodeRegionInfoRequest(a.body).argsz)).toEqual([32, encodeRegionInfoReply(init).length]);
    expect(record.info).toMatchObject({ index: 2, size: 0x1000 });
  });

  it('refuses IRQ info that answers another index', async () => {
    const caller = fakeCaller(() => encodeIrqInfoReply({ index: 0, flags: 0, count: 1 }));
    await expect(fetchIrqs(caller, 2, 'test')).rejects.toMatchObject({ field: 'index' });
    expect(caller.asked.map((a) => a.command)).toEqual([Command.DEVICE_GET_IRQ_INFO, Command.DEVICE_GET_IRQ_INFO]);
  });
});

describe('client options (options.ts)', () => {
  it('applies the documented defaults', () => {
    expect(clientSettings({})).toMatchObject({ maxMsgFds: 16, maxDataXferSize: 1024 * 1024, timeoutMs: 5000, twinSocket: true, postedWrites: true, writeMultiple: true, reconnect: false });
  });

  it('refuses options out of range before anything is opened', () => {
    expect(() => checkClientOptions({ timeoutMs: 0 })).toThrow(RangeError);
    expect(() => checkClientOptions({ maxMsgFds: '4' as unknown as number })).toThrow(TypeError);
    expect(() => checkClientOptions({ version: { major: 0x10000, minor: 0 } })).toThrow(/version\.major/);
  });
});
