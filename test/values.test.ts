// Values and field options: what a transfer carries, exactly, and the facts filters compare.
// - every type survives the trip (text kept from the WAL, cast on the target), whatever the
//   source database's output settings;
// - an unchanged TOAST value is neither lost nor nulled by an update of another column;
// - fields.byName / map / exclude / set, a target form with another name and key type;
// - filters on `changed`, `old`, `origin`, and numeric comparisons of int8/numeric columns.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { waitFor } from './support/wait.ts';
import { dsoSuite, REPAIR_REQUEST_SQL, type DsoEnv, type EngineProcess } from './support/dso.ts';

const suite = dsoSuite(2);

async function makeEnv(servers: string[], schemaSql: string, forms: string[], rules: Record<string, unknown>): Promise<DsoEnv> {
  const created = await suite.env({ servers, schemaSql, forms, rules });
  return created;
}

type Row = Record<string, unknown>;

function on(server: string, form: string, ops: string[] = ['insert', 'update']) {
  return { server, form, ops };
}

function transferMapping(name: string, from: [string, string], to: [string, string], extra: Row = {}): Row {
  return { name, from: { server: from[0], form: from[1] }, to: { server: to[0], form: to[1] }, ...extra };
}

async function rowOf(e: DsoEnv, server: string, form: string, id: string | number): Promise<Row | undefined> {
  return (await e.query(server, `SELECT * FROM ${form} WHERE id = $1`, [id]))[0];
}

/** waitFor with the engine's output in the failure message. */
function until<T>(engine: EngineProcess, what: string, fn: () => T | Promise<T>, timeoutMs = 15_000): Promise<T> {
  return waitFor(fn, { timeoutMs, message: () => `${what}; engine output:\n${engine.output.slice(-4000)}` });
}

// ---------------------------------------------------------------------------------------------
// 1. Lossless values

const SAMPLE_SQL = `
CREATE TYPE mood AS ENUM ('sad', 'ok', 'it''s "complicated", {really}');
CREATE DOMAIN positive_amount AS numeric(14,2) CHECK (VALUE > 0);
CREATE TABLE sample (
  id text PRIMARY KEY,
  big int8, big_neg int8, exact numeric(40,20), free_numeric numeric,
  small_float float8, huge_float float8, third float8, real_val float4,
  at_tz timestamptz, at_local timestamp, day date, clock time, clock_tz timetz, span interval,
  uid uuid, doc jsonb, doc_json json,
  note text, empty_note text, null_note text, short_name varchar(20), fixed char(5),
  tags text[], nums int8[], grid int4[],
  blob bytea, flag boolean, addr inet, net cidr, mac macaddr,
  amount positive_amount, feeling mood, feelings mood[]
)`;

const SAMPLE_COLUMNS = [
  'big',
  'big_neg',
  'exact',
  'free_numeric',
  'small_float',
  'huge_float',
  'third',
  'real_val',
  'at_tz',
  'at_local',
  'day',
  'clock',
  'clock_tz',
  'span',
  'uid',
  'doc',
  'doc_json',
  'note',
  'empty_note',
  'null_note',
  'short_name',
  'fixed',
  'tags',
  'nums',
  'grid',
  'blob',
  'flag',
  'addr',
  'net',
  'mac',
  'amount',
  'feeling',
  'feelings',
];

// A request of every kind of value: values near the limits of JavaScript numbers, microseconds,
// unicode, and every character an array literal, a JSON text or a CSV line treats specially.
const SAMPLE_INSERT = `
INSERT INTO sample VALUES
('V-1',
 9007199254740993, -9223372036854775808, '12345678901234567890.12345678901234567890', '-0.000000000000000000000000000001234500',
 0.1, 1e308, 1::float8 / 3, 3.4028235e38,
 '2024-02-29 23:59:59.123456+05:30', '1999-12-31 23:59:59.999999', '2024-02-01', '23:59:59.999999', '12:34:56.789012-03:30',
 '1 year 2 mons 3 days -04:05:06.789012',
 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
 $j$\{"a": {"b": [1, 2.50, {"c": "ünïcødé ✓ 😀 \\"quoted\\" \\\\ back"}]}, "n": 12345678901234567890.123456789, \
"e": "", "z": null}$j$,
 $j$\{"keep": "json keeps  spacing",  "dup": 1, "dup": 2}$j$,
 E'He said "hi", it''s {a,b} \\\\ back\\nslash\\nnew line\\ttab 🎉 NULL ,;|\\r\\nend',
 '', NULL, 'ünïcødé 😀', 'ab',
 ARRAY[NULL, 'NULL', '', 'a,b', '{x}', 'quote"d', E'back\\\\slash', ' spaced ', '😀', E'line\\nbreak']::text[],
 '{1,NULL,9007199254740993,-9223372036854775808}', '{{1,2},{3,NULL}}',
 '\\x00ff5c2c7b7d220a'::bytea, false, '2001:db8::1/64', '192.168.0.0/16', '08:00:2b:01:02:03',
 1234567890.12, 'it''s "complicated", {really}', '{sad,"it''s \\"complicated\\", {really}",NULL}'),
('V-2',
 0, 9223372036854775807, 'NaN', 'Infinity',
 'NaN', '-Infinity', '-0', '1.17549435e-38',
 'infinity', '-infinity', '0044-03-15 BC', '00:00:00', '00:00:00+14', '-178000000 years',
 NULL, '[]', 'null',
 E'\\uFEFFstarts with a byte order mark', E'\\\\', '"', '{}', 'x',
 '{}', '{}', '{}',
 ''::bytea, true, '::1', '::/0', 'ff:ff:ff:ff:ff:ff',
 0.01, 'sad', '{}'),
('V-3', ${Array.from({ length: SAMPLE_COLUMNS.length }, () => 'NULL').join(', ')});
INSERT INTO sample (id, day, span, third, real_val, at_local) VALUES ('V-4', '2024-02-01', '-1 days -02:03:04',
  2::float8 / 3, 3.4028235e38, '2024-03-04 05:06:07.000001')`;
