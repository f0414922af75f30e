// Transport benchmark: Connection request/reply vs a raw addon ping-pong floor, both ends Node,
// with both processes pinned to the same CPU and to different CPUs. Prints JSON.
//   node bench/transport.mjs [--seconds 3] [--json-out FILE]
import { fork } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, cpus } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const seconds = Number(opt('--seconds', '3'));
const peer = join(here, 'transport-peer.cjs');

function spawnPinned(role, cpu, socketPath) {
  // taskset pins the forked Node process (execPath wrapped), keeping the IPC channel.
  return fork(peer, [role, socketPath, String(seconds)], {
    execPath: 'taskset',
    execArgv: ['-c', String(cpu), process.execPath],
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
}

function once(child, pred) {
  return new Promise((resolve, reject) => {
    child.on('message', (m) => pred(m) && resolve(m));
    child.on('exit', (code) => code !== 0 && reject(new Error(`peer exited with ${code}`)));
  });
}

async function pair(kind, serverCpu, clientCpu) {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-bench-'));
  const sock = join(dir, 's');
  try {
    const server = spawnPinned(`${kind}-server`, serverCpu, sock);
    await once(server, (m) => m.ready);
    const client = spawnPinned(`${kind}-client`, clientCpu, sock);
    const r = await once(client, (m) => m.roundTrips !== undefined);
    await new Promise((res) => server.exitCode !== null ? res() : server.on('exit', res));
    return { roundTripsPerSec: Math.round((r.roundTrips * 1e9) / r.ns), usPerRoundTrip: +(r.ns / r.roundTrips / 1000).toFixed(3), roundTrips: r.roundTrips, minorGcs: r.minorGcs, bytesPerRoundTrip: r.bytesPerRoundTrip, gcFreeWindows: r.gcFreeWindows };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const placements = cpus().length >= 2 ? { sameCpu: [0, 0], differentCpus: [0, 1] } : { sameCpu: [0, 0] };
const results = {};
for (const [name, [a, b]] of Object.entries(placements)) {
  const floor = await pair('floor', a, b);
  const connection = await pair('conn', a, b);
  results[name] = {
    floor,
    connection,
    // The round-trip time ratio (1.0 = as fast as the floor); the target is <= 1.3.
    timeRatio: +(connection.usPerRoundTrip / floor.usPerRoundTrip).toFixed(3),
    // JS heap bytes allocated per round trip, by the Connection and by the bare floor loop.
    bytesPerRoundTrip: { connection: connection.bytesPerRoundTrip, floor: floor.bytesPerRoundTrip },
  };
  process.stderr.write(`${name}: floor ${floor.roundTripsPerSec}/s, connection ${connection.roundTripsPerSec}/s, ratio ${results[name].timeRatio}\n`);
}
const report = { bench: 'transport-roundtrip', node: process.version, seconds, message: 'REGION_READ 32 B request / 36 B reply', results };
const out = JSON.stringify(report, null, 2);
console.log(out);
const jsonOut = opt('--json-out', null);
if (jsonOut) writeFileSync(jsonOut, out + '\n');
