// A row that cannot be applied goes to pgdso.pending_errors with its payload and the reason;
// the stream goes on.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { waitFor } from './support/wait.ts';
import pg from 'pg';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, until, settled } from './support/dso.ts';

const suite = dsoSuite(2);

/** sf and chicago with repair_request; chairs transfer from sf to chicago with ownership. */
function chairsToChicago() {
  return suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
      filters: [filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }])],
    },
  });
}

/** chairsToChicago, with chicago refusing descriptions longer than 10 characters. */
async function shortDescriptionsOnChicago() {
  const e = await chairsToChicago();
  await e.query('chicago', 'ALTER TABLE repair_request ALTER COLUMN description TYPE varchar(10)');
  return e;
}

/** Each request on sf: whether it is the master copy, its transfer status. */
function sfCopies(e: Awaited<ReturnType<typeof chairsToChicago>>) {
  return e.query('sf', 'SELECT id, dso_master, dso_transfer_status FROM repair_request ORDER BY id');
}

/** R-2 inserted, then changed to a description chicago refuses, and R-3, in one transaction. */
const ONE_WRITE_REFUSED = `BEGIN;
  INSERT INTO repair_request (id, item, description) VALUES ('R-2', 'chair', 'fits');
  UPDATE repair_request SET description = 'this one is far too long' WHERE id = 'R-2';
  INSERT INTO repair_request (id, item, description) VALUES ('R-3', 'chair', 'fits');
  COMMIT`;

/** After ONE_WRITE_REFUSED: R-2 failed and is still the master on sf, only R-3 moved to chicago. */
async function assertOneWriteRefused(e: Awaited<ReturnType<typeof chairsToChicago>>, engine: { output: string }): Promise<void> {
  await waitFor(async () => (await e.query('sf', `SELECT 1 FROM repair_request WHERE dso_transfer_status IS NOT NULL`)).length === 2, {
    message: () => engine.output,
  });
  assert.deepEqual(await sfCopies(e), [
    { id: 'R-2', dso_master: true, dso_transfer_status: 'failure' },
    { id: 'R-3', dso_master: false, dso_transfer_status: 'success' },
  ]);
  assert.deepEqual(
    (await e.query<{ id: string }>('chicago', 'SELECT id FROM repair_request ORDER BY id')).map((r) => r.id),
    ['R-3'],
  );
}

interface PendingError {
  mapping: string;
  request_id: string;
  type: string;
  error: string;
  sqlstate: string;
  payload: { target: string; values: Record<string, unknown> };
  target_server: string;
}

test('a value the target cannot take goes to pending_errors with its payload and reason; the rows around it arrive', async () => {
  const e = await shortDescriptionsOnChicago();
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, description) SELECT 'E-' || g, 'chair', CASE WHEN g = 50
      THEN 'this description is far too long' ELSE 'ok ' || g END FROM generate_series(1, 100) g`,
  );
  await waitFor(async () => (await e.query('sf', `SELECT 1 FROM repair_request WHERE dso_transfer_status IS NOT NULL`)).length === 100, {
    message: () => engine.output,
  });
  // later changes go on too
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('E-101', 'chair', 'after')`);
  await waitFor(async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'E-101'`)).length === 1, {
    message: () => engine.output,
  });

  assert.equal(
    (await e.query<{ n: number }>('chicago', 'SELECT count(*)::int AS n FROM repair_request'))[0]!.n,
    100,
    '99 of the first 100 and E-101',
  );
  assert.equal((await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'E-50'`)).length, 0);
  const errors = await e.query<PendingError>('sf', 'SELECT * FROM pgdso.pending_errors');
  assert.equal(errors.length, 1);
  const [error] = errors;
  assert.deepEqual(
    [error!.mapping, error!.request_id, error!.type, error!.sqlstate, error!.target_server],
    ['sf-to-chicago', 'E-50', 'transfer', '22001', 'chicago'],
  );
  assert.match(
    error!.error,
    /mapping "sf-to-chicago": request E-50 to chicago\.repair_request: value too long for type character varying\(10\)/,
  );
  assert.equal(error!.payload.values.description, 'this description is far too long');
  // the source copy failed: it keeps ownership and says so
  const [source] = await e.query<{ dso_master: boolean; dso_transfer_status: string }>(
    'sf',
    `SELECT dso_master, dso_transfer_status FROM repair_request WHERE id = 'E-50'`,
  );
  assert.deepEqual(source, { dso_master: true, dso_transfer_status: 'failure' });
  const [moved] = await e.query<{ dso_master: boolean; dso_transfer_status: string }>(
    'sf',
    `SELECT dso_master, dso_transfer_status FROM repair_request WHERE id = 'E-49'`,
  );
  assert.deepEqual(moved, { dso_master: false, dso_transfer_status: 'success' });

  await engine.stop();
});

