// The engine's policy for what a peer answers, one test per class of SQLSTATE:
// - the peer cannot be reached or cannot serve now (08, 57P0x, 53, 58): the operations wait in the
//   source's pgdso.pending (the source copies say retry) and are delivered later, exactly once;
// - the engine lacks a privilege (42501, 28): permanent until a DBA acts; said once, with the
//   statement to run; the operations wait in pgdso.pending;
// - everything that is a property of the row or the statement (22, 23, 42 but 42501, 428C9, and
//   codes the engine does not know): a data error of that row alone: the row goes to
//   pgdso.pending_errors with its SQLSTATE, the other rows of the same batch arrive.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { waitFor } from './support/wait.ts';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, until, settled, type DsoEnv, type EngineProcess } from './support/dso.ts';
import { count, errorsOn, queued, show } from './support/checks.ts';
import { applyAsOrdinaryRole, dropRole } from './support/roles.ts';

const suite = dsoSuite(2);

const statuses = async (e: DsoEnv) =>
  Object.fromEntries(
    (
      await e.query<{ s: string | null; n: number }>(
        'sf',
        'SELECT dso_transfer_status AS s, count(*)::int AS n FROM repair_request GROUP BY 1',
      )
    ).map((r) => [String(r.s), r.n]),
  );

/** What the source holds, for messages. */
async function describe(e: DsoEnv, engine: EngineProcess): Promise<string> {
  const pending = await queued(e).catch(() => []);
  return (
    `pending (${pending.length}): ${JSON.stringify(pending.slice(0, 3))}; ` +
    `errors: ${JSON.stringify(await errorsOn(e).catch(() => []))}; ` +
    `statuses on sf: ${JSON.stringify(await statuses(e).catch(() => ({})))}; ` +
    `engine output (end):\n${engine.output.slice(-4000)}`
  );
}

const FAST_RETRY = { pending: { retry: { firstSeconds: 0.2, maxSeconds: 1 } } };

/** sf and chicago with repair_request; every insert on sf transfers to chicago (data+ownership). */
function env(rules?: Record<string, unknown>): Promise<DsoEnv> {
  return suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    config: FAST_RETRY,
    rules: rules ?? {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
      filters: [filter('route-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert'])],
    },
  });
}

