// Operations on a copy that already exists on a neighbour server, set-based: an update (DSO's
// update operation, the chain kept in step, a return of ownership) and a delete. A link runs
// forward along its mapping (to the mapping's target) or backward (to its source: the
// mapping's fields reversed, constants not carried back). The copy is found by its request ID
// and the root of its mapping history, so a different request with the same ID is never
// touched. An update that would change nothing writes nothing: no WAL, nothing relayed, no
// ping-pong between two servers.
import type pg from 'pg';
import type { MappingConfig } from '../config/types.ts';
import type { FormInfo } from '../sql/form-catalog.ts';
import { qualified, quoteIdent } from '../sql/identifiers.ts';
import { classifyError } from './errors.ts';
import type { ColumnPlan } from './plan.ts';
import type { FormCatalog } from './catalog.ts';
import {
  RequestGroup,
  applyIsolating,
  boolArrayLiteral,
  parseJsonOr,
  sameRequestSql,
  textArrayLiteral,
  type ApplyFailure,
} from './sets.ts';

/** A mapping used in one direction, with the columns it carries that way. */
export interface Link {
  mapping: MappingConfig;
  forward: boolean;
  /** the neighbour server */
  server: string;
  /** the columns carried, into the neighbour's form */
  plan: ColumnPlan;
}

/** The mapping's plan reversed: each carried column goes back to the source column it came from. */
export function reversePlan(forward: ColumnPlan, source: FormCatalog): ColumnPlan {
  const columns = forward.columns.flatMap((c) => {
    if (c.from.kind !== 'column') return [];
    const back = source.columns.get(c.from.column);
    if (!back || back.generated) return [];
    return [{ target: back.name, type: back.type, castType: back.castType, from: { kind: 'column' as const, column: c.target } }];
  });
  return { mapping: forward.mapping, target: source, columns, notCarried: [] };
}

export interface CopyUpdate {
  requestId: string;
  /** the request ID of the neighbour's copy */
  targetKey: string;
  /** the sending copy's dso_mapping_history (JSON text): its root identifies the request */
  history: string;
  /** aligned with plan.columns; empty when the group carries no values */
  values: (string | null)[];
  /** where the master copy is now, when that changes */
  current: readonly [string, string] | null;
  /** the copy's new ownership flag, when it changes (a return) */
  master: boolean | null;
  /** the copy's new mapping history, when it changes (a return) */
  newHistory: string | null;
  lsn: bigint;
  /** positions of the request's earlier changes this row replaced in its group */
  coalesced?: bigint[];
}

/**
 * What the update is: `chain` (keeping the chain in step: a missing copy is not an error),
 * `update` (the update action) or `return` (both: a missing copy is a failure).
 */
export type UpdateKind = 'chain' | 'update' | 'return';

const updateStatements = new WeakMap<ColumnPlan, Map<boolean, string>>();

