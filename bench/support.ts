// What the benchmarks share: the form, a source and a peer deployed as a DBA would, a config for
// pgdso with its mappings, the pgdso command line and a running engine, a child's peak RSS, and
// the conditions the scenarios poll for (a row visible, the bookkeeping done, the slot idle).
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { mkdtemp, mkdir, writeFile, rm, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { withClient } from '../src/sql/client.ts';
import { migrateServer } from '../src/sql/migrate.ts';
import { enableForm } from '../src/sql/forms.ts';
import { qualified, quoteIdent } from '../src/sql/identifiers.ts';
import { NODE_FLAGS } from '../src/cli/node-flags.ts';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** BENCH_RUNS: runs of the repeated scenarios (bulk, fan-out, filters); their median is reported. */
export const RUNS = Number(process.env.BENCH_RUNS ?? 3);

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
  await enableForms(url, ['repair_request']);
}

/** The control schema and each table (of public, already there) enabled as a form. */
export async function enableForms(url: string, tables: readonly string[]): Promise<void> {
  await migrateServer({ connectionString: url });
  for (const table of tables) await enableForm({ connectionString: url }, 'public', table);
}

/**
 * A PostgreSQL client program (pg_recvlogical, pgbench): the binary itself from the newest
 * /usr/lib/postgresql/N/bin that has it, not Debian's /usr/bin wrapper (a Perl script that
 * costs about 80 ms a start, inside the decode limit's measure); `env` overrides it.
 */
export function clientProgram(name: string, env: string | undefined): string {
  if (env) return env;
  const versions = existsSync('/usr/lib/postgresql')
    ? readdirSync('/usr/lib/postgresql')
        .filter((v) => /^\d+$/.test(v) && existsSync(`/usr/lib/postgresql/${v}/bin/${name}`))
        .sort((a, b) => Number(b) - Number(a))
    : [];
  return versions.length ? `/usr/lib/postgresql/${versions[0]}/bin/${name}` : `/usr/bin/${name}`;
}

/** A libpq conninfo for the client programs (pg_recvlogical, pgbench); the password goes in PGPASSWORD. */
export function conninfo(cluster: LocalCluster, database: string): { conninfo: string; env: NodeJS.ProcessEnv } {
  return {
    conninfo: `host=${cluster.host} port=${cluster.port} dbname=${database} user=${cluster.user}`,
    env: { ...process.env, PGPASSWORD: cluster.password },
  };
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
export function benchConfig(source: string, peer: string, rules: Record<string, unknown>): Promise<BenchConfig> {
  return serversConfig({ source, peer }, rules);
}

/** A config of the servers named (name: connection URL), with `rules` as its one rule file. */
export async function serversConfig(servers: Record<string, string>, rules: Record<string, unknown>): Promise<BenchConfig> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgdso-bench-'));
  await mkdir(path.join(dir, 'rules'));
  const configPath = path.join(dir, 'pgdso.config.json');
  const connections = Object.fromEntries(Object.entries(servers).map(([name, url]) => [name, { connection: url }]));
  await writeFile(configPath, JSON.stringify({ servers: connections, rules: ['rules/*.json'] }));
  await writeFile(path.join(dir, 'rules', 'bench.json'), JSON.stringify(rules));
  return { configPath, remove: () => rm(dir, { recursive: true, force: true }) };
}

