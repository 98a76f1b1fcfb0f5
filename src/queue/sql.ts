// DSO's Distributed Pending, done right: the operations for a peer that cannot be reached (or
// for a request that already has operations waiting) are rows of pgdso.pending on the source,
// written in the same transaction as the source's apply progress, so the slot moves on and no
// other peer waits. They are delivered in id order per target server, which keeps the order of
// each request's operations. A queued operation superseded by a newer one of the same kind for
// the same request, with nothing queued between them, is dropped (DSO keeps only the newest).
//
// Exactly once: the target commits a delivered chunk together with the highest pending id it
// holds (pgdso.pending_delivered, per source queue); the source then writes the bookkeeping and
// deletes the rows. A delivery interrupted between the two is finished by bookkeeping alone.
import type pg from 'pg';
import type { TextRow } from '../change.ts';
import type { MappingConfig } from '../config/types.ts';
import type { SeenState } from '../applier/bookkeeping.ts';
import type { UpdateKind } from '../applier/chain.ts';
import type { ApplyFailure, OpType } from '../applier/sets.ts';

/**
 * An operation as it waits in pgdso.pending (and in pending_errors, for a retry): what is needed
 * to apply it later, against the target's catalog of then.
 */
export interface QueuedOp {
  group: 'transfer' | 'copy-update' | 'copy-delete';
  /** `${mapping}>`: along the mapping to its target; `${mapping}<`: back to its source */
  link: string;
  kind?: UpdateKind;
  withValues?: boolean;
  /** the source form (schema.table) */
  form: string;
  requestId: string;
  /** the request ID of the target copy */
  targetKey: string;
  /** for a transfer the history the copy gets (with the new hop); else the sending copy's */
  history: string;
  /** the source copy as the change showed it, when the operation carries values */
  row: TextRow | null;
  modifiedAt?: string | null;
  current?: readonly [string, string] | null;
  master?: boolean | null;
  newHistory?: string | null;
  /** WAL position of the source change */
  lsn: string;
  /** what the source copy records once the operation is delivered */
  bookkeeping?: { op: 'transfer' | 'update' | 'return'; seen: SeenState };
  /**
   * Queued in a replay while the peer was down: its lane may have committed the source
   * transaction before. Settled when the peer is reached again, before the lane commits anything.
   */
  unsure?: { pool: string; finalLsn: string };
  /** settled: the lane had applied it; only the bookkeeping remains */
  applied?: boolean;
  /**
   * The change lacked some values (unchanged TOAST values, replica identity not full): the
   * delivery sends the source copy's current values instead (never older than the change).
   */
  refetch?: boolean;
}

/** An operation on its way to the queue, or read back from it. */
export interface PendingEntry {
  op: QueuedOp;
  type: OpType;
  mapping: MappingConfig;
  targetServer: string;
  /** schema.table on the target server */
  targetForm: string;
  /** pgdso.pending id once written */
  id?: string;
}

/** Operations of one kind on one request: a newer one supersedes an older one. */
export function supersedes(op: QueuedOp): string {
  return `${op.group}:${op.kind ?? ''}:${op.withValues ?? ''}:${op.link}`;
}

/** The queue's key of the target copy an operation acts on. */
export function requestKey(targetForm: string, targetKey: string): string {
  return `${targetForm}\u0000${targetKey}`;
}

/** The DSO operation type of a queued operation. */
export function opType(op: QueuedOp): OpType {
  if (op.group === 'transfer') return 'transfer';
  if (op.group === 'copy-delete') return 'delete';
  return op.kind === 'return' ? 'return' : 'update';
}

const SUPERSEDES_SQL = `concat_ws(':', p.payload ->> 'group', coalesce(p.payload ->> 'kind', ''),
  coalesce(p.payload ->> 'withValues', ''), p.payload ->> 'link')`;

/**
 * Writes a batch's operations for one target server, in order. The first operation of each
 * request in the batch drops the request's last queued one when it supersedes it.
 */
export async function enqueue(
  client: pg.ClientBase,
  entries: readonly PendingEntry[],
  status: { nextAttemptAt: Date; lastError: string | null },
): Promise<void> {
  if (entries.length === 0) return;
  const rows = entries.map((e, ord) => ({
    ord,
    pool: e.mapping.pool,
    type: e.type,
    mapping: e.mapping.name,
    form: e.op.form,
    request_id: e.op.requestId,
    target_server: e.targetServer,
    target_form: e.targetForm,
    target_key: e.op.targetKey,
    payload: e.op,
    source_lsn: e.op.lsn,
    sup: supersedes(e.op),
  }));
  await client.query(
    `WITH q AS (SELECT * FROM jsonb_to_recordset($1::jsonb) AS q(ord int, pool text, type text, mapping text, form text,
                  request_id text, target_server text, target_form text, target_key text, payload jsonb, source_lsn text, sup text)),
          firsts AS (SELECT DISTINCT ON (target_server, target_form, target_key) * FROM q
                      ORDER BY target_server, target_form, target_key, ord),
          lasts AS (SELECT f.sup, (SELECT l.id FROM pgdso.pending l
                                    WHERE l.target_server = f.target_server AND l.target_form = f.target_form
                                      AND l.target_key = f.target_key
                                    ORDER BY l.id DESC LIMIT 1) AS id
                      FROM firsts f),
          superseded AS (DELETE FROM pgdso.pending p USING lasts f WHERE p.id = f.id AND ${SUPERSEDES_SQL} = f.sup)
     INSERT INTO pgdso.pending (pool, type, mapping, form, request_id, target_server, target_form, target_key, payload, status,
                                attempts, next_attempt_at, last_error, source_lsn)
     SELECT pool, type, mapping, form, request_id, target_server, target_form, target_key, payload, 'queued',
            0, $2, $3, source_lsn::pg_lsn FROM q ORDER BY ord`,
    [JSON.stringify(rows), status.nextAttemptAt, status.lastError],
  );
}

