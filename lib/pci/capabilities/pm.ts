/**
 * Power Management capability (ID 0x01, PCI Bus Power Management Interface 1.2): PMC says which
 * device states exist; PMCSR holds the current one. D0 and D3hot always exist, D1/D2 optionally.
 * PME is not supported (PMC's PME_Support is 0, PME_En and PME_Status read 0).
 *
 * D3hot -> D0: with No_Soft_Reset clear the function resets itself (Linux may use this as a reset
 * method); with it set (the default) its state survives.
 *
 * @packageDocumentation
 */
import { CapId } from '../ids';
import { RegisterLayout } from '../layout';
import { PlacedCapability, touched, valueBefore, type Capability, type CapabilityWrite } from './common';

/** Register offsets inside the capability (`PCI_PM_*`). */
export const PmCap = {
  /** u16: Power Management Capabilities (read-only). */
  PMC: 0x2,
  /** u16: Power Management Control/Status. */
  CTRL: 0x4,
  /** u8: PMCSR bridge extensions (0 for endpoints). */
  PPB_EXTENSIONS: 0x6,
  /** u8: Data register (unsupported, 0). */
  DATA: 0x7,
  /** Size of the capability. */
  SIZEOF: 0x8,
} as const;

/** Bits of PMC (`PCI_PM_CAP_*`). */
export const PmCapBits = {
  /** Version field; 3 = PCI PM 1.2. */
  VER_MASK: 0x0007,
  /** D1 supported. */
  D1: 0x0200,
  /** D2 supported. */
  D2: 0x0400,
} as const;

/** Bits of PMCSR (`PCI_PM_CTRL_*`). */
export const PmCtrl = {
  /** PowerState field. */
  STATE_MASK: 0x0003,
  /** No_Soft_Reset: state is kept on D3hot -> D0. */
  NO_SOFT_RESET: 0x0008,
  /** PME_En (not supported here). */
  PME_ENABLE: 0x0100,
  /** PME_Status (not supported here). */
  PME_STATUS: 0x8000,
} as const;

/** PowerState values. */
export const PowerState = {
  D0: 0,
  D1: 1,
  D2: 2,
  D3HOT: 3,
} as const;

/** A PowerState value. */
export type PowerStateValue = (typeof PowerState)[keyof typeof PowerState];

/** PCI PM 1.2. */
const PM_VERSION = 3;

/** Options of {@link PowerManagementCapability}. */
export interface PowerManagementOptions {
  /** D1 supported; default false. */
  d1?: boolean;
  /** D2 supported; default false. */
  d2?: boolean;
  /** Keep state on D3hot -> D0; default true. */
  noSoftReset?: boolean;
  /** Called after the guest moved the function to another state. */
  onPowerStateChange?: (state: PowerStateValue, previous: PowerStateValue) => void;
  /** The internal reset of D3hot -> D0 when `noSoftReset` is false; default: reset the config space. */
  onSoftReset?: () => void;
}

/** The Power Management capability. */
export class PowerManagementCapability extends PlacedCapability implements Capability {
  readonly id = CapId.PM;
  readonly layout: RegisterLayout;
  private readonly options: PowerManagementOptions;

  constructor(options: PowerManagementOptions = {}) {
    super();
    this.options = options;
    const pmc = PM_VERSION | (options.d1 === true ? PmCapBits.D1 : 0) | (options.d2 === true ? PmCapBits.D2 : 0);
    const ctrl = options.noSoftReset === false ? 0 : PmCtrl.NO_SOFT_RESET;
    this.layout = new RegisterLayout(PmCap.SIZEOF)
      .define(PmCap.PMC, 2, pmc)
      .define(PmCap.CTRL, 2, ctrl, { writable: PmCtrl.STATE_MASK });
  }

  /** Current PowerState. In D3hot a function answers config accesses only. */
  get powerState(): PowerStateValue {
    return (this.u16(PmCap.CTRL) & PmCtrl.STATE_MASK) as PowerStateValue;
  }

  written(write: CapabilityWrite): void {
    if (!touched(write, PmCap.CTRL, 1)) return;
    const previous = (valueBefore(write, PmCap.CTRL, 2) & PmCtrl.STATE_MASK) as PowerStateValue;
    const requested = this.powerState;
    if (requested === previous) return;
    if (!this.allowed(previous, requested)) {
      this.setState(previous); // unsupported states: the write completes, the data is discarded
      return;
    }
    const keepsState = (this.u16(PmCap.CTRL) & PmCtrl.NO_SOFT_RESET) !== 0;
    if (previous === PowerState.D3HOT && !keepsState) this.softReset();
    this.options.onPowerStateChange?.(requested, previous);
  }

  private allowed(from: PowerStateValue, to: PowerStateValue): boolean {
    if (to === PowerState.D1 && this.options.d1 !== true) return false;
    if (to === PowerState.D2 && this.options.d2 !== true) return false;
    return from !== PowerState.D3HOT || to === PowerState.D0; // D3hot leads only to D0
  }

  private softReset(): void {
    if (this.options.onSoftReset !== undefined) this.options.onSoftReset();
    else this.space.reset();
  }

  private setState(state: PowerStateValue): void {
    this.setU16(PmCap.CTRL, (this.u16(PmCap.CTRL) & ~PmCtrl.STATE_MASK) | state);
  }
}
