// `npm run bench`: pgdso side by side with PostgreSQL's own logical replication, same machine,
// same run, same clusters. Scenario 1: one transaction inserting N rows (default 200k) on the
// source; measured from its commit until the last row is visible on the peer.
// Scenario 2 (bench/sync.ts): the initial load, BENCH_SYNC_ROWS existing rows (1,000,000) by a
// subscription's copy_data and by `pgdso sync`. Options (env): BENCH_ROWS (200000), BENCH_RUNS
// (3), BENCH_SCENARIOS (bulk,sync; escalation too, on demand). Prints Markdown tables.
import { spawn } from 'node:child_process';
import { mkdtemp, mkdir, writeFile, rm, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as delay } from 'node:timers/promises';
import pg from 'pg';
import { withClient } from '../src/sql/client.ts';
import { startLocalCluster, type LocalCluster } from '../src/embedded/cluster.ts';
import { migrateServer } from '../src/sql/migrate.ts';
import { enableForm } from '../src/sql/forms.ts';
import { benchInitialLoad, SYNC_ROWS, TABLE_SQL } from './sync.ts';
import { benchEscalation } from './escalation.ts';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const ROWS = Number(process.env.BENCH_ROWS ?? 200_000);
const RUNS = Number(process.env.BENCH_RUNS ?? 3);

const LOAD_SQL = `INSERT INTO repair_request (id, item, quantity, price, created_at, description)
  SELECT g, CASE WHEN g % 3 = 0 THEN 'chair' ELSE 'desk' END, g % 17, (g % 1000) / 7.0,
         timestamptz '2026-01-01' + g * interval '1 second', md5(g::text)
    FROM generate_series($1::bigint, $2::bigint) g`;

function sql(url: string, text: string, params: unknown[] = []): Promise<pg.QueryResult> {
  return withClient(url, (client) => client.query(text, params));
}

/** Polls the peer until the row with `lastId` is there; returns ms since `since`. */
async function waitVisible(url: string, lastId: number, since: number, timeoutMs = 600_000): Promise<number> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    while (Date.now() - since < timeoutMs) {
      const r = await client.query('SELECT 1 FROM repair_request WHERE id = $1', [lastId]);
      if (r.rowCount) return Date.now() - since;
      await delay(20);
    }
    throw new Error('timed out waiting for the peer');
  } finally {
    await client.end();
  }
}

async function loadOnce(url: string, first: number): Promise<{ committedAt: number; lastId: number }> {
  const lastId = first + ROWS - 1;
  await sql(url, LOAD_SQL, [first, lastId]);
  return { committedAt: Date.now(), lastId };
}

async function native(source: LocalCluster, target: LocalCluster): Promise<number[]> {
  const src = await source.createDatabase('bench_native');
  const dst = await target.createDatabase('bench_native');
  await sql(src, TABLE_SQL);
  await sql(dst, TABLE_SQL);
  await sql(src, 'CREATE PUBLICATION bench FOR TABLE repair_request');
  const conn = `host=${source.host} port=${source.port} dbname=bench_native user=${source.user} password=${source.password}`;
  await sql(dst, `CREATE SUBSCRIPTION bench CONNECTION '${conn.replace(/'/g, "''")}' PUBLICATION bench`);
  const times: number[] = [];
  for (let run = 0; run < RUNS; run++) {
    const { committedAt, lastId } = await loadOnce(src, run * ROWS + 1);
    times.push(await waitVisible(dst, lastId, committedAt));
  }
  await sql(dst, 'ALTER SUBSCRIPTION bench DISABLE');
  await sql(dst, 'ALTER SUBSCRIPTION bench SET (slot_name = NONE)');
  await sql(dst, 'DROP SUBSCRIPTION bench');
  await sql(src, `SELECT pg_drop_replication_slot('bench')`).catch(() => {});
  return times;
}

async function pgdso(source: LocalCluster, target: LocalCluster): Promise<{ times: number[]; settled: number[]; peakRssMb: number }> {
  const src = await source.createDatabase('bench_pgdso');
  const dst = await target.createDatabase('bench_pgdso');
  for (const url of [src, dst]) {
    await sql(url, TABLE_SQL);
    await migrateServer({ connectionString: url });
    await enableForm({ connectionString: url }, 'public', 'repair_request');
  }
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgdso-bench-'));
  await mkdir(path.join(dir, 'rules'));
  await writeFile(
    path.join(dir, 'pgdso.config.json'),
    JSON.stringify({ servers: { source: { connection: src }, peer: { connection: dst } }, rules: ['rules/*.json'] }),
  );
  await writeFile(
    path.join(dir, 'rules', 'bench.json'),
    JSON.stringify({
      mappings: [
        {
          name: 'source-to-peer',
          from: { server: 'source', form: 'repair_request' },
          to: { server: 'peer', form: 'repair_request' },
          transferMode: 'data-only',
        },
      ],
      filters: [
        {
          name: 'every-request',
          on: { server: 'source', form: 'repair_request', ops: ['insert', 'update'] },
          actions: [{ type: 'transfer', mapping: 'source-to-peer' }],
        },
      ],
    }),
  );
  // BENCH_ENGINE_NODE_ARGS, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof", to profile the engine
  const nodeArgs = (process.env.BENCH_ENGINE_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const engine = spawn(
    process.execPath,
    [...nodeArgs, path.join(ROOT, 'bin/pgdso'), 'run', '--server', 'source', '--config', path.join(dir, 'pgdso.config.json')],
    { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, PGDSO_LOG_LEVEL: 'warn' } },
  );
  let stderr = '';
  engine.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<never>((_, reject) => engine.once('exit', (code) => reject(new Error(`the engine exited (${code})`))));
  exited.catch(() => {});
  let peakRssKb = 0;
  const sampler = setInterval(async () => {
    const status = await readFile(`/proc/${engine.pid}/status`, 'utf8').catch(() => '');
    const hwm = /VmHWM:\s+(\d+)/.exec(status);
    if (hwm) peakRssKb = Math.max(peakRssKb, Number(hwm[1]));
  }, 200);
  try {
    const times: number[] = [];
    const settled: number[] = [];
    for (let run = 0; run < RUNS; run++) {
      const { committedAt, lastId } = await loadOnce(src, run * ROWS + 1);
      times.push(await Promise.race([waitVisible(dst, lastId, committedAt), exited]));
      // the source copies' bookkeeping (dso_to_*, status) and the engine reading it back from
      // the WAL: the next run starts on an idle engine
      await Promise.race([waitBookkept(src, run * ROWS + ROWS), exited]);
      await Promise.race([waitSlotIdle(src), exited]);
      settled.push(Date.now() - committedAt);
    }
    return { times, settled, peakRssMb: Math.round(peakRssKb / 1024) };
  } catch (err) {
    throw new Error(`${(err as Error).message}\nengine stderr:\n${stderr}`);
  } finally {
    clearInterval(sampler);
    if (engine.exitCode === null) {
      engine.kill('SIGTERM');
      await exited.catch(() => {});
    }
    await rm(dir, { recursive: true, force: true });
  }
}

