'use strict';
// The shared-memory floor: the fastest a request and its answer can cross between two Node
// processes that poll one shared page - what a polled NVMe queue pair (mmap'd doorbell, polled
// completion) could at best achieve at QD 1. The parent stores a sequence number, the child
// (spinning on the page) echoes it, the parent spins until the echo arrives.
//   node bench/shm-floor.cjs [--seconds 2] [--cpus 0,1]   prints { roundTripsPerSec, p50Us, ... }
// --cpus A,B: the child (the "device") is pinned to B; run the parent under `taskset -c A` (the
// "driver" CPU; --cpus only records A).
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { binding } = require('../dist/native/binding.js');

const { PROT_READ, PROT_WRITE } = binding.constants;
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);

if (args[0] === '--child') child();
else parent().catch((err) => {
  console.error(err.message);
  process.exit(1);
});

/** Runs with the page as fd 3: echoes slot 0 into slot 1 until slot 0 is -1. */
function child() {
  const page = new Int32Array(binding.mmap(3, 0, 4096, PROT_READ | PROT_WRITE));
  page[2] = 1; // ready
  let last = 0;
  for (;;) {
    const v = Atomics.load(page, 0);
    if (v === last) continue;
    if (v === -1) return;
    last = v;
    Atomics.store(page, 1, v);
  }
}

async function parent() {
  const seconds = Number(opt('--seconds', '2'));
  const [driverCpu, deviceCpu] = opt('--cpus', '0,1').split(',');
  const fd = binding.memfdCreate('shm-floor');
  fs.ftruncateSync(fd, 4096);
  const page = new Int32Array(binding.mmap(fd, 0, 4096, PROT_READ | PROT_WRITE));
  const kid = spawn('taskset', ['-c', deviceCpu, process.execPath, __filename, '--child'], { stdio: ['ignore', 'inherit', 'inherit', fd] });
  fs.closeSync(fd);
  const exited = new Promise((resolve) => kid.on('exit', resolve));
  while (Atomics.load(page, 2) !== 1) await new Promise((r) => setTimeout(r, 5));
  const samples = new Float64Array(1 << 20);
  let n = 0;
  let seq = 0;
  const warmupUntil = process.hrtime.bigint() + 200_000_000n;
  while (process.hrtime.bigint() < warmupUntil) {
    Atomics.store(page, 0, ++seq);
    while (Atomics.load(page, 1) !== seq);
  }
  const start = process.hrtime.bigint();
  const end = start + BigInt(Math.round(seconds * 1e9));
  let t0 = start;
  for (;;) {
    Atomics.store(page, 0, ++seq);
    while (Atomics.load(page, 1) !== seq);
    const t1 = process.hrtime.bigint();
    if (n < samples.length) samples[n] = Number(t1 - t0);
    n++;
    t0 = t1;
    if (t1 >= end) break;
  }
  Atomics.store(page, 0, -1);
  await exited;
  const kept = samples.subarray(0, Math.min(n, samples.length)).sort();
  const pct = (p) => kept[Math.min(kept.length - 1, Math.floor((p / 100) * kept.length))] / 1000;
  const result = {
    bench: 'shm-floor',
    driverCpu: Number(driverCpu),
    deviceCpu: Number(deviceCpu),
    roundTrips: n,
    roundTripsPerSec: Math.round(n / seconds),
    p50Us: +pct(50).toFixed(3),
    p99Us: +pct(99).toFixed(3),
  };
  console.log(JSON.stringify(result));
}
