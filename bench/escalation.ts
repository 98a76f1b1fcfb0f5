// An escalation over a large form in `npm run bench` (BENCH_SCENARIOS=escalation): N existing
// rows (BENCH_ESCALATION_ROWS, default 1,000,000), of which a third match (item = 'chair'), moved
// with ownership to a peer by an escalation that `pgdso escalate` runs on the instance that owns
// the `escalation` operation (the scan runs in the instance, the engine carries the batches).
// Measured: from the request until the last matching row is the peer's master, until the engine
// is idle again, and the instance's peak RSS (the memory the escalation costs the engine).
import { setTimeout as delay } from 'node:timers/promises';
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { benchConfig, deployForm, peakRss, pgdsoCommand, ROWS_SQL, sourceToPeer, sql, stopChild } from './support.ts';

export const ESCALATION_ROWS = Number(process.env.BENCH_ESCALATION_ROWS ?? 1_000_000);

export interface EscalationFigures {
  rows: number;
  matched: number;
  peerMs: number;
  idleMs: number;
  enginePeakRssMb: number;
}

export async function benchEscalation(source: LocalCluster, target: LocalCluster): Promise<EscalationFigures> {
  const src = await source.createDatabase('bench_escalation');
  const dst = await target.createDatabase('bench_escalation');
  for (const url of [src, dst]) await deployForm(url);
  await sql(src, ROWS_SQL, [1, ESCALATION_ROWS]);
  const matched = Number((await sql(src, `SELECT count(*) AS n FROM repair_request WHERE item = 'chair'`)).rows[0].n);
  const rules = {
    mappings: [sourceToPeer('data+ownership')],
    escalations: [
      {
        name: 'move-chairs',
        on: { server: 'source', form: 'repair_request' },
        // yearly: it never fires by itself during the bench; `pgdso escalate` runs it now
        schedule: { cron: '0 0 1 1 *', timezone: 'UTC' },
        conditions: { all: [{ fact: 'row', path: '$.item', operator: 'equal', value: 'chair' }] },
        actions: [{ type: 'transfer', mapping: 'source-to-peer' }],
      },
    ],
  };
  const { configPath, remove } = await benchConfig(src, dst, rules);
  const pgdso = pgdsoCommand(configPath);
  const engine = pgdso(['run', '--server', 'source']);
  const engineRss = peakRss(engine);
  try {
    const deadline = Date.now() + 30_000;
    // the instance owns escalation (its board row says so) before the measure starts
    while (
      (await sql(src, `SELECT 1 FROM pgdso.servgrp_board WHERE state = 'online' AND 'escalation' = ANY (operations)`)).rowCount === 0
    ) {
      if (Date.now() > deadline) throw new Error('the instance did not take the escalation operation');
      await delay(100);
    }
    const started = Date.now();
    const run = pgdso(['escalate', '--name', 'move-chairs']);
    let err = '';
    run.stderr!.on('data', (d) => (err += d));
    const exit = new Promise<number | null>((resolve) => run.once('exit', resolve));
    const peerMs = await until(dst, `SELECT count(*)::int AS n FROM repair_request WHERE dso_master`, matched, started);
    const code = await exit;
    if (code !== 0) throw new Error(`pgdso escalate exited ${code}: ${err}`);
    await until(src, `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status = 'success'`, matched, started);
    const idleMs = Date.now() - started;
    return { rows: ESCALATION_ROWS, matched, peerMs, idleMs, enginePeakRssMb: engineRss.mb() };
  } finally {
    await stopChild(engine);
    await remove();
  }
}

async function until(url: string, countSql: string, rows: number, since: number, timeoutMs = 1_800_000): Promise<number> {
  while (Date.now() - since < timeoutMs) {
    if ((await sql(url, countSql)).rows[0].n >= rows) return Date.now() - since;
    await delay(200);
  }
  throw new Error(`timed out: ${countSql}`);
}

export function escalationTable(f: EscalationFigures): string {
  return [
    `| escalation over ${f.rows.toLocaleString('en-US')} rows, ${f.matched.toLocaleString('en-US')} matching, moved with ownership ` +
      '| request to last row on the peer | until idle again | instance peak RSS |',
    '|---|---|---|---|',
    `| pgdso escalate (run by the owner of escalation) | ${f.peerMs} ms | ${f.idleMs} ms | ${f.enginePeakRssMb} MB |`,
  ].join('\n');
}
