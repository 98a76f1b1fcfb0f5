// A peer that is down for the length of a load: its operations wait in sf's pgdso.pending, the
// other peer gets everything meanwhile, sf's slot moves on, and once the peer is back every row
// arrives, in order per request, exactly once. The engine is also killed (-9) while the peer is
// down: operations queued in the replay are settled by the lane's committed position.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dsoSuite, mapping, filter, until, settled } from '../support/dso.ts';
import { restartSkipReason } from '../support/servers.ts';

const suite = dsoSuite(2);

const SCHEMA = `
CREATE TABLE repair_request (
  id text PRIMARY KEY,
  item text NOT NULL,
  status text NOT NULL DEFAULT 'new',
  seq int NOT NULL DEFAULT 0,
  description text
);
-- what the engine applied, in the order it applied it (on the peers)
CREATE TABLE applied (n bigserial PRIMARY KEY, id text NOT NULL, seq int NOT NULL);
CREATE FUNCTION log_applied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO applied (id, seq) VALUES (NEW.id, NEW.seq);
  RETURN NEW;
END $$;
CREATE TRIGGER log_applied AFTER INSERT OR UPDATE ON repair_request FOR EACH ROW EXECUTE FUNCTION log_applied();
ALTER TABLE repair_request ENABLE ALWAYS TRIGGER log_applied;
`;

const CHECKSUM = `SELECT count(*)::int AS n, md5(coalesce(string_agg(id || ':' || item || ':' || status || ':' || seq
  || ':' || coalesce(description, ''), ',' ORDER BY id), '')) AS sum FROM repair_request`;

const REQUESTS = 12_000;
const ROUNDS = 4;

