// The transfer operation, set-based. On the target, per group: a plain INSERT ... SELECT FROM
// unnest(...) when every request is new, else an INSERT ... ON CONFLICT DO UPDATE that updates the
// copy of the same request (same root in its mapping history) and leaves a different request with
// the same ID alone (a duplicate: the mapping's duplicateRequestId policy). On the source: one
// UPDATE for the bookkeeping columns.
// A data error isolates the bad rows by bisection under savepoints; the others are applied.
import type pg from 'pg';
import type { MappingConfig } from '../config/types.ts';
import { qualified, quoteIdent } from '../sql/identifiers.ts';
import { formatLsn } from '../change.ts';
import { classifyError, isDataError, sqlstateOf } from './errors.ts';
import type { OpGroup } from './lane.ts';
import type { ColumnPlan } from './plan.ts';

/** One request carried by a mapping, as text values aligned with plan.columns. */
export interface TransferRow {
  requestId: string;
  values: (string | null)[];
  /** the target copy's dso_mapping_history (JSON text) */
  history: string;
  /** WAL position of the source change */
  lsn: bigint;
}

/** A row that could not be applied, for pgdso.pending_errors. */
export interface ApplyFailure {
  type: 'transfer';
  mapping: MappingConfig;
  requestId: string;
  lsn: bigint;
  payload: Record<string, unknown>;
  error: string;
  sqlstate: string | null;
}

interface TransferStatements {
  /** INSERT only: the fast path when none of the requests is on the target yet */
  insert: string;
  /** INSERT ... ON CONFLICT DO UPDATE of the same request; returns the request IDs it wrote */
  upsert: string;
}

const statements = new WeakMap<ColumnPlan, TransferStatements>();

// Parameters after the column arrays: +1 ids, +2 histories, +3 master, +4 current server,
// +5 current form, +6 from server, +7 from form, +8 mapping, +9 this target server.
function transferStatements(plan: ColumnPlan): TransferStatements {
  const cached = statements.get(plan);
  if (cached) return cached;
  const { mapping, target } = plan;
  const key = quoteIdent(target.keyColumn);
  const table = qualified(target.schema, target.table);
  const n = plan.columns.length;
  const p = (k: number) => `$${n + k}`;
  const dataColumns = plan.columns.map((c) => quoteIdent(c.target));
  const casts = plan.columns.map((c, i) => `u.c${i}::${c.castType}`);
  const arrays = plan.columns.map((_, i) => `$${i + 1}::text[]`);
  const dso = [
    ['dso_master', `${p(3)}::boolean`],
    ['dso_current_server', `${p(4)}::text`],
    ['dso_current_form', `${p(5)}::text`],
    ['dso_from_server', `${p(6)}::text`],
    ['dso_from_form', `${p(7)}::text`],
    ['dso_from_request_id', 'u.rid'],
    ['dso_from_mapping', `${p(8)}::text`],
    ['dso_mapping_history', 'u.hist::jsonb'],
    ['dso_to_server', 'NULL::text'],
    ['dso_to_form', 'NULL::text'],
    ['dso_to_request_id', 'NULL::text'],
    ['dso_to_mapping', 'NULL::text'],
  ] as const;
  const ownsTarget = mapping.transferMode !== 'data-only';
  // A copy that stays read-only (data-only) keeps its dso_to_*; a master copy forgets where it
  // was sent before (it is the master again).
  const updated = [...dataColumns, ...dso.filter(([name]) => ownsTarget || !name.startsWith('dso_to_')).map(([name]) => quoteIdent(name))];
  const insert = `INSERT INTO ${table} AS t (${key}, ${[...dataColumns, ...dso.map(([name]) => quoteIdent(name))].join(', ')})
SELECT u.rid::${target.keyType}, ${[...casts, ...dso.map(([, value]) => value)].join(', ')}
  FROM unnest(${[...arrays, `${p(1)}::text[]`, `${p(2)}::text[]`].join(', ')}) AS u(${[...plan.columns.map((_, i) => `c${i}`), 'rid', 'hist'].join(', ')})`;
  // The same request: the target copy's root (first hop, or itself) is the incoming one's.
  const sameRequest = (incoming: string, thisServer: string) => `coalesce(t.dso_mapping_history -> 0 ->> 'fromServer', ${thisServer}::text) IS NOT DISTINCT FROM ${incoming} -> 0 ->> 'fromServer'
   AND coalesce(t.dso_mapping_history -> 0 ->> 'fromRequestId', t.${key}::text) IS NOT DISTINCT FROM ${incoming} -> 0 ->> 'fromRequestId'`;
  const upsert = `${insert}
ON CONFLICT (${key}) DO UPDATE SET ${updated.map((c) => `${c} = EXCLUDED.${c}`).join(', ')}
 WHERE ${mapping.duplicateRequestId === 'overwrite' ? 'true' : sameRequest('EXCLUDED.dso_mapping_history', p(9))}
RETURNING t.${key}::text AS rid`;
  const built = { insert, upsert };
  statements.set(plan, built);
  return built;
}

