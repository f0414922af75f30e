// NBD codecs and URIs: pure functions, no sockets.
import { describe, expect, it } from 'vitest';
import { formatNbdTarget, nbdProtocol as P, parseNbdUri } from '../../lib/block';

describe('NBD URIs', () => {
  it('parses nbd://host[:port]/export, IPv6 literals, percent-encoding and the default export', () => {
    expect(parseNbdUri('nbd://127.0.0.1:10900/disk0')).toEqual({ host: '127.0.0.1', port: 10900, exportName: 'disk0' });
    expect(parseNbdUri('nbd://localhost/a/b%20c')).toEqual({ host: 'localhost', port: 10809, exportName: 'a/b c' });
    expect(parseNbdUri('nbd://[::1]:9000/')).toEqual({ host: '::1', port: 9000, exportName: '' });
    expect(parseNbdUri('nbd://example.com')).toEqual({ host: 'example.com', port: 10809, exportName: '' });
  });

  it('parses nbd+unix:///export?socket=PATH', () => {
    expect(parseNbdUri('nbd+unix:///vm1?socket=/run/qsd/nbd.sock')).toEqual({ socket: '/run/qsd/nbd.sock', exportName: 'vm1' });
    expect(parseNbdUri('nbd+unix://?socket=/tmp/s')).toEqual({ socket: '/tmp/s', exportName: '' });
  });

  it('refuses TLS, vsock, other schemes, missing sockets, stray parameters and credentials', () => {
    expect(() => parseNbdUri('nbds://host/x')).toThrow(/TLS/);
    expect(() => parseNbdUri('nbd+vsock:///x')).toThrow(/unsupported/);
    expect(() => parseNbdUri('http://host/x')).toThrow(/unsupported/);
    expect(() => parseNbdUri('/tmp/x.sock')).toThrow(/not an NBD URI/);
    expect(() => parseNbdUri('nbd+unix:///x')).toThrow(/socket=/);
    expect(() => parseNbdUri('nbd+unix://host/x?socket=/s')).toThrow(/no host/);
    expect(() => parseNbdUri('nbd+unix:///x?socket=/s&tls=1')).toThrow(/tls/);
    expect(() => parseNbdUri('nbd://host/x?socket=/s')).toThrow(/socket=/);
    expect(() => parseNbdUri('nbd://u:p@host/x')).toThrow(/user/);
    expect(() => parseNbdUri('nbd://host:99999/x')).toThrow();
  });

  it('formats targets back into URIs', () => {
    for (const uri of ['nbd://127.0.0.1/disk', 'nbd://[::1]:9000/a/b', 'nbd+unix:///vm?socket=/tmp/s.sock']) {
      expect(formatNbdTarget(parseNbdUri(uri))).toBe(uri);
    }
  });
});

describe('NBD codecs', () => {
  it('greeting: newstyle accepted; oldstyle and garbage refused as protocol errors', () => {
    const g = Buffer.alloc(18);
    g.writeBigUInt64BE(P.NBDMAGIC, 0);
    g.writeBigUInt64BE(P.IHAVEOPT, 8);
    g.writeUInt16BE(3, 16);
    expect(P.decodeGreeting(g)).toEqual({ handshakeFlags: 3 });
    g.writeBigUInt64BE(P.CLISERV_MAGIC, 8);
    expect(() => P.decodeGreeting(g)).toThrow(/oldstyle/);
    expect(() => P.decodeGreeting(Buffer.from('HTTP/1.1 400 Bad Request'.padEnd(18)))).toThrow(P.NbdProtocolError);
  });

  it('request header round-trips, with 64-bit offsets', () => {
    const b = Buffer.alloc(P.Size.REQUEST);
    P.encodeRequest(b, 0, P.CmdFlags.FUA, P.Cmd.WRITE, 7, 3, 2 ** 40 + 512, 65536);
    expect(P.decodeRequest(b)).toEqual({ flags: 1, type: 1, handle: (7n << 32n) | 3n, offset: 2 ** 40 + 512, length: 65536 });
  });

  it('GO data carries the name and the info requests', () => {
    const b = P.encodeGoData('disk', [P.Info.BLOCK_SIZE]);
    expect(b.readUInt32BE(0)).toBe(4);
    expect(b.toString('utf8', 4, 8)).toBe('disk');
    expect(b.readUInt16BE(8)).toBe(1);
    expect(b.readUInt16BE(10)).toBe(3);
    expect(() => P.encodeGoData('x'.repeat(5000), [])).toThrow(RangeError);
  });

  it('info items: export and block size decoded; nonsense block sizes refused', () => {
    const info: Partial<P.ExportInfo> = {};
    const e = Buffer.alloc(12);
    e.writeUInt16BE(P.Info.EXPORT, 0);
    e.writeBigUInt64BE(1n << 30n, 2);
    e.writeUInt16BE(0x10d, 10);
    P.decodeInfo(e, info);
    const bs = (min: number, pref: number, max: number) => {
      const b = Buffer.alloc(14);
      b.writeUInt16BE(P.Info.BLOCK_SIZE, 0);
      b.writeUInt32BE(min, 2);
      b.writeUInt32BE(pref, 6);
      b.writeUInt32BE(max, 10);
      return b;
    };
    P.decodeInfo(bs(512, 4096, 32 << 20), info);
    expect(info).toEqual({ size: 1 << 30, flags: 0x10d, minBlock: 512, preferredBlock: 4096, maxPayload: 32 << 20 });
    expect(() => P.decodeInfo(bs(3, 4096, 4096), {})).toThrow(/power of 2/);
    expect(() => P.decodeInfo(bs(1 << 17, 1 << 17, 1 << 20), {})).toThrow(/64 KiB/);
    expect(() => P.decodeInfo(bs(512, 256, 4096), {})).toThrow(/preferred/);
    expect(() => P.decodeInfo(bs(512, 4096, 1000), {})).toThrow(/maximum/);
    expect(() => P.decodeInfo(e.subarray(0, 11), {})).toThrow(/12/);
    const huge = Buffer.from(e);
    huge.writeBigUInt64BE(1n << 60n, 2);
    expect(() => P.decodeInfo(huge, {})).toThrow(/2\^53/);
  });

  it('error chunks: message bounds checked, offsets decoded', () => {
    const p = Buffer.alloc(6 + 3 + 8);
    p.writeUInt32BE(5, 0);
    p.writeUInt16BE(3, 4);
    p.write('bad', 6);
    p.writeBigUInt64BE(4096n, 9);
    expect(P.decodeErrorChunk(P.Chunk.ERROR_OFFSET, p)).toEqual({ errno: 5, message: 'bad', offset: 4096 });
    expect(P.decodeErrorChunk(P.Chunk.ERROR, p.subarray(0, 9))).toEqual({ errno: 5, message: 'bad' });
    p.writeUInt16BE(100, 4);
    expect(() => P.decodeErrorChunk(P.Chunk.ERROR, p)).toThrow(/does not fit/);
    expect(() => P.decodeErrorChunk(P.Chunk.ERROR, Buffer.alloc(4))).toThrow(P.NbdProtocolError);
    expect(() => P.decodeErrorChunk(P.Chunk.ERROR, Buffer.alloc(6))).toThrow(/error 0/);
  });

  it('reply errors carry the errno name', () => {
    expect(new P.NbdReplyError(28, 'full').code).toBe('ENOSPC');
    expect(new P.NbdReplyError(200, 'odd').code).toBe('NBD_ERRNO_200');
  });
});
