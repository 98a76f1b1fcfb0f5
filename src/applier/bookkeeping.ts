// The source copy's side of an operation, written once the targets have committed: where the
// request went (dso_to_*), ownership and statuses, or the copy's deletion (archiving); and the
// record of the operations that could not be applied.
import type pg from 'pg';
import type { MappingConfig } from '../config/types.ts';
import type { FormInfo } from '../sql/form-catalog.ts';
import { qualified, quoteIdent } from '../sql/identifiers.ts';
import { formatLsn } from '../change.ts';
import type { OpGroup } from './lane.ts';
import { KEEP_SYNC, boolArrayLiteral, changeKey, textArrayLiteral, type ApplyFailure, type OpType } from './sets.ts';

/** The source copy as the change showed it. */
export interface SeenState {
  /** its dso_version: the values the operation sent */
  version: string | null;
  hops: number;
  current: string | null;
}

/** The number of hops in a dso_mapping_history (jsonb text), without parsing it. */
export function countHops(historyText: string | null | undefined): number {
  if (!historyText || historyText === '[]') return 0;
  let n = 0;
  for (let at = historyText.indexOf('"fromServer"'); at >= 0; at = historyText.indexOf('"fromServer"', at + 12)) n += 1;
  return n;
}

/** What the bookkeeping records on the source copy. */
export type Outcome =
  /** transferred by `mapping`: dso_to_*, ownership (data+ownership), status; or deleted (afterTransfer delete) */
  | { op: 'transfer' }
  /** returned along `mapping` to its from server: read-only, the master is there */
  | { op: 'return' }
  /** pushed by the update action */
  | { op: 'update' };

/**
 * The bookkeeping of one mapping's operations of one kind. A request counts as done when any of
 * its changes in the batch reached the target: one that ran in this session and did not fail,
 * or one a lane had committed before (replay) and that has no pending_errors row. Error rows of
 * changes that did apply in this session are stale (left by an attempt that never committed) and
 * are removed.
 */
export class SourceBookkeeping implements OpGroup<never> {
  // one entry per change, in columns (a batch can be one huge source transaction: no object per change)
  private rids: string[] = [];
  private lsns: bigint[] = [];
  /** applied by a lane in this session (its outcome is known); else replayed past a lane's progress */
  private ran: boolean[] = [];
  /** what the source copy said in the change (SeenState) */
  private versions: (string | null)[] = [];
  private hops: number[] = [];
  private currents: (string | null)[] = [];
  private readonly requests = new Set<string>();
  private readonly table: string;

  /** `assigned`: target keys taken under new-id (source request ID -> target key) */
  constructor(
    readonly outcome: Outcome,
    readonly mapping: MappingConfig,
    readonly form: FormInfo,
    private readonly assigned?: ReadonlyMap<string, string>,
  ) {
    this.table = `${form.schema}.${form.table}`;
  }

  get size(): number {
    return this.rids.length;
  }

  add(requestId: string, lsn: bigint, ran: boolean, seen: SeenState): void {
    this.rids.push(requestId);
    this.lsns.push(lsn);
    this.ran.push(ran);
    this.versions.push(seen.version);
    this.hops.push(seen.hops);
    this.currents.push(seen.current);
    this.requests.add(requestId);
  }

  has(table: string, requestId: string): boolean {
    return table === this.table && this.requests.has(requestId);
  }

  /** Forgets the changes whose operation failed on the target in this session. */
  dropFailed(failed: ReadonlySet<string>): void {
    if (failed.size === 0) return;
    const { op } = this.outcome;
    const name = this.mapping.name;
    const keep = this.rids.map((rid, i) => !(this.ran[i] && failed.has(changeKey(op, name, rid, this.lsns[i]!))));
    const kept = <T>(column: T[]) => column.filter((_, i) => keep[i]);
    this.rids = kept(this.rids);
    this.lsns = kept(this.lsns);
    this.ran = kept(this.ran);
    this.versions = kept(this.versions);
    this.hops = kept(this.hops);
    this.currents = kept(this.currents);
  }

