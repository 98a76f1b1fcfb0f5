// The pending queue's administration: which rows a command selects, the SQL that lists, retries
// and discards them, and the retry itself (run by `pgdso pending retry` in-process, or by the
// owner of the dso operation when a group runs). Every change ends with NOTIFY pgdso_pending, on
// which a running engine reads its queue again and tries those peers.
import type pg from 'pg';
import { LOCK_NAMESPACE, LOCKS } from '../sql/identifiers.ts';

/** The channel a running engine listens on. */
export const PENDING_CHANNEL = 'pgdso_pending';

export type Selection = { by: 'id'; id: string } | { by: 'mapping'; mapping: string } | { by: 'all' };

export interface Query {
  text: string;
  values: unknown[];
}

/** The WHERE clause of a selection (its value is $1), on the columns of `table` when given. */
export function whereOf(selection: Selection | null, table?: string): Query {
  const column = (name: string) => (table ? `${table}.${name}` : name);
  if (!selection || selection.by === 'all') return { text: 'true', values: [] };
  if (selection.by === 'id') return { text: `${column('id')} = $1::bigint`, values: [selection.id] };
  return { text: `${column('mapping')} = $1`, values: [selection.mapping] };
}

const COMMON_COLUMNS = `id::text, type, mapping, form, request_id, target_server, target_form, target_key, pool, status, attempts,
  next_attempt_at, last_error, source_lsn::text, created_at, payload`;

/**
 * The queue, with the delivery attempts of each target server: the engine counts them per
 * server in pgdso.pending_targets (while the server cannot be reached), not per row.
 */
export function listQueuedSql(selection: Selection | null): Query {
  const where = whereOf(selection, 'p');
  return {
    text: `SELECT p.id::text, p.type, p.mapping, p.form, p.request_id, p.target_server, p.target_form, p.target_key, p.pool, p.status,
                  coalesce(t.attempts, p.attempts) AS attempts, coalesce(t.next_attempt_at, p.next_attempt_at) AS next_attempt_at,
                  coalesce(t.last_error, p.last_error) AS last_error, t.down_since, p.source_lsn::text, p.created_at, p.payload
             FROM pgdso.pending p LEFT JOIN pgdso.pending_targets t ON t.target_server = p.target_server
            WHERE ${where.text} ORDER BY p.id`,
    values: where.values,
  };
}

export function listErrorsSql(selection: Selection | null): Query {
  const where = whereOf(selection);
  return {
    text: `SELECT ${COMMON_COLUMNS}, error, sqlstate, failed_at, payload ? 'op' AS retryable
             FROM pgdso.pending_errors e WHERE ${where.text} ORDER BY e.id`,
    values: where.values,
  };
}

/**
 * Moves the selected failed operations that carry their operation back into the queue, in id
 * order (the queue delivers in id order), and removes them from pending_errors.
 */
export function retryErrorsSql(selection: Selection): Query {
  const where = whereOf(selection);
  return {
    text: `WITH moved AS (DELETE FROM pgdso.pending_errors e WHERE ${where.text} AND e.payload ? 'op' RETURNING e.*)
      INSERT INTO pgdso.pending (pool, type, mapping, form, request_id, target_server, target_form, target_key, payload,
                                 status, attempts, next_attempt_at, last_error, source_lsn)
      SELECT pool, type, mapping, form, request_id, target_server,
             coalesce(target_form, payload ->> 'targetForm'), coalesce(target_key, payload ->> 'targetKey'),
             payload -> 'op', 'queued', 0, now(), error, source_lsn
        FROM moved ORDER BY id
      RETURNING id::text`,
    values: where.values,
  };
}

/** The selected failed operations that cannot be sent again (no operation in their payload). */
export function notRetryableSql(selection: Selection): Query {
  const where = whereOf(selection);
  return {
    text: `SELECT id::text, mapping, request_id, error FROM pgdso.pending_errors e
            WHERE ${where.text} AND NOT (payload ? 'op') ORDER BY e.id`,
    values: where.values,
  };
}

/**
 * Queued operations due now, and their target servers' next attempt (pgdso.pending_targets, the
 * record of a running engine's backoff): on the NOTIFY, the engine tries those servers at once.
 */
export function retryQueuedSql(selection: Selection): Query {
  const where = whereOf(selection);
  return {
    text: `WITH due AS (UPDATE pgdso.pending SET next_attempt_at = now() WHERE ${where.text} RETURNING id, target_server),
                targets AS (UPDATE pgdso.pending_targets t SET next_attempt_at = now(), updated_at = now()
                             WHERE t.target_server IN (SELECT target_server FROM due) AND t.next_attempt_at > now())
           SELECT id::text FROM due ORDER BY due.id`,
    values: where.values,
  };
}

export function discardSql(table: 'pending' | 'pending_errors', selection: Selection): Query {
  const where = whereOf(selection);
  return { text: `DELETE FROM pgdso.${table} WHERE ${where.text} RETURNING id::text`, values: where.values };
}

export const NOTIFY_SQL = `NOTIFY ${PENDING_CHANNEL}`;

export async function inTransaction<T>(client: pg.Client, work: () => Promise<T>): Promise<T> {
  await client.query('BEGIN');
  try {
    const result = await work();
    await client.query('COMMIT');
    return result;
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  }
}

export interface RetryOutcome {
  /** --queued: the queued operations made due now */
  ids: string[];
  /** failed operations moved back into the queue, and those that cannot be retried */
  moved: number;
  left: { id: string; mapping: string | null; request_id: string | null; error: string }[];
}

/** The retry itself, on a connection to the server: run in-process or by the owner of dso. */
export async function retryPending(client: pg.Client, selection: Selection, queued: boolean): Promise<RetryOutcome> {
  if (queued) {
    const ids = await inTransaction(client, async () => {
      const res = await client.query(retryQueuedSql(selection));
      if (res.rowCount) await client.query(NOTIFY_SQL);
      return res.rows.map((r: { id: string }) => r.id);
    });
    return { ids, moved: 0, left: [] };
  }
  return inTransaction(client, async () => {
    // not while the engine delivers a chunk: the queue's ids must become visible in their
    // order (a delivery records the highest id it holds; a lower id committed after it would be skipped)
    await client.query('SELECT pg_advisory_xact_lock($1, $2)', [LOCK_NAMESPACE, LOCKS.queueDelivery]);
    const res = await client.query(retryErrorsSql(selection));
    const left = (await client.query(notRetryableSql(selection))).rows as RetryOutcome['left'];
    // delivered at commit: the engine reads the queue again and sends them
    if (res.rowCount) await client.query(NOTIFY_SQL);
    return { ids: [], moved: res.rowCount ?? 0, left };
  });
}
