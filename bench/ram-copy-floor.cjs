'use strict';
// The RAM disk's copy floor: 4 KiB reads at random offsets of a 1 GiB RamBackend whose pages are
// all allocated, in one process, nothing else. Every 4K random read the NVMe server serves from
// `--size 1G` pays this copy (a TLB miss and a cache-cold 4 KiB source), so 1e9 / nsPerRead is a
// ceiling on the server's IOPS on one core before any NVMe work.
//   node bench/ram-copy-floor.cjs [--seconds 2] [--size 1G]   prints { nsPerRead, readsPerSec }
const { RamBackend } = require('../dist/block/ram.js');

const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const seconds = Number(opt('--seconds', '2'));
const size = Number(opt('--size', String(1 << 30)));
const BLOCK = 4096;
const SLOTS = 32;

const disk = new RamBackend(size);
disk.bytes.fill(0xa5); // allocate every page, as a long random-read run does
const dst = Buffer.alloc(BLOCK * SLOTS);
const slots = Array.from({ length: SLOTS }, (_, i) => dst.subarray(i * BLOCK, (i + 1) * BLOCK));
let x = 0x9e3779b9;
const blocks = size / BLOCK;

let reads = 0;
const start = process.cpuUsage();
const t0 = performance.now();
while (performance.now() - t0 < seconds * 1000) {
  for (let i = 0; i < 1000; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    void disk.read(((x >>> 0) % blocks) * BLOCK, slots[reads++ % SLOTS]);
  }
}
const cpu = process.cpuUsage(start);
const nsPerRead = ((cpu.user + cpu.system) * 1000) / reads;
console.log(JSON.stringify({ bench: 'ram-copy-floor', sizeBytes: size, reads, nsPerRead: Math.round(nsPerRead), readsPerSec: Math.round(1e9 / nsPerRead) }));
void disk.close();
