#!/usr/bin/env node
// npm's `install` hook. node-gyp-build loads the prebuilt addon from prebuilds/ when one matches
// (the registry package ships linux-x64) and otherwise compiles it with node-gyp. When that
// compile fails, node-gyp's own output ends with "gyp ERR!" lines that do not say what to do:
// this says what a source build needs, which of it is missing here, and where the README has it.
'use strict';
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const result = spawnSync(process.execPath, [require.resolve('node-gyp-build/bin.js')], { stdio: 'inherit' });
if (result.status === 0) process.exit(0);

/** True if `name` is an executable file in a PATH directory. */
function onPath(name) {
  return (process.env.PATH || '').split(path.delimiter).some((dir) => {
    try {
      fs.accessSync(path.join(dir || '.', name), fs.constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

const missing = [];
if (!onPath('python3') && !process.env.PYTHON && !process.env.npm_config_python) missing.push('python3');
if (!onPath('make')) missing.push('make');
const compiler = process.env.CXX || ['c++', 'g++', 'clang++'].find(onPath);
if (compiler === undefined) missing.push('a C++ compiler (g++ or clang++)');

const lines = [
  '',
  'vfio-user: the native addon could not be built from source.',
  `  No prebuilt addon matches this system (${process.platform}-${process.arch}, Node ${process.versions.node}), so`,
  '  npm compiled it with node-gyp, and that failed (its messages are above).',
  '  A source build needs Linux, Node.js >= 20, Python 3, make and a C++ compiler (g++ or clang++).',
  missing.length > 0 ? `  Missing here: ${missing.join(', ')}.` : '  All of them were found: the cause is in the messages above.',
  ...(process.env.npm_config_nodedir
    ? []
    : ["  node-gyp also needs Node's headers: it downloads them unless `npm config set nodedir DIR` names", '  installed ones (DIR/include/node: /usr when /usr/include/node exists).']),
  '  On Debian or Ubuntu: apt-get install python3 make g++',
  '  A package made by `npm pack` (as the registry one will be) carries a prebuilt linux-x64 addon',
  '  and installs without any of them.',
  `  More: "Set up" in ${path.join(__dirname, '..', 'README.md')}`,
  '',
];
process.stderr.write(lines.join('\n'));
process.exit(result.status === null ? 1 : result.status);
