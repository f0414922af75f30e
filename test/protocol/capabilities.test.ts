import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  CAPABILITY_TABLE,
  NEGOTIATION_RULES,
  ProtocolError,
  defaultCapabilities,
  negotiate,
  parseCapabilities,
  serverReplyCapabilities,
  parseJson,
  withDefaults,
  type Capabilities,
  type VersionInfo,
} from '../../lib/protocol';

const caps = (json: string): Capabilities => parseCapabilities(parseJson(json)).capabilities;
const info = (c: Partial<Capabilities>, minor = 2, major = 0): VersionInfo => ({ major, minor, capabilities: withDefaults(c) });

describe('capability parsing: types as the real peers check them', () => {
  it('has a table entry for every key of reference 3.1', () => {
    expect(CAPABILITY_TABLE.map((e) => e.name)).toEqual([
      'max_msg_fds', 'max_data_xfer_size', 'max_dma_maps', 'pgsizes', 'write_multiple', 'twin_socket', 'migration',
    ]);
  });

  it('applies the defaults of reference 1.12', () => {
    expect(parseCapabilities(null).capabilities).toEqual(defaultCapabilities());
    expect(caps('{}')).toEqual(defaultCapabilities());
    expect(caps('{"capabilities":{}}')).toEqual({
      maxMsgFds: 1, maxDataXferSize: 1048576, maxDmaMaps: 65535, pgsizes: 4096n, writeMultiple: false,
      twinSocket: { supported: false }, migration: undefined,
    });
  });

  it.each([
    ['max_msg_fds', '8.0'],
    ['max_msg_fds', '"8"'],
    ['max_msg_fds', '-1'],
    ['max_msg_fds', 'true'],
    ['max_msg_fds', '4294967296'],
    ['max_data_xfer_size', '1e6'],
    ['max_data_xfer_size', 'null'],
    ['max_dma_maps', '{}'],
    ['pgsizes', '4096.5'],
    ['pgsizes', '18446744073709551616'],
    ['write_multiple', '1'],
    ['write_multiple', '"true"'],
    ['twin_socket', 'true'],
    ['twin_socket', '{"supported":1}'],
    ['twin_socket', '{"supported":true,"fd_index":-1}'],
    ['twin_socket', '{"supported":true,"fd_index":0.0}'],
    ['migration', '4096'],
    ['migration', '{"pgsize":"4096"}'],
    ['migration', '{"pgsize":4096,"max_bitmap_size":1.5}'],
  ])('rejects %s = %s with a ProtocolError naming the key', (key, value) => {
    let err: unknown;
    try {
      caps(`{"capabilities":{"${key}":${value}}}`);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ProtocolError);
    expect((err as ProtocolError).field).toMatch(new RegExp(`^capabilities\\.${key}`));
    expect((err as ProtocolError).errno).toBe(22);
  });

  it('keeps a 64-bit pgsizes exactly', () => {
    expect(caps('{"capabilities":{"pgsizes":18446744073709547520}}').pgsizes).toBe(0xfffffffffffff000n);
  });

  it('takes the last of duplicate keys, like json-c and JSON.parse', () => {
    expect(caps('{"capabilities":{"max_msg_fds":1,"max_msg_fds":4}}').maxMsgFds).toBe(4);
  });
});