  async execute(client: pg.ClientBase): Promise<never[]> {
    if (this.rids.length === 0) return [];
    const { mapping, form } = this;
    const key = quoteIdent(form.keyColumn);
    const table = qualified(form.schema, form.table);
    // changes replayed past a lane's progress: their outcome is in pending_errors, under their own
    // position or among the earlier changes a failed write carried (read only then: a scan)
    const replayed = this.ran.includes(false);
    const carried = replayed
      ? `carried AS MATERIALIZED (SELECT e.request_id AS rid, x.lsn::pg_lsn AS lsn
                                    FROM pgdso.pending_errors e, jsonb_array_elements_text(e.payload -> 'coalescedLsns') AS x(lsn)
                                   WHERE e.mapping = $5 AND e.type = $6 AND e.payload ? 'coalescedLsns'),`
      : '';
    const failedBefore = `NOT EXISTS (SELECT 1 FROM pgdso.pending_errors e
                                        WHERE e.source_lsn = c.lsn AND e.mapping = $5 AND e.type = $6 AND e.request_id = c.rid)
                           AND NOT EXISTS (SELECT 1 FROM carried k WHERE k.rid = c.rid AND k.lsn = c.lsn)`;
    const done = `WITH change AS (SELECT * FROM unnest($1::text[], $2::pg_lsn[], $3::boolean[], $4::text[],
                                                   $7::int[], $8::text[], $9::bigint[]) AS c(rid, lsn, ran, tid, hops, cur, ver)),
            stale AS (DELETE FROM pgdso.pending_errors e USING change c
                       WHERE c.ran AND e.source_lsn = c.lsn AND e.mapping = $5 AND e.type = $6 AND e.request_id = c.rid),
            ${carried}
            done AS (SELECT DISTINCT ON (c.rid) c.rid, c.tid, c.hops, c.cur, c.ver FROM change c
                      WHERE ${replayed ? `c.ran OR (${failedBefore})` : 'true'}
                      ORDER BY c.rid, c.lsn DESC)`;
    const params: unknown[] = [
      textArrayLiteral(this.rids),
      textArrayLiteral(this.lsns.map(formatLsn)),
      boolArrayLiteral(this.ran),
      textArrayLiteral(this.rids.map((rid) => this.assigned?.get(rid) ?? null)),
      mapping.name,
      this.outcome.op,
      `{${this.hops.join(',')}}`,
      textArrayLiteral(this.currents),
      `{${this.versions.map((v) => v ?? 'NULL').join(',')}}`,
    ];
    // A sync point: the copy holds what the operation sent (no change since), so it is in sync
    // with the other side; a copy changed since keeps its local changes flagged.
    const synced = `dso_synced_version = CASE WHEN s.dso_version = t.ver OR s.dso_synced_version = s.dso_version
                                          THEN s.dso_version + 1 ELSE s.dso_synced_version END`;
    // The target's engine may act on its new copy before this step runs, and write back: a
    // return or a transfer back (ownership here again: a longer history whose last hop came
    // here), or where the master went next (dso_current_server changed). Its news stands.
    const ownedAgain = (here: string) =>
      `(s.dso_master AND jsonb_array_length(s.dso_mapping_history) > t.hops AND s.dso_mapping_history -> -1 ->> 'toServer' = ${here})`;
    const masterMoved = '(s.dso_current_server IS DISTINCT FROM t.cur)';
    const match = `FROM done t WHERE s.${key} = t.rid::${form.keyType}`;
    if (this.outcome.op === 'transfer' && mapping.afterTransfer === 'delete') {
      await client.query(`${done} DELETE FROM ${table} AS s USING done t WHERE s.${key} = t.rid::${form.keyType}`, params);
    } else if (this.outcome.op === 'transfer') {
      const owns = mapping.transferMode === 'data+ownership';
      await client.query(
        `${done} UPDATE ${table} AS s
            SET dso_master = CASE WHEN $10 AND NOT ${ownedAgain('$13')} THEN false ELSE s.dso_master END,
                dso_current_server = CASE WHEN ${ownedAgain('$13')} OR ${masterMoved} THEN s.dso_current_server
                                          WHEN $10 THEN $11 ELSE coalesce(s.dso_current_server, $13) END,
                dso_current_form = CASE WHEN ${ownedAgain('$13')} OR ${masterMoved} THEN s.dso_current_form
                                        WHEN $10 THEN $12 ELSE coalesce(s.dso_current_form, $14) END,
                dso_to_server = $11, dso_to_form = $12,
                dso_to_request_id = coalesce(t.tid, CASE WHEN s.dso_to_mapping = $5 THEN s.dso_to_request_id END, t.rid),
                dso_to_mapping = $5, dso_transfer_status = 'success', ${synced}
          ${match}`,
        [...params, owns, mapping.to.server, mapping.to.table, mapping.from.server, mapping.from.table],
      );
    } else if (this.outcome.op === 'return') {
      await client.query(
        `${done} UPDATE ${table} AS s
            SET dso_master = CASE WHEN ${ownedAgain('$12')} THEN s.dso_master ELSE false END,
                dso_current_server = CASE WHEN ${ownedAgain('$12')} OR ${masterMoved} THEN s.dso_current_server ELSE $10 END,
                dso_current_form = CASE WHEN ${ownedAgain('$12')} OR ${masterMoved} THEN s.dso_current_form ELSE $11 END,
                dso_transfer_status = 'success', ${synced}
          ${match}`,
        [...params, mapping.from.server, mapping.from.table, mapping.to.server],
      );
    } else {
      await client.query(
        `${done} UPDATE ${table} AS s SET dso_update_status = 'success', ${synced}
          ${match} AND s.dso_update_status IS DISTINCT FROM 'success'`,
        params,
      );
    }
    // A replay past a lane's progress (ran = false) of a change whose operation had failed: its
    // error is recorded, and the copy says so (the session that recorded it may have ended
    // before it marked the copy).
    if (replayed) {
      const column = STATUS_COLUMN[this.outcome.op]!;
      await client.query(
        `WITH change AS (SELECT * FROM unnest($1::text[], $2::pg_lsn[], $3::boolean[]) AS c(rid, lsn, ran)),
              latest AS (SELECT DISTINCT ON (c.rid) c.rid, c.lsn, c.ran FROM change c ORDER BY c.rid, c.lsn DESC)
         UPDATE ${table} AS s SET ${column} = 'failure', ${KEEP_SYNC}
           FROM latest t
          WHERE s.${key} = t.rid::${form.keyType} AND NOT t.ran AND s.${column} IS DISTINCT FROM 'failure'
            AND EXISTS (SELECT 1 FROM pgdso.pending_errors e
                         WHERE e.source_lsn = t.lsn AND e.mapping = $4 AND e.type = $5 AND e.request_id = t.rid)`,
        [params[0], params[1], params[2], mapping.name, this.outcome.op],
      );
    }
    return [];
  }
}

