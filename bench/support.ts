// What the benchmarks share: the form, a source and a peer deployed as a DBA would, a config for
// pgdso with one mapping between them, the pgdso command line, and a child's peak RSS.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, mkdir, writeFile, rm, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type pg from 'pg';
import { withClient } from '../src/sql/client.ts';
import { migrateServer } from '../src/sql/migrate.ts';
import { enableForm } from '../src/sql/forms.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export const TABLE_SQL = `CREATE TABLE repair_request (
  id bigint PRIMARY KEY, item text NOT NULL, quantity int NOT NULL, price numeric(12,2) NOT NULL,
  created_at timestamptz NOT NULL, description text)`;

/** Rows $1 .. $2 of the form (a third of them chairs). */
export const ROWS_SQL = `INSERT INTO repair_request (id, item, quantity, price, created_at, description)
  SELECT g, CASE WHEN g % 3 = 0 THEN 'chair' ELSE 'desk' END, g % 17, (g % 1000) / 7.0,
         timestamptz '2026-01-01' + g * interval '1 second', md5(g::text)
    FROM generate_series($1::bigint, $2::bigint) g`;

export function sql(url: string, text: string, params: unknown[] = []): Promise<pg.QueryResult> {
  return withClient(url, (client) => client.query(text, params));
}

/** The form on a database, with the control schema and the form enabled (slot, publication). */
export async function deployForm(url: string): Promise<void> {
  await sql(url, TABLE_SQL);
  await migrateServer({ connectionString: url });
  await enableForm({ connectionString: url }, 'public', 'repair_request');
}

/** The mapping every benchmark carries rows by: source to peer, the same form. */
export function sourceToPeer(transferMode: 'data-only' | 'data+ownership'): Record<string, unknown> {
  return {
    name: 'source-to-peer',
    from: { server: 'source', form: 'repair_request' },
    to: { server: 'peer', form: 'repair_request' },
    transferMode,
  };
}

export interface BenchConfig {
  configPath: string;
  remove: () => Promise<void>;
}

/** A config of two servers, `source` and `peer`, with `rules` as its one rule file. */
export async function benchConfig(source: string, peer: string, rules: Record<string, unknown>): Promise<BenchConfig> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgdso-bench-'));
  await mkdir(path.join(dir, 'rules'));
  const configPath = path.join(dir, 'pgdso.config.json');
  await writeFile(
    configPath,
    JSON.stringify({ servers: { source: { connection: source }, peer: { connection: peer } }, rules: ['rules/*.json'] }),
  );
  await writeFile(path.join(dir, 'rules', 'bench.json'), JSON.stringify(rules));
  return { configPath, remove: () => rm(dir, { recursive: true, force: true }) };
}

/** Starts `pgdso ARGS --config <configPath>` (BENCH_ENGINE_NODE_ARGS: node options, for a profile). */
export function pgdsoCommand(configPath: string): (args: string[]) => ChildProcess {
  // BENCH_ENGINE_NODE_ARGS, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof", to profile the engine
  const nodeArgs = (process.env.BENCH_ENGINE_NODE_ARGS ?? '').split(' ').filter(Boolean);
  return (args) =>
    spawn(process.execPath, [...nodeArgs, path.join(ROOT, 'bin/pgdso'), ...args, '--config', configPath], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, PGDSO_LOG_LEVEL: 'warn' },
    });
}

/** The peak resident set of a child process (VmHWM), sampled until it exits. */
export function peakRss(child: ChildProcess): { mb: () => number } {
  let kb = 0;
  const timer = setInterval(async () => {
    const status = await readFile(`/proc/${child.pid}/status`, 'utf8').catch(() => '');
    const hwm = /VmHWM:\s+(\d+)/.exec(status);
    if (hwm) kb = Math.max(kb, Number(hwm[1]));
  }, 100);
  child.once('exit', () => clearInterval(timer));
  return { mb: () => Math.round(kb / 1024) };
}

/** Stops a child with SIGTERM and waits for it. */
export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  await exited;
}
