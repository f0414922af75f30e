// Writes dist/index.mjs: an ES module facade that re-exports the CommonJS build by name, so
// `import { VfioUserServer } from 'vfio-user'` and `require('vfio-user')` load the same code.
import { createRequire } from 'node:module';
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join, dirname } from 'node:path';

const dist = join(dirname(fileURLToPath(import.meta.url)), '..', 'dist');
const require = createRequire(import.meta.url);
let names;
try {
  names = Object.keys(require(join(dist, 'index.js')));
} catch (err) {
  // The addon may not be built yet (npm ci runs `prepare` before a source build finishes):
  // fall back to the names the compiler saw.
  names = [...readExportNames(join(dist, 'index.js'))];
}
const lines = ["import cjs from './index.js';", 'export default cjs;'];
for (const name of names.filter((n) => n !== 'default' && n !== '__esModule')) {
  lines.push(`export const ${name} = cjs.${name};`);
}
writeFileSync(join(dist, 'index.mjs'), lines.join('\n') + '\n');

function readExportNames(file) {
  const src = require('node:fs').readFileSync(file, 'utf8');
  const out = new Set();
  for (const m of src.matchAll(/exports\.([A-Za-z_$][\w$]*)\s*=/g)) out.add(m[1]);
  for (const m of src.matchAll(/Object\.defineProperty\(exports, "([A-Za-z_$][\w$]*)"/g)) out.add(m[1]);
  return out;
}
