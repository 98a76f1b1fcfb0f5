// `pgdso forms enable` on live databases, as a DBA meets it: every missing privilege or setting
// found before anything changes (with the statement that fixes it), the lock timeout that names
// the session in the way, the request ID and TRUNCATE guards, and a partitioned form end to end.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import pg from 'pg';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, runCli, until, type DsoEnv, type CliResult } from './support/dso.ts';
import { serverChecks, versionCheck, type ServerFacts } from '../src/sql/privileges.ts';
import { parseDuration } from '../src/sql/locking.ts';
import { PreflightError, probeGuard } from '../src/sql/forms.ts';

const suite = dsoSuite(1);
const show = (r: CliResult) => `exit ${r.code}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`;
let roles = 0;

const routing = {
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
  filters: [
    filter('route-chairs', 'sf', { all: [{ fact: 'row', path: '$.item', operator: 'equal', value: 'chair' }] }, [
      { type: 'transfer', mapping: 'sf-to-chicago' },
    ]),
  ],
};

/** A config of the env whose server `server` is reached as `role` (the others as the superuser). */
async function configAs(e: DsoEnv, server: string, role: string, password: string): Promise<string> {
  const url = new URL(e.urls[server]!);
  url.username = role;
  url.password = password;
  const servers = Object.fromEntries(
    Object.entries(e.urls).map(([name, u]) => [name, { connection: name === server ? url.toString() : u }]),
  );
  const file = path.join(e.dir, `${role}.config.json`);
  await writeFile(file, JSON.stringify({ servers, rules: ['rules/*.json'] }));
  return file;
}

/** What forms enable may have left on sf's repair_request: columns, triggers, publication, slot. */
async function traces(
  e: DsoEnv,
  table = 'repair_request',
): Promise<{ columns: number; triggers: number; published: boolean; slot: boolean; identity: string }> {
  const [row] = await e.query<{ columns: number; triggers: number; published: boolean; slot: boolean; identity: string }>(
    'sf',
    `SELECT (SELECT count(*)::int FROM pg_attribute WHERE attrelid = c.oid AND attname LIKE 'dso\\_%' AND NOT attisdropped) AS columns,
            (SELECT count(*)::int FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal) AS triggers,
            EXISTS (SELECT 1 FROM pg_publication_rel WHERE prrelid = c.oid) AS published,
            EXISTS (SELECT 1 FROM pg_replication_slots WHERE database = current_database()) AS slot,
            c.relreplident::text AS identity
       FROM pg_class c WHERE c.oid = $1::regclass`,
    [table],
  );
  return row!;
}