async function waitBookkept(url: string, expected: number): Promise<void> {
  const deadline = Date.now() + 600_000;
  while (Date.now() < deadline) {
    const r = await sql(url, `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status = 'success'`);
    if (r.rows[0].n >= expected) return;
    await delay(200);
  }
  throw new Error('bookkeeping did not finish');
}

/** Waits until the source slot has confirmed everything written so far. */
async function waitSlotIdle(url: string): Promise<void> {
  const target = (await sql(url, 'SELECT pg_current_wal_lsn()::text AS lsn')).rows[0].lsn;
  const deadline = Date.now() + 600_000;
  while (Date.now() < deadline) {
    const r = await sql(
      url,
      `SELECT confirmed_flush_lsn >= $1::pg_lsn AS done FROM pg_replication_slots
        WHERE slot_name LIKE 'pgdso_%' AND database = current_database()`,
      [target],
    );
    if (r.rows[0]?.done) return;
    await delay(100);
  }
  throw new Error('the engine did not catch up');
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  process.stderr.write(`bench: ${ROWS} rows in one transaction, ${RUNS} runs each, ${os.cpus().length} cores\n`);
  const source = await startLocalCluster({ name: 'bench-src' });
  const target = await startLocalCluster({ name: 'bench-dst' });
  const scenarios = (process.env.BENCH_SCENARIOS ?? 'bulk,sync').split(',');
  try {
    if (scenarios.includes('bulk')) {
      const nativeTimes = await native(source, target);
      const ours = await pgdso(source, target);
      const rate = (ms: number) => Math.round(ROWS / (ms / 1000)).toLocaleString('en-US');
      console.log(
        `\n| ${ROWS.toLocaleString('en-US')}-row single-transaction insert | commit to visible on the peer (median) | runs (ms) ` +
          '| rows/s (median) | until idle again (median) | engine peak RSS |',
      );
      console.log('|---|---|---|---|---|---|');
      console.log(
        `| PostgreSQL publication/subscription | ${median(nativeTimes)} ms | ${nativeTimes.join(', ')} ` +
          `| ${rate(median(nativeTimes))} | ${median(nativeTimes)} ms | (in the server) |`,
      );
      console.log(
        `| pgdso (data-only mapping, one filter) | ${median(ours.times)} ms | ${ours.times.join(', ')} ` +
          `| ${rate(median(ours.times))} | ${median(ours.settled)} ms (source copies marked) | ${ours.peakRssMb} MB |`,
      );
    }
    if (scenarios.includes('sync')) {
      const f = await benchInitialLoad(source, target);
      const rate = (ms: number) => Math.round(SYNC_ROWS / (ms / 1000)).toLocaleString('en-US');
      console.log(
        `\n| initial load of ${SYNC_ROWS.toLocaleString('en-US')} existing rows | start to last row on the peer | rows/s ` +
          '| until idle again | peak RSS |',
      );
      console.log('|---|---|---|---|---|');
      console.log(
        `| PostgreSQL subscription, copy_data = true | ${f.nativeMs} ms | ${rate(f.nativeMs)} | ${f.nativeMs} ms | (in the server) |`,
      );
      console.log(
        `| pgdso sync (data-only mapping, batches of 5000) | ${f.pgdsoMs} ms | ${rate(f.pgdsoMs)} | ${f.pgdsoIdleMs} ms ` +
          `(source copies marked) | sync ${f.syncPeakRssMb} MB, engine ${f.enginePeakRssMb} MB |`,
      );
      console.log(`\npgdso sync / native copy: ${(f.nativeMs / f.pgdsoMs).toFixed(2)}x (1.0 = as fast as native)`);
    }
    if (scenarios.includes('escalation')) {
      const f = await benchEscalation(source, target);
      console.log(
        `\n| escalation over ${f.rows.toLocaleString('en-US')} rows, ${f.matched.toLocaleString('en-US')} matching, moved with ownership ` +
          '| request to last row on the peer | until idle again | instance peak RSS |',
      );
      console.log('|---|---|---|---|');
      console.log(`| pgdso escalate (run by the owner of escalation) | ${f.peerMs} ms | ${f.idleMs} ms | ${f.enginePeakRssMb} MB |`);
    }
  } finally {
    await source.destroy();
    await target.destroy();
  }
}

await main();