/** Inserts <prefix>-1..<prefix>-n on sf in one transaction (item 'chair', site '1'); `row(i)` overrides columns of row i. */
async function insertBatch(
  e: DsoEnv,
  prefix: string,
  n: number,
  row: (i: number) => Record<string, unknown> = () => ({}),
): Promise<string[]> {
  const rows = Array.from({ length: n }, (_, k) => ({ id: `${prefix}-${k + 1}`, item: 'chair', site: '1', ...row(k + 1) }));
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, site, internal_note) SELECT id, item, site, internal_note
      FROM jsonb_to_recordset($1::jsonb) AS r(id text, item text, site text, internal_note text)`,
    [JSON.stringify(rows)],
  );
  return rows.map((r) => r.id);
}

/**
 * One sf transaction of 100 rows, one of them (#37) bad for chicago: that row alone goes to
 * pending_errors with `sqlstate`, the 99 others arrive, nothing waits in the queue.
 */
async function oneBadRow(
  e: DsoEnv,
  engine: EngineProcess,
  prefix: string,
  bad: Record<string, unknown>,
  sqlstate: string,
  message: RegExp,
): Promise<void> {
  await e.query('sf', `INSERT INTO repair_request (id, item, site) VALUES ('${prefix}-first', 'chair', '1')`);
  await until(
    engine,
    'a first request on chicago',
    async () => (await count(e, 'chicago', 'SELECT 1 FROM repair_request WHERE id = $1', [`${prefix}-first`])) === 1,
  );
  const ids = await insertBatch(e, prefix, 100, (i) => (i === 37 ? bad : {}));
  const badId = `${prefix}-37`;
  await waitFor(
    async () =>
      (await count(e, 'chicago', 'SELECT 1 FROM repair_request WHERE id = ANY($1)', [ids])) === 99 && (await errorsOn(e)).length > 0,
    {
      timeoutMs: 20_000,
      message: `99 rows on chicago and ${badId} in pending_errors`,
    },
  ).catch(async (err: Error) =>
    assert.fail(
      `${err.message.split(' (last')[0]}: chicago has ` +
        `${await count(e, 'chicago', 'SELECT 1 FROM repair_request WHERE id = ANY($1)', [ids])} of them; ${await describe(e, engine)}`,
    ),
  );
  await settled(e, engine, ['sf']);
  const errors = await errorsOn(e);
  assert.deepEqual(
    errors.map((r) => [r.request_id, r.sqlstate]),
    [[badId, sqlstate]],
    await describe(e, engine),
  );
  assert.match(errors[0]!.error, message);
  assert.equal(await count(e, 'chicago', 'SELECT 1 FROM repair_request WHERE id = $1', [badId]), 0);
  assert.deepEqual(await queued(e), [], 'nothing waits in the queue: chicago is not down');
  assert.deepEqual(await statuses(e), { success: 100, failure: 1 });
  assert.equal(
    (await e.query<{ s: string }>('sf', 'SELECT dso_transfer_status AS s FROM repair_request WHERE id = $1', [badId]))[0]!.s,
    'failure',
  );
  // the stream goes on
  await e.query('sf', `INSERT INTO repair_request (id, item, site) VALUES ('${prefix}-after', 'chair', '1')`);
  await until(
    engine,
    'a later request on chicago',
    async () => (await count(e, 'chicago', 'SELECT 1 FROM repair_request WHERE id = $1', [`${prefix}-after`])) === 1,
  );
  assert.deepEqual(await queued(e), []);
}

test('class 53 (chicago refuses connections: database connection limit 0): operations wait in the queue, source copies say retry; once \
chicago takes connections again they are delivered', async () => {
  const e = await env();
  const role = await applyAsOrdinaryRole(e, 'chicago', ['repair_request']);
  const database = decodeURIComponent(new URL(e.urls.chicago!).pathname.slice(1));
  await e.query('chicago', `ALTER DATABASE "${database}" CONNECTION LIMIT 0`);
  // what the engine's role meets now
  const probe = new pg.Client({ connectionString: role.url });
  const refused = await probe.connect().then(
    () => null,
    (err: { code?: string; message?: string }) => err,
  );
  await probe.end().catch(() => {});
  assert.equal(refused?.code, '53300', `the role is refused with 53300: ${refused?.message}`);

  const engine = e.engine(['--server', 'sf']);
  const ids = await insertBatch(e, 'CL', 20);
  await until(engine, 'the 20 operations wait in pgdso.pending', async () => (await queued(e)).length === 20, 20_000);
  await settled(e, engine, ['sf']);
  assert.deepEqual(new Set((await queued(e)).map((r) => r.request_id)), new Set(ids));
  assert.deepEqual(await statuses(e), { retry: 20 }, await describe(e, engine));
  assert.deepEqual(await errorsOn(e), []);
  assert.equal(await count(e, 'chicago', 'SELECT 1 FROM repair_request'), 0);

  await e.query('chicago', `ALTER DATABASE "${database}" CONNECTION LIMIT -1`);
  await until(
    engine,
    'the 20 delivered after chicago takes connections again',
    async () => (await count(e, 'chicago', 'SELECT 1 FROM repair_request')) === 20,
    20_000,
  );
  await until(engine, 'the queue worked off', async () => (await queued(e)).length === 0);
  await until(engine, 'the source copies say success', async () => (await statuses(e)).success === 20);
  assert.deepEqual(await errorsOn(e), []);
  await engine.stop();
  await dropRole(e, 'chicago', role);
});

/** The engine's apply backends on chicago, terminated (57P01); how many there were. */
async function terminateApply(e: DsoEnv, engine: EngineProcess): Promise<number> {
  const backends = (await until(engine, 'apply backends on chicago', async () => {
    const rows = await e.query<{ pid: number }>(
      'chicago',
      `SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'pgdso apply%'`,
    );
    return rows.length ? rows : undefined;
  }))!;
  const terminated = await e.query<{ ok: boolean }>('chicago', 'SELECT pg_terminate_backend(pid) AS ok FROM unnest($1::int[]) AS pid', [
    backends.map((b) => b.pid),
  ]);
  return terminated.filter((r) => r.ok).length;
}

test('57P01 (the apply backends on chicago terminated during a load, and again while the queue is delivered): every row arrives exactly \
once', {
  timeout: 120_000,
}, async () => {
  const e = await env();
  const role = await applyAsOrdinaryRole(e, 'chicago', ['repair_request']);
  const database = decodeURIComponent(new URL(e.urls.chicago!).pathname.slice(1));
  // every insert the engine commits on chicago, counted (no key: a second insert of a request would show)
  await e.query(
    'chicago',
    `CREATE TABLE arrivals (id text NOT NULL);
    CREATE FUNCTION note_arrival() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ BEGIN INSERT INTO arrivals
      VALUES (NEW.id); RETURN NULL; END $$;
    CREATE TRIGGER note_arrival AFTER INSERT ON repair_request FOR EACH ROW EXECUTE FUNCTION note_arrival();`,
  );
  const engine = e.engine(['--server', 'sf']);
  const transactions = 20;
  const perTransaction = 500;
  const total = transactions * perTransaction;
  const arrived = () => count(e, 'chicago', 'SELECT 1 FROM arrivals');
  const load = (async () => {
    for (let t = 0; t < transactions; t++) await insertBatch(e, `T${t}`, perTransaction);
  })();
  const terminations: { when: string; atRows: number; queued: number; backends: number }[] = [];
  const terminate = async (when: string) => {
    const backends = await terminateApply(e, engine);
    terminations.push({ when, atRows: await arrived(), queued: (await queued(e)).length, backends });
  };
  // 1. while the engine streams the load to chicago
  await until(engine, 'chicago holds 15% of the rows', async () => (await arrived()) >= 0.15 * total, 30_000);
  await terminate('streaming');
  // 2. chicago refuses the engine's connections for the rest of the load: its operations queue
  await until(engine, 'chicago holds 25% of the rows', async () => (await arrived()) >= 0.25 * total, 30_000);
  await e.query('chicago', `ALTER DATABASE "${database}" CONNECTION LIMIT 0`);
  await terminate('before the connection limit');
  await load;
  await settled(e, engine, ['sf']);
  const waiting = (await queued(e)).length;
  assert.ok(waiting >= 0.2 * total, `the rest of the load waits in the queue: ${waiting}`);
  // 3. chicago takes connections again; while the queue is delivered, the backends are terminated again
  const before = await arrived();
  await e.query('chicago', `ALTER DATABASE "${database}" CONNECTION LIMIT -1`);
  await until(engine, 'the delivery of the queue started', async () => (await arrived()) > before, 30_000);
  await terminate('delivering the queue');
  await waitFor(async () => (await count(e, 'chicago', 'SELECT DISTINCT id FROM arrivals')) === total && (await queued(e)).length === 0, {
    timeoutMs: 60_000,
    message: 'every row on chicago',
  }).catch(async (err: Error) => {
    const there = new Set((await e.query<{ id: string }>('chicago', 'SELECT DISTINCT id FROM arrivals')).map((r) => r.id));
    const missing = (await e.query<{ id: string }>('sf', 'SELECT id FROM repair_request ORDER BY id'))
      .map((r) => r.id)
      .filter((id) => !there.has(id));
    const perTransaction = new Map<string, number>();
    for (const id of missing) perTransaction.set(id.split('-')[0]!, (perTransaction.get(id.split('-')[0]!) ?? 0) + 1);
    const byTransaction = [...perTransaction].map(([tx, n]) => `${tx}: ${n}`);
    assert.fail(
      `${err.message.split(' (last')[0]}: chicago has ${there.size} distinct of ${total} ` +
        `(${await arrived()} arrivals, ${await count(e, 'chicago', 'SELECT 1 FROM repair_request')} rows in repair_request); ` +
        `missing per source transaction ${byTransaction.join(', ')}; terminations ${JSON.stringify(terminations)}; ` +
        `${await describe(e, engine)}`,
    );
  });
  await settled(e, engine, ['sf']);
  // the first two come before every row is there; the last one while the queue still holds operations
  // (its last chunk may have committed on chicago, not yet on sf: the delivery is cut between the two)
  assert.ok(
    terminations.every((t) => t.backends > 0) && terminations.slice(0, 2).every((t) => t.atRows < total),
    `each termination hit the engine mid-load: ${JSON.stringify(terminations)}`,
  );
  assert.ok(terminations[2]!.queued > 0, `the last termination came while the queue was delivered: ${JSON.stringify(terminations)}`);
  assert.deepEqual(
    await e.query('chicago', 'SELECT id, count(*)::int AS n FROM arrivals GROUP BY id HAVING count(*) > 1 LIMIT 5'),
    [],
    'no row inserted twice',
  );
  assert.equal(await arrived(), total);
  assert.equal(await count(e, 'chicago', 'SELECT 1 FROM repair_request'), total);
  assert.deepEqual(await errorsOn(e), []);
  assert.deepEqual(await statuses(e), { success: total });
  console.log(`57P01: terminations ${JSON.stringify(terminations)}`);
  await engine.stop();
  await dropRole(e, 'chicago', role);
});

test('an unknown SQLSTATE (ZX001, raised by a trigger on chicago for one row of 100 in one transaction) is a data error of that row: the \
99 others arrive, nothing queues', async () => {
  const e = await env();
  await e.query(
    'chicago',
    `CREATE FUNCTION refuse_weird() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN IF NEW.item = 'weird' THEN RAISE EXCEPTION 'chicago does not take weird items' USING ERRCODE = 'ZX001';
      END IF; RETURN NEW; END $$;
    CREATE TRIGGER refuse_weird BEFORE INSERT ON repair_request FOR EACH ROW EXECUTE FUNCTION refuse_weird();`,
  );
  const engine = e.engine();
  await oneBadRow(e, engine, 'ZX', { item: 'weird' }, 'ZX001', /chicago does not take weird items/);
  await engine.stop();
});

test('class 22 (22P02: a value chicago cannot read as an integer, in one row of 100) is a data error of that row', async () => {
  const e = await env();
  // chicago reads site as a number (a text column that chicago converts to int)
  await e.query('chicago', `ALTER TABLE repair_request ADD CONSTRAINT site_is_a_number CHECK (site IS NULL OR site::int >= 0)`);
  const engine = e.engine();
  await oneBadRow(e, engine, 'IT', { site: 'north' }, '22P02', /invalid input syntax for type integer/);
  await engine.stop();
});

test('class 23 (23502: a NULL in a column chicago requires, in one row of 100) is a data error of that row', async () => {
  const e = await env();
  await e.query('chicago', `ALTER TABLE repair_request ALTER COLUMN site SET NOT NULL`);
  const engine = e.engine();
  await oneBadRow(e, engine, 'NN', { site: null }, '23502', /null value in column "site"/);
  await engine.stop();
});

test("class 42 (42703: a mapped column dropped on chicago while the engine runs) fails the row of that mapping alone; the other \
mapping's rows of the same transaction arrive", async () => {
  const e = await env({
    mappings: [mapping('sf-chairs', 'sf', 'chicago'), mapping('sf-lamps', 'sf', 'chicago', { fields: { exclude: ['internal_note'] } })],
    filters: [
      filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-chairs' }], ['insert']),
      filter('route-lamps', 'sf', { all: [is('item', 'lamp')] }, [{ type: 'transfer', mapping: 'sf-lamps' }], ['insert']),
    ],
  });
  const engine = e.engine();
  await insertBatch(e, 'FIRST', 2, (i) => ({ item: i === 1 ? 'chair' : 'lamp' }));
  await until(engine, 'a chair and a lamp on chicago', async () => (await count(e, 'chicago', 'SELECT 1 FROM repair_request')) === 2);
  await e.query('chicago', 'ALTER TABLE repair_request DROP COLUMN internal_note');
  const ids = await insertBatch(e, 'DC', 100, (i) =>
    i === 37 ? { item: 'chair', internal_note: 'for the chair' } : { item: 'lamp', internal_note: 'kept on sf' },
  );
  const badId = 'DC-37';
  await until(
    engine,
    `99 lamps on chicago and ${badId} in pending_errors`,
    async () =>
      (await count(e, 'chicago', 'SELECT 1 FROM repair_request WHERE id = ANY($1)', [ids])) === 99 && (await errorsOn(e)).length > 0,
    20_000,
  ).catch(async (err: Error) =>
    assert.fail(
      `${err.message.split('; engine')[0]}: chicago has ` +
        `${await count(e, 'chicago', 'SELECT 1 FROM repair_request WHERE id = ANY($1)', [ids])}; ${await describe(e, engine)}`,
    ),
  );
  await settled(e, engine, ['sf']);
  const errors = await errorsOn(e);
  assert.deepEqual(
    errors.map((r) => [r.request_id, r.sqlstate]),
    [[badId, '42703']],
    await describe(e, engine),
  );
  assert.match(errors[0]!.error, /column "internal_note" .*does not exist/);
  assert.deepEqual(await queued(e), []);
  assert.deepEqual(await statuses(e), { success: 101, failure: 1 });
  await engine.stop();
});

test("42501 (the engine's role on chicago lacks INSERT): said once at error level with the GRANT to run, no stack trace; the operations \
wait in the queue and are delivered after the GRANT and pending retry --queued", async () => {
  const e = await env();
  const role = await applyAsOrdinaryRole(e, 'chicago', ['repair_request']);
  const engine = e.engine(['--server', 'sf']);
  // the role is enough for the engine: a first request arrives
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('PR-first', 'chair')`);
  await until(
    engine,
    'PR-first on chicago through the ordinary role',
    async () => (await count(e, 'chicago', `SELECT 1 FROM repair_request WHERE id = 'PR-first'`)) === 1,
  );
  await e.query('chicago', `REVOKE INSERT ON repair_request FROM "${role.name}"`);

  const ids = await insertBatch(e, 'PR', 10);
  await until(engine, 'the 10 operations wait in pgdso.pending', async () => (await queued(e)).length === 10, 20_000);
  await settled(e, engine, ['sf']);
  // more work while the privilege is missing: still said once
  ids.push(...(await insertBatch(e, 'PR2', 5)));
  await until(engine, 'the 15 operations wait in pgdso.pending', async () => (await queued(e)).length === 15, 20_000);
  await settled(e, engine, ['sf']);

  const lines = engine.output.split('\n').filter((l) => l.startsWith('{'));
  // (the owner of admin may also say once that it did not publish the rule set, its preflight
  // finding the same missing privilege: a report of its own, not a repeat of the peer's failure)
  const errorLines = lines.filter((l) => {
    const line = JSON.parse(l) as { level: number; peer?: string };
    return line.level === 50 && line.peer === 'chicago';
  });
  assert.equal(errorLines.length, 1, `exactly one error-level line for the peer:\n${errorLines.join('\n')}`);
  assert.match(errorLines[0]!, /42501|permission denied/, errorLines[0]);
  assert.match(errorLines[0]!, /GRANT INSERT ON/, `the line gives the statement to run: ${errorLines[0]}`);
  assert.ok(
    errorLines[0]!.includes('repair_request') && errorLines[0]!.includes(role.name),
    `the statement names the table and the role: ${errorLines[0]}`,
  );
  const stacks = lines.filter((l) => l.includes('"level":40') && l.includes('    at '));
  assert.deepEqual(stacks, [], 'no stack trace at warn level');
  assert.deepEqual(new Set((await queued(e)).map((r) => r.request_id)), new Set(ids));
  assert.deepEqual(await errorsOn(e), [], 'not a data error');
  assert.equal(await count(e, 'chicago', 'SELECT 1 FROM repair_request'), 1);

  await e.query('chicago', `GRANT INSERT ON repair_request TO "${role.name}"`);
  const retry = await e.cli(['pending', 'retry', '--server', 'sf', '--queued', '--all']);
  assert.equal(retry.code, 0, show(retry));
  await until(
    engine,
    'the 15 delivered after the GRANT',
    async () => (await count(e, 'chicago', 'SELECT 1 FROM repair_request')) === 16,
    20_000,
  );
  await until(engine, 'the queue worked off', async () => (await queued(e)).length === 0);
  await until(engine, 'the source copies say success', async () => (await statuses(e)).success === 16);
  await engine.stop();
  await dropRole(e, 'chicago', role);
});
