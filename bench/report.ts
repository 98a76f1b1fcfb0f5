// What a bench run leaves: the summary table (each workload's figure for native, the decode
// limit and pgdso, and pgdso's ratios to them), bench/results.json (the machine and every
// workload's raw figures) and docs/bench.svg (the summary as a chart).
//
// The chart is drawn by vega-lite (compiled to a vega spec) and rendered headless by vega's
// own SVG renderer (renderer 'none', toSVG): no canvas or other native module is needed.
import { execFileSync } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import * as vega from 'vega';
import type { TopLevelSpec } from 'vega-lite';
import * as vegaLite from 'vega-lite';
import type { BacklogFigures } from './backlog.ts';
import type { BulkFigures } from './bulk.ts';
import type { EscalationFigures } from './escalation.ts';
import type { FanoutFigures } from './fanout.ts';
import type { FilterFigures } from './filters.ts';
import type { SteadyFigures } from './steady.ts';
import { clientProgram, fmt, median, ROOT } from './support.ts';
import type { SyncFigures } from './sync.ts';

export interface Workloads {
  bulk?: BulkFigures;
  steady?: SteadyFigures;
  backlog?: BacklogFigures;
  fanout?: FanoutFigures;
  filters?: FilterFigures;
  sync?: SyncFigures;
  escalation?: EscalationFigures;
}

export interface Machine {
  cpuModel: string;
  cpus: number;
  memoryGb: number;
  node: string;
  postgres: string;
  clients: string;
  os: string;
}

/** One line of the summary: milliseconds, lower is better; null where the system has no such figure. */
export interface SummaryRow {
  workload: string;
  native: number | null;
  decode: number | null;
  pgdso: number | null;
}

export function machine(postgres: string): Machine {
  let clients = '';
  try {
    clients = execFileSync(clientProgram('pg_recvlogical', process.env.BENCH_PG_RECVLOGICAL), ['--version'], { encoding: 'utf8' }).trim();
  } catch {
    clients = 'pg_recvlogical not found';
  }
  return {
    cpuModel: os.cpus()[0]?.model.trim() ?? 'unknown',
    cpus: os.cpus().length,
    memoryGb: Math.round(os.totalmem() / 2 ** 30),
    node: process.version,
    postgres,
    clients,
    os: `${os.type()} ${os.release()}`,
  };
}

export function summaryRows(w: Workloads): SummaryRow[] {
  const rows: SummaryRow[] = [];
  const m = (xs: number[] | undefined) => (xs ? median(xs) : null);
  if (w.bulk) {
    rows.push({
      workload: `bulk: ${fmt(w.bulk.rows)} rows, 1 transaction`,
      ...pick(median(w.bulk.nativeMs), m(w.bulk.decodeMs), median(w.bulk.pgdsoMs)),
    });
  }
  if (w.steady) {
    const s = w.steady;
    rows.push({ workload: `steady: pgbench -N ${s.rate}/s, latency p50`, ...pick(s.native.p50Ms, null, s.pgdso.p50Ms) });
    rows.push({ workload: `steady: pgbench -N ${s.rate}/s, latency p99`, ...pick(s.native.p99Ms, null, s.pgdso.p99Ms) });
  }
  if (w.backlog) {
    const b = w.backlog;
    rows.push({ workload: `backlog: ${fmt(b.rows)} rows, ${b.transactions} transactions`, ...pick(b.nativeMs, b.decodeMs, b.pgdsoMs) });
  }
  if (w.fanout) {
    const f = w.fanout;
    rows.push({
      workload: `fan-out: ${fmt(f.rows)} rows to ${f.peers} peers`,
      ...pick(median(f.nativeMs), m(f.decodeMs), median(f.pgdsoMs)),
    });
  }
  if (w.filters) {
    // native and the decode limit: the bulk's (the same rows; PostgreSQL has no filters to load)
    const f = w.filters;
    const workload = `filters: ${f.filters} loaded, 2 matching, ${fmt(f.rows)} rows`;
    rows.push({ workload, ...pick(m(w.bulk?.nativeMs), m(w.bulk?.decodeMs), median(f.manyFiltersMs)) });
  }
  if (w.sync) rows.push({ workload: `initial load: ${fmt(w.sync.rows)} rows`, ...pick(w.sync.nativeMs, null, w.sync.pgdsoMs) });
  if (w.escalation) rows.push({ workload: `escalation: ${fmt(w.escalation.rows)} rows scanned`, ...pick(null, null, w.escalation.peerMs) });
  return rows;
}

