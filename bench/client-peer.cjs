'use strict';
// The client side of bench/client.mjs: VfioUserClient (from dist/) doing back-to-back 4-byte
// REGION_READs of config space for SECONDS after a warm-up, then one JSON line with the result.
//   node bench/client-peer.cjs SOCKET SECONDS
const { VfioUserClient } = require('../dist/client/client.js');

const [socketPath, secondsArg] = process.argv.slice(2);
const seconds = Number(secondsArg ?? 3);
const WARMUP = 10000;

(async () => {
  // Propose 0.0 like QEMU: the C echo server answers 0.0 only.
  const client = await VfioUserClient.connect(socketPath, { version: { major: 0, minor: 0 }, twinSocket: false });
  const dst = Buffer.alloc(4);
  for (let i = 0; i < WARMUP; i++) await client.readInto(7, 0, dst);
  const lat = new Float64Array(1 << 20);
  let n = 0;
  const start = process.hrtime.bigint();
  const end = start + BigInt(Math.round(seconds * 1e9));
  let now = start;
  while (now < end) {
    const t0 = now;
    await client.readInto(7, 0, dst);
    now = process.hrtime.bigint();
    if (n < lat.length) lat[n] = Number(now - t0) / 1000;
    n++;
  }
  const ns = Number(now - start);
  const sample = lat.subarray(0, Math.min(n, lat.length)).sort();
  const pct = (p) => sample[Math.min(sample.length - 1, Math.floor((p / 100) * sample.length))];
  client.close();
  process.stdout.write(JSON.stringify({ roundTrips: n, roundTripsPerSec: (n * 1e9) / ns, usPerRoundTrip: ns / n / 1000, p50Us: pct(50), p99Us: pct(99) }) + '\n');
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