const SAMPLE_IDS = ['V-1', 'V-2', 'V-3', 'V-4'];

/** Each column as PostgreSQL prints it. */
function sampleSelect(): string {
  return `SELECT id, ${SAMPLE_COLUMNS.map((c) => `${c}::text AS ${c}`).join(', ')} FROM sample ORDER BY id`;
}

/**
 * The samples of one server, printed by a session with fixed output settings (the database's
 * own defaults may differ: see the second test), so both sides are printed alike.
 */
async function printedSamples(e: DsoEnv, server: string): Promise<{ rows: Row[]; digest: string }> {
  const client = new pg.Client({
    connectionString: e.urls[server],
    options: '-c datestyle=ISO,MDY -c intervalstyle=postgres -c extra_float_digits=1 -c timezone=UTC -c bytea_output=hex',
  });
  await client.connect();
  try {
    const rows = (await client.query(sampleSelect())).rows as Row[];
    const digest = (await client.query(`SELECT md5(string_agg(t::text, E'\\n' ORDER BY id)) AS d FROM (${sampleSelect()}) t`)).rows[0]
      .d as string;
    return { rows, digest };
  } finally {
    await client.end();
  }
}

function sampleRules() {
  return {
    mappings: [transferMapping('sf-samples', ['sf', 'sample'], ['chicago', 'sample'], { transferMode: 'data-only' })],
    filters: [{ name: 'copy-samples', on: on('sf', 'sample'), actions: [{ type: 'transfer', mapping: 'sf-samples' }] }],
  };
}

async function assertSamplesEqual(e: DsoEnv, engine: EngineProcess): Promise<void> {
  const count = async (server: string, sql: string) => (await e.query<{ n: number }>(server, sql))[0]!.n;
  // every request arrives, or fails into pending_errors (reported below)
  await until(
    engine,
    'the samples did not reach chicago',
    async () =>
      (await count('chicago', 'SELECT count(*)::int AS n FROM sample')) +
        (await count('sf', 'SELECT count(DISTINCT request_id)::int AS n FROM pgdso.pending_errors')) >=
      SAMPLE_IDS.length,
  );
  const source = await printedSamples(e, 'sf');
  const target = await printedSamples(e, 'chicago');
  // the source holds what was meant (so equality on the target is not vacuous)
  const v1 = source.rows.find((r) => r.id === 'V-1')!;
  assert.equal(v1.big, '9007199254740993');
  assert.equal(v1.exact, '12345678901234567890.12345678901234567890');
  assert.equal(v1.third, '0.3333333333333333');
  assert.equal(v1.at_tz, '2024-02-29 18:29:59.123456+00');
  assert.equal(v1.day, '2024-02-01');
  assert.equal(v1.empty_note, '');
  assert.equal(v1.null_note, null);
  const differences: string[] = [];
  for (const id of SAMPLE_IDS) {
    const s = source.rows.find((r) => r.id === id)!;
    const t = target.rows.find((r) => r.id === id);
    if (!t) continue;
    for (const column of SAMPLE_COLUMNS) {
      if (t[column] !== s[column])
        differences.push(`request ${id}, column ${column}: sf has ${JSON.stringify(s[column])}, chicago has ${JSON.stringify(t[column])}`);
    }
  }
  assert.deepEqual(differences, [], 'values changed on the way');
  const errors = await e.query<{ request_id: string; error: string }>(
    'sf',
    'SELECT request_id, error FROM pgdso.pending_errors ORDER BY id',
  );
  assert.deepEqual(
    errors.map((r) => `${r.request_id}: ${r.error}`),
    [],
    'requests that could not be applied',
  );
  assert.deepEqual(
    target.rows.map((r) => r.id),
    SAMPLE_IDS,
  );
  // and, as a whole, byte for byte
  assert.equal(target.digest, source.digest);
}

