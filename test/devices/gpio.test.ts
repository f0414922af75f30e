/**
 * The ACCES PCI-IDIO-16 model through a real server, byte by byte as the guest's driver
 * (gpio-pci-idio-16) reaches it: registers in BAR2, INTx through an eventfd we hand over with
 * SET_IRQS and drain, DEVICE_RESET and a hang-up.
 */
import * as fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { IDIO16_BAR, IDIO16_DEVICE_ID, IDIO16_VENDOR_ID, Idio16Device } from '../../lib/devices/gpio/idio16';
import { binding } from '../../lib/native/binding';
import { Cfg, Command, Status } from '../../lib/pci';
import { Command as Msg, IrqSetFlags, PciIrq, PciRegion } from '../../lib/protocol/constants';
import { decodeIrqInfoReply, encodeIrqInfoRequest, encodeSetIrqsRequest } from '../../lib/protocol/messages/irq';
import { decodeRegionInfoReply, encodeRegionInfoRequest } from '../../lib/protocol/messages/region';
import { rawClient, regionAccess, startServer, type RawClient } from '../helpers/server';
import { useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

// Registered after the fd check, so it runs first (hooks unwind in reverse order).
const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

/** Register offsets in BAR2 (the card's map; see the model's module doc). */
const Reg = { OUT0_7: 0, IN0_7: 1, IRQ_CTL: 2, FILTER_CTL: 3, OUT8_15: 4, IN8_15: 5, IRQ_STATUS: 6 } as const;
const LOW_CHANGED = 0x1;
const HIGH_CHANGED = 0x2;
const ASSERTED = 0x4;

interface Rig {
  device: Idio16Device;
  client: RawClient;
  socketPath: string;
  /** The INTx eventfd the client handed over. */
  intx: number;
  outputs: number[];
  irqEvents: boolean[];
  disconnected(): Promise<void>;
}

async function serve(): Promise<Rig> {
  const device = new Idio16Device();
  const outputs: number[] = [];
  const irqEvents: boolean[] = [];
  device.events.on('outputs', (v) => outputs.push(v));
  device.events.on('irq', (enabled) => irqEvents.push(enabled));
  const s = await startServer(device);
  const client = await rawClient(s.socketPath);
  cleanups.push(async () => {
    await s.stop();
    client.close();
  });
  const intx = binding.eventfd(0, binding.constants.EFD_NONBLOCK);
  cleanups.push(() => fs.closeSync(intx));
  const set = encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, index: PciIrq.INTX, start: 0, count: 1 });
  expect(await client.msg(Msg.DEVICE_SET_IRQS, set, [intx])).toBeInstanceOf(Buffer);
  const disconnected = () => new Promise<void>((resolve) => s.server.once('disconnect', () => resolve()));
  return { device, client, socketPath: s.socketPath, intx, outputs, irqEvents, disconnected };
}

const drain = (fd: number): number => binding.eventfdDrain(fd);

async function readBar(c: RawClient, offset: number, count = 1): Promise<number[]> {
  const reply = await c.msg(Msg.REGION_READ, regionAccess(IDIO16_BAR, offset, count));
  if (typeof reply === 'number') throw new Error(`REGION_READ failed: errno ${reply}`);
  return Array.from(reply.subarray(16));
}

async function reg(c: RawClient, offset: number): Promise<number> {
  return (await readBar(c, offset))[0]!;
}

async function writeBar(c: RawClient, offset: number, ...bytes: number[]): Promise<void> {
  const reply = await c.msg(Msg.REGION_WRITE, regionAccess(IDIO16_BAR, offset, bytes.length, Buffer.from(bytes)));
  if (typeof reply === 'number') throw new Error(`REGION_WRITE failed: errno ${reply}`);
}

async function statusRegister(c: RawClient): Promise<number> {
  const reply = await c.msg(Msg.REGION_READ, regionAccess(PciRegion.CONFIG, Cfg.STATUS, 2));
  if (typeof reply === 'number') throw new Error(`config read failed: errno ${reply}`);
  return reply.readUInt16LE(16);
}

/** The driver's irq_unmask: a read of offset 2 enables the card's interrupt. */
async function enableIrq(rig: Rig): Promise<void> {
  expect(await reg(rig.client, Reg.IRQ_CTL)).toBe(0);
  expect(rig.device.interruptEnabled).toBe(true);
}

