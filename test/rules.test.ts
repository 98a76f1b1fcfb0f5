// Compiled filters: facts from decoded changes, the compiled predicates against json-rules-engine
// itself, and the indexed rule set. Pure logic: no database.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { buildFacts, factValue, TypeOid, type Facts } from '../src/rules/facts.ts';
import { checkConditions, compileConditions, parsePath, RuleEvaluationError } from '../src/rules/compile.ts';
import { compileRules } from '../src/rules/index.ts';
import { loadConfig } from '../src/config/load.ts';
import type { Relation, RowChange } from '../src/change.ts';
import { compiledVerdict, configWith, engineVerdict, prng, randomFacts, randomTopLevel, type Outcome } from './support/conditions.ts';

// ---------------------------------------------------------------------------------------------
// factValue and buildFacts

test('factValue converts booleans, small integers and floats, keeps NaN and Infinity as text', () => {
  assert.equal(factValue(TypeOid.bool, 't'), true);
  assert.equal(factValue(TypeOid.bool, 'f'), false);
  assert.equal(factValue(TypeOid.int2, '-12'), -12);
  assert.equal(factValue(TypeOid.int4, '2147483647'), 2147483647);
  assert.equal(factValue(TypeOid.oid, '4294967295'), 4294967295);
  assert.equal(factValue(TypeOid.float8, '1.5'), 1.5);
  assert.equal(factValue(TypeOid.float8, '-1e+100'), -1e100);
  assert.equal(factValue(TypeOid.float4, '0.1'), 0.1);
  assert.equal(factValue(TypeOid.float8, 'NaN'), 'NaN');
  assert.equal(factValue(TypeOid.float8, 'Infinity'), 'Infinity');
  assert.equal(factValue(TypeOid.float4, '-Infinity'), '-Infinity');
});

test('factValue turns int8 and numeric into numbers only when the number is exact', () => {
  assert.equal(factValue(TypeOid.int8, '42'), 42);
  assert.equal(factValue(TypeOid.int8, '-9007199254740991'), -9007199254740991);
  assert.equal(factValue(TypeOid.int8, '9007199254740992'), '9007199254740992', '2^53 is not a safe integer');
  assert.equal(factValue(TypeOid.int8, '9223372036854775807'), '9223372036854775807');
  assert.equal(factValue(TypeOid.numeric, '12.50'), 12.5, 'trailing zeros do not change the value');
  assert.equal(factValue(TypeOid.numeric, '0.1'), 0.1);
  assert.equal(factValue(TypeOid.numeric, '-0.000001'), -0.000001);
  assert.equal(factValue(TypeOid.numeric, '100'), 100);
  assert.equal(factValue(TypeOid.numeric, '0.00'), 0);
  assert.equal(factValue(TypeOid.numeric, '0.1000000000000000055511151231257827'), '0.1000000000000000055511151231257827');
  assert.equal(factValue(TypeOid.numeric, '123456789012345678901234567890'), '123456789012345678901234567890');
  assert.equal(factValue(TypeOid.numeric, '1.00000000000000001'), '1.00000000000000001');
  assert.equal(factValue(TypeOid.numeric, 'NaN'), 'NaN');
  assert.equal(factValue(TypeOid.numeric, 'Infinity'), 'Infinity');
});

test('factValue parses json and jsonb, keeps other types as text, and passes null and undefined through', () => {
  assert.deepEqual(factValue(TypeOid.jsonb, '{"a": [1, "x", null]}'), { a: [1, 'x', null] });
  assert.equal(factValue(TypeOid.json, '"s"'), 's');
  assert.equal(factValue(25 /* text */, 'chair'), 'chair');
  assert.equal(factValue(1184 /* timestamptz */, '2024-01-02 03:04:05+00'), '2024-01-02 03:04:05+00');
  assert.equal(factValue(2950 /* uuid */, '5f0c2d1e-0000-4000-8000-000000000000'), '5f0c2d1e-0000-4000-8000-000000000000');
  assert.equal(factValue(1009 /* text[] */, '{a,b}'), '{a,b}');
  assert.equal(factValue(TypeOid.int4, null), null);
  assert.equal(factValue(TypeOid.int4, undefined), undefined);
  assert.equal(factValue(TypeOid.jsonb, null), null);
});

