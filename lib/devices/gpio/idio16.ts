/**
 * A model of the ACCES PCI-IDIO-16: 16 opto-isolated inputs, 16 FET outputs, and a
 * change-of-state interrupt on INTx. Linux drives it with `gpio-pci-idio-16`.
 *
 * Registers (BAR2, bytes; the card's public register map):
 *
 * | off | read                        | write                     |
 * |----:|-----------------------------|---------------------------|
 * | 0   | outputs 0-7                 | outputs 0-7               |
 * | 1   | inputs 0-7                  | clear interrupt           |
 * | 2   | enable IRQ                  | disable IRQ               |
 * | 3   | activate input filters      | deactivate input filters  |
 * | 4   | outputs 8-15                | outputs 8-15              |
 * | 5   | inputs 8-15                 | (unused)                  |
 * | 6   | IRQ status                  | (unused)                  |
 *
 * IRQ status: bit 0 = inputs 0-7 changed, bit 1 = inputs 8-15 changed, bit 2 = interrupt
 * asserted. Reading offset 2 has a side effect (it enables the interrupt), as on the card.
 */
import { EventEmitter } from 'node:events';
import { PciDevice } from '../../pci/device';
import type { ResetReason } from '../../server/device';
import { boolField, intField, objectField } from '../../server/state-stream';

export const IDIO16_VENDOR_ID = 0x494f;
export const IDIO16_DEVICE_ID = 0x0dc8;
/** The register window is BAR2 (what the driver maps). */
export const IDIO16_BAR = 2;
const BAR_SIZE = 256;
/** Base class 0x11 (data acquisition and signal processing), sub-class 0x80 (other). */
const DAQ_CONTROLLER_CLASS = 0x118000;

const Reg = {
  OUT0_7: 0,
  IN0_7: 1,
  IRQ_CTL: 2,
  FILTER_CTL: 3,
  OUT8_15: 4,
  IN8_15: 5,
  IRQ_STATUS: 6,
} as const;

const Status = { LOW_CHANGED: 0x1, HIGH_CHANGED: 0x2, ASSERTED: 0x4 } as const;

export interface Idio16Events {
  /** The outputs changed: a guest write, or a reset (16-bit value, bit n = OUTn). */
  outputs: [value: number];
  /** The change-of-state interrupt was enabled or disabled (by the guest, or by a reset). */
  irq: [enabled: boolean];
}

export class Idio16Device extends PciDevice {
  private outputValue = 0;
  private inputValue = 0;
  private irqEnabled = false;
  private filtersActive = false;
  private status = 0;
  readonly events = new EventEmitter<Idio16Events>();

  constructor() {
    super({
      vendorId: IDIO16_VENDOR_ID,
      deviceId: IDIO16_DEVICE_ID,
      classCode: DAQ_CONTROLLER_CLASS,
      interruptPin: 1,
      bars: {
        [IDIO16_BAR]: {
          size: BAR_SIZE,
          read: (offset, dst) => {
            for (let i = 0; i < dst.length; i++) dst[i] = this.readRegister(offset + i);
          },
          write: (offset, src) => {
            for (let i = 0; i < src.length; i++) this.writeRegister(offset + i, src[i]!);
          },
        },
      },
    });
    this.enableMigration();
  }

  /** The 16 outputs as the guest last set them (bit n = OUTn). */
  get outputs(): number {
    return this.outputValue;
  }

  /** The 16 inputs (bit n = IINn). */
  get inputs(): number {
    return this.inputValue;
  }

  get interruptEnabled(): boolean {
    return this.irqEnabled;
  }

  /** Set the inputs as the field wiring would; a change interrupts the guest if it enabled IRQs. */
  setInputs(value: number): void {
    const next = value & 0xffff;
    const changed = next ^ this.inputValue;
    this.inputValue = next;
    if (changed === 0 || !this.irqEnabled) return;
    this.status |= (changed & 0xff ? Status.LOW_CHANGED : 0) | (changed & 0xff00 ? Status.HIGH_CHANGED : 0) | Status.ASSERTED;
    this.setIntx(true);
  }

  protected override onReset(_reason: ResetReason): void {
    this.filtersActive = false;
    this.status = 0;
    // Through the setters, so observers (e.g. `vfio-user serve gpio`) see the outputs drop to 0.
    this.enableIrq(false);
    this.setOutputs(0);
  }

  private readRegister(offset: number): number {
    switch (offset) {
      case Reg.OUT0_7:
        return this.outputValue & 0xff;
      case Reg.IN0_7:
        return this.inputValue & 0xff;
      case Reg.IRQ_CTL:
        this.enableIrq(true);
        return 0;
      case Reg.FILTER_CTL:
        this.filtersActive = true;
        return 0;
      case Reg.OUT8_15:
        return this.outputValue >> 8;
      case Reg.IN8_15:
        return this.inputValue >> 8;
      case Reg.IRQ_STATUS:
        return this.status;
      default:
        return 0;
    }
  }

  private writeRegister(offset: number, value: number): void {
    switch (offset) {
      case Reg.OUT0_7:
        this.setOutputs((this.outputValue & 0xff00) | value);
        return;
      case Reg.IN0_7:
        this.clearInterrupt();
        return;
      case Reg.IRQ_CTL:
        this.enableIrq(false);
        return;
      case Reg.FILTER_CTL:
        this.filtersActive = false;
        return;
      case Reg.OUT8_15:
        this.setOutputs((this.outputValue & 0xff) | (value << 8));
        return;
      default:
        return; // read-only or unused
    }
  }

  private setOutputs(value: number): void {
    if (value === this.outputValue) return;
    this.outputValue = value;
    this.events.emit('outputs', value);
  }

  private enableIrq(enabled: boolean): void {
    if (enabled === this.irqEnabled) return;
    this.irqEnabled = enabled;
    if (!enabled) this.clearInterrupt();
    this.events.emit('irq', enabled);
  }

  private clearInterrupt(): void {
    this.status = 0;
    this.setIntx(false);
  }

  // ---- migration: registers and interrupt state (PCI state comes with PciDevice) ----

  protected override migrationKind(): string {
    return 'idio16';
  }

  protected override saveDeviceState(): unknown {
    return { outputs: this.outputValue, inputs: this.inputValue, irqEnabled: this.irqEnabled, filters: this.filtersActive, status: this.status };
  }

  protected override loadDeviceState(state: unknown): () => void {
    const s = objectField(state, 'idio16');
    const outputs = intField(s.outputs, 'idio16.outputs', 0, 0xffff);
    const inputs = intField(s.inputs, 'idio16.inputs', 0, 0xffff);
    const irqEnabled = boolField(s.irqEnabled, 'idio16.irqEnabled');
    const filters = boolField(s.filters, 'idio16.filters');
    const status = intField(s.status, 'idio16.status', 0, 7);
    return () => {
      this.inputValue = inputs;
      this.filtersActive = filters;
      this.status = status;
      // Through the setters, so observers see the destination take over the outputs and IRQ state.
      if (irqEnabled !== this.irqEnabled) {
        this.irqEnabled = irqEnabled;
        this.events.emit('irq', irqEnabled);
      }
      this.setOutputs(outputs);
    };
  }

  /** Input filters are accepted and reported but change nothing in an emulation. */
  get inputFiltersActive(): boolean {
    return this.filtersActive;
  }
}
