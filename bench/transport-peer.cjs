'use strict';
// One end of the transport benchmark (see bench/transport.mjs). Roles:
//   floor-server / floor-client: raw sendmsg/recvmsg ping-pong through the addon, no framing;
//   conn-server / conn-client:   the same exchange through Connection (framing, msg_id matching).
// Both exchange a REGION_READ-sized request (32 bytes) and a 4-byte REGION_READ reply (36 bytes).
const { binding } = require('../dist/native/binding.js');
const { Fd } = require('../dist/native/fd.js');
const { Connection } = require('../dist/transport/connection.js');
const { PerformanceObserver, constants: perfConstants } = require('node:perf_hooks');
const v8 = require('node:v8');

const [role, socketPath, seconds] = [process.argv[2], process.argv[3], Number(process.argv[4] ?? 3)];
const REQ = 32;
const REP = 36;
const REGION_READ = 9;

function acceptOne(listenFd, onSocket) {
  const poller = new binding.Poller(listenFd, () => {
    const fd = binding.unixAccept(listenFd);
    if (fd < 0) return;
    poller.close();
    onSocket(fd);
  });
  poller.start(binding.pollEvents.READABLE);
}

function listen() {
  const fd = binding.unixListen(socketPath, 1);
  process.send?.({ ready: true });
  return fd;
}

function floorServer() {
  const listenFd = listen();
  acceptOne(listenFd, (fd) => {
    const buf = Buffer.alloc(4096);
    const reply = Buffer.alloc(REP);
    const iov = [reply];
    const fdsOut = new Int32Array(2);
    let have = 0;
    const poller = new binding.Poller(fd, () => {
      for (;;) {
        const n = binding.recvmsg(fd, buf, have, buf.length - have, fdsOut);
        if (n === -1) return;
        if (n === 0) { poller.close(); process.exit(0); }
        have += n;
        while (have >= REQ) {
          binding.sendmsg(fd, iov, null);
          buf.copyWithin(0, REQ, have);
          have -= REQ;
        }
      }
    });
    poller.start(binding.pollEvents.READABLE);
  });
}

function newSpaceUsed() {
  for (const space of v8.getHeapSpaceStatistics()) if (space.space_name === 'new_space') return space.space_used_size;
  return 0;
}

// Allocation per round trip: growth of V8's new space across windows of SAMPLE_EVERY round trips
// in which no GC ran (a GC empties new space and would hide the growth). The median of the
// windows is reported; the sampling itself costs well under 0.1 byte per round trip.
const SAMPLE_EVERY = 4096;

function measure(run) {
  let minorGcs = 0;
  const obs = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) if (e.detail?.kind === perfConstants.NODE_PERFORMANCE_GC_MINOR) minorGcs++;
  });
  obs.observe({ entryTypes: ['gc'] });
  const windows = [];
  let lastUsed = -1;
  let lastGcs = 0;
  const sample = () => {
    const used = newSpaceUsed();
    if (lastUsed >= 0 && minorGcs === lastGcs && used >= lastUsed) windows.push((used - lastUsed) / SAMPLE_EVERY);
    lastUsed = used;
    lastGcs = minorGcs;
  };
  run(sample, (roundTrips, ns) => {
    setImmediate(() => {
      obs.disconnect();
      windows.sort((a, b) => a - b);
      const bytesPerRoundTrip = windows.length ? +windows[windows.length >> 1].toFixed(2) : null;
      process.send({ roundTrips, ns, minorGcs, bytesPerRoundTrip, gcFreeWindows: windows.length });
      process.exit(0);
    });
  });
}

function floorClient() {
  const fd = binding.unixConnect(socketPath);
  const req = Buffer.alloc(REQ);
  const iov = [req];
  const buf = Buffer.alloc(4096);
  const fdsOut = new Int32Array(2);
  measure((sample, done) => {
    let have = 0;
    let count = 0;
    let warm = 20000;
    let start = 0n;
    const end = () => Number(process.hrtime.bigint() - start) >= seconds * 1e9;
    const poller = new binding.Poller(fd, () => {
      for (;;) {
        const n = binding.recvmsg(fd, buf, have, buf.length - have, fdsOut);
        if (n === -1) return;
        have += n;
        while (have >= REP) {
          have -= REP;
          if (warm > 0 && --warm === 0) start = process.hrtime.bigint();
          else if (warm === 0 && (++count & (SAMPLE_EVERY - 1)) === 0) sample();
          if (warm === 0 && (count & 1023) === 0 && end()) {
            poller.close();
            done(count, Number(process.hrtime.bigint() - start));
            return;
          }
          binding.sendmsg(fd, iov, null);
        }
      }
    });
    poller.start(binding.pollEvents.READABLE);
    binding.sendmsg(fd, iov, null);
  });
}

function connServer() {
  const listenFd = listen();
  acceptOne(listenFd, (fd) => {
    const conn = new Connection(new Fd(fd), { name: 'bench-server' });
    const echo = Buffer.alloc(16);
    const data = Buffer.from([0x78, 0x56, 0x34, 0x12]);
    const body = [echo, data];
    conn.onRequest = (msg) => {
      // Echo the 16-byte access struct (Buffer#copy with offsets would allocate a view).
      const d = msg.data;
      const p = msg.payloadOffset;
      for (let i = 0; i < 16; i += 4) echo.writeUInt32LE(d.readUInt32LE(p + i), i);
      conn.reply(msg, body);
    };
    conn.on('close', () => process.exit(0));
  });
}

function connClient() {
  const conn = new Connection(new Fd(binding.unixConnect(socketPath)), { name: 'bench-client' });
  const req = Buffer.alloc(16);
  req.writeUInt32LE(4, 12); // count 4 at offset 0 of region 0
  measure((sample, done) => {
    let count = 0;
    let warm = 20000;
    let start = 0n;
    const onReply = (err) => {
      if (err) throw err;
      if (warm > 0 && --warm === 0) start = process.hrtime.bigint();
      else if (warm === 0 && (++count & (SAMPLE_EVERY - 1)) === 0) {
        sample();
        if (Number(process.hrtime.bigint() - start) >= seconds * 1e9) {
          done(count, Number(process.hrtime.bigint() - start));
          conn.close();
          return;
        }
      }
      conn.send(REGION_READ, req, null, onReply);
    };
    conn.send(REGION_READ, req, null, onReply);
  });
}

({ 'floor-server': floorServer, 'floor-client': floorClient, 'conn-server': connServer, 'conn-client': connClient })[role]();