const repairRequest: Relation = {
  oid: 16400,
  schema: 'public',
  table: 'repair_request',
  replicaIdentity: 'full',
  columns: [
    { name: 'id', typeOid: 25, typeMod: -1, isKey: true },
    { name: 'item', typeOid: 25, typeMod: -1, isKey: false },
    { name: 'qty', typeOid: TypeOid.int8, typeMod: -1, isKey: false },
    { name: 'meta', typeOid: TypeOid.jsonb, typeMod: -1, isKey: false },
    { name: 'dso_master', typeOid: TypeOid.bool, typeMod: -1, isKey: false },
  ],
};

function change(op: RowChange['op'], newRow: RowChange['new'], oldRow: RowChange['old'], relation = repairRequest): RowChange {
  return { op, relation, lsn: 1n, new: newRow, old: oldRow };
}

test('buildFacts for an insert converts the new row and has no old row', () => {
  const facts = buildFacts(change('insert', { id: 'R1', item: 'chair', qty: '3', meta: '{"k":1}', dso_master: 't' }, null), null);
  assert.deepEqual(facts, {
    row: { id: 'R1', item: 'chair', qty: 3, meta: { k: 1 }, dso_master: true },
    old: null,
    op: 'insert',
    changed: [],
    origin: null,
    master: true,
  });
});

test('buildFacts for an update with a complete old row lists the changed columns; an unchanged TOAST value is not a change', () => {
  const facts = buildFacts(
    change(
      'update',
      { id: 'R1', item: 'desk', qty: '3', meta: undefined, dso_master: 'f' },
      { id: 'R1', item: 'chair', qty: '3', meta: '{}', dso_master: 't' },
    ),
    'chicago',
  );
  assert.deepEqual(facts.changed, ['item', 'dso_master']);
  assert.equal(facts.origin, 'chicago');
  assert.equal(facts.master, false);
  assert.deepEqual(facts.old, { id: 'R1', item: 'chair', qty: 3, meta: {}, dso_master: true });
  assert.equal(facts.row.meta, undefined);
});

test('buildFacts for an update with a key-only old row cannot tell the changed columns', () => {
  const facts = buildFacts(change('update', { id: 'R2', item: 'desk', qty: '1', meta: null, dso_master: 't' }, { id: 'R1' }), null);
  assert.deepEqual(facts.changed, []);
  assert.deepEqual(facts.old, { id: 'R1' });
});

test('buildFacts for a delete uses the old values as the row; master defaults to true without dso_master', () => {
  const facts = buildFacts(change('delete', null, { id: 'R1' }), null);
  assert.deepEqual(facts, { row: { id: 'R1' }, old: null, op: 'delete', changed: [], origin: null, master: true });
  const notMaster = buildFacts(change('delete', null, { id: 'R1', item: 'x', qty: null, meta: null, dso_master: 'f' }), null);
  assert.equal(notMaster.master, false);
});

// ---------------------------------------------------------------------------------------------
// The compiled predicate agrees with json-rules-engine

test('compiled predicates agree with json-rules-engine on thousands of generated conditions and rows', async () => {
  const random = prng(20260517);
  const counts = { true: 0, false: 0, throws: 0 };
  for (let i = 0; i < 2500; i++) {
    const conditions = randomTopLevel(random);
    assert.deepEqual(
      checkConditions(conditions),
      [],
      `generated conditions must be in the supported subset: ${JSON.stringify(conditions)}`,
    );
    for (let j = 0; j < 2; j++) {
      const facts = randomFacts(random);
      const expected = await engineVerdict(conditions, facts);
      const actual = compiledVerdict(conditions, facts);
      assert.equal(actual, expected, `case ${i}.${j}\nconditions: ${JSON.stringify(conditions)}\nfacts: ${JSON.stringify(facts)}`);
      counts[String(expected) as keyof typeof counts]++;
    }
  }
  // the generator exercises every outcome
  assert.ok(counts.true > 500 && counts.false > 500 && counts.throws > 10, JSON.stringify(counts));
});

