// A source transaction that changes a request twice reaches the target as one write with the
// latest values, also when the transaction carries more requests than a set-based group holds
// (5,000): a full group waits for the end of its source transaction before it goes, so the
// first state (one the source never committed) is not written on the target. The peer's
// write_audit (an AFTER trigger) shows every write of the engine there.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, until } from './support/dso.ts';
import { AUDIT_SQL } from './support/faults.ts';

const suite = dsoSuite(2);

test('a transaction inserting 6,000 requests, then updating some, writes each once on the peer, with its latest values', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: `${REPAIR_REQUEST_SQL}; ${AUDIT_SQL}`,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only' })],
      filters: [filter('every-request', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert', 'update'])],
    },
  });
  const engine = e.engine();
  await e.query(
    'sf',
    `BEGIN;
     INSERT INTO repair_request (id, item, status, description)
       SELECT 'G' || lpad(g::text, 5, '0'), 'chair', 'new', md5(g::text) FROM generate_series(0, 5999) g;
     UPDATE repair_request SET status = 'changed', description = md5(id || ':changed') WHERE right(id, 1) = '0';
     COMMIT`,
  );
  await until(
    engine,
    'the 6,000 requests on chicago, the updated ones changed',
    async () =>
      (await e.query<{ n: number }>('chicago', `SELECT count(*)::int AS n FROM repair_request WHERE status = 'changed'`))[0]!.n === 600 &&
      (await e.query<{ n: number }>('chicago', 'SELECT count(*)::int AS n FROM repair_request'))[0]!.n === 6000,
  );
  const writes = await e.query<{ writes: number; requests: number }>(
    'chicago',
    `SELECT writes, count(*)::int AS requests FROM (SELECT id, count(*)::int AS writes FROM write_audit WHERE by_engine GROUP BY id) w
      GROUP BY writes ORDER BY writes`,
  );
  assert.deepEqual(writes, [{ writes: 1, requests: 6000 }], 'every request written once by the engine on chicago');
  const firstStates = await e.query<{ n: number }>(
    'chicago',
    `SELECT count(*)::int AS n FROM write_audit WHERE by_engine AND right(id, 1) = '0' AND state NOT LIKE 'changed:%'`,
  );
  assert.equal(firstStates[0]!.n, 0, 'no updated request written with its first state');
});