test('every value is equal on the target: int8 beyond 2^53, numeric(40,20), float8 extremes, microseconds, BC dates, intervals, jsonb, \
unicode, array-literal characters, empty string vs NULL, bytea, inet, domain and enum', async () => {
  const e = await makeEnv(['sf', 'chicago'], SAMPLE_SQL, ['sample'], sampleRules());
  const engine = e.engine();
  await e.query('sf', SAMPLE_INSERT);
  await assertSamplesEqual(e, engine);
  // An update carries the values again, through the update path (old and new tuples).
  await e.query('sf', `UPDATE sample SET flag = NOT coalesce(flag, false)`);
  await until(
    engine,
    'the update did not reach chicago',
    async () => (await e.query('chicago', `SELECT count(*)::int AS n FROM sample WHERE dso_version > 1`))[0]!.n === SAMPLE_IDS.length,
  );
  await assertSamplesEqual(e, engine);
  await engine.stop();
});

test('every value is equal on the target when the source database prints dates as SQL/DMY, intervals as sql_standard and floats with \
extra_float_digits = 0, and the target database has yet other styles', async () => {
  const e = await makeEnv(['sf', 'chicago'], SAMPLE_SQL, ['sample'], sampleRules());
  // Settings a DBA may well have on a database; they change how PostgreSQL prints values to
  // every session of that database, the walsender's included.
  await e.query(
    'sf',
    `DO $$ BEGIN
    EXECUTE format('ALTER DATABASE %I SET datestyle = %L', current_database(), 'SQL, DMY');
    EXECUTE format('ALTER DATABASE %I SET intervalstyle = %L', current_database(), 'sql_standard');
    EXECUTE format('ALTER DATABASE %I SET extra_float_digits = 0', current_database());
    EXECUTE format('ALTER DATABASE %I SET bytea_output = %L', current_database(), 'escape');
  END $$`,
  );
  // and the target's own, different ones (the engine's sessions there read what it sends)
  await e.query(
    'chicago',
    `DO $$ BEGIN
    EXECUTE format('ALTER DATABASE %I SET datestyle = %L', current_database(), 'Postgres, MDY');
    EXECUTE format('ALTER DATABASE %I SET intervalstyle = %L', current_database(), 'iso_8601');
  END $$`,
  );
  const engine = e.engine();
  await e.query('sf', SAMPLE_INSERT);
  await assertSamplesEqual(e, engine);
  await engine.stop();
});

// ---------------------------------------------------------------------------------------------
// 2. Unchanged TOAST values

test('an update of another column keeps the unchanged TOASTed value on the target copy (not NULL, same md5)', async () => {
  const e = await makeEnv(
    ['sf', 'chicago'],
    `CREATE TABLE bulky (id text PRIMARY KEY, status text NOT NULL DEFAULT 'new', body text);
     ALTER TABLE bulky ALTER COLUMN body SET STORAGE EXTERNAL;`,
    ['bulky'],
    {
      mappings: [transferMapping('sf-bulky', ['sf', 'bulky'], ['chicago', 'bulky'], { transferMode: 'data-only' })],
      filters: [{ name: 'copy-bulky', on: on('sf', 'bulky'), actions: [{ type: 'transfer', mapping: 'sf-bulky' }] }],
    },
  );
  const engine = e.engine();
  const bigText = `(SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 6400) i)`; // 204,800 bytes
  await e.query('sf', `INSERT INTO bulky (id, body) VALUES ('T-1', ${bigText})`);
  const [source] = await e.query<{ md5: string; len: number; toasted: boolean }>(
    'sf',
    `SELECT md5(body), octet_length(body) AS len, pg_column_toast_chunk_id(body) IS NOT NULL AS toasted FROM bulky WHERE id = 'T-1'`,
  );
  assert.equal(source!.len, 204_800);
  assert.equal(source!.toasted, true, 'the body is stored out of line on the source');
  const bodyOnChicago = async () =>
    (await e.query<{ md5: string | null; status: string }>('chicago', `SELECT md5(body), status FROM bulky WHERE id = 'T-1'`))[0];
  await until(engine, 'T-1 did not reach chicago', async () => (await bodyOnChicago())?.md5 === source!.md5);

  // An UPDATE of another column: the WAL does not repeat the unchanged TOAST value.
  await e.query('sf', `UPDATE bulky SET status = 'open' WHERE id = 'T-1'`);
  await until(engine, 'the new status did not reach chicago', async () => (await bodyOnChicago())?.status === 'open');
  assert.equal((await bodyOnChicago())?.md5, source!.md5, 'the large value is still there, unchanged');

  // Twice more, with a new large value in between.
  await e.query('sf', `UPDATE bulky SET body = ${bigText} WHERE id = 'T-1'`);
  const [changed] = await e.query<{ md5: string }>('sf', `SELECT md5(body) FROM bulky WHERE id = 'T-1'`);
  assert.notEqual(changed!.md5, source!.md5);
  await until(engine, 'the new body did not reach chicago', async () => (await bodyOnChicago())?.md5 === changed!.md5);
  await e.query('sf', `UPDATE bulky SET status = 'closed' WHERE id = 'T-1'`);
  await until(engine, 'the closed status did not reach chicago', async () => (await bodyOnChicago())?.status === 'closed');
  assert.equal((await bodyOnChicago())?.md5, changed!.md5);
  assert.equal((await e.query('sf', `SELECT count(*)::int AS n FROM pgdso.pending_errors`))[0]!.n, 0);
  assert.equal(engine.running, true, engine.output);
  await engine.stop();
});

