import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  Command,
  DeviceFeature,
  Errno,
  IrqSetFlags,
  MAX_COMMAND,
  PayloadSize,
  ProtocolError,
  Reader,
  VfioUserError,
  Writer,
  commandName,
  commandSender,
  errnoName,
  isKnownCommand,
  normalizeErrno,
  toSafeNumber,
} from '../../lib/protocol';
import { arbU64, hex } from '../helpers/bytes';

describe('constants', () => {
  it('number the commands 1-18 as in reference section 2', () => {
    expect(Object.entries(Command)).toEqual([
      ['VERSION', 1], ['DMA_MAP', 2], ['DMA_UNMAP', 3], ['DEVICE_GET_INFO', 4],
      ['DEVICE_GET_REGION_INFO', 5], ['DEVICE_GET_REGION_IO_FDS', 6], ['DEVICE_GET_IRQ_INFO', 7],
      ['DEVICE_SET_IRQS', 8], ['REGION_READ', 9], ['REGION_WRITE', 10], ['DMA_READ', 11],
      ['DMA_WRITE', 12], ['DEVICE_RESET', 13], ['DIRTY_PAGES', 14], ['REGION_WRITE_MULTI', 15],
      ['DEVICE_FEATURE', 16], ['MIG_DATA_READ', 17], ['MIG_DATA_WRITE', 18],
    ]);
    expect(MAX_COMMAND).toBe(18);
  });

  it('commandName, isKnownCommand and commandSender', () => {
    expect(commandName(2)).toBe('DMA_MAP');
    expect(commandName(18)).toBe('MIG_DATA_WRITE');
    expect(commandName(0)).toBe('UNKNOWN(0)');
    expect(commandName(19)).toBe('UNKNOWN(19)');
    expect(commandName(1.5)).toBe('UNKNOWN(1.5)');
    expect(isKnownCommand(1)).toBe(true);
    expect(isKnownCommand(0)).toBe(false);
    expect(isKnownCommand(19)).toBe(false);
    expect(commandSender(Command.DMA_READ)).toBe('server');
    expect(commandSender(Command.DMA_WRITE)).toBe('server');
    expect(commandSender(Command.REGION_WRITE)).toBe('client');
  });

  it('keeps the Linux errno numbers', () => {
    expect(Errno.EINVAL).toBe(22);
    expect(Errno.ENOENT).toBe(2);
    expect(Errno.ENOTSUP).toBe(95);
    expect(errnoName(22)).toBe('EINVAL');
    expect(errnoName(38)).toBe('ENOSYS');
    expect(errnoName(9999)).toBe('E9999');
  });

  it('masks and sizes agree with each other', () => {
    expect(IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD).toBe(IrqSetFlags.DATA_TYPE_MASK);
    expect(IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK | IrqSetFlags.ACTION_TRIGGER).toBe(IrqSetFlags.ACTION_TYPE_MASK);
    expect(DeviceFeature.SET | DeviceFeature.MIG_DEVICE_STATE).toBe(0x20002);
    expect(PayloadSize.CAP_SPARSE_FIXED).toBe(PayloadSize.CAP_HEADER + 8);
  });
});

describe('errors', () => {
  it('ProtocolError defaults to EINVAL and names the field', () => {
    const e = new ProtocolError('X: argsz bad', { field: 'argsz' });
    expect(e).toBeInstanceOf(Error);
    expect(e.name).toBe('ProtocolError');
    expect(e.errno).toBe(22);
    expect(e.code).toBe('EINVAL');
    expect(e.field).toBe('argsz');
    expect(new ProtocolError('y', { errno: Errno.E2BIG })).toMatchObject({ code: 'E2BIG', errno: 7 });
  });

  it('VfioUserError carries errno, code, command and msgId', () => {
    const e = new VfioUserError(2, Command.DMA_UNMAP, 14);
    expect(e.name).toBe('VfioUserError');
    expect(e).toMatchObject({ errno: 2, code: 'ENOENT', command: 3, msgId: 14, commandName: 'DMA_UNMAP' });
    expect(e.message).toBe('DMA_UNMAP (msg_id 14) failed: ENOENT');
    expect(new VfioUserError(0, 1, 1).errno).toBe(22);
    expect(normalizeErrno(5000)).toBe(22);
    expect(normalizeErrno(-3)).toBe(22);
  });
});

describe('codec', () => {
  it('reads little-endian fields and fails with the field name on truncation', () => {
    const r = new Reader(hex('01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f'), 'TEST');
    expect(r.u8('a')).toBe(0x01);
    expect(r.u16('b')).toBe(0x0302);
    expect(r.u32('c')).toBe(0x07060504);
    expect(r.u64('d')).toBe(0x0f0e0d0c0b0a0908n);
    expect(r.remaining).toBe(0);
    expect(() => r.u8('e')).toThrow(/TEST: e is truncated/);
    try {
      r.u32('next_field');
    } catch (e) {
      expect(e).toBeInstanceOf(ProtocolError);
      expect((e as ProtocolError).field).toBe('next_field');
    }
  });

  it('reads within the given window only and returns zero-copy views', () => {
    const buf = hex('ff ff 01 02 03 04 ff');
    const r = new Reader(buf, 'W', 2, 4);
    const v = r.bytes(4, 'data');
    expect(v).toEqual(hex('01 02 03 04'));
    buf[3] = 0x99;
    expect(v[1]).toBe(0x99); // a view, not a copy
    expect(() => r.u8('x')).toThrow(ProtocolError);
    expect(() => new Reader(buf, 'W', 5, 4)).toThrow(RangeError);
  });

  it('end() rejects trailing bytes', () => {
    const r = new Reader(hex('00 00 00 00 00'), 'T');
    r.u32('a');
    expect(() => r.end()).toThrow(/1 unexpected trailing bytes/);
  });

  it('u64 round-trips through Writer and Reader without rounding', () => {
    fc.assert(
      fc.property(arbU64, (v) => {
        const b = Writer.alloc(8).u64(v, 'v').finish();
        expect(new Reader(b, 'T').u64('v')).toBe(v);
      }),
    );
  });

  it('Writer checks widths and room', () => {
    expect(() => Writer.alloc(4).u32(2 ** 32, 'f')).toThrow(/Expected f to be an integer/);
    expect(() => Writer.alloc(4).u32(1.5, 'f')).toThrow(RangeError);
    expect(() => Writer.alloc(2).u32(1, 'f')).toThrow(RangeError);
    expect(() => Writer.alloc(8).u64(-1n, 'f')).toThrow(RangeError);
    expect(() => Writer.alloc(8).u64(2n ** 64n, 'f')).toThrow(RangeError);
    expect(() => Writer.alloc(8).u64(1 as unknown as bigint, 'f')).toThrow(TypeError);
  });

  it('toSafeNumber refuses values that a JS number would round', () => {
    expect(toSafeNumber(2n ** 53n - 1n)).toBe(Number.MAX_SAFE_INTEGER);
    expect(() => toSafeNumber(2n ** 53n, 'size')).toThrow(ProtocolError);
    expect(() => toSafeNumber(-1n)).toThrow(/out of the safe integer range/);
  });
});