test('every missing privilege is found by forms enable before anything changes, with the statement that fixes it; rules check finds the \
same', {
  timeout: 180_000,
}, async () => {
  const e = await suite.env({ servers: ['sf', 'chicago'], schemaSql: REPAIR_REQUEST_SQL, rules: routing });
  const n = `${process.pid}_${++roles}`;
  const [app, dso] = [`app_${n}`, `dso_${n}`];
  const [db] = await e.query<{ db: string }>('sf', 'SELECT current_database() AS db');
  const database = db!.db;
  const origin = (f: string) => `pg_catalog.pg_replication_origin_${f}`;
  // pgdso's schema and publication are its own, as in a real deployment: made again by `migrate` as the role
  await e.query(
    'sf',
    `DROP SCHEMA pgdso CASCADE; DROP PUBLICATION pgdso;
    CREATE ROLE ${app} LOGIN PASSWORD 'app-pw'; ALTER TABLE repair_request OWNER TO ${app};
    CREATE ROLE ${dso} LOGIN REPLICATION PASSWORD 'dso-pw';
    GRANT CREATE ON DATABASE "${database}" TO ${dso};
    GRANT ${app} TO ${dso};
    GRANT EXECUTE ON FUNCTION ${origin('create(text)')}, ${origin('session_setup(text)')}, ${origin('session_is_setup()')} TO ${dso}`,
  );
  const config = await configAs(e, 'sf', dso, 'dso-pw');
  const cli = (args: string[]) => runCli([...args, '--config', config]);
  const migrated = await cli(['migrate', '--server', 'sf']);
  assert.equal(migrated.code, 0, show(migrated));
  const before = await traces(e);
  assert.deepEqual(before, { columns: 0, triggers: 0, published: false, slot: false, identity: 'd' });

  const cases: Array<{ what: string; take: string; give: string; expect: string[] }> = [
    {
      what: 'REPLICATION',
      take: `ALTER ROLE ${dso} NOREPLICATION`,
      give: `ALTER ROLE ${dso} REPLICATION`,
      expect: [`ALTER ROLE "${dso}" REPLICATION;`],
    },
    {
      what: 'origin create',
      take: `REVOKE EXECUTE ON FUNCTION ${origin('create(text)')} FROM ${dso}`,
      give: `GRANT EXECUTE ON FUNCTION ${origin('create(text)')} TO ${dso}`,
      expect: [`GRANT EXECUTE ON FUNCTION ${origin('create(text)')} TO "${dso}";`],
    },
    {
      what: 'origin session_setup',
      take: `REVOKE EXECUTE ON FUNCTION ${origin('session_setup(text)')} FROM ${dso}`,
      give: `GRANT EXECUTE ON FUNCTION ${origin('session_setup(text)')} TO ${dso}`,
      expect: [`GRANT EXECUTE ON FUNCTION ${origin('session_setup(text)')} TO "${dso}";`],
    },
    {
      what: 'origin session_is_setup (the guard)',
      take: `REVOKE EXECUTE ON FUNCTION ${origin('session_is_setup()')} FROM ${dso}`,
      give: `GRANT EXECUTE ON FUNCTION ${origin('session_is_setup()')} TO ${dso}`,
      expect: [`GRANT EXECUTE ON FUNCTION ${origin('session_is_setup()')} TO "${dso}";`, `the ownership guard runs as ${dso}`],
    },
    {
      what: 'CREATE on the database',
      take: `REVOKE CREATE ON DATABASE "${database}" FROM ${dso}`,
      give: `GRANT CREATE ON DATABASE "${database}" TO ${dso}`,
      expect: [`GRANT CREATE ON DATABASE "${database}" TO "${dso}";`],
    },
    {
      what: "membership of the form's owner",
      take: `REVOKE ${app} FROM ${dso}`,
      give: `GRANT ${app} TO ${dso}`,
      expect: [`GRANT "${app}" TO "${dso}";`, `owned by ${app}`],
    },
    {
      what: 'DELETE on the form',
      take: `REVOKE DELETE ON repair_request FROM ${app}`,
      give: `GRANT DELETE ON repair_request TO ${app}`,
      expect: [`GRANT DELETE ON "public"."repair_request" TO "${dso}";`],
    },
    {
      what: 'USAGE on the schema',
      take: 'REVOKE USAGE ON SCHEMA public FROM PUBLIC',
      give: 'GRANT USAGE ON SCHEMA public TO PUBLIC',
      expect: [`GRANT USAGE ON SCHEMA "public" TO "${dso}";`],
    },
    {
      what: 'the publication',
      take: 'ALTER PUBLICATION pgdso OWNER TO CURRENT_USER',
      give: `ALTER PUBLICATION pgdso OWNER TO ${dso}`,
      expect: [`ALTER PUBLICATION "pgdso" OWNER TO "${dso}";`],
    },
  ];
  for (const c of cases) {
    await e.query('sf', c.take);
    const [enable, check] = [await cli(['forms', 'enable', '--server', 'sf', '--form', 'repair_request']), await cli(['rules', 'check'])];
    await e.query('sf', c.give);
    assert.equal(enable.code, 1, `${c.what}: ${show(enable)}`);
    assert.match(enable.stderr, /nothing was changed/, `${c.what}: ${show(enable)}`);
    for (const text of c.expect) {
      assert.ok(enable.stderr.includes(text), `${c.what}: forms enable should say ${JSON.stringify(text)}: ${show(enable)}`);
      assert.ok(check.stderr.includes(text), `${c.what}: rules check should say ${JSON.stringify(text)}: ${show(check)}`);
    }
    assert.equal(check.code, 2, `${c.what}: ${show(check)}`);
    assert.deepEqual(await traces(e), before, `${c.what}: forms enable changed something before refusing`);
  }

  // everything granted: enabled, and rules check agrees
  const enabled = await cli(['forms', 'enable', '--server', 'sf', '--form', 'repair_request']);
  assert.equal(enabled.code, 0, show(enabled));
  assert.equal((await e.cli(['forms', 'enable', '--server', 'chicago', '--form', 'repair_request'])).code, 0);
  assert.deepEqual(await traces(e), { columns: 17, triggers: 3, published: true, slot: true, identity: 'f' });
  const check = await cli(['rules', 'check']);
  assert.equal(check.code, 0, show(check));
  assert.match(check.stdout, /^ok: /m, show(check));
  // run again: nothing left to do, no lock taken
  const again = await cli(['forms', 'enable', '--server', 'sf', '--form', 'repair_request']);
  assert.equal(again.code, 0, show(again));
  assert.match(again.stdout, /nothing to change/, show(again));
  // once enabled, the right to alter the form is not needed any more (the engine never alters it)
  await e.query('sf', `REVOKE ${app} FROM ${dso}; GRANT SELECT, INSERT, UPDATE, DELETE ON repair_request TO ${dso}`);
  const without = await cli(['rules', 'check']);
  assert.equal(without.code, 0, show(without));
  // but a form missing something again needs it, and both commands say so
  await e.query('sf', 'ALTER TABLE repair_request REPLICA IDENTITY DEFAULT');
  const [stale, refused] = [await cli(['rules', 'check']), await cli(['forms', 'enable', '--server', 'sf', '--form', 'repair_request'])];
  for (const r of [stale, refused]) assert.ok(r.stderr.includes(`GRANT "${app}" TO "${dso}";`), show(r));
  assert.match(stale.stderr, /missing: replica identity full on public\.repair_request/, show(stale));
});