const pick = (native: number | null, decode: number | null, pgdso: number | null) => ({ native, decode, pgdso });

const ms = (x: number | null) => (x === null || Number.isNaN(x) ? '-' : x < 100 ? `${Math.round(x * 10) / 10} ms` : `${fmt(x)} ms`);
const ratio = (a: number | null, b: number | null) => (a === null || b === null || !b ? '-' : `${(a / b).toFixed(2)}x`);

export function summaryTable(rows: SummaryRow[]): string {
  return [
    '| workload (milliseconds, lower is better) | native | decode limit | pgdso | speed vs native | speed vs decode limit |',
    '|---|---|---|---|---|---|',
    ...rows.map(
      (r) =>
        `| ${r.workload} | ${ms(r.native)} | ${ms(r.decode)} | ${ms(r.pgdso)} ` +
        `| ${ratio(r.native, r.pgdso)} | ${ratio(r.decode, r.pgdso)} |`,
    ),
    '',
    "speed: the other time over pgdso's (1.00x = as fast, higher is faster; the issue's ratios); " +
      'native: PostgreSQL publication/subscription; decode limit: pg_recvlogical (pgoutput), streaming during the load ' +
      '(commit to shipped), for the backlog started after it (to endpos); ' +
      "filters: native and decode limit are the bulk run's (the same rows); steady: probe latency, commit to visible.",
  ].join('\n');
}

export function caption(m: Machine, date: string): string {
  return `${m.cpus} x ${m.cpuModel}, ${m.memoryGb} GB, Node.js ${m.node}, PostgreSQL ${m.postgres}, ${date.slice(0, 10)}`;
}

export async function writeResults(m: Machine, date: string, settings: Record<string, unknown>, w: Workloads, rows: SummaryRow[]) {
  const file = path.join(ROOT, 'bench', 'results.json');
  await writeFile(file, `${JSON.stringify({ machine: m, date, settings, workloads: w, summary: rows }, null, 2)}\n`);
  return file;
}

/** docs/bench.svg: per workload, a bar per system (log scale), its value at the bar's end. */
export async function writeChart(m: Machine, date: string, rows: SummaryRow[]): Promise<string> {
  const systems = ['PostgreSQL native', 'decode limit', 'pgdso'] as const;
  const values = rows.flatMap((r) =>
    [r.native, r.decode, r.pgdso].flatMap((v, i) =>
      v === null || Number.isNaN(v) || v <= 0 ? [] : [{ workload: r.workload, system: systems[i], ms: v, label: ms(v) }],
    ),
  );
  const spec: TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: {
      text: 'pgdso, PostgreSQL logical replication and the decode limit',
      subtitle: [
        'milliseconds (log scale), lower is better; steady: probe latency, commit to visible',
        `npm run bench on ${caption(m, date)}`,
      ],
      anchor: 'start',
    },
    width: 520,
    background: 'white',
    padding: 12,
    data: { values },
    encoding: {
      y: { field: 'workload', type: 'nominal', sort: rows.map((r) => r.workload), title: null, axis: { labelLimit: 400 } },
      yOffset: { field: 'system', sort: [...systems] },
      // stack: null, or the bars start at 0, which a log scale has not
      x: { field: 'ms', type: 'quantitative', scale: { type: 'log' }, stack: null, title: 'milliseconds (log scale)' },
      color: {
        field: 'system',
        sort: [...systems],
        scale: { range: ['#4c78a8', '#9d9d9d', '#f58518'] },
        legend: { orient: 'top', title: null },
      },
    },
    layer: [
      { mark: { type: 'bar', height: { band: 0.9 } } },
      { mark: { type: 'text', align: 'left', dx: 3, fontSize: 10 }, encoding: { text: { field: 'label' } } },
    ],
  };
  const view = new vega.View(vega.parse(vegaLite.compile(spec).spec), { renderer: 'none' });
  const svg = await view.toSVG();
  view.finalize();
  const file = path.join(ROOT, 'docs', 'bench.svg');
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, svg);
  return file;
}