/** Transfers of one mapping into the lane of its target; one row per request (last wins). */
export class TransferGroup implements OpGroup<ApplyFailure> {
  private readonly rows = new Map<string, TransferRow>();
  /** every request came from a source insert: try a plain INSERT before the upsert */
  private plainInsert = true;
  private readonly table: string;

  constructor(readonly plan: ColumnPlan) {
    this.table = `${plan.target.schema}.${plan.target.table}`;
  }

  get size(): number {
    return this.rows.size;
  }

  /** Adds a request; a later change of the same request replaces the earlier (one statement). */
  add(row: TransferRow, fromInsert: boolean): void {
    if (!fromInsert || this.rows.has(row.requestId)) this.plainInsert = false;
    this.rows.set(row.requestId, row);
  }

  has(table: string, requestId: string): boolean {
    return table === this.table && this.rows.has(requestId);
  }

  async execute(client: pg.ClientBase): Promise<ApplyFailure[]> {
    return applyIsolating(client, [...this.rows.values()], (rows) => this.applyRows(client, rows), (row, err) => this.failure(row, err));
  }

  private async applyRows(client: pg.ClientBase, rows: TransferRow[]): Promise<ApplyFailure[]> {
    const { plan } = this;
    const { mapping } = plan;
    const arrays: (string | null)[][] = plan.columns.map(() => new Array(rows.length));
    const ids = new Array<string>(rows.length);
    const histories = new Array<string>(rows.length);
    rows.forEach((row, r) => {
      ids[r] = row.requestId;
      histories[r] = row.history;
      for (let c = 0; c < arrays.length; c++) arrays[c]![r] = row.values[c]!;
    });
    const ownsTarget = mapping.transferMode !== 'data-only';
    const params = [
      ...arrays.map(textArrayLiteral),
      textArrayLiteral(ids),
      textArrayLiteral(histories),
      ownsTarget,
      ownsTarget ? mapping.to.server : mapping.from.server,
      ownsTarget ? mapping.to.table : mapping.from.table,
      mapping.from.server,
      mapping.from.table,
      mapping.name,
      mapping.to.server,
    ];
    const sql = transferStatements(plan);
    // the plain INSERT does not use the last parameter (this target server)
    if (this.plainInsert && (await this.tryInsert(client, sql.insert, params.slice(0, -1)))) return [];
    const result = await client.query(sql.upsert, params);
    if (result.rowCount === rows.length) return [];
    // not written: the target holds that ID for a different request
    const written = new Set(result.rows.map((r: { rid: string }) => r.rid));
    return rows.filter((row) => !written.has(row.requestId)).map((row) => this.failure(row, duplicateError(mapping, row.requestId)));
  }

  /** A plain INSERT under a savepoint; false (and nothing written) if a request is already there. */
  private async tryInsert(client: pg.ClientBase, sql: string, params: unknown[]): Promise<boolean> {
    try {
      await underSavepoint(client, 'pgdso_insert', () => client.query(sql, params));
      return true;
    } catch (err) {
      if (sqlstateOf(err) === '23505') return false;
      throw err;
    }
  }

  private failure(row: TransferRow, err: unknown): ApplyFailure {
    const { mapping } = this.plan;
    const classified = classifyError(err);
    const payload: Record<string, unknown> = { [this.plan.target.keyColumn]: row.requestId };
    this.plan.columns.forEach((c, i) => {
      payload[c.target] = row.values[i];
    });
    return {
      type: 'transfer',
      mapping,
      requestId: row.requestId,
      lsn: row.lsn,
      payload: { target: `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`, values: payload, history: parseJsonOr(row.history) },
      error: `mapping "${mapping.name}": request ${row.requestId} to ${mapping.to.server}.${mapping.to.table}: ${classified.message}`,
      sqlstate: classified.sqlstate,
    };
  }
}