test('the guard probe runs the real guard as the application role: a guard that would fail for the application is refused, one that \
works passes', async () => {
  const e = await suite.env({
    servers: ['sf'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [], filters: [] },
  });
  const n = `${process.pid}_${++roles}`;
  const [app, dso] = [`papp_${n}`, `pdso_${n}`];
  await e.query(
    'sf',
    `CREATE ROLE ${app}; ALTER TABLE repair_request OWNER TO ${app};
    CREATE ROLE ${dso} LOGIN PASSWORD 'pw'; GRANT ${app} TO ${dso}; GRANT USAGE ON SCHEMA pgdso TO ${dso};
    GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_session_is_setup() TO ${dso}`,
  );
  const url = new URL(e.urls.sf!);
  url.username = dso;
  url.password = 'pw';
  const client = new pg.Client({ connectionString: url.toString() });
  await client.connect();
  const probe = async () => {
    await client.query('BEGIN');
    try {
      await probeGuard(client, 'public', 'repair_request');
    } finally {
      await client.query('ROLLBACK');
    }
  };
  try {
    await probe(); // SECURITY DEFINER, owned by a superuser: works for anyone
    // a guard that runs as its caller: fine for pgdso (granted), fails for the application
    await e.query('sf', 'ALTER FUNCTION pgdso.row_guard() SECURITY INVOKER');
    await assert.rejects(probe(), (err: Error) => {
      assert.ok(err instanceof PreflightError, String(err));
      assert.match(
        err.message,
        /the ownership guard does not work \(42501: permission denied for function pg_replication_origin_session_is_setup\)/,
      );
      assert.match(err.message, /fix: ALTER FUNCTION pgdso\.row_guard\(\) SECURITY DEFINER;/);
      return true;
    });
    // nothing of the probe remains
    assert.deepEqual((await client.query(`SELECT to_regclass('pg_temp.pgdso_guard_probe') AS t, current_user AS who`)).rows, [
      { t: null, who: dso },
    ]);
  } finally {
    await client.end();
  }
});

