'use strict';
// The server side of bench/server.mjs, for one client. Prints "listening PATH" once the socket
// accepts connections and exits when the client has gone.
//   node bench/server-peer.cjs SOCKET           VfioUserServer (from dist/) serving a minimal
//                                               PCI-like device: 9 regions, of which only config
//                                               space (region 7, 256 bytes) is implemented, 5 IRQs
//   node bench/server-peer.cjs SOCKET --floor   the Node floor: the same answers from a bare
//                                               addon loop (Poller + recvmsg + one sendmsg per
//                                               reply), no framework - what any Node server on
//                                               this addon pays for the event loop and N-API
const { binding } = require('../dist/native/binding.js');

const socketPath = process.argv[2];
if (!socketPath) {
  console.error('usage: server-peer.cjs SOCKET [--floor]');
  process.exit(2);
}

const READ = 0x1;
const WRITE = 0x2;
const config = Buffer.alloc(256);
config.writeUInt16LE(0x4e58, 0); // vendor
config.writeUInt16LE(0x0001, 2); // device
config[0x0e] = 0; // header type 0

const device = {
  flags: 0x3, // PCI | RESET
  regions: [
    null, null, null, null, null, null, null,
    {
      size: 256,
      flags: READ | WRITE,
      read(offset, dst) {
        config.copy(dst, 0, offset, offset + dst.length);
      },
      write(offset, src) {
        src.copy(config, offset);
      },
    },
    null,
  ],
  irqs: [{ count: 1 }, { count: 1 }, { count: 1 }, { count: 1 }, { count: 1 }],
  attach() {},
  reset() {},
};

if (process.argv[3] === '--floor') floor();
else framework();

function framework() {
  const { VfioUserServer } = require('../dist/server/server.js');
  const at = process.argv.indexOf('--busy-poll');
  const busyPollUs = at > 0 ? Number(process.argv[at + 1]) : 0;
  VfioUserServer.listen(socketPath, device, { busyPollUs }).then(
    (server) => {
      server.on('error', (err) => console.error('server-peer: device error:', err));
      // Close once the client is gone and let the loop drain (so --cpu-prof writes its profile).
      server.once('disconnect', () => void server.close());
      process.stdout.write(`listening ${socketPath}\n`);
    },
    (err) => {
      console.error(`server-peer: ${err.message}`);
      process.exit(1);
    },
  );
}

/** Minimal, protocol-correct for vu_client only: VERSION, DEVICE_GET_INFO, REGION_READ. */
function floor() {
  const VERSION = 1;
  const DEVICE_GET_INFO = 4;
  const REGION_READ = 9;
  const listenFd = binding.unixListen(socketPath, 1);
  const listener = new binding.Poller(listenFd, () => {
    const fd = binding.unixAccept(listenFd);
    if (fd < 0) return;
    listener.close();
    require('node:fs').closeSync(listenFd);
    serve(fd);
  });
  listener.start(binding.pollEvents.READABLE);
  process.stdout.write(`listening ${socketPath}\n`);

  function serve(fd) {
    const buf = Buffer.alloc(64 * 1024);
    const fdsOut = new Int32Array(17);
    const out = Buffer.alloc(16 + 16 + 4096);
    const iov = [out];
    let have = 0;
    const reply = (msg, size, error) => {
      out.writeUInt16LE(msg.readUInt16LE(0), 0);
      out.writeUInt16LE(msg.readUInt16LE(2), 2);
      out.writeUInt32LE(size, 4);
      out.writeUInt32LE(error ? 0x21 : 0x1, 8);
      out.writeUInt32LE(error, 12);
      iov[0] = size === out.length ? out : out.subarray(0, size);
      binding.sendmsg(fd, iov, null);
    };
    const poller = new binding.Poller(fd, () => {
      for (;;) {
        const n = binding.recvmsg(fd, buf, have, buf.length - have, fdsOut);
        if (n === -1) return;
        if (n === 0) {
          poller.close();
          require('node:fs').closeSync(fd);
          return;
        }
        have += n;
        let at = 0;
        while (have - at >= 16) {
          const size = buf.readUInt32LE(at + 4);
          if (have - at < size) break;
          const msg = buf.subarray(at, at + size);
          const command = msg.readUInt16LE(2);
          if (command === REGION_READ) {
            const offset = msg.readUInt32LE(16);
            const count = msg.readUInt32LE(28);
            msg.copy(out, 16, 16, 32);
            config.copy(out, 32, offset, offset + count);
            reply(msg, 32 + count, 0);
          } else if (command === DEVICE_GET_INFO) {
            out.writeUInt32LE(16, 16);
            out.writeUInt32LE(device.flags, 20);
            out.writeUInt32LE(device.regions.length, 24);
            out.writeUInt32LE(device.irqs.length, 28);
            reply(msg, 32, 0);
          } else if (command === VERSION) {
            out.writeUInt32LE(0, 16); // 0.0
            out.write('{}\0', 20, 'latin1');
            reply(msg, 23, 0);
          } else {
            reply(msg, 16, 22);
          }
          at += size;
        }
        buf.copyWithin(0, at, have);
        have -= at;
      }
    });
    poller.start(binding.pollEvents.READABLE | binding.pollEvents.DISCONNECT);
  }
}
