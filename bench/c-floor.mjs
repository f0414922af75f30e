// C floor for vfio-user round trips: builds bench/c/vu_client.c and bench/c/vu_echo.c with the
// system `cc -O2` (cached by source hash in bench/.build/) and runs them.
//
// Library use (from other benchmarks):
//   import { buildCTools, runClient, startEcho } from './c-floor.mjs';
//   const { client, echo } = await buildCTools();               // paths to the binaries
//   const srv = await startEcho(sock, { cpu: 0 });              // { child, stop() }
//   const r = await runClient(sock, { seconds: 3, cpu: 1 });    // parsed vu_client --json output
//   await srv.stop();
//
// CLI: node bench/c-floor.mjs [--seconds 3] [--pipeline 1] [--count 4]
//   runs vu_client against vu_echo with both on CPU 0 and with server CPU 0 / client CPU 1,
//   and prints JSON { sameCpu, differentCpus }.
import { spawn, execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, unlinkSync, mkdirSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const srcDir = join(here, 'c');
const buildDir = join(here, '.build');
const CC = process.env.CC || 'cc';
const CFLAGS = ['-O2', '-Wall', '-Wextra', '-Werror', '-std=gnu11'];
const TOOLS = { client: 'vu_client', echo: 'vu_echo' };
const HEADERS = ['vu_common.h'];

function run(cmd, args) {
  return new Promise((res, rej) => {
    execFile(cmd, args, { maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (err) {
        err.message = `${cmd} ${args.join(' ')} failed: ${err.code === 'ENOENT' ? `${cmd} not found` : ''}${stderr || err.message}`;
        rej(err);
      } else res({ stdout, stderr });
    });
  });
}

let builtPromise = null;

/**
 * Compile both tools into bench/.build/ unless a binary for the current sources, flags and
 * compiler already exists there. Resolves to absolute paths { client, echo }.
 */
export function buildCTools() {
  builtPromise ??= (async () => {
    mkdirSync(buildDir, { recursive: true });
    const ccVersion = (await run(CC, ['--version'])).stdout.split('\n')[0];
    const out = {};
    for (const [key, name] of Object.entries(TOOLS)) {
      const h = createHash('sha256');
      h.update(`${CC}\0${ccVersion}\0${CFLAGS.join(' ')}\0`);
      for (const f of [`${name}.c`, ...HEADERS]) h.update(`${f}\0`).update(readFileSync(join(srcDir, f))).update('\0');
      const tag = h.digest('hex').slice(0, 16);
      const bin = join(buildDir, `${name}-${tag}`);
      if (!existsSync(bin)) {
        const tmp = `${bin}.tmp-${process.pid}`;
        await run(CC, [...CFLAGS, '-o', tmp, join(srcDir, `${name}.c`)]);
        renameSync(tmp, bin); // atomic: concurrent builders never see a half-written binary
        for (const f of readdirSync(buildDir)) { // drop binaries of older sources
          if (f.startsWith(`${name}-`) && f !== `${name}-${tag}` && !f.includes('.tmp-')) {
            try { unlinkSync(join(buildDir, f)); } catch { /* in use or gone: fine */ }
          }
        }
      }
      out[key] = bin;
    }
    return out;
  })();
  builtPromise.catch(() => { builtPromise = null; });
  return builtPromise;
}

function pinned(cpu, bin, args) {
  return cpu === undefined || cpu === null ? [bin, args] : ['taskset', ['-c', String(cpu), bin, ...args]];
}

/**
 * Run vu_client against a server listening on socketPath; resolves to its JSON result
 * {roundTrips, seconds, roundTripsPerSec, usPerRoundTrip, p50Us, p99Us, p999Us, minUs, maxUs,
 * meanUs, pipeline, region, offset, count, warmup, numRegions}. Rejects with the client's
 * stderr if it fails (connection, VERSION, or any reply mismatch).
 * Options: seconds (required), cpu, count (4), region (7), offset (0), pipeline (1),
 * warmup (10000 round trips), info (true: send DEVICE_GET_INFO first).
 */
export async function runClient(socketPath, { seconds, cpu, count, region, offset, pipeline, warmup, info = true } = {}) {
  if (!(seconds > 0)) throw new TypeError('runClient: seconds must be > 0');
  const { client } = await buildCTools();
  const args = [socketPath, '--seconds', String(seconds), '--json'];
  if (count !== undefined) args.push('--count', String(count));
  if (region !== undefined) args.push('--region', String(region));
  if (offset !== undefined) args.push('--offset', String(offset));
  if (pipeline !== undefined) args.push('--pipeline', String(pipeline));
  if (warmup !== undefined) args.push('--warmup', String(warmup));
  if (!info) args.push('--no-info');
  const [cmd, argv] = pinned(cpu, client, args);
  return new Promise((res, rej) => {
    const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
    child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
    const timer = setTimeout(() => child.kill('SIGKILL'), (seconds + 60) * 1000);
    child.on('error', (e) => { clearTimeout(timer); rej(e); });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code !== 0) return rej(new Error(`vu_client ${signal ? `killed by ${signal}` : `exited with ${code}`}: ${stderr.trim()}`));
      try { res(JSON.parse(stdout)); } catch { rej(new Error(`vu_client printed no JSON: ${stdout}${stderr}`)); }
    });
  });
}