test('settings and versions: each shortfall is a finding with its statement; PostgreSQL 13 is refused', () => {
  const facts: ServerFacts = {
    role: 'pgdso',
    superuser: false,
    replication: true,
    versionNum: 180004,
    walLevel: 'logical',
    maxSlots: 10,
    usedSlots: 1,
    maxWalSenders: 10,
    usedWalSenders: 1,
    slotExists: false,
    slotActive: false,
    canCreateInDatabase: true,
    database: 'ar',
    execute: {
      'pg_catalog.pg_replication_origin_create(text)': true,
      'pg_catalog.pg_replication_origin_session_setup(text)': true,
      'pg_catalog.pg_replication_origin_session_is_setup()': true,
    },
  };
  assert.deepEqual(serverChecks(facts), []);
  const fixes = (f: Partial<ServerFacts>) => serverChecks({ ...facts, ...f }).map((c) => c.fix);
  assert.deepEqual(fixes({ walLevel: 'replica' }), ['ALTER SYSTEM SET wal_level = logical; -- then restart PostgreSQL']);
  assert.deepEqual(fixes({ usedSlots: 10 }), ['ALTER SYSTEM SET max_replication_slots = 11; -- then restart PostgreSQL']);
  assert.deepEqual(fixes({ usedSlots: 10, slotExists: true }), [], "pgdso's own slot needs no free one");
  assert.deepEqual(fixes({ usedWalSenders: 10 }), ['ALTER SYSTEM SET max_wal_senders = 11; -- then restart PostgreSQL']);
  assert.deepEqual(
    fixes({ superuser: true, replication: false, canCreateInDatabase: false, execute: {} }),
    [],
    'a superuser needs no grant',
  );
  for (const version of [140000, 150010, 180004]) assert.equal(versionCheck(version), null, String(version));
  for (const version of [130012, 120000, 90624]) {
    const refusal = versionCheck(version);
    assert.match(refusal?.message ?? '', /not supported: pgdso needs PostgreSQL 14 to 18/, String(version));
    assert.match(refusal?.message ?? '', /superuser-only/);
    assert.deepEqual(serverChecks({ ...facts, versionNum: version }), [refusal], 'on 13 the version is the one finding');
  }
  assert.match(versionCheck(130012)!.message, /PostgreSQL 13 \(server_version_num 130012\)/);
  assert.deepEqual(
    [parseDuration('5s'), parseDuration('500ms'), parseDuration('250'), parseDuration('soon'), parseDuration('0')],
    [5000, 500, 250, null, null],
  );
});

test("forms enable behind an open transaction gives up within its lock timeout, names the blocking session and changes nothing; the \
application's reads wait no longer than that", {
  timeout: 120_000,
}, async () => {
  const e = await suite.env({ servers: ['sf', 'chicago'], schemaSql: REPAIR_REQUEST_SQL, rules: routing });
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('L-1', 'desk')`);
  const blocker = new pg.Client({ connectionString: e.urls.sf, application_name: 'open-report' });
  const reader = new pg.Client({ connectionString: e.urls.sf, application_name: 'app-reader' });
  await Promise.all([blocker.connect(), reader.connect()]);
  try {
    await blocker.query('BEGIN');
    await blocker.query('SELECT count(*) FROM repair_request');
    const blockerPid = (await blocker.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number;
    let reading = true;
    let slowest = 0;
    let reads = 0;
    const reads$ = (async () => {
      while (reading) {
        const start = Date.now();
        await reader.query(`SELECT item FROM repair_request WHERE id = 'L-1'`);
        slowest = Math.max(slowest, Date.now() - start);
        reads++;
      }
    })();
    const started = Date.now();
    const r = await e.cli([
      'forms',
      'enable',
      '--server',
      'sf',
      '--form',
      'repair_request',
      '--lock-timeout',
      '1s',
      '--lock-attempts',
      '2',
    ]);
    const took = Date.now() - started;
    reading = false;
    await reads$;
    assert.equal(r.code, 1, show(r));
    assert.match(r.stderr, /could not lock public\.repair_request within 1000 ms \(2 attempts\); nothing was changed/, show(r));
    assert.ok(r.stderr.includes(`pid ${blockerPid} `), `the blocking session's pid ${blockerPid} is named: ${show(r)}`);
    assert.match(r.stderr, /application_name "open-report", state idle in transaction/, show(r));
    assert.ok(took < 20_000, `gave up after ${took} ms`);
    assert.ok(reads > 10, `the reader kept reading (${reads} reads)`);
    assert.ok(slowest < 1000 + 750, `a read of the application waited ${slowest} ms behind forms enable (lock timeout 1000 ms)`);
    assert.deepEqual(
      await traces(e),
      { columns: 0, triggers: 0, published: false, slot: false, identity: 'd' },
      'nothing changed, and the slot created for it was dropped again',
    );
    await blocker.query('COMMIT');
    const after = await e.cli(['forms', 'enable', '--server', 'sf', '--form', 'repair_request', '--lock-timeout', '1s']);
    assert.equal(after.code, 0, show(after));
    assert.equal((await traces(e)).triggers, 3);
  } finally {
    await Promise.all([blocker.end(), reader.end()]);
  }
});