// ---------------------------------------------------------------------------------------------
// 3. Field options

const FIELDS_SQL = `${REPAIR_REQUEST_SQL};
CREATE TABLE dispatch (
  id text PRIMARY KEY,
  location text,
  summary text,
  item text,
  status text NOT NULL DEFAULT 'unassigned',
  region text,
  priority integer,
  urgent boolean NOT NULL DEFAULT false,
  internal_note text
);
CREATE TABLE archive (
  id text PRIMARY KEY,
  item text NOT NULL,
  needs_upholstery boolean,
  status text NOT NULL DEFAULT 'triage',
  site text,
  description text,
  internal_note text DEFAULT 'none given',
  archived boolean,
  priority integer,
  region text
);`;

test('fields: byName false carries only mapped columns under their target names; exclude keeps a column out and the target default in; \
set writes string, number and boolean constants', async () => {
  const e = await makeEnv(['sf', 'chicago'], FIELDS_SQL, ['repair_request', 'dispatch', 'archive'], {
    mappings: [
      transferMapping('sf-dispatch', ['sf', 'repair_request'], ['chicago', 'dispatch'], {
        transferMode: 'data-only',
        fields: {
          byName: false,
          map: { location: 'site', summary: 'description' },
          set: { region: 'us-central', priority: 3, urgent: true },
        },
      }),
      transferMapping('sf-archive', ['sf', 'repair_request'], ['chicago', 'archive'], {
        transferMode: 'data-only',
        fields: { exclude: ['internal_note', 'status'], set: { archived: true, priority: 0, region: 'it\'s "quoted"' } },
      }),
    ],
    filters: [
      {
        name: 'dispatch-and-archive',
        on: on('sf', 'repair_request'),
        actions: [
          { type: 'transfer', mapping: 'sf-dispatch' },
          { type: 'transfer', mapping: 'sf-archive' },
        ],
      },
    ],
  });
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, needs_upholstery, status, site, description, internal_note)
                       VALUES ('F-1', 'chair', true, 'open', 'sf-hq', 'squeaks', 'secret')`,
  );
  await until(
    engine,
    'F-1 did not reach both forms on chicago',
    async () => (await rowOf(e, 'chicago', 'dispatch', 'F-1')) && (await rowOf(e, 'chicago', 'archive', 'F-1')),
  );

  const dispatch = (await rowOf(e, 'chicago', 'dispatch', 'F-1'))!;
  assert.deepEqual(
    {
      location: dispatch.location,
      summary: dispatch.summary,
      region: dispatch.region,
      priority: dispatch.priority,
      urgent: dispatch.urgent,
    },
    { location: 'sf-hq', summary: 'squeaks', region: 'us-central', priority: 3, urgent: true },
    'mapped columns under their new names, and the constants',
  );
  assert.equal(dispatch.item, null, 'byName false: item is not carried although both forms have it');
  assert.equal(dispatch.status, 'unassigned', 'byName false: status is not carried, the target default stays');
  assert.equal(dispatch.internal_note, null, 'byName false: internal_note is not carried');

  const archive = (await rowOf(e, 'chicago', 'archive', 'F-1'))!;
  assert.deepEqual(
    { item: archive.item, needs_upholstery: archive.needs_upholstery, site: archive.site, description: archive.description },
    { item: 'chair', needs_upholstery: true, site: 'sf-hq', description: 'squeaks' },
    'byName carries the columns both forms have',
  );
  assert.equal(archive.status, 'triage', 'an excluded column keeps the target default');
  assert.equal(archive.internal_note, 'none given', 'an excluded column keeps the target default');
  assert.deepEqual(
    { archived: archive.archived, priority: archive.priority, region: archive.region },
    { archived: true, priority: 0, region: 'it\'s "quoted"' },
  );

  // A later change carries the mapped columns again and still leaves the others alone.
  await e.query('sf', `UPDATE repair_request SET site = 'sf-annex', status = 'closed', internal_note = 'still secret' WHERE id = 'F-1'`);
  await until(
    engine,
    'the new site did not reach chicago',
    async () =>
      (await rowOf(e, 'chicago', 'dispatch', 'F-1'))?.location === 'sf-annex' &&
      (await rowOf(e, 'chicago', 'archive', 'F-1'))?.site === 'sf-annex',
  );
  const [dispatch2, archive2] = [(await rowOf(e, 'chicago', 'dispatch', 'F-1'))!, (await rowOf(e, 'chicago', 'archive', 'F-1'))!];
  assert.deepEqual([dispatch2.status, dispatch2.item, dispatch2.internal_note, dispatch2.priority], ['unassigned', null, null, 3]);
  assert.deepEqual([archive2.status, archive2.internal_note, archive2.archived], ['triage', 'none given', true]);
  await engine.stop();
});

// ---------------------------------------------------------------------------------------------
// 4. A target form with another name

test('a request of repair_request on sf becomes a work_order on chicago: dso_from_form and dso_to_form name each side, an integer \
request ID becomes a text one', async () => {
  const e = await makeEnv(
    ['sf', 'chicago'],
    `${REPAIR_REQUEST_SQL};
     CREATE TABLE job (id integer PRIMARY KEY, item text NOT NULL, status text NOT NULL DEFAULT 'new');
     CREATE TABLE work_order (id text PRIMARY KEY, item text, status text, site text, description text, crew text DEFAULT 'unassigned');`,
    ['repair_request', 'job', 'work_order'],
    {
      mappings: [
        transferMapping('requests-to-orders', ['sf', 'repair_request'], ['chicago', 'work_order']),
        transferMapping('jobs-to-orders', ['sf', 'job'], ['chicago', 'work_order'], { transferMode: 'data-only' }),
      ],
      filters: [
        { name: 'requests', on: on('sf', 'repair_request'), actions: [{ type: 'transfer', mapping: 'requests-to-orders' }] },
        { name: 'jobs', on: on('sf', 'job'), actions: [{ type: 'transfer', mapping: 'jobs-to-orders' }] },
      ],
    },
  );
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, status, site, description, internal_note)
      VALUES ('W-1', 'desk', 'open', 'sf', 'drawer stuck', 'n')`,
  );
  await e.query('sf', `INSERT INTO job (id, item) VALUES (42, 'lamp')`);
  await until(
    engine,
    'W-1 and job 42 did not reach chicago',
    async () =>
      (await rowOf(e, 'sf', 'repair_request', 'W-1'))?.dso_master === false &&
      (await rowOf(e, 'sf', 'job', 42))?.dso_transfer_status === 'success',
  );

  const order = (await rowOf(e, 'chicago', 'work_order', 'W-1'))!;
  assert.deepEqual(
    [order.item, order.status, order.site, order.description, order.crew],
    ['desk', 'open', 'sf', 'drawer stuck', 'unassigned'],
  );
  assert.deepEqual(
    [
      order.dso_master,
      order.dso_from_server,
      order.dso_from_form,
      order.dso_from_request_id,
      order.dso_from_mapping,
      order.dso_current_server,
      order.dso_current_form,
    ],
    [true, 'sf', 'repair_request', 'W-1', 'requests-to-orders', 'chicago', 'work_order'],
  );
  const history = order.dso_mapping_history as Row[];
  assert.equal(history.length, 1);
  assert.deepEqual(
    [history[0]!.fromServer, history[0]!.fromForm, history[0]!.fromRequestId, history[0]!.toServer, history[0]!.mapping],
    ['sf', 'repair_request', 'W-1', 'chicago', 'requests-to-orders'],
  );
  const request = (await rowOf(e, 'sf', 'repair_request', 'W-1'))!;
  assert.deepEqual(
    [
      request.dso_master,
      request.dso_transfer_status,
      request.dso_to_server,
      request.dso_to_form,
      request.dso_to_request_id,
      request.dso_to_mapping,
      request.dso_current_server,
      request.dso_current_form,
    ],
    [false, 'success', 'chicago', 'work_order', 'W-1', 'requests-to-orders', 'chicago', 'work_order'],
  );
  await assert.rejects(e.query('sf', `UPDATE repair_request SET status = 'mine' WHERE id = 'W-1'`), {
    code: 'P0001',
    message: 'pgdso: request W-1 of repair_request is owned by chicago',
  });

  // job 42 (integer ID) is work order '42' (text ID)
  const jobOrder = (await rowOf(e, 'chicago', 'work_order', '42'))!;
  assert.deepEqual(
    [
      jobOrder.item,
      jobOrder.status,
      jobOrder.dso_master,
      jobOrder.dso_from_form,
      jobOrder.dso_from_request_id,
      jobOrder.dso_current_server,
      jobOrder.dso_current_form,
    ],
    ['lamp', 'new', false, 'job', '42', 'sf', 'job'],
  );
  const job = (await rowOf(e, 'sf', 'job', 42))!;
  assert.deepEqual([job.dso_master, job.dso_to_form, job.dso_to_request_id, job.dso_current_form], [true, 'work_order', '42', 'job']);
  // the master job changes; the copy under its other name follows
  await e.query('sf', `UPDATE job SET status = 'done' WHERE id = 42`);
  await until(
    engine,
    'the job update did not reach chicago',
    async () => (await rowOf(e, 'chicago', 'work_order', '42'))?.status === 'done',
  );
  await engine.stop();
});

