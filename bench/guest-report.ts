/** What every guest benchmark reports besides its results: CPU placement, load, and the JSON itself. */
import * as fs from 'node:fs';
import * as os from 'node:os';

/** "2 CPUs; server pinned to 1; QEMU unpinned" from the taskset CPU lists (undefined: unpinned). */
export function placement(pinServer: string | undefined, pinQemu: string | undefined): string {
  const where = (pin: string | undefined): string => (pin ? `pinned to ${pin}` : 'unpinned');
  return `${os.cpus().length} CPUs; server ${where(pinServer)}; QEMU ${where(pinQemu)}`;
}

/** The 1/5/15-minute load averages at `before` (os.loadavg() then) and now. */
export function loadSince(before: number[]): { before: number[]; after: number[] } {
  const round = (xs: number[]): number[] => xs.map((x) => +x.toFixed(2));
  return { before: round(before), after: round(os.loadavg()) };
}

/** Prints the report as JSON, and writes it to BENCH_JSON_OUT when set. */
export function publish(report: object): void {
  const json = JSON.stringify(report, null, 2);
  console.log(json);
  if (process.env.BENCH_JSON_OUT) fs.writeFileSync(process.env.BENCH_JSON_OUT, json + '\n');
}
