// Compiles json-rules-engine conditions into plain synchronous predicates over Facts.
//
// Supported subset (the one schema/rules.schema.json accepts):
// - boolean nodes { "all": [...] }, { "any": [...] }, { "not": {...} }, nested at will; the top
//   level must be a boolean node (json-rules-engine requires it); null/absent = always true;
// - leaves { "fact", "operator", "value", "path"? } with fact one of FACT_NAMES, operator one of
//   SUPPORTED_OPERATORS, path in the forms `$.col`, `$.col.sub`, `$['col']` (mixable), and value a
//   constant or a fact reference { "fact", "path"? }.
//
// Anything outside it (condition references { "condition": name }, custom or decorated
// operators such as "not:equal", "priority", fact "params", other JSONPath syntax) is REJECTED
// at load as a ConfigProblem: checkConditions() reports it and compileConditions() refuses it.
// We chose rejection over falling back to json-rules-engine because the per-row path is
// synchronous, and a fallback would need an async, serialized (or per-call) Engine.run().
//
// Semantics reproduced exactly from json-rules-engine 7.3.1 (verified by test/rules.test.ts):
// - equal/notEqual are strict (===): the number 5 does not equal the string "5";
// - in/notIn call value.indexOf(factValue): strict membership for arrays (a constant value must
//   be an array; a fact reference resolving to a string does substring search, and to null, a
//   number or an object throws, as it makes Engine.run() reject);
// - contains/doesNotContain are false unless the fact value is an array;
// - lessThan & co. are false unless Number.parseFloat(factValue) is not NaN, then compare with
//   JavaScript's < / <= / > / >= (so a numeric string against a number compares numerically, two
//   strings compare as text);
// - a path that does not resolve gives undefined; a path on a fact that is not an object (null
//   `old`, the `op` string, ...) gives the fact value itself;
// - every child of an all/any is evaluated (no short-circuit), as json-rules-engine evaluates
//   them all with Promise.all, so an evaluation that would throw there throws here too;
//   `all: []` and `any: []` are true.

import { FACT_NAMES, type FactName, type Facts } from './facts.ts';
import type { Conditions } from '../config/types.ts';

export type Predicate = (facts: Facts) => boolean;

export const SUPPORTED_OPERATORS = [
  'equal',
  'notEqual',
  'in',
  'notIn',
  'contains',
  'doesNotContain',
  'lessThan',
  'lessThanInclusive',
  'greaterThan',
  'greaterThanInclusive',
] as const;
export type SupportedOperator = (typeof SUPPORTED_OPERATORS)[number];

/** One reason a conditions value cannot be compiled; pointer relative to the conditions value. */
export interface ConditionProblem {
  pointer: string;
  message: string;
}

/** Thrown by compileConditions() for conditions outside the supported subset. */
export class UnsupportedConditionError extends Error {
  readonly problems: readonly ConditionProblem[];
  constructor(problems: readonly ConditionProblem[]) {
    super(`unsupported conditions: ${problems.map((p) => `${p.pointer || '/'}: ${p.message}`).join('; ')}`);
    this.name = 'UnsupportedConditionError';
    this.problems = problems;
  }
}

