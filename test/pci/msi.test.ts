import { describe, expect, it } from 'vitest';
import { ConfigSpace, MsiCap, MsiCapability, MsiFlags, type MsiOptions } from '../../lib/pci';
import { fullDevice, readReg, recorder, writeReg } from './fixtures';

/** A conventional space with one MSI capability at 0x40, wired to a recorder. */
function msiDevice(options: MsiOptions = {}, accept?: (vector: number) => boolean) {
  const rec = recorder(accept);
  const space = new ConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0 });
  const msi = new MsiCapability({ vectors: 8, ...options, deliver: rec.deliver });
  space.addCapability(msi);
  const enable = (log2Vectors = 3): void => writeReg(space, 0x40 + MsiCap.FLAGS, 2, MsiFlags.ENABLE | (log2Vectors << 4));
  return { space, msi, enable, delivered: rec.delivered };
}

const MASK = 0x40 + MsiCap.MASK_64;
const PENDING = 0x40 + MsiCap.PENDING_64;

describe('MSI layouts', () => {
  it.each([
    [{ address64: true, perVectorMasking: true }, 24],
    [{ address64: false, perVectorMasking: true }, 20],
    [{ address64: true, perVectorMasking: false }, 14],
    [{ address64: false, perVectorMasking: false }, 10],
  ])('%o is %i bytes', (options, size) => {
    expect(new MsiCapability(options).layout.length).toBe(size);
  });

  it('32-bit with masking puts data at 0x08, mask at 0x0c, pending at 0x10', () => {
    const { space, msi, enable } = msiDevice({ address64: false });
    expect(readReg(space, 0x40 + MsiCap.FLAGS, 2)).toBe(MsiFlags.MASKBIT | (3 << 1));
    writeReg(space, 0x40 + MsiCap.ADDRESS_LO, 4, 0xfee00000);
    writeReg(space, 0x40 + MsiCap.DATA_32, 2, 0x4020);
    writeReg(space, 0x40 + MsiCap.MASK_32, 4, 0x4);
    enable();
    expect(msi.address).toBe(0xfee00000n);
    expect(msi.messageData(0)).toBe(0x4020);
    expect(msi.trigger(2)).toBe('pending');
    expect(readReg(space, 0x40 + MsiCap.PENDING_32, 4)).toBe(0x4);
  });

  it('refuses vector counts that are not powers of two up to 32', () => {
    expect(() => new MsiCapability({ vectors: 3 as 4 })).toThrow(RangeError);
    expect(() => new MsiCapability({ vectors: 64 as 32 })).toThrow(RangeError);
  });
});

describe('MSI delivery', () => {
  it('nothing while disabled; then only the vectors software granted', () => {
    const { msi, enable, delivered } = msiDevice();
    expect(msi.trigger(0)).toBe('disabled');
    enable(0);
    expect(msi.enabledVectors).toBe(1);
    expect(msi.trigger(0)).toBe('delivered');
    expect(msi.trigger(1)).toBe('disabled');
    enable(3);
    expect(msi.trigger(7)).toBe('delivered');
    expect(delivered).toEqual([0, 7]);
    expect(() => msi.trigger(8)).toThrow(RangeError);
  });

  it('Multiple Message Enable is clamped to Multiple Message Capable', () => {
    const { space, msi, enable } = msiDevice({ vectors: 4 });
    enable(5);
    expect((readReg(space, 0x40 + MsiCap.FLAGS, 2) & MsiFlags.QSIZE) >> 4).toBe(2);
    expect(msi.enabledVectors).toBe(4);
  });

  it('a masked vector sets its pending bit and is delivered when the guest unmasks it', () => {
    const { space, msi, enable, delivered } = msiDevice();
    enable();
    writeReg(space, MASK, 4, 0b0010_0100);
    expect(msi.trigger(5)).toBe('pending');
    expect(msi.trigger(2)).toBe('pending');
    expect(msi.trigger(1)).toBe('delivered');
    expect(readReg(space, PENDING, 4)).toBe(0b0010_0100);
    writeReg(space, PENDING, 4, 0); // pending bits are read-only to the guest
    expect(readReg(space, PENDING, 4)).toBe(0b0010_0100);
    writeReg(space, MASK, 1, 0b0000_0100); // unmask 5 only
    expect(delivered).toEqual([1, 5]);
    expect([msi.isPending(5), msi.isPending(2)]).toEqual([false, true]);
    writeReg(space, MASK, 1, 0);
    expect(delivered).toEqual([1, 5, 2]);
    expect(readReg(space, PENDING, 4)).toBe(0);
  });

  it('only implemented vectors have writable mask bits', () => {
    const { space } = msiDevice({ vectors: 4 });
    writeReg(space, MASK, 4, 0xffffffff);
    expect(readReg(space, MASK, 4)).toBe(0xf);
  });

  it('a vector refused by the deliver function (no eventfd) stays pending until retried', () => {
    let wired = false;
    const { msi, enable, delivered } = msiDevice({}, () => wired);
    enable();
    expect(msi.trigger(3)).toBe('pending');
    wired = true;
    msi.retryPending();
    expect(delivered).toEqual([3]);
    expect(msi.isPending(3)).toBe(false);
  });

  it('without per-vector masking an undeliverable vector is dropped', () => {
    const { msi, enable } = msiDevice({ perVectorMasking: false }, () => false);
    enable();
    expect(msi.trigger(0)).toBe('dropped');
    expect(msi.isPending(0)).toBe(false);
    expect(msi.isMasked(0)).toBe(false);
  });

  it('message data carries the vector number in its low bits', () => {
    const { space, msi, enable } = msiDevice();
    writeReg(space, 0x40 + MsiCap.ADDRESS_LO, 4, 0xfee0_1000);
    writeReg(space, 0x40 + MsiCap.ADDRESS_HI, 4, 0x1);
    writeReg(space, 0x40 + MsiCap.DATA_64, 2, 0x4025);
    enable(2);
    expect(msi.address).toBe(0x1_fee0_1000n);
    expect(msi.messageData(3)).toBe(0x4027);
  });

  it('reset disables MSI and clears mask and pending bits', () => {
    const { space, msi } = fullDevice();
    writeReg(space, 0x48 + MsiCap.FLAGS, 2, MsiFlags.ENABLE);
    writeReg(space, 0x48 + MsiCap.MASK_64, 4, 1);
    msi.trigger(0);
    expect(msi.isPending(0)).toBe(true);
    space.reset();
    expect([msi.enabled, msi.isMasked(0), msi.isPending(0)]).toEqual([false, false, false]);
    expect(msi.trigger(0)).toBe('disabled');
  });
});
