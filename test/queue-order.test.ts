// The queue is delivered in the order of its ids, as numbers: a delivery records the highest id
// it holds on the target, so a chunk must hold the lowest ids waiting. (Ordered as text, "55"
// came after "5499": a later chunk's lower ids fell under the recorded mark and were skipped.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { dsoSuite, REPAIR_REQUEST_SQL } from './support/dso.ts';
import { nextQueued } from '../src/queue/sql.ts';

const suite = dsoSuite(1);

test('a chunk of the queue holds its lowest ids, compared as numbers', async () => {
  const e = await suite.env({
    servers: ['sf'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [], filters: [] },
  });
  await e.query(
    'sf',
    `INSERT INTO pgdso.pending (pool, type, mapping, form, request_id, target_server, target_form, target_key,
      payload, status, attempts, next_attempt_at)
    SELECT 'default', 'transfer', 'm', 'public.repair_request', g::text, 'chicago', 'public.repair_request', g::text,
      '{}'::jsonb, 'queued', 0, now() FROM generate_series(1, 1200) g`,
  );
  const client = new pg.Client({ connectionString: e.urls.sf });
  await client.connect();
  try {
    const first = await nextQueued(client, 'chicago', 500);
    const min = BigInt((await e.query<{ min: string }>('sf', 'SELECT min(id)::text AS min FROM pgdso.pending'))[0]!.min);
    assert.deepEqual(
      first.map((r) => BigInt(r.id)),
      Array.from({ length: 500 }, (_, i) => min + BigInt(i)),
    );
  } finally {
    await client.end();
  }
});
