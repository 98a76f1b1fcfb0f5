// What the set-based operation groups share: the failure record, text[] literals, isolation of
// bad rows by bisection under savepoints, and the SQL that recognises the copies of one request.
import type pg from 'pg';
import type { MappingConfig } from '../config/types.ts';
import type { FormInfo } from '../sql/form-catalog.ts';
import { quoteIdent } from '../sql/identifiers.ts';
import { isolatesRows } from './errors.ts';
import type { OpGroup } from './lane.ts';

/** The four DSO operations. */
export type OpType = 'transfer' | 'update' | 'return' | 'delete';

/** An operation that could not be applied, for the source's pgdso.pending_errors. */
export interface ApplyFailure {
  type: OpType;
  mapping: MappingConfig;
  /** the form of the copy the operation was sent from (on the source server) */
  source: FormInfo;
  targetServer: string;
  requestId: string;
  lsn: bigint;
  /**
   * the positions of earlier changes of the request that the failed write carried (a group keeps
   * a request's latest change): none of them was applied
   */
  coalesced?: bigint[];
  payload: Record<string, unknown>;
  error: string;
  sqlstate: string | null;
  /** no source copy to mark (a TRUNCATE) */
  noStatus?: boolean;
}

/** The key of one operation of a source change, to match failures with bookkeeping. */
export function changeKey(type: OpType, mapping: string, requestId: string, lsn: bigint): string {
  return `${type}\u0000${mapping}\u0000${requestId}\u0000${lsn}`;
}

const NEEDS_ESCAPE = /["\\]/;

/**
 * A text[] literal built directly ('{"a","b",NULL}'): several times cheaper than pg's generic
 * array serialisation for the large arrays of set-based statements.
 */
export function textArrayLiteral(values: readonly (string | null | undefined)[]): string {
  const parts = new Array<string>(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || v === undefined) parts[i] = 'NULL';
    else parts[i] = NEEDS_ESCAPE.test(v) ? `"${v.replace(/[\\"]/g, '\\$&')}"` : `"${v}"`;
  }
  return `{${parts.join(',')}}`;
}

/** A boolean[] literal; null stays NULL. */
export function boolArrayLiteral(values: readonly (boolean | null)[]): string {
  return `{${values.map((v) => (v === null ? 'NULL' : v ? 't' : 'f')).join(',')}}`;
}

export function parseJsonOr(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** The savepoint `apply` of applyIsolating runs under (it may roll back to it and go on). */
export const GROUP_SAVEPOINT = 'pgdso_group';

/**
 * Applies rows under a savepoint; on a data error (or an unknown SQLSTATE), splits them in halves until each bad row is
 * alone, so the good rows are applied and each bad one becomes a failure.
 */
export async function applyIsolating<R, F>(
  client: pg.ClientBase,
  rows: R[],
  apply: (rows: R[]) => Promise<F[]>,
  fail: (row: R, err: unknown) => F,
): Promise<F[]> {
  if (rows.length === 0) return [];
  try {
    return await underSavepoint(client, GROUP_SAVEPOINT, () => apply(rows));
  } catch (err) {
    if (!isolatesRows(err)) throw err;
    if (rows.length === 1) return [fail(rows[0]!, err)];
    const half = Math.ceil(rows.length / 2);
    const first = await applyIsolating(client, rows.slice(0, half), apply, fail);
    const second = await applyIsolating(client, rows.slice(half), apply, fail);
    return first.concat(second);
  }
}

/**
 * Runs `work` under a savepoint: released when it succeeds, rolled back when it throws (the
 * error is rethrown; if the rollback itself fails, the transaction is lost and the first error
 * is the one that tells why).
 */
export async function underSavepoint<T>(client: pg.ClientBase, name: string, work: () => Promise<T>): Promise<T> {
  await client.query(`SAVEPOINT ${name}`);
  try {
    const result = await work();
    await client.query(`RELEASE SAVEPOINT ${name}`);
    return result;
  } catch (err) {
    await client.query(`ROLLBACK TO SAVEPOINT ${name}; RELEASE SAVEPOINT ${name}`).catch(() => undefined);
    throw err;
  }
}

/**
 * SQL: the copy `t` (on server `thisServer`, an SQL expression) is the request whose root is
 * (rootServer, rootId): the first hop of its mapping history, or the copy itself when it never
 * moved. Copies of one request share their root, whatever their request IDs.
 */
export function sameRequestSql(keyColumn: string, thisServer: string, rootServer: string, rootId: string): string {
  return `coalesce(t.dso_mapping_history -> 0 ->> 'fromServer', ${thisServer}::text) IS NOT DISTINCT FROM ${rootServer}
   AND coalesce(t.dso_mapping_history -> 0 ->> 'fromRequestId', t.${quoteIdent(keyColumn)}::text) IS NOT DISTINCT FROM ${rootId}`;
}

/** SQL: the root of an incoming history `hist` (jsonb) sent from `server` for request `rid`. */
export function rootSql(hist: string, server: string, rid: string): [string, string] {
  return [`coalesce(${hist} -> 0 ->> 'fromServer', ${server}::text)`, `coalesce(${hist} -> 0 ->> 'fromRequestId', ${rid})`];
}

/**
 * SQL SET item for the engine's bookkeeping writes on a copy (alias s): a copy in sync with its
 * last sync stays in sync (the guard raises dso_version by one), a copy changed locally since
 * stays changed.
 */
export const KEEP_SYNC = `dso_synced_version = CASE WHEN s.dso_synced_version = s.dso_version
                                          THEN s.dso_version + 1 ELSE s.dso_synced_version END`;

/**
 * The requests of one set-based group: one row per request (a later change replaces the
 * earlier: one statement), found by the target copy's request ID for the lane's ordering.
 */
export abstract class RequestGroup<R extends { requestId: string; targetKey: string; lsn: bigint; coalesced?: bigint[] }>
  implements OpGroup<ApplyFailure>
{
  protected readonly rows = new Map<string, R>();
  private readonly targetKeys = new Set<string>();

  /** `table`: the target form (schema.table) the group writes */
  constructor(private readonly table: string) {}

  get size(): number {
    return this.rows.size;
  }

  has(table: string, targetKey: string): boolean {
    return table === this.table && this.targetKeys.has(targetKey);
  }

  /** A request's row; one it had in the group is replaced (its position kept in `coalesced`). */
  add(row: R): void {
    const earlier = this.rows.get(row.requestId);
    if (earlier) row.coalesced = [...(earlier.coalesced ?? []), earlier.lsn];
    this.rows.set(row.requestId, row);
    this.targetKeys.add(row.targetKey);
  }

  abstract execute(client: pg.ClientBase): Promise<ApplyFailure[]>;
}
