// The initial load in `npm run bench`: N existing rows (default 1,000,000, BENCH_SYNC_ROWS)
// carried to an empty peer, by PostgreSQL's own initial table copy (a subscription with
// copy_data = true) and by `pgdso sync` with a running engine, on the same clusters in the same
// run. Measured from the start of each until the last row is on the peer; for pgdso also until
// the engine is idle again (the source copies' bookkeeping done), and the peak RSS of the sync
// command and of the engine.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, mkdir, writeFile, rm, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as delay } from 'node:timers/promises';
import { withClient } from '../src/sql/client.ts';
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { migrateServer } from '../src/sql/migrate.ts';
import { enableForm } from '../src/sql/forms.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const SYNC_ROWS = Number(process.env.BENCH_SYNC_ROWS ?? 1_000_000);

export const TABLE_SQL = `CREATE TABLE repair_request (
  id bigint PRIMARY KEY, item text NOT NULL, quantity int NOT NULL, price numeric(12,2) NOT NULL,
  created_at timestamptz NOT NULL, description text)`;
export const FILL_SQL = `INSERT INTO repair_request (id, item, quantity, price, created_at, description)
  SELECT g, CASE WHEN g % 3 = 0 THEN 'chair' ELSE 'desk' END, g % 17, (g % 1000) / 7.0,
         timestamptz '2026-01-01' + g * interval '1 second', md5(g::text)
    FROM generate_series(1, $1::bigint) g`;

export const sql = (url: string, text: string, params: unknown[] = []) => withClient(url, (client) => client.query(text, params));

async function untilCount(url: string, rows: number, since: number, timeoutMs = 1_800_000): Promise<number> {
  while (Date.now() - since < timeoutMs) {
    const r = await sql(url, 'SELECT count(*)::int AS n FROM repair_request');
    if (r.rows[0].n >= rows) return Date.now() - since;
    await delay(100);
  }
  throw new Error('timed out waiting for the peer');
}

export interface SyncFigures {
  nativeMs: number;
  pgdsoMs: number;
  pgdsoIdleMs: number;
  syncPeakRssMb: number;
  enginePeakRssMb: number;
}

export async function benchInitialLoad(source: LocalCluster, target: LocalCluster): Promise<SyncFigures> {
  // native: CREATE SUBSCRIPTION ... copy_data = true (the default)
  const nsrc = await source.createDatabase('bench_copy_native');
  const ndst = await target.createDatabase('bench_copy_native');
  await sql(nsrc, TABLE_SQL);
  await sql(nsrc, FILL_SQL, [SYNC_ROWS]);
  await sql(ndst, TABLE_SQL);
  await sql(nsrc, 'CREATE PUBLICATION bench FOR TABLE repair_request');
  const conn = `host=${source.host} port=${source.port} dbname=bench_copy_native user=${source.user} password=${source.password}`;
  const nativeStart = Date.now();
  await sql(ndst, `CREATE SUBSCRIPTION bench_copy CONNECTION '${conn.replace(/'/g, "''")}' PUBLICATION bench WITH (copy_data = true)`);
  const nativeMs = await untilCount(ndst, SYNC_ROWS, nativeStart);
  await sql(ndst, 'ALTER SUBSCRIPTION bench_copy DISABLE');
  await sql(ndst, 'ALTER SUBSCRIPTION bench_copy SET (slot_name = NONE)');
  await sql(ndst, 'DROP SUBSCRIPTION bench_copy');
  await sql(nsrc, `SELECT pg_drop_replication_slot('bench_copy')`).catch(() => {});

  // pgdso: the rows exist before any rule; `pgdso sync` with the engine running
  const src = await source.createDatabase('bench_copy_pgdso');
  const dst = await target.createDatabase('bench_copy_pgdso');
  for (const url of [src, dst]) {
    await sql(url, TABLE_SQL);
    await migrateServer({ connectionString: url });
    await enableForm({ connectionString: url }, 'public', 'repair_request');
  }
  await sql(src, FILL_SQL, [SYNC_ROWS]);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgdso-bench-sync-'));
  await mkdir(path.join(dir, 'rules'));
  const configPath = path.join(dir, 'pgdso.config.json');
  await writeFile(
    configPath,
    JSON.stringify({ servers: { source: { connection: src }, peer: { connection: dst } }, rules: ['rules/*.json'] }),
  );
  const mapping = {
    name: 'source-to-peer',
    from: { server: 'source', form: 'repair_request' },
    to: { server: 'peer', form: 'repair_request' },
    transferMode: 'data-only',
  };
  await writeFile(path.join(dir, 'rules', 'bench.json'), JSON.stringify({ mappings: [mapping] }));
  const pgdso = pgdsoCommand(configPath);
  const engine = pgdso(['run', '--server', 'source']);
  const engineRss = peakRss(engine);
  try {
    await delay(3000); // the engine's start (its group and stream), outside the measure
    const started = Date.now();
    const sync = pgdso(['sync', '--mapping', 'source-to-peer', '--no-wait', '--batch', '5000']);
    const syncRss = peakRss(sync);
    let syncErr = '';
    sync.stderr!.on('data', (d) => (syncErr += d));
    const syncExit = new Promise<number | null>((resolve) => sync.once('exit', resolve));
    const pgdsoMs = await untilCount(dst, SYNC_ROWS, started);
    const code = await syncExit;
    if (code !== 0) throw new Error(`pgdso sync exited ${code}: ${syncErr}`);
    await untilBookkept(src, SYNC_ROWS);
    const pgdsoIdleMs = Date.now() - started;
    return { nativeMs, pgdsoMs, pgdsoIdleMs, syncPeakRssMb: syncRss.mb(), enginePeakRssMb: engineRss.mb() };
  } finally {
    engine.kill('SIGTERM');
    await new Promise((resolve) => (engine.exitCode === null ? engine.once('exit', resolve) : resolve(null)));
    await rm(dir, { recursive: true, force: true });
  }
}

async function untilBookkept(url: string, rows: number): Promise<void> {
  for (;;) {
    const r = await sql(url, `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status = 'success'`);
    if (r.rows[0].n >= rows) return;
    await delay(200);
  }
}

/** Starts `pgdso ARGS --config <configPath>` (BENCH_ENGINE_NODE_ARGS: node options, for a profile). */
export function pgdsoCommand(configPath: string): (args: string[]) => ChildProcess {
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
