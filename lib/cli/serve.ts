/**
 * `vfio-user serve <device> SOCKET`: serve a device model until Ctrl-C / SIGTERM.
 */
import * as path from 'node:path';
import * as readline from 'node:readline';
import { Idio16Device } from '../devices/gpio/idio16';
import { VfioUserServer } from '../server/server';
import type { CliCommand } from './main';

const USAGE = `Usage: vfio-user serve <device> SOCKET [options]

Serve an emulated PCI device on the UNIX socket SOCKET for a vfio-user client such as
QEMU's vfio-user-pci. Ctrl-C or SIGTERM shuts down cleanly and removes the socket.

Devices:
  gpio   ACCES PCI-IDIO-16: 16 inputs, 16 outputs, change-of-state interrupt (Linux: gpio-pci-idio-16)
  nvme   NVMe controller (--size 1G | --file PATH, --queues N, --block-size 512|4096,
         --serial S, --model M, --trace FILE)

Options:
  --mode MODE   socket file mode, octal (default 0600)
  --json        machine-readable output: JSON lines (ready, events, answers)
  -h, --help    show this help

gpio control (stdin, one JSON object per line):
  {"inputs": 4660}       set the 16 inputs (interrupts the guest on change if it enabled IRQs)
  {"get": "outputs"}     print {"outputs": N}; {"get": "state"} prints inputs, outputs, irq
  Output changes (by the guest, or 0 on a device reset) are printed as {"event": "outputs", "value": N}.`;

export const serveCommand: CliCommand = {
  name: 'serve',
  summary: 'serve an emulated device (gpio, nvme) on a UNIX socket',
  usage: USAGE,
  options: {
    mode: { type: 'string' },
    json: { type: 'boolean' },
    size: { type: 'string' },
    file: { type: 'string' },
    queues: { type: 'string' },
    'block-size': { type: 'string' },
    serial: { type: 'string' },
    model: { type: 'string' },
    trace: { type: 'string' },
  },
  async run(positionals, values) {
    const [device, socket] = positionals;
    if (device === undefined || socket === undefined || positionals.length > 2) {
      console.error(USAGE);
      return 2;
    }
    const mode = values.mode === undefined ? 0o600 : parseInt(String(values.mode), 8);
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) {
      console.error(`vfio-user serve: --mode must be an octal file mode, got '${String(values.mode)}'`);
      return 2;
    }
    const json = values.json === true;
    if (device === 'gpio') return serveGpio(path.resolve(socket), mode, json);
    if (device === 'nvme') {
      console.error('vfio-user serve nvme: the NVMe controller is not implemented yet (tracked as the NVMe controller issue)');
      return 1;
    }
    console.error(`vfio-user serve: unknown device '${device}' (known: gpio, nvme)`);
    return 2;
  },
};

function qemuOption(socket: string): string {
  return `-device '${JSON.stringify({ driver: 'vfio-user-pci', socket: { path: socket, type: 'unix' } })}'`;
}

async function serveGpio(socket: string, mode: number, json: boolean): Promise<number> {
  const device = new Idio16Device();
  const server = await VfioUserServer.listen(socket, device, { mode });
  const say = (obj: Record<string, unknown>, text: string) => console.log(json ? JSON.stringify(obj) : text);

  say({ event: 'ready', device: 'gpio', socket, qemu: qemuOption(socket) }, `vfio-user: serving gpio (ACCES PCI-IDIO-16) on ${socket}\nattach with: ${qemuOption(socket)}`);
  server.on('connect', () => say({ event: 'connect' }, 'client connected'));
  server.on('disconnect', (err: Error | null) => say({ event: 'disconnect', error: err?.message ?? null }, `client disconnected${err ? `: ${err.message}` : ''}`));
  device.events.on('outputs', (value) => say({ event: 'outputs', value }, `outputs 0x${value.toString(16).padStart(4, '0')}`));
  device.events.on('irq', (enabled) => say({ event: 'irq', enabled }, `interrupt ${enabled ? 'enabled' : 'disabled'}`));

  const input = readline.createInterface({ input: process.stdin, terminal: false });
  input.on('line', (line) => {
    if (line.trim() === '') return;
    let cmd: { inputs?: unknown; get?: unknown };
    try {
      cmd = JSON.parse(line) as typeof cmd;
    } catch {
      say({ error: 'not JSON' }, `error: not JSON: ${line}`);
      return;
    }
    if (typeof cmd.inputs === 'number' && Number.isInteger(cmd.inputs) && cmd.inputs >= 0 && cmd.inputs <= 0xffff) {
      device.setInputs(cmd.inputs);
      say({ inputs: device.inputs }, `inputs 0x${device.inputs.toString(16).padStart(4, '0')}`);
    } else if (cmd.get === 'outputs') {
      say({ outputs: device.outputs }, `outputs 0x${device.outputs.toString(16).padStart(4, '0')}`);
    } else if (cmd.get === 'state') {
      const state = { inputs: device.inputs, outputs: device.outputs, irq: device.interruptEnabled };
      say(state, JSON.stringify(state));
    } else {
      say({ error: 'unknown command' }, `error: expected {"inputs": 0..65535} or {"get": "outputs"|"state"}`);
    }
  });

  return new Promise<number>((resolve) => {
    const stop = () => {
      input.close();
      void server.close().then(() => resolve(0));
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
}
