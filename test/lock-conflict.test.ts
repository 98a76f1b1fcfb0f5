// The source copies' bookkeeping (dso_* columns) is written by the engine on the source while the
// source's users write the same rows. A deadlock between the two (40P01) must not cost a user
// transaction nor the engine's session: the engine's source transaction is the victim (it waited
// first) and is run again in place, and the user's transaction goes through.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, until } from './support/dso.ts';
import { waitFor } from './support/wait.ts';

const suite = dsoSuite(2);

test('a deadlock between a user transaction and the bookkeeping on the source: the engine runs its transaction again, the user commits', {
  timeout: 90_000,
}, async (t) => {
  const e = await suite.env({
    servers: ['sf', 'chicago', 'tokyo'],
    placement: { sf: 0, chicago: 1, tokyo: 1 },
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [
        mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only' }),
        mapping('sf-to-tokyo', 'sf', 'tokyo', { transferMode: 'data-only' }),
      ],
      // D-1 goes by the first mapping, D-2 by the second: two bookkeeping statements, D-1's first
      filters: [
        filter(
          'go-chairs',
          'sf',
          { all: [is('status', 'go'), is('item', 'chair')] },
          [{ type: 'transfer', mapping: 'sf-to-chicago' }],
          ['update'],
        ),
        filter(
          'go-desks',
          'sf',
          { all: [is('status', 'go'), is('item', 'desk')] },
          [{ type: 'transfer', mapping: 'sf-to-tokyo' }],
          ['update'],
        ),
      ],
    },
  });
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('D-1', 'chair'), ('D-2', 'desk')`);
  await e.query(
    'sf',
    `BEGIN; UPDATE repair_request SET status = 'go' WHERE id = 'D-1'; UPDATE repair_request SET status = 'go' WHERE id = 'D-2'; COMMIT`,
  );
  // a user holds D-2 before the engine starts: its bookkeeping locks D-1, then waits for D-2
  const user = new pg.Client({ connectionString: e.urls.sf, application_name: 'test user' });
  await user.connect();
  t.after(() => user.end());
  await user.query('BEGIN');
  await user.query(`UPDATE repair_request SET description = 'held by a user' WHERE id = 'D-2'`);

  const engine = e.engine();
  await until(engine, 'the engine did not wait for the row the user holds', async () => {
    const waiting = await e.query(
      'sf',
      `SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'pgdso apply%'
        AND wait_event_type = 'Lock'`,
    );
    return waiting.length > 0;
  });
  // the user now wants D-1, which the engine holds: a deadlock, found by the engine's backend
  // (it waited first); the user's statement goes through once the engine rolled back
  await user.query(`UPDATE repair_request SET description = 'also held by the user' WHERE id = 'D-1'`);
  await user.query('COMMIT');

  const copies = (await until(engine, 'the bookkeeping of D-1 and D-2 was not written', async () => {
    const rows = await e.query<{
      id: string;
      dso_transfer_status: string | null;
      dso_to_server: string | null;
      description: string | null;
    }>('sf', `SELECT id, dso_transfer_status, dso_to_server, description FROM repair_request ORDER BY id`);
    return rows.every((r) => r.dso_transfer_status === 'success') ? rows : undefined;
  }))!;
  assert.deepEqual(
    copies.map((r) => [r.id, r.dso_to_server, r.description]),
    [
      ['D-1', 'chicago', 'also held by the user'],
      ['D-2', 'tokyo', 'held by a user'],
    ],
  );
  await waitFor(async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'D-1'`)).length === 1, {
    message: 'D-1 is not on chicago',
  });
  await waitFor(async () => (await e.query('tokyo', `SELECT 1 FROM repair_request WHERE id = 'D-2'`)).length === 1, {
    message: 'D-2 is not on tokyo',
  });
  const exit = await engine.stop();
  assert.match(
    engine.output,
    /40P01[^\n]*running it again|running it again[^\n]*40P01/,
    `the engine did not report its transaction run again:\n${engine.output}`,
  );
  assert.doesNotMatch(engine.output, /engine session failed/, `the deadlock cost the engine its session:\n${engine.output}`);
  assert.equal(exit, 0);
});