const semanticsCases: { name: string; conditions: Record<string, unknown>; facts: Partial<Facts>; expected: Outcome }[] = [
  {
    name: 'equal is strict: the number 5 is not the string "5"',
    conditions: { all: [{ fact: 'row', path: '$.n', operator: 'equal', value: 5 }] },
    facts: { row: { n: '5' } },
    expected: false,
  },
  {
    name: 'numeric operators compare a numeric string with a number as numbers',
    conditions: { all: [{ fact: 'row', path: '$.n', operator: 'greaterThan', value: 9 }] },
    facts: { row: { n: '10' } },
    expected: true,
  },
  {
    name: 'numeric operators compare two strings as text',
    conditions: { all: [{ fact: 'row', path: '$.n', operator: 'greaterThan', value: '9' }] },
    facts: { row: { n: '10' } },
    expected: false,
  },
  {
    name: 'a fact that does not parse as a number fails numeric operators',
    conditions: { all: [{ fact: 'row', path: '$.n', operator: 'lessThan', value: 100 }] },
    facts: { row: { n: 'abc' } },
    expected: false,
  },
  {
    name: 'null fails numeric operators',
    conditions: { all: [{ fact: 'row', path: '$.n', operator: 'lessThanInclusive', value: 0 }] },
    facts: { row: { n: null } },
    expected: false,
  },
  {
    name: 'a missing path is undefined',
    conditions: { all: [{ fact: 'row', path: '$.nope', operator: 'notEqual', value: null }] },
    facts: { row: {} },
    expected: true,
  },
  {
    name: 'a path does not enter an empty string (JSONPath skips falsy values)',
    conditions: { all: [{ fact: 'row', path: '$.a.length', operator: 'equal', value: 0 }] },
    facts: { row: { a: '' } },
    expected: false,
  },
  {
    name: 'a path enters a non-empty string',
    conditions: { all: [{ fact: 'row', path: '$.a.length', operator: 'equal', value: 3 }] },
    facts: { row: { a: 'abc' } },
    expected: true,
  },
  {
    name: 'a path on a null old row gives null',
    conditions: { all: [{ fact: 'old', path: '$.status', operator: 'equal', value: null }] },
    facts: { old: null },
    expected: true,
  },
  {
    name: 'contains needs an array fact',
    conditions: { any: [{ fact: 'changed', operator: 'contains', value: 'status' }] },
    facts: { changed: ['item', 'status'] },
    expected: true,
  },
  {
    name: 'doesNotContain is false on a string fact',
    conditions: { any: [{ fact: 'row', path: '$.item', operator: 'doesNotContain', value: 'z' }] },
    facts: { row: { item: 'chair' } },
    expected: false,
  },
  {
    name: 'fact-to-fact comparison',
    conditions: { all: [{ fact: 'row', path: '$.status', operator: 'notEqual', value: { fact: 'old', path: '$.status' } }] },
    facts: { row: { status: 'open' }, old: { status: 'new' } },
    expected: true,
  },
  {
    name: 'in against a fact that is null throws, as Engine.run rejects',
    conditions: { all: [{ fact: 'op', operator: 'in', value: { fact: 'origin' } }] },
    facts: { origin: null },
    expected: 'throws',
  },
  {
    name: 'an error in one branch of all throws even when another branch is false',
    conditions: {
      all: [
        { fact: 'master', operator: 'equal', value: 'never' },
        { fact: 'op', operator: 'in', value: { fact: 'origin' } },
      ],
    },
    facts: { origin: null },
    expected: 'throws',
  },
  { name: 'any of nothing is true', conditions: { any: [] }, facts: {}, expected: true },
  {
    name: 'not inverts',
    conditions: { not: { fact: 'master', operator: 'equal', value: true } },
    facts: { master: false },
    expected: true,
  },
];

for (const c of semanticsCases) {
  test(`semantics as json-rules-engine: ${c.name}`, async () => {
    const facts: Facts = { row: {}, old: null, op: 'update', changed: [], origin: null, master: true, ...c.facts };
    assert.equal(await engineVerdict(c.conditions, facts), c.expected, 'json-rules-engine itself');
    assert.equal(compiledVerdict(c.conditions, facts), c.expected, 'compiled predicate');
  });
}

test('null conditions are always true', () => {
  assert.equal(compileConditions(null)({ row: {}, old: null, op: 'insert', changed: [], origin: null, master: true }), true);
});

