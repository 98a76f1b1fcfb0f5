// Workload (d), fan-out: BENCH_FANOUT_ROWS rows (default 100,000) in one transaction on the
// source, carried to 3 peer databases (on the target cluster), measured from the commit until the
// last row is visible on all three, BENCH_RUNS times. Native: 3 subscriptions, so the source
// decodes the transaction 3 times (a walsender each). pgdso: one engine, one decode, one filter
// with 3 transfer actions by 3 data-only mappings (DSO's broadcast). The decode limit is that of
// one decode of the transaction, live (bench/decode.ts; what pgdso needs; native needs three).
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { liveDecodeLimit } from './decode.ts';
import { subscribe, unsubscribe } from './native.ts';
import {
  deployForm,
  fmt,
  median,
  RUNS,
  rate,
  ROWS_SQL,
  serversConfig,
  sql,
  startEngine,
  TABLE_SQL,
  waitBookkept,
  waitDrained,
  waitSlotIdle,
} from './support.ts';

export const FANOUT_ROWS = Number(process.env.BENCH_FANOUT_ROWS ?? 100_000);
export const PEERS = 3;

export interface FanoutFigures {
  rows: number;
  peers: number;
  nativeMs: number[];
  decodeMs: number[];
  pgdsoMs: number[];
  pgdsoIdleMs: number[];
  pgdsoPeakRssMb: number;
}

const peerNames = (prefix: string) => Array.from({ length: PEERS }, (_, i) => `${prefix}_${i + 1}`);

/** Loads run `run`'s rows; returns ms from the commit until the last row is on every peer, and the commit's time. */
async function loadAndWait(
  src: string,
  peers: string[],
  run: number,
  race = <T>(p: Promise<T>) => p,
): Promise<{ ms: number; committedAt: number }> {
  const first = run * FANOUT_ROWS + 1;
  const lastId = first + FANOUT_ROWS - 1;
  await sql(src, ROWS_SQL, [first, lastId]);
  const committedAt = Date.now();
  const each = await race(Promise.all(peers.map((url) => waitDrained(url, lastId, lastId, committedAt))));
  return { ms: Math.max(...each), committedAt };
}

async function native(source: LocalCluster, target: LocalCluster): Promise<number[]> {
  const src = await source.createDatabase('bench_fanout_native');
  await sql(src, TABLE_SQL);
  await sql(src, 'CREATE PUBLICATION bench FOR TABLE repair_request');
  const subs = [];
  for (const name of peerNames('bench_fanout_native')) {
    const dst = await target.createDatabase(name);
    await sql(dst, TABLE_SQL);
    subs.push(await subscribe(source, 'bench_fanout_native', dst, name.replace('bench_fanout_native', 'fanout'), 'bench'));
  }
  const times: number[] = [];
  for (let run = 0; run < RUNS; run++) {
    times.push(
      (
        await loadAndWait(
          src,
          subs.map((s) => s.peer),
          run,
        )
      ).ms,
    );
  }
  for (const sub of subs) await unsubscribe(sub);
  return times;
}

async function decode(source: LocalCluster): Promise<number[]> {
  const url = await source.createDatabase('bench_fanout_decode');
  await sql(url, TABLE_SQL);
  await sql(url, 'CREATE PUBLICATION bench FOR TABLE repair_request');
  const times: number[] = [];
  for (let run = 0; run < RUNS; run++) {
    const first = run * FANOUT_ROWS + 1;
    const load = async () => void (await sql(url, ROWS_SQL, [first, first + FANOUT_ROWS - 1]));
    times.push(await liveDecodeLimit(source, 'bench_fanout_decode', 'bench', load));
  }
  return times;
}

async function pgdso(source: LocalCluster, target: LocalCluster): Promise<Omit<FanoutFigures, 'nativeMs' | 'decodeMs'>> {
  const src = await source.createDatabase('bench_fanout_pgdso');
  await deployForm(src);
  const servers: Record<string, string> = { source: src };
  const peers: string[] = [];
  for (const [i, name] of peerNames('bench_fanout_pgdso').entries()) {
    const dst = await target.createDatabase(name);
    await deployForm(dst);
    servers[`peer${i + 1}`] = dst;
    peers.push(dst);
  }
  const mappings = peers.map((_, i) => ({
    name: `source-to-peer${i + 1}`,
    from: { server: 'source', form: 'repair_request' },
    to: { server: `peer${i + 1}`, form: 'repair_request' },
    transferMode: 'data-only',
  }));
  const filters = [
    {
      name: 'every-request-everywhere',
      on: { server: 'source', form: 'repair_request', ops: ['insert', 'update'] },
      actions: mappings.map((m) => ({ type: 'transfer', mapping: m.name })),
    },
  ];
  const { configPath, remove } = await serversConfig(servers, { mappings, filters });
  const engine = startEngine(configPath);
  try {
    const times: number[] = [];
    const settled: number[] = [];
    for (let run = 0; run < RUNS; run++) {
      const { ms, committedAt } = await loadAndWait(src, peers, run, engine.race);
      times.push(ms);
      // the bookkeeping of a batch is written once all its targets have committed
      await engine.race(waitBookkept(src, (run + 1) * FANOUT_ROWS));
      await engine.race(waitSlotIdle(src));
      settled.push(Date.now() - committedAt);
    }
    return { rows: FANOUT_ROWS, peers: PEERS, pgdsoMs: times, pgdsoIdleMs: settled, pgdsoPeakRssMb: engine.rssMb() };
  } finally {
    await engine.stop();
    await remove();
  }
}

export async function benchFanout(source: LocalCluster, target: LocalCluster): Promise<FanoutFigures> {
  const nativeMs = await native(source, target);
  const decodeMs = await decode(source);
  const ours = await pgdso(source, target);
  return { ...ours, nativeMs, decodeMs };
}

export function fanoutTable(f: FanoutFigures): string {
  const row = (name: string, runs: number[], idle: string, rss: string, copies = f.peers) =>
    `| ${name} | ${median(runs)} ms | ${runs.join(', ')} | ${rate(f.rows * copies, median(runs))} | ${idle} | ${rss} |`;
  return [
    `| ${fmt(f.rows)} rows in one transaction to ${f.peers} peers | commit to visible on all (median) | runs (ms) ` +
      '| rows applied/s (median) | until idle again (median) | engine peak RSS |',
    '|---|---|---|---|---|---|',
    row(`PostgreSQL, ${f.peers} subscriptions`, f.nativeMs, `${median(f.nativeMs)} ms`, '(in the server)'),
    row('decode limit (one decode: pg_recvlogical streaming, commit to shipped; rows decoded/s)', f.decodeMs, '-', '(in the server)', 1),
    row(
      `pgdso (one engine, one filter, ${f.peers} data-only mappings)`,
      f.pgdsoMs,
      `${median(f.pgdsoIdleMs)} ms (source copies marked)`,
      `${f.pgdsoPeakRssMb} MB`,
    ),
  ].join('\n');
}
