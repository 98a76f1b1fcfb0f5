// kill -9 of `pgdso run` in the middle of a load, then a restart: every row arrives exactly once.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { waitFor } from './support/wait.ts';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter } from './support/dso.ts';

const suite = dsoSuite(2);

const CHECKSUM = `SELECT count(*)::int AS n, md5(string_agg(id || ':' || item || ':' || coalesce(description, '~'), ',' ORDER BY id)) AS sum FROM repair_request`;

test('kill -9 of the engine in the middle of a 50k-row load, then a restart: every row arrives exactly once', async () => {
  const env = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [mapping('sf-to-chicago', 'sf', 'chicago')], filters: [filter('all-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert'])] },
  });
  const e = env;
  const total = 50_000;
  const perTransaction = 500;
  let engine = e.engine();
  let killed = false;
  const load = (async () => {
    for (let start = 0; start < total; start += perTransaction) {
      await e.query('sf', `INSERT INTO repair_request (id, item, description)
        SELECT 'R' || lpad(g::text, 6, '0'), CASE WHEN g % 3 = 0 THEN 'chair' ELSE 'desk' END, md5(g::text) FROM generate_series($1::int, $2::int) g`, [start, start + perTransaction - 1]);
    }
  })();
  // kill -9 while rows are arriving on chicago and the load goes on
  await waitFor(async () => (await e.query<{ n: number }>('chicago', 'SELECT count(*)::int AS n FROM repair_request'))[0]!.n >= 5_000, { timeoutMs: 60_000, message: () => `engine did not start applying:\n${engine.output}` });
  await engine.kill9();
  killed = true;
  const atKill = (await e.query<{ n: number }>('chicago', 'SELECT count(*)::int AS n FROM repair_request'))[0]!.n;
  await load;
  assert.ok(killed && atKill < total, `the kill came after the load was applied (${atKill} rows)`);

  engine = e.engine();
  await waitFor(async () => {
    const [s] = await e.query<{ n: number }>('sf', `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status = 'success'`);
    return s!.n === total;
  }, { timeoutMs: 120_000, message: () => `not all rows transferred after the restart:\n${engine.output}` });
  await engine.stop();

  const [source] = await e.query<{ n: number; sum: string }>('sf', CHECKSUM);
  const [target] = await e.query<{ n: number; sum: string }>('chicago', CHECKSUM);
  assert.equal(source!.n, total);
  assert.deepEqual(target, source, 'chicago differs from sf');
  // Applied once: a replayed upsert or bookkeeping update would have raised dso_version again.
  const [chicagoVersions] = await e.query<{ min: string; max: string }>('chicago', 'SELECT min(dso_version)::text AS min, max(dso_version)::text AS max FROM repair_request');
  assert.deepEqual(chicagoVersions, { min: '1', max: '1' }, 'a row was applied twice on chicago');
  const [sfVersions] = await e.query<{ min: string; max: string }>('sf', 'SELECT min(dso_version)::text AS min, max(dso_version)::text AS max FROM repair_request');
  assert.deepEqual(sfVersions, { min: '2', max: '2' }, 'a source copy was marked twice (or never)');
  const [errors] = await e.query<{ n: number }>('sf', 'SELECT count(*)::int AS n FROM pgdso.pending_errors');
  assert.equal(errors!.n, 0);
});
