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
  /** the bulk's one filter, run right before the 100 filters (same state of the clusters) */
  oneFilterMs: number[];
  /** the bulk run's own figures, when it ran in this bench (earlier, on fresher clusters) */
  bulkRunMs: number[] | null;
  manyFiltersMs: number[];
  manyFiltersIdleMs: number[];
  manyFiltersPeakRssMb: number;
  /** median time with 100 filters over the median with one, less 1, in percent */
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
  // the one-filter baseline runs right before the 100 filters, not taken from the bulk run at the
  // start of the bench: later runs find the clusters busier (checkpoints, the WAL of the runs
  // before), which made the same engine look 20% slower with 100 filters than at the start
  const oneFilterMs = (await pgdsoBulk(source, target, 'bench_filters_one', [EVERY_REQUEST])).times;
  const many = await pgdsoBulk(source, target, 'bench_filters', filters());
  const costPercent = Math.round((median(many.times) / median(oneFilterMs) - 1) * 1000) / 10;
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
    row('one filter, run right before', f.oneFilterMs),
    row(`${f.filters} filters, 2 matching`, f.manyFiltersMs),
    ...(f.bulkRunMs ? [row('(one filter: the bulk run, earlier in this bench)', f.bulkRunMs)] : []),
    '',
    `cost of ${f.filters} filters: ${f.costPercent > 0 ? '+' : ''}${f.costPercent}% time ` +
      `(until idle with ${f.filters} filters: ${median(f.manyFiltersIdleMs)} ms; peak RSS ${f.manyFiltersPeakRssMb} MB)`,
  ].join('\n');
}
