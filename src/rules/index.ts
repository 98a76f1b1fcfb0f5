// The rules, compiled once at load into a frozen structure indexed by server, form and op, so a
// changed row only meets the filters that can fire on it.

import {
  ConfigError,
  type ActionConfig,
  type Conditions,
  type ConfigProblem,
  type EscalationSchedule,
  type Op,
  type PgdsoConfig,
} from '../config/types.ts';
import { columnsRead, compileConditions, factsRead, RuleEvaluationError, UnsupportedConditionError, type Predicate } from './compile.ts';
import { discriminatorOf, FilterDispatch, type Discriminator } from './dispatch.ts';
import type { Facts } from './facts.ts';

export { RuleEvaluationError } from './compile.ts';
export type { Predicate } from './compile.ts';

export interface CompiledFilter {
  readonly name: string;
  /** true when the filter fires; throws RuleEvaluationError where json-rules-engine's run() would reject */
  readonly predicate: Predicate;
  readonly actions: readonly ActionConfig[];
  /** the ops the filter names */
  readonly ops: readonly Op[];
  /** see updates as PostgreSQL's row filters do (entering: insert, leaving: delete) */
  readonly transitions: boolean;
}

export interface CompiledEscalation {
  readonly name: string;
  readonly on: { readonly server: string; readonly schema: string; readonly table: string };
  readonly schedule: EscalationSchedule;
  /** true when the escalation's actions apply to a request (facts built from the current row) */
  readonly predicate: Predicate;
  /** the columns its conditions read (with dso_master), or null for whole rows: build facts with only these */
  readonly columns: ReadonlySet<string> | null;
  /** its conditions read `origin`: the scan looks up which engine last wrote each request */
  readonly readsOrigin: boolean;
  readonly actions: readonly ActionConfig[];
}

/** A filter that fired, with its actions. */
export interface FilterMatch {
  filter: string;
  actions: readonly ActionConfig[];
}

export interface FormKey {
  readonly schema: string;
  readonly table: string;
}

export interface CompiledRules {
  /** The filters on that form for that op, in definition order (a precomputed lookup). */
  filtersFor(server: string, schema: string, table: string, op: Op): readonly CompiledFilter[];
  /**
   * The columns the filters on that form for that op read from `row`/`old` (plus dso_master),
   * or null when one reads whole rows: build facts with only these.
   */
  columnsFor(server: string, schema: string, table: string, op: Op): ReadonlySet<string> | null;
  /** The filters that fire on these facts (facts.op selects the op), in definition order. */
  evaluate(server: string, schema: string, table: string, facts: Facts, onError?: (err: RuleEvaluationError) => void): FilterMatch[];
  /** Every form of that server named by a mapping's from/to, a filter or an escalation. */
  formsOf(server: string): readonly FormKey[];
  /** The escalations on that server, in definition order. */
  escalationsFor(server: string): readonly CompiledEscalation[];
  escalation(name: string): CompiledEscalation | undefined;
}

const NO_FILTERS: readonly CompiledFilter[] = Object.freeze([]);
const NO_FORMS: readonly FormKey[] = Object.freeze([]);
const NO_ESCALATIONS: readonly CompiledEscalation[] = Object.freeze([]);

function filterKey(server: string, schema: string, table: string, op: Op): string {
  return `${server}\u0000${schema}\u0000${table}\u0000${op}`;
}

/** Wraps a predicate so that an evaluation failure names the filter or escalation. */
function named(name: string, predicate: Predicate): Predicate {
  return (facts) => {
    try {
      return predicate(facts);
    } catch (err) {
      throw new RuleEvaluationError(name, err);
    }
  };
}

/**
 * Compiles the filters and escalations of a loaded config. Throws ConfigError for conditions
 * outside the supported subset (loadConfig has already reported those, so this only happens
 * for a config built by hand).
 */
