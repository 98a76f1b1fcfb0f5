// Workload (e), filters: the bulk of bench/bulk.ts (BENCH_ROWS rows in one transaction) through
// pgdso with 100 filters loaded on the form, against the same bulk with its one filter. Of the
// 100, two match: `item = chair` and `item = desk` (each with the transfer to the peer), which
// together take every row once, as the bulk's one filter does, so the rows carried and the apply
// are the same and the difference is what 100 filters cost; the other 98 test `item` against
// values no row has (`equal` to item-0 .. item-97), listed first: without an index, every row is
// tested against all of them (pgdso indexes such filters by their equality, src/rules/dispatch.ts).
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { type BulkFigures, EVERY_REQUEST, pgdsoBulk, ROWS } from './bulk.ts';
import { fmt, median, rate } from './support.ts';

export const FILTERS = 100;

export interface FilterFigures {
  rows: number;
  filters: number;
  /** the bulk's one filter, run before and after the 100 filters' two runs */
  oneFilterMs: number[];
  /** the bulk run's own figures, when it ran in this bench (earlier, on fresher clusters) */
  bulkRunMs: number[] | null;
  manyFiltersMs: number[];
  manyFiltersIdleMs: number[];
  manyFiltersPeakRssMb: number;
  /** mean time with 100 filters over the mean with one, less 1, in percent */
  costPercent: number;
}

function filters(): unknown[] {
  const on = { server: 'source', form: 'repair_request', ops: ['insert', 'update'] };
  const transfer = [{ type: 'transfer', mapping: 'source-to-peer' }];
  const itemIs = (value: string) => ({ all: [{ fact: 'row', path: '$.item', operator: 'equal', value }] });
  const list: unknown[] = [];
  for (let i = 0; i < FILTERS - 2; i++) list.push({ name: `no-match-${i}`, on, conditions: itemIs(`item-${i}`), actions: transfer });
  // the two that match, last: every row is tested against the 98 others first
  list.push({ name: 'chairs', on, conditions: itemIs('chair'), actions: transfer });
  list.push({ name: 'desks', on, conditions: itemIs('desk'), actions: transfer });
  return list;
}

export async function benchFilters(source: LocalCluster, target: LocalCluster, bulk: BulkFigures | undefined): Promise<FilterFigures> {
  // The one-filter baseline runs beside the 100 filters, in the order one, 100, 100, one (so a
  // drift of the machine over the four weighs on both alike), not taken from the bulk run at the
  // start of the bench: later runs find the clusters busier (checkpoints, the WAL of the runs
  // before), which made the same engine look 20% slower with 100 filters than at the start.
  const one = (n: number) => pgdsoBulk(source, target, `bench_filters_one_${n}`, [EVERY_REQUEST]);
  const hundred = (n: number) => pgdsoBulk(source, target, `bench_filters_${n}`, filters());
  const first = await one(1);
  const manyRuns = [await hundred(1), await hundred(2)];
  const last = await one(2);
  const oneFilterMs = [...first.times, ...last.times];
  const many = {
    times: manyRuns.flatMap((r) => r.times),
    settled: manyRuns.flatMap((r) => r.settled),
    peakRssMb: Math.max(...manyRuns.map((r) => r.peakRssMb)),
  };
  const costPercent = Math.round((mean(many.times) / mean(oneFilterMs) - 1) * 1000) / 10;
  return {
    rows: ROWS,
    filters: FILTERS,
    oneFilterMs,
    bulkRunMs: bulk?.pgdsoMs ?? null,
    manyFiltersMs: many.times,
    manyFiltersIdleMs: many.settled,
    manyFiltersPeakRssMb: many.peakRssMb,
    costPercent,
  };
}

export function filtersTable(f: FilterFigures): string {
  const row = (name: string, runs: number[]) => `| ${name} | ${median(runs)} ms | ${runs.join(', ')} | ${rate(f.rows, median(runs))} |`;
  return [
    `| ${fmt(f.rows)}-row insert through pgdso | commit to visible on the peer (median) | runs (ms) | rows/s (median) |`,
    '|---|---|---|---|',
    row('one filter (runs 1 and 4)', f.oneFilterMs),
    row(`${f.filters} filters, 2 matching (runs 2 and 3)`, f.manyFiltersMs),
    ...(f.bulkRunMs ? [row('(one filter: the bulk run, earlier in this bench)', f.bulkRunMs)] : []),
    '',
    `cost of ${f.filters} filters (mean against mean): ${f.costPercent > 0 ? '+' : ''}${f.costPercent}% time ` +
      `(until idle with ${f.filters} filters: ${median(f.manyFiltersIdleMs)} ms; peak RSS ${f.manyFiltersPeakRssMb} MB)`,
  ].join('\n');
}

function mean(values: readonly number[]): number {
  return values.reduce((a, b) => a + b, 0) / values.length;
}