describe('PCI-IDIO-16: identity', () => {
  it('is the ACCES card with INTA#, a 256-byte BAR2 and only an INTx interrupt', async () => {
    const { client } = await serve();
    const cfg = await client.msg(Msg.REGION_READ, regionAccess(PciRegion.CONFIG, 0, 256));
    if (typeof cfg === 'number') throw new Error('config read failed');
    const bytes = cfg.subarray(16);
    expect(bytes.readUInt16LE(Cfg.VENDOR_ID)).toBe(IDIO16_VENDOR_ID);
    expect(bytes.readUInt16LE(Cfg.DEVICE_ID)).toBe(IDIO16_DEVICE_ID);
    expect(bytes.readUInt8(Cfg.INTERRUPT_PIN)).toBe(1);
    expect(bytes.readUInt32LE(0x18)).toBe(0); // BAR2, unprogrammed, 32-bit memory
    const info = decodeRegionInfoReply((await client.msg(Msg.DEVICE_GET_REGION_INFO, encodeRegionInfoRequest({ index: IDIO16_BAR }))) as Buffer);
    expect(info.size).toBe(256n);
    const counts: number[] = [];
    for (const index of [PciIrq.INTX, PciIrq.MSI, PciIrq.MSIX]) {
      counts.push(decodeIrqInfoReply((await client.msg(Msg.DEVICE_GET_IRQ_INFO, encodeIrqInfoRequest({ index }))) as Buffer).count);
    }
    expect(counts).toEqual([1, 0, 0]);
  });
});

describe('PCI-IDIO-16: registers in BAR2', () => {
  it('outputs 0-7 (offset 0) and 8-15 (offset 4) read back what was written and emit "outputs"', async () => {
    const rig = await serve();
    const { client, device } = rig;
    await writeBar(client, Reg.OUT0_7, 0x5a);
    await writeBar(client, Reg.OUT8_15, 0x3c);
    expect(device.outputs).toBe(0x3c5a);
    expect(await reg(client, Reg.OUT0_7)).toBe(0x5a);
    expect(await reg(client, Reg.OUT8_15)).toBe(0x3c);
    await writeBar(client, Reg.OUT0_7, 0x01);
    expect(device.outputs).toBe(0x3c01);
    // Writing the value already there changes nothing and emits nothing.
    await writeBar(client, Reg.OUT8_15, 0x3c);
    expect(rig.outputs).toEqual([0x005a, 0x3c5a, 0x3c01]);
  });

  it('inputs 0-7 (offset 1) and 8-15 (offset 5) read what the field wiring set; they cannot be written', async () => {
    const { client, device } = await serve();
    device.setInputs(0xa5c3);
    expect(await reg(client, Reg.IN0_7)).toBe(0xc3);
    expect(await reg(client, Reg.IN8_15)).toBe(0xa5);
    await writeBar(client, Reg.IN0_7, 0xff); // this is "clear interrupt", not a store
    await writeBar(client, Reg.IN8_15, 0xff);
    expect(device.inputs).toBe(0xa5c3);
    expect(await readBar(client, Reg.IN0_7)).toEqual([0xc3]);
    device.setInputs(0x1_0001); // 16 lines: bit 16 is dropped
    expect(device.inputs).toBe(0x0001);
  });

  it('reading offset 2 enables the interrupt (and reads 0); writing it disables the interrupt', async () => {
    const rig = await serve();
    const { client, device } = rig;
    expect(device.interruptEnabled).toBe(false);
    await enableIrq(rig);
    await enableIrq(rig); // again: no second event
    await writeBar(client, Reg.IRQ_CTL, 0x00);
    expect(device.interruptEnabled).toBe(false);
    expect(rig.irqEvents).toEqual([true, false]);
  });

  it('reading offset 3 activates the input filters (reads 0); writing it deactivates them', async () => {
    const { client, device } = await serve();
    expect(device.inputFiltersActive).toBe(false);
    expect(await reg(client, Reg.FILTER_CTL)).toBe(0);
    expect(device.inputFiltersActive).toBe(true);
    await writeBar(client, Reg.FILTER_CTL, 0);
    expect(device.inputFiltersActive).toBe(false);
  });

  it('unknown offsets read 0 and ignore writes', async () => {
    const rig = await serve();
    const { client, device } = rig;
    await writeBar(client, Reg.OUT0_7, 0x12);
    device.setInputs(0xffff);
    expect(await readBar(client, 7, 8)).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    expect(await readBar(client, 0xf8, 8)).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    await writeBar(client, 7, 0xff, 0xff, 0xff, 0xff);
    await writeBar(client, 0xff, 0xff);
    await writeBar(client, Reg.IRQ_STATUS, 0xff); // status is read-only
    expect(device.outputs).toBe(0x12);
    expect(device.interruptEnabled).toBe(false);
    expect(rig.outputs).toEqual([0x12]);
    expect(await readBar(client, 0, 7)).toEqual([0x12, 0xff, 0, 0, 0, 0xff, 0]);
  });

  it('multi-byte accesses touch each register in turn, side effects included', async () => {
    const rig = await serve();
    const { client, device } = rig;
    device.setInputs(0x8001);
    // One 5-byte write: OUT0_7, clear interrupt, disable IRQ, filters off, OUT8_15.
    await writeBar(client, 0, 0x11, 0, 0, 0, 0x22);
    expect(device.outputs).toBe(0x2211);
    expect(rig.outputs).toEqual([0x0011, 0x2211]);
    // An 8-byte read: the read of offset 2 enables the IRQ, the read of 3 activates the filters.
    expect(await readBar(client, 0, 8)).toEqual([0x11, 0x01, 0, 0, 0x22, 0x80, 0, 0]);
    expect(device.interruptEnabled).toBe(true);
    expect(device.inputFiltersActive).toBe(true);
    // A 2-byte read at 4: outputs 8-15 then inputs 8-15.
    expect(await readBar(client, 4, 2)).toEqual([0x22, 0x80]);
  });
});

