// A Linux guest, through QEMU 11.1's vfio-user-pci, finds our ACCES PCI-IDIO-16 model, binds
// Linux's gpio-pci-idio-16 driver to it, reads inputs the Node side set, drives outputs the Node
// side observes, and takes a change-of-state interrupt (INTx) raised from the Node side.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Idio16Device } from '../../lib/devices/gpio/idio16';
import { VfioUserServer } from '../../lib/server/server';
import { bootGuest, buildInitramfs, cleanupInterop, describeBoot, interopAvailable } from './harness';

const available = interopAvailable();
if (!available.ok) console.warn(`[interop] skipping: ${available.reason}`);

const INPUTS = 0xa5c3;
const OUTPUTS = 0x3c5a;
const TOGGLED_INPUTS = INPUTS ^ 0x0001;

/**
 * Guest side: find the 32-line chip, read inputs, set outputs, await an IRQ. The driver names its
 * lines OUT0-15 and IIN0-15, so exported lines appear under those names in sysfs.
 */
const SCRIPT = `
chip=""
for c in /sys/class/gpio/gpiochip*; do
  [ "$(cat $c/ngpio)" = 32 ] && chip=$c
done
[ -n "$chip" ] || { echo "RESULT error=no-idio16-chip"; lspci 2>/dev/null; exit 1; }
base=$(cat $chip/base)
echo "RESULT label=$(cat $chip/label)"
inputs=0
i=0
while [ $i -lt 16 ]; do
  n=$((base + 16 + i))
  echo $n > /sys/class/gpio/export
  v=$(cat /sys/class/gpio/IIN$i/value)
  inputs=$((inputs | (v << i)))
  i=$((i + 1))
done
echo "RESULT inputs=$inputs"
i=0
while [ $i -lt 16 ]; do
  n=$((base + i))
  echo $n > /sys/class/gpio/export
  if [ $(( (${OUTPUTS} >> i) & 1 )) = 1 ]; then echo high > /sys/class/gpio/OUT$i/direction; else echo low > /sys/class/gpio/OUT$i/direction; fi
  i=$((i + 1))
done
echo "RESULT outputs_set=1"
# Ask for interrupts on IIN0: the driver enables the card's IRQ; then the host toggles IIN0.
echo both > /sys/class/gpio/IIN0/edge
irqline() { grep -E 'idio|0000:' /proc/interrupts | head -n1; }
echo "RESULT irq_armed=1 before=\\"$(irqline)\\""
t=0
while [ $t -lt 50 ]; do
  v=$(cat /sys/class/gpio/IIN0/value)
  [ "$v" = 0 ] && break
  sleep 0.1
  t=$((t + 1))
done
sleep 0.5
echo "RESULT iin0_after=$v after=\\"$(irqline)\\""
`;

describe.skipIf(!available.ok)('gpio-pci-idio-16 in a Linux guest (QEMU 11.1 vfio-user-pci)', () => {
  afterAll(() => cleanupInterop());

  it('enumerates, binds, reads inputs, drives outputs and takes an INTx interrupt', async () => {
    const dir = fs.mkdtempSync(path.join('/dev/shm', 'vfio-user-gpio-'));
    const socket = path.join(dir, 'gpio.sock');
    const device = new Idio16Device();
    device.setInputs(INPUTS);
    const server = await VfioUserServer.listen(socket, device);
    const outputsSeen: number[] = [];
    device.events.on('outputs', (v) => outputsSeen.push(v));
    let irqEnabledSeen = false;
    device.events.on('irq', (enabled) => {
      if (enabled) irqEnabledSeen = true;
    });
    try {
      const initramfs = await buildInitramfs({ modules: ['gpio-pci-idio-16'], script: SCRIPT });
      const r = await bootGuest({
        sockets: [socket],
        initramfs,
        timeoutMs: 60_000,
        onLine: (line) => {
          // The guest armed an edge interrupt on IIN0: flip it from the Node side.
          if (line.includes('RESULT irq_armed=1')) device.setInputs(TOGGLED_INPUTS);
        },
      });
      const info = describeBoot(r);
      expect(r.timedOut, info).toBe(false);
      expect(r.results.error, info).toBeUndefined();
      expect(Number(r.results.inputs), info).toBe(INPUTS);
      expect(r.results.outputs_set, info).toBe('1');
      expect(device.outputs, info).toBe(OUTPUTS);
      expect(outputsSeen.at(-1)).toBe(OUTPUTS);
      // The driver enabled the card's interrupt when the guest asked for edges...
      expect(irqEnabledSeen, info).toBe(true);
      // ...and saw the new input value after the host toggled it.
      expect(r.results.iin0_after, info).toBe('0');
      // The interrupt reached the guest: its counter for our line moved.
      const count = (s: string | undefined) => (s ?? '').trim().split(/\s+/).slice(1, 2).map(Number)[0] ?? 0;
      expect(count(r.results.after), info).toBeGreaterThan(count(r.results.before));
      expect(server.irqs.signalled[0], info).toBeGreaterThan(0);
    } finally {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 90_000);
});
