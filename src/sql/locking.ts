// DDL on a live form: one transaction under `SET LOCAL lock_timeout`, retried a few times. A
// lock that cannot be had in time is given up (so the application's own queries, queued behind
// the waiting lock request, wait at most that long), and the sessions in the way are named.
import { setTimeout as delay } from 'node:timers/promises';
import type pg from 'pg';

export interface LockOptions {
  /** how long one attempt waits for a lock */
  lockTimeoutMs: number;
  /** attempts before giving up */
  attempts: number;
}

export const DEFAULT_LOCK: LockOptions = { lockTimeoutMs: 5000, attempts: 3 };

/** The lock could not be had: nothing was changed. Exit 1. */
export class LockTimeoutError extends Error {}

/** `5s`, `500ms` or a number of milliseconds. */
export function parseDuration(text: string): number | null {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$/.exec(text);
  if (!m) return null;
  const ms = Number(m[1]) * (m[2] === 's' ? 1000 : 1);
  return ms >= 1 ? Math.round(ms) : null;
}

export interface Blocker {
  pid: number;
  user: string | null;
  application: string | null;
  state: string | null;
  xactStart: Date | null;
  query: string | null;
  mode: string;
  granted: boolean;
}

/** The other sessions that hold or wait for a lock on the form or any of its partitions. */
export async function blockersOf(client: pg.ClientBase, form: { schema: string; table: string }): Promise<Blocker[]> {
  const res = await client.query(
    `SELECT l.pid, a.usename, a.application_name, a.state, a.xact_start, a.query,
            string_agg(DISTINCT l.mode, ', ') AS mode, bool_and(l.granted) AS granted
       FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'relation' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND (l.relation = format('%I.%I', $1::text, $2::text)::regclass
             OR l.relation IN (SELECT relid FROM pg_partition_tree(format('%I.%I', $1::text, $2::text)::regclass)))
        AND l.pid <> pg_backend_pid()
      GROUP BY l.pid, a.usename, a.application_name, a.state, a.xact_start, a.query
      ORDER BY a.xact_start NULLS LAST`,
    [form.schema, form.table],
  );
  return res.rows.map((r) => ({
    pid: r.pid,
    user: r.usename,
    application: r.application_name,
    state: r.state,
    xactStart: r.xact_start,
    query: r.query,
    mode: r.mode,
    granted: r.granted,
  }));
}

export function describeBlocker(b: Blocker): string {
  const query = b.query ? (b.query.length > 200 ? `${b.query.slice(0, 200)}...` : b.query) : '';
  const since = b.xactStart ? `, transaction since ${new Date(b.xactStart).toISOString()}` : '';
  return (
    `pid ${b.pid} (user ${b.user ?? '?'}, application_name "${b.application ?? ''}", state ${b.state ?? '?'}${since}, ` +
    `${b.granted ? 'holds' : 'waits for'} ${b.mode}): ${JSON.stringify(query)}`
  );
}

/**
 * Runs `work` in a transaction with `SET LOCAL lock_timeout`; a lock timeout (55P03) rolls it
 * back and tries again, up to `attempts` times, then throws a LockTimeoutError that names the
 * sessions in the way. Any other error rolls back and is thrown as it is.
 */
export async function withLockTimeout(
  client: pg.ClientBase,
  form: { schema: string; table: string },
  opts: LockOptions,
  work: () => Promise<void>,
): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    await client.query('BEGIN');
    try {
      await client.query(`SET LOCAL lock_timeout = ${Math.round(opts.lockTimeoutMs)}`);
      await work();
      await client.query('COMMIT');
      return;
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      if ((err as { code?: string }).code !== '55P03') throw err;
      if (attempt >= opts.attempts) {
        const blockers = await blockersOf(client, form);
        throw new LockTimeoutError(
          `could not lock ${form.schema}.${form.table} within ${opts.lockTimeoutMs} ms (${attempt} attempts); nothing was changed. ` +
            (blockers.length
              ? `In the way: ${blockers.map(describeBlocker).join('; ')}. ` +
                'End those transactions (or wait for them) and run the command again, or give it longer with --lock-timeout.'
              : 'No session holds a lock on it any more: run the command again.'),
          { cause: err },
        );
      }
      await delay(Math.min(1000, opts.lockTimeoutMs / 5) * attempt * (0.5 + Math.random()));
    }
  }
}
