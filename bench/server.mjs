// Server benchmark: 4-byte config-space REGION_READ round trips (the workload) from the C
// client (bench/c/vu_client.c) against OUR server - VfioUserServer from dist/ serving a minimal
// PCI-like device (bench/server-peer.cjs) - and, in the same run, against the C echo server
// (bench/c/vu_echo.c), which is as fast as a vfio-user server can be. Both processes are pinned
// with taskset, in two placements: both on CPU 0, and server CPU 0 / client CPU 1. Prints JSON with
// rates, us per round trip, p50/p99 and the ratio ours/echo per placement (target >= 0.9).
// A third server, the Node floor (server-peer.cjs --floor: the same answers from a bare addon
// loop), shows how much of the gap is Node's event loop and N-API rather than our framework; a
// fourth, the C echo in epoll mode (epoll_wait, then recv and send: the system calls an event
// loop makes per message, ours included), shows how much of it the extra system call costs.
//
//   npm run build:ts && node bench/server.mjs [--seconds 3] [--rounds 1] [--json-out FILE]
//                                              [--cpu-prof DIR]
//
// --rounds N alternates echo and ours N times per placement and reports the median of each;
// --cpu-prof DIR runs our server under `node --cpu-prof` and leaves the profiles in DIR.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildCTools, runClient, startEcho } from './c-floor.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');
const peer = join(here, 'server-peer.cjs');
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
const seconds = Number(opt('--seconds', '3'));
const rounds = Number(opt('--rounds', '1'));
const jsonOut = opt('--json-out', null);
const profDir = opt('--cpu-prof', null);
const busyPollUs = Number(opt('--busy-poll-us', '50'));
const TARGET = 0.9;

/** Warn when dist/ (what the server runs) is older than the sources it was built from. */
function checkDist() {
  const built = join(root, 'dist', 'server', 'server.js');
  if (!existsSync(built)) throw new Error('dist/ is missing: run `npm run build:ts` first');
  const builtAt = statSync(built).mtimeMs;
  const stale = [];
  for (const dir of ['server', 'transport', 'native', 'protocol']) {
    const walk = (d) => {
      for (const e of readdirSync(d, { withFileTypes: true })) {
        const p = join(d, e.name);
        if (e.isDirectory()) walk(p);
        else if (p.endsWith('.ts') && statSync(p).mtimeMs > builtAt) stale.push(p.slice(root.length + 1));
      }
    };
    walk(join(root, 'lib', dir));
  }
  if (stale.length > 0) process.stderr.write(`warning: dist/ is older than ${stale.join(', ')}: run \`npm run build:ts\`\n`);
}

