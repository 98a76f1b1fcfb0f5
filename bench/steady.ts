// Workload (b), steady: pgbench's simple-update transactions (-N) at BENCH_STEADY_RATE a second
// (default 1000) for BENCH_STEADY_SECONDS (20) on pgbench's own tables (scale BENCH_STEADY_SCALE,
// default 10) carried to the peer, and the commit-to-visible latency of probes.
//
// The tables: `pgbench -i -I dtp` on both sides (tables and primary keys, no rows); a form needs
// a one-column primary key, so pgbench_history gets `hid bigserial PRIMARY KEY` on both sides
// (for native and pgdso alike). Their rows (pgbench's own server-side generation, -I G, as SQL)
// are inserted on the source once the replicator runs, so each system carries them as it carries
// any change (the peer starts empty; pgbench's G step would TRUNCATE first). Then VACUUM
// ANALYZE on both sides, as pgbench -i does.
//
// The probes: `probe(id bigserial primary key, created_at timestamptz default clock_timestamp())`
// on the source; the peer's probe table has `arrived_at timestamptz default clock_timestamp()`
// too, which neither replicator sends, so the peer's insert fills it. They are inserted by the
// same pgbench run, as a second script of weight 1 beside simple-update's 20 (`-b
// simple-update@20 -f probe.sql@1`): one pgbench process, one rate schedule, about 1 probe in
// 21 transactions, i.e. ~50/s while simple-update runs at the rate asked (-R is raised by 1/20
// for them). Latency = arrived_at - created_at on the peer (one clock: both clusters are on this
// machine). arrived_at is the time of the peer's insert, not of its commit: an applier that
// commits several source transactions at once (pgdso's batches) shows slightly less than its
// real latency.
//
// After the run: one more probe, waited for on the peer (catch-up), then pgbench_accounts is
// compared on both sides (count and sum(hashtext(aid:abalance))) until equal or a minute has
// passed, and whether they are identical is printed.
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { quoteIdent } from '../src/sql/identifiers.ts';
import { subscribe, unsubscribe } from './native.ts';
import {
  clientProgram,
  conninfo,
  enableForms,
  serversConfig,
  sql,
  startEngine,
  until,
  waitBookkept,
  waitSlotIdle,
  waitVisible,
} from './support.ts';

export const STEADY_SECONDS = Number(process.env.BENCH_STEADY_SECONDS ?? 20);
export const STEADY_RATE = Number(process.env.BENCH_STEADY_RATE ?? 1000);
export const STEADY_SCALE = Number(process.env.BENCH_STEADY_SCALE ?? 10);
const PGBENCH = clientProgram('pgbench', process.env.BENCH_PGBENCH);
const CLIENTS = 8;
/** simple-update's weight against the probe script's 1 */
const PROBE_EVERY = 20;

const TABLES = ['pgbench_branches', 'pgbench_tellers', 'pgbench_accounts', 'pgbench_history', 'probe'];

const PROBE_SQL = 'CREATE TABLE probe (id bigserial PRIMARY KEY, created_at timestamptz DEFAULT clock_timestamp())';
const PEER_PROBE_SQL = `CREATE TABLE probe (id bigserial PRIMARY KEY, created_at timestamptz DEFAULT clock_timestamp(),
                                     arrived_at timestamptz DEFAULT clock_timestamp())`;
const CHECKSUM_SQL = `SELECT count(*)::int AS n, coalesce(sum(hashtext(aid::text || ':' || abalance)), 0)::text AS sum
                        FROM pgbench_accounts`;
const LATENCY_SQL = `SELECT count(ms)::int AS n, percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                            percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99, max(ms) AS max
                       FROM (SELECT extract(epoch FROM arrived_at - created_at)::float8 * 1000 AS ms FROM probe WHERE id <= $1) p`;

export interface SteadyRun {
  /** simple-update transactions a second that pgbench achieved */
  tps: number;
  /** probes inserted during the run, and of them, those on the peer with their arrival */
  probesSent: number;
  probes: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** from pgbench's exit until a probe inserted then is on the peer */
  catchUpMs: number;
  accountsIdentical: boolean;
  /** pgdso only */
  peakRssMb?: number;
  pendingErrors?: number;
}

export interface SteadyFigures {
  seconds: number;
  rate: number;
  scale: number;
  native: SteadyRun;
  pgdso: SteadyRun;
}

