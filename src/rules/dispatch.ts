// The filters on one form and op, indexed by an equality they require, so a changed row is only
// tested against the filters that can fire on it (a rule engine's alpha network, in small).
//
// A filter whose conditions are an `all` holding a leaf `{fact, path, operator: "equal", value}`
// with a constant scalar value (directly, or inside nested `all`s) can only fire on a row where
// that fact is === the value. Such filters are grouped by fact and path: per row, each group's
// fact is read once and a Map lookup gives the filters whose value it is (a Map's key equality
// is ===, but for NaN, which JSON cannot write as a constant). The filters found, and those
// without such an equality, are then evaluated in full, in definition order, so what fires and
// in what order is exactly what testing every filter gives.
//
// A filter skipped this way would not have fired; the one difference is that its other
// conditions are not evaluated, so an evaluation that would have thrown (and been logged as a
// warning, the filter not firing) does not run. Filters that can throw on ordinary rows (`in` or
// `notIn` against a fact reference, which throws on null) are never indexed, so their warnings
// stay; what is left is a numeric comparison against a JSON value whose own "toString" and
// "valueOf" are not functions.

import type { Conditions } from '../config/types.ts';
import { factGetter, isFactReference, type ValueGetter } from './compile.ts';
import type { FactName, Facts } from './facts.ts';

/** The equality a filter's conditions require: `fact` at `path` === `value`. */
export interface Discriminator {
  readonly fact: FactName;
  readonly path: string | undefined;
  readonly value: string | number | boolean | null;
}

/**
 * The equality `conditions` require, or null when they require none that can be indexed (or may
 * throw on an ordinary row). The first such leaf in definition order is the one taken.
 */
export function discriminatorOf(conditions: Conditions | null | undefined): Discriminator | null {
  if (!conditions || !Object.hasOwn(conditions, 'all') || mayThrow(conditions)) return null;
  return requiredEquality(conditions);
}

function requiredEquality(node: Record<string, unknown>): Discriminator | null {
  if (Object.hasOwn(node, 'all')) {
    for (const child of node.all as Record<string, unknown>[]) {
      const found = requiredEquality(child);
      if (found) return found;
    }
    return null;
  }
  if (Object.hasOwn(node, 'any') || Object.hasOwn(node, 'not') || node.operator !== 'equal') return null;
  const value = node.value;
  const scalar = value === null || typeof value === 'string' || typeof value === 'number' || typeof value === 'boolean';
  return scalar ? { fact: node.fact as FactName, path: node.path as string | undefined, value } : null;
}

/** Whether a leaf can throw on an ordinary row: `in`/`notIn` against a fact reference. */
function mayThrow(node: Record<string, unknown>): boolean {
  for (const kind of ['all', 'any'] as const) {
    if (Object.hasOwn(node, kind)) return (node[kind] as Record<string, unknown>[]).some(mayThrow);
  }
  if (Object.hasOwn(node, 'not')) return mayThrow(node.not as Record<string, unknown>);
  // (a constant value of in/notIn is an array: anything else is refused at load)
  return (node.operator === 'in' || node.operator === 'notIn') && isFactReference(node.value);
}

interface Group {
  readonly read: ValueGetter;
  /** value -> positions of the filters requiring it, ascending */
  readonly byValue: Map<unknown, number[]>;
}

/** The filters of one form and op, in definition order, with their index. */
export class FilterDispatch<F> {
  /** positions of the filters without an indexed equality, ascending */
  private readonly always: number[] = [];
  private readonly groups: Group[] = [];

  constructor(
    readonly filters: readonly F[],
    discriminators: readonly (Discriminator | null)[],
  ) {
    const byFactPath = new Map<string, Group>();
    discriminators.forEach((d, position) => {
      if (d === null) {
        this.always.push(position);
        return;
      }
      const key = `${d.fact}\u0000${d.path ?? ''}`;
      let group = byFactPath.get(key);
      if (!group) {
        group = { read: factGetter(d.fact, d.path), byValue: new Map() };
        byFactPath.set(key, group);
        this.groups.push(group);
      }
      const positions = group.byValue.get(d.value) ?? [];
      positions.push(position);
      group.byValue.set(d.value, positions);
    });
  }

  /** Calls `each` for every filter that can fire on these facts, in definition order. */
  forCandidates(facts: Facts, each: (filter: F) => void): void {
    if (this.groups.length === 0) {
      for (const filter of this.filters) each(filter);
      return;
    }
    let positions = this.always;
    for (const group of this.groups) {
      const hit = group.byValue.get(group.read(facts));
      if (hit) positions = positions.length === 0 ? hit : merge(positions, hit);
    }
    for (const position of positions) each(this.filters[position]!);
  }
}

/** Two ascending lists of positions as one (they share none). */
function merge(a: readonly number[], b: readonly number[]): number[] {
  const out: number[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) out.push(a[i]! < b[j]! ? a[i++]! : b[j++]!);
  while (i < a.length) out.push(a[i++]!);
  while (j < b.length) out.push(b[j++]!);
  return out;
}