export function compileRules(config: PgdsoConfig): CompiledRules {
  const problems: ConfigProblem[] = [];
  const compile = (
    name: string,
    conditions: PgdsoConfig['filters'][number]['conditions'],
    source: { file: string; pointer: string },
  ): Predicate => {
    try {
      return named(name, compileConditions(conditions));
    } catch (err) {
      if (!(err instanceof UnsupportedConditionError)) throw err;
      for (const p of err.problems)
        problems.push({ file: source.file, pointer: `${source.pointer}/conditions${p.pointer}`, message: p.message });
      return () => false;
    }
  };

  const filtersByKey = new Map<string, { filters: CompiledFilter[]; discriminators: (Discriminator | null)[] }>();
  const columnsByKey = new Map<string, Set<string> | null>();
  for (const filter of config.filters) {
    const read = columnsRead(filter.conditions);
    // with transitions, every op the filter names can come from an update
    const indexedOps = new Set<Op>(filter.on.transitions ? [...filter.on.ops, 'update'] : filter.on.ops);
    for (const op of indexedOps) {
      const key = filterKey(filter.on.server, filter.on.schema, filter.on.table, op);
      const known = columnsByKey.has(key) ? columnsByKey.get(key)! : new Set<string>(['dso_master']);
      columnsByKey.set(key, known === null || read === null ? null : new Set([...known, ...read]));
    }
    const compiled: CompiledFilter = Object.freeze({
      name: filter.name,
      predicate: compile(filter.name, filter.conditions, filter.source),
      actions: filter.actions,
      ops: filter.on.ops,
      transitions: filter.on.transitions,
    });
    // a filter with transitions is also tested on the old row: not indexed by the new one
    const discriminator = filter.on.transitions ? null : discriminatorOf(filter.conditions);
    for (const op of indexedOps) {
      const key = filterKey(filter.on.server, filter.on.schema, filter.on.table, op);
      const list = filtersByKey.get(key) ?? { filters: [], discriminators: [] };
      list.filters.push(compiled);
      list.discriminators.push(discriminator);
      filtersByKey.set(key, list);
    }
  }

  const escalationsByServer = new Map<string, CompiledEscalation[]>();
  const escalationsByName = new Map<string, CompiledEscalation>();
  for (const escalation of config.escalations) {
    const compiled: CompiledEscalation = Object.freeze({
      name: escalation.name,
      on: escalation.on,
      schedule: escalation.schedule,
      predicate: compile(escalation.name, escalation.conditions, escalation.source),
      ...scanReads(escalation.conditions),
      actions: escalation.actions,
    });
    const list = escalationsByServer.get(escalation.on.server) ?? [];
    list.push(compiled);
    escalationsByServer.set(escalation.on.server, list);
    escalationsByName.set(escalation.name, compiled);
  }
  if (problems.length > 0) throw new ConfigError(problems);

  const formsByServer = collectForms(config);
  const dispatches = new Map(
    [...filtersByKey].map(([key, list]) => [key, new FilterDispatch(Object.freeze(list.filters), list.discriminators)] as const),
  );
  const frozenEscalations = new Map([...escalationsByServer].map(([server, list]) => [server, Object.freeze(list)] as const));

  const filtersFor = (server: string, schema: string, table: string, op: Op): readonly CompiledFilter[] =>
    dispatches.get(filterKey(server, schema, table, op))?.filters ?? NO_FILTERS;

  return Object.freeze({
    filtersFor,
    columnsFor: (server: string, schema: string, table: string, op: Op): ReadonlySet<string> | null =>
      columnsByKey.get(filterKey(server, schema, table, op)) ?? null,
    evaluate(server: string, schema: string, table: string, facts: Facts, onError?: (err: RuleEvaluationError) => void): FilterMatch[] {
      const matches: FilterMatch[] = [];
      // only the filters that can fire on these facts (see dispatch.ts), in definition order
      dispatches.get(filterKey(server, schema, table, facts.op))?.forCandidates(facts, (filter) => {
        try {
          if (fires(filter, facts)) matches.push({ filter: filter.name, actions: filter.actions });
        } catch (err) {
          // json-rules-engine rejects on this row (e.g. `in` against null): this filter does not
          // fire; the others are still evaluated.
          if (!onError || !(err instanceof RuleEvaluationError)) throw err;
          onError(err);
        }
      });
      return matches;
    },
    formsOf: (server: string): readonly FormKey[] => formsByServer.get(server) ?? NO_FORMS,
    escalationsFor: (server: string): readonly CompiledEscalation[] => frozenEscalations.get(server) ?? NO_ESCALATIONS,
    escalation: (name: string): CompiledEscalation | undefined => escalationsByName.get(name),
  });
}

/**
 * Whether a filter fires on these facts. With transitions, an update is seen as PostgreSQL's row
 * filters see it: the conditions are evaluated on the old row and on the new one; entering
 * them is an insert, leaving them a delete, staying in them an update.
 */
function fires(filter: CompiledFilter, facts: Facts): boolean {
  if (!filter.transitions || facts.op !== 'update') return filter.predicate(facts);
  const now = filter.predicate(facts);
  const before = facts.old !== null && filter.predicate({ ...facts, row: facts.old, old: null });
  const seenAs: Op | null = now ? (before ? 'update' : 'insert') : before ? 'delete' : null;
  return seenAs !== null && filter.ops.includes(seenAs);
}

/** The columns conditions read, with dso_master (the `master` fact), or null for whole rows. */
export function withMaster(columns: ReadonlySet<string> | null): ReadonlySet<string> | null {
  return columns === null ? null : new Set([...columns, 'dso_master']);
}

/**
 * What a form scan reads for conditions (an escalation's, `pgdso sync --where`): the columns to
 * convert per request, with dso_master (null: whole rows), and whether `origin` is looked up.
 */
export function scanReads(conditions: Conditions | null | undefined): { columns: ReadonlySet<string> | null; readsOrigin: boolean } {
  return { columns: withMaster(columnsRead(conditions)), readsOrigin: factsRead(conditions).has('origin') };
}

/** Forms per server, each once, in order of first mention (mappings, then filters, then escalations). */
function collectForms(config: PgdsoConfig): Map<string, readonly FormKey[]> {
  const seen = new Set<string>();
  const forms = new Map<string, FormKey[]>();
  const add = (server: string, schema: string, table: string): void => {
    const key = `${server}\u0000${schema}\u0000${table}`;
    if (seen.has(key)) return;
    seen.add(key);
    const list = forms.get(server) ?? [];
    list.push(Object.freeze({ schema, table }));
    forms.set(server, list);
  };
  for (const mapping of Object.values(config.mappings)) {
    add(mapping.from.server, mapping.from.schema, mapping.from.table);
    add(mapping.to.server, mapping.to.schema, mapping.to.table);
  }
  for (const filter of config.filters) add(filter.on.server, filter.on.schema, filter.on.table);
  for (const escalation of config.escalations) add(escalation.on.server, escalation.on.schema, escalation.on.table);
  return new Map([...forms].map(([server, list]) => [server, Object.freeze(list)] as const));
}
