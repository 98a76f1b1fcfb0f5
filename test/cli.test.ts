// The command line as a user meets it: `bin/pgdso` run as a child process against real
// PostgreSQL. Exit codes (0 ok, 1 runtime failure, 2 bad usage, config or rules), what the
// errors name (file, line and column, JSON pointer, mapping, column, variable), that bad rules
// never start an engine, `rules test`, `migrate` and `forms enable` idempotent and safe to run
// at once, `status --json`, and passwords kept out of every output.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import pg from 'pg';
import { provideClusters, type TestCluster } from './support/servers.ts';
import { waitFor } from './support/wait.ts';
import { leakCheck } from './support/leaks.ts';
import { createDsoEnv, runCli, PGDSO_BIN, REPAIR_REQUEST_SQL, mapping, filter, is, type CliResult, type DsoEnv } from './support/dso.ts';

let clusters: TestCluster[];
let env: DsoEnv;

const routingRules = {
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago'), mapping('chicago-to-upholstery', 'chicago', 'chicago_uph')],
  filters: [
    filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }]),
    filter('route-lamps', 'sf', { all: [is('item', 'lamp')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }]),
    filter('route-upholstery', 'chicago', { all: [is('needs_upholstery', true)] }, [
      { type: 'transfer', mapping: 'chicago-to-upholstery' },
    ]),
  ],
};

before(async () => {
  clusters = await provideClusters(1);
  env = await createDsoEnv({
    clusters,
    servers: ['sf', 'chicago', 'chicago_uph'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: routingRules,
  });
});
// every `pgdso` started here has exited by the end (a `run` that refused to start included)
after(leakCheck({ allowPids: () => (clusters ?? []).flatMap((c) => c.ownedPids()) }));
after(async () => {
  await env?.close();
  await Promise.all((clusters ?? []).map((c) => c.destroy()));
});

// ---------------------------------------------------------------------------------------------
// helpers

let variants = 0;

/**
 * Writes a config of its own into a subdirectory of env.dir: the env's servers (unless given)
 * and the rule files given (objects as JSON, strings as they are) under `rules/`.
 */
async function variant(
  ruleFiles: Record<string, unknown>,
  servers?: Record<string, unknown>,
): Promise<{ configPath: string; ruleFile: (name: string) => string }> {
  const dir = path.join(env.dir, `variant-${++variants}`);
  await mkdir(path.join(dir, 'rules'), { recursive: true });
  for (const [name, content] of Object.entries(ruleFiles)) {
    await writeFile(path.join(dir, 'rules', name), typeof content === 'string' ? content : JSON.stringify(content, null, 2));
  }
  const configPath = path.join(dir, 'pgdso.config.json');
  const config = {
    servers: servers ?? Object.fromEntries(Object.entries(env.urls).map(([name, url]) => [name, { connection: url }])),
    rules: ['rules/*.json'],
  };
  await writeFile(configPath, JSON.stringify(config, null, 2));
  return { configPath, ruleFile: (name) => path.join(dir, 'rules', name) };
}

function cli(configPath: string, args: readonly string[], extraEnv: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return runCli([...args, '--config', configPath], extraEnv);
}

const show = (r: CliResult): string => `exit ${r.code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;

/**
 * `pgdso run` that must refuse to start: it has to exit by itself within the deadline (it is
 * killed and the test fails otherwise). Returns its exit code, output and how long it took.
 */
async function runMustExit(configPath: string, extraEnv: NodeJS.ProcessEnv = {}, timeoutMs = 15_000): Promise<CliResult & { ms: number }> {
  const started = Date.now();
  const child = spawn(PGDSO_BIN, ['run', '--config', configPath], {
    env: { ...process.env, PGDSO_LOG_LEVEL: 'info', ...extraEnv },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  let exit: { code: number | null; ms: number } | undefined;
  child.on('exit', (code) => (exit = { code, ms: Date.now() - started }));
  try {
    await waitFor(() => exit, {
      timeoutMs,
      intervalMs: 25,
      message: () => `\`pgdso run\` to exit by itself (it must refuse to start); output so far:\n${stdout}${stderr}`,
    });
  } finally {
    if (!exit) {
      child.kill('SIGKILL');
      await new Promise((resolve) => child.once('exit', resolve));
    }
  }
  // let the pipes drain
  if (child.stdout.readable || child.stderr.readable) await new Promise((resolve) => child.once('close', resolve));
  return { code: exit!.code, stdout, stderr, ms: exit!.ms };
}

