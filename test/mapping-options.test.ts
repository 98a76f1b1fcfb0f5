// The mapping options of the contract, each shown by what it changes: duplicateRequestId (error,
// new-id, overwrite), match by fields, conflict (source-wins, target-wins, newer-wins, and no
// conflict without a local change), whenToUpdate (never, on-return) and pool (lanes in
// parallel). Each test fails if its option were ignored (treated as its default).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, type DsoEnv, type EngineProcess, until, settled } from './support/dso.ts';

const suite = dsoSuite(2);
const SERVERS = ['sf', 'chicago'];

function env(rules: Record<string, unknown>, schemaSql = REPAIR_REQUEST_SQL, forms = ['repair_request']): Promise<DsoEnv> {
  return suite.env({ servers: SERVERS, schemaSql, forms, rules });
}

type Copy = Record<string, unknown> & {
  id: string;
  item: string;
  status: string;
  description: string | null;
  dso_master: boolean;
  dso_transfer_status: string | null;
  dso_current_server: string | null;
  dso_from_server: string | null;
  dso_from_request_id: string | null;
  dso_to_request_id: string | null;
};

interface Conflict {
  mapping: string;
  form: string;
  request_id: string;
  local: Record<string, unknown>;
  incoming: Record<string, unknown>;
  resolution: string;
  policy: string;
  from_server: string;
}

interface PendingError {
  mapping: string;
  request_id: string;
  type: string;
  error: string;
  target_server: string;
}

async function copyOf(e: DsoEnv, server: string, id: string): Promise<Copy | undefined> {
  return (await e.query<Copy>(server, 'SELECT * FROM repair_request WHERE id = $1', [id]))[0];
}

async function copies(e: DsoEnv, server: string): Promise<Copy[]> {
  return e.query<Copy>(server, 'SELECT * FROM repair_request ORDER BY id');
}

async function conflicts(e: DsoEnv, server: string): Promise<Conflict[]> {
  return e.query<Conflict>(
    server,
    'SELECT mapping, form, request_id, local, incoming, resolution, policy, from_server FROM pgdso.conflicts ORDER BY id',
  );
}

async function pendingErrors(e: DsoEnv, server: string): Promise<PendingError[]> {
  return e.query<PendingError>(server, 'SELECT * FROM pgdso.pending_errors ORDER BY id');
}

const routeChairs = (mappingName: string, ops = ['insert', 'update']) =>
  filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: mappingName }], ops);

// ---- duplicateRequestId ------------------------------------------------------------------------

