// The host benchmark suite: runs each benchmark in turn (each in its own process, each carrying
// its own reference measured in the same run) and prints one JSON document with every report.
//   npm run bench [-- --seconds 3] [--only transport,server] [--json-out FILE]
// The guest benchmarks need a QEMU root and take minutes: `npm run bench:guest`.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const opt = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);
if (args.includes('--help') || args.includes('-h')) {
  process.stdout.write(readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n').slice(0, 4).join('\n') + '\n');
  process.exit(0);
}
const seconds = opt('--seconds', '3');

// name -> arguments; every benchmark takes --json-out.
const SUITE = {
  transport: ['transport.mjs', '--seconds', seconds],
  server: ['server.mjs', '--seconds', seconds],
  client: ['client.mjs', '--seconds', seconds],
  'nvme-perf': ['nvme-perf.mjs', '--time', seconds],
  'nvme-doorbells': ['nvme-doorbells.mjs', '--time', seconds],
  migrate: ['migrate.mjs', '--runs', '3'],
};
const only = opt('--only', null)?.split(',') ?? Object.keys(SUITE);
const unknown = only.filter((name) => !(name in SUITE));
if (unknown.length > 0) {
  console.error(`bench: unknown benchmark ${unknown.join(', ')} (have: ${Object.keys(SUITE).join(', ')})`);
  process.exit(2);
}

const dir = mkdtempSync(join(tmpdir(), 'vfu-bench-'));
const report = {
  machine: { cpus: cpus().length, model: cpus()[0]?.model, loadavg: loadavg(), node: process.version },
  started: new Date().toISOString(),
  results: {},
  failed: [],
};
try {
  for (const name of only) {
    const [script, ...rest] = SUITE[name];
    const out = join(dir, `${name}.json`);
    console.error(`bench: ${name} ...`);
    const run = spawnSync(process.execPath, [join(here, script), ...rest, '--json-out', out], { stdio: ['ignore', 'ignore', 'inherit'] });
    try {
      report.results[name] = JSON.parse(readFileSync(out, 'utf8'));
    } catch {
      report.failed.push({ name, status: run.status, signal: run.signal });
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
const text = JSON.stringify(report, null, 2) + '\n';
const jsonOut = opt('--json-out', null);
if (jsonOut) writeFileSync(jsonOut, text);
process.stdout.write(text);
process.exit(report.failed.length > 0 ? 1 : 0);
