/**
 * npm's install hook (scripts/install.js) on a machine that cannot build the addon: no prebuild
 * matches and the build tools are missing. The failure must say what a source build needs.
 */
import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const root = path.join(__dirname, '..', '..');

describe('scripts/install.js', () => {
  it('is the install script, and ships', () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string>; files: string[] };
    expect(pkg.scripts.install).toBe('node scripts/install.js');
    expect(pkg.files).toContain('scripts/install.js');
  });

  it('when the source build fails: says what a source build needs and what is missing', () => {
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-user-install-'));
    try {
      // The package as npm unpacks it, without prebuilds/ and without build/.
      const pkg = path.join(tmp, 'pkg');
      fs.mkdirSync(path.join(pkg, 'scripts'), { recursive: true });
      for (const file of ['package.json', 'binding.gyp', 'scripts/install.js']) fs.copyFileSync(path.join(root, file), path.join(pkg, file));
      fs.cpSync(path.join(root, 'native'), path.join(pkg, 'native'), { recursive: true });
      fs.symlinkSync(path.join(root, 'node_modules'), path.join(pkg, 'node_modules'));
      // A PATH with node and nothing else: no python3, make or compiler.
      const bin = path.join(tmp, 'bin');
      fs.mkdirSync(bin);
      fs.symlinkSync(process.execPath, path.join(bin, 'node'));
      const env: NodeJS.ProcessEnv = { HOME: tmp, PATH: bin };
      const r = spawnSync(process.execPath, ['scripts/install.js'], { cwd: pkg, env, encoding: 'utf8', timeout: 60_000 });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain('vfio-user: the native addon could not be built from source.');
      expect(r.stderr).toContain('A source build needs Linux, Node.js >= 20, Python 3, make and a C++ compiler (g++ or clang++).');
      expect(r.stderr).toContain('Missing here: python3, make, a C++ compiler (g++ or clang++).');
      expect(r.stderr).toContain(`"Set up" in ${path.join(pkg, 'README.md')}`);
      expect(fs.existsSync(path.join(pkg, 'build', 'Release', 'vfio_user.node'))).toBe(false);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});
