// The initial load in `npm run bench`: N existing rows (default 1,000,000, BENCH_SYNC_ROWS)
// carried to an empty peer, by PostgreSQL's own initial table copy (a subscription with
// copy_data = true) and by `pgdso sync` with a running engine, on the same clusters in the same
// run. Measured from the start of each until the last row is on the peer; for pgdso also until
// the engine is idle again (the source copies' bookkeeping done), and the peak RSS of the sync
// command and of the engine.
import { setTimeout as delay } from 'node:timers/promises';
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { subscribe, unsubscribe } from './native.ts';
import {
  benchConfig,
  deployForm,
  fmt,
  peakRss,
  pgdsoCommand,
  rate,
  ROWS_SQL,
  sourceToPeer,
  sql,
  stopChild,
  TABLE_SQL,
  until,
} from './support.ts';

export const SYNC_ROWS = Number(process.env.BENCH_SYNC_ROWS ?? 1_000_000);

async function untilCount(url: string, rows: number, since: number, timeoutMs = 1_800_000): Promise<number> {
  while (Date.now() - since < timeoutMs) {
    const r = await sql(url, 'SELECT count(*)::int AS n FROM repair_request');
    if (r.rows[0].n >= rows) return Date.now() - since;
    await delay(100);
  }
  throw new Error('timed out waiting for the peer');
}

export interface SyncFigures {
  rows: number;
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
  await sql(nsrc, ROWS_SQL, [1, SYNC_ROWS]);
  await sql(ndst, TABLE_SQL);
  await sql(nsrc, 'CREATE PUBLICATION bench FOR TABLE repair_request');
  const nativeStart = Date.now();
  // measured until the rows are there; subscribe() returns later, once the table is ready (state r)
  const [nativeMs, sub] = await Promise.all([
    untilCount(ndst, SYNC_ROWS, nativeStart),
    subscribe(source, 'bench_copy_native', ndst, 'bench_copy', 'bench', true),
  ]);
  await unsubscribe(sub);

  // pgdso: the rows exist before any rule; `pgdso sync` with the engine running
  const src = await source.createDatabase('bench_copy_pgdso');
  const dst = await target.createDatabase('bench_copy_pgdso');
  for (const url of [src, dst]) await deployForm(url);
  await sql(src, ROWS_SQL, [1, SYNC_ROWS]);
  const { configPath, remove } = await benchConfig(src, dst, { mappings: [sourceToPeer('data-only')] });
  const pgdso = pgdsoCommand(configPath);
  const engine = pgdso(['run', '--server', 'source']);
  const engineRss = peakRss(engine);
  try {
    // the engine's start (its group and stream), outside the measure: the instance runs dso
    await until('the instance to run dso', async () => {
      const board = await sql(src, `SELECT 1 FROM pgdso.servgrp_board WHERE state = 'online' AND 'dso' = ANY (operations)`);
      return board.rowCount === 1;
    });
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
    return { rows: SYNC_ROWS, nativeMs, pgdsoMs, pgdsoIdleMs, syncPeakRssMb: syncRss.mb(), enginePeakRssMb: engineRss.mb() };
  } finally {
    await stopChild(engine);
    await remove();
  }
}

async function untilBookkept(url: string, rows: number): Promise<void> {
  for (;;) {
    const r = await sql(url, `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status = 'success'`);
    if (r.rows[0].n >= rows) return;
    await delay(200);
  }
}

export function syncTable(f: SyncFigures): string {
  return [
    `| initial load of ${fmt(f.rows)} existing rows | start to last row on the peer | rows/s | until idle again | peak RSS |`,
    '|---|---|---|---|---|',
    `| PostgreSQL subscription, copy_data = true | ${f.nativeMs} ms | ${rate(f.rows, f.nativeMs)} | ${f.nativeMs} ms | (in the server) |`,
    `| pgdso sync (data-only mapping, batches of 5000) | ${f.pgdsoMs} ms | ${rate(f.rows, f.pgdsoMs)} | ${f.pgdsoIdleMs} ms ` +
      `(source copies marked) | sync ${f.syncPeakRssMb} MB, engine ${f.enginePeakRssMb} MB |`,
    '',
    `pgdso sync / native copy: ${(f.nativeMs / f.pgdsoMs).toFixed(2)}x (1.0 = as fast as native)`,
  ].join('\n');
}
