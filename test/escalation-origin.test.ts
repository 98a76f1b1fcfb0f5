// The `origin` fact of an escalation: the server whose engine last wrote the request here, from
// the replication origin of the transaction that wrote its row (recorded with
// track_commit_timestamp on); null for a request a user of this server wrote.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { REPAIR_REQUEST_SQL, dsoSuite, filter, mapping, copyOf, until, settled } from './support/dso.ts';

const suite = dsoSuite(1, { settings: { track_commit_timestamp: 'on' } });

test('an escalation whose conditions read origin matches the requests that an engine of that server wrote', async (t) => {
  const e = await suite.env({
    servers: ['sf', 'chicago', 'archive'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [
        mapping('chicago-to-sf', 'chicago', 'sf', { transferMode: 'independent-copy' }),
        mapping('sf-to-archive', 'sf', 'archive'),
      ],
      filters: [filter('share', 'chicago', null, [{ type: 'transfer', mapping: 'chicago-to-sf' }], ['insert'])],
      escalations: [
        {
          name: 'archive-from-chicago',
          on: { server: 'sf', form: 'repair_request' },
          schedule: { cron: '0 0 1 1 *', timezone: 'UTC' },
          conditions: { all: [{ fact: 'origin', operator: 'equal', value: 'chicago' }] },
          actions: [{ type: 'transfer', mapping: 'sf-to-archive' }],
        },
      ],
    },
  });
  const [{ on }] = (await e.query<{ on: string }>('sf', `SELECT current_setting('track_commit_timestamp') AS on`)) as [{ on: string }];
  if (on !== 'on') return t.skip('track_commit_timestamp is off on the servers given (PGDSO_TEST_URLS)');
  const engine = e.engine();
  await e.query('chicago', `INSERT INTO repair_request (id, item) VALUES ('C-1', 'chair')`);
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('S-1', 'desk')`);
  await until(engine, 'C-1 did not reach sf', async () => (await copyOf(e, 'sf', 'C-1'))?.dso_master === true);
  await settled(e, engine, ['chicago', 'sf']);

  const run = await e.cli(['escalate', '--name', 'archive-from-chicago']);
  assert.equal(run.code, 0, `${run.stdout}${run.stderr}`);
  assert.match(run.stdout, /matched 1 of 2 requests/, run.stdout);
  await until(engine, 'C-1 did not reach the archive', async () => (await copyOf(e, 'archive', 'C-1'))?.dso_master === true);
  await settled(e, engine, ['sf', 'archive']);
  assert.equal(await copyOf(e, 'archive', 'S-1'), undefined, "S-1, a sf user's request, has no origin");
  assert.equal((await copyOf(e, 'sf', 'S-1'))?.dso_master, true);
  assert.equal(await engine.stop(), 0);
});
