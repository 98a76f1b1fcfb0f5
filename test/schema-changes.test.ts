// Changes of the forms' schemas, and what a form's schema does to the stream: a replica
// identity that is no longer full (an update of a row with a large unchanged value cannot be
// carried whole: it must not be lost silently), a column added while the engine runs, a
// generated column on the target (not written, computed there), and one big transaction with a
// few rows the target refuses.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, until, settled } from './support/dso.ts';
import { count, errorsOn, queued, show } from './support/checks.ts';

const suite = dsoSuite(2);

test('replica identity reset to DEFAULT: an update beside a large unchanged value is not lost; it fails into pending_errors saying what \
to do, status and rules check show it, and after REPLICA IDENTITY FULL a retry carries it whole', {
  timeout: 90_000,
}, async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    config: { pending: { retry: { firstSeconds: 0.2, maxSeconds: 1 } } },
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only', whenToUpdate: 'immediately' })],
      filters: [filter('copy-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert', 'update'])],
    },
  });
  const engine = e.engine();
  const big = `(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 3200))`; // 102,400 bytes of hex
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('RI-1', 'chair', ${big})`);
  const [source] = await e.query<{ md5: string; len: number; toasted: boolean; compression: string | null }>(
    'sf',
    `SELECT md5(description), octet_length(description) AS len, pg_column_toast_chunk_id(description) IS NOT NULL AS toasted,
            pg_column_compression(description) AS compression
       FROM repair_request WHERE id = 'RI-1'`,
  );
  assert.deepEqual(
    [source!.len, source!.toasted, source!.compression],
    [102_400, true, null],
    'the description is stored out of line, not compressed',
  );
  const onChicago = async (id: string) =>
    (
      await e.query<{ status: string; md5: string | null }>(
        'chicago',
        'SELECT status, md5(description) FROM repair_request WHERE id = $1',
        [id],
      )
    )[0];
  await until(engine, 'RI-1 on chicago', async () => (await onChicago('RI-1'))?.md5 === source!.md5);

  // a DBA resets the replica identity, then a user changes a small column beside the large value
  await e.query('sf', 'ALTER TABLE repair_request REPLICA IDENTITY DEFAULT');
  await e.query('sf', `UPDATE repair_request SET status = 'open' WHERE id = 'RI-1'`);
  const failed = await until(
    engine,
    'the update of RI-1 recorded in pending_errors on sf',
    async () => (await errorsOn(e)).find((r) => r.request_id === 'RI-1'),
    15_000,
  );
  assert.match(failed!.error, /replica identity/i, failed!.error);
  assert.match(failed!.error, /REPLICA IDENTITY FULL|forms enable/, `the message says what to do: ${failed!.error}`);
  // the error is recorded before any target commits, the source copy's status in the batch's source transaction after
  await until(
    engine,
    'the transfer status of RI-1 on sf is failure',
    async () =>
      (await e.query<{ s: string }>('sf', `SELECT dso_transfer_status AS s FROM repair_request WHERE id = 'RI-1'`))[0]!.s === 'failure',
    15_000,
  );
  assert.equal((await onChicago('RI-1'))?.status, 'new', 'nothing half-applied on chicago');

  // the stream goes on
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('RI-2', 'lamp')`);
  await until(engine, 'RI-2 on chicago after the failure', async () => (await onChicago('RI-2')) !== undefined);

  // status and rules check name the form
  const status = await e.cli(['status', '--json']);
  const sf = (JSON.parse(status.stdout) as { servers: Record<string, { replicaIdentityNotFull?: unknown }> }).servers.sf!;
  assert.ok(
    Array.isArray(sf.replicaIdentityNotFull) && sf.replicaIdentityNotFull.includes('public.repair_request'),
    `status --json lists the form under sf: ${status.stdout}`,
  );
  const check = await e.cli(['rules', 'check']);
  assert.equal(check.code, 2, show(check));
  assert.match(check.stdout + check.stderr, /replica identity/i, show(check));

  // the fix, then a retry: the update arrives, and the large value is still whole on chicago
  await e.query('sf', 'ALTER TABLE repair_request REPLICA IDENTITY FULL');
  const retry = await e.cli(['pending', 'retry', '--server', 'sf', '--all']);
  assert.equal(retry.code, 0, show(retry));
  await until(engine, 'RI-1 open on chicago after the retry', async () => (await onChicago('RI-1'))?.status === 'open');
  assert.equal((await onChicago('RI-1'))?.md5, source!.md5, 'the large value is unchanged on chicago');
  await until(engine, 'the queue worked off', async () => (await queued(e)).length === 0);
  assert.deepEqual(await errorsOn(e), []);
  await engine.stop();
});