test("an UPDATE that changes the request ID is refused with P0001, for every session including one with a replication origin (the \
engine's way past the ownership guard)", async () => {
  const e = await suite.env({
    servers: ['sf'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [], filters: [] },
  });
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('R-1', 'desk')`);
  const message =
    'pgdso: the request ID of repair_request cannot change (request R-1 -> R-2): request IDs are immutable, the copies ' +
    'of a request on other servers are found by it';
  await assert.rejects(e.query('sf', `UPDATE repair_request SET id = 'R-2' WHERE id = 'R-1'`), { code: 'P0001', message });
  const engineLike = new pg.Client({ connectionString: e.urls.sf });
  await engineLike.connect();
  try {
    await engineLike.query(`SELECT pg_replication_origin_create('pgdso-test-origin-${process.pid}')`);
    await engineLike.query(`SELECT pg_replication_origin_session_setup('pgdso-test-origin-${process.pid}')`);
    await assert.rejects(engineLike.query(`UPDATE repair_request SET id = 'R-2' WHERE id = 'R-1'`), { code: 'P0001', message });
    await engineLike.query(`SELECT pg_replication_origin_session_reset()`);
    await engineLike.query(`SELECT pg_replication_origin_drop('pgdso-test-origin-${process.pid}')`);
  } finally {
    await engineLike.end();
  }
  // the key in the SET list unchanged, and any other update, pass (and count once)
  await e.query('sf', `UPDATE repair_request SET id = 'R-1', status = 'open' WHERE id = 'R-1'`);
  await e.query('sf', `UPDATE repair_request SET status = 'closed' WHERE id = 'R-1'`);
  assert.deepEqual(await e.query('sf', `SELECT id, status, dso_version FROM repair_request`), [
    { id: 'R-1', status: 'closed', dso_version: '3' },
  ]);
});

/** Runs statements in a session with a replication origin set up, as the engine's sessions are. */
async function asEngine(e: DsoEnv, server: string, statements: string[]): Promise<void> {
  const origin = `pgdso-test-${process.pid}-${++roles}`;
  const client = new pg.Client({ connectionString: e.urls[server] });
  await client.connect();
  try {
    await client.query('SELECT pg_replication_origin_create($1)', [origin]);
    await client.query('SELECT pg_replication_origin_session_setup($1)', [origin]);
    for (const sql of statements) await client.query(sql);
    await client.query('SELECT pg_replication_origin_session_reset()');
    await client.query('SELECT pg_replication_origin_drop($1)', [origin]);
  } finally {
    await client.end();
  }
}

test('TRUNCATE is refused while the form holds read-only copies or masters with copies elsewhere, and allowed on a form with no linked \
rows', async () => {
  const e = await suite.env({
    servers: ['sf'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [], filters: [] },
  });
  const count = async () => Number((await e.query<{ n: string }>('sf', 'SELECT count(*) AS n FROM repair_request'))[0]!.n);
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('T-1', 'desk'), ('T-2', 'lamp')`);
  await e.query('sf', 'TRUNCATE repair_request');
  assert.equal(await count(), 0, 'a form with no linked rows truncates');

  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, dso_master, dso_current_server) VALUES ('T-3', 'chair', false, 'chicago'),
      ('T-4', 'desk', true, null)`,
  );
  await assert.rejects(e.query('sf', 'TRUNCATE repair_request'), {
    code: 'P0001',
    message: 'pgdso: repair_request cannot be truncated: it holds read-only copies of requests that are owned by chicago',
  });
  assert.equal(await count(), 2, 'the read-only copy survived');
  // the engine's sessions pass, as they pass the ownership guard
  await asEngine(e, 'sf', ['BEGIN', 'TRUNCATE repair_request', 'ROLLBACK', `DELETE FROM repair_request WHERE id = 'T-3'`]);

  await e.query('sf', `INSERT INTO repair_request (id, item, dso_to_server) VALUES ('T-5', 'desk', 'tokyo')`);
  await assert.rejects(e.query('sf', 'TRUNCATE repair_request'), (err: { code?: string; message?: string; hint?: string }) => {
    assert.equal(err.code, 'P0001');
    assert.equal(
      err.message,
      'pgdso: repair_request cannot be truncated: it holds master copies of requests with copies on tokyo, which ' +
        'TRUNCATE would leave behind',
    );
    assert.match(err.hint ?? '', /DELETE the rows instead .*pgdso forms disable/);
    return true;
  });
  assert.equal(await count(), 2);
  // a master received from another server, whose copy there is read-only: without it that copy has no master
  await e.query('sf', `DELETE FROM repair_request WHERE id = 'T-5'`);
  await e.query('sf', `INSERT INTO repair_request (id, item, dso_from_server) VALUES ('T-6', 'stool', 'paris')`);
  await assert.rejects(e.query('sf', 'TRUNCATE repair_request'), {
    code: 'P0001',
    message:
      'pgdso: repair_request cannot be truncated: it holds master copies of requests with copies on paris, which ' +
      'TRUNCATE would leave behind',
  });
  assert.equal(await count(), 2);
});

const PARTS_SQL = `
CREATE TABLE parts (id integer PRIMARY KEY, item text NOT NULL, status text NOT NULL DEFAULT 'new') PARTITION BY HASH (id);
CREATE TABLE parts_0 PARTITION OF parts FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE parts_1 PARTITION OF parts FOR VALUES WITH (MODULUS 2, REMAINDER 1)`;

test('a hash-partitioned form: forms enable and rules check agree, a transfer with ownership reaches the peer, the guards hold on every \
partition', {
  timeout: 120_000,
}, async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: PARTS_SQL,
    rules: {
      mappings: [{ name: 'parts-to-chicago', from: { server: 'sf', form: 'parts' }, to: { server: 'chicago', form: 'parts' } }],
      filters: [
        {
          name: 'all-parts',
          on: { server: 'sf', form: 'parts', ops: ['insert'] },
          actions: [{ type: 'transfer', mapping: 'parts-to-chicago' }],
        },
      ],
    },
  });
  for (const server of ['sf', 'chicago']) {
    const r = await e.cli(['forms', 'enable', '--server', server, '--form', 'parts']);
    assert.equal(r.code, 0, show(r));
  }
  const check = await e.cli(['rules', 'check']);
  assert.equal(check.code, 0, show(check));
  const identities = await e.query<{ relname: string; relreplident: string }>(
    'sf',
    `SELECT relname, relreplident::text FROM pg_class WHERE relname IN ('parts', 'parts_0', 'parts_1') ORDER BY 1`,
  );
  assert.deepEqual(
    identities.map((r) => r.relreplident),
    ['f', 'f', 'f'],
  );

  const engine = e.engine();
  await e.query('sf', `INSERT INTO parts (id, item) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')`);
  const arrived = await until(engine, 'the parts did not reach chicago', async () => {
    const rows = await e.query<{ id: number; dso_master: boolean; dso_from_server: string }>(
      'chicago',
      'SELECT id, dso_master, dso_from_server FROM parts ORDER BY id',
    );
    const sources = await e.query('sf', 'SELECT 1 FROM parts WHERE NOT dso_master');
    return rows.length === 4 && sources.length === 4 && rows;
  });
  assert.deepEqual(
    arrived,
    [1, 2, 3, 4].map((id) => ({ id, dso_master: true, dso_from_server: 'sf' })),
  );
  await engine.stop();

  // the row guard, inherited by each partition, and the TRUNCATE guard on each partition
  await assert.rejects(e.query('sf', `UPDATE parts SET status = 'mine' WHERE id = 1`), {
    code: 'P0001',
    message: 'pgdso: request 1 of parts is owned by chicago',
  });
  for (const relation of ['parts', 'parts_0', 'parts_1']) {
    await assert.rejects(e.query('sf', `TRUNCATE ${relation}`), { code: 'P0001' }, relation);
  }
  await assert.rejects(e.query('chicago', `UPDATE parts SET id = 10 WHERE id = 1`), {
    code: 'P0001',
    message: /the request ID of parts cannot change \(request 1 -> 10\)/,
  });

  // a partition without full identity (as one attached later): rules check names it, forms enable fixes it
  await e.query('sf', 'ALTER TABLE parts_1 REPLICA IDENTITY DEFAULT');
  const stale = await e.cli(['rules', 'check']);
  assert.equal(stale.code, 2, show(stale));
  assert.match(
    stale.stderr,
    new RegExp(
      String.raw`form public\.parts is not enabled \(missing: replica identity full on public\.parts_1\): ` +
        'run `pgdso forms enable --server sf --form parts`',
    ),
    show(stale),
  );
  const fixed = await e.cli(['forms', 'enable', '--server', 'sf', '--form', 'parts']);
  assert.equal(fixed.code, 0, show(fixed));
  assert.match(fixed.stdout, /ALTER TABLE ONLY "public"\."parts_1" REPLICA IDENTITY FULL/, show(fixed));
  const clean = await e.cli(['rules', 'check']);
  assert.equal(clean.code, 0, show(clean));
});
