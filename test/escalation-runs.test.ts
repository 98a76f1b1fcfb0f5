// The escalations of a server in one process: the owner's loop looks at the schedule and resumes
// interrupted runs; a run that `pgdso escalate` carries out meanwhile in the same process (routed
// to the owner) is not interrupted, so the loop must not take it over (a claim would raise its
// term and end its scan: "taken over by another instance", with no other instance).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { REPAIR_REQUEST_SQL, dsoSuite, mapping } from './support/dso.ts';
import { waitFor, within } from './support/wait.ts';
import { loadConfig, toPgClientConfig } from '../src/config/load.ts';
import { compileRules } from '../src/rules/index.ts';
import { Escalations } from '../src/escalation/runner.ts';
import { createLogger } from '../src/log.ts';

const suite = dsoSuite(1);

test("the owner's escalation loop leaves alone a run that pgdso escalate carries out in the same process", async (t) => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
      escalations: [
        {
          name: 'chairs-to-chicago',
          on: { server: 'sf', form: 'repair_request' },
          schedule: { cron: '0 0 1 1 *', timezone: 'UTC' },
          conditions: { all: [{ fact: 'row', path: '$.item', operator: 'equal', value: 'chair' }] },
          actions: [{ type: 'transfer', mapping: 'sf-to-chicago' }],
        },
      ],
    },
  });
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('C-1', 'chair'), ('C-2', 'chair'), ('C-3', 'desk')`);
  const config = await loadConfig(e.configPath, {});
  const rules = compileRules(config);
  let ticks = 0;
  const escalations = new Escalations({
    server: 'sf',
    connection: toPgClientConfig(config.servers.sf!.connection),
    instanceId: 'sf-a',
    log: createLogger({ level: 'error' }),
    rules: () => {
      ticks += 1;
      return rules;
    },
    batchRows: 1,
    idleMs: 50,
  });
  // a user's transaction holds C-2: the run's second batch (FOR SHARE) waits for it
  const user = new pg.Client({ connectionString: e.urls.sf });
  await user.connect();
  t.after(() => user.end());
  await user.query('BEGIN');
  await user.query(`SELECT 1 FROM repair_request WHERE id = 'C-2' FOR UPDATE`);

  const controller = new AbortController();
  t.after(() => controller.abort());
  const loop = escalations.run(null, controller.signal);
  const now = escalations.runNow('chairs-to-chicago', null, controller.signal);
  now.catch(() => undefined);
  const term = async () =>
    (await e.query<{ term: number }>('sf', `SELECT term::int AS term FROM pgdso.scan_runs WHERE trigger = 'manual'`))[0]?.term ?? 0;
  const blocked = async () =>
    (
      await e.query<{ n: number }>(
        'sf',
        `SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
            AND application_name LIKE 'pgdso scan%'`,
      )
    )[0]!.n > 0;
  await waitFor(blocked, { message: "the run's batch did not wait for the user's row lock" });
  // the loop ticks meanwhile (each tick reads the rules in force), past the claim's lock timeout
  const since = ticks;
  const started = Date.now();
  await waitFor(async () => (ticks - since >= 5 && Date.now() - started > 2500) || (await term()) > 1, {
    message: 'the escalation loop did not tick',
  });
  await user.query('COMMIT');

  const summary = await within(now, 20_000, () => 'pgdso escalate did not end');
  assert.equal(summary.matched, 2);
  assert.equal(summary.scanned, 3);
  assert.equal(await term(), 1, 'the run was claimed again while it ran');
  const runs = await e.query<{ n: number }>('sf', 'SELECT count(*)::int AS n FROM pgdso.scan_runs WHERE finished_at IS NULL');
  assert.equal(runs[0]!.n, 0);
  controller.abort();
  await loop;
});

test('pgdso escalate run again and again while the owner loop ticks: the loop never takes a manual run as interrupted', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
      escalations: [
        {
          name: 'desks-to-chicago',
          on: { server: 'sf', form: 'repair_request' },
          schedule: { cron: '0 0 1 1 *', timezone: 'UTC' },
          conditions: { all: [{ fact: 'row', path: '$.item', operator: 'equal', value: 'desk' }] },
          actions: [{ type: 'transfer', mapping: 'sf-to-chicago' }],
        },
      ],
    },
  });
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('D-1', 'chair')`);
  const config = await loadConfig(e.configPath, {});
  const rules = compileRules(config);
  const escalations = new Escalations({
    server: 'sf',
    connection: toPgClientConfig(config.servers.sf!.connection),
    instanceId: 'sf-a',
    log: createLogger({ level: 'silent' }),
    rules: () => rules,
    idleMs: 1,
  });
  const controller = new AbortController();
  const loop = escalations.run(null, controller.signal);
  try {
    // the window: a manual run is in the table before this process knows its id
    for (let i = 0; i < 40; i++) {
      const summary = await within(escalations.runNow('desks-to-chicago', null, controller.signal), 20_000, () => `run ${i} did not end`);
      assert.equal(summary.scanned, 1);
    }
  } finally {
    controller.abort();
    await loop;
  }
  const claims = await e.query<{ n: number }>(
    'sf',
    `SELECT count(*)::int AS n FROM pgdso.scan_runs WHERE trigger = 'manual' AND term <> 1`,
  );
  assert.equal(claims[0]!.n, 0, 'a manual run was claimed twice');
});