test('a peer stopped for the length of a load: the other peer gets everything meanwhile, the source slot moves on, then every row \
arrives in order per request, exactly once', {
  skip: restartSkipReason(),
  timeout: 240_000,
}, async (t) => {
  const e = await suite.env({
    servers: ['sf', 'tokyo', 'chicago'],
    placement: { sf: 0, tokyo: 0, chicago: 1 },
    schemaSql: SCHEMA,
    forms: ['repair_request'],
    config: { pending: { retry: { firstSeconds: 0.2, maxSeconds: 1 }, heartbeatSeconds: 1 } },
    rules: {
      mappings: [
        mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only' }),
        mapping('sf-to-tokyo', 'sf', 'tokyo', { transferMode: 'data-only' }),
      ],
      filters: [
        filter('everywhere', 'sf', null, [
          { type: 'transfer', mapping: 'sf-to-chicago' },
          { type: 'transfer', mapping: 'sf-to-tokyo' },
        ]),
        filter(
          'deleted-everywhere',
          'sf',
          null,
          [
            { type: 'delete', mapping: 'sf-to-chicago' },
            { type: 'delete', mapping: 'sf-to-tokyo' },
          ],
          ['delete'],
        ),
      ],
    },
  });
  const chicagoCluster = suite.clusters[1]!;
  let engine = e.engine(['--server', 'sf']);
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('warm-up', 'desk')`);
  await until(
    engine,
    'the warm-up row did not reach chicago',
    async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'warm-up'`)).length === 1,
  );
  const [slotBefore] = await e.query<{ lsn: string }>(
    'sf',
    `SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE database = current_database()`,
  );

  const t0 = Date.now();
  const phase = (name: string) => t.diagnostic(`${name}: ${Date.now() - t0} ms`);
  await chicagoCluster.stop();
  phase('chicago stopped');
  let stopped = true;
  try {
    // the load: requests inserted in transactions of 2000, then updated in rounds (seq rises)
    for (let from = 1; from <= REQUESTS; from += 2000) {
      await e.query(
        'sf',
        `INSERT INTO repair_request (id, item, seq) SELECT 'R-' || g, 'chair', 1 FROM generate_series($1::int, $2::int) g`,
        [from, from + 1999],
      );
    }
    for (let round = 2; round <= ROUNDS + 1; round++) {
      await e.query(
        'sf',
        `UPDATE repair_request SET seq = $1::int, status = 'round ' || $1::text, description = 'update ' || $1::text
          WHERE id LIKE 'R-%' AND (substr(id, 3)::int % $2) = 0`,
        [round, round - 1],
      );
      if (round === 3) {
        // the engine dies while the peer is down; operations queued by the replay are settled by the lane's position later
        await engine.kill9();
        engine = e.engine(['--server', 'sf']);
      }
    }
    await e.query('sf', `DELETE FROM repair_request WHERE id IN ('R-7', 'R-8')`);

    phase('load done');
    // tokyo has everything while chicago is down
    const [sfSum] = await e.query<{ n: number; sum: string }>('sf', CHECKSUM);
    await until(
      engine,
      'tokyo did not receive the load while chicago was down',
      async () => {
        const [tokyo] = await e.query<{ n: number; sum: string }>('tokyo', CHECKSUM);
        return tokyo?.sum === sfSum?.sum && tokyo.n === sfSum.n;
      },
      120_000,
    );
    phase('tokyo has everything');
    // and sf's slot confirmed the whole load: nothing waits in sf's WAL for chicago
    await settled(e, engine, ['sf']);
    const [slotAfter] = await e.query<{ moved: boolean }>(
      'sf',
      `SELECT confirmed_flush_lsn > $1::pg_lsn AS moved FROM pg_replication_slots WHERE database = current_database()`,
      [slotBefore!.lsn],
    );
    assert.equal(slotAfter?.moved, true, "sf's slot did not advance while chicago was down");
    const [queued] = await e.query<{ n: number }>('sf', `SELECT count(*)::int AS n FROM pgdso.pending WHERE target_server = 'chicago'`);
    assert.ok(queued!.n > 0, 'nothing waits in pgdso.pending for chicago');
    // one transfer per request (the superseded ones coalesced), and the two deletes behind theirs
    assert.ok(queued!.n <= REQUESTS + 2, `superseded operations coalesce: ${queued!.n} queued for ${REQUESTS} requests`);
    const [waiting] = await e.query<{ n: number }>(
      'sf',
      `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status = 'retry'`,
    );
    assert.ok(waiting!.n > 0, "no source copy shows dso_transfer_status 'retry'");
    // pgdso status shows the queue and the peer sf cannot reach, with no password
    const status = await e.cli(['status', '--json']);
    const sf = JSON.parse(status.stdout).servers.sf;
    assert.ok(sf.pending >= queued!.n - 1 && sf.pendingErrors === 0 && sf.retainedWalBytes >= 0, status.stdout);
    assert.deepEqual(
      sf.unreachable.map((u: { server: string }) => u.server),
      ['chicago'],
      status.stdout,
    );
    assert.equal(status.code, 1, 'chicago itself is unreachable: status exits 1');
    t.diagnostic(`while chicago was down: ${queued!.n} operations queued for ${REQUESTS} requests × ${ROUNDS + 1} changes`);
    phase('checked');
    // the engine stops before chicago is back: its operations stay queued
    assert.equal(await engine.stop(), 0);
    await chicagoCluster.start();
    stopped = false;
  } finally {
    if (stopped) await chicagoCluster.start();
  }

  // While the engine is stopped, chicago comes back and requests with queued operations are
  // deleted and created again with new values: at the engine's start those changes queue behind
  // the queued transfers (a transfer, a delete, a transfer: nothing to coalesce). Sent straight
  // to chicago they would be overtaken by the older queued transfer. They are the last requests
  // of the queue, so their changes are read while the first chunks are being delivered.
  await e.query('sf', `DELETE FROM repair_request WHERE id LIKE 'R-%' AND substr(id, 3)::int > $1::int - 600`, [REQUESTS]);
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, seq, status, description)
     SELECT 'R-' || g, 'chair', $1::int, 'reborn', 'created again' FROM generate_series($2::int - 599, $2::int - 300) g`,
    [ROUNDS + 2, REQUESTS],
  );
  await e.query(
    'sf',
    `UPDATE repair_request SET seq = $1::int, status = 'back' WHERE id LIKE 'R-%' AND substr(id, 3)::int BETWEEN 1 AND 300`,
    [ROUNDS + 2],
  );
  engine = e.engine(['--server', 'sf']);
  phase('engine restarted');
  // chicago is back: everything arrives
  const [sfSum] = await e.query<{ n: number; sum: string }>('sf', CHECKSUM);
  await until(
    engine,
    'chicago did not receive the queued operations once back',
    async () => {
      const [chicago] = await e.query<{ n: number; sum: string }>('chicago', CHECKSUM);
      return chicago?.sum === sfSum?.sum && chicago.n === sfSum.n;
    },
    120_000,
  );
  phase('chicago has everything');
  await until(
    engine,
    'pgdso.pending did not empty',
    async () => (await e.query<{ n: number }>('sf', `SELECT count(*)::int AS n FROM pgdso.pending`))[0]?.n === 0,
  );
  assert.deepEqual(await e.query('sf', `SELECT id, error FROM pgdso.pending_errors`), []);
  // in order per request: each request's applied seq only rises on chicago
  const disorder = await e.query(
    'chicago',
    `SELECT id, n, seq, prev FROM (SELECT id, n, seq, lag(seq) OVER (PARTITION BY id ORDER BY n) AS prev
      FROM applied) a WHERE prev > seq LIMIT 5`,
  );
  assert.deepEqual(disorder, [], 'a request applied out of order on chicago');
  // the bookkeeping of delivered operations: every source copy records its transfer
  await until(
    engine,
    'source copies still wait',
    async () =>
      (
        await e.query<{ n: number }>(
          'sf',
          `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status IS DISTINCT FROM 'success'`,
        )
      )[0]?.n === 0,
  );
  const [applied] = await e.query<{ n: number }>('chicago', `SELECT count(*)::int AS n FROM applied`);
  t.diagnostic(`chicago applied ${applied!.n} writes for ${REQUESTS + 1} requests`);
  await engine.stop();
});
