#!/usr/bin/env node
/**
 * The `vfio-user` command: argument parsing and wiring only. Each subcommand lives in its own
 * module and exports a {@link CliCommand}.
 */
import { parseArgs } from 'node:util';
import type { CliCommand, OptionValues } from './command';
import { infoCommand } from './info';
import { serveCommand } from './serve';
import { nvmeCommand } from './nvme';

const COMMANDS: CliCommand[] = [serveCommand, infoCommand, nvmeCommand];

function mainHelp(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length));
  return [
    'Usage: vfio-user <command> [options]',
    '',
    'Commands:',
    ...COMMANDS.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    '',
    'Options:',
    '  -h, --help     show this help',
    '  --version      print the version',
    '',
    "Run 'vfio-user <command> --help' for a command's options.",
    'Exit codes: 0 ok, 1 failure, 2 usage error (the reason and the usage go to standard error).',
  ].join('\n');
}

/** Exit code semantics: 0 ok, 1 failure, 2 usage error. Help asked for goes to stdout; usage errors to stderr. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined) {
    console.error(`vfio-user: a command is required\n\n${mainHelp()}`);
    return 2;
  }
  if (name === '--help' || name === '-h' || name === 'help') {
    console.log(mainHelp());
    return 0;
  }
  if (name === '--version' || name === '-V') {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    console.log((require('../../package.json') as { version: string }).version);
    return 0;
  }
  const command = COMMANDS.find((c) => c.name === name);
  if (command === undefined) {
    console.error(`vfio-user: unknown ${name.startsWith('-') ? 'option' : 'command'} '${name}'\n\n${mainHelp()}`);
    return 2;
  }
  let parsed;
  try {
    parsed = parseArgs({ args: rest, options: { ...command.options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true });
  } catch (err) {
    console.error(`vfio-user ${name}: ${(err as Error).message}\n\n${command.usage}`);
    return 2;
  }
  if (parsed.values.help) {
    console.log(command.usage);
    return 0;
  }
  return command.run(parsed.positionals, parsed.values as OptionValues);
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      console.error(`vfio-user: ${(err as Error).message ?? String(err)}`);
      process.exitCode = 1;
    },
  );
}
