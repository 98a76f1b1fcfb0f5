// `pgdso sync --mapping M`: the requests that existed before any rule moved them are carried by
// the mapping's transfer, while the stream runs and the application keeps writing: every request
// ends on the target with its latest value, inserted there once. Bad usage is exit 2.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { REPAIR_REQUEST_SQL, dsoSuite, mapping, settled, until, WRITE_LOG_SQL } from './support/dso.ts';

const suite = dsoSuite(2);

const ROWS = 10_000;
const show = (r: { code: number | null; stdout: string; stderr: string }) =>
  `exit ${r.code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;

test(`sync carries ${ROWS} existing requests while users keep updating them: each ends on chicago with its latest value, inserted once; \
running it again carries nothing twice`, { timeout: 240_000 }, async (t) => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: `${REPAIR_REQUEST_SQL}; ${WRITE_LOG_SQL}`,
    forms: ['repair_request'],
    rules: { mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only' })] },
    config: { pending: { heartbeatSeconds: 1 } },
  });
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, description) SELECT 'S-' || lpad(g::text, 6, '0'), 'chair', 'v0' FROM generate_series(1, $1) g`,
    [ROWS],
  );
  const engine = e.engine();
  // online before the sync ends (else it leaves the requests to a later engine and returns)
  await until(
    engine,
    'the engine of sf online on its board',
    async () => (await e.query('sf', `SELECT 1 FROM pgdso.servgrp_board WHERE state = 'online'`)).length > 0,
  );
  // the users: small transactions that update random requests, for as long as the sync runs
  let writing = true;
  let updates = 0;
  let deadlocks = 0;
  const users = Array.from({ length: 2 }, async () => {
    while (writing) {
      try {
        await e.query(
          'sf',
          `UPDATE repair_request SET description = 'v' || (floor(random() * 1e6))::int
            WHERE id IN (SELECT 'S-' || lpad((1 + floor(random() * $1))::int::text, 6, '0') FROM generate_series(1, 5))`,
          [ROWS],
        );
        updates += 1;
      } catch (err) {
        // as an application would: a deadlock with the scan's row locks, or with the other user, is tried again
        if ((err as { code?: string }).code !== '40P01') throw err;
        deadlocks += 1;
      }
    }
  });
  const r = await e.cli(['sync', '--mapping', 'sf-to-chicago', '--batch', '500']);
  writing = false;
  await Promise.all(users);
  assert.equal(r.code, 0, show(r));
  assert.match(r.stdout, new RegExp(`${ROWS} of ${ROWS} requests handed to the engine of sf`), show(r));
  assert.match(r.stdout, /carried to chicago by the engine of sf/, show(r));
  assert.ok(updates > 20, `the users made only ${updates} updates during the sync`);
  t.diagnostic(`${updates} user updates during the sync (${deadlocks} deadlocks, tried again)`);
  await settled(e, engine);

  const source = await e.query<{ id: string; description: string }>('sf', 'SELECT id, description FROM repair_request ORDER BY id');
  const target = await e.query<{ id: string; description: string }>('chicago', 'SELECT id, description FROM repair_request ORDER BY id');
  assert.equal(target.length, ROWS, 'every request is on chicago');
  const stale = source.filter((s, i) => target[i]?.id !== s.id || target[i]?.description !== s.description);
  assert.deepEqual(stale.slice(0, 5), [], `${stale.length} requests differ between sf and chicago`);
  const inserted = await e.query<{ n: string; ids: string }>(
    'chicago',
    `SELECT count(*)::text AS n, count(DISTINCT id)::text AS ids FROM write_log WHERE op = 'INSERT'`,
  );
  assert.deepEqual(inserted[0], { n: String(ROWS), ids: String(ROWS) }, 'each request inserted once on chicago');

  // again: every request is on chicago already; it is updated in place, never inserted again
  const again = await e.cli(['sync', '--mapping', 'sf-to-chicago']);
  assert.equal(again.code, 0, show(again));
  await settled(e, engine);
  const after = await e.query<{ n: string }>('chicago', `SELECT count(*)::text AS n FROM write_log WHERE op = 'INSERT'`);
  assert.equal(after[0]!.n, String(ROWS), 'a second sync inserted nothing');
  const runs = await e.query<{ state: string; scanned: string }>('sf', `SELECT state, scanned::text FROM pgdso.scan_runs ORDER BY id`);
  assert.deepEqual(
    runs.map((x) => [x.state, x.scanned]),
    [
      ['done', String(ROWS)],
      ['done', String(ROWS)],
    ],
  );
  await engine.stop();
});

test('sync: an unknown mapping, a --where that is not JSON or not conditions, and a bad --batch are exit 2', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [mapping('sf-to-chicago', 'sf', 'chicago')] },
  });
  for (const [args, reason] of [
    [['--mapping', 'nope'], /no mapping "nope" in the rules \(known: sf-to-chicago\)/],
    [['--mapping', 'sf-to-chicago', '--where', '{site:'], /--where is not JSON/],
    [['--mapping', 'sf-to-chicago', '--where', '{"any": 3}'], /--where/],
    [['--mapping', 'sf-to-chicago', '--batch', '0'], /--batch takes a whole number/],
  ] as const) {
    const r = await e.cli(['sync', ...args]);
    assert.equal(r.code, 2, `${args.join(' ')}\n${show(r)}`);
    assert.match(r.stderr, reason, show(r));
  }
  const runs = await e.query('sf', 'SELECT * FROM pgdso.scan_runs');
  assert.equal(runs.length, 0, 'bad usage records no run');
});
