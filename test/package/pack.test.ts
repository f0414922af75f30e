/**
 * The proof of "npm install gets a prebuilt binary": pack the package, install the tarball into an
 * empty project with every compiler and make hidden, and load the addon from prebuilds/.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const root = path.join(__dirname, '..', '..');

describe('npm pack + install with no compiler', () => {
  let tmp: string;
  let tarball: string;

  beforeAll(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-pack-'));
    // Pack a copy of the tracked files (a clean checkout), so prebuildify's rebuild cannot disturb
    // the addon other test files are loading from this tree.
    const checkout = path.join(tmp, 'checkout');
    const tracked = execFileSync('git', ['ls-files', '-z'], { cwd: root, encoding: 'utf8' }).split('\0').filter(Boolean);
    for (const file of tracked) {
      if (!fs.existsSync(path.join(root, file))) continue;
      fs.mkdirSync(path.dirname(path.join(checkout, file)), { recursive: true });
      fs.copyFileSync(path.join(root, file), path.join(checkout, file));
    }
    fs.symlinkSync(path.join(root, 'node_modules'), path.join(checkout, 'node_modules'));
    // prepack compiles the TypeScript and runs prebuildify (--napi --strip) into prebuilds/.
    const out = execFileSync('npm', ['pack', '--json', '--pack-destination', tmp], { cwd: checkout, encoding: 'utf8' });
    const info = JSON.parse(out.slice(out.indexOf('['))) as { filename: string; files: { path: string }[] }[];
    tarball = path.join(tmp, info[0]!.filename);
    packedFiles = info[0]!.files.map((f) => f.path);
  }, 240_000);

  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  let packedFiles: string[] = [];

  it('ships dist/, native/, binding.gyp and the linux-x64 prebuild, and no sources of tests', () => {
    expect(packedFiles).toContain('binding.gyp');
    expect(packedFiles).toContain('dist/index.js');
    expect(packedFiles).toContain('dist/index.mjs');
    expect(packedFiles).toContain('dist/index.d.ts');
    expect(packedFiles.some((f) => f.startsWith('native/') && f.endsWith('.cc'))).toBe(true);
    expect(packedFiles.some((f) => /^prebuilds\/linux-x64\/.+\.node$/.test(f))).toBe(true);
    expect(packedFiles.some((f) => f.startsWith('test/') || f.startsWith('lib/'))).toBe(false);
  });

  it('ships what the README points to (LICENSE, docs/, examples/) and no source maps of unshipped sources', () => {
    expect(packedFiles).toContain('LICENSE');
    expect(packedFiles).toContain('docs/architecture.md');
    expect(packedFiles.some((f) => f.startsWith('examples/'))).toBe(true);
    expect(packedFiles.filter((f) => f.endsWith('.map'))).toEqual([]);
  });

  it('installs into an empty project without a compiler and loads the prebuilt addon (require and import)', () => {
    const app = path.join(tmp, 'app');
    const fakeBin = path.join(tmp, 'no-compiler');
    fs.mkdirSync(app);
    fs.mkdirSync(fakeBin);
    // Anything that tries to compile fails loudly: these shadow the real tools on PATH.
    for (const tool of ['cc', 'gcc', 'g++', 'c++', 'clang', 'clang++', 'make']) {
      fs.writeFileSync(path.join(fakeBin, tool), `#!/bin/sh\necho "${tool} is hidden in this test" >&2\nexit 127\n`, { mode: 0o755 });
    }
    fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true }));
    const env = {
      ...process.env,
      PATH: `${fakeBin}:${process.env.PATH}`,
      CC: path.join(fakeBin, 'cc'),
      CXX: path.join(fakeBin, 'g++'),
      npm_config_build_from_source: '',
    };
    execFileSync('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', tarball], { cwd: app, env, stdio: 'pipe' });

    const installed = path.join(app, 'node_modules', 'vfio-user');
    expect(fs.existsSync(path.join(installed, 'build'))).toBe(false);
    const probe = `
      const ngb = require('node-gyp-build');
      const where = ngb.path(${JSON.stringify(installed)});
      const lib = require('vfio-user');
      const fd = lib.native.binding.eventfd(0, 0);
      require('fs').closeSync(fd);
      console.log(JSON.stringify({ where, exports: Object.keys(lib).length }));
    `;
    const result = JSON.parse(execFileSync(process.execPath, ['-e', probe], { cwd: app, env, encoding: 'utf8' })) as { where: string; exports: number };
    expect(result.where).toMatch(/prebuilds\/linux-x64\/.+\.node$/);
    expect(result.exports).toBeGreaterThan(5);

    const esm = `import { native } from 'vfio-user'; console.log(typeof native.binding.memfdCreate);`;
    const esmOut = execFileSync(process.execPath, ['--input-type=module', '-e', esm], { cwd: app, env, encoding: 'utf8' });
    expect(esmOut.trim()).toBe('function');
  }, 240_000);
});