// ---------------------------------------------------------------------------------------------
// 5. `changed` and `old`

test('a filter on update only, with changed contains "status" and old status not closed: closing a request transfers it once; inserting \
a closed one or editing a closed one does not', async () => {
  const e = await makeEnv(['sf', 'chicago'], REPAIR_REQUEST_SQL, ['repair_request'], {
    // whenToUpdate never: edits reach chicago only if the filter transfers again
    mappings: [
      transferMapping('closed-to-chicago', ['sf', 'repair_request'], ['chicago', 'repair_request'], {
        transferMode: 'data-only',
        whenToUpdate: 'never',
      }),
    ],
    filters: [
      {
        name: 'on-closing',
        on: on('sf', 'repair_request', ['update']),
        conditions: {
          all: [
            { fact: 'changed', operator: 'contains', value: 'status' },
            { fact: 'old', path: '$.status', operator: 'notEqual', value: 'closed' },
            { fact: 'row', path: '$.status', operator: 'equal', value: 'closed' },
          ],
        },
        actions: [{ type: 'transfer', mapping: 'closed-to-chicago' }],
      },
    ],
  });
  const engine = e.engine();
  const onChicago = (id: string) => rowOf(e, 'chicago', 'repair_request', id);

  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, status) VALUES ('C-1', 'desk', 'closed'), ('O-1', 'chair', 'open'),
      ('O-2', 'lamp', 'open'), ('O-3', 'sofa', 'open')`,
  );
  // not a status change: no transfer
  await e.query('sf', `UPDATE repair_request SET description = 'edited while open' WHERE id = 'O-2'`);
  // the same status written again: nothing changed, no transfer
  await e.query('sf', `UPDATE repair_request SET status = 'closed' WHERE id = 'C-1'`);
  // open -> closed: transferred
  await e.query('sf', `UPDATE repair_request SET status = 'closed', description = 'fixed' WHERE id = 'O-1'`);
  await until(engine, 'closing O-1 did not transfer it', async () => (await onChicago('O-1'))?.description === 'fixed');
  assert.equal(await onChicago('C-1'), undefined, 'a request inserted closed is not transferred');
  assert.equal(await onChicago('O-2'), undefined, 'an open request is not transferred');
  assert.equal((await rowOf(e, 'sf', 'repair_request', 'C-1'))?.dso_transfer_status, null);
  const firstCopy = (await onChicago('O-1'))!;
  assert.equal(firstCopy.status, 'closed');

  // Editing closed requests does not transfer them (again).
  await e.query('sf', `UPDATE repair_request SET description = 'edited after closing' WHERE id IN ('O-1', 'C-1')`);
  await e.query('sf', `UPDATE repair_request SET needs_upholstery = true WHERE id = 'O-1'`);
  // barrier: a later closing, which the engine handles after the edits above
  await e.query('sf', `UPDATE repair_request SET status = 'closed' WHERE id = 'O-2'`);
  await until(engine, 'closing O-2 did not transfer it', async () => (await onChicago('O-2'))?.status === 'closed');
  assert.equal((await onChicago('O-2'))?.description, 'edited while open');
  const secondLook = (await onChicago('O-1'))!;
  assert.equal(secondLook.dso_version, firstCopy.dso_version, 'the copy of O-1 was not written again');
  assert.equal(secondLook.description, 'fixed');
  assert.equal(secondLook.needs_upholstery, false);
  assert.equal(await onChicago('C-1'), undefined);

  // Reopened and closed again: transferred again, with the values of the second closing.
  await e.query('sf', `UPDATE repair_request SET status = 'reopened' WHERE id = 'O-1'`);
  await e.query('sf', `UPDATE repair_request SET status = 'closed', description = 'fixed twice' WHERE id = 'O-1'`);
  await until(engine, 'closing O-1 again did not transfer it', async () => (await onChicago('O-1'))?.description === 'fixed twice');
  assert.equal(Number((await onChicago('O-1'))!.dso_version), Number(firstCopy.dso_version) + 1, 'one more write for one more closing');
  assert.equal((await onChicago('O-1'))?.needs_upholstery, true);
  assert.equal(await onChicago('O-3'), undefined);
  await engine.stop();
});

// ---------------------------------------------------------------------------------------------
// 6. `origin`

test('origin: a chicago filter on origin "sf" routes requests that came from sf\'s engine; one on origin null routes those chicago users \
entered', async () => {
  const e = await makeEnv(
    ['sf', 'chicago', 'tokyo'],
    `${REPAIR_REQUEST_SQL}; CREATE TABLE local_request (LIKE repair_request INCLUDING DEFAULTS, PRIMARY KEY (id));`,
    ['repair_request', 'local_request'],
    {
      mappings: [
        transferMapping('sf-to-chicago', ['sf', 'repair_request'], ['chicago', 'repair_request']),
        transferMapping('relay-to-tokyo', ['chicago', 'repair_request'], ['tokyo', 'repair_request'], { transferMode: 'data-only' }),
        transferMapping('local-to-tokyo', ['chicago', 'repair_request'], ['tokyo', 'local_request'], { transferMode: 'data-only' }),
      ],
      filters: [
        { name: 'all-to-chicago', on: on('sf', 'repair_request', ['insert']), actions: [{ type: 'transfer', mapping: 'sf-to-chicago' }] },
        {
          name: 'relay-from-sf',
          on: on('chicago', 'repair_request'),
          conditions: { all: [{ fact: 'origin', operator: 'equal', value: 'sf' }] },
          actions: [{ type: 'transfer', mapping: 'relay-to-tokyo' }],
        },
        {
          name: 'entered-in-chicago',
          on: on('chicago', 'repair_request'),
          conditions: { all: [{ fact: 'origin', operator: 'equal', value: null }] },
          actions: [{ type: 'transfer', mapping: 'local-to-tokyo' }],
        },
      ],
    },
  );
  const engine = e.engine();
  await e.query('chicago', `INSERT INTO repair_request (id, item, description) VALUES ('CHI-1', 'desk', 'entered in chicago')`);
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('SF-1', 'chair', 'entered in sf')`);
  await until(
    engine,
    'CHI-1 and SF-1 did not reach tokyo',
    async () => (await rowOf(e, 'tokyo', 'local_request', 'CHI-1')) && (await rowOf(e, 'tokyo', 'repair_request', 'SF-1')),
  );

  const relayed = (await rowOf(e, 'tokyo', 'repair_request', 'SF-1'))!;
  assert.deepEqual(
    [relayed.description, relayed.dso_from_server, relayed.dso_from_mapping],
    ['entered in sf', 'chicago', 'relay-to-tokyo'],
  );
  assert.deepEqual(
    (relayed.dso_mapping_history as Row[]).map((h) => `${h.fromServer}->${h.toServer}`),
    ['sf->chicago', 'chicago->tokyo'],
  );
  const local = (await rowOf(e, 'tokyo', 'local_request', 'CHI-1'))!;
  assert.deepEqual([local.description, local.dso_from_server, local.dso_from_mapping], ['entered in chicago', 'chicago', 'local-to-tokyo']);
  assert.equal(await rowOf(e, 'tokyo', 'repair_request', 'CHI-1'), undefined, 'a request a chicago user entered has origin null');
  assert.equal(await rowOf(e, 'tokyo', 'local_request', 'SF-1'), undefined, "a request sf's engine wrote has origin sf");

  // A chicago user changes the request that came from sf (chicago owns it now): origin null.
  await e.query('chicago', `UPDATE repair_request SET description = 'edited in chicago' WHERE id = 'SF-1'`);
  await until(
    engine,
    'the chicago edit of SF-1 was not routed as a local change',
    async () => (await rowOf(e, 'tokyo', 'local_request', 'SF-1'))?.description === 'edited in chicago',
  );
  assert.equal((await rowOf(e, 'tokyo', 'repair_request', 'SF-1'))?.description, 'entered in sf', 'not relayed as coming from sf');
  await engine.stop();
});

