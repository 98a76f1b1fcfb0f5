// `pgdso pending list|retry|discard`: what could not be applied waits in the source's
// pgdso.pending_errors with the reason; once the cause is fixed, `retry` sends it again (by id,
// by mapping, all) through the running engine's queue. `discard` drops rows; `--queued` acts on
// the queue itself. Bad usage exits 2, a server that cannot be reached 1, no password shown.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import pg from 'pg';
import { waitFor } from './support/wait.ts';
import { dsoSuite, runCli, REPAIR_REQUEST_SQL, mapping, filter, is, until, settled, type DsoEnv, type CliResult } from './support/dso.ts';

const suite = dsoSuite(2);

interface ErrorRow {
  id: string;
  mapping: string;
  request_id: string;
  type: string;
  error: string;
  sqlstate: string | null;
  target_server: string;
}

/** The passwords of the environment's connections: none may appear in any output. */
function passwords(e: DsoEnv): string[] {
  return Object.values(e.urls)
    .map((u) => decodeURIComponent(new URL(u).password))
    .filter((p) => p.length > 0);
}

function assertNoPassword(e: DsoEnv, result: CliResult, extra: string[] = []): void {
  for (const secret of [...passwords(e), ...extra]) {
    assert.ok(!result.stdout.includes(secret) && !result.stderr.includes(secret), 'a password appears in the output');
  }
}

function ok(result: CliResult, what: string): CliResult {
  assert.equal(result.code, 0, `${what}: exit ${result.code}\nstdout: ${result.stdout}\nstderr: ${result.stderr}`);
  return result;
}