test('duplicateRequestId error: a different request holding the ID on the target sends the transfer to pending_errors naming both; the \
source stays master', async () => {
  const e = await env({
    mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { duplicateRequestId: 'error' })],
    filters: [routeChairs('sf-to-chicago')],
  });
  await e.query('chicago', `INSERT INTO repair_request (id, item, description) VALUES ('DUP-1', 'lamp', 'chicago''s own request')`);
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('DUP-1', 'chair', 'from sf')`);
  await until(
    engine,
    'the transfer of DUP-1 did not fail',
    async () => (await copyOf(e, 'sf', 'DUP-1'))?.dso_transfer_status === 'failure',
  );

  const errors = await pendingErrors(e, 'sf');
  assert.deepEqual(
    errors.map((r) => [r.mapping, r.type, r.request_id, r.target_server]),
    [['sf-to-chicago', 'transfer', 'DUP-1', 'chicago']],
  );
  assert.match(
    errors[0]!.error,
    /already holds request ID DUP-1 for request chicago:DUP-1, a different request from the incoming sf:DUP-1/,
  );
  const source = (await copyOf(e, 'sf', 'DUP-1'))!;
  assert.deepEqual([source.dso_master, source.dso_transfer_status], [true, 'failure']);
  const target = await copies(e, 'chicago');
  assert.deepEqual(
    target.map((r) => [r.id, r.item, r.description, r.dso_master, r.dso_from_server]),
    [['DUP-1', 'lamp', "chicago's own request", true, null]],
    "chicago's request is untouched",
  );
  await engine.stop();
});

test('duplicateRequestId new-id: the incoming request takes a new ID from the target key default; later changes of the source update \
that copy', async () => {
  const schema = `CREATE SEQUENCE chi_request_seq;
    ${REPAIR_REQUEST_SQL.replace('id text PRIMARY KEY', `id text PRIMARY KEY DEFAULT ('CHI-' || nextval('chi_request_seq'))`)}`;
  assert.notEqual(schema, REPAIR_REQUEST_SQL);
  const e = await env(
    {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only', duplicateRequestId: 'new-id' })],
      filters: [routeChairs('sf-to-chicago', ['insert'])],
    },
    schema,
  );
  await e.query('chicago', `INSERT INTO repair_request (id, item, description) VALUES ('N-1', 'lamp', 'chicago''s own request')`);
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('N-1', 'chair', 'from sf')`);
  await until(engine, 'the sf copy did not learn its new ID on chicago', async () =>
    (await copyOf(e, 'sf', 'N-1'))?.dso_to_request_id?.startsWith('CHI-'),
  );

  const [own, copy, ...more] = await e.query<Copy>('chicago', `SELECT * FROM repair_request ORDER BY id = 'N-1' DESC, id`);
  assert.equal(more.length, 0, 'two rows on chicago');
  assert.deepEqual(
    [own!.id, own!.item, own!.description, own!.dso_master, own!.dso_from_server],
    ['N-1', 'lamp', "chicago's own request", true, null],
    "chicago's request is untouched",
  );
  assert.match(copy!.id, /^CHI-\d+$/);
  assert.deepEqual(
    [copy!.item, copy!.description, copy!.dso_from_server, copy!.dso_from_request_id, copy!.dso_master],
    ['chair', 'from sf', 'sf', 'N-1', false],
  );
  const source = (await copyOf(e, 'sf', 'N-1'))!;
  assert.deepEqual([source.dso_to_request_id, source.dso_master, source.dso_transfer_status], [copy!.id, true, 'success']);
  assert.deepEqual(await pendingErrors(e, 'sf'), []);

  // the source (still master: data-only) changes: the change reaches the copy with the new ID
  await e.query('sf', `UPDATE repair_request SET description = 'changed at sf' WHERE id = 'N-1'`);
  await until(
    engine,
    'the change did not reach the new-id copy',
    async () => (await copyOf(e, 'chicago', copy!.id))?.description === 'changed at sf',
  );
  const after = await copies(e, 'chicago');
  assert.equal(after.length, 2, 'no third row');
  assert.deepEqual(
    [after.find((r) => r.id === 'N-1')?.item, after.find((r) => r.id === 'N-1')?.description],
    ['lamp', "chicago's own request"],
  );
  await engine.stop();
});