describe('PCI-IDIO-16: change-of-state interrupt on INTx', () => {
  it('a change with the IRQ enabled asserts INTx once and sets the status bits of the changed half', async () => {
    const rig = await serve();
    const { client, device, intx } = rig;
    await enableIrq(rig);
    expect(await reg(client, Reg.IRQ_STATUS)).toBe(0);
    device.setInputs(0x0004);
    expect(drain(intx)).toBe(1);
    expect(await reg(client, Reg.IRQ_STATUS)).toBe(LOW_CHANGED | ASSERTED);
    expect((await statusRegister(client)) & Status.INTERRUPT).toBe(Status.INTERRUPT);
    // More changes while asserted: status accumulates, no new edge.
    device.setInputs(0x0104);
    expect(drain(intx)).toBe(0);
    expect(await reg(client, Reg.IRQ_STATUS)).toBe(LOW_CHANGED | HIGH_CHANGED | ASSERTED);
    // Setting the same inputs again is no change.
    device.setInputs(0x0104);
    expect(drain(intx)).toBe(0);
  });

  it('writing offset 1 clears the interrupt: status 0, line low; the next change is a new edge', async () => {
    const rig = await serve();
    const { client, device, intx } = rig;
    await enableIrq(rig);
    device.setInputs(0x0100);
    expect(drain(intx)).toBe(1);
    expect(await reg(client, Reg.IRQ_STATUS)).toBe(HIGH_CHANGED | ASSERTED);
    await writeBar(client, Reg.IN0_7, 0);
    expect(await reg(client, Reg.IRQ_STATUS)).toBe(0);
    expect((await statusRegister(client)) & Status.INTERRUPT).toBe(0);
    expect(drain(intx)).toBe(0);
    device.setInputs(0x0000);
    expect(drain(intx)).toBe(1);
    expect(await reg(client, Reg.IRQ_STATUS)).toBe(HIGH_CHANGED | ASSERTED);
  });

  it("the driver's handler flow: status read, clear, then the client's unmask sends nothing more", async () => {
    const rig = await serve();
    const { client, device, intx } = rig;
    await enableIrq(rig);
    device.setInputs(0x0001);
    expect(drain(intx)).toBe(1);
    expect((await reg(client, Reg.IRQ_STATUS)) & (LOW_CHANGED | HIGH_CHANGED)).not.toBe(0);
    await writeBar(client, Reg.IN0_7, 0);
    const unmask = encodeSetIrqsRequest({ flags: IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, index: PciIrq.INTX, start: 0, count: 1 });
    expect(await client.msg(Msg.DEVICE_SET_IRQS, unmask)).toBeInstanceOf(Buffer);
    expect(drain(intx)).toBe(0);
    // Had it not cleared, the unmask would have re-signalled the still-asserted line.
    device.setInputs(0x0000);
    expect(drain(intx)).toBe(1);
    expect(await client.msg(Msg.DEVICE_SET_IRQS, unmask)).toBeInstanceOf(Buffer);
    expect(drain(intx)).toBe(1);
  });

  it('changes with the IRQ disabled only update the inputs', async () => {
    const { client, device, intx } = await serve();
    device.setInputs(0xffff);
    expect(drain(intx)).toBe(0);
    expect(await reg(client, Reg.IRQ_STATUS)).toBe(0);
    expect((await statusRegister(client)) & Status.INTERRUPT).toBe(0);
    expect(await readBar(client, Reg.IN0_7)).toEqual([0xff]);
  });

  it('disabling the IRQ (write offset 2) while asserted deasserts the line and clears the status', async () => {
    const rig = await serve();
    const { client, device, intx } = rig;
    await enableIrq(rig);
    device.setInputs(0x0010);
    expect(drain(intx)).toBe(1);
    await writeBar(client, Reg.IRQ_CTL, 0);
    expect(await reg(client, Reg.IRQ_STATUS)).toBe(0);
    expect((await statusRegister(client)) & Status.INTERRUPT).toBe(0);
    device.setInputs(0x0000);
    expect(drain(intx)).toBe(0);
  });

  it('COMMAND.INTX_DISABLE holds the signal back; clearing it delivers the asserted line', async () => {
    const rig = await serve();
    const { client, device, intx } = rig;
    await enableIrq(rig);
    const command = async (v: number) => {
      const reply = await client.msg(Msg.REGION_WRITE, regionAccess(PciRegion.CONFIG, Cfg.COMMAND, 2, Buffer.from([v & 0xff, v >> 8])));
      expect(reply).toBeInstanceOf(Buffer);
    };
    await command(Command.MEMORY | Command.INTX_DISABLE);
    device.setInputs(0x0002);
    expect(drain(intx)).toBe(0);
    expect(await reg(client, Reg.IRQ_STATUS)).toBe(LOW_CHANGED | ASSERTED);
    await command(Command.MEMORY);
    expect(drain(intx)).toBe(1);
  });
});

