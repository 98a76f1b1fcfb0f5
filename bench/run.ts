// `npm run bench`: pgdso side by side with PostgreSQL's own logical replication (publication and
// subscription) and with the decode limit (how fast the source server decodes the same WAL through
// pgoutput, bench/decode.ts), on this machine, in one run, on the same two embedded clusters:
//   bulk      BENCH_ROWS rows (200,000) in one transaction, commit to last row on the peer (bulk.ts)
//   steady    pgbench -N at 1000/s for BENCH_STEADY_SECONDS (20), probe latency (steady.ts)
//   backlog   BENCH_BACKLOG_ROWS (1,000,000) in 10 transactions committed while stopped (backlog.ts)
//   fanout    BENCH_FANOUT_ROWS (100,000) in one transaction to 3 peers (fanout.ts)
//   filters   the bulk with 100 filters loaded, 2 matching, against one (filters.ts)
//   sync      the initial load of BENCH_SYNC_ROWS (1,000,000) existing rows (sync.ts)
//   escalation  an escalation over BENCH_ESCALATION_ROWS rows (escalation.ts; on demand only)
// BENCH_SCENARIOS picks them (a comma list; default all but escalation), BENCH_RUNS (3) the
// runs of bulk, fan-out and filters (medians reported). Prints a Markdown table per workload and
// a summary, writes bench/results.json and draws docs/bench.svg (report.ts).
import { startLocalCluster } from '../src/embedded/cluster.ts';
import { backlogTable, BACKLOG_ROWS, benchBacklog } from './backlog.ts';
import { benchBulk, bulkTable, ROWS } from './bulk.ts';
import { benchEscalation, ESCALATION_ROWS, escalationTable } from './escalation.ts';
import { benchFanout, FANOUT_ROWS, fanoutTable } from './fanout.ts';
import { benchFilters, filtersTable } from './filters.ts';
import { caption, machine, summaryRows, summaryTable, writeChart, writeResults, type Workloads } from './report.ts';
import { benchSteady, STEADY_RATE, STEADY_SCALE, STEADY_SECONDS, steadyTable } from './steady.ts';
import { RUNS, sql } from './support.ts';
import { benchInitialLoad, SYNC_ROWS, syncTable } from './sync.ts';

const ALL = ['bulk', 'steady', 'backlog', 'fanout', 'filters', 'sync', 'escalation'];
const DEFAULT = 'bulk,steady,backlog,fanout,filters,sync';

async function main(): Promise<void> {
  const scenarios = (process.env.BENCH_SCENARIOS ?? DEFAULT)
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  const unknown = scenarios.filter((s) => !ALL.includes(s));
  if (unknown.length) throw new Error(`BENCH_SCENARIOS: unknown ${unknown.join(', ')} (known: ${ALL.join(', ')})`);
  const settings = {
    scenarios,
    rows: ROWS,
    runs: RUNS,
    steadySeconds: STEADY_SECONDS,
    steadyRate: STEADY_RATE,
    steadyScale: STEADY_SCALE,
    backlogRows: BACKLOG_ROWS,
    fanoutRows: FANOUT_ROWS,
    syncRows: SYNC_ROWS,
    escalationRows: ESCALATION_ROWS,
  };
  const source = await startLocalCluster({ name: 'bench-src' });
  const target = await startLocalCluster({ name: 'bench-dst' });
  try {
    const version = (await sql(source.url('postgres'), 'SHOW server_version')).rows[0].server_version as string;
    const date = new Date().toISOString();
    const host = machine(version);
    process.stderr.write(`bench: ${scenarios.join(', ')} on ${caption(host, date)}\n`);
    const w: Workloads = {};
    const show = (text: string) => console.log(`\n${text}`);
    for (const scenario of scenarios) {
      process.stderr.write(`bench: ${scenario}...\n`);
      const started = Date.now();
      if (scenario === 'bulk') show(bulkTable((w.bulk = await benchBulk(source, target))));
      if (scenario === 'steady') show(steadyTable((w.steady = await benchSteady(source, target))));
      if (scenario === 'backlog') show(backlogTable((w.backlog = await benchBacklog(source, target))));
      if (scenario === 'fanout') show(fanoutTable((w.fanout = await benchFanout(source, target))));
      if (scenario === 'filters') show(filtersTable((w.filters = await benchFilters(source, target, w.bulk))));
      if (scenario === 'sync') show(syncTable((w.sync = await benchInitialLoad(source, target))));
      if (scenario === 'escalation') show(escalationTable((w.escalation = await benchEscalation(source, target))));
      process.stderr.write(`bench: ${scenario} took ${Math.round((Date.now() - started) / 1000)} s\n`);
    }
    const rows = summaryRows(w);
    show(summaryTable(rows));
    const results = await writeResults(host, date, settings, w, rows);
    const chart = await writeChart(host, date, rows);
    process.stderr.write(`bench: wrote ${results} and ${chart}\n`);
  } finally {
    await source.destroy();
    await target.destroy();
  }
}

await main();
