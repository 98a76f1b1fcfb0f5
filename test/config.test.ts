// Loading pgdso.config.json and its rule files: defaults, and every kind of bad input reported
// with its file, JSON pointer and reason, all at once, never with a password. Pure logic: files
// in a temporary directory, no database.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv } from 'ajv';
import { describeConnection, loadConfig, readRuleSources, toPgClientConfig } from '../src/config/load.ts';
import { checkConditions } from '../src/rules/compile.ts';
import { compileRules } from '../src/rules/index.ts';
import { ConfigError, type ConfigProblem, type PgdsoConfig } from '../src/config/types.ts';

const directories: string[] = [];
after(async () => {
  await Promise.all(directories.map((d) => rm(d, { recursive: true, force: true })));
});

/** Writes files (objects as JSON, strings as they are) into a new directory; returns its path. */
async function writeTree(files: Record<string, unknown>): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'pgdso-config-'));
  directories.push(dir);
  for (const [name, content] of Object.entries(files)) {
    const file = path.join(dir, name);
    await mkdir(path.dirname(file), { recursive: true });
    await writeFile(file, typeof content === 'string' ? content : JSON.stringify(content, null, 2));
  }
  return dir;
}

const ENV = { SF_PASSWORD: 'sf-pa55word', CHICAGO_PASSWORD: 'chicago-pa55word' };

const validConfig = {
  servers: {
    sf: { connection: 'postgres://pgdso:${env:SF_PASSWORD}@127.0.0.1:5432/ar' },
    chicago: { connection: { host: '127.0.0.1', port: 5433, database: 'ar', user: 'pgdso', password: '${env:CHICAGO_PASSWORD}' } },
  },
  rules: ['rules/*.json'],
};

/** A rule file as written (loosely typed, so tests can break it in any way). */
type RuleItem = Record<string, any>;
const validRules: { mappings: RuleItem[]; filters: RuleItem[]; escalations: RuleItem[] } = {
  mappings: [
    { name: 'sf-chairs-to-chicago', from: { server: 'sf', form: 'repair_request' }, to: { server: 'chicago', form: 'repair_request' } },
    {
      name: 'chicago-archive',
      from: { server: 'chicago', form: 'repair_request' },
      to: { server: 'sf', form: 'archive.repair_request' },
      transferMode: 'independent-copy',
      whenToUpdate: 'never',
      duplicateRequestId: 'overwrite',
      match: { fields: ['legacy_id'] },
      fields: {
        byName: false,
        exclude: ['internal_note'],
        map: { location: 'site' },
        set: { region: 'us-central', priority: 2, closed: false, note: null },
      },
      afterTransfer: 'delete',
      conflict: 'newer-wins',
      pool: 'archive',
    },
  ],
  filters: [
    {
      name: 'route-chairs',
      on: { server: 'sf', form: 'repair_request' },
      conditions: { all: [{ fact: 'row', path: '$.item', operator: 'equal', value: 'chair' }] },
      actions: [{ type: 'transfer', mapping: 'sf-chairs-to-chicago' }],
    },
    {
      name: 'back-home',
      on: { server: 'chicago', form: 'repair_request', ops: ['update'] },
      actions: [
        { type: 'return', overrideLoopDetection: true },
        { type: 'update', mapping: 'chicago-archive' },
      ],
    },
  ],
  escalations: [
    {
      name: 'follow-the-sun-sf',
      on: { server: 'sf', form: 'repair_request' },
      schedule: { cron: '0 17 * * 1-5', timezone: 'America/Los_Angeles' },
      conditions: { all: [{ fact: 'row', path: '$.status', operator: 'notIn', value: ['closed'] }] },
      actions: [{ type: 'transfer', mapping: 'sf-chairs-to-chicago' }],
    },
  ],
};

