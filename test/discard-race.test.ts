// `pgdso pending discard --queued` and the engine's delivery of the same queued operation: the
// discard waits for a chunk in delivery, so what it reports dropped never reaches the target and
// an operation that was delivered is not reported dropped.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, until } from './support/dso.ts';
import { restartSkipReason } from './support/servers.ts';
import { within } from './support/wait.ts';
import { LOCK_NAMESPACE, LOCKS } from '../src/sql/identifiers.ts';

const suite = dsoSuite(2);

test('discard --queued of an operation being delivered waits for the delivery, then finds nothing to drop', {
  skip: restartSkipReason(),
  timeout: 90_000,
}, async (t) => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    placement: { sf: 0, chicago: 1 },
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
      filters: [filter('all', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert'])],
    },
    config: { pending: { retry: { firstSeconds: 0.2, maxSeconds: 0.5 } } },
  });
  const chicago = suite.clusters[1]!;
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('R-0', 'desk')`);
  await until(
    engine,
    'R-0 did not reach chicago',
    async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'R-0'`)).length === 1,
  );

  await within(chicago.stop(), 30_000, () => 'chicago did not stop');
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('R-1', 'chair')`);
  const [queued] = (await until(engine, 'R-1 was not queued for chicago', async () => {
    const rows = await e.query<{ id: string }>('sf', `SELECT id::text FROM pgdso.pending WHERE request_id = 'R-1'`);
    return rows.length ? rows : undefined;
  }))!;

  // a chunk in delivery, held: this test takes the delivery lock before chicago comes back
  const holder = new pg.Client({ connectionString: e.urls.sf });
  await holder.connect();
  t.after(() => holder.end());
  await holder.query('SELECT pg_advisory_lock($1, $2)', [LOCK_NAMESPACE, LOCKS.queueDelivery]);
  await within(chicago.start(), 30_000, () => 'chicago did not start again');
  // the backends waiting for the delivery lock itself (classid, objid: the two keys of the lock)
  const deliveryWaiters = async () =>
    (
      await e.query<{ n: number }>(
        'sf',
        `SELECT count(*)::int AS n FROM pg_locks l JOIN pg_database d ON d.oid = l.database
          WHERE d.datname = current_database() AND l.locktype = 'advisory' AND NOT l.granted
            AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 2`,
        [LOCK_NAMESPACE, LOCKS.queueDelivery],
      )
    )[0]!.n;
  await until(engine, 'the engine did not come to deliver R-1', async () => (await deliveryWaiters()) === 1);
  const discard = e.cli(['pending', 'discard', '--queued', '--server', 'sf', '--id', queued!.id]);
  await until(engine, 'pending discard --queued did not wait for the delivery', async () => (await deliveryWaiters()) === 2);
  await holder.query('SELECT pg_advisory_unlock($1, $2)', [LOCK_NAMESPACE, LOCKS.queueDelivery]);

  const result = await within(discard, 30_000, () => `pending discard --queued did not end; engine output:\n${engine.output}`);
  // the engine was first: R-1 reached chicago, and the discard found nothing queued to drop
  assert.equal(result.code, 1, `${result.stdout}${result.stderr}`);
  assert.match(result.stdout, /^sf: 0 queued operations dropped$/m);
  assert.match(result.stderr, new RegExp(`no queued operation #${queued!.id}`));
  await until(
    engine,
    'R-1 did not reach chicago',
    async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'R-1'`)).length === 1,
  );
  assert.deepEqual(await e.query('sf', 'SELECT id FROM pgdso.pending'), []);
  assert.equal(await within(engine.stop(), 30_000, () => `the engine did not stop; output:\n${engine.output}`), 0);
});
