// Generated conditions and facts, and json-rules-engine's own verdict: the reference the
// compiled rules are checked against (test/rules.test.ts, test/filter-index.test.ts); a config
// to compile rules from.
import { Engine } from 'json-rules-engine';
import type { PgdsoConfig } from '../../src/config/types.ts';
import type { Facts } from '../../src/rules/facts.ts';
import { compileConditions, SUPPORTED_OPERATORS } from '../../src/rules/compile.ts';

export type Outcome = boolean | 'throws';

/** json-rules-engine's verdict, with a fresh Engine per run (concurrent runs on one engine lose events). */
export async function engineVerdict(conditions: Record<string, unknown>, facts: Facts): Promise<Outcome> {
  const engine = new Engine([], { allowUndefinedFacts: false });
  engine.addRule({ conditions: structuredClone(conditions) as never, event: { type: 'fired' } });
  try {
    const { events } = await engine.run({ ...facts });
    return events.length > 0;
  } catch {
    return 'throws';
  }
}

export function compiledVerdict(conditions: Record<string, unknown>, facts: Facts): Outcome {
  const predicate = compileConditions(conditions);
  try {
    return predicate(facts);
  } catch {
    return 'throws';
  }
}

/** mulberry32: a small seeded PRNG, so a failure replays. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export const SCALARS: unknown[] = [
  0,
  1,
  5,
  -3,
  2.5,
  10,
  9,
  1e3,
  '5',
  '05',
  '5.0',
  ' 5',
  '5abc',
  '',
  'abc',
  'chair',
  '10',
  '9',
  '1e3',
  'Infinity',
  '-Infinity',
  '2024-01-02',
  'true',
  null,
  true,
  false,
];
export const COMPOUNDS: unknown[] = [[], ['a', 'b'], [1, 5], ['5', 'chair'], { k: 1, sub: { x: '5' } }, { k: '1' }, [null]];
export const ROW_KEYS = ['a', 'b', 'n', 'status', 'a b', 'x.y', 'tags', 'j', 'length', '.', '...', ' s ', '-', '0', 'a.'];
export const PATHS = [
  '$.a',
  '$.b',
  '$.n',
  '$.status',
  '$.missing',
  "$['a b']",
  "$['x.y']",
  '$.j',
  '$.j.k',
  '$.j.sub.x',
  "$['j'].sub['x']",
  '$.j.missing.deep',
  '$.tags',
  '$.a.length',
  '$.length',
  '$.status.x',
  "$['.']",
  "$['...']",
  "$[' s ']",
  "$['-']",
  "$['0']",
  "$['a.']",
  "$['0'].x",
  '$.tags.length',
];

export function pick<T>(random: () => number, values: readonly T[]): T {
  return values[Math.floor(random() * values.length)]!;
}

export function randomValue(random: () => number): unknown {
  return random() < 0.8 ? pick(random, SCALARS) : structuredClone(pick(random, COMPOUNDS));
}

export function randomRow(random: () => number): Record<string, unknown> {
  const row: Record<string, unknown> = {};
  for (const key of ROW_KEYS) {
    const r = random();
    if (r < 0.15) continue; // a missing column
    if (key === 'j') row[key] = r < 0.7 ? structuredClone(pick(random, COMPOUNDS)) : randomValue(random);
    else if (key === 'tags') row[key] = r < 0.7 ? [...pick(random, [[], ['a'], ['a', 'b'], [1, 5], ['5']])] : randomValue(random);
    else row[key] = randomValue(random);
  }
  return row;
}

export function randomFacts(random: () => number): Facts {
  const row = randomRow(random);
  return {
    row,
    old: random() < 0.4 ? null : randomRow(random),
    op: pick(random, ['insert', 'update', 'delete'] as const),
    changed: pick(random, [[], ['a'], ['status', 'a'], ['n']]),
    origin: pick(random, [null, 'sf', 'chicago']),
    master: random() < 0.5,
  };
}

export const FACTS = ['row', 'old', 'op', 'changed', 'origin', 'master'] as const;

export function randomFactReference(random: () => number): Record<string, unknown> {
  const fact = pick(random, FACTS);
  return fact === 'row' || fact === 'old'
    ? { fact, path: pick(random, PATHS) }
    : random() < 0.8
      ? { fact }
      : { fact, path: pick(random, PATHS) };
}

export function randomLeaf(random: () => number): Record<string, unknown> {
  const left = randomFactReference(random);
  const operator = pick(random, SUPPORTED_OPERATORS);
  let value: unknown;
  if (random() < 0.2) value = randomFactReference(random);
  else if (operator === 'in' || operator === 'notIn')
    value = Array.from({ length: Math.floor(random() * 12) }, () => pick(random, SCALARS));
  else value = randomValue(random);
  return { ...left, operator, value };
}

export function randomCondition(random: () => number, depth: number): Record<string, unknown> {
  const r = random();
  if (depth <= 0 || r < 0.45) return randomLeaf(random);
  if (r < 0.6) return { not: randomCondition(random, depth - 1) };
  const children = Array.from({ length: Math.floor(random() * 5) }, () => randomCondition(random, depth - 1));
  return r < 0.8 ? { all: children } : { any: children };
}

export function randomTopLevel(random: () => number): Record<string, unknown> {
  const r = random();
  if (r < 0.15) return { not: randomCondition(random, 3) };
  const children = Array.from({ length: Math.floor(random() * 5) }, () => randomCondition(random, 3));
  return r < 0.6 ? { all: children } : { any: children };
}

/** A loaded config with these parts and defaults for the rest (for compileRules). */
export function configWith(partial: Partial<PgdsoConfig>): PgdsoConfig {
  return {
    file: '/pgdso.config.json',
    servers: {},
    ruleFiles: [],
    mappings: {},
    filters: [],
    escalations: [],
    group: { checkIntervalSeconds: 2, delinquentThreshold: 3 },
    pending: { retry: { kind: 'backoff', firstMs: 1000, maxMs: 60_000 }, heartbeatMs: 10_000, retainedWalWarnBytes: 1024 ** 3 },
    http: { port: null },
    ...partial,
  };
}
