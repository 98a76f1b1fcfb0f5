// Workload (a), bulk: one transaction inserting BENCH_ROWS rows (default 200,000) on the source,
// measured from its commit until the last row is visible on the peer, BENCH_RUNS times (the
// median is reported): PostgreSQL's publication/subscription, pgdso (a data-only mapping and one
// filter; also until it is idle again: the source copies' bookkeeping done and the slot
// confirmed), and the decode limit of the same transaction (bench/decode.ts).
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { decodeLimit, liveDecodeLimit } from './decode.ts';
import { subscribe, unsubscribe } from './native.ts';
import {
  benchConfig,
  deployForm,
  fmt,
  median,
  RUNS,
  rate,
  ROWS_SQL,
  sourceToPeer,
  sql,
  startEngine,
  TABLE_SQL,
  waitBookkept,
  waitDrained,
  waitSlotIdle,
} from './support.ts';

export const ROWS = Number(process.env.BENCH_ROWS ?? 200_000);

export interface BulkFigures {
  rows: number;
  nativeMs: number[];
  /** the decode limit, live: pg_recvlogical streaming during the load, commit to shipped */
  decodeMs: number[];
  /** pg_recvlogical started after the commit, to endpos (for reference; no limit for a live tail) */
  decodeColdMs: number[];
  pgdsoMs: number[];
  /** until the engine is idle again: the source copies marked and the slot confirmed */
  pgdsoIdleMs: number[];
  pgdsoPeakRssMb: number;
}

export interface PgdsoBulk {
  times: number[];
  settled: number[];
  peakRssMb: number;
}

/** The one filter of the bulk run: every inserted or updated request, to the peer. */
export const EVERY_REQUEST = {
  name: 'every-request',
  on: { server: 'source', form: 'repair_request', ops: ['insert', 'update'] },
  actions: [{ type: 'transfer', mapping: 'source-to-peer' }],
};

async function loadOnce(url: string, first: number, rows: number): Promise<{ committedAt: number; lastId: number }> {
  const lastId = first + rows - 1;
  await sql(url, ROWS_SQL, [first, lastId]);
  return { committedAt: Date.now(), lastId };
}

async function native(source: LocalCluster, target: LocalCluster): Promise<number[]> {
  const src = await source.createDatabase('bench_native');
  const dst = await target.createDatabase('bench_native');
  await sql(src, TABLE_SQL);
  await sql(dst, TABLE_SQL);
  await sql(src, 'CREATE PUBLICATION bench FOR TABLE repair_request');
  const sub = await subscribe(source, 'bench_native', dst, 'bench', 'bench');
  const times: number[] = [];
  for (let run = 0; run < RUNS; run++) {
    const { committedAt, lastId } = await loadOnce(src, run * ROWS + 1, ROWS);
    times.push(await waitDrained(dst, lastId, lastId, committedAt));
  }
  await unsubscribe(sub);
  return times;
}

async function decode(source: LocalCluster): Promise<{ live: number[]; cold: number[] }> {
  const url = await source.createDatabase('bench_decode');
  await sql(url, TABLE_SQL);
  await sql(url, 'CREATE PUBLICATION bench FOR TABLE repair_request');
  const live: number[] = [];
  const cold: number[] = [];
  const load = (run: number) => async () => void (await loadOnce(url, run * ROWS + 1, ROWS));
  for (let run = 0; run < RUNS; run++) {
    live.push(await liveDecodeLimit(source, 'bench_decode', 'bench', load(2 * run)));
    cold.push(await decodeLimit(source, 'bench_decode', 'bench', load(2 * run + 1)));
  }
  return { live, cold };
}

/** The bulk through pgdso on fresh databases `database`, with `filters` as the rules' filters. */
export async function pgdsoBulk(source: LocalCluster, target: LocalCluster, database: string, filters: unknown[]): Promise<PgdsoBulk> {
  const src = await source.createDatabase(database);
  const dst = await target.createDatabase(database);
  for (const url of [src, dst]) await deployForm(url);
  const { configPath, remove } = await benchConfig(src, dst, { mappings: [sourceToPeer('data-only')], filters });
  const engine = startEngine(configPath);
  try {
    const times: number[] = [];
    const settled: number[] = [];
    for (let run = 0; run < RUNS; run++) {
      const { committedAt, lastId } = await loadOnce(src, run * ROWS + 1, ROWS);
      times.push(await engine.race(waitDrained(dst, lastId, lastId, committedAt)));
      // the source copies' bookkeeping (dso_to_*, status) and the engine reading it back from
      // the WAL: the next run starts on an idle engine
      await engine.race(waitBookkept(src, run * ROWS + ROWS));
      await engine.race(waitSlotIdle(src));
      settled.push(Date.now() - committedAt);
    }
    return { times, settled, peakRssMb: engine.rssMb() };
  } finally {
    await engine.stop();
    await remove();
  }
}

export async function benchBulk(source: LocalCluster, target: LocalCluster): Promise<BulkFigures> {
  const nativeMs = await native(source, target);
  const decoded = await decode(source);
  const ours = await pgdsoBulk(source, target, 'bench_pgdso', [EVERY_REQUEST]);
  return {
    rows: ROWS,
    nativeMs,
    decodeMs: decoded.live,
    decodeColdMs: decoded.cold,
    pgdsoMs: ours.times,
    pgdsoIdleMs: ours.settled,
    pgdsoPeakRssMb: ours.peakRssMb,
  };
}

export function bulkTable(f: BulkFigures): string {
  const row = (name: string, runs: number[], idle: string, rss: string) =>
    `| ${name} | ${median(runs)} ms | ${runs.join(', ')} | ${rate(f.rows, median(runs))} | ${idle} | ${rss} |`;
  return [
    `| ${fmt(f.rows)}-row single-transaction insert | commit to visible on the peer (median) | runs (ms) | rows/s (median) ` +
      '| until idle again (median) | engine peak RSS |',
    '|---|---|---|---|---|---|',
    row('PostgreSQL publication/subscription', f.nativeMs, `${median(f.nativeMs)} ms`, '(in the server)'),
    row('decode limit (pg_recvlogical streaming during the load: commit to shipped)', f.decodeMs, '-', '(in the server)'),
    row('decode, cold (pg_recvlogical started after the commit, to endpos, /dev/null)', f.decodeColdMs, '-', '(in the server)'),
    row('pgdso (data-only mapping, one filter)', f.pgdsoMs, `${median(f.pgdsoIdleMs)} ms (source copies marked)`, `${f.pgdsoPeakRssMb} MB`),
  ].join('\n');
}
