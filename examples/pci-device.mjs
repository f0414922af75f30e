// A PCI device with a scratch BAR and MSI-X, served on a socket, then driven by our own client:
// the device raises MSI-X vector 0 on every BAR0 write. Run: node examples/pci-device.mjs
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PciDevice, VfioUserServer, VfioUserClient, PciFunction } from 'vfio-user';

class Scratch extends PciDevice {
  mem = Buffer.alloc(4096);
  constructor() {
    super({
      vendorId: 0x1b36, deviceId: 0x0005, classCode: 0xff0000, interruptPin: 1, express: true,
      pm: true, pcie: true,
      msix: { vectors: 4, table: { bar: 4, offset: 0 }, pba: { bar: 4, offset: 0x800 } },
      bars: {
        0: {
          size: 4096,
          read: (off, dst) => { this.mem.copy(dst, 0, off, off + dst.length); },
          write: (off, src) => { src.copy(this.mem, off); this.interrupt(0); },
        },
        4: { size: 4096 }, // the MSI-X table and PBA live here
      },
    });
  }
  onReset() { this.mem.fill(0); }
}

const dir = mkdtempSync(join(tmpdir(), 'vfio-user-example-'));
const socket = join(dir, 'scratch.sock');
const server = await VfioUserServer.listen(socket, new Scratch());

const client = await VfioUserClient.connect(socket);
const pci = await PciFunction.open(client);
console.log('device', pci.header.vendorId.toString(16), pci.header.deviceId.toString(16));
console.log('capabilities', pci.capabilities.map((c) => c.id.toString(16)).join(' '));
await pci.enable({ memory: true, busMaster: true });
await pci.setMsixEnabled(true);
await client.enableIrqs(2, 1); // MSI-X vector 0 -> an eventfd
const irq = client.waitForIrq(2, 0, 2000);
await client.writeUint(0, 0x10, 4, 0xdeadbeef);
await irq;
console.log('read back', (await client.readUint(0, 0x10, 4)).toString(16), '- MSI-X vector 0 received');
client.close();
await server.close();
rmSync(dir, { recursive: true, force: true });