/** Starts `pgdso ARGS --config <configPath>` (BENCH_ENGINE_NODE_ARGS: node options, for a profile). */
export function pgdsoCommand(configPath: string): (args: string[]) => ChildProcess {
  // BENCH_ENGINE_NODE_ARGS, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof", to profile the engine
  // (BENCH_ENGINE_STDOUT=1 shows its stdout, for --trace-gc); BENCH_BUILT=1 runs the output of
  // `npm run build` instead of bin/pgdso (tsx), to compare the two
  const nodeArgs = (process.env.BENCH_ENGINE_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const main = process.env.BENCH_BUILT ? path.join(ROOT, 'build/src/cli/main.js') : path.join(ROOT, 'bin/pgdso');
  return (args) =>
    spawn(process.execPath, [...NODE_FLAGS, ...nodeArgs, main, ...args, '--config', configPath], {
      stdio: ['ignore', process.env.BENCH_ENGINE_STDOUT ? 'inherit' : 'ignore', 'pipe'],
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

/** `pgdso run --server source` on a config, its peak RSS and stderr; `race` fails a wait when the engine exits. */
export interface Engine {
  child: ChildProcess;
  rssMb: () => number;
  race: <T>(wait: Promise<T>) => Promise<T>;
  /** stops the engine; an error of `race` carries its stderr */
  stop: () => Promise<void>;
  stderr: () => string;
}

export function startEngine(configPath: string, server = 'source'): Engine {
  const child = pgdsoCommand(configPath)(['run', '--server', server]);
  const rss = peakRss(child);
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<never>((_, reject) =>
    child.once('exit', (code, signal) => reject(new Error(`the engine exited (${code ?? signal})\nengine stderr:\n${stderr}`))),
  );
  exited.catch(() => {});
  return {
    child,
    rssMb: rss.mb,
    race: (wait) => Promise.race([wait, exited]),
    stop: () => stopChild(child),
    stderr: () => stderr,
  };
}

/** Polls `check` every `intervalMs` until it holds; fails naming `what` after `timeoutMs`. */
export async function until(what: string, check: () => Promise<boolean>, timeoutMs = 1_800_000, intervalMs = 100): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await delay(intervalMs);
  }
}

/** Polls the peer until the row `key = id` of `table` is there; returns ms since `since`. */
export async function waitVisible(url: string, id: number, since: number, table = 'repair_request', key = 'id'): Promise<number> {
  const client = await connect(url);
  try {
    const text = `SELECT 1 FROM ${qualified('public', table)} WHERE ${quoteIdent(key)} = $1`;
    await until(`row ${id} of ${table} on the peer`, async () => (await client.query(text, [id])).rowCount === 1, 1_800_000, 20);
    return Date.now() - since;
  } finally {
    await client.end();
  }
}

/**
 * Polls the peer until the row `lastId` of repair_request is there and then until it holds
 * `count` rows (the rows before it, should any arrive after it); returns ms since `since`.
 */
export async function waitDrained(url: string, lastId: number, count: number, since: number): Promise<number> {
  const ms = await waitVisible(url, lastId, since);
  const counted = async () => (await sql(url, 'SELECT count(*)::int AS n FROM repair_request')).rows[0].n >= count;
  if (await counted()) return ms;
  await until(`${count} rows on the peer`, counted);
  return Date.now() - since;
}

/** Waits until `expected` source copies of `table` carry their transfer's bookkeeping. */
export async function waitBookkept(url: string, expected: number, table = 'repair_request'): Promise<void> {
  const text = `SELECT count(*)::int AS n FROM ${qualified('public', table)} WHERE dso_transfer_status = 'success'`;
  await until(`the bookkeeping of ${table}`, async () => (await sql(url, text)).rows[0].n >= expected, 1_800_000, 200);
}

/** Waits until the source's pgdso slot has confirmed everything written so far. */
export async function waitSlotIdle(url: string): Promise<void> {
  const lsn = (await sql(url, 'SELECT pg_current_wal_lsn()::text AS lsn')).rows[0].lsn;
  const text = `SELECT confirmed_flush_lsn >= $1::pg_lsn AS done FROM pg_replication_slots
                 WHERE slot_name LIKE 'pgdso_%' AND database = current_database()`;
  await until('the engine to confirm the WAL', async () => (await sql(url, text, [lsn])).rows[0]?.done === true);
}

async function connect(url: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => {});
  await client.connect();
  return client;
}

export const median = (xs: readonly number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** 1234567 as "1,234,567". */
export const fmt = (n: number): string => Math.round(n).toLocaleString('en-US');

/** Rows per second for `rows` in `ms`. */
export const rate = (rows: number, ms: number): string => fmt(rows / (ms / 1000));