test('failed operations wait in pending_errors with their cause; after the fix, pending retry by id, by mapping and all delivers \
them', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-chairs', 'sf', 'chicago'), mapping('sf-lamps', 'sf', 'chicago')],
      filters: [
        filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-chairs' }]),
        filter('route-lamps', 'sf', { all: [is('item', 'lamp')] }, [{ type: 'transfer', mapping: 'sf-lamps' }]),
      ],
    },
  });
  // causes on chicago: a short column, a check, a request of its own with a taken ID
  await e.query(
    'chicago',
    `ALTER TABLE repair_request ALTER COLUMN description TYPE varchar(5);
    ALTER TABLE repair_request ADD CONSTRAINT not_blocked CHECK (status <> 'blocked');
    INSERT INTO repair_request (id, item, description) VALUES ('P-E', 'stool', 'own')`,
  );
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, description, status) VALUES
    ('P-A', 'chair', 'much too long', 'new'),
    ('P-C', 'lamp', 'ok', 'blocked'),
    ('P-E', 'chair', 'dup', 'new')`,
  );
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('P-OK1', 'chair', 'fine')`);
  await until(
    engine,
    'P-OK1 on chicago',
    async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'P-OK1'`)).length === 1,
  );
  await until(
    engine,
    'the three refusals recorded',
    async () => (await e.query('sf', `SELECT 1 FROM repair_request WHERE dso_transfer_status = 'failure'`)).length === 3,
  );

  // the target's catalog changes while the engine runs (the engine refuses to start on an
  // incompatible type, so a type mismatch only arises this way): the row that meets the change
  // fails; once the column is right again, later rows arrive
  const drift = async (request: string, change: string, insert: string, fix: string) => {
    await e.query('chicago', change);
    await e.query('sf', insert);
    await until(
      engine,
      `${request} failed into pending_errors`,
      async () => (await e.query('sf', `SELECT 1 FROM pgdso.pending_errors WHERE request_id = $1`, [request])).length === 1,
    );
    await e.query('chicago', fix);
    const later = `${request}-later`;
    await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ($1, 'chair', 'later')`, [later]);
    await until(
      engine,
      `${later} on chicago after the fix`,
      async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = $1`, [later])).length === 1,
    );
  };
  // (b) a column of another type
  await drift(
    'P-B',
    'ALTER TABLE repair_request ALTER COLUMN site TYPE integer USING site::integer',
    `INSERT INTO repair_request (id, item, description, site) VALUES ('P-B', 'chair', 'ok', 'abc')`,
    'ALTER TABLE repair_request ALTER COLUMN site TYPE text',
  );
  // (d) a column dropped
  await drift(
    'P-D',
    'ALTER TABLE repair_request DROP COLUMN internal_note',
    `INSERT INTO repair_request (id, item, description, internal_note) VALUES ('P-D', 'chair', 'ok', 'note d')`,
    'ALTER TABLE repair_request ADD COLUMN internal_note text',
  );

  const errors = await e.query<ErrorRow>(
    'sf',
    'SELECT id::text, mapping, request_id, type, error, sqlstate, target_server FROM pgdso.pending_errors ORDER BY request_id',
  );
  assert.deepEqual(
    errors.map((r) => [r.request_id, r.mapping, r.type, r.target_server, r.sqlstate]),
    [
      ['P-A', 'sf-chairs', 'transfer', 'chicago', '22001'],
      // (new rows are COPied in: a value is read by the column's type now, a bad one fails as such)
      ['P-B', 'sf-chairs', 'transfer', 'chicago', '22P02'],
      ['P-C', 'sf-lamps', 'transfer', 'chicago', '23514'],
      ['P-D', 'sf-chairs', 'transfer', 'chicago', '42703'],
      ['P-E', 'sf-chairs', 'transfer', 'chicago', '23505'],
    ],
  );
  const causes: Record<string, RegExp> = {
    'P-A': /value too long for type character varying\(5\)/,
    'P-B': /invalid input syntax for type integer: "abc"/,
    'P-C': /violates check constraint "not_blocked"/,
    'P-D': /column "internal_note" .*does not exist/,
    'P-E': /already holds request ID P-E for request chicago:P-E, a different request from the incoming sf:P-E/,
  };
  for (const r of errors) {
    assert.match(r.error, new RegExp(`mapping "${r.mapping}"`), `${r.request_id}: the message names the mapping`);
    assert.match(r.error, new RegExp(`\\b${r.request_id}\\b`), `${r.request_id}: the message names the request`);
    assert.match(r.error, causes[r.request_id]!, `${r.request_id}: the message says why`);
  }
  const idOf = (request: string) => errors.find((r) => r.request_id === request)!.id;

  // list: JSON with ids, mapping, error, sqlstate and payloads; text without payloads
  const listed = ok(await e.cli(['pending', 'list', '--json']), 'pending list --json');
  assertNoPassword(e, listed);
  const json = JSON.parse(listed.stdout) as {
    servers: Record<
      string,
      {
        pending: unknown[];
        errors: {
          id: number;
          queue: string;
          mapping: string;
          requestId: string;
          error: string;
          sqlstate: string;
          targetServer: string;
          retryable: boolean;
          payload: { op?: unknown };
        }[];
      }
    >;
  };
  assert.deepEqual(Object.keys(json.servers).sort(), ['chicago', 'sf']);
  assert.deepEqual(json.servers.chicago, { pending: [], errors: [] });
  assert.deepEqual(json.servers.sf!.pending, []);
  assert.deepEqual(
    json.servers.sf!.errors.map((r) => [
      String(r.id),
      r.queue,
      r.mapping,
      r.requestId,
      r.sqlstate,
      r.targetServer,
      r.error,
      r.retryable,
      typeof r.payload?.op,
    ]),
    [...errors]
      .sort((a, b) => Number(a.id) - Number(b.id))
      .map((r) => [r.id, 'error', r.mapping, r.request_id, r.sqlstate, 'chicago', r.error, true, 'object']),
  );
  const lamps = JSON.parse(ok(await e.cli(['pending', 'list', '--json', '--mapping', 'sf-lamps']), 'list --mapping').stdout) as typeof json;
  assert.deepEqual(
    lamps.servers.sf!.errors.map((r) => r.requestId),
    ['P-C'],
  );
  const text = ok(await e.cli(['pending', 'list', '--server', 'sf']), 'pending list');
  assertNoPassword(e, text);
  const lines = text.stdout.trim().split('\n');
  assert.equal(lines[0], 'sf: 0 queued, 5 failed');
  for (const r of errors) {
    const line = lines.find((l) => l.includes(`#${r.id} `));
    assert.ok(line, `a line for error #${r.id}:\n${text.stdout}`);
    assert.ok(
      line.includes(r.request_id) && line.includes(r.mapping) && line.includes(r.sqlstate!) && line.includes(r.error),
      `the line of #${r.id}: ${line}`,
    );
  }
  assert.ok(!text.stdout.includes('much too long') && !text.stdout.includes('note d'), 'no payload in the text list');

  // the fixes
  await e.query(
    'chicago',
    `ALTER TABLE repair_request ALTER COLUMN description TYPE text;
    ALTER TABLE repair_request DROP CONSTRAINT not_blocked;
    DELETE FROM repair_request WHERE id = 'P-E'`,
  );

  /** Runs a retry and waits until the engine has worked the queue off. */
  const retry = async (args: string[], expected: RegExp) => {
    const result = ok(await e.cli(['pending', 'retry', ...args]), `pending retry ${args.join(' ')}`);
    assertNoPassword(e, result);
    assert.match(result.stdout, expected);
    await until(
      engine,
      `the queue worked off after retry ${args.join(' ')}`,
      async () => (await e.query('sf', 'SELECT 1 FROM pgdso.pending')).length === 0,
    );
    return result;
  };
  await retry(['--server', 'sf', '--id', idOf('P-A')], /^sf: 1 failed operation sent again$/m);
  assert.deepEqual(
    (await e.query<{ request_id: string }>('sf', 'SELECT request_id FROM pgdso.pending_errors ORDER BY request_id'))
      .map((r) => r.request_id)
      .filter((r) => r !== 'P-A'),
    ['P-B', 'P-C', 'P-D', 'P-E'],
    'only P-A was taken',
  );
  await retry(['--mapping', 'sf-lamps'], /^sf: 1 failed operation sent again$/m);
  assert.deepEqual(
    await e.query<{ request_id: string }>('sf', `SELECT request_id FROM pgdso.pending_errors WHERE mapping = 'sf-lamps'`),
    [],
    'P-C was taken',
  );
  await retry(['--all'], /^sf: 3 failed operations sent again$/m);
  await settled(e, engine);

  // each request arrived with its values, its error is gone, and the source copy says success
  const outcome = async (id: string) => {
    const [copy] = await e.query<Record<string, unknown>>(
      'chicago',
      'SELECT item, description, site, status, internal_note, dso_master FROM repair_request WHERE id = $1',
      [id],
    );
    const [source] = await e.query<Record<string, unknown>>(
      'sf',
      'SELECT dso_master, dso_transfer_status FROM repair_request WHERE id = $1',
      [id],
    );
    const [error] = await e.query<{ error: string }>('sf', 'SELECT error FROM pgdso.pending_errors WHERE request_id = $1', [id]);
    return { chicago: copy ?? null, sf: source, error: error?.error ?? null };
  };
  const arrived = (values: Record<string, unknown>) => ({
    chicago: { item: 'chair', description: 'ok', site: null, status: 'new', internal_note: null, dso_master: true, ...values },
    sf: { dso_master: false, dso_transfer_status: 'success' },
    error: null,
  });
  assert.deepEqual(
    {
      'P-A': await outcome('P-A'),
      'P-B': await outcome('P-B'),
      'P-C': await outcome('P-C'),
      'P-D': await outcome('P-D'),
      'P-E': await outcome('P-E'),
    },
    {
      'P-A': arrived({ description: 'much too long' }),
      'P-B': arrived({ site: 'abc' }),
      'P-C': arrived({ item: 'lamp', status: 'blocked' }),
      'P-D': arrived({ internal_note: 'note d' }),
      'P-E': arrived({ description: 'dup' }),
    },
    `engine output:\n${engine.output}`,
  );
  assert.equal((await e.query('sf', 'SELECT 1 FROM pgdso.pending_errors')).length, 0);
  await engine.stop();
});