// ---------------------------------------------------------------------------------------------
// 7. Numeric comparisons

test('int8 and numeric columns compare as numbers: greaterThan a constant, greaterThan another int8 column, equal to a \
number', async () => {
  const targets = ['over_100', 'over_limit', 'equal_42', 'price_from_10_5'];
  const e = await makeEnv(
    ['sf', 'chicago'],
    [
      `CREATE TABLE stock (id text PRIMARY KEY, qty bigint, lim bigint, price numeric(12,2))`,
      ...targets.map((t) => `CREATE TABLE ${t} (id text PRIMARY KEY, qty bigint, lim bigint, price numeric(12,2))`),
    ].join(';\n'),
    ['stock', ...targets],
    {
      mappings: targets.map((t) => transferMapping(`to-${t}`, ['sf', 'stock'], ['chicago', t], { transferMode: 'data-only' })),
      filters: [
        {
          name: 'over-100',
          on: on('sf', 'stock'),
          conditions: { all: [{ fact: 'row', path: '$.qty', operator: 'greaterThan', value: 100 }] },
          actions: [{ type: 'transfer', mapping: 'to-over_100' }],
        },
        {
          name: 'over-limit',
          on: on('sf', 'stock'),
          conditions: { all: [{ fact: 'row', path: '$.qty', operator: 'greaterThan', value: { fact: 'row', path: '$.lim' } }] },
          actions: [{ type: 'transfer', mapping: 'to-over_limit' }],
        },
        {
          name: 'equal-42',
          on: on('sf', 'stock'),
          conditions: { all: [{ fact: 'row', path: '$.qty', operator: 'equal', value: 42 }] },
          actions: [{ type: 'transfer', mapping: 'to-equal_42' }],
        },
        {
          name: 'price-from-10.5',
          on: on('sf', 'stock'),
          conditions: { all: [{ fact: 'row', path: '$.price', operator: 'greaterThanInclusive', value: 10.5 }] },
          actions: [{ type: 'transfer', mapping: 'to-price_from_10_5' }],
        },
      ],
    },
  );
  const engine = e.engine();
  // As text, "9" > "10" and "101" < "9": only a numeric comparison gets these right.
  await e.query(
    'sf',
    `INSERT INTO stock (id, qty, lim, price) VALUES
    ('A', 42, 100, 10.50),
    ('B', 101, 9, 10.49),
    ('C', 9, 10, 1000.00),
    ('D', 9007199254740993, 9007199254740992, 9.99),
    ('E', NULL, NULL, NULL)`,
  );
  // every row ends up in at least one target except E; wait for the last one (D) in each target it belongs to
  const idsIn = async (form: string) => (await e.query<{ id: string }>('chicago', `SELECT id FROM ${form} ORDER BY id`)).map((r) => r.id);
  await until(
    engine,
    'the stock rows were not routed',
    async () =>
      (await idsIn('over_100')).includes('D') &&
      (await idsIn('over_limit')).includes('D') &&
      (await idsIn('price_from_10_5')).includes('C') &&
      (await idsIn('equal_42')).includes('A'),
  );
  // the last insert's transaction is applied as one: nothing more comes for it
  assert.deepEqual(await idsIn('over_100'), ['B', 'D'], 'qty > 100 (9007199254740993, beyond 2^53, too)');
  assert.deepEqual(await idsIn('over_limit'), ['B', 'D'], 'qty > lim as numbers (9 > 10 is false, 101 > 9 is true)');
  assert.deepEqual(await idsIn('equal_42'), ['A'], 'int8 "42" equals the number 42');
  assert.deepEqual(await idsIn('price_from_10_5'), ['A', 'C'], 'numeric 10.50 >= 10.5, 10.49 is not, 1000.00 is');
  assert.equal((await rowOf(e, 'chicago', 'over_100', 'D'))?.qty, '9007199254740993', 'and the value is carried exactly');

  // An update changes the outcome: B drops to 100 (not > 100), A rises to 1000.
  await e.query('sf', `UPDATE stock SET qty = 1000 WHERE id = 'A'`);
  await until(engine, 'A did not reach over_100', async () => (await idsIn('over_100')).includes('A'));
  assert.equal((await rowOf(e, 'chicago', 'over_100', 'A'))?.qty, '1000');
  await engine.stop();
});