test('a column added to the form on both servers while the engine runs is carried from the next change on, without a restart', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data+ownership' })],
      filters: [filter('route-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert'])],
    },
  });
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('AC-1', 'chair')`);
  await until(engine, 'AC-1 on chicago', async () => (await count(e, 'chicago', `SELECT 1 FROM repair_request WHERE id = 'AC-1'`)) === 1);

  await e.query('chicago', 'ALTER TABLE repair_request ADD COLUMN priority int');
  await e.query('sf', 'ALTER TABLE repair_request ADD COLUMN priority int');
  await e.query('sf', `INSERT INTO repair_request (id, item, priority) VALUES ('AC-2', 'chair', 7)`);
  const arrived = await until(
    engine,
    'AC-2 on chicago',
    async () => (await e.query<{ priority: number | null }>('chicago', `SELECT priority FROM repair_request WHERE id = 'AC-2'`))[0],
  );
  assert.equal(arrived.priority, 7, `the new column is carried; engine output:\n${engine.output}`);
  // the source copy's bookkeeping follows the target's commit
  await until(
    engine,
    'AC-2 bookkept on sf',
    async () =>
      (await e.query<{ s: string }>('sf', `SELECT dso_transfer_status AS s FROM repair_request WHERE id = 'AC-2'`))[0]?.s === 'success',
  );
  assert.deepEqual(await errorsOn(e), []);
  assert.equal(engine.running, true);
  await engine.stop();
});

test('a generated column on the target is not written: chicago computes it, rules check says so, nothing fails and nothing \
queues', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: `${REPAIR_REQUEST_SQL}; CREATE TABLE work_order (id text PRIMARY KEY, item text)`,
    forms: [],
    rules: {
      mappings: [
        mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only' }),
        {
          name: 'sf-orders',
          from: { server: 'sf', form: 'work_order' },
          to: { server: 'chicago', form: 'work_order' },
          transferMode: 'data-only',
        },
      ],
      filters: [
        filter('copy-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert']),
        {
          name: 'copy-orders',
          on: { server: 'sf', form: 'work_order', ops: ['insert'] },
          actions: [{ type: 'transfer', mapping: 'sf-orders' }],
        },
      ],
    },
  });
  await e.query('sf', 'ALTER TABLE repair_request ADD COLUMN g int, ADD COLUMN a int');
  await e.query('chicago', 'ALTER TABLE repair_request ADD COLUMN a int, ADD COLUMN g int GENERATED ALWAYS AS (a * 2) STORED');
  for (const server of ['sf', 'chicago']) {
    for (const form of ['repair_request', 'work_order']) {
      const enabled = await e.cli(['forms', 'enable', '--server', server, '--form', form]);
      assert.equal(enabled.code, 0, show(enabled));
    }
  }
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, a, g) VALUES ('GC-1', 'chair', 5, 99), ('GC-2', 'lamp', 6, 99)`);
  await e.query('sf', `INSERT INTO work_order (id, item) VALUES ('WO-1', 'desk')`);
  const describe = async () =>
    `pending: ${JSON.stringify(await queued(e))}; errors: ${JSON.stringify(await errorsOn(e))}; engine output ` +
    `(end):\n${engine.output.slice(-4000)}`;
  const rows = await until(
    engine,
    'GC-1 and GC-2 on chicago',
    async () => {
      const found = await e.query<{ id: string; a: number; g: number }>('chicago', 'SELECT id, a, g FROM repair_request ORDER BY id');
      return found.length === 2 ? found : undefined;
    },
    15_000,
  ).catch(async (err: Error) => assert.fail(`${err.message.split(';')[0]}\n${await describe()}`));
  assert.deepEqual(
    rows,
    [
      { id: 'GC-1', a: 5, g: 10 },
      { id: 'GC-2', a: 6, g: 12 },
    ],
    'g computed by chicago',
  );
  await until(
    engine,
    'WO-1 on chicago',
    async () => (await count(e, 'chicago', `SELECT 1 FROM work_order WHERE id = 'WO-1'`)) === 1,
    10_000,
  );
  await e.query('sf', `INSERT INTO repair_request (id, item, a, g) VALUES ('GC-3', 'desk', 1, 1)`);
  await until(
    engine,
    'GC-3 on chicago promptly',
    async () => (await count(e, 'chicago', `SELECT 1 FROM repair_request WHERE id = 'GC-3' AND g = 2`)) === 1,
    10_000,
  );
  await settled(e, engine);
  assert.deepEqual(await errorsOn(e), [], await describe());
  assert.deepEqual(await queued(e), [], await describe());
  assert.deepEqual(
    (await e.query<{ s: string }>('sf', 'SELECT DISTINCT dso_transfer_status AS s FROM repair_request')).map((r) => r.s),
    ['success'],
  );
  await engine.stop();

  // rules check: fine (exit 0), and it tells that g is chicago's to compute
  const check = await e.cli(['rules', 'check']);
  assert.equal(check.code, 0, show(check));
  assert.match(
    check.stdout,
    /"?\bg\b"?.*generated.*chicago|chicago.*"?\bg\b"?.*generated|generated.*"?\bg\b"?.*chicago/i,
    `rules check says g is generated on chicago: ${show(check)}`,
  );
  assert.match(check.stdout, /not (be )?written|not carried|skipped|left out/i, `rules check says g is not written: ${show(check)}`);
});