/** What a started engine would leave behind: a row on the server group board, an active slot. */
async function assertNoEngineStarted(output: string): Promise<void> {
  assert.doesNotMatch(output, /pgdso running/, 'the engine must not start');
  for (const server of Object.keys(env.urls)) {
    const [board] = await env.query<{ n: number }>(server, 'SELECT count(*)::int AS n FROM pgdso.servgrp_board');
    assert.equal(board?.n, 0, `no instance registered on ${server}`);
    const active = await env.query(server, 'SELECT slot_name FROM pg_replication_slots WHERE database = current_database() AND active');
    assert.deepEqual(active, [], `no slot being decoded on ${server}`);
  }
}

async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

async function withClient<T>(url: string, use: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await use(client);
  } finally {
    await client.end();
  }
}

// ---------------------------------------------------------------------------------------------
// rules check

test('rules check: a good setup exits 0 and says ok', async () => {
  const r = await env.cli(['rules', 'check']);
  assert.equal(r.code, 0, show(r));
  assert.match(r.stdout, /^ok\b/m, show(r));
  assert.match(r.stdout, /2 mappings, 3 filters/, show(r));
  assert.doesNotMatch(r.stdout + r.stderr, /problem|not checked|unreachable/, show(r));
});

test('a rule file that is not valid JSON: rules check and run exit 2 naming the file, line and column; run never starts', async () => {
  const text = [
    '{',
    '  "mappings": [',
    '    { "name": "sf-to-chicago", "from": { "server": "sf", "form": "repair_request" }',
    '      "to": { "server": "chicago", "form": "repair_request" } }',
    '  ]',
    '}',
  ].join('\n');
  const { configPath, ruleFile } = await variant({ 'broken.json': text });
  const [check, run] = await Promise.all([cli(configPath, ['rules', 'check']), runMustExit(configPath)]);

  assert.equal(check.code, 2, show(check));
  assert.ok(check.stderr.includes(ruleFile('broken.json')), `stderr names the file\n${show(check)}`);
  // the missing comma: the parser stops at the `"to"` on line 4, column 7
  assert.match(check.stderr, /invalid JSON at line 4, column 7/, show(check));

  assert.equal(run.code, 2, show(run));
  assert.ok(run.ms < 15_000, `run took ${run.ms} ms to refuse`);
  assert.ok(run.stderr.includes(ruleFile('broken.json')), `run names the file\n${show(run)}`);
  assert.match(run.stderr, /line 4, column 7/, show(run));
  await assertNoEngineStarted(run.stdout + run.stderr);
});