test('pending discard, retry --queued, discard --queued, refused rows, usage errors and an unreachable server', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('m1', 'sf', 'chicago'), mapping('m2', 'sf', 'chicago', { pool: 'other' })],
      filters: [],
    },
  });
  // no engine here: rows written by hand
  const op = (request: string) =>
    JSON.stringify({
      op: {
        group: 'transfer',
        link: 'm1>',
        form: 'public.repair_request',
        requestId: request,
        targetKey: request,
        history: '[]',
        row: null,
        lsn: '0/1',
      },
      targetForm: 'public.repair_request',
      targetKey: request,
    });
  const ids = (
    await e.query<{ id: string }>(
      'sf',
      `INSERT INTO pgdso.pending_errors (pool, type, mapping, form, request_id, target_server, payload, status,
        attempts, last_error, error, sqlstate)
    VALUES ('default', 'transfer', 'm1', 'public.repair_request', 'R-1', 'chicago', $1, 'failed', 1, 'bad 1', 'bad 1', '22001'),
           ('default', 'transfer', 'm1', 'public.repair_request', 'R-2', 'chicago', $2, 'failed', 1, 'bad 2', 'bad 2', '23514'),
           ('other', 'transfer', 'm2', 'public.repair_request', 'R-3', 'chicago', $3, 'failed', 1, 'bad 3', 'bad 3', '23505'),
           ('other', 'transfer', 'm2', 'public.repair_request', 'R-4', 'chicago',
             '{"target": "chicago.public.repair_request"}', 'failed', 1, 'refused', 'refused', NULL)
    RETURNING id::text`,
      [op('R-1'), op('R-2'), op('R-3')],
    )
  ).map((r) => r.id);
  const [r1, , , refused] = ids as [string, string, string, string];
  const errorIds = async () =>
    (await e.query<{ request_id: string }>('sf', 'SELECT request_id FROM pgdso.pending_errors ORDER BY id')).map((r) => r.request_id);

  // usage: exit 2 with a message that says what to give
  const usage = async (args: string[], message: RegExp) => {
    const result = await e.cli(['pending', ...args]);
    assert.equal(result.code, 2, `${args.join(' ')}: exit ${result.code}\n${result.stdout}${result.stderr}`);
    assert.match(result.stderr, message);
  };
  await usage(['retry'], /--id N, --mapping M or --all/);
  await usage(['discard', '--server', 'sf'], /--id N, --mapping M or --all/);
  await usage(['discard', '--server', 'sf', '--id', r1, '--all'], /--id and --all cannot be used together/);
  await usage(['retry', '--id', r1], /--id needs --server: ids are per server \(configured: (sf, chicago|chicago, sf)\)/);
  await usage(['retry', '--server', 'sf', '--id', 'one'], /--id takes a row id/);
  await usage(['discard', '--server', 'tokyo', '--all'], /unknown server "tokyo"/);
  await usage(['list', '--no-such-option'], /unknown option/);
  assert.deepEqual(await errorIds(), ['R-1', 'R-2', 'R-3', 'R-4'], 'nothing changed by a usage error');

  // a row the engine refused before it reached a target cannot be sent again
  const cannot = await e.cli(['pending', 'retry', '--server', 'sf', '--id', refused]);
  assert.equal(cannot.code, 1, cannot.stderr);
  assert.match(
    cannot.stderr,
    new RegExp(
      `error #${refused} \\(mapping m2, request R-4\\) cannot be retried: refused by the engine before reaching a ` +
        `target; fix the request and change it again`,
    ),
  );
  const missing = await e.cli(['pending', 'retry', '--server', 'sf', '--id', '999999']);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /sf: no failed operation #999999/);

  // by mapping: the operation goes back into the queue; the refused one stays and is reported
  const listener = new pg.Client({ connectionString: e.urls.sf });
  await listener.connect();
  const notified: string[] = [];
  listener.on('notification', (n) => notified.push(n.channel));
  await listener.query('LISTEN pgdso_pending');
  try {
    const byMapping = ok(await e.cli(['pending', 'retry', '--mapping', 'm2']), 'retry --mapping m2');
    assert.match(byMapping.stdout, /^sf: 1 failed operation sent again$/m);
    assert.match(byMapping.stdout, /^chicago: 0 failed operations sent again$/m);
    assert.match(byMapping.stderr, /request R-4\) cannot be retried/);
    await waitFor(() => notified.length >= 1, { message: 'NOTIFY pgdso_pending after retry' });
    assert.deepEqual(await errorIds(), ['R-1', 'R-2', 'R-4']);
    const [queued] = await e.query<Record<string, unknown>>(
      'sf',
      `SELECT pool, type, mapping, request_id, target_server, target_form, target_key, payload ->> 'link' AS link,
        payload ? 'op' AS nested, status, attempts, last_error, next_attempt_at <= now() AS due FROM pgdso.pending`,
    );
    assert.deepEqual(queued, {
      pool: 'other',
      type: 'transfer',
      mapping: 'm2',
      request_id: 'R-3',
      target_server: 'chicago',
      target_form: 'public.repair_request',
      target_key: 'R-3',
      link: 'm1>',
      nested: false,
      status: 'queued',
      attempts: 0,
      last_error: 'bad 3',
      due: true,
    });

    // discard one by id, then the rest
    const one = ok(await e.cli(['pending', 'discard', '--server', 'sf', '--id', r1]), 'discard --id');
    assert.match(one.stdout, new RegExp(`^sf: 1 failed operation discarded \\(#${r1}\\)$`, 'm'));
    assert.deepEqual(await errorIds(), ['R-2', 'R-4']);
    const rest = ok(await e.cli(['pending', 'discard', '--all']), 'discard --all');
    assert.match(rest.stdout, /^sf: 2 failed operations discarded/m);
    assert.match(rest.stdout, /^chicago: 0 failed operations discarded$/m);
    assert.deepEqual(await errorIds(), []);
    assert.equal((await e.query('sf', 'SELECT 1 FROM pgdso.pending')).length, 1, 'discard without --queued leaves the queue alone');

    // the queue, for a target that cannot be reached (the engine counts attempts per target
    // server in pgdso.pending_targets): listed with the target's attempts, due now, then dropped
    await e.query(
      'sf',
      `INSERT INTO pgdso.pending (pool, type, mapping, form, request_id, target_server, target_form, target_key,
        payload, status, attempts, next_attempt_at, last_error)
      VALUES ('default', 'transfer', 'm1', 'public.repair_request', 'R-5', 'tokyo', 'public.repair_request', 'R-5',
        $1, 'queued', 0, now() + interval '1 hour', 'connection refused')`,
      [JSON.stringify(JSON.parse(op('R-5')).op)],
    );
    await e.query(
      'sf',
      `INSERT INTO pgdso.pending_targets (target_server, attempts, down_since, next_attempt_at, last_error)
        VALUES ('tokyo', 7, now() - interval '1 hour', now() + interval '1 hour', 'connection refused again')`,
    );
    const listed = JSON.parse(ok(await e.cli(['pending', 'list', '--json', '--server', 'sf']), 'list').stdout) as {
      servers: Record<
        string,
        { pending: { id: number; queue: string; requestId: string; attempts: number; lastError: string; downSince: string | null }[] }
      >;
    };
    assert.deepEqual(
      listed.servers.sf!.pending.map((r) => [r.queue, r.requestId, r.attempts, r.lastError, typeof r.downSince]),
      [
        ['pending', 'R-3', 0, 'bad 3', 'object'],
        ['pending', 'R-5', 7, 'connection refused again', 'string'],
      ],
    );
    const before = notified.length;
    const due = ok(await e.cli(['pending', 'retry', '--queued', '--server', 'sf', '--mapping', 'm1']), 'retry --queued');
    assert.match(due.stdout, /^sf: 1 queued operation due now/m);
    assert.deepEqual(await e.query('sf', `SELECT request_id, next_attempt_at <= now() AS due FROM pgdso.pending ORDER BY id`), [
      { request_id: 'R-3', due: true },
      { request_id: 'R-5', due: true },
    ]);
    assert.deepEqual(await e.query('sf', `SELECT attempts, next_attempt_at <= now() AS due FROM pgdso.pending_targets`), [
      { attempts: 7, due: true },
    ]);
    await waitFor(() => notified.length > before, { message: 'NOTIFY pgdso_pending after retry --queued' });
    const [r5] = await e.query<{ id: string }>('sf', `SELECT id::text FROM pgdso.pending WHERE request_id = 'R-5'`);
    const dropped = ok(await e.cli(['pending', 'discard', '--queued', '--server', 'sf', '--id', r5!.id]), 'discard --queued');
    assert.match(dropped.stdout, new RegExp(`^sf: 1 queued operation dropped \\(#${r5!.id}\\): they will not reach their target$`, 'm'));
    assert.deepEqual(
      (await e.query<{ request_id: string }>('sf', 'SELECT request_id FROM pgdso.pending')).map((r) => r.request_id),
      ['R-3'],
    );
  } finally {
    await listener.end();
  }

  // a server that cannot be reached: named with its host, no password, exit 1; the others listed
  const secret = 'Secr3t-Passw0rd';
  const configPath = path.join(e.dir, 'unreachable.config.json');
  await writeFile(
    configPath,
    JSON.stringify({
      servers: {
        ...Object.fromEntries(Object.entries(e.urls).map(([name, url]) => [name, { connection: url }])),
        tokyo: { connection: `postgres://pgdso:${secret}@127.0.0.1:1/ar` },
      },
      rules: ['rules/*.json'],
    }),
  );
  for (const args of [
    ['pending', 'list'],
    ['pending', 'list', '--json'],
    ['pending', 'retry', '--all'],
    ['pending', 'discard', '--queued', '--server', 'tokyo', '--all'],
  ]) {
    const result = await runCli([...args, '--config', configPath]);
    assert.equal(result.code, 1, `${args.join(' ')}: exit ${result.code}\n${result.stdout}${result.stderr}`);
    assertNoPassword(e, result, [secret]);
    assert.match(result.stdout + result.stderr, /tokyo \(pgdso@127\.0\.0\.1:1\/ar\): cannot be reached/);
    if (args[1] === 'list') assert.match(result.stdout, /sf/, 'the reachable servers are listed');
  }
});
