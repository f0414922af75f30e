/**
 * Servers for the NVMe driver tests: the scripted controller of `scripted-device.ts` and the real
 * one (lib/devices/nvme), each behind a real VfioUserServer on a temporary socket; the real one
 * also behind hardware-like BAR decoding (test/client/hardware.ts), as servers that model real
 * PCI serve it.
 */
import { NvmeController, type NvmeControllerOptions } from '../../../lib/devices/nvme';
import { RamBackend } from '../../../lib/block';
import type { VfioUserDevice } from '../../../lib/server/device';
import { startServer } from '../../helpers/server';
import { HardwareDecode } from '../../client/hardware';
import { ScriptedNvmeDevice, type ScriptedNvmeOptions } from './scripted-device';

/** A controller served on a socket, for one test. */
export interface NvmeTarget {
  readonly socketPath: string;
  readonly device: VfioUserDevice;
  stop(): Promise<void>;
}

/** Starts a server for one test. */
export type MakeServer = () => Promise<NvmeTarget>;

/** The scripted controller on a fresh server. */
export async function scriptedServer(options: ScriptedNvmeOptions = {}): Promise<NvmeTarget & { device: ScriptedNvmeDevice }> {
  const device = new ScriptedNvmeDevice(options);
  try {
    const s = await startServer(device);
    return { socketPath: s.socketPath, device, stop: () => s.stop() };
  } catch (err) {
    device.close();
    throw err;
  }
}

/** The real controller (lib/devices/nvme) with a RAM namespace on a fresh server. */
export async function controllerServer(options: Omit<NvmeControllerOptions, 'backend'> & { size?: number } = {}): Promise<NvmeTarget & { device: NvmeController }> {
  const { size = 8 * 1024 * 1024, ...rest } = options;
  const device = new NvmeController({ queues: 8, serial: 'DRIVERTEST', ...rest, backend: new RamBackend(size) });
  try {
    const s = await startServer(device);
    return { socketPath: s.socketPath, device, stop: () => s.stop() };
  } catch (err) {
    await device.close();
    throw err;
  }
}

/**
 * The real controller behind {@link HardwareDecode}: BAR accesses fail with EINVAL unless the BAR
 * was assigned an address and memory decoding is on, as QEMU's device models over vfio-user do.
 */
export async function hardwareControllerServer(
  options: Omit<NvmeControllerOptions, 'backend'> & { size?: number } = {},
): Promise<NvmeTarget & { device: HardwareDecode; controller: NvmeController }> {
  const { size = 8 * 1024 * 1024, ...rest } = options;
  const controller = new NvmeController({ queues: 8, serial: 'HARDWARE', ...rest, backend: new RamBackend(size) });
  const device = new HardwareDecode(controller);
  try {
    const s = await startServer(device);
    return { socketPath: s.socketPath, device, controller, stop: () => s.stop() };
  } catch (err) {
    await controller.close();
    throw err;
  }
}