test('duplicateRequestId overwrite: the different request on the target is overwritten with the mapped fields, and the conflict is \
logged', async () => {
  const e = await env({
    mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { duplicateRequestId: 'overwrite' })],
    filters: [routeChairs('sf-to-chicago')],
  });
  await e.query(
    'chicago',
    `INSERT INTO repair_request (id, item, description, internal_note) VALUES ('O-1', 'lamp', 'chicago''s own request', 'chicago note')`,
  );
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, description, internal_note) VALUES ('O-1', 'chair', 'from sf', 'sf note')`);
  await until(engine, 'the request on chicago was not overwritten', async () => (await copyOf(e, 'chicago', 'O-1'))?.item === 'chair');

  const target = await copies(e, 'chicago');
  assert.equal(target.length, 1);
  assert.deepEqual(
    [target[0]!.description, target[0]!.internal_note, target[0]!.dso_from_server, target[0]!.dso_from_request_id, target[0]!.dso_master],
    ['from sf', 'sf note', 'sf', 'O-1', true],
  );
  const logged = await conflicts(e, 'chicago');
  assert.equal(logged.length, 1);
  const [c] = logged;
  assert.deepEqual(
    [c!.mapping, c!.request_id, c!.resolution, c!.policy, c!.from_server],
    ['sf-to-chicago', 'O-1', 'applied-incoming', 'source-wins', 'sf'],
  );
  assert.match(c!.form, /repair_request$/);
  assert.deepEqual(
    [c!.local.id, c!.local.item, c!.local.description, c!.local.internal_note],
    ['O-1', 'lamp', "chicago's own request", 'chicago note'],
    'local: the old target row',
  );
  assert.deepEqual([c!.incoming.item, c!.incoming.description], ['chair', 'from sf']);
  await until(
    engine,
    'the sf copy did not record the transfer',
    async () => (await copyOf(e, 'sf', 'O-1'))?.dso_transfer_status === 'success',
  );
  assert.equal((await copyOf(e, 'sf', 'O-1'))!.dso_master, false);
  assert.deepEqual(await pendingErrors(e, 'sf'), []);
  await engine.stop();
});

// ---- match -------------------------------------------------------------------------------------

test('match by fields: a target row with another ID but the same site and item is updated instead of a new row being \
inserted', async () => {
  const e = await env({
    mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { match: { fields: ['site', 'item'] } })],
    filters: [filter('route-all', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }])],
  });
  await e.query(
    'chicago',
    `INSERT INTO repair_request (id, item, site, description)
      VALUES ('LOCAL-7', 'desk', 'oakland', 'chicago''s entry'), ('LOCAL-8', 'desk', 'berkeley', 'other site')`,
  );
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, site, description) VALUES ('M-1', 'desk', 'oakland', 'from sf')`);
  await until(engine, 'the transfer of M-1 did not complete', async () => (await copyOf(e, 'sf', 'M-1'))?.dso_transfer_status);

  const target = await copies(e, 'chicago');
  assert.deepEqual(
    target.map((r) => r.id),
    ['LOCAL-7', 'LOCAL-8'],
    'no new row on chicago',
  );
  const [matched, other] = target;
  assert.deepEqual(
    [matched!.description, matched!.dso_from_server, matched!.dso_from_request_id],
    ['from sf', 'sf', 'M-1'],
    'the row with the same site and item was updated',
  );
  assert.deepEqual([other!.description, other!.dso_from_server], ['other site', null], 'a row with only the same item is untouched');
  assert.equal((await copyOf(e, 'sf', 'M-1'))!.dso_transfer_status, 'success');
  assert.deepEqual(await pendingErrors(e, 'sf'), []);
  await engine.stop();
});

