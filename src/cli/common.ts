// What the commands share: loading config, parsing form names, exit codes.
import path from 'node:path';
import v8 from 'node:v8';
import type { PgdsoConfig } from '../config/types.ts';
import { loadConfig } from '../config/load.ts';
import { createLogger } from '../log.ts';

export const EXIT = { ok: 0, runtime: 1, usage: 2 } as const;

/** Bad usage, config or rules: exit 2. */
export class UsageError extends Error {}

export interface GlobalOptions {
  config: string;
  logLevel: string;
  /** the variables `${env:NAME}` in the config reads (default: the process's; the demo gives its own) */
  env?: NodeJS.ProcessEnv;
}

export async function configFrom(opts: GlobalOptions): Promise<PgdsoConfig> {
  return loadConfig(path.resolve(opts.config), opts.env ?? process.env);
}

export function loggerFrom(opts: GlobalOptions) {
  return createLogger({ level: opts.logLevel });
}

export function serverOf(config: PgdsoConfig, name: string) {
  const server = config.servers[name];
  if (!server) throw new UsageError(`unknown server "${name}" (configured: ${Object.keys(config.servers).join(', ')})`);
  return server;
}

export function parseForm(form: string): { schema: string; table: string } {
  const dot = form.indexOf('.');
  return dot < 0 ? { schema: 'public', table: form } : { schema: form.slice(0, dot), table: form.slice(dot + 1) };
}

export function print(text: string): void {
  process.stdout.write(`${text}\n`);
}

/** The old generation grows by this much past what survived its last full collection (V8's default: up to 4x). */
export const HEAP_GROWING_PERCENT = 20;

/**
 * For the long-running commands (run, sync): V8 lets a heap that collects cheaply grow to about
 * four times what is live before it collects again, so a stream of short-lived rows (a large
 * escalation or sync, a backlog) holds hundreds of MB of garbage. Growing in steps of
 * HEAP_GROWING_PERCENT keeps the heap near what is live; it is not a limit (the heap still grows
 * when more is live). A --heap-growing-percent given to node (NODE_OPTIONS) wins.
 */
export function boundHeapGrowth(): void {
  const given = [...process.execArgv, ...(process.env.NODE_OPTIONS ?? '').split(/\s+/)].some((a) =>
    /^--heap[-_]growing[-_]percent/.test(a),
  );
  if (!given) v8.setFlagsFromString(`--heap-growing-percent=${HEAP_GROWING_PERCENT}`);
}