function pgbench(cluster: LocalCluster, database: string, args: string[]): Promise<string> {
  const { env } = conninfo(cluster, database);
  const child = spawn(PGBENCH, [...args, '-h', cluster.host, '-p', String(cluster.port), '-U', cluster.user, database], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (out += d));
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`pgbench ${args.join(' ')} exited ${code}:\n${out}`))));
  });
}

/** pgbench's tables with primary keys (pgbench_history's added) and the probe table, no rows. */
async function createTables(cluster: LocalCluster, database: string, peer: boolean): Promise<string> {
  const url = await cluster.createDatabase(database);
  await pgbench(cluster, database, ['-i', '-I', 'dtp', '-s', String(STEADY_SCALE)]);
  await sql(url, 'ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY');
  await sql(url, peer ? PEER_PROBE_SQL : PROBE_SQL);
  return url;
}

/** pgbench -i's rows (its server-side generation), one transaction per branch's 100,000 accounts. */
async function fillSource(url: string): Promise<void> {
  await sql(url, 'INSERT INTO pgbench_branches (bid, bbalance) SELECT bid, 0 FROM generate_series(1, $1::int) bid', [STEADY_SCALE]);
  await sql(
    url,
    'INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT tid, (tid - 1) / 10 + 1, 0 FROM generate_series(1, $1::int) tid',
    [STEADY_SCALE * 10],
  );
  for (let branch = 1; branch <= STEADY_SCALE; branch++) {
    await sql(
      url,
      `INSERT INTO pgbench_accounts (aid, bid, abalance, filler)
         SELECT aid, (aid - 1) / 100000 + 1, 0, '' FROM generate_series($1::int, $2::int) aid`,
      [(branch - 1) * 100_000 + 1, branch * 100_000],
    );
  }
}

/** The peer holds every row fillSource wrote. */
async function waitFilled(peer: string): Promise<void> {
  await waitVisible(peer, STEADY_SCALE * 100_000, Date.now(), 'pgbench_accounts', 'aid');
  for (const [table, rows] of [
    ['pgbench_branches', STEADY_SCALE],
    ['pgbench_tellers', STEADY_SCALE * 10],
    ['pgbench_accounts', STEADY_SCALE * 100_000],
  ] as const) {
    await until(
      `${rows} rows of ${table} on the peer`,
      async () => (await sql(peer, `SELECT count(*)::int AS n FROM ${quoteIdent(table)}`)).rows[0].n >= rows,
    );
  }
}