test('match by fields: a request transferred on a later change (not its insert) also finds the target row by the fields', async () => {
  const e = await env({
    mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { match: { fields: ['site', 'item'] } })],
    filters: [filter('route-ready', 'sf', { all: [is('status', 'ready')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }])],
  });
  await e.query(
    'chicago',
    `INSERT INTO repair_request (id, item, site, description) VALUES ('LOCAL-7', 'desk', 'oakland', 'chicago''s entry')`,
  );
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, site, description) VALUES ('M-2', 'desk', 'oakland', 'from sf')`);
  await e.query('sf', `UPDATE repair_request SET status = 'ready' WHERE id = 'M-2'`);
  await until(engine, 'the transfer of M-2 did not complete', async () => (await copyOf(e, 'sf', 'M-2'))?.dso_transfer_status);

  const target = await copies(e, 'chicago');
  assert.deepEqual(
    target.map((r) => r.id),
    ['LOCAL-7'],
    'no new row on chicago',
  );
  assert.deepEqual(
    [target[0]!.description, target[0]!.status, target[0]!.dso_from_server, target[0]!.dso_from_request_id],
    ['from sf', 'ready', 'sf', 'M-2'],
  );
  assert.equal((await copyOf(e, 'sf', 'M-2'))!.dso_transfer_status, 'success');
  assert.deepEqual(await pendingErrors(e, 'sf'), []);
  await engine.stop();
});

// ---- conflict ----------------------------------------------------------------------------------

/** Independent copies of chairs, sent again on every change at sf, with the given conflict policy. */
function independentCopies(conflict: string): Promise<DsoEnv> {
  return env({
    mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'independent-copy', conflict })],
    filters: [routeChairs('sf-to-chicago')],
  });
}

async function copyAtChicago(e: DsoEnv, engine: EngineProcess, ids: string[]): Promise<void> {
  await e.query('sf', `INSERT INTO repair_request (id, item, description) SELECT unnest($1::text[]), 'chair', 'from sf'`, [ids]);
  await until(engine, 'the copies did not reach chicago', async () => {
    const rows = await e.query<{ n: number }>('chicago', `SELECT count(*)::int AS n FROM repair_request WHERE id = ANY ($1)`, [ids]);
    const done = await e.query<{ n: number }>(
      'sf',
      `SELECT count(*)::int AS n FROM repair_request WHERE id = ANY ($1) AND dso_transfer_status = 'success'`,
      [ids],
    );
    return rows[0]!.n === ids.length && done[0]!.n === ids.length;
  });
}

test('conflict source-wins: a copy changed locally takes the source values on the next transfer, and the conflict is logged', async () => {
  const e = await independentCopies('source-wins');
  const engine = e.engine();
  await copyAtChicago(e, engine, ['S-1']);
  await e.query('chicago', `UPDATE repair_request SET description = 'changed at chicago' WHERE id = 'S-1'`);
  await e.query('sf', `UPDATE repair_request SET description = 'changed at sf' WHERE id = 'S-1'`);
  await until(engine, 'the conflict was not logged', async () => (await conflicts(e, 'chicago')).length > 0);

  assert.equal((await copyOf(e, 'chicago', 'S-1'))!.description, 'changed at sf');
  const logged = await conflicts(e, 'chicago');
  assert.deepEqual(
    logged.map((c) => [c.mapping, c.request_id, c.resolution, c.policy, c.from_server]),
    [['sf-to-chicago', 'S-1', 'applied-incoming', 'source-wins', 'sf']],
  );
  assert.equal(logged[0]!.local.description, 'changed at chicago');
  assert.equal(logged[0]!.incoming.description, 'changed at sf');
  await engine.stop();
});

test('conflict target-wins: a copy changed locally keeps its values, the conflict is logged, and the transfer counts as a \
success', async () => {
  const e = await independentCopies('target-wins');
  const engine = e.engine();
  await copyAtChicago(e, engine, ['T-1']);
  await e.query('chicago', `UPDATE repair_request SET description = 'changed at chicago' WHERE id = 'T-1'`);
  await e.query('sf', `UPDATE repair_request SET description = 'changed at sf' WHERE id = 'T-1'`);
  await until(engine, 'the conflict was not logged', async () => (await conflicts(e, 'chicago')).length > 0);
  await settled(e, engine);

  assert.equal((await copyOf(e, 'chicago', 'T-1'))!.description, 'changed at chicago');
  const logged = await conflicts(e, 'chicago');
  assert.deepEqual(
    logged.map((c) => [c.mapping, c.request_id, c.resolution, c.policy, c.from_server]),
    [['sf-to-chicago', 'T-1', 'kept-local', 'target-wins', 'sf']],
  );
  assert.equal(logged[0]!.local.description, 'changed at chicago');
  assert.equal(logged[0]!.incoming.description, 'changed at sf');
  const source = (await copyOf(e, 'sf', 'T-1'))!;
  assert.deepEqual([source.description, source.dso_master, source.dso_transfer_status], ['changed at sf', true, 'success']);
  assert.deepEqual(await pendingErrors(e, 'sf'), []);
  await engine.stop();
});

test('conflict newer-wins: a local change newer than the source change is kept; an older one is overwritten', async () => {
  const e = await independentCopies('newer-wins');
  const engine = e.engine();
  await copyAtChicago(e, engine, ['NW-LOCAL', 'NW-SOURCE']);
  await settled(e, engine);
  await engine.stop();
  // engine stopped: NW-LOCAL changes at sf, then at chicago (the local change is newer);
  // NW-SOURCE changes at chicago, then at sf (the source change is newer)
  await e.query('sf', `UPDATE repair_request SET description = 'changed at sf' WHERE id = 'NW-LOCAL'`);
  await e.query('chicago', `UPDATE repair_request SET description = 'changed at chicago' WHERE id = 'NW-LOCAL'`);
  await e.query('chicago', `UPDATE repair_request SET description = 'changed at chicago' WHERE id = 'NW-SOURCE'`);
  await e.query('sf', `UPDATE repair_request SET description = 'changed at sf' WHERE id = 'NW-SOURCE'`);
  const again = e.engine();
  await until(again, 'the conflicts were not logged', async () => (await conflicts(e, 'chicago')).length >= 2);

  const logged = await conflicts(e, 'chicago');
  const byRequest = Object.fromEntries(logged.map((c) => [c.request_id, c]));
  assert.equal(logged.length, 2);
  assert.deepEqual([byRequest['NW-LOCAL']?.resolution, byRequest['NW-LOCAL']?.policy], ['kept-local', 'newer-wins']);
  assert.deepEqual([byRequest['NW-SOURCE']?.resolution, byRequest['NW-SOURCE']?.policy], ['applied-incoming', 'newer-wins']);
  assert.equal((await copyOf(e, 'chicago', 'NW-LOCAL'))!.description, 'changed at chicago');
  assert.equal((await copyOf(e, 'chicago', 'NW-SOURCE'))!.description, 'changed at sf');
  await again.stop();
});

test('no conflict when the target copy was not changed locally: changes of the source are applied and nothing is logged', async () => {
  // target-wins: a conflict seen where there is none would keep the old values
  const e = await independentCopies('target-wins');
  const engine = e.engine();
  await copyAtChicago(e, engine, ['Q-1']);
  await e.query('sf', `UPDATE repair_request SET description = 'first change at sf' WHERE id = 'Q-1'`);
  await until(
    engine,
    'the first change did not arrive',
    async () => (await copyOf(e, 'chicago', 'Q-1'))?.description === 'first change at sf',
  );
  await e.query('sf', `UPDATE repair_request SET description = 'second change at sf', status = 'open' WHERE id = 'Q-1'`);
  await until(
    engine,
    'the second change did not arrive',
    async () => (await copyOf(e, 'chicago', 'Q-1'))?.description === 'second change at sf',
  );
  await settled(e, engine);
  assert.equal((await copyOf(e, 'chicago', 'Q-1'))!.status, 'open');
  assert.deepEqual(await conflicts(e, 'chicago'), []);
  await engine.stop();
});

// ---- whenToUpdate ------------------------------------------------------------------------------

test('whenToUpdate never: a later change of the master does not reach the data-only copy', async () => {
  const e = await env({
    mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only', whenToUpdate: 'never' })],
    filters: [routeChairs('sf-to-chicago', ['insert'])],
  });
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('W-1', 'chair', 'first')`);
  await until(engine, 'the copy did not reach chicago', async () => (await copyOf(e, 'sf', 'W-1'))?.dso_transfer_status === 'success');
  await e.query('sf', `UPDATE repair_request SET description = 'second', status = 'open' WHERE id = 'W-1'`);
  // a barrier: a later request that does arrive
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('W-2', 'chair', 'barrier')`);
  await until(engine, 'the barrier did not reach chicago', async () => (await copyOf(e, 'chicago', 'W-2')) !== undefined);
  await settled(e, engine);

  const copy = (await copyOf(e, 'chicago', 'W-1'))!;
  assert.deepEqual([copy.description, copy.status, copy.dso_master], ['first', 'new', false], 'the copy keeps the values of the transfer');
  assert.equal((await copyOf(e, 'sf', 'W-1'))!.description, 'second');
  await engine.stop();
});

test('whenToUpdate on-return: changes of the master at the target reach the source only when the request is returned', async () => {
  const e = await env({
    mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { whenToUpdate: 'on-return' })],
    filters: [
      routeChairs('sf-to-chicago', ['insert']),
      filter('give-back', 'chicago', { all: [is('status', 'done')] }, [{ type: 'return' }], ['update']),
    ],
  });
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('OR-1', 'chair', 'new at sf')`);
  await until(
    engine,
    'ownership did not move to chicago',
    async () => (await copyOf(e, 'chicago', 'OR-1'))?.dso_master === true && (await copyOf(e, 'sf', 'OR-1'))?.dso_master === false,
  );

  await e.query('chicago', `UPDATE repair_request SET status = 'in progress', description = 'being fixed' WHERE id = 'OR-1'`);
  await settled(e, engine);
  const before = (await copyOf(e, 'sf', 'OR-1'))!;
  assert.deepEqual(
    [before.status, before.description, before.dso_master],
    ['new', 'new at sf', false],
    'the change at chicago did not reach sf before the return',
  );

  await e.query('chicago', `UPDATE repair_request SET status = 'done', description = 'fixed' WHERE id = 'OR-1'`);
  await until(
    engine,
    'the request was not returned to sf',
    async () => (await copyOf(e, 'sf', 'OR-1'))?.dso_master === true && (await copyOf(e, 'chicago', 'OR-1'))?.dso_master === false,
  );
  const sf = (await copyOf(e, 'sf', 'OR-1'))!;
  assert.deepEqual([sf.status, sf.description, sf.dso_current_server], ['done', 'fixed', 'sf']);
  const chicago = (await copyOf(e, 'chicago', 'OR-1'))!;
  assert.deepEqual([chicago.dso_master, chicago.dso_current_server], [false, 'sf']);
  await assert.rejects(e.query('chicago', `UPDATE repair_request SET status = 'again' WHERE id = 'OR-1'`), /owned by sf/);
  await engine.stop();
});