test('a failure recorded before its source position is confirmed: kill -9, the restart replays that change, the failure is recorded \
once', async (_t) => {
  const e = await shortDescriptionsOnChicago();
  // The engine's source transaction (statuses, bookkeeping, progress) comes after the failures are
  // recorded and the targets commit, and the slot is confirmed after it. A user-side trigger holds
  // the engine's UPDATE of the source copies while the test holds an advisory lock: the engine is
  // then stuck in that window, the error row written, the change not confirmed.
  const HOLD = 7_310_042;
  await e.query(
    'sf',
    `CREATE FUNCTION hold_engine_updates() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_advisory_xact_lock_shared(${HOLD}); RETURN NEW; END $$;
    CREATE TRIGGER hold_engine_updates BEFORE UPDATE ON repair_request FOR EACH ROW EXECUTE FUNCTION hold_engine_updates()`,
  );
  const holder = new pg.Client({ connectionString: e.urls.sf, application_name: 'test-holder' });
  await holder.connect();
  try {
    await holder.query('SELECT pg_advisory_lock($1)', [HOLD]);
    const holderPid = (await holder.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
    const engine = e.engine();
    await e.query(
      'sf',
      `INSERT INTO repair_request (id, item, description) SELECT 'E-' || g, 'chair', CASE WHEN g = 50
        THEN 'this description is far too long' ELSE 'ok ' || g END FROM generate_series(1, 100) g`,
    );
    // the error row is written and chicago committed the 99 others; the engine waits on the hold
    const [recorded] = (await until(engine, 'E-50 was not recorded in pending_errors', async () => {
      const rows = await e.query<{ id: string; source_lsn: string }>(
        'sf',
        `SELECT id::text, source_lsn::text FROM pgdso.pending_errors WHERE request_id = 'E-50'`,
      );
      return rows.length ? rows : undefined;
    }))!;
    const [waiter] = (await until(engine, 'the engine did not reach the source bookkeeping (held)', async () => {
      const rows = await e.query<{ pid: number }>(
        'sf',
        `SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
          AND wait_event = 'advisory' AND pid <> $1`,
        [holderPid],
      );
      return rows.length ? rows : undefined;
    }))!;
    await until(
      engine,
      'chicago did not commit the 99 rows that fit',
      async () => (await e.query<{ n: number }>('chicago', 'SELECT count(*)::int AS n FROM repair_request'))[0]!.n === 99,
    );
    // the slot has not confirmed the failing change: a restart must decode it again
    const [slot] = await e.query<{ behind: boolean; confirmed: string }>(
      'sf',
      `SELECT confirmed_flush_lsn <= $1::pg_lsn AS behind, confirmed_flush_lsn::text AS confirmed
        FROM pg_replication_slots WHERE database = current_database()`,
      [recorded!.source_lsn],
    );
    assert.equal(
      slot?.behind,
      true,
      `the slot confirmed ${slot?.confirmed}, past E-50's change at ${recorded!.source_lsn}: no replay to test`,
    );
    const [held] = await e.query<{ dso_transfer_status: string | null }>(
      'sf',
      `SELECT dso_transfer_status FROM repair_request WHERE id = 'E-50'`,
    );
    assert.equal(held!.dso_transfer_status, null, 'the source bookkeeping of the batch was already written');

    await engine.kill9();
    assert.equal(engine.child.signalCode, 'SIGKILL', 'the engine was not killed by SIGKILL');
    await holder.query('SELECT pg_advisory_unlock($1)', [HOLD]);
    // the killed engine's session on sf ends without committing (its COMMIT never comes)
    await waitFor(async () => (await e.query('sf', 'SELECT 1 FROM pg_stat_activity WHERE pid = $1', [waiter!.pid])).length === 0, {
      message: `the killed engine's session ${waiter!.pid} on sf did not end`,
    });
    assert.equal(
      (await e.query('sf', 'SELECT 1 FROM repair_request WHERE dso_transfer_status IS NOT NULL')).length,
      0,
      "the killed engine's bookkeeping was committed",
    );
    const again = e.engine();
    // the replay is what writes the batch's bookkeeping (held, then killed, before): the 99 that
    // arrived get their status now
    let unmarked: string[] = [];
    await waitFor(
      async () =>
        (unmarked = (
          await e.query<{ id: string }>(
            'sf',
            `SELECT id FROM repair_request WHERE dso_transfer_status IS NULL AND id <> 'E-50' ORDER BY id`,
          )
        ).map((r) => r.id)).length === 0,
      {
        message: () =>
          'the restarted engine did not write the bookkeeping of the replayed batch; ' +
          `copies without a status: ${unmarked.slice(0, 20).join(', ')}\n${again.output}`,
      },
    );
    await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('E-102', 'chair', 'last')`);
    await until(
      again,
      'E-102 did not arrive on chicago',
      async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'E-102'`)).length === 1,
    );
    await settled(e, again, ['sf']);
    const errors = await e.query<{ request_id: string; source_lsn: string }>(
      'sf',
      'SELECT request_id, source_lsn::text FROM pgdso.pending_errors ORDER BY id',
    );
    assert.deepEqual(errors, [{ request_id: 'E-50', source_lsn: recorded!.source_lsn }], 'the failure of E-50, recorded once');
    // the replay skips E-50 on chicago (the lane's progress covers the batch) and, its error
    // recorded before the kill, marks the copy 'failure' (the killed session never did)
    assert.deepEqual(
      await e.query('sf', `SELECT dso_master, dso_transfer_status FROM repair_request WHERE id = 'E-50'`),
      [{ dso_master: true, dso_transfer_status: 'failure' }],
      'the source copy of E-50 keeps ownership and says failure',
    );
    assert.deepEqual(await e.query('sf', `SELECT dso_master, dso_transfer_status FROM repair_request WHERE id = 'E-49'`), [
      { dso_master: false, dso_transfer_status: 'success' },
    ]);
    assert.equal(
      (await e.query<{ n: number }>('chicago', 'SELECT count(*)::int AS n FROM repair_request'))[0]!.n,
      100,
      '99 of the first 100 and E-102',
    );
    assert.equal(await again.stop(), 0, again.output.slice(-3000));
  } finally {
    await holder.end().catch(() => undefined);
  }
});