test('one transaction of 200,000 rows with 3 the target refuses: the 199,997 others arrive in one engine session, exactly the 3 go to \
pending_errors and fail on the source', {
  timeout: 180_000,
}, async () => {
  const started = Date.now();
  // narrow rows: a short text key and item
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: 'CREATE TABLE repair_request (id text PRIMARY KEY, item text NOT NULL)',
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data+ownership' })],
      filters: [filter('route-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert'])],
    },
  });
  await e.query('chicago', `ALTER TABLE repair_request ADD CONSTRAINT no_bad_items CHECK (item <> 'bad')`);
  const engine = e.engine();
  const bad = ['B-50000', 'B-123457', 'B-199999'];
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item) SELECT 'B-' || g, CASE WHEN 'B-' || g = ANY($1) THEN 'bad' ELSE 'ok' END
      FROM generate_series(1, 200000) g`,
    [bad],
  );
  const loaded = Date.now();
  // (ends early when the engine's session fails: then the assertions below say how)
  await until(
    engine,
    'every source copy has a transfer status',
    async () =>
      /engine session failed/.test(engine.output) ||
      (await count(e, 'sf', 'SELECT 1 FROM repair_request WHERE dso_transfer_status IS NULL')) === 0,
    100_000,
  );
  const applied = Date.now();
  console.log(`200k rows, 3 refused: set up and loaded in ${loaded - started} ms, applied (or failed) in ${applied - loaded} ms`);
  assert.doesNotMatch(engine.output, /RangeError|Maximum call stack/);
  assert.doesNotMatch(engine.output, /engine session failed/);
  await settled(e, engine, ['sf']);
  assert.equal(await count(e, 'chicago', 'SELECT 1 FROM repair_request'), 199_997);
  assert.equal(await count(e, 'chicago', `SELECT 1 FROM repair_request WHERE item = 'bad'`), 0);
  const errors = await errorsOn(e);
  assert.deepEqual(
    errors.map((r) => [r.request_id, r.sqlstate]),
    [...bad].sort().map((id) => [id, '23514']),
  );
  assert.deepEqual(
    await e.query(
      'sf',
      `SELECT dso_transfer_status AS status, count(*)::int AS n,
              array_agg(id ORDER BY id) FILTER (WHERE dso_transfer_status <> 'success') AS ids
         FROM repair_request GROUP BY 1 ORDER BY 1`,
    ),
    [
      { status: 'failure', n: 3, ids: [...bad].sort() },
      { status: 'success', n: 199_997, ids: null },
    ],
  );
  assert.deepEqual(await queued(e), []);
  assert.doesNotMatch(engine.output, /RangeError|Maximum call stack|engine session failed/);
  assert.equal(engine.running, true);
  await engine.stop();
  console.log(`200k rows, 3 refused: test ${Date.now() - started} ms`);
});

test('a TRUNCATE that gets past the guard (dropped by hand) is not silent: each server the form has copies on gets a pending_errors row \
saying they were not deleted; the stream goes on', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only' })],
      filters: [filter('copy-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert'])],
    },
  });
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('TR-1', 'chair'), ('TR-2', 'desk')`);
  await until(engine, 'TR-1 and TR-2 on chicago', async () => (await count(e, 'chicago', 'SELECT 1 FROM repair_request')) === 2);
  await e.query('sf', 'DROP TRIGGER pgdso_truncate ON repair_request');
  await e.query('sf', 'TRUNCATE repair_request');
  const recorded = await until(engine, 'the TRUNCATE recorded on sf', async () => {
    const rows = await e.query<{ request_id: string; type: string; target_server: string; error: string }>(
      'sf',
      'SELECT request_id, type, target_server, error FROM pgdso.pending_errors',
    );
    return rows.length === 1 ? rows[0] : undefined;
  });
  assert.deepEqual([recorded!.request_id, recorded!.type, recorded!.target_server], ['*', 'delete', 'chicago']);
  assert.match(
    recorded!.error,
    /TRUNCATE of public\.repair_request on sf: pgdso does not carry TRUNCATE; copies of its requests on chicago .* were not deleted/,
  );
  assert.equal(await count(e, 'chicago', 'SELECT 1 FROM repair_request'), 2, 'the copies stay (and the error says so)');
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('TR-3', 'lamp')`);
  await until(
    engine,
    'TR-3 on chicago after the TRUNCATE',
    async () => (await count(e, 'chicago', `SELECT 1 FROM repair_request WHERE id = 'TR-3'`)) === 1,
  );
  assert.equal(await engine.stop(), 0);
});