describe('PCI-IDIO-16: reset', () => {
  async function busy(rig: Rig): Promise<void> {
    await writeBar(rig.client, Reg.OUT0_7, 0xaa);
    await writeBar(rig.client, Reg.OUT8_15, 0x55);
    await reg(rig.client, Reg.FILTER_CTL);
    await enableIrq(rig);
    rig.device.setInputs(0x1234);
    expect(drain(rig.intx)).toBe(1);
    rig.outputs.length = 0;
    rig.irqEvents.length = 0;
  }

  function expectCleared(rig: Rig): void {
    const { device } = rig;
    expect(device.outputs).toBe(0);
    expect(device.interruptEnabled).toBe(false);
    expect(device.inputFiltersActive).toBe(false);
    expect(device.inputs).toBe(0x1234); // the field wiring does not change with a reset
    // Observers learn that the outputs went to 0 and the interrupt was disabled.
    expect(rig.outputs).toEqual([0]);
    expect(rig.irqEvents).toEqual([false]);
  }

  it('DEVICE_RESET clears outputs, IRQ enable, filters and status, and lowers the line without a signal', async () => {
    const rig = await serve();
    const { client, device, intx } = rig;
    await busy(rig);
    expect(await client.msg(Msg.DEVICE_RESET, null)).toBeInstanceOf(Buffer);
    expectCleared(rig);
    expect(drain(intx)).toBe(0);
    expect(await readBar(client, 0, 7)).toEqual([0, 0x34, 0, 0, 0, 0x12, 0]);
    expect(device.interruptEnabled).toBe(true); // that read of offset 2 enabled it again
    expect((await statusRegister(client)) & Status.INTERRUPT).toBe(0);
  });

  it('a client hang-up resets the card too; the next client finds it cleared', async () => {
    const rig = await serve();
    await busy(rig);
    const gone = rig.disconnected();
    rig.client.close();
    await gone;
    expectCleared(rig);
    const next = await rawClient(rig.socketPath);
    cleanups.push(() => next.close());
    expect(await readBar(next, Reg.IRQ_STATUS)).toEqual([0]);
    expect(await readBar(next, Reg.OUT0_7)).toEqual([0]);
  });
});
