// An escalation run interrupted by a failover: `pgdso escalate` is carried out by the owner of
// escalation (sf-a), which is killed with kill -9 in the middle of the run; sf-b takes the
// operation over and resumes the run after its last batch. No request is escalated twice, none
// is missed (a write log on the target that a primary key cannot hide), and the command that
// waited hears that the instance died.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { PGDSO_COMMAND, REPAIR_REQUEST_SQL, dsoSuite, mapping, settled, WRITE_LOG_SQL } from '../support/dso.ts';
import { FAILOVER_BOUND_MS, GROUP, describeGroup, startGroup, untilOwner } from '../support/group.ts';
import { waitFor } from '../support/wait.ts';

const suite = dsoSuite(2);
const ROWS = 40_000;

const RULES = {
  // data-only: the source copies stay master, so a request scanned twice would be sent twice
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only', whenToUpdate: 'never' })],
  escalations: [
    {
      name: 'open-to-chicago',
      on: { server: 'sf', form: 'repair_request' },
      schedule: { cron: '0 0 1 1 *', timezone: 'UTC' },
      conditions: { all: [{ fact: 'row', path: '$.status', operator: 'notIn', value: ['closed'] }] },
      actions: [{ type: 'transfer', mapping: 'sf-to-chicago' }],
    },
  ],
};

test(`kill -9 of the owner of escalation in the middle of a run over ${ROWS} requests: the next owner resumes it, no request escalated \
twice, none missed`, { timeout: 300_000 }, async (t) => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    placement: { sf: 0, chicago: 1 },
    schemaSql: `${REPAIR_REQUEST_SQL}; ${WRITE_LOG_SQL}`,
    forms: ['repair_request'],
    rules: RULES,
    config: { group: GROUP, pending: { heartbeatSeconds: 1 } },
  });
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, status) SELECT 'E-' || lpad(g::text, 6, '0'), 'chair',
            CASE WHEN g % 4 = 0 THEN 'closed' ELSE 'open' END
       FROM generate_series(1, $1) g`,
    [ROWS],
  );
  const group = await startGroup(e, ['sf-a', 'sf-b']);
  const [a] = group;
  const child = spawn(process.execPath, [...PGDSO_COMMAND, 'escalate', '--name', 'open-to-chicago', '--config', e.configPath], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.on('data', (d) => (output += d));
  child.stderr.on('data', (d) => (output += d));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const run = async () =>
    (
      await e.query<{ scanned: number; done: boolean; instance: string }>(
        'sf',
        `SELECT scanned::int, finished_at IS NOT NULL AS done, instance_id AS instance FROM pgdso.scan_runs`,
      )
    )[0];
  await waitFor(
    async () => {
      const r = await run();
      return r && r.scanned >= 6000;
    },
    { timeoutMs: 60_000, intervalMs: 10, message: () => `the run made no progress\n${output}\n${describeGroup(group)}` },
  );
  await a!.engine.kill9();
  const atKill = (await run())!;
  t.diagnostic(`sf-a killed with ${atKill.scanned} of ${ROWS} requests scanned`);
  assert.equal(atKill.done, false, 'the kill came after the run finished');
  assert.equal(atKill.instance, 'sf-a');

  await untilOwner(e, 'sf-b', group, { operation: 'escalation', timeoutMs: FAILOVER_BOUND_MS + 30_000 });
  await waitFor(async () => (await run())?.done === true, {
    timeoutMs: 60_000,
    message: () => `sf-b did not finish the run\n${describeGroup(group)}`,
  });
  const code = await exited;
  assert.equal(code, 1, `pgdso escalate exits 1 when the instance running it dies\n${output}`);
  assert.match(output, /instance sf-a is (delinquent|gone) and did not answer/, output);
  await settled(e, group[1]!.engine, ['sf']);

  const [log] = await e.query<{ inserts: string; ids: string; writes: string }>(
    'chicago',
    `SELECT count(*) FILTER (WHERE op = 'INSERT')::text AS inserts, count(DISTINCT id)::text AS ids,
            count(*)::text AS writes FROM write_log`,
  );
  const open = String((ROWS * 3) / 4);
  assert.deepEqual(log, { inserts: open, ids: open, writes: open }, 'every open request written once on chicago');
  const [closed] = await e.query<{ n: string }>('chicago', `SELECT count(*)::text AS n FROM repair_request WHERE status = 'closed'`);
  assert.equal(closed!.n, '0', 'no closed request escalated');
  const [done] = await e.query<{ scanned: string; matched: string; instance: string }>(
    'sf',
    `SELECT scanned::text, matched::text, instance_id AS instance FROM pgdso.scan_runs`,
  );
  assert.deepEqual(done, { scanned: String(ROWS), matched: open, instance: 'sf-b' }, 'one run, finished by sf-b');
  await group[1]!.engine.stop();
});