test('conditions outside the compiled subset are rejected with a pointer and a reason', () => {
  const problems = checkConditions({
    all: [
      { condition: 'shared' },
      { fact: 'row', path: '$.a', operator: 'startsWith', value: 'x' },
      { fact: 'row', path: '$..a', operator: 'equal', value: 1, priority: 2 },
      { fact: 'row', operator: 'equal', value: { fact: 'row', params: { x: 1 } } },
      { fact: 'account', operator: 'in', value: 'abc' },
    ],
  });
  const byPointer = Object.fromEntries(problems.map((p) => [p.pointer, p.message]));
  assert.match(byPointer['/all/0/condition']!, /condition references/);
  assert.match(byPointer['/all/1/operator']!, /unsupported operator "startsWith"/);
  assert.match(byPointer['/all/2/path']!, /unsupported path/);
  assert.match(byPointer['/all/2/priority']!, /priority/);
  assert.match(byPointer['/all/3/value/params']!, /params/);
  assert.match(byPointer['/all/4/fact']!, /unknown fact "account"/);
  assert.match(byPointer['/all/4/value']!, /must be an array/);
  assert.deepEqual(
    checkConditions({ fact: 'op', operator: 'equal', value: 'insert' }).map((p) => p.pointer),
    [''],
  );
  assert.throws(() => compileConditions({ any: [{ condition: 'x' }] }), /condition references/);
});

test('parsePath accepts the simple JSONPath forms only', () => {
  assert.deepEqual(parsePath('$.a'), ['a']);
  assert.deepEqual(parsePath('$.a.b_2'), ['a', 'b_2']);
  assert.deepEqual(parsePath("$['a b'].c"), ['a b', 'c']);
  for (const unsupported of ['a', '$', '$..a', '$.*', '$[0]', "$['..']", '$.a[?(@.b)]', '$.a,b', "$['a']['b'", '$.1a']) {
    assert.equal(parsePath(unsupported), null, unsupported);
  }
});

// ---------------------------------------------------------------------------------------------
// The indexed rule set

const source = { file: '/rules.json', pointer: '' };

const baseFacts: Facts = { row: {}, old: null, op: 'insert', changed: [], origin: null, master: true };

test('compileRules indexes filters by server, form and op, and evaluates them in definition order', () => {
  const on = (ops: ('insert' | 'update' | 'delete')[]) => ({
    server: 'sf',
    schema: 'public',
    table: 'repair_request',
    ops,
    transitions: false,
  });
  const rules = compileRules(
    configWith({
      filters: [
        {
          name: 'first',
          on: on(['insert', 'update']),
          conditions: { all: [{ fact: 'row', path: '$.item', operator: 'equal', value: 'chair' }] },
          actions: [{ type: 'transfer', mapping: 'm1', overrideLoopDetection: false }],
          source,
        },
        { name: 'deletes', on: on(['delete']), conditions: null, actions: [{ type: 'delete', mapping: 'm1' }], source },
        { name: 'second', on: on(['insert']), conditions: null, actions: [{ type: 'update', mapping: 'm1' }], source },
        {
          name: 'elsewhere',
          on: { ...on(['insert']), server: 'chicago' },
          conditions: null,
          actions: [{ type: 'return', overrideLoopDetection: false }],
          source,
        },
      ],
    }),
  );
  assert.deepEqual(
    rules.filtersFor('sf', 'public', 'repair_request', 'insert').map((f) => f.name),
    ['first', 'second'],
  );
  assert.deepEqual(
    rules.filtersFor('sf', 'public', 'repair_request', 'update').map((f) => f.name),
    ['first'],
  );
  assert.deepEqual(rules.filtersFor('sf', 'public', 'other', 'insert'), []);
  assert.deepEqual(
    rules.evaluate('sf', 'public', 'repair_request', { ...baseFacts, row: { item: 'chair' } }).map((m) => m.filter),
    ['first', 'second'],
  );
  assert.deepEqual(rules.evaluate('sf', 'public', 'repair_request', { ...baseFacts, row: { item: 'desk' } }), [
    { filter: 'second', actions: [{ type: 'update', mapping: 'm1' }] },
  ]);
  assert.deepEqual(
    rules.evaluate('sf', 'public', 'repair_request', { ...baseFacts, op: 'delete' }).map((m) => m.filter),
    ['deletes'],
  );
  assert.ok(Object.isFrozen(rules));
  assert.ok(Object.isFrozen(rules.filtersFor('sf', 'public', 'repair_request', 'insert')));
});