/** Start our server (or the Node floor) pinned to `cpu`; resolves once it listens, to { exited }. */
function startOurs(socketPath, cpu, floor, busyPoll = 0) {
  const nodeArgs = profDir && !floor ? ['--cpu-prof', `--cpu-prof-dir=${resolve(profDir)}`] : [];
  const peerArgs = floor ? [peer, socketPath, '--floor'] : [peer, socketPath, '--busy-poll', String(busyPoll)];
  const child = spawn('taskset', ['-c', String(cpu), process.execPath, ...nodeArgs, ...peerArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
  const exited = new Promise((res) => child.on('close', (code, signal) => res({ code, signal, stderr })));
  return new Promise((res, rej) => {
    let out = '';
    const timer = setTimeout(() => { child.kill('SIGKILL'); rej(new Error(`server-peer did not start: ${stderr}`)); }, 10000);
    child.stdout.setEncoding('utf8').on('data', (d) => {
      out += d;
      if (out.includes('\n')) {
        clearTimeout(timer);
        res({ child, exited });
      }
    });
    exited.then(({ code, signal }) => { clearTimeout(timer); rej(new Error(`server-peer exited early (${signal ?? code}): ${stderr.trim()}`)); });
  });
}

function summary(r) {
  return {
    roundTripsPerSec: Math.round(r.roundTripsPerSec),
    usPerRoundTrip: +r.usPerRoundTrip.toFixed(3),
    p50Us: +r.p50Us.toFixed(2),
    p99Us: +r.p99Us.toFixed(2),
    roundTrips: r.roundTrips,
  };
}

async function withSocket(fn) {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-bench-server-'));
  try {
    return await fn(join(dir, 's'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function measureEcho(serverCpu, clientCpu, epoll = false) {
  return withSocket(async (sock) => {
    const srv = await startEcho(sock, { cpu: serverCpu, epoll });
    try {
      return summary(await runClient(sock, { seconds, cpu: clientCpu }));
    } finally {
      await srv.stop();
    }
  });
}

async function measureOurs(serverCpu, clientCpu, floor = false, busyPoll = 0) {
  return withSocket(async (sock) => {
    const srv = await startOurs(sock, serverCpu, floor, busyPoll);
    try {
      return summary(await runClient(sock, { seconds, cpu: clientCpu }));
    } finally {
      // It exits by itself once the client is gone; do not wait forever.
      const t = setTimeout(() => srv.child.kill('SIGTERM'), 10000);
      const { code, signal, stderr } = await srv.exited;
      clearTimeout(t);
      if (code !== 0) process.stderr.write(`server-peer exited with ${signal ?? code}: ${stderr}\n`);
    }
  });
}

const median = (list, key) => {
  const sorted = [...list].sort((a, b) => a[key] - b[key]);
  return sorted[Math.floor((sorted.length - 1) / 2)];
};

async function main() {
  checkDist();
  await buildCTools();
  if (profDir) mkdirSync(profDir, { recursive: true });
  const placements = cpus().length >= 2 ? { sameCpu: [0, 0], differentCpus: [0, 1] } : { sameCpu: [0, 0] };
  const results = {};
  for (const [name, [serverCpu, clientCpu]] of Object.entries(placements)) {
    const echo = [];
    const ours = [];
    const nodeFloor = [];
    const busy = [];
    const echoEpoll = [];
    for (let i = 0; i < rounds; i++) {
      echo.push(await measureEcho(serverCpu, clientCpu));
      echoEpoll.push(await measureEcho(serverCpu, clientCpu, true));
      ours.push(await measureOurs(serverCpu, clientCpu));
      if (busyPollUs > 0) busy.push(await measureOurs(serverCpu, clientCpu, false, busyPollUs));
      nodeFloor.push(await measureOurs(serverCpu, clientCpu, true));
    }
    const e = median(echo, 'roundTripsPerSec');
    const o = median(ours, 'roundTripsPerSec');
    const f = median(nodeFloor, 'roundTripsPerSec');
    const ee = median(echoEpoll, 'roundTripsPerSec');
    const b = busy.length > 0 ? median(busy, 'roundTripsPerSec') : null;
    results[name] = {
      serverCpu,
      clientCpu,
      ours: o,
      ...(b ? { oursBusyPoll: { busyPollUs, ...b, ratio: +(b.roundTripsPerSec / e.roundTripsPerSec).toFixed(3) } } : {}),
      echo: e,
      echoEpoll: { ...ee, ratio: +(ee.roundTripsPerSec / e.roundTripsPerSec).toFixed(3) },
      nodeFloor: f,
      ratio: +(o.roundTripsPerSec / e.roundTripsPerSec).toFixed(3),
      meetsTarget: o.roundTripsPerSec / e.roundTripsPerSec >= TARGET,
      // How close we are to what a bare Node loop on the addon achieves, and that loop to C.
      ratioToNodeFloor: +(o.roundTripsPerSec / f.roundTripsPerSec).toFixed(3),
      nodeFloorRatio: +(f.roundTripsPerSec / e.roundTripsPerSec).toFixed(3),
      ...(rounds > 1
        ? { rounds: { ours: ours.map((r) => r.roundTripsPerSec), oursBusyPoll: busy.map((r) => r.roundTripsPerSec), echo: echo.map((r) => r.roundTripsPerSec), echoEpoll: echoEpoll.map((r) => r.roundTripsPerSec), nodeFloor: nodeFloor.map((r) => r.roundTripsPerSec) } }
        : {}),
    };
    process.stderr.write(
      `${name}: ours ${o.roundTripsPerSec}/s (${o.usPerRoundTrip} us), ` +
        (b ? `busy-poll ${busyPollUs} us ${b.roundTripsPerSec}/s (${b.usPerRoundTrip} us), ` : '') +
        `echo ${e.roundTripsPerSec}/s (${e.usPerRoundTrip} us), ` +
        `echo epoll ${ee.roundTripsPerSec}/s (${ee.usPerRoundTrip} us), ` +
        `node floor ${f.roundTripsPerSec}/s (${f.usPerRoundTrip} us), ratio ${results[name].ratio}\n`,
    );
  }
  const report = {
    bench: 'server-region-read',
    workload: 'C vu_client, REGION_READ of 4 bytes of config space (region 7), one request in flight',
    node: process.version,
    seconds,
    rounds,
    target: `ours/echo >= ${TARGET}`,
    results,
  };
  const out = JSON.stringify(report, null, 2);
  console.log(out);
  if (jsonOut) writeFileSync(jsonOut, out + '\n');
}

main().catch((err) => {
  console.error(err.message ?? err);
  process.exit(1);
});
