// Serve the ACCES PCI-IDIO-16 GPIO card and report what the guest does with it.
// Run: node examples/gpio-server.mjs /tmp/gpio.sock   (then start QEMU with the printed option)
import { Idio16Device, VfioUserServer } from 'vfio-user';

const socket = process.argv[2] ?? '/tmp/gpio.sock';
const card = new Idio16Device();
card.setInputs(0xa5c3);
card.events.on('outputs', (value) => console.log(`guest set outputs to 0x${value.toString(16)}`));
const server = await VfioUserServer.listen(socket, card);
server.on('connect', () => console.log('VMM connected'));
console.log(`attach with: -device '{"driver":"vfio-user-pci","socket":{"path":"${socket}","type":"unix"}}'`);
process.once('SIGINT', () => server.close());
if (process.env.EXAMPLE_ONESHOT) await server.close();