// ---- pool --------------------------------------------------------------------------------------

test('pool: two mappings in different pools apply in parallel lanes, one connection each, named by pool', async () => {
  const schema = `${REPAIR_REQUEST_SQL};
    CREATE TABLE other (id text PRIMARY KEY, item text NOT NULL, description text)`;
  const e = await env(
    {
      mappings: [
        mapping('sf-requests-to-chicago', 'sf', 'chicago', { pool: 'alpha' }),
        { name: 'sf-others-to-chicago', from: { server: 'sf', form: 'other' }, to: { server: 'chicago', form: 'other' }, pool: 'beta' },
      ],
      filters: [
        filter('route-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-requests-to-chicago' }], ['insert']),
        {
          name: 'route-others',
          on: { server: 'sf', form: 'other', ops: ['insert'] },
          actions: [{ type: 'transfer', mapping: 'sf-others-to-chicago' }],
        },
      ],
    },
    schema,
    ['repair_request', 'other'],
  );
  // on chicago, an insert into each form waits for its own advisory lock
  await e.query(
    'chicago',
    `
    CREATE FUNCTION hold_lock() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_advisory_xact_lock(TG_ARGV[0]::bigint); RETURN NEW; END $$;
    CREATE TRIGGER hold_1 BEFORE INSERT ON repair_request FOR EACH ROW EXECUTE FUNCTION hold_lock('1');
    CREATE TRIGGER hold_2 BEFORE INSERT ON other FOR EACH ROW EXECUTE FUNCTION hold_lock('2')`,
  );
  const locker = new pg.Client({ connectionString: e.urls.chicago, application_name: 'test locker' });
  await locker.connect();
  const engine = e.engine();
  try {
    await locker.query('SELECT pg_advisory_lock(1), pg_advisory_lock(2)');
    await e.query(
      'sf',
      `BEGIN;
      INSERT INTO repair_request (id, item) SELECT 'P-' || g, 'chair' FROM generate_series(1, 3) g;
      INSERT INTO other (id, item) SELECT 'Q-' || g, 'lamp' FROM generate_series(1, 3) g;
      COMMIT`,
    );
    const waiting = (await until(
      engine,
      'two apply lanes were not waiting on chicago at the same time',
      async () => {
        const rows = await e.query<{ application_name: string }>(
          'chicago',
          `SELECT application_name FROM pg_stat_activity
        WHERE datname = current_database() AND application_name LIKE 'pgdso apply%' AND wait_event_type = 'Lock' AND wait_event = 'advisory'
        ORDER BY application_name`,
        );
        return rows.length === 2 ? rows.map((r) => r.application_name) : false;
      },
      15_000,
    )) as string[];
    assert.notEqual(waiting[0], waiting[1]);
    assert.ok(
      waiting.some((n) => n.includes('alpha')) && waiting.some((n) => n.includes('beta')),
      `lane names name their pools: ${waiting.join(', ')}`,
    );
    assert.equal(
      (await e.query('chicago', 'SELECT 1 FROM repair_request UNION ALL SELECT 1 FROM other')).length,
      0,
      'nothing applied while the locks are held',
    );
  } finally {
    await locker.query('SELECT pg_advisory_unlock_all()').catch(() => undefined);
    await locker.end();
  }
  await until(
    engine,
    'the rows did not all arrive',
    async () => (await e.query('chicago', 'SELECT id FROM repair_request UNION ALL SELECT id FROM other')).length === 6,
  );
  assert.deepEqual(
    (await e.query<{ id: string }>('chicago', 'SELECT id FROM repair_request UNION ALL SELECT id FROM other ORDER BY id')).map((r) => r.id),
    ['P-1', 'P-2', 'P-3', 'Q-1', 'Q-2', 'Q-3'],
  );
  await engine.stop();
});