test('duplicateRequestId error: a different request with the same ID on the target goes to pending_errors naming both', async () => {
  const e = await chairsToChicago();
  await e.query('chicago', `INSERT INTO repair_request (id, item, description) VALUES ('DUP-1', 'lamp', 'chicago''s own request')`);
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, description) VALUES ('DUP-1', 'chair', 'from sf'), ('DUP-2', 'chair', 'from sf')`,
  );
  await waitFor(async () => (await e.query('sf', `SELECT 1 FROM repair_request WHERE dso_transfer_status IS NOT NULL`)).length === 2, {
    message: () => engine.output,
  });
  const [chicagoCopy] = await e.query<{ item: string; description: string }>(
    'chicago',
    `SELECT item, description FROM repair_request WHERE id = 'DUP-1'`,
  );
  assert.deepEqual(chicagoCopy, { item: 'lamp', description: "chicago's own request" }, 'the other request was overwritten');
  assert.equal((await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'DUP-2'`)).length, 1);
  const errors = await e.query<PendingError>('sf', 'SELECT * FROM pgdso.pending_errors');
  assert.equal(errors.length, 1);
  assert.equal(errors[0]!.request_id, 'DUP-1');
  assert.match(
    errors[0]!.error,
    /chicago\.repair_request already holds request ID DUP-1 for request chicago:DUP-1, a different request from the incoming sf:DUP-1/,
  );
  const [source] = await e.query<{ dso_master: boolean; dso_transfer_status: string }>(
    'sf',
    `SELECT dso_master, dso_transfer_status FROM repair_request WHERE id = 'DUP-1'`,
  );
  assert.deepEqual(source, { dso_master: true, dso_transfer_status: 'failure' });
  await engine.stop();
});