test('a filter action naming an unknown mapping: rules check and run exit 2 naming the mapping, the JSON pointer and the \
file', async () => {
  const { configPath, ruleFile } = await variant({
    'main.json': {
      mappings: [routingRules.mappings[0]],
      filters: [filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-nowhere' }])],
    },
  });
  const [check, run] = await Promise.all([cli(configPath, ['rules', 'check']), runMustExit(configPath)]);
  for (const [what, r] of [
    ['rules check', check],
    ['run', run],
  ] as const) {
    assert.equal(r.code, 2, `${what}: ${show(r)}`);
    assert.ok(
      r.stderr.includes(`${ruleFile('main.json')}#/filters/0/actions/0/mapping`),
      `${what}: stderr names the file and the pointer\n${show(r)}`,
    );
    assert.match(r.stderr, /unknown mapping "sf-to-nowhere"/, `${what}: ${show(r)}`);
  }
  assert.ok(run.ms < 15_000);
  await assertNoEngineStarted(run.stdout + run.stderr);
});

test('a mapping whose fields.map names a target column that does not exist: rules check and run exit 2 naming the column and the \
mapping', async () => {
  const { configPath } = await variant({
    'main.json': {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { fields: { map: { location: 'site' } } })],
      filters: [routingRules.filters[0]],
    },
  });
  const [check, run] = await Promise.all([cli(configPath, ['rules', 'check']), runMustExit(configPath)]);
  for (const [what, r] of [
    ['rules check', check],
    ['run', run],
  ] as const) {
    assert.equal(r.code, 2, `${what}: ${show(r)}`);
    const out = r.stdout + r.stderr;
    assert.match(out, /"location"/, `${what} names the column\n${show(r)}`);
    assert.match(out, /mapping "sf-to-chicago"/, `${what} names the mapping\n${show(r)}`);
    assert.match(out, /does not exist/, `${what} says why\n${show(r)}`);
  }
  assert.doesNotMatch(check.stdout, /^ok\b/m, show(check));
  assert.ok(run.ms < 15_000);
  await assertNoEngineStarted(run.stdout + run.stderr);
});

test('contract guarantee 7: a rule that does not match the live catalog is reported with its file and JSON pointer', async () => {
  // "Bad config or rules never start an engine: the error names the file, the JSON pointer and
  // the reason." The loader does this for what it can see; the live-catalog checks must too.
  const { configPath, ruleFile } = await variant({
    'main.json': {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { fields: { map: { location: 'site' } } })],
      filters: [routingRules.filters[0]],
    },
  });
  const r = await cli(configPath, ['rules', 'check']);
  assert.equal(r.code, 2, show(r));
  const out = r.stdout + r.stderr;
  assert.ok(out.includes(ruleFile('main.json')), `the output names the rule file ${ruleFile('main.json')}\n${show(r)}`);
  assert.ok(
    out.includes('/mappings/0/fields/map/location'),
    `the output names the JSON pointer /mappings/0/fields/map/location\n${show(r)}`,
  );
});

test('an escalation with a bad cron expression, or on a form the server lacks, stops rules check and run with exit 2, its file and \
pointer', async () => {
  const escalation = (name: string, form: string, schedule: Record<string, unknown>) => ({
    name,
    on: { server: 'sf', form },
    schedule,
    actions: [{ type: 'transfer', mapping: 'sf-to-chicago' }],
  });
  const badCron = await variant({
    'main.json': {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
      escalations: [escalation('nightly', 'repair_request', { cron: '0 25 * * 1-5', timezone: 'America/Los_Angeles' })],
    },
  });
  const noForm = await variant({
    'main.json': {
      mappings: [
        mapping('sf-to-chicago', 'sf', 'chicago'),
        { ...mapping('ghost', 'sf', 'chicago'), from: { server: 'sf', form: 'no_such_form' } },
      ],
      escalations: [
        escalation('nightly', 'repair_request', { everySeconds: 60 }),
        { ...escalation('elsewhere', 'no_such_form', { everySeconds: 60 }), actions: [{ type: 'transfer', mapping: 'ghost' }] },
      ],
    },
  });
  for (const [{ configPath, ruleFile }, pointer, reason] of [
    [badCron, '#/escalations/0/schedule/cron', /invalid cron expression "0 25 \* \* 1-5"/],
    [noForm, '#/escalations/1/on/form', /no_such_form/],
  ] as const) {
    for (const command of [['rules', 'check'], ['run']]) {
      const r = await cli(configPath, command);
      assert.equal(r.code, 2, show(r));
      const out = r.stdout + r.stderr;
      assert.ok(out.includes(`${ruleFile('main.json')}${pointer}`), `${command.join(' ')} reports ${pointer}\n${show(r)}`);
      assert.match(out, reason);
    }
  }
});

