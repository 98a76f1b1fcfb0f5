// `npm run bench`: pgdso side by side with PostgreSQL's own logical replication, same machine,
// same run, same clusters. Scenario 1: one transaction inserting N rows (default 200k) on the
// source; measured from its commit until the last row is visible on the peer.
// Scenario 2 (bench/sync.ts): the initial load, BENCH_SYNC_ROWS existing rows (1,000,000) by a
// subscription's copy_data and by `pgdso sync`. Options (env): BENCH_ROWS (200000), BENCH_RUNS
// (3), BENCH_SCENARIOS (bulk,sync; escalation too, on demand). Prints Markdown tables.
import os from 'node:os';
import { setTimeout as delay } from 'node:timers/promises';
import pg from 'pg';
import { startLocalCluster, type LocalCluster } from '../src/embedded/cluster.ts';
import { benchConfig, deployForm, peakRss, pgdsoCommand, ROWS_SQL, sourceToPeer, sql, stopChild, TABLE_SQL } from './support.ts';
import { benchInitialLoad, SYNC_ROWS } from './sync.ts';
import { benchEscalation } from './escalation.ts';

const ROWS = Number(process.env.BENCH_ROWS ?? 200_000);
const RUNS = Number(process.env.BENCH_RUNS ?? 3);

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
  await sql(url, ROWS_SQL, [first, lastId]);
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
  for (const url of [src, dst]) await deployForm(url);
  const { configPath, remove } = await benchConfig(src, dst, {
    mappings: [sourceToPeer('data-only')],
    filters: [
      {
        name: 'every-request',
        on: { server: 'source', form: 'repair_request', ops: ['insert', 'update'] },
        actions: [{ type: 'transfer', mapping: 'source-to-peer' }],
      },
    ],
  });
  const engine = pgdsoCommand(configPath)(['run', '--server', 'source']);
  const rss = peakRss(engine);
  let stderr = '';
  engine.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<never>((_, reject) => engine.once('exit', (code) => reject(new Error(`the engine exited (${code})`))));
  exited.catch(() => {});
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
    return { times, settled, peakRssMb: rss.mb() };
  } catch (err) {
    throw new Error(`${(err as Error).message}\nengine stderr:\n${stderr}`);
  } finally {
    await stopChild(engine);
    await remove();
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