test('a filter whose conditions fail to evaluate raises RuleEvaluationError naming it', () => {
  const rules = compileRules(
    configWith({
      filters: [
        {
          name: 'broken',
          on: { server: 'sf', schema: 'public', table: 't', ops: ['insert'], transitions: false },
          conditions: { all: [{ fact: 'op', operator: 'in', value: { fact: 'origin' } }] },
          actions: [],
          source,
        },
      ],
    }),
  );
  assert.throws(
    () => rules.evaluate('sf', 'public', 't', baseFacts),
    (err: unknown) => err instanceof RuleEvaluationError && err.filter === 'broken',
  );
});

test('formsOf lists every form a server takes part in, from mappings, filters and escalations', () => {
  const mapping = (name: string, from: [string, string], to: [string, string]) => ({
    name,
    from: { server: from[0], schema: 'public', table: from[1] },
    to: { server: to[0], schema: 'public', table: to[1] },
    transferMode: 'data+ownership' as const,
    whenToUpdate: 'immediately' as const,
    duplicateRequestId: 'error' as const,
    match: 'request-id' as const,
    fields: { byName: true, exclude: [], map: {}, set: {} },
    afterTransfer: 'keep' as const,
    conflict: 'source-wins' as const,
    pool: 'default',
    source,
  });
  const rules = compileRules(
    configWith({
      mappings: {
        a: mapping('a', ['sf', 'repair_request'], ['chicago', 'repair_request']),
        b: mapping('b', ['chicago', 'repair_request'], ['sf', 'archive']),
      },
      filters: [
        {
          name: 'f',
          on: { server: 'sf', schema: 'ops', table: 'tickets', ops: ['insert'], transitions: false },
          conditions: null,
          actions: [],
          source,
        },
      ],
      escalations: [
        {
          name: 'e',
          on: { server: 'tokyo', schema: 'public', table: 'support_case' },
          schedule: { cron: '0 17 * * 1-5', timezone: 'Asia/Tokyo' },
          conditions: null,
          actions: [],
          source,
        },
      ],
    }),
  );
  assert.deepEqual(rules.formsOf('sf'), [
    { schema: 'public', table: 'repair_request' },
    { schema: 'public', table: 'archive' },
    { schema: 'ops', table: 'tickets' },
  ]);
  assert.deepEqual(rules.formsOf('chicago'), [{ schema: 'public', table: 'repair_request' }]);
  assert.deepEqual(rules.formsOf('tokyo'), [{ schema: 'public', table: 'support_case' }]);
  assert.deepEqual(rules.formsOf('nowhere'), []);
  assert.deepEqual(
    rules.escalationsFor('tokyo').map((e) => e.name),
    ['e'],
  );
  assert.equal(rules.escalation('e')?.predicate(baseFacts), true);
});

test('the routing example routes chairs from sf to chicago and upholstery from chicago to chicago_uph', async () => {
  const configPath = fileURLToPath(new URL('../examples/routing/pgdso.config.json', import.meta.url));
  const config = await loadConfig(configPath, {
    SF_URL: 'postgres://pgdso:sf-secret@127.0.0.1:5432/ar',
    CHICAGO_URL: 'postgres://pgdso:chicago-secret@127.0.0.1:5433/ar',
    CHICAGO_UPH_URL: 'postgres://pgdso:uph-secret@127.0.0.1:5434/ar',
  });
  const rules = compileRules(config);
  const row = (item: string, upholstery: boolean) => ({
    id: 'R1',
    item,
    needs_upholstery: upholstery,
    status: 'new',
    site: 'sf',
    description: 'x',
    dso_master: true,
  });
  assert.deepEqual(rules.evaluate('sf', 'public', 'repair_request', { ...baseFacts, row: row('chair', false) }), [
    { filter: 'route-chairs', actions: [{ type: 'transfer', mapping: 'sf-to-chicago', overrideLoopDetection: false }] },
  ]);
  assert.deepEqual(rules.evaluate('sf', 'public', 'repair_request', { ...baseFacts, row: row('desk', true) }), []);
  assert.deepEqual(
    rules.evaluate('chicago', 'public', 'repair_request', { ...baseFacts, row: row('chair', true), origin: 'sf' }).map((m) => m.filter),
    ['route-upholstery'],
  );
  assert.deepEqual(rules.evaluate('chicago', 'public', 'repair_request', { ...baseFacts, row: row('chair', false) }), []);
  assert.deepEqual(rules.formsOf('chicago_uph'), [{ schema: 'public', table: 'repair_request' }]);
});