/** Loads a tree that must be rejected; returns the problems with file names relative to the tree. */
async function problemsOf(
  files: Record<string, unknown>,
  env: NodeJS.ProcessEnv = ENV,
): Promise<{ error: ConfigError; problems: ConfigProblem[] }> {
  const dir = await writeTree(files);
  try {
    await loadConfig(path.join(dir, 'pgdso.config.json'), env);
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected a ConfigError, got ${String(err)}`);
    return { error: err, problems: err.problems.map((p) => ({ ...p, file: path.relative(dir, p.file) })) };
  }
  assert.fail('the config was accepted');
}

function problemAt(problems: readonly ConfigProblem[], file: string, pointer: string): ConfigProblem {
  const found = problems.find((p) => p.file === file && p.pointer === pointer);
  assert.ok(found, `no problem at ${file}#${pointer}; got:\n${problems.map((p) => `${p.file}#${p.pointer}: ${p.message}`).join('\n')}`);
  return found;
}

function withRules(rules: unknown, config: unknown = validConfig): Record<string, unknown> {
  return { 'pgdso.config.json': config, 'rules/main.json': rules };
}

test('a valid config and rules load, with the defaults applied and everything frozen', async () => {
  const dir = await writeTree(withRules(validRules));
  const config: PgdsoConfig = await loadConfig(path.join(dir, 'pgdso.config.json'), ENV);

  assert.equal(config.file, path.join(dir, 'pgdso.config.json'));
  assert.deepEqual(config.ruleFiles, [path.join(dir, 'rules/main.json')]);
  assert.deepEqual(config.servers.sf, {
    name: 'sf',
    connection: { host: '127.0.0.1', port: 5432, database: 'ar', user: 'pgdso', password: 'sf-pa55word' },
  });
  assert.deepEqual(config.servers.chicago?.connection, {
    host: '127.0.0.1',
    port: 5433,
    database: 'ar',
    user: 'pgdso',
    password: 'chicago-pa55word',
  });
  assert.deepEqual(config.group, { checkIntervalSeconds: 2, delinquentThreshold: 3 });
  assert.deepEqual(config.http, { port: null });

  const chairs = config.mappings['sf-chairs-to-chicago']!;
  assert.deepEqual(
    { ...chairs, source: undefined },
    {
      name: 'sf-chairs-to-chicago',
      from: { server: 'sf', schema: 'public', table: 'repair_request' },
      to: { server: 'chicago', schema: 'public', table: 'repair_request' },
      transferMode: 'data+ownership',
      whenToUpdate: 'immediately',
      duplicateRequestId: 'error',
      match: 'request-id',
      fields: { byName: true, exclude: [], map: {}, set: {} },
      afterTransfer: 'keep',
      conflict: 'source-wins',
      pool: 'default',
      source: undefined,
    },
  );
  assert.deepEqual(chairs.source, { file: path.join(dir, 'rules/main.json'), pointer: '/mappings/0' });
  const archive = config.mappings['chicago-archive']!;
  assert.deepEqual(archive.to, { server: 'sf', schema: 'archive', table: 'repair_request' });
  assert.deepEqual(archive.match, { fields: ['legacy_id'] });
  assert.deepEqual(archive.fields, {
    byName: false,
    exclude: ['internal_note'],
    map: { location: 'site' },
    set: { region: 'us-central', priority: 2, closed: false, note: null },
  });
  assert.deepEqual(
    [archive.transferMode, archive.whenToUpdate, archive.duplicateRequestId, archive.afterTransfer, archive.conflict, archive.pool],
    ['independent-copy', 'never', 'overwrite', 'delete', 'newer-wins', 'archive'],
  );

  assert.deepEqual(config.filters[0]?.on, {
    server: 'sf',
    schema: 'public',
    table: 'repair_request',
    ops: ['insert', 'update'],
    transitions: false,
  });
  assert.deepEqual(config.filters[0]?.actions, [{ type: 'transfer', mapping: 'sf-chairs-to-chicago', overrideLoopDetection: false }]);
  assert.equal(config.filters[1]?.conditions, null);
  assert.deepEqual(config.filters[1]?.actions, [
    { type: 'return', overrideLoopDetection: true },
    { type: 'update', mapping: 'chicago-archive' },
  ]);
  assert.deepEqual(config.escalations[0]?.schedule, { cron: '0 17 * * 1-5', timezone: 'America/Los_Angeles' });
  assert.deepEqual(config.escalations[0]?.source, { file: path.join(dir, 'rules/main.json'), pointer: '/escalations/0' });

  assert.ok(Object.isFrozen(config) && Object.isFrozen(config.servers.sf?.connection) && Object.isFrozen(config.filters[0]?.conditions));
  assert.throws(() => {
    (config.group as { checkIntervalSeconds: number }).checkIntervalSeconds = 9;
  }, TypeError);
});

test('group, http, URL parameters and a percent-encoded password placeholder are resolved', async () => {
  const dir = await writeTree(
    withRules(validRules, {
      ...validConfig,
      servers: {
        sf: { connection: 'postgresql://pgdso:${env:SF_PASSWORD}@db.example:6543/ar?sslmode=require&application_name=pgdso-sf' },
        chicago: { connection: '${env:CHICAGO_URL}' },
      },
      group: { checkIntervalSeconds: 0.5 },
      http: { port: 9464 },
    }),
  );
  const config = await loadConfig(path.join(dir, 'pgdso.config.json'), {
    SF_PASSWORD: 'p@ss/w#rd?',
    CHICAGO_URL: 'postgres://ops@chicago.example/ar',
  });
  assert.deepEqual(config.servers.sf?.connection, {
    host: 'db.example',
    port: 6543,
    database: 'ar',
    user: 'pgdso',
    password: 'p@ss/w#rd?',
    options: { sslmode: 'require', application_name: 'pgdso-sf' },
  });
  assert.deepEqual(config.servers.chicago?.connection, { host: 'chicago.example', port: 5432, database: 'ar', user: 'ops' });
  assert.deepEqual(config.group, { checkIntervalSeconds: 0.5, delinquentThreshold: 3 });
  assert.deepEqual(config.http, { port: 9464 });
});

test('the routing example loads', async () => {
  const configPath = fileURLToPath(new URL('../examples/routing/pgdso.config.json', import.meta.url));
  const config = await loadConfig(configPath, {
    SF_URL: 'postgres://pgdso:a@127.0.0.1:5432/ar',
    CHICAGO_URL: 'postgres://pgdso:b@127.0.0.1:5433/ar',
    CHICAGO_UPH_URL: 'postgres://pgdso:c@127.0.0.1:5434/ar',
  });
  assert.deepEqual(Object.keys(config.servers), ['sf', 'chicago', 'chicago_uph']);
  assert.deepEqual(Object.keys(config.mappings), ['sf-to-chicago', 'chicago-to-upholstery']);
  assert.deepEqual(
    config.filters.map((f) => `${f.name}@${f.on.server}`),
    ['route-chairs@sf', 'route-upholstery@chicago'],
  );
  assert.ok(Object.values(config.mappings).every((m) => m.transferMode === 'data+ownership'));
});

test('the shipped schemas compile, and the example files satisfy them', async () => {
  const read = async (p: string): Promise<unknown> => JSON.parse(await readFile(fileURLToPath(new URL(p, import.meta.url)), 'utf8'));
  const ajv = new Ajv({ allErrors: true, strict: true, strictRequired: false, strictTypes: false });
  const configSchema = ajv.compile((await read('../schema/config.schema.json')) as object);
  const rulesSchema = ajv.compile((await read('../schema/rules.schema.json')) as object);
  assert.ok(configSchema(await read('../examples/routing/pgdso.config.json')), JSON.stringify(configSchema.errors));
  assert.ok(rulesSchema(await read('../examples/routing/rules/routing.json')), JSON.stringify(rulesSchema.errors));
});

test('the rules schema and the condition compiler accept and reject the same conditions', async () => {
  const schema = JSON.parse(await readFile(fileURLToPath(new URL('../schema/rules.schema.json', import.meta.url)), 'utf8')) as object;
  const validate = new Ajv({ allErrors: true, strict: true, strictRequired: false, strictTypes: false }).compile(schema);
  const leaf = { fact: 'row', path: '$.a', operator: 'equal', value: 1 };
  const samples: [unknown, boolean][] = [
    [null, true],
    [{ all: [] }, true],
    [{ any: [leaf, { not: { all: [leaf] } }] }, true],
    [{ not: { any: [] } }, true],
    [{ all: [{ fact: 'old', path: "$['a b'].c", operator: 'in', value: { fact: 'row', path: '$.list' } }] }, true],
    [
      {
        all: [
          { fact: 'changed', operator: 'contains', value: 'status' },
          { fact: 'row', operator: 'equal', value: { k: 1 } },
        ],
      },
      true,
    ],
    [{ all: [{ fact: 'row', path: '$.a', operator: 'notIn', value: [1, 'x', null] }] }, true],
    [leaf, false],
    [{ all: [leaf], any: [] }, false],
    [{ all: leaf }, false],
    [{ not: [leaf] }, false],
    [{ all: [{ ...leaf, path: "$['..']" }] }, false],
    [{ all: [{ ...leaf, path: '$.a[0]' }] }, false],
    [{ all: [{ ...leaf, operator: 'in', value: 'abc' }] }, false],
    [{ all: [{ ...leaf, fact: 'user' }] }, false],
    [{ all: [{ ...leaf, priority: 1 }] }, false],
    [{ all: [{ ...leaf, value: { fact: 'row', params: {} } }] }, false],
    [{ all: [{ condition: 'x' }] }, false],
    [{ all: [{ fact: 'row', operator: 'equal' }] }, false],
    ['all', false],
  ];
  for (const [conditions, accepted] of samples) {
    const document = { filters: [{ name: 'f', on: { server: 'sf', form: 't' }, conditions, actions: [{ type: 'return' }] }] };
    assert.equal(validate(document), accepted, `schema on ${JSON.stringify(conditions)}`);
    assert.equal(checkConditions(conditions).length === 0, accepted, `compiler on ${JSON.stringify(conditions)}`);
  }
});

test('malformed JSON is reported with its line and column', async () => {
  const { problems } = await problemsOf(withRules('{\n  "mappings": [\n    { "name": "a", }\n  ]\n}\n'));
  const problem = problemAt(problems, 'rules/main.json', '/mappings/0');
  assert.match(problem.message, /invalid JSON at line 3, column 20: trailing comma before '}'/);

  const config = await problemsOf({ 'pgdso.config.json': '{ "servers": {}\n  "rules": [] }' });
  assert.match(
    problemAt(config.problems, 'pgdso.config.json', '/servers').message,
    /line 2, column 3: unexpected character '"', expected ',' or '}'/,
  );
});

test('a duplicate key in a JSON file is reported', async () => {
  const { problems } = await problemsOf(withRules('{ "filters": [], "filters": [] }'));
  assert.match(problemAt(problems, 'rules/main.json', '/filters').message, /duplicate key "filters" at line 1, column 18/);
});

test('an unknown option name is reported at its pointer, with the likely intended name', async () => {
  const rules = structuredClone(validRules);
  rules.mappings[0]!.trasnferMode = 'data-only';
  const { problems } = await problemsOf(withRules(rules));
  assert.equal(
    problemAt(problems, 'rules/main.json', '/mappings/0/trasnferMode').message,
    'unknown property "trasnferMode" (did you mean "transferMode"?)',
  );
});

test('a bad enum value is reported with the allowed values', async () => {
  const rules = structuredClone(validRules);
  rules.mappings[0]!.transferMode = 'ownership-only';
  const { problems } = await problemsOf(withRules(rules));
  assert.equal(
    problemAt(problems, 'rules/main.json', '/mappings/0/transferMode').message,
    'must be one of "data-only", "data+ownership", "independent-copy"',
  );
});

test('an action naming an unknown mapping, or a mapping of another form, is reported', async () => {
  const rules = structuredClone(validRules);
  rules.filters[0]!.actions = [
    { type: 'transfer', mapping: 'sf-chairs-to-chicag' },
    { type: 'update', mapping: 'chicago-archive' },
  ];
  rules.filters[1]!.actions = [{ type: 'return', mapping: 'nope', overrideLoopDetection: false }];
  const { problems } = await problemsOf(withRules(rules));
  assert.equal(
    problemAt(problems, 'rules/main.json', '/filters/0/actions/0/mapping').message,
    'unknown mapping "sf-chairs-to-chicag" (did you mean "sf-chairs-to-chicago"?)',
  );
  assert.match(
    problemAt(problems, 'rules/main.json', '/filters/0/actions/1/mapping').message,
    /mapping "chicago-archive" reads from chicago:public\.repair_request, but filter "route-chairs" is on sf:public\.repair_request/,
  );
  assert.equal(problemAt(problems, 'rules/main.json', '/filters/1/actions/0/mapping').message, 'unknown mapping "nope"');
});

test('a mapping, filter or escalation naming an unknown server is reported', async () => {
  const rules = structuredClone(validRules);
  rules.mappings[0]!.to.server = 'tokyo';
  rules.filters[0]!.on.server = 'chicgo';
  rules.escalations[0]!.on.server = 'osaka';
  const { problems } = await problemsOf(withRules(rules));
  assert.equal(
    problemAt(problems, 'rules/main.json', '/mappings/0/to/server').message,
    'unknown server "tokyo"; the config defines "sf", "chicago"',
  );
  assert.match(
    problemAt(problems, 'rules/main.json', '/filters/0/on/server').message,
    /unknown server "chicgo" \(did you mean "chicago"\?\)/,
  );
  problemAt(problems, 'rules/main.json', '/escalations/0/on/server');
});

test('a missing environment variable is named with its pointer, and no other value appears', async () => {
  const { error, problems } = await problemsOf(withRules(validRules), { SF_PASSWORD: 'sf-pa55word' });
  assert.equal(
    problemAt(problems, 'pgdso.config.json', '/servers/chicago/connection/password').message,
    'environment variable CHICAGO_PASSWORD is not set',
  );
  assert.equal(problems.length, 1, 'the missing variable is not reported a second time as a bad connection');
  assert.ok(!error.message.includes('sf-pa55word'));
});

test('a glob that matches nothing, and a rule file that does not exist, are reported', async () => {
  const { problems } = await problemsOf(withRules(validRules, { ...validConfig, rules: ['rules/*.json', 'more/*.json', 'extra.json'] }));
  assert.match(problemAt(problems, 'pgdso.config.json', '/rules/1').message, /the glob "more\/\*\.json" matches no file/);
  assert.match(problemAt(problems, 'pgdso.config.json', '/rules/2').message, /rule file "extra\.json" not found/);
});

test('a cron expression that does not parse, one that never fires, and an unknown time zone are reported', async () => {
  const rules = structuredClone(validRules);
  rules.escalations.push(
    { ...structuredClone(rules.escalations[0]!), name: 'bad-cron', schedule: { cron: '0 25 * * *', timezone: 'America/Los_Angeles' } },
    { ...structuredClone(rules.escalations[0]!), name: 'never', schedule: { cron: '0 0 31 2 *', timezone: 'UTC' } },
    { ...structuredClone(rules.escalations[0]!), name: 'bad-zone', schedule: { cron: '0 9 * * *', timezone: 'Europe/Atlantis' } },
  );
  const { problems } = await problemsOf(withRules(rules));
  assert.match(
    problemAt(problems, 'rules/main.json', '/escalations/1/schedule/cron').message,
    /invalid cron expression "0 25 \* \* \*": .*hour/i,
  );
  assert.match(problemAt(problems, 'rules/main.json', '/escalations/2/schedule/cron').message, /never fires/);
  assert.match(problemAt(problems, 'rules/main.json', '/escalations/3/schedule/timezone').message, /unknown time zone "Europe\/Atlantis"/);
});

test('a schedule is cron (with a time zone) or everySeconds: both, neither, a zone with everySeconds, 0 seconds are reported', async () => {
  const rules = structuredClone(validRules);
  const base = rules.escalations[0]!;
  rules.escalations.push(
    { ...structuredClone(base), name: 'both', schedule: { cron: '0 9 * * *', everySeconds: 60 } },
    { ...structuredClone(base), name: 'zoned', schedule: { everySeconds: 60, timezone: 'UTC' } },
    { ...structuredClone(base), name: 'zero', schedule: { everySeconds: 0 } },
    { ...structuredClone(base), name: 'neither', schedule: {} },
    { ...structuredClone(base), name: 'fine', schedule: { everySeconds: 30 } },
  );
  const { problems } = await problemsOf(withRules(rules));
  assert.match(problemAt(problems, 'rules/main.json', '/escalations/1/schedule').message, /either "cron".*or "everySeconds"/);
  assert.match(problemAt(problems, 'rules/main.json', '/escalations/2/schedule/timezone').message, /goes with "cron"/);
  problemAt(problems, 'rules/main.json', '/escalations/3/schedule/everySeconds');
  problemAt(problems, 'rules/main.json', '/escalations/4/schedule');
  assert.equal(
    problems.filter((p) => p.pointer.startsWith('/escalations/5')).length,
    0,
    `everySeconds 30 is valid: ${JSON.stringify(problems)}`,
  );
});

test('duplicate names across rule files name both places', async () => {
  const dir = await writeTree({
    'pgdso.config.json': validConfig,
    'rules/a.json': validRules,
    'rules/b.json': { filters: [{ ...validRules.filters[0], actions: [{ type: 'transfer', mapping: 'sf-chairs-to-chicago' }] }] },
  });
  const error = await loadConfig(path.join(dir, 'pgdso.config.json'), ENV).then(
    () => assert.fail('accepted'),
    (err: unknown) => err as ConfigError,
  );
  const problem = error.problems.find((p) => p.pointer === '/filters/0/name');
  assert.equal(problem?.file, path.join(dir, 'rules/b.json'));
  assert.equal(
    problem?.message,
    `duplicate filter name "route-chairs": already defined at ${path.join(dir, 'rules/a.json')}#/filters/0/name`,
  );
});

test('mapping checks: same server and form, a column mapped twice, an excluded column mapped, a distributed column', async () => {
  const rules = structuredClone(validRules);
  rules.mappings[0]!.to = { server: 'sf', form: 'public.repair_request' };
  rules.mappings[1]!.fields = {
    exclude: ['location', 'region'],
    map: { location: 'site', dso_master: 'x' },
    set: { location: 'x', region: 'y' },
  };
  const { problems } = await problemsOf(withRules(rules));
  assert.match(
    problemAt(problems, 'rules/main.json', '/mappings/0/to').message,
    /cannot carry requests to the form it reads from \(sf:public\.repair_request\)/,
  );
  assert.match(
    problemAt(problems, 'rules/main.json', '/mappings/1/fields/map/location').message,
    /both in "fields.exclude" and a target of "fields.map"/,
  );
  assert.ok(problems.some((p) => p.pointer === '/mappings/1/fields/set/location' && /given twice/.test(p.message)));
  assert.match(problemAt(problems, 'rules/main.json', '/mappings/1/fields/set/region').message, /both in "fields.exclude"/);
  assert.match(problemAt(problems, 'rules/main.json', '/mappings/1/fields/map/dso_master').message, /distributed column/);
});

test('conditions outside the supported subset are reported with their pointers', async () => {
  const rules = structuredClone(validRules);
  rules.filters[0]!.conditions = { any: [{ condition: 'shared' }, { fact: 'row', path: '$.item', operator: 'not:equal', value: 'x' }] };
  const { problems } = await problemsOf(withRules(rules));
  assert.match(problemAt(problems, 'rules/main.json', '/filters/0/conditions/any/0/condition').message, /condition references/);
  assert.match(problemAt(problems, 'rules/main.json', '/filters/0/conditions/any/1/operator').message, /unsupported operator "not:equal"/);
  assert.equal(
    problems.filter((p) => p.pointer.startsWith('/filters/0/conditions')).length,
    2,
    'no schema noise on top of the precise messages',
  );
});

test('several problems in several files are all reported in one run', async () => {
  const rules = structuredClone(validRules);
  rules.mappings[0]!.conflict = 'last-wins';
  rules.filters[0]!.actions = [{ type: 'transfer', mapping: 'ghost' }];
  const { problems, error } = await problemsOf({
    'pgdso.config.json': { ...validConfig, rules: ['rules/*.json'], group: { delinquentThreshold: 0 }, htp: {} },
    'rules/main.json': rules,
    'rules/other.json': '{ "escalations": [ { "name": "e" ] }',
  });
  problemAt(problems, 'pgdso.config.json', '/group/delinquentThreshold');
  problemAt(problems, 'pgdso.config.json', '/htp');
  problemAt(problems, 'rules/main.json', '/mappings/0/conflict');
  problemAt(problems, 'rules/main.json', '/filters/0/actions/0/mapping');
  problemAt(problems, 'rules/other.json', '/escalations/0/name');
  assert.equal(problems.length, 5, problems.map((p) => `${p.file}#${p.pointer}: ${p.message}`).join('\n'));
  assert.equal(error.message.split('\n').length, 5, 'one line per problem');
});

test('error messages never contain a password from the config', async () => {
  const secret = 'Sup3r$ecret-Pa55';
  const cases: Record<string, unknown>[] = [
    // URL with an unknown parameter and a bad port, the password inline
    withRules(validRules, { ...validConfig, servers: { sf: { connection: `postgres://pgdso:${secret}@host:99999/ar?sslmod=require` } } }),
    // URL that does not parse at all
    withRules(validRules, { ...validConfig, servers: { sf: { connection: `postgres://pgdso:${secret}@[bad/ar` } } }),
    // a password in an object connection next to schema problems
    withRules(validRules, {
      ...validConfig,
      servers: { sf: { connection: { host: 'h', database: 'ar', user: 'u', password: secret, port: 'x', sslmode: 'sometimes' } } },
    }),
    // a password that makes the JSON invalid right after it
    { 'pgdso.config.json': `{ "servers": { "sf": { "connection": "postgres://u:${secret}@h/ar" x } }, "rules": [] }` },
    // a password given through the environment, next to a missing variable and a bad URL
    withRules(validRules, {
      ...validConfig,
      servers: { sf: { connection: 'postgres://u:${env:SF_PASSWORD}@h:0/' }, chicago: { connection: 'mysql://${env:NOPE}@h/ar' } },
    }),
  ];
  for (const files of cases) {
    const { error } = await problemsOf(files, { SF_PASSWORD: secret, CHICAGO_PASSWORD: secret });
    const everything = `${error.message}\n${JSON.stringify(error.problems)}\n${String(error.stack)}`;
    assert.ok(!everything.includes(secret), `the password leaked:\n${error.message}`);
    assert.ok(!everything.includes(encodeURIComponent(secret)), `the encoded password leaked:\n${error.message}`);
  }
});

test('describeConnection never shows the password; toPgClientConfig carries it and maps sslmode', () => {
  const connection = {
    host: 'db.example',
    port: 5433,
    database: 'ar',
    user: 'pgdso',
    password: 'hunter2',
    options: { sslmode: 'require', application_name: 'x', connect_timeout: '5' },
  };
  assert.equal(describeConnection(connection), 'pgdso@db.example:5433/ar');
  assert.equal(describeConnection({ ...connection, host: '::1' }), 'pgdso@[::1]:5433/ar');
  const pgConfig = toPgClientConfig(connection);
  assert.deepEqual(
    { ...pgConfig },
    {
      host: 'db.example',
      port: 5433,
      database: 'ar',
      user: 'pgdso',
      password: 'hunter2',
      fallback_application_name: 'pgdso',
      application_name: 'x',
      connectionTimeoutMillis: 5000,
      ssl: { rejectUnauthorized: false },
    },
  );
  assert.equal(toPgClientConfig({ ...connection, options: { sslmode: 'disable' } }).ssl, false);
  assert.equal(toPgClientConfig({ ...connection, options: undefined }).ssl, undefined);
  assert.equal(
    (toPgClientConfig({ ...connection, options: { sslmode: 'verify-full' } }).ssl as { rejectUnauthorized: boolean }).rejectUnauthorized,
    true,
  );
});

test('rule files given as texts: a broken text is reported with its file as given, its pointer and the reason', async () => {
  // the config's glob matches nothing on disk: with given texts it is not read
  const dir = await writeTree({ 'pgdso.config.json': validConfig });
  const rules = structuredClone(validRules);
  rules.mappings[0]!.transferMode = 'ownership-only';
  const error = await loadConfig(path.join(dir, 'pgdso.config.json'), ENV, {
    ruleSources: [
      { file: 'rules/main.json', text: JSON.stringify(rules, null, 2) },
      { file: 'rules/broken.json', text: '{ "filters": [ { "name": "x", } ] }' },
      { file: 'rules/again.json', text: JSON.stringify({ filters: [validRules.filters[0]] }) },
    ],
  }).then(
    () => assert.fail('accepted'),
    (err: unknown) => err as ConfigError,
  );
  assert.ok(error instanceof ConfigError);
  assert.equal(
    problemAt(error.problems, 'rules/main.json', '/mappings/0/transferMode').message,
    'must be one of "data-only", "data+ownership", "independent-copy"',
  );
  assert.equal(
    problemAt(error.problems, 'rules/broken.json', '/filters/0').message,
    "invalid JSON at line 1, column 31: trailing comma before '}'",
  );
  assert.equal(
    problemAt(error.problems, 'rules/again.json', '/filters/0/name').message,
    'duplicate filter name "route-chairs": already defined at rules/main.json#/filters/0/name',
  );
  assert.equal(error.problems.length, 3, error.message);
  assert.match(error.message, /^rules\/main\.json/);
});

test('the rule texts read by readRuleSources compile to the same config as the files on disk', async () => {
  const { escalations, ...rest } = validRules;
  const dir = await writeTree({
    // a problem elsewhere in the config does not stop the rule files from being read
    'pgdso.config.json': { ...validConfig, rules: ['rules/*.json', 'more/escalations.json'], htp: {} },
    'rules/b.json': rest,
    'rules/a.json': { mappings: [] },
    'more/escalations.json': { escalations },
  });
  const configPath = path.join(dir, 'pgdso.config.json');
  const sources = await readRuleSources(configPath, ENV);
  const files = ['rules/a.json', 'rules/b.json', 'more/escalations.json'].map((f) => path.join(dir, f));
  assert.deepEqual(
    sources.map((s) => s.file),
    files,
  );
  for (const source of sources) assert.equal(source.text, await readFile(source.file, 'utf8'));

  await writeFile(configPath, JSON.stringify({ ...validConfig, rules: ['rules/*.json', 'more/escalations.json'] }));
  const fromDisk = await loadConfig(configPath, ENV);
  const fromTexts = await loadConfig(configPath, ENV, { ruleSources: sources });
  assert.deepEqual(fromTexts, fromDisk);
  assert.deepEqual(fromTexts.ruleFiles, files);
  const compiled = compileRules(fromTexts);
  assert.deepEqual(
    compiled.filtersFor('sf', 'public', 'repair_request', 'insert').map((f) => f.name),
    ['route-chairs'],
  );
  assert.deepEqual(
    compiled.escalationsFor('sf').map((e) => e.name),
    ['follow-the-sun-sf'],
  );

  // named as given: config.ruleFiles and each rule's source carry the given names
  const named = await loadConfig(configPath, ENV, {
    ruleSources: sources.map((s) => ({ file: path.relative(dir, s.file), text: s.text })),
  });
  assert.deepEqual(named.ruleFiles, ['rules/a.json', 'rules/b.json', 'more/escalations.json']);
  assert.deepEqual(named.mappings['sf-chairs-to-chicago']?.source, { file: 'rules/b.json', pointer: '/mappings/0' });
  assert.deepEqual(
    { ...named, ruleFiles: fromDisk.ruleFiles, mappings: fromDisk.mappings, filters: fromDisk.filters, escalations: fromDisk.escalations },
    fromDisk,
  );
});

test('readRuleSources reports a glob that matches nothing and a missing rule file as loadConfig does', async () => {
  const dir = await writeTree(withRules(validRules, { ...validConfig, rules: ['rules/*.json', 'more/*.json', 'extra.json'] }));
  const configPath = path.join(dir, 'pgdso.config.json');
  const fromLoad = await loadConfig(configPath, ENV).then(
    () => assert.fail('accepted'),
    (err: unknown) => err as ConfigError,
  );
  const fromRead = await readRuleSources(configPath, ENV).then(
    () => assert.fail('accepted'),
    (err: unknown) => err as ConfigError,
  );
  assert.ok(fromRead instanceof ConfigError);
  assert.deepEqual(fromRead.problems, fromLoad.problems);
  assert.deepEqual(
    fromRead.problems.map((p) => p.pointer),
    ['/rules/1', '/rules/2'],
  );
  assert.match(problemAt(fromRead.problems, configPath, '/rules/2').message, /rule file "extra\.json" not found/);
});