function updateStatement(plan: ColumnPlan, withValues: boolean): string {
  let byValues = updateStatements.get(plan);
  if (!byValues) updateStatements.set(plan, (byValues = new Map()));
  const cached = byValues.get(withValues);
  if (cached) return cached;
  const { target } = plan;
  const key = quoteIdent(target.keyColumn);
  const table = qualified(target.schema, target.table);
  const columns = withValues ? plan.columns : [];
  const n = columns.length;
  const p = (k: number) => `$${n + k}`;
  const cols = columns.map((_, i) => `c${i}`);
  const casts = columns.map((c, i) => `u.c${i}::${c.castType}`);
  const dso: [string, string][] = [
    ['dso_current_server', 'coalesce(u.cs, t.dso_current_server)'],
    ['dso_current_form', 'coalesce(u.cf, t.dso_current_form)'],
    ['dso_master', 'coalesce(u.m, t.dso_master)'],
    ['dso_mapping_history', 'coalesce(u.nh::jsonb, t.dso_mapping_history)'],
  ];
  // (the condition, not a ctid: re-checked on the newest version of a row updated concurrently)
  const found = `t.${key} = u.k::${target.keyType} AND ${sameRequestSql(target.keyColumn, `${p(9)}`, 'u.rs', 'u.ri')}`;
  // values compare as the target type's text (json, point, xml have no equality operator)
  const before = [...columns.map((c) => `t.${quoteIdent(c.target)}::text`), ...dso.map(([name]) => `t.${name}`)];
  const after = [...casts.map((c) => `(${c})::text`), ...dso.map(([, value]) => value)];
  const unnested = [
    ...columns.map((_, i) => `$${i + 1}::text[]`),
    ...[1, 2, 3, 4, 5].map((k) => `${p(k)}::text[]`),
    `${p(6)}::boolean[]`,
    `${p(7)}::text[]`,
  ];
  const assignments = [
    ...columns.map((c, i) => `${quoteIdent(c.target)} = ${casts[i]}`),
    ...dso.map(([name, value]) => `${name} = ${value}`),
    `dso_update_status = 'success'`,
    'dso_synced_version = t.dso_version + 1',
  ];
  const sql = `WITH u AS (SELECT u.*, coalesce(u.h::jsonb -> 0 ->> 'fromServer', ${p(8)}::text) AS rs,
                    coalesce(u.h::jsonb -> 0 ->> 'fromRequestId', u.rid) AS ri
             FROM unnest(${unnested.join(', ')})
                  AS u(${[...cols, 'k', 'rid', 'h', 'cs', 'cf', 'm', 'nh'].join(', ')})),
f AS (SELECT u.rid FROM u JOIN ${table} t ON ${found}),
upd AS (UPDATE ${table} t SET ${assignments.join(', ')}
          FROM f JOIN u ON u.rid = f.rid
         WHERE ${found} AND ROW(${before.join(', ')}) IS DISTINCT FROM ROW(${after.join(', ')})
        RETURNING 1)
SELECT rid FROM f`;
  byValues.set(withValues, sql);
  return sql;
}

/** Updates of copies along one link; one row per request (last wins). */
export class CopyUpdateGroup extends RequestGroup<CopyUpdate> {
  constructor(
    readonly link: Link,
    readonly kind: UpdateKind,
    private readonly withValues: boolean,
    private readonly source: FormInfo,
    private readonly sourceServer: string,
  ) {
    super(`${link.plan.target.schema}.${link.plan.target.table}`);
  }

  async execute(client: pg.ClientBase): Promise<ApplyFailure[]> {
    return applyIsolating(
      client,
      [...this.rows.values()],
      (rows) => this.applyRows(client, rows),
      (row, err) => this.failure(row, classifyError(err)),
    );
  }

  private async applyRows(client: pg.ClientBase, rows: CopyUpdate[]): Promise<ApplyFailure[]> {
    const columns = this.withValues ? this.link.plan.columns : [];
    const arrays: (string | null)[][] = columns.map(() => new Array(rows.length));
    rows.forEach((row, r) => {
      for (let c = 0; c < arrays.length; c++) arrays[c]![r] = row.values[c]!;
    });
    const result = await client.query(updateStatement(this.link.plan, this.withValues), [
      ...arrays.map(textArrayLiteral),
      textArrayLiteral(rows.map((r) => r.targetKey)),
      textArrayLiteral(rows.map((r) => r.requestId)),
      textArrayLiteral(rows.map((r) => r.history)),
      textArrayLiteral(rows.map((r) => r.current?.[0] ?? null)),
      textArrayLiteral(rows.map((r) => r.current?.[1] ?? null)),
      boolArrayLiteral(rows.map((r) => r.master)),
      textArrayLiteral(rows.map((r) => r.newHistory)),
      this.sourceServer,
      this.link.server,
    ]);
    if (this.kind === 'chain' || result.rowCount === rows.length) return [];
    const found = new Set(result.rows.map((r: { rid: string }) => r.rid));
    const { target } = this.link.plan;
    return rows
      .filter((row) => !found.has(row.requestId))
      .map((row) =>
        this.failure(row, {
          sqlstate: null,
          message:
            `${this.link.server}.${target.table} has no copy of this request (request ID ${row.targetKey}): ` +
            'it was deleted there, or never transferred',
        }),
      );
  }