/**
 * Start vu_echo listening on socketPath (a stale file there is removed first), optionally
 * pinned to cpu. Resolves once the socket accepts connections to { child, stop() }; stop()
 * terminates the server if it still runs, waits for it to exit and removes the socket.
 * The server serves exactly one client and exits when that client disconnects.
 * epoll: true waits in epoll_wait and reads without blocking (an event loop's system calls).
 */
export async function startEcho(socketPath, { cpu, epoll = false } = {}) {
  const { echo } = await buildCTools();
  try { unlinkSync(socketPath); } catch (e) { if (e.code !== 'ENOENT') throw e; }
  const [cmd, argv] = pinned(cpu, echo, epoll ? [socketPath, '--epoll'] : [socketPath]);
  const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
  const exited = new Promise((res) => child.on('close', (code, signal) => res({ code, signal })));

  await new Promise((res, rej) => {
    let out = '';
    const timer = setTimeout(() => { child.kill('SIGKILL'); rej(new Error(`vu_echo did not start within 10 s: ${stderr}`)); }, 10000);
    const done = (err) => { clearTimeout(timer); child.stdout.off('data', onData); err ? rej(err) : res(); };
    // vu_echo prints "listening PATH" after listen(); the socket must exist by then.
    const onData = (d) => {
      out += d;
      if (out.includes('\n')) {
        try {
          if (!statSync(socketPath).isSocket()) return done(new Error(`${socketPath} is not a socket`));
        } catch (e) { return done(e); }
        done();
      }
    };
    child.stdout.setEncoding('utf8').on('data', onData);
    child.on('error', done);
    exited.then(({ code, signal }) => done(new Error(`vu_echo exited early (${signal ?? code}): ${stderr.trim()}`)));
  });

  return {
    child,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const r = await exited;
      try { unlinkSync(socketPath); } catch { /* already removed by vu_echo */ }
      return r;
    },
  };
}

/** One measurement: echo on serverCpu, client on clientCpu. */
export async function measure({ serverCpu, clientCpu, seconds = 3, ...clientOpts } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'vu-c-floor-'));
  const sock = join(dir, 's');
  try {
    const srv = await startEcho(sock, { cpu: serverCpu });
    try {
      return await runClient(sock, { seconds, cpu: clientCpu, ...clientOpts });
    } finally {
      await srv.stop();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(argv) {
  const opt = (name, dflt) => (argv.includes(name) ? argv[argv.indexOf(name) + 1] : dflt);
  const seconds = Number(opt('--seconds', '3'));
  const extra = {};
  if (opt('--pipeline')) extra.pipeline = Number(opt('--pipeline'));
  if (opt('--count')) extra.count = Number(opt('--count'));
  const result = { sameCpu: await measure({ serverCpu: 0, clientCpu: 0, seconds, ...extra }) };
  result.differentCpus = cpus().length >= 2
    ? await measure({ serverCpu: 0, clientCpu: 1, seconds, ...extra })
    : null;
  console.log(JSON.stringify(result, null, 2));
}

if (process.argv[1] && pathToFileURL(resolve(process.argv[1])).href === import.meta.url) {
  main(process.argv.slice(2)).catch((e) => {
    console.error(e.message ?? e);
    process.exit(1);
  });
}