const NEEDS_ESCAPE = /["\\]/;

/**
 * A text[] literal built directly ('{"a","b",NULL}'): several times cheaper than pg's generic
 * array serialisation for the large arrays of set-based statements.
 */
export function textArrayLiteral(values: readonly (string | null)[]): string {
  const parts = new Array<string>(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || v === undefined) parts[i] = 'NULL';
    else parts[i] = NEEDS_ESCAPE.test(v) ? `"${v.replace(/[\\"]/g, '\\$&')}"` : `"${v}"`;
  }
  return `{${parts.join(',')}}`;
}

function parseJsonOr(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

class DuplicateRequestError extends Error {
  readonly code = '23505';
}

function duplicateError(mapping: MappingConfig, requestId: string): DuplicateRequestError {
  return new DuplicateRequestError(
    `${mapping.to.server}.${mapping.to.table} already holds request ${requestId} for a different request (duplicateRequestId: ${mapping.duplicateRequestId})`,
  );
}

/**
 * Applies rows under a savepoint; on a data error, splits them in halves until each bad row is
 * alone, so the good rows are applied and each bad one becomes a failure.
 */
async function applyIsolating<R, F>(
  client: pg.ClientBase,
  rows: R[],
  apply: (rows: R[]) => Promise<F[]>,
  fail: (row: R, err: unknown) => F,
): Promise<F[]> {
  if (rows.length === 0) return [];
  try {
    return await underSavepoint(client, 'pgdso_group', () => apply(rows));
  } catch (err) {
    if (!isDataError(err)) throw err;
    if (rows.length === 1) return [fail(rows[0]!, err)];
    const half = Math.ceil(rows.length / 2);
    const first = await applyIsolating(client, rows.slice(0, half), apply, fail);
    const second = await applyIsolating(client, rows.slice(half), apply, fail);
    return [...first, ...second];
  }
}

/**
 * Runs `work` under a savepoint: released when it succeeds, rolled back when it throws (the
 * error is rethrown; if the rollback itself fails, the transaction is lost and the first error
 * is the one that tells why).
 */
async function underSavepoint<T>(client: pg.ClientBase, name: string, work: () => Promise<T>): Promise<T> {
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

/** The key of one transferred change, to match failures with bookkeeping. */
export function changeKey(mapping: string, requestId: string, lsn: bigint): string {
  return `${mapping}\u0000${requestId}\u0000${lsn}`;
}

interface TransferredChange {
  requestId: string;
  lsn: bigint;
  /** applied by a lane in this session (its outcome is known); else replayed past a lane's progress */
  ran: boolean;
}

/**
 * The source copy's side of the transfers of one mapping (dso_to_*, ownership, status), applied
 * once the targets have committed. A request counts as transferred when any of its changes in
 * the batch reached the target: one that ran in this session and did not fail, or one a lane had
 * committed before (replay) and that has no pending_errors row. Error rows of changes that did
 * apply in this session are stale (left by an attempt that never committed) and are removed.
 */
export class TransferredGroup implements OpGroup<never> {
  private readonly changes: TransferredChange[] = [];
  private readonly requests = new Set<string>();
  private readonly table: string;

  constructor(readonly mapping: MappingConfig, readonly keyColumn: string, readonly keyType: string) {
    this.table = `${mapping.from.schema}.${mapping.from.table}`;
  }

  get size(): number {
    return this.changes.length;
  }

  add(requestId: string, lsn: bigint, ran: boolean): void {
    this.changes.push({ requestId, lsn, ran });
    this.requests.add(requestId);
  }

  has(table: string, requestId: string): boolean {
    return table === this.table && this.requests.has(requestId);
  }

  /** Forgets the changes that failed on the target in this session. */
  dropFailed(failed: ReadonlySet<string>): void {
    if (failed.size === 0) return;
    const kept = this.changes.filter((c) => !(c.ran && failed.has(changeKey(this.mapping.name, c.requestId, c.lsn))));
    this.changes.length = 0;
    this.changes.push(...kept);
  }

  async execute(client: pg.ClientBase): Promise<never[]> {
    if (this.changes.length === 0) return [];
    const { mapping } = this;
    const key = quoteIdent(this.keyColumn);
    const owns = mapping.transferMode === 'data+ownership';
    await client.query(
      `WITH change AS (SELECT * FROM unnest($1::text[], $2::pg_lsn[], $3::boolean[]) AS c(rid, lsn, ran)),
            stale AS (DELETE FROM pgdso.pending_errors e USING change c
                       WHERE c.ran AND e.source_lsn = c.lsn AND e.mapping = $9 AND e.type = 'transfer' AND e.request_id = c.rid),
            transferred AS (SELECT DISTINCT c.rid FROM change c
                             WHERE c.ran OR NOT EXISTS (SELECT 1 FROM pgdso.pending_errors e
                                                         WHERE e.source_lsn = c.lsn AND e.mapping = $9 AND e.type = 'transfer' AND e.request_id = c.rid))
       UPDATE ${qualified(mapping.from.schema, mapping.from.table)} AS s
          SET dso_master = CASE WHEN $4 THEN false ELSE s.dso_master END,
              dso_current_server = CASE WHEN $4 THEN $5 ELSE coalesce(s.dso_current_server, $7) END,
              dso_current_form = CASE WHEN $4 THEN $6 ELSE coalesce(s.dso_current_form, $8) END,
              dso_to_server = $5, dso_to_form = $6, dso_to_request_id = t.rid, dso_to_mapping = $9,
              dso_transfer_status = 'success'
         FROM transferred t
        WHERE s.${key} = t.rid::${this.keyType}`,
      [
        textArrayLiteral(this.changes.map((c) => c.requestId)),
        textArrayLiteral(this.changes.map((c) => formatLsn(c.lsn))),
        `{${this.changes.map((c) => (c.ran ? 't' : 'f')).join(',')}}`,
        owns, mapping.to.server, mapping.to.table, mapping.from.server, mapping.from.table, mapping.name,
      ],
    );
    return [];
  }
}

/**
 * Records failures in the source's pending_errors (idempotent: a replay records nothing twice)
 * and marks their source copies failed: one statement for the errors, one per mapping for the
 * copies.
 */
export async function recordFailures(client: pg.ClientBase, failures: ApplyFailure[], keyOf: (m: MappingConfig) => { keyColumn: string; keyType: string }): Promise<void> {
  const rows = failures.map((f) => ({
    pool: f.mapping.pool, type: f.type, mapping: f.mapping.name, form: `${f.mapping.from.schema}.${f.mapping.from.table}`,
    request_id: f.requestId, target_server: f.mapping.to.server, payload: f.payload, error: f.error, sqlstate: f.sqlstate, source_lsn: formatLsn(f.lsn),
  }));
  await client.query(
    `INSERT INTO pgdso.pending_errors (pool, type, mapping, form, request_id, target_server, payload, status, attempts, last_error, error, sqlstate, source_lsn)
     SELECT f.pool, f.type, f.mapping, f.form, f.request_id, f.target_server, f.payload, 'failed', 1, f.error, f.error, f.sqlstate, f.source_lsn::pg_lsn
       FROM jsonb_to_recordset($1::jsonb) AS f(pool text, type text, mapping text, form text, request_id text, target_server text, payload jsonb, error text, sqlstate text, source_lsn text)
     ON CONFLICT (source_lsn, mapping, type, request_id) WHERE source_lsn IS NOT NULL DO NOTHING`,
    [JSON.stringify(rows)],
  );
  const byMapping = new Map<MappingConfig, string[]>();
  for (const f of failures) {
    const ids = byMapping.get(f.mapping);
    if (ids) ids.push(f.requestId);
    else byMapping.set(f.mapping, [f.requestId]);
  }
  for (const [mapping, ids] of byMapping) {
    const { keyColumn, keyType } = keyOf(mapping);
    await client.query(
      `UPDATE ${qualified(mapping.from.schema, mapping.from.table)} SET dso_transfer_status = 'failure'
        WHERE ${quoteIdent(keyColumn)} = ANY ($1::text[]::${keyType}[]) AND dso_transfer_status IS DISTINCT FROM 'failure'`,
      [textArrayLiteral(ids)],
    );
  }
}