  private failure(row: CopyUpdate, err: { sqlstate: string | null; message: string }): ApplyFailure {
    const { mapping, plan } = this.link;
    const values: Record<string, unknown> = { [plan.target.keyColumn]: row.targetKey };
    if (this.withValues) plan.columns.forEach((c, i) => (values[c.target] = row.values[i]));
    const target = `${this.link.server}.${plan.target.schema}.${plan.target.table}`;
    return {
      type: this.kind === 'return' ? 'return' : 'update',
      mapping,
      source: this.source,
      targetServer: this.link.server,
      requestId: row.requestId,
      lsn: row.lsn,
      coalesced: row.coalesced,
      payload: {
        target,
        values,
        ...(row.current ? { current: row.current } : {}),
        ...(row.master !== null ? { master: row.master } : {}),
        ...(row.newHistory ? { history: parseJsonOr(row.newHistory) } : {}),
      },
      error:
        `mapping "${mapping.name}": ${this.kind === 'return' ? 'return' : 'update'} of request ${row.requestId} ` +
        `to ${target}: ${err.message}`,
      sqlstate: err.sqlstate,
    };
  }
}

export interface CopyDelete {
  requestId: string;
  targetKey: string;
  history: string;
  lsn: bigint;
  /** positions of the request's earlier changes this row replaced in its group */
  coalesced?: bigint[];
}

/** Deletes of copies along one link (a copy already gone is not an error). */
export class CopyDeleteGroup extends RequestGroup<CopyDelete> {
  constructor(
    readonly link: Link,
    private readonly source: FormInfo,
    private readonly sourceServer: string,
  ) {
    super(`${link.plan.target.schema}.${link.plan.target.table}`);
  }

  async execute(client: pg.ClientBase): Promise<ApplyFailure[]> {
    const { target } = this.link.plan;
    const key = quoteIdent(target.keyColumn);
    return applyIsolating(
      client,
      [...this.rows.values()],
      async (rows) => {
        await client.query(
          `WITH u AS (SELECT u.*, coalesce(u.h::jsonb -> 0 ->> 'fromServer', $4::text) AS rs,
                             coalesce(u.h::jsonb -> 0 ->> 'fromRequestId', u.rid) AS ri
                        FROM unnest($1::text[], $2::text[], $3::text[]) AS u(k, rid, h))
           DELETE FROM ${qualified(target.schema, target.table)} t USING u
            WHERE t.${key} = u.k::${target.keyType} AND ${sameRequestSql(target.keyColumn, '$5', 'u.rs', 'u.ri')}`,
          [
            textArrayLiteral(rows.map((r) => r.targetKey)),
            textArrayLiteral(rows.map((r) => r.requestId)),
            textArrayLiteral(rows.map((r) => r.history)),
            this.sourceServer,
            this.link.server,
          ],
        );
        return [];
      },
      (row, err) => {
        const classified = classifyError(err);
        const where = `${this.link.server}.${target.schema}.${target.table}`;
        return {
          type: 'delete' as const,
          mapping: this.link.mapping,
          source: this.source,
          targetServer: this.link.server,
          requestId: row.requestId,
          lsn: row.lsn,
          coalesced: row.coalesced,
          payload: { target: where, values: { [target.keyColumn]: row.targetKey } },
          error: `mapping "${this.link.mapping.name}": delete of request ${row.requestId} on ${where}: ${classified.message}`,
          sqlstate: classified.sqlstate,
        };
      },
    );
  }
}
