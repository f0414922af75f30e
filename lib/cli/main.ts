#!/usr/bin/env node
/**
 * The `vfio-user` command: argument parsing and wiring only. Each subcommand lives in its own
 * module and exports a {@link CliCommand}.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { infoCommand } from './info';
import { serveCommand } from './serve';
import { nvmeCommand } from './nvme';

export interface CliCommand {
  name: string;
  summary: string;
  usage: string;
  options: NonNullable<ParseArgsConfig['options']>;
  run(positionals: string[], values: Record<string, string | boolean | undefined>): Promise<number>;
}

const COMMANDS: CliCommand[] = [serveCommand, infoCommand, nvmeCommand];

function mainHelp(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length));
  return [
    'Usage: vfio-user <command> [options]',
    '',
    'Commands:',
    ...COMMANDS.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    '',
    "Run 'vfio-user <command> --help' for a command's options.",
  ].join('\n');
}

/** Exit code semantics: 0 ok, 1 failure, 2 usage error. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    console.log(mainHelp());
    return name === undefined ? 2 : 0;
  }
  if (name === '--version') {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    console.log((require('../../package.json') as { version: string }).version);
    return 0;
  }
  const command = COMMANDS.find((c) => c.name === name);
  if (command === undefined) {
    console.error(`vfio-user: unknown command '${name}'\n\n${mainHelp()}`);
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
  return command.run(parsed.positionals, parsed.values as Record<string, string | boolean | undefined>);
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
