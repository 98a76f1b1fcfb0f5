// The filter index (src/rules/dispatch.ts): filters that require an equality are only tested on
// rows where it holds, and what fires, in what order, is what json-rules-engine decides for each.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { compileRules, type RuleEvaluationError } from '../src/rules/index.ts';
import { discriminatorOf, FilterDispatch } from '../src/rules/dispatch.ts';
import type { PgdsoConfig } from '../src/config/types.ts';
import { configWith, engineVerdict, pick, prng, randomCondition, randomFacts, randomTopLevel, SCALARS } from './support/conditions.ts';

const ON = { server: 'sf', schema: 'public', table: 'repair_request', ops: ['insert', 'update', 'delete'] as const, transitions: false };
// paths the generated rows have (and some they do not), so equalities hold on some rows
const PATHS = ['$.a', '$.b', '$.n', '$.status', '$.missing', '$.j.k'];

function config(filters: { name: string; conditions: Record<string, unknown> }[]): PgdsoConfig {
  return configWith({
    filters: filters.map((f) => ({
      ...f,
      on: { ...ON, ops: [...ON.ops] },
      actions: [{ type: 'transfer', mapping: 'm', overrideLoopDetection: false }],
      source: { file: '/rules.json', pointer: '' },
    })),
  });
}

/** An `all` that requires row (or old) at a path to equal a scalar, beside random conditions. */
function equalityFilter(random: () => number): Record<string, unknown> {
  const equality = { fact: random() < 0.8 ? 'row' : 'old', path: pick(random, PATHS), operator: 'equal', value: pick(random, SCALARS) };
  const others = Array.from({ length: Math.floor(random() * 3) }, () => randomCondition(random, 2));
  const children = [...others.slice(0, 1), equality, ...others.slice(1)];
  return random() < 0.2 ? { all: [{ all: children }] } : { all: children };
}

// Fails if: the index drops a filter whose equality holds, loses the definition order when it
// merges groups, or indexes a filter that can throw (its warning would be lost).
test('filters behind an equality fire exactly as json-rules-engine decides each of them, in definition order, on generated \
filters and rows', async () => {
  const random = prng(20261203);
  let indexed = 0;
  let firedIndexed = 0;
  let warned = 0;
  for (let round = 0; round < 12; round++) {
    const filters = Array.from({ length: 40 }, (_, i) => ({
      name: `f${round}-${i}`,
      conditions: random() < 0.7 ? equalityFilter(random) : randomTopLevel(random),
    }));
    const rules = compileRules(config(filters));
    const isIndexed = new Set(filters.filter((f) => discriminatorOf(f.conditions) !== null).map((f) => f.name));
    indexed += isIndexed.size;
    for (let j = 0; j < 40; j++) {
      const facts = randomFacts(random);
      const verdicts = await Promise.all(filters.map((f) => engineVerdict(f.conditions, facts)));
      const errors: RuleEvaluationError[] = [];
      const fired = rules.evaluate('sf', 'public', 'repair_request', facts, (err) => errors.push(err)).map((m) => m.filter);
      const expected = filters.filter((_, i) => verdicts[i] === true).map((f) => f.name);
      const where = `round ${round}, facts ${JSON.stringify(facts)}`;
      assert.deepEqual(fired, expected, where);
      // every filter json-rules-engine rejects on is warned about, unless the index skipped it
      const throwing = filters.filter((_, i) => verdicts[i] === 'throws').map((f) => f.name);
      const warnedAbout = errors.map((e) => e.filter);
      for (const name of warnedAbout) assert.ok(throwing.includes(name), `${name} warned, yet it does not throw: ${where}`);
      for (const name of throwing) if (!isIndexed.has(name)) assert.ok(warnedAbout.includes(name), `${name} not warned: ${where}`);
      firedIndexed += fired.filter((name) => isIndexed.has(name)).length;
      warned += errors.length;
    }
  }
  // the generator exercises the index: indexed filters, some firing, and warnings
  assert.ok(indexed > 200 && firedIndexed > 20 && warned > 20, JSON.stringify({ indexed, firedIndexed, warned }));
});

// Fails if: an equality under `any` or `not` is taken (the filter can fire without it), a
// filter that can throw or an object value is indexed, or an equality in a nested `all` is missed.
test('a filter is indexed by the first scalar equality its conditions require, and only when none can throw', () => {
  const eq = (path: string, value: unknown) => ({ fact: 'row', path, operator: 'equal', value });
  const inFact = { fact: 'row', path: '$.a', operator: 'in', value: { fact: 'old', path: '$.list' } };
  assert.deepEqual(discriminatorOf({ all: [{ fact: 'row', path: '$.n', operator: 'greaterThan', value: 3 }, eq('$.status', 'closed')] }), {
    fact: 'row',
    path: '$.status',
    value: 'closed',
  });
  assert.deepEqual(discriminatorOf({ all: [{ all: [eq('$.a', null)] }, eq('$.b', 1)] }), { fact: 'row', path: '$.a', value: null });
  assert.deepEqual(discriminatorOf({ all: [eq('$.a', false)] })?.value, false);
  assert.equal(discriminatorOf({ any: [eq('$.a', 'x')] }), null);
  assert.equal(discriminatorOf({ all: [{ any: [eq('$.a', 'x'), eq('$.a', 'y')] }] }), null);
  assert.equal(discriminatorOf({ all: [{ not: eq('$.a', 'x') }] }), null);
  assert.equal(discriminatorOf({ not: { all: [eq('$.a', 'x')] } }), null);
  assert.equal(discriminatorOf({ all: [eq('$.a', 'x'), { any: [inFact] }] }), null);
  assert.equal(discriminatorOf({ all: [eq('$.a', ['x'])] }), null);
  assert.equal(discriminatorOf({ all: [{ fact: 'row', path: '$.a', operator: 'equal', value: { fact: 'old', path: '$.a' } }] }), null);
  assert.equal(discriminatorOf(null), null);
  assert.equal(discriminatorOf({ all: [] }), null);
});

// Fails if: the index hands over filters whose equality does not hold (every filter is tested on
// every row again), or not in definition order.
test('a row meets only the filters whose equality holds on it, and those without one, in definition order', () => {
  const dispatch = new FilterDispatch(
    ['chairs', 'any', 'desks', 'closed', 'chairs-too', 'sf'],
    [
      { fact: 'row', path: '$.item', value: 'chair' },
      null,
      { fact: 'row', path: '$.item', value: 'desk' },
      { fact: 'row', path: '$.status', value: 'closed' },
      { fact: 'row', path: '$.item', value: 'chair' },
      { fact: 'origin', path: undefined, value: 'sf' },
    ],
  );
  const candidates = (row: Record<string, unknown>, origin: string | null = null): string[] => {
    const seen: string[] = [];
    dispatch.forCandidates({ row, old: null, op: 'insert', changed: [], origin, master: true }, (f) => seen.push(f));
    return seen;
  };
  assert.deepEqual(candidates({ item: 'chair', status: 'closed' }), ['chairs', 'any', 'closed', 'chairs-too']);
  assert.deepEqual(candidates({ item: 'desk' }, 'sf'), ['any', 'desks', 'sf']);
  assert.deepEqual(candidates({ item: 'lamp', status: 'open' }), ['any']);
  assert.deepEqual(candidates({ item: ['chair'] }), ['any']);
});