describe('negotiation: the peer may only lower our limits', () => {
  it('has one rule per capability', () => {
    expect(NEGOTIATION_RULES.map((r) => r.name)).toEqual([
      'max_msg_fds', 'max_data_xfer_size', 'max_dma_maps', 'pgsizes', 'write_multiple', 'twin_socket', 'migration',
    ]);
  });

  it('client against libvfio-user: what the real exchange yields', () => {
    const local = info({ maxMsgFds: 16, maxDataXferSize: 1048576, twinSocket: { supported: true } }, 2);
    const peer: VersionInfo = { major: 0, minor: 1, capabilities: caps('{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}') };
    expect(negotiate({ role: 'client', local, peer })).toEqual({
      major: 0, minor: 1, maxSendFds: 8, maxRecvFds: 16, maxDataXferSize: 1048576, maxDmaMaps: 65535,
      pgsizes: 4096n, writeMultiple: false, twinSocket: false, twinSocketFdIndex: undefined,
      migrationPgsize: 4096, maxBitmapSize: 268435456,
    });
  });

  it('server against the QEMU client: server-side caps are ours, the client limits what we send', () => {
    const qemu: VersionInfo = {
      major: 0, minor: 0,
      capabilities: caps('{"capabilities":{"pgsizes":4096,"max_msg_fds":16,"max_dma_maps":65535,"max_data_xfer_size":1048576,"migration":{"max_bitmap_size":268435456,"pgsize":4096},"write_multiple":true}}'),
    };
    const local = info({ maxMsgFds: 8, maxDataXferSize: 1 << 20, pgsizes: 4096n | (1n << 21n), maxDmaMaps: 1024, writeMultiple: false, twinSocket: { supported: true } });
    const n = negotiate({ role: 'server', local, peer: qemu });
    expect(n.minor).toBe(0);
    expect(n.maxSendFds).toBe(16);
    expect(n.maxRecvFds).toBe(8);
    expect(n.maxDmaMaps).toBe(1024); // our own announcement, not the client's
    expect(n.pgsizes).toBe(4096n | (1n << 21n));
    expect(n.writeMultiple).toBe(false); // we did not announce it, whatever the client says
    expect(n.twinSocket).toBe(false); // QEMU does not offer it
  });

  it('lowers, never raises, the data limit and the fd count', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 2 ** 40 }), fc.integer({ min: 1, max: 2 ** 40 }), fc.nat(5000), (mine, theirs, fds) => {
        const n = negotiate({ role: 'client', local: info({ maxDataXferSize: mine }), peer: info({ maxDataXferSize: theirs, maxMsgFds: fds }) });
        expect(n.maxDataXferSize).toBe(Math.min(mine, theirs, 64 * 1024 * 1024));
        expect(n.maxSendFds).toBe(Math.min(fds, 253));
      }),
    );
  });

  it('caps max_dma_maps and max_bitmap_size at our ceilings', () => {
    const n = negotiate({
      role: 'client', local: info({}),
      peer: info({ maxDmaMaps: 1_000_000, migration: { maxBitmapSize: 2 ** 40 } }),
    });
    expect(n.maxDmaMaps).toBe(65535);
    expect(n.maxBitmapSize).toBe(268435456);
    const m = negotiate({ role: 'client', local: info({}), peer: info({ maxDmaMaps: 16 }), limits: { maxDmaMaps: 10 } });
    expect(m.maxDmaMaps).toBe(10);
  });

  it('refuses a zero max_data_xfer_size and pgsizes below 4 KiB', () => {
    expect(() => negotiate({ role: 'client', local: info({}), peer: info({ maxDataXferSize: 0 }) })).toThrow(/max_data_xfer_size/);
    expect(() => negotiate({ role: 'client', local: info({}), peer: info({ pgsizes: 4096n | 512n }) })).toThrow(/pgsizes/);
    expect(() => negotiate({ role: 'client', local: info({}), peer: info({ pgsizes: 0n }) })).toThrow(/pgsizes/);
    expect(() => negotiate({ role: 'client', local: info({}), peer: info({ migration: { pgsize: 1000 } }) })).toThrow(/migration/);
    expect(negotiate({ role: 'client', local: info({ migration: { pgsize: 65536 } }), peer: info({ migration: { pgsize: 8192 } }) }).migrationPgsize).toBe(8192);
  });

  describe('version', () => {
    it('server answers min(client, ours) and refuses another major', () => {
      expect(negotiate({ role: 'server', local: info({}, 2), peer: info({}, 0) }).minor).toBe(0);
      expect(negotiate({ role: 'server', local: info({}, 2), peer: info({}, 7) }).minor).toBe(2);
      expect(() => negotiate({ role: 'server', local: info({}, 2), peer: info({}, 2, 1) })).toThrow(/major 1 is not 0/);
    });

    it('client accepts any 0.x not newer than proposed', () => {
      expect(negotiate({ role: 'client', local: info({}, 2), peer: info({}, 1) }).minor).toBe(1);
      expect(() => negotiate({ role: 'client', local: info({}, 2), peer: info({}, 3) })).toThrow(/newer than the proposed/);
      expect(() => negotiate({ role: 'client', local: info({}, 2), peer: info({}, 0, 1) })).toThrow(ProtocolError);
    });
  });

  describe('twin socket (reference 1.9)', () => {
    const offer = info({ maxMsgFds: 8, twinSocket: { supported: true } });

    it('server enables it only when offered, supported by us, and the client accepts fds', () => {
      expect(negotiate({ role: 'server', local: offer, peer: offer })).toMatchObject({ twinSocket: true, twinSocketFdIndex: 0 });
      expect(negotiate({ role: 'server', local: info({ twinSocket: { supported: false } }), peer: offer }).twinSocket).toBe(false);
      expect(negotiate({ role: 'server', local: offer, peer: info({ maxMsgFds: 8 }) }).twinSocket).toBe(false);
      expect(negotiate({ role: 'server', local: offer, peer: info({ maxMsgFds: 0, twinSocket: { supported: true } }) }).twinSocket).toBe(false);
    });

    it('client: enabled with a valid fd_index, off when the reply lacks it', () => {
      const reply = info({ twinSocket: { supported: true, fdIndex: 0 } });
      expect(negotiate({ role: 'client', local: offer, peer: reply, peerFds: 1 })).toMatchObject({ twinSocket: true, twinSocketFdIndex: 0 });
      expect(negotiate({ role: 'client', local: offer, peer: info({}) }).twinSocket).toBe(false);
      expect(negotiate({ role: 'client', local: offer, peer: info({ twinSocket: { supported: false, fdIndex: 3 } }) }).twinSocket).toBe(false);
    });

    it('server reply announces twin_socket only when enabled, with the fd index', () => {
      const own = { maxMsgFds: 8, maxDataXferSize: 1 << 20, twinSocket: { supported: true } };
      const on = negotiate({ role: 'server', local: info(own), peer: offer });
      expect(serverReplyCapabilities(own, on)).toEqual({ maxMsgFds: 8, maxDataXferSize: 1 << 20, twinSocket: { supported: true, fdIndex: 0 } });
      const off = negotiate({ role: 'server', local: info(own), peer: info({}) });
      expect(serverReplyCapabilities(own, off)).toEqual({ maxMsgFds: 8, maxDataXferSize: 1 << 20 });
      expect(own.twinSocket).toEqual({ supported: true }); // not mutated
    });

    it('client: inconsistent replies must close the connection', () => {
      expect(() => negotiate({ role: 'client', local: offer, peer: info({ twinSocket: { supported: true } }) })).toThrow(/no fd_index/);
      expect(() => negotiate({ role: 'client', local: offer, peer: info({ twinSocket: { supported: true, fdIndex: 1 } }), peerFds: 1 })).toThrow(/carried 1 fds/);
      expect(() => negotiate({ role: 'client', local: offer, peer: info({ twinSocket: { supported: true, fdIndex: 0 } }), peerFds: 0 })).toThrow(ProtocolError);
      expect(() => negotiate({ role: 'client', local: info({}), peer: info({ twinSocket: { supported: true, fdIndex: 0 } }) })).toThrow(/did not offer/);
    });
  });
});