/** The target copies with queued operations, per target server. */
export async function queuedRequests(client: pg.ClientBase): Promise<Map<string, Set<string>>> {
  const res = await client.query(`SELECT DISTINCT target_server, target_form, target_key FROM pgdso.pending`);
  const byServer = new Map<string, Set<string>>();
  for (const r of res.rows as { target_server: string; target_form: string; target_key: string }[]) {
    let keys = byServer.get(r.target_server);
    if (!keys) byServer.set(r.target_server, (keys = new Set()));
    keys.add(requestKey(r.target_form, r.target_key));
  }
  return byServer;
}

/** The next queued operations for a target server, oldest first. */
export async function nextQueued(
  client: pg.ClientBase,
  server: string,
  limit: number,
): Promise<{ id: string; op: QueuedOp; mapping: string }[]> {
  // ORDER BY p.id, the bigint: `id` alone would be the text output column, and "55" > "5499"
  const res = await client.query(
    `SELECT p.id::text AS id, p.payload, p.mapping FROM pgdso.pending p WHERE p.target_server = $1 ORDER BY p.id LIMIT $2`,
    [server, limit],
  );
  return res.rows.map((r: { id: string; payload: QueuedOp; mapping: string }) => ({ id: r.id, op: r.payload, mapping: r.mapping }));
}

/** Of these target copies, the ones that still have queued operations. */
export async function stillQueued(client: pg.ClientBase, server: string, keys: readonly [string, string][]): Promise<Set<string>> {
  if (keys.length === 0) return new Set();
  const res = await client.query(
    `SELECT DISTINCT k.form, k.key FROM jsonb_to_recordset($2::jsonb) AS k(form text, key text)
      WHERE EXISTS (SELECT 1 FROM pgdso.pending p WHERE p.target_server = $1 AND p.target_form = k.form AND p.target_key = k.key)`,
    [server, JSON.stringify(keys.map(([form, key]) => ({ form, key })))],
  );
  return new Set(res.rows.map((r: { form: string; key: string }) => requestKey(r.form, r.key)));
}

/**
 * A target server's delivery attempts (pgdso.pending_targets: one row per server, whatever the
 * length of its queue); `null` when it is reachable again.
 */
export async function recordAttempt(
  client: pg.ClientBase,
  server: string,
  attempt: { attempts: number; downSince: Date; nextAttemptAt: Date; error: string } | null,
): Promise<void> {
  if (!attempt) {
    await client.query(`DELETE FROM pgdso.pending_targets WHERE target_server = $1`, [server]);
    return;
  }
  await client.query(
    `INSERT INTO pgdso.pending_targets (target_server, attempts, down_since, next_attempt_at, last_error) VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (target_server) DO UPDATE SET attempts = EXCLUDED.attempts, down_since = EXCLUDED.down_since,
       next_attempt_at = EXCLUDED.next_attempt_at, last_error = EXCLUDED.last_error, updated_at = now()`,
    [server, attempt.attempts, attempt.downSince, attempt.nextAttemptAt, attempt.error],
  );
}

/** Removes delivered operations from the queue. */
export async function dequeue(client: pg.ClientBase, ids: readonly string[]): Promise<void> {
  if (ids.length) await client.query(`DELETE FROM pgdso.pending WHERE id = ANY ($1::bigint[])`, [ids]);
}

/** This server's queue identity (a target records per queue what it has committed). */
export async function queueIdentity(client: pg.ClientBase): Promise<string> {
  const res = await client.query(`SELECT queue::text FROM pgdso.queue_identity`);
  if (!res.rowCount) throw new Error('pgdso.queue_identity is empty: run pgdso migrate');
  return res.rows[0].queue;
}

/** On a target: the highest pending id of that queue it has committed. */
export async function deliveredUpTo(client: pg.ClientBase, queue: string): Promise<bigint> {
  const res = await client.query(`SELECT last_id::text FROM pgdso.pending_delivered WHERE queue = $1`, [queue]);
  return res.rowCount ? BigInt(res.rows[0].last_id) : 0n;
}

/** On a target, in the delivery's transaction: what it now holds of that queue. */
export async function markDelivered(client: pg.ClientBase, queue: string, sourceServer: string, lastId: string): Promise<void> {
  await client.query(
    `INSERT INTO pgdso.pending_delivered (queue, source_server, last_id) VALUES ($1, $2, $3)
     ON CONFLICT (queue) DO UPDATE SET last_id = greatest(pgdso.pending_delivered.last_id, EXCLUDED.last_id),
       source_server = EXCLUDED.source_server, updated_at = now()`,
    [queue, sourceServer, lastId],
  );
}

/** The failure of a queued operation, with the operation itself for a retry. */
export function withOp(failure: ApplyFailure, entry: PendingEntry | undefined): ApplyFailure {
  if (!entry) return failure;
  return { ...failure, payload: { ...failure.payload, op: entry.op, targetForm: entry.targetForm, targetKey: entry.op.targetKey } };
}
