// Workload (c), backlog: BENCH_BACKLOG_ROWS rows (default 1,000,000) in 10 transactions
// committed while the replicator is stopped, then the replicator started: the time from its
// start until the last row is visible on the peer. Native: a subscription that has run (a row
// carried), disabled (its slot no longer streamed) during the load, then enabled. pgdso: an
// engine that has run (a row carried, bookkept, the slot confirmed), stopped during the load,
// then started again (the figure includes the start of its process); also until it is idle
// again, and its peak RSS. The decode limit: the same load on a slot nobody streams, decoded
// by pg_recvlogical once it is committed (bench/decode.ts).
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { decodeLimit } from './decode.ts';
import { disable, enable, subscribe, unsubscribe } from './native.ts';
import { EVERY_REQUEST } from './bulk.ts';
import {
  benchConfig,
  deployForm,
  fmt,
  rate,
  ROWS_SQL,
  sourceToPeer,
  sql,
  startEngine,
  TABLE_SQL,
  until,
  waitBookkept,
  waitDrained,
  waitSlotIdle,
  waitVisible,
} from './support.ts';

export const BACKLOG_ROWS = Number(process.env.BENCH_BACKLOG_ROWS ?? 1_000_000);
export const BACKLOG_TRANSACTIONS = 10;

export interface BacklogFigures {
  rows: number;
  transactions: number;
  nativeMs: number;
  decodeMs: number;
  pgdsoMs: number;
  pgdsoIdleMs: number;
  /** from the engine's start until it streams its slot (the process start, its group, its stream) */
  pgdsoStreamingMs: number;
  pgdsoPeakRssMb: number;
}

/** Rows 1 .. BACKLOG_ROWS in BACKLOG_TRANSACTIONS transactions (row 0 is the warm-up). */
async function loadBacklog(url: string): Promise<void> {
  const per = Math.ceil(BACKLOG_ROWS / BACKLOG_TRANSACTIONS);
  for (let first = 1; first <= BACKLOG_ROWS; first += per) {
    await sql(url, ROWS_SQL, [first, Math.min(first + per - 1, BACKLOG_ROWS)]);
  }
}

async function native(source: LocalCluster, target: LocalCluster): Promise<number> {
  const src = await source.createDatabase('bench_backlog_native');
  const dst = await target.createDatabase('bench_backlog_native');
  await sql(src, TABLE_SQL);
  await sql(dst, TABLE_SQL);
  await sql(src, 'CREATE PUBLICATION bench FOR TABLE repair_request');
  const sub = await subscribe(source, 'bench_backlog_native', dst, 'bench_backlog', 'bench');
  await sql(src, ROWS_SQL, [0, 0]);
  await waitVisible(dst, 0, Date.now());
  await disable(sub);
  await loadBacklog(src);
  const started = Date.now();
  await enable(sub);
  const ms = await waitDrained(dst, BACKLOG_ROWS, BACKLOG_ROWS + 1, started);
  await unsubscribe(sub);
  return ms;
}

async function decode(source: LocalCluster): Promise<number> {
  const url = await source.createDatabase('bench_backlog_decode');
  await sql(url, TABLE_SQL);
  await sql(url, 'CREATE PUBLICATION bench FOR TABLE repair_request');
  return decodeLimit(source, 'bench_backlog_decode', 'bench', () => loadBacklog(url));
}

async function pgdso(source: LocalCluster, target: LocalCluster): Promise<Omit<BacklogFigures, 'nativeMs' | 'decodeMs'>> {
  const src = await source.createDatabase('bench_backlog_pgdso');
  const dst = await target.createDatabase('bench_backlog_pgdso');
  for (const url of [src, dst]) await deployForm(url);
  const { configPath, remove } = await benchConfig(src, dst, { mappings: [sourceToPeer('data-only')], filters: [EVERY_REQUEST] });
  try {
    const first = startEngine(configPath);
    try {
      await sql(src, ROWS_SQL, [0, 0]);
      await first.race(waitVisible(dst, 0, Date.now()));
      await first.race(waitBookkept(src, 1));
      await first.race(waitSlotIdle(src));
    } finally {
      await first.stop();
    }
    await loadBacklog(src);
    const started = Date.now();
    const engine = startEngine(configPath);
    try {
      const streaming = until(
        'the engine to stream its slot',
        async () => (await sql(src, `SELECT 1 FROM pg_replication_slots WHERE slot_name LIKE 'pgdso_%' AND active`)).rowCount === 1,
        600_000,
        20,
      ).then(() => Date.now() - started);
      streaming.catch(() => {});
      const pgdsoMs = await engine.race(waitDrained(dst, BACKLOG_ROWS, BACKLOG_ROWS + 1, started));
      await engine.race(waitBookkept(src, BACKLOG_ROWS + 1));
      await engine.race(waitSlotIdle(src));
      const pgdsoIdleMs = Date.now() - started;
      return {
        pgdsoStreamingMs: await streaming,
        rows: BACKLOG_ROWS,
        transactions: BACKLOG_TRANSACTIONS,
        pgdsoMs,
        pgdsoIdleMs,
        pgdsoPeakRssMb: engine.rssMb(),
      };
    } finally {
      await engine.stop();
    }
  } finally {
    await remove();
  }
}

export async function benchBacklog(source: LocalCluster, target: LocalCluster): Promise<BacklogFigures> {
  const nativeMs = await native(source, target);
  const decodeMs = await decode(source);
  const ours = await pgdso(source, target);
  return { ...ours, nativeMs, decodeMs };
}

export function backlogTable(f: BacklogFigures): string {
  return [
    `| backlog of ${fmt(f.rows)} rows in ${f.transactions} transactions, committed while stopped | start to last row on the peer ` +
      '| rows/s | until idle again | peak RSS |',
    '|---|---|---|---|---|',
    `| PostgreSQL subscription, enabled again | ${f.nativeMs} ms | ${rate(f.rows, f.nativeMs)} | ${f.nativeMs} ms | (in the server) |`,
    `| decode limit (pg_recvlogical, pgoutput, to /dev/null) | ${f.decodeMs} ms | ${rate(f.rows, f.decodeMs)} | - | (in the server) |`,
    `| pgdso run, started again (streaming its slot after ${f.pgdsoStreamingMs} ms) | ${f.pgdsoMs} ms ` +
      `| ${rate(f.rows, f.pgdsoMs)} | ${f.pgdsoIdleMs} ms (source copies marked) | ${f.pgdsoPeakRssMb} MB |`,
  ].join('\n');
}