test('several problems at once are all reported in one run', async () => {
  const { configPath, ruleFile } = await variant({
    'a.json': {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data+owner', whenToUpdate: 'sometimes' })],
    },
    'b.json': {
      filters: [filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-chicgo' }])],
    },
  });
  const r = await cli(configPath, ['rules', 'check']);
  assert.equal(r.code, 2, show(r));
  for (const where of [
    `${ruleFile('a.json')}#/mappings/0/transferMode`,
    `${ruleFile('a.json')}#/mappings/0/whenToUpdate`,
    `${ruleFile('b.json')}#/filters/0/actions/0/mapping`,
  ]) {
    assert.ok(r.stderr.includes(where), `stderr reports ${where}\n${show(r)}`);
  }
  assert.match(r.stderr, /"data-only", "data\+ownership", "independent-copy"/, 'the allowed values are listed');
  assert.match(r.stderr, /did you mean "sf-to-chicago"/);
});

// ---------------------------------------------------------------------------------------------
// rules test

test('rules test prints, as JSON, the filter that fires and its action; nothing for a desk; exit 2 for a row that is not \
JSON', async () => {
  const args = (row: string) => ['rules', 'test', '--server', 'sf', '--form', 'repair_request', '--op', 'insert', '--row', row];
  const [chair, desk, bad] = await Promise.all([
    env.cli(args('{"id":"X","item":"chair"}')),
    env.cli(args('{"id":"X","item":"desk"}')),
    env.cli(args('not json')),
  ]);

  assert.equal(chair.code, 0, show(chair));
  const fired = JSON.parse(chair.stdout) as { fired: { filter: string; actions: { type: string; mapping?: string }[] }[] };
  assert.deepEqual(
    fired.fired.map((f) => f.filter),
    ['route-chairs'],
    show(chair),
  );
  assert.deepEqual(
    fired.fired[0]!.actions.map((a) => [a.type, a.mapping]),
    [['transfer', 'sf-to-chicago']],
  );

  assert.equal(desk.code, 0, show(desk));
  assert.deepEqual((JSON.parse(desk.stdout) as { fired: unknown[] }).fired, [], show(desk));

  assert.equal(bad.code, 2, show(bad));
  assert.match(bad.stderr, /--row/, show(bad));
  assert.equal(bad.stdout, '', 'nothing printed as a result');
});

// ---------------------------------------------------------------------------------------------
// migrate

const CONTROL_COLUMNS: Record<string, string[]> = {
  servgrp_board: ['server_name', 'instance_id', 'host', 'pid', 'interval_count', 'state', 'operations', 'pending_signals', 'last_seen_at'],
  servgrp_ranking: ['operation', 'instance_id', 'rank', 'delinquent_threshold'],
  servgrp_events: ['type', 'operation', 'new_owner', 'old_owner', 'at'],
  pending: ['id', 'pool', 'type', 'mapping', 'form', 'request_id', 'payload', 'status', 'attempts', 'next_attempt_at', 'last_error'],
  pending_errors: [
    'id',
    'pool',
    'type',
    'mapping',
    'form',
    'request_id',
    'payload',
    'status',
    'attempts',
    'next_attempt_at',
    'last_error',
    'error',
    'failed_at',
  ],
  conflicts: ['mapping', 'form', 'request_id', 'local', 'incoming', 'resolution', 'at'],
};

test('migrate: two processes at once on fresh databases, then again: all exit 0, each migration applied once, the control schema \
complete', async () => {
  const fresh = { east: await clusters[0]!.createDatabase('fresh_east'), west: await clusters[0]!.createDatabase('fresh_west') };
  const { configPath } = await variant(
    { 'empty.json': {} },
    Object.fromEntries(Object.entries(fresh).map(([name, url]) => [name, { connection: url }])),
  );

  const both = await Promise.all([cli(configPath, ['migrate']), cli(configPath, ['migrate'])]);
  for (const r of both) assert.equal(r.code, 0, show(r));
  const out = both.map((r) => r.stdout).join('');
  for (const server of Object.keys(fresh)) {
    assert.equal(
      out.match(new RegExp(`^${server} .*: applied `, 'gm'))?.length,
      1,
      `one of the two applied the migrations on ${server}\n${out}`,
    );
    assert.equal(out.match(new RegExp(`^${server} .*: up to date`, 'gm'))?.length, 1, `the other found ${server} up to date\n${out}`);
  }

  const again = await cli(configPath, ['migrate']);
  assert.equal(again.code, 0, show(again));
  assert.match(again.stdout, /^east .*: up to date$/m, show(again));
  assert.match(again.stdout, /^west .*: up to date$/m, show(again));

  for (const [server, url] of Object.entries(fresh)) {
    await withClient(url, async (client) => {
      const { rows } = await client.query<{ table_name: string; column_name: string }>(
        `SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'pgdso'`,
      );
      for (const [table, columns] of Object.entries(CONTROL_COLUMNS)) {
        const present = new Set(rows.filter((r) => r.table_name === table).map((r) => r.column_name));
        assert.ok(present.size > 0, `${server}: table pgdso.${table} exists`);
        for (const column of columns) assert.ok(present.has(column), `${server}: pgdso.${table}.${column} exists`);
      }
      const twice = await client.query(`SELECT name FROM pgdso.knex_migrations GROUP BY name HAVING count(*) > 1`);
      assert.deepEqual(twice.rows, [], `${server}: no migration recorded twice`);
      const publication = await client.query(`SELECT 1 FROM pg_publication WHERE pubname = 'pgdso'`);
      assert.equal(publication.rowCount, 1, `${server}: publication pgdso exists`);
    });
  }
});

// ---------------------------------------------------------------------------------------------
// forms enable

test('forms enable is idempotent; a table without a primary key and a missing table are refused with exit 2', async () => {
  await env.query('sf', `CREATE TABLE work_order (id bigint PRIMARY KEY, title text NOT NULL)`);
  await env.query('sf', `CREATE TABLE no_key (id text, note text)`);
  const enable = (form: string) => env.cli(['forms', 'enable', '--server', 'sf', '--form', form]);

  const first = await enable('work_order');
  assert.equal(first.code, 0, show(first));
  const [second, again, noKey, missing] = await Promise.all([
    enable('work_order'),
    enable('repair_request'),
    enable('no_key'),
    enable('no_such_form'),
  ]);
  assert.equal(second.code, 0, show(second));
  assert.equal(again.code, 0, show(again));

  const columns = await env.query<{ column_name: string; data_type: string; is_nullable: string; column_default: string | null }>(
    'sf',
    `SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns
      WHERE table_schema = 'public' AND table_name = 'work_order' AND column_name LIKE 'dso\\_%' ORDER BY ordinal_position`,
  );
  const byName = new Map(columns.map((c) => [c.column_name, c]));
  const text = [
    'dso_transfer_status',
    'dso_update_status',
    'dso_current_server',
    'dso_current_form',
    'dso_from_server',
    'dso_from_form',
    'dso_from_request_id',
    'dso_from_mapping',
    'dso_to_server',
    'dso_to_form',
    'dso_to_request_id',
    'dso_to_mapping',
  ];
  assert.deepEqual(
    [...byName.keys()].sort(),
    ['dso_master', 'dso_mapping_history', 'dso_version', 'dso_modified_at', 'dso_synced_version', ...text].sort(),
  );
  assert.equal(columns.length, 17, 'each distributed column once');
  const shape = (name: string) => {
    const c = byName.get(name)!;
    return [c.data_type, c.is_nullable, c.column_default];
  };
  assert.deepEqual(shape('dso_master'), ['boolean', 'NO', 'true']);
  assert.deepEqual(shape('dso_mapping_history'), ['jsonb', 'NO', "'[]'::jsonb"]);
  assert.deepEqual(shape('dso_version'), ['bigint', 'NO', '1']);
  assert.deepEqual(shape('dso_modified_at'), ['timestamp with time zone', 'NO', 'now()']);
  assert.deepEqual(shape('dso_synced_version'), ['bigint', 'YES', null]);
  for (const name of text) assert.equal(byName.get(name)?.data_type, 'text', name);

  const [table] = await env.query<{ triggers: number; identity: string; published: number }>(
    'sf',
    `SELECT (SELECT count(*)::int FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal) AS triggers,
            c.relreplident AS identity,
            (SELECT count(*)::int FROM pg_publication_tables p WHERE p.pubname = 'pgdso' AND p.schemaname = 'public'
              AND p.tablename = 'work_order') AS published
       FROM pg_class c WHERE c.oid = 'public.work_order'::regclass`,
  );
  assert.deepEqual(
    table,
    { triggers: 3, identity: 'f', published: 1 },
    'the three guards (ownership, request ID, TRUNCATE) once each, replica identity full, in publication pgdso',
  );

  // The one guard: an update raises dso_version by exactly one (a doubled trigger would add two).
  await env.query('sf', `INSERT INTO work_order (id, title) VALUES (1, 'fix the door')`);
  await env.query('sf', `UPDATE work_order SET title = 'fix the back door' WHERE id = 1`);
  const [row] = await env.query<{ dso_version: string; dso_master: boolean }>(
    'sf',
    'SELECT dso_version, dso_master FROM work_order WHERE id = 1',
  );
  assert.deepEqual(row, { dso_version: '2', dso_master: true });

  assert.equal(noKey.code, 2, show(noKey));
  assert.match(noKey.stderr, /no_key/, show(noKey));
  assert.match(noKey.stderr, /primary key/, show(noKey));
  const noKeyColumns = await env.query(
    'sf',
    `SELECT column_name FROM information_schema.columns WHERE table_name = 'no_key' AND column_name LIKE 'dso\\_%'`,
  );
  assert.deepEqual(noKeyColumns, [], 'a refused table is left as it was');

  assert.equal(missing.code, 2, show(missing));
  assert.match(missing.stderr, /no_such_form/, show(missing));
  assert.match(missing.stderr, /does not exist/, show(missing));
});

// ---------------------------------------------------------------------------------------------
// environment variables and secrets

test('${env:SF_PASSWORD} in a connection URL: missing, every command exits 2 naming the variable; set, it is used', async () => {
  const url = new URL(env.urls.sf!);
  const password = decodeURIComponent(url.password);
  url.password = 'PLACEHOLDER';
  const withPlaceholder = url.toString().replace('PLACEHOLDER', '${env:SF_PASSWORD}');
  const { configPath } = await variant({ 'main.json': { mappings: [], filters: [] } }, { sf: { connection: withPlaceholder } });

  const unset = { SF_PASSWORD: undefined };
  const [check, status, run, ok] = await Promise.all([
    cli(configPath, ['rules', 'check'], unset),
    cli(configPath, ['status', '--json'], unset),
    runMustExit(configPath, unset),
    cli(configPath, ['rules', 'check'], { SF_PASSWORD: password }),
  ]);
  for (const [what, r] of [
    ['rules check', check],
    ['status --json', status],
    ['run', run],
  ] as const) {
    assert.equal(r.code, 2, `${what}: ${show(r)}`);
    assert.match(r.stderr, /environment variable SF_PASSWORD is not set/, `${what}: ${show(r)}`);
    assert.match(r.stderr, /#\/servers\/sf\/connection/, `${what} names the pointer: ${show(r)}`);
  }
  assert.ok(run.ms < 15_000);

  assert.equal(ok.code, 0, `with SF_PASSWORD set, the server is reached: ${show(ok)}`);
  assert.match(ok.stdout, /^ok\b/m, show(ok));
  assert.doesNotMatch(ok.stdout, /not checked/, show(ok));
  assert.ok(!(ok.stdout + ok.stderr).includes(password), 'the password is not printed');
});

test('an unreachable server and a wrong password: status and rules check never print a password', async () => {
  const port = await closedPort();
  const secrets = { url: 'Url-Secret-7f3a9c', env: 'Env-Secret-2b8d41', wrong: 'Wrong-Secret-c05e77' };
  const real = new URL(env.urls.sf!);
  const wrong = new URL(env.urls.sf!);
  wrong.password = secrets.wrong;
  const { configPath } = await variant(
    { 'main.json': routingRules },
    {
      sf: { connection: `postgres://pgdso:${secrets.url}@127.0.0.1:${port}/ar` },
      chicago: { connection: { host: '127.0.0.1', port, database: 'ar', user: 'pgdso', password: '${env:CHICAGO_PASSWORD}' } },
      chicago_uph: { connection: wrong.toString() },
    },
  );
  const extraEnv = { CHICAGO_PASSWORD: secrets.env };
  const results = await Promise.all([
    cli(configPath, ['status', '--json'], extraEnv),
    cli(configPath, ['status'], extraEnv),
    cli(configPath, ['rules', 'check'], extraEnv),
    cli(configPath, ['migrate'], extraEnv),
    cli(configPath, ['rules', 'check', '--log-level', 'trace'], extraEnv),
  ]);
  const [statusJson, statusText, check] = results;
  for (const r of results) {
    for (const secret of [...Object.values(secrets), decodeURIComponent(real.password)]) {
      assert.ok(!(r.stdout + r.stderr).includes(secret), `a password appears in the output:\n${show(r)}`);
    }
  }

  // status still reports every server, as unreachable
  const status = JSON.parse(statusJson!.stdout) as { servers: Record<string, { error?: string }> };
  assert.deepEqual(Object.keys(status.servers).sort(), ['chicago', 'chicago_uph', 'sf']);
  for (const [name, s] of Object.entries(status.servers)) assert.ok(s.error, `${name} is reported unreachable: ${statusJson!.stdout}`);
  assert.match(status.servers.sf!.error!, new RegExp(`127\\.0\\.0\\.1:${port}`));
  assert.equal(statusText!.code, 1, show(statusText!));
  // rules check cannot look at the catalogs, and says so
  assert.match(check!.stdout + check!.stderr, /cannot connect|not checked|unreachable/, show(check!));
});

test('rules check that cannot reach a server does not say ok: it exits non-zero (a runtime failure, like migrate and status)', async () => {
  // A deployment script gates `pgdso run` on `pgdso rules check`; a check that looked at no
  // catalog must not pass as "ok" with exit 0.
  const port = await closedPort();
  const { configPath } = await variant(
    { 'main.json': routingRules },
    {
      sf: { connection: `postgres://pgdso@127.0.0.1:${port}/ar` },
      chicago: { connection: env.urls.chicago },
      chicago_uph: { connection: env.urls.chicago_uph },
    },
  );
  const r = await cli(configPath, ['rules', 'check']);
  assert.match(r.stdout + r.stderr, /sf: cannot connect/, show(r));
  assert.doesNotMatch(r.stdout, /^ok\b/m, `rules check says ok although sf was not checked\n${show(r)}`);
  assert.notEqual(r.code, 0, `rules check exits 0 although sf was not checked\n${show(r)}`);
});

// ---------------------------------------------------------------------------------------------
// status

test('status --json on a working setup: every server with its real slot lag, pending, pendingErrors and conflicts counts', async () => {
  // rows in each server's queue, errors and conflicts, a different number per server and table,
  // so that a count read from the wrong table or server shows
  const made = { sf: [2, 3, 1], chicago: [0, 1, 4], chicago_uph: [5, 0, 0] } as const;
  for (const [server, [pending, errors, conflicts]] of Object.entries(made)) {
    await env.query(
      server,
      `INSERT INTO pgdso.pending (type, mapping, request_id, target_server, payload, status)
      SELECT 'transfer', 'sf-to-chicago', 'ST-' || g, 'chicago', '{}', 'queued' FROM generate_series(1, $1::int) g`,
      [pending],
    );
    await env.query(
      server,
      `INSERT INTO pgdso.pending_errors (type, mapping, request_id, target_server, payload, status, error)
      SELECT 'transfer', 'sf-to-chicago', 'SE-' || g, 'chicago', '{}', 'failed', 'value too long' FROM generate_series(1, $1::int) g`,
      [errors],
    );
    await env.query(
      server,
      `INSERT INTO pgdso.conflicts (mapping, form, request_id, resolution)
      SELECT 'sf-to-chicago', 'public.repair_request', 'SC-' || g, 'applied-incoming' FROM generate_series(1, $1::int) g`,
      [conflicts],
    );
  }
  // no engine runs here: sf's slot lags by the WAL written since its last confirmation; 64 kB more
  await env.query('sf', `SELECT pg_logical_emit_message(true, 'status-test', repeat('x', 65536))`);
  const lagOf = async (server: string) =>
    Number(
      (
        await env.query<{ lag: string }>(
          server,
          `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::text AS lag FROM pg_replication_slots
            WHERE database = current_database()`,
        )
      )[0]!.lag,
    );
  try {
    const before = { sf: await lagOf('sf'), chicago: await lagOf('chicago'), chicago_uph: await lagOf('chicago_uph') };
    const r = await env.cli(['status', '--json']);
    const after = { sf: await lagOf('sf'), chicago: await lagOf('chicago'), chicago_uph: await lagOf('chicago_uph') };
    // no instance runs: every server with forms in the rules is unserved, a runtime failure (exit 1)
    assert.equal(r.code, 1, show(r));
    const status = JSON.parse(r.stdout) as { servers: Record<string, Record<string, unknown>> };
    assert.deepEqual(Object.keys(status.servers).sort(), ['chicago', 'chicago_uph', 'sf']);
    for (const [name, [pending, errors, conflicts]] of Object.entries(made)) {
      const s = status.servers[name]!;
      assert.equal(s.error, undefined, `${name}: ${String(s.error)}`);
      assert.deepEqual(
        { pending: s.pending, pendingErrors: s.pendingErrors, conflicts: s.conflicts },
        { pending, pendingErrors: errors, conflicts },
        `${name}\n${r.stdout}`,
      );
      // the slot's lag as PostgreSQL computes it, read between the two readings around the command
      const lag = s.slotLagBytes as number;
      const [low, high] = [before[name as keyof typeof before], after[name as keyof typeof after]];
      assert.ok(
        typeof lag === 'number' && lag >= low && lag <= high,
        `servers.${name}.slotLagBytes ${String(lag)} is not between ${low} and ${high}\n${r.stdout}`,
      );
      // no instance has joined the server's group: none listed, no operation owned, no coordinator
      assert.deepEqual(
        { instances: s.instances, owners: s.owners, coordinator: s.coordinator },
        { instances: [], owners: { admin: null, dso: null, escalation: null }, coordinator: null },
        name,
      );
    }
    assert.ok(
      (status.servers.sf!.slotLagBytes as number) >= 65_536,
      `sf's slot lag counts the 64 kB written since its last confirmation\n${r.stdout}`,
    );
    assert.ok(!(r.stdout + r.stderr).includes(decodeURIComponent(new URL(env.urls.sf!).password)), 'the password is not printed');
  } finally {
    for (const server of Object.keys(made)) {
      await env.query(server, `DELETE FROM pgdso.pending WHERE request_id LIKE 'ST-%'`);
      await env.query(server, `DELETE FROM pgdso.pending_errors WHERE request_id LIKE 'SE-%'`);
      await env.query(server, `DELETE FROM pgdso.conflicts WHERE request_id LIKE 'SC-%'`);
    }
  }
});
