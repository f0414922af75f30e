/**
 * What every `vfio-user` subcommand exports; `main.ts` parses the arguments and calls `run`.
 * Its own module so that main and the subcommands do not import each other.
 */
import type { ParseArgsConfig } from 'node:util';

/** Option values as `parseArgs` returns them: a string, a boolean flag, or absent. */
export type OptionValues = Record<string, string | boolean | undefined>;

export interface CliCommand {
  name: string;
  /** One line for the program's help. */
  summary: string;
  /** The full `--help` text (it goes after a usage error's reason too). */
  usage: string;
  options: NonNullable<ParseArgsConfig['options']>;
  /** Exit code: 0 ok, 1 failure, 2 usage error. */
  run(positionals: string[], values: OptionValues): Promise<number>;
}