const STATUS_COLUMN: Readonly<Record<OpType, string | null>> = {
  transfer: 'dso_transfer_status',
  return: 'dso_transfer_status',
  update: 'dso_update_status',
  delete: null,
};

/**
 * Records failures in the source's pending_errors, idempotently (a replay records nothing
 * twice). Only pgdso's own table: no user row is locked while a target's transaction is open.
 */
export async function recordErrors(client: pg.ClientBase, failures: readonly ApplyFailure[]): Promise<void> {
  if (failures.length === 0) return;
  const rows = failures.map((f) => ({
    pool: f.mapping.pool,
    type: f.type,
    mapping: f.mapping.name,
    form: `${f.source.schema}.${f.source.table}`,
    request_id: f.requestId,
    target_server: f.targetServer,
    target_form: f.payload.targetForm ?? null,
    target_key: f.payload.targetKey ?? null,
    // a replay finds the earlier changes the failed write carried by these (SourceBookkeeping)
    payload: f.coalesced?.length ? { ...f.payload, coalescedLsns: f.coalesced.map(formatLsn) } : f.payload,
    error: f.error,
    sqlstate: f.sqlstate,
    source_lsn: formatLsn(f.lsn),
  }));
  await client.query(
    `INSERT INTO pgdso.pending_errors (pool, type, mapping, form, request_id, target_server, target_form, target_key, payload,
                                      status, attempts, last_error, error, sqlstate, source_lsn)
     SELECT f.pool, f.type, f.mapping, f.form, f.request_id, f.target_server, f.target_form, f.target_key, f.payload,
            'failed', 1, f.error, f.error, f.sqlstate, f.source_lsn::pg_lsn
       FROM jsonb_to_recordset($1::jsonb) AS f(pool text, type text, mapping text, form text, request_id text, target_server text,
                                               target_form text, target_key text, payload jsonb, error text, sqlstate text, source_lsn text)
     ON CONFLICT (source_lsn, mapping, type, request_id) WHERE source_lsn IS NOT NULL DO NOTHING`,
    [JSON.stringify(rows)],
  );
}

/** A source copy whose operation's status changes. */
export interface CopyStatus {
  source: FormInfo;
  type: OpType;
  requestId: string;
}

/**
 * Sets the transfer or update status of source copies ('failure': in pending_errors; 'retry':
 * waiting in pending): one statement per form and status column.
 */
export async function markStatus(client: pg.ClientBase, copies: readonly CopyStatus[], status: 'failure' | 'retry'): Promise<void> {
  const byCopy = new Map<string, { form: FormInfo; column: string; ids: string[] }>();
  for (const f of copies) {
    const column = STATUS_COLUMN[f.type];
    if (!column) continue;
    const key = `${f.source.schema}.${f.source.table}\u0000${column}`;
    const entry = byCopy.get(key);
    if (entry) entry.ids.push(f.requestId);
    else byCopy.set(key, { form: f.source, column, ids: [f.requestId] });
  }
  for (const { form, column, ids } of byCopy.values()) {
    await client.query(
      `UPDATE ${qualified(form.schema, form.table)} AS s SET ${column} = $2, ${KEEP_SYNC}
        WHERE ${quoteIdent(form.keyColumn)} = ANY ($1::text[]::${form.keyType}[]) AND ${column} IS DISTINCT FROM $2`,
      [textArrayLiteral(ids), status],
    );
  }
}