test('a column whose type is a domain compares as its base type (a domain over bigint gives numbers)', async () => {
  const e = await makeEnv(
    ['sf', 'chicago'],
    `CREATE DOMAIN quantity AS bigint CHECK (VALUE >= 0); CREATE DOMAIN big_quantity AS quantity;
     CREATE TABLE stock (id text PRIMARY KEY, qty big_quantity); CREATE TABLE plenty (id text PRIMARY KEY, qty big_quantity)`,
    ['stock', 'plenty'],
    {
      mappings: [transferMapping('to-plenty', ['sf', 'stock'], ['chicago', 'plenty'], { transferMode: 'data-only' })],
      // `in` is strict: it matches only if the domain's values arrive as numbers, not text
      filters: [
        {
          name: 'listed',
          on: on('sf', 'stock'),
          conditions: { all: [{ fact: 'row', path: '$.qty', operator: 'in', value: [101, 1000] }] },
          actions: [{ type: 'transfer', mapping: 'to-plenty' }],
        },
      ],
    },
  );
  const engine = e.engine();
  await e.query('sf', `INSERT INTO stock VALUES ('small', 9), ('large', 101)`);
  await e.query('sf', `INSERT INTO stock VALUES ('barrier', 1000)`);
  await waitFor(async () => (await e.query('chicago', `SELECT 1 FROM plenty WHERE id = 'barrier'`)).length === 1, {
    message: () => engine.output,
  });
  assert.deepEqual(
    (await e.query<{ id: string }>('chicago', 'SELECT id FROM plenty ORDER BY id')).map((r) => r.id),
    ['barrier', 'large'],
  );
  await engine.stop();
});