/** Thrown when evaluating a filter's conditions fails where json-rules-engine's run() would reject. */
export class RuleEvaluationError extends Error {
  readonly filter: string;
  constructor(filter: string, cause: unknown) {
    super(`conditions of "${filter}" could not be evaluated: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
    this.name = 'RuleEvaluationError';
    this.filter = filter;
  }
}

const BOOLEAN_KEYS = ['all', 'any', 'not'] as const;
const LEAF_KEYS = ['fact', 'operator', 'value', 'path'] as const;
const FACT_REFERENCE_KEYS = ['fact', 'path'] as const;

/** Words for json-rules-engine features pgdso does not support. */
const UNSUPPORTED_FEATURES: Readonly<Record<string, string>> = {
  condition: 'condition references ({"condition": name}) are not supported; write the condition inline',
  priority: '"priority" is not supported: pgdso compiles conditions and evaluates all of them',
  params: 'fact "params" are not supported',
  name: '"name" is not supported on conditions',
};

/** A path segment allowed inside $['...']: characters JSONPath treats literally. */
const BRACKET_SEGMENT = /^\['([A-Za-z0-9_ .-]+)'\]/;
const DOT_SEGMENT = /^\.([A-Za-z_][A-Za-z0-9_]*)/;

/** The property names of a supported path (`$.a.b`, `$['a b']`), or null when unsupported. */
export function parsePath(path: string): string[] | null {
  if (!path.startsWith('$')) return null;
  const segments: string[] = [];
  let rest = path.slice(1);
  while (rest.length > 0) {
    const match = DOT_SEGMENT.exec(rest) ?? BRACKET_SEGMENT.exec(rest);
    // ".." alone is JSONPath's descendant operator even inside brackets
    if (!match || match[1] === '..') return null;
    segments.push(match[1]!);
    rest = rest.slice(match[0].length);
  }
  return segments.length > 0 ? segments : null;
}

const PATH_HELP = `paths take the forms $.column, $.column.key or $['column name']`;

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function escapePointerToken(token: string): string {
  return token.replaceAll('~', '~0').replaceAll('/', '~1');
}

function list(values: readonly string[]): string {
  return values.map((v) => `"${v}"`).join(', ');
}

/** Every reason `conditions` (as read from a rule file) is outside the supported subset. */
export function checkConditions(conditions: unknown): ConditionProblem[] {
  const problems: ConditionProblem[] = [];
  if (conditions === null || conditions === undefined) return problems;
  if (!isPlainObject(conditions) || !BOOLEAN_KEYS.some((k) => Object.hasOwn(conditions, k))) {
    problems.push({ pointer: '', message: 'the top level of conditions must be an object with "all", "any" or "not"' });
    return problems;
  }
  checkNode(conditions, '', problems);
  return problems;
}

function checkNode(node: unknown, pointer: string, problems: ConditionProblem[]): void {
  if (!isPlainObject(node)) {
    problems.push({
      pointer,
      message: 'a condition must be an object: {"all": [...]}, {"any": [...]}, {"not": {...}} or {"fact", "operator", "value"}',
    });
    return;
  }
  const booleanKeys = BOOLEAN_KEYS.filter((k) => Object.hasOwn(node, k));
  if (booleanKeys.length > 1) {
    problems.push({ pointer, message: `a condition takes one of "all", "any", "not", not ${list(booleanKeys)} together` });
    return;
  }
  const booleanKey = booleanKeys[0];
  if (booleanKey !== undefined) {
    reportUnknownKeys(node, [booleanKey], pointer, problems);
    const children = node[booleanKey];
    const childPointer = `${pointer}/${booleanKey}`;
    if (booleanKey === 'not') {
      if (Array.isArray(children)) problems.push({ pointer: childPointer, message: '"not" takes a single condition, not an array' });
      else checkNode(children, childPointer, problems);
    } else if (!Array.isArray(children)) {
      problems.push({ pointer: childPointer, message: `"${booleanKey}" must be an array of conditions` });
    } else {
      children.forEach((child, i) => checkNode(child, `${childPointer}/${i}`, problems));
    }
    return;
  }
  if (Object.hasOwn(node, 'condition')) {
    problems.push({ pointer: `${pointer}/condition`, message: UNSUPPORTED_FEATURES.condition! });
    return;
  }
  reportUnknownKeys(node, LEAF_KEYS, pointer, problems);
  for (const required of ['fact', 'operator', 'value'] as const) {
    if (!Object.hasOwn(node, required)) problems.push({ pointer, message: `missing required property "${required}"` });
  }
  checkFactName(node.fact, `${pointer}/fact`, problems);
  if (Object.hasOwn(node, 'operator') && !(SUPPORTED_OPERATORS as readonly unknown[]).includes(node.operator)) {
    problems.push({
      pointer: `${pointer}/operator`,
      message: `unsupported operator ${JSON.stringify(node.operator)}: must be one of ${list(SUPPORTED_OPERATORS)}`,
    });
  }
  if (Object.hasOwn(node, 'path')) checkPath(node.path, `${pointer}/path`, problems);
  if (!Object.hasOwn(node, 'value')) return;
  const value = node.value;
  if (isFactReference(value)) {
    reportUnknownKeys(value, FACT_REFERENCE_KEYS, `${pointer}/value`, problems);
    checkFactName(value.fact, `${pointer}/value/fact`, problems);
    if (Object.hasOwn(value, 'path')) checkPath(value.path, `${pointer}/value/path`, problems);
  } else if ((node.operator === 'in' || node.operator === 'notIn') && !Array.isArray(value)) {
    problems.push({ pointer: `${pointer}/value`, message: `the value of "${node.operator}" must be an array (or a fact reference)` });
  }
}

function reportUnknownKeys(node: Record<string, unknown>, allowed: readonly string[], pointer: string, problems: ConditionProblem[]): void {
  for (const key of Object.keys(node)) {
    if (allowed.includes(key)) continue;
    const feature = UNSUPPORTED_FEATURES[key];
    problems.push({
      pointer: `${pointer}/${escapePointerToken(key)}`,
      message: feature ?? `unknown property "${key}" (expected ${list(allowed)})`,
    });
  }
}

function checkFactName(fact: unknown, pointer: string, problems: ConditionProblem[]): void {
  if (fact === undefined) return; // reported as missing by the caller
  if (!(FACT_NAMES as readonly unknown[]).includes(fact)) {
    problems.push({ pointer, message: `unknown fact ${JSON.stringify(fact)}: must be one of ${list(FACT_NAMES)}` });
  }
}

function checkPath(path: unknown, pointer: string, problems: ConditionProblem[]): void {
  if (typeof path !== 'string' || parsePath(path) === null) {
    problems.push({ pointer, message: `unsupported path ${JSON.stringify(path)}: ${PATH_HELP}` });
  }
}

/** json-rules-engine treats any object value with an own "fact" property as a fact reference. */
export function isFactReference(value: unknown): value is Record<string, unknown> & { fact: unknown } {
  return typeof value === 'object' && value !== null && Object.hasOwn(value, 'fact');
}

// ---------------------------------------------------------------------------------------------
// Compilation

export type ValueGetter = (facts: Facts) => unknown;
type Comparison = (factValue: unknown, value: unknown) => boolean;

/** json-rules-engine's numberValidator, verbatim in effect. */
function parsesAsNumber(factValue: unknown): boolean {
  // for a number, parseFloat(String(n)) is NaN only when n is (the fast path of the same test)
  if (typeof factValue === 'number') return !Number.isNaN(factValue);
  return Number.parseFloat(factValue as string).toString() !== 'NaN';
}

// `any` below is deliberate: these reproduce JavaScript operators on arbitrary values exactly as
// json-rules-engine applies them (including the TypeError of indexOf on null).
const COMPARISONS: Readonly<Record<SupportedOperator, Comparison>> = {
  equal: (a, b) => a === b,
  notEqual: (a, b) => a !== b,
  in: (a, b) => (b as any).indexOf(a) > -1,
  notIn: (a, b) => (b as any).indexOf(a) === -1,
  contains: (a, b) => Array.isArray(a) && a.indexOf(b) > -1,
  doesNotContain: (a, b) => Array.isArray(a) && a.indexOf(b) === -1,
  lessThan: (a, b) => parsesAsNumber(a) && (a as any) < (b as any),
  lessThanInclusive: (a, b) => parsesAsNumber(a) && (a as any) <= (b as any),
  greaterThan: (a, b) => parsesAsNumber(a) && (a as any) > (b as any),
  greaterThanInclusive: (a, b) => parsesAsNumber(a) && (a as any) >= (b as any),
};

/** Reads a fact, then follows the path as JSONPath does for plain property access. */
export function factGetter(fact: FactName, path: string | undefined): ValueGetter {
  const segments = path === undefined ? [] : parsePath(path);
  if (segments === null) throw new UnsupportedConditionError([{ pointer: '', message: `unsupported path ${JSON.stringify(path)}` }]);
  if (segments.length === 0) return (facts) => facts[fact];
  if (segments.length === 1) {
    const [segment] = segments as [string];
    return (facts) => {
      const root: unknown = facts[fact];
      if (root === null || typeof root !== 'object') return root;
      return Object.hasOwn(root, segment) ? (root as Record<string, unknown>)[segment] : undefined;
    };
  }
  return (facts) => {
    const root: unknown = facts[fact];
    if (root === null || typeof root !== 'object') return root;
    let current: unknown = root;
    for (const segment of segments) {
      if (current && Object.hasOwn(current as object, segment)) current = (current as Record<string, unknown>)[segment];
      else return undefined;
    }
    return current;
  };
}

/** Membership in a constant array with indexOf's strict semantics, through a Set when it pays. */
function constantMembership(values: readonly unknown[]): (candidate: unknown) => boolean {
  if (values.length <= 8) return (candidate) => values.indexOf(candidate) > -1;
  const set = new Set(values);
  // a Set finds NaN, indexOf does not
  return (candidate) => !Number.isNaN(candidate) && set.has(candidate);
}

function compileLeaf(node: Record<string, unknown>): Predicate {
  const left = factGetter(node.fact as FactName, node.path as string | undefined);
  const operator = node.operator as SupportedOperator;
  const value = node.value;
  if (isFactReference(value)) {
    const right = factGetter(value.fact as FactName, value.path as string | undefined);
    const compare = COMPARISONS[operator];
    return (facts) => compare(left(facts), right(facts));
  }
  if ((operator === 'in' || operator === 'notIn') && Array.isArray(value)) {
    const isMember = constantMembership(value);
    return operator === 'in' ? (facts) => isMember(left(facts)) : (facts) => !isMember(left(facts));
  }
  if (operator === 'equal') return (facts) => left(facts) === value;
  if (operator === 'notEqual') return (facts) => left(facts) !== value;
  const compare = COMPARISONS[operator];
  return (facts) => compare(left(facts), value);
}

function compileNode(node: Record<string, unknown>): Predicate {
  if (Object.hasOwn(node, 'not')) {
    const child = compileNode(node.not as Record<string, unknown>);
    return (facts) => !child(facts);
  }
  const kind = Object.hasOwn(node, 'all') ? 'all' : Object.hasOwn(node, 'any') ? 'any' : null;
  if (kind === null) return compileLeaf(node);
  const children = (node[kind] as Record<string, unknown>[]).map(compileNode);
  if (children.length === 0) return () => true;
  if (children.length === 1) return children[0]!;
  if (kind === 'all') {
    return (facts) => {
      let result = true;
      for (const child of children) if (!child(facts)) result = false;
      return result;
    };
  }
  return (facts) => {
    let result = false;
    for (const child of children) if (child(facts)) result = true;
    return result;
  };
}

/**
 * Compiles conditions (null = always true) into a predicate with json-rules-engine's semantics.
 * Throws UnsupportedConditionError for anything outside the supported subset.
 */
export function compileConditions(conditions: Conditions | null | undefined): Predicate {
  const problems = checkConditions(conditions);
  if (problems.length > 0) throw new UnsupportedConditionError(problems);
  if (conditions === null || conditions === undefined) return () => true;
  return compileNode(conditions);
}

/** Calls `leaf` with the fact and path of every condition, and of every fact a value refers to. */
function visitLeaves(conditions: Conditions | null | undefined, leaf: (fact: unknown, path: unknown) => void): void {
  const visit = (node: unknown): void => {
    if (!node || typeof node !== 'object') return;
    const n = node as Record<string, unknown>;
    for (const kind of BOOLEAN_KEYS) {
      if (!Object.hasOwn(n, kind)) continue;
      const child = n[kind];
      if (Array.isArray(child)) child.forEach(visit);
      else visit(child);
      return;
    }
    leaf(n.fact, n.path);
    if (isFactReference(n.value)) leaf(n.value.fact, n.value.path);
  };
  visit(conditions);
}

/**
 * The columns of the `row` and `old` facts that conditions read, or null when a condition reads a
 * whole row (a fact without a path). Lets the engine convert only those columns per change.
 */
export function columnsRead(conditions: Conditions | null | undefined): Set<string> | null {
  const columns = new Set<string>();
  let whole = false;
  visitLeaves(conditions, (fact, path) => {
    if (fact !== 'row' && fact !== 'old') return;
    const segments = typeof path === 'string' ? parsePath(path) : null;
    if (!segments || segments.length === 0) whole = true;
    else columns.add(segments[0]!);
  });
  return whole ? null : columns;
}

/** The facts (row, old, origin, ...) that conditions read. */
export function factsRead(conditions: Conditions | null | undefined): Set<string> {
  const facts = new Set<string>();
  visitLeaves(conditions, (fact) => {
    if (typeof fact === 'string') facts.add(fact);
  });
  return facts;
}