/** The pgbench run with its probes, the catch-up, the comparison and the latencies. */
async function measure(cluster: LocalCluster, database: string, peer: string): Promise<SteadyRun> {
  const source = cluster.url(database);
  for (const url of [source, peer]) for (const table of TABLES) await sql(url, `VACUUM ANALYZE ${quoteIdent(table)}`);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgdso-bench-steady-'));
  try {
    const probeScript = path.join(dir, 'probe.sql');
    await writeFile(probeScript, 'INSERT INTO probe DEFAULT VALUES;\n');
    const rate = Math.round((STEADY_RATE * (PROBE_EVERY + 1)) / PROBE_EVERY);
    const args = ['-n', '-c', String(CLIENTS), '-j', '2', '-T', String(STEADY_SECONDS), '-R', String(rate)];
    const out = await pgbench(cluster, database, [...args, '-b', `simple-update@${PROBE_EVERY}`, '-f', `${probeScript}@1`]);
    const ended = Date.now();
    const tps = Number(/<builtin: simple update>[\s\S]*?tps = ([\d.]+)/.exec(out)?.[1] ?? Number.NaN);
    const sent = (await sql(source, 'SELECT coalesce(max(id), 0) AS last, count(*)::int AS n FROM probe')).rows[0];
    const last = Number(sent.last);
    const marker = Number((await sql(source, 'INSERT INTO probe DEFAULT VALUES RETURNING id')).rows[0].id);
    const catchUpMs = await waitVisible(peer, marker, ended, 'probe', 'id');
    const expected = (await sql(source, CHECKSUM_SQL)).rows[0];
    let accountsIdentical = false;
    await until(
      'pgbench_accounts identical on the peer',
      async () => {
        const got = (await sql(peer, CHECKSUM_SQL)).rows[0];
        return (accountsIdentical = got.n === expected.n && got.sum === expected.sum);
      },
      60_000,
      500,
    ).catch(() => {});
    const lat = (await sql(peer, LATENCY_SQL, [last])).rows[0];
    return {
      tps,
      probesSent: sent.n,
      probes: lat.n,
      p50Ms: lat.p50 ?? Number.NaN,
      p99Ms: lat.p99 ?? Number.NaN,
      maxMs: lat.max ?? Number.NaN,
      catchUpMs,
      accountsIdentical,
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function native(source: LocalCluster, target: LocalCluster): Promise<SteadyRun> {
  const src = await createTables(source, 'bench_steady_native', false);
  const dst = await createTables(target, 'bench_steady_native', true);
  await sql(src, `CREATE PUBLICATION bench FOR TABLE ${TABLES.join(', ')}`);
  const sub = await subscribe(source, 'bench_steady_native', dst, 'bench_steady', 'bench');
  try {
    await fillSource(src);
    await waitFilled(dst);
    return await measure(source, 'bench_steady_native', dst);
  } finally {
    await unsubscribe(sub);
  }
}

async function pgdso(source: LocalCluster, target: LocalCluster): Promise<SteadyRun> {
  const src = await createTables(source, 'bench_steady_pgdso', false);
  const dst = await createTables(target, 'bench_steady_pgdso', true);
  for (const url of [src, dst]) await enableForms(url, TABLES);
  // a data-only mapping and a filter per table
  const mappings = TABLES.map((table) => ({
    name: `source-to-peer-${table}`,
    from: { server: 'source', form: table },
    to: { server: 'peer', form: table },
    transferMode: 'data-only',
  }));
  const filters = TABLES.map((table) => ({
    name: `carry-${table}`,
    on: { server: 'source', form: table, ops: ['insert', 'update'] },
    actions: [{ type: 'transfer', mapping: `source-to-peer-${table}` }],
  }));
  const { configPath, remove } = await serversConfig({ source: src, peer: dst }, { mappings, filters });
  const engine = startEngine(configPath);
  try {
    await fillSource(src);
    await engine.race(waitFilled(dst));
    await engine.race(waitBookkept(src, STEADY_SCALE * 100_000, 'pgbench_accounts'));
    await engine.race(waitSlotIdle(src));
    const run = await engine.race(measure(source, 'bench_steady_pgdso', dst));
    const pendingErrors = Number((await sql(src, 'SELECT count(*) AS n FROM pgdso.pending_errors')).rows[0].n);
    return { ...run, peakRssMb: engine.rssMb(), pendingErrors };
  } finally {
    await engine.stop();
    await remove();
  }
}

export async function benchSteady(source: LocalCluster, target: LocalCluster): Promise<SteadyFigures> {
  const nativeRun = await native(source, target);
  const pgdsoRun = await pgdso(source, target);
  return { seconds: STEADY_SECONDS, rate: STEADY_RATE, scale: STEADY_SCALE, native: nativeRun, pgdso: pgdsoRun };
}

export function steadyTable(f: SteadyFigures): string {
  const ms = (x: number) => `${Math.round(x * 10) / 10} ms`;
  const probes = (r: SteadyRun) => (r.probes === r.probesSent ? `${r.probes}` : `${r.probes} of ${r.probesSent}`);
  const row = (name: string, r: SteadyRun, rss: string) =>
    `| ${name} | ${Math.round(r.tps)} | ${probes(r)} | ${ms(r.p50Ms)} | ${ms(r.p99Ms)} | ${ms(r.maxMs)} | ${r.catchUpMs} ms ` +
    `| ${r.accountsIdentical ? 'yes' : 'NO'} | ${rss} |`;
  return [
    `| pgbench -N at ${f.rate}/s for ${f.seconds} s (scale ${f.scale}), probes in the run | simple-update tps | probes ` +
      '| commit to visible p50 | p99 | max | catch-up after the run | pgbench_accounts identical | engine peak RSS |',
    '|---|---|---|---|---|---|---|---|---|',
    row('PostgreSQL publication/subscription', f.native, '(in the server)'),
    row(
      'pgdso (a data-only mapping and a filter per table)',
      f.pgdso,
      `${f.pgdso.peakRssMb} MB${f.pgdso.pendingErrors ? `, ${f.pgdso.pendingErrors} pending errors` : ''}`,
    ),
  ].join('\n');
}