test('one filter, two transfers, one target refuses the row: the other target gets it, the refusal is recorded, the stream goes \
on', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago', 'tokyo'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [
        mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only' }),
        mapping('sf-to-tokyo', 'sf', 'tokyo', { transferMode: 'data-only' }),
      ],
      filters: [
        filter('fan-out', 'sf', { all: [is('item', 'chair')] }, [
          { type: 'transfer', mapping: 'sf-to-chicago' },
          { type: 'transfer', mapping: 'sf-to-tokyo' },
        ]),
      ],
    },
  });
  await e.query('tokyo', `ALTER TABLE repair_request ADD CONSTRAINT short_description CHECK (length(description) < 10)`);
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, description) VALUES ('F-1', 'chair', 'much too long for tokyo'), ('F-2', 'chair', 'short')`,
  );
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('F-3', 'chair', 'later')`);
  await waitFor(
    async () =>
      (await e.query('tokyo', `SELECT 1 FROM repair_request WHERE id = 'F-3'`)).length === 1 &&
      (await e.query('chicago', `SELECT 1 FROM repair_request`)).length === 3,
    { message: () => engine.output },
  );
  assert.deepEqual(
    (await e.query<{ id: string }>('tokyo', 'SELECT id FROM repair_request ORDER BY id')).map((r) => r.id),
    ['F-2', 'F-3'],
  );
  const errors = await e.query<PendingError>('sf', 'SELECT * FROM pgdso.pending_errors');
  assert.deepEqual(
    errors.map((r) => [r.mapping, r.request_id, r.sqlstate]),
    [['sf-to-tokyo', 'F-1', '23514']],
  );
  await engine.stop();
});

test('a request applied early in a batch and refused later in it: ownership moved, so the source copy is not a second master', async () => {
  const e = await shortDescriptionsOnChicago();
  const engine = e.engine();
  // one source transaction: R-1 fits, 12,000 other rows (more than a group takes in one
  // transaction: 2 x 5,000), then R-1 changes to a value chicago refuses
  await e.query(
    'sf',
    `BEGIN;
    INSERT INTO repair_request (id, item, description) VALUES ('R-1', 'chair', 'fits');
    INSERT INTO repair_request (id, item, description) SELECT 'B-' || g, 'chair', 'ok' FROM generate_series(1, 12000) g;
    UPDATE repair_request SET description = 'this one is far too long' WHERE id = 'R-1';
    COMMIT`,
  );
  await waitFor(async () => (await e.query('sf', `SELECT 1 FROM repair_request WHERE dso_transfer_status IS NOT NULL`)).length === 12001, {
    timeoutMs: 60_000,
    message: () => engine.output,
  });
  const masters = [
    ...(await e.query<{ m: boolean }>('sf', `SELECT dso_master AS m FROM repair_request WHERE id = 'R-1'`)),
    ...(await e.query<{ m: boolean }>('chicago', `SELECT dso_master AS m FROM repair_request WHERE id = 'R-1'`)),
  ].filter((r) => r.m);
  assert.equal(masters.length, 1, 'exactly one master copy of R-1');
  assert.equal((await e.query<{ d: string }>('chicago', `SELECT description AS d FROM repair_request WHERE id = 'R-1'`))[0]?.d, 'fits');
  assert.equal((await e.query('sf', `SELECT 1 FROM pgdso.pending_errors WHERE request_id = 'R-1'`)).length, 1);
  await engine.stop();
});

