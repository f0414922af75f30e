// docs/cli.md quotes every command's --help; it must not drift from the CLI.
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const root = path.join(__dirname, '..', '..');
const cli = path.join(root, 'dist', 'cli', 'main.js');

describe('docs/cli.md', () => {
  it('quotes the current --help text of every command', () => {
    const doc = fs.readFileSync(path.join(root, 'docs', 'cli.md'), 'utf8');
    for (const command of [[], ['serve'], ['info'], ['nvme']]) {
      const help = spawnSync(process.execPath, [cli, ...command, '--help'], { encoding: 'utf8' });
      expect(help.status).toBe(0);
      expect(doc, `vfio-user ${command.join(' ')} --help`).toContain(help.stdout.trimEnd());
    }
  });
});
