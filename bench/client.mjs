// Client benchmark: our VfioUserClient doing 4-byte config-space REGION_READ round trips (one at a
// time, promise API) against OUR server and against the C echo server (the floor a server can
// reach), plus the C client against the C echo server as the all-C reference - in one run, with
// both processes pinned to the same CPU and to different CPUs. Prints JSON.
//   npm run build:ts && node bench/client.mjs [--seconds 3] [--json-out FILE]
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runClient, startEcho } from './c-floor.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const seconds = Number(opt('--seconds', '3'));

function pinned(cpu, script, scriptArgs) {
  const child = spawn('taskset', ['-c', String(cpu), process.execPath, join(here, script), ...scriptArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (d) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d) => (err += d));
  const done = new Promise((res, rej) => child.on('close', (code) => (code === 0 ? res(out) : rej(new Error(`${script} exited ${code}: ${err}`)))));
  return { child, done, firstLine: () => new Promise((res) => { const t = setInterval(() => { if (out.includes('\n')) { clearInterval(t); res(out); } }, 5); }) };
}

async function withSocket(fn) {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-bench-client-'));
  try {
    return await fn(join(dir, 's'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const round = (r) => ({ roundTripsPerSec: Math.round(r.roundTripsPerSec), usPerRoundTrip: +r.usPerRoundTrip.toFixed(3), p50Us: +r.p50Us.toFixed(2), p99Us: +r.p99Us.toFixed(2) });

async function ourClientAgainst(server, serverCpu, clientCpu) {
  return withSocket(async (sock) => {
    let stop;
    if (server === 'echo') {
      const echo = await startEcho(sock, { cpu: serverCpu });
      stop = () => echo.stop();
    } else {
      const srv = pinned(serverCpu, 'server-peer.cjs', [sock]);
      await srv.firstLine();
      stop = () => srv.done;
    }
    try {
      const c = pinned(clientCpu, 'client-peer.cjs', [sock, String(seconds)]);
      return round(JSON.parse(await c.done));
    } finally {
      await stop();
    }
  });
}

async function cAgainstEcho(serverCpu, clientCpu) {
  return withSocket(async (sock) => {
    const echo = await startEcho(sock, { cpu: serverCpu });
    try {
      return round(await runClient(sock, { seconds, cpu: clientCpu }));
    } finally {
      await echo.stop();
    }
  });
}

const placements = cpus().length >= 2 ? { sameCpu: [0, 0], differentCpus: [0, 1] } : { sameCpu: [0, 0] };
const results = {};
for (const [name, [s, c]] of Object.entries(placements)) {
  const oursVsOurs = await ourClientAgainst('ours', s, c);
  const oursVsEcho = await ourClientAgainst('echo', s, c);
  const cVsEcho = await cAgainstEcho(s, c);
  results[name] = {
    nodeClientVsOurServer: oursVsOurs,
    nodeClientVsCEcho: oursVsEcho,
    cClientVsCEcho: cVsEcho,
    // How close our client gets to the all-C pair on the same (C echo) server.
    clientRatio: +(oursVsEcho.roundTripsPerSec / cVsEcho.roundTripsPerSec).toFixed(3),
  };
  process.stderr.write(`${name}: node client vs our server ${oursVsOurs.roundTripsPerSec}/s, vs C echo ${oursVsEcho.roundTripsPerSec}/s; C client vs C echo ${cVsEcho.roundTripsPerSec}/s\n`);
}
const report = { bench: 'client-region-read', node: process.version, seconds, message: 'REGION_READ region 7 offset 0 count 4', results };
console.log(JSON.stringify(report, null, 2));
const jsonOut = opt('--json-out', null);
if (jsonOut) writeFileSync(jsonOut, JSON.stringify(report, null, 2) + '\n');