test('a request inserted and then changed in one transaction to a value the target refuses: the source copy stays the master', async () => {
  const e = await shortDescriptionsOnChicago();
  const engine = e.engine();
  // the two changes of R-2 reach chicago as one write (its latest values), which fails: the
  // insert was not applied either, so ownership must not move
  await e.query('sf', ONE_WRITE_REFUSED);
  await assertOneWriteRefused(e, engine);
  assert.equal((await e.query('sf', `SELECT 1 FROM pgdso.pending_errors WHERE request_id = 'R-2'`)).length, 1);
  await engine.stop();
});

test('kill -9 before the source bookkeeping, then the replay: an insert and a refused update as one write keep it master', async () => {
  const e = await shortDescriptionsOnChicago();
  // the engine's bookkeeping of source copies waits while the test holds this advisory lock
  const HOLD = 7_310_044;
  await e.query(
    'sf',
    `CREATE FUNCTION hold_engine_updates() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF pg_replication_origin_session_is_setup() THEN PERFORM pg_advisory_xact_lock_shared(${HOLD}); END IF;
         RETURN NEW;
       END $$;
     CREATE TRIGGER hold_engine_updates BEFORE UPDATE ON repair_request FOR EACH ROW EXECUTE FUNCTION hold_engine_updates()`,
  );
  await e.query('sf', ONE_WRITE_REFUSED);
  const holder = new pg.Client({ connectionString: e.urls.sf });
  await holder.connect();
  try {
    await holder.query('SELECT pg_advisory_lock($1)', [HOLD]);
    const first = e.engine();
    // chicago committed R-3 and R-2's failure is recorded; the source's bookkeeping waits
    await waitFor(
      async () =>
        (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'R-3'`)).length === 1 &&
        (await e.query('sf', `SELECT 1 FROM pgdso.pending_errors WHERE request_id = 'R-2'`)).length === 1 &&
        (
          await e.query(
            'sf',
            `SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = 'advisory'`,
          )
        ).length > 0,
      { message: () => first.output },
    );
    await first.kill9();
    await holder.query('SELECT pg_advisory_unlock($1)', [HOLD]);
    assert.deepEqual(await sfCopies(e), [
      { id: 'R-2', dso_master: true, dso_transfer_status: null },
      { id: 'R-3', dso_master: true, dso_transfer_status: null },
    ]);
    const engine = e.engine();
    // the replay found the insert among the changes the failed write carried: no ownership moved
    await assertOneWriteRefused(e, engine);
    await engine.stop();
  } finally {
    await holder.end();
  }
});

test('a deferred constraint on the target fails its row, not the whole batch', async () => {
  const e = await chairsToChicago();
  await e.query(
    'chicago',
    `ALTER TABLE repair_request ADD CONSTRAINT one_per_description UNIQUE (description) DEFERRABLE INITIALLY DEFERRED`,
  );
  await e.query('chicago', `INSERT INTO repair_request (id, item, description) VALUES ('LOCAL-1', 'lamp', 'taken')`);
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('X-1', 'chair', 'taken'), ('X-2', 'chair', 'free')`);
  await waitFor(async () => (await e.query('sf', `SELECT 1 FROM repair_request WHERE dso_transfer_status IS NOT NULL`)).length === 2, {
    message: () => engine.output,
  });
  assert.deepEqual(
    (await e.query<{ id: string }>('chicago', 'SELECT id FROM repair_request ORDER BY id')).map((r) => r.id),
    ['LOCAL-1', 'X-2'],
  );
  assert.deepEqual(await sfCopies(e), [
    { id: 'X-1', dso_master: true, dso_transfer_status: 'failure' },
    { id: 'X-2', dso_master: false, dso_transfer_status: 'success' },
  ]);
  await engine.stop();
});
