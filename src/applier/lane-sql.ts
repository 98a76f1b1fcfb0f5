// The statements an apply lane runs for itself: opening its session (the replication origin,
// the owner's term, the progress recorded so far), recording a source position, and the
// transaction's ends. ApplyLane (lane.ts) decides when they run.
import type pg from 'pg';
import type { Logger } from 'pino';
import { formatLsn, parseLsn } from '../change.ts';
import { sqlstateOf } from './errors.ts';
import { raiseLaneTerm, setupOrigin, terminateLane, type Fence } from '../sql/fencing.ts';

// a deferred constraint must fail its statement (where the bad row can be isolated), not the
// commit (one round trip for both)
export const BEGIN = 'BEGIN; SET CONSTRAINTS ALL IMMEDIATE';

/**
 * Sets the lane's session up on a new connection: its origin (created if needed), with a fence
 * its term first (an older one is refused here, before it disturbs anything: from now on a
 * former owner's commits fail, then its connections go, freeing the origin). Returns the source
 * position the lane has committed.
 */
export async function openLaneSession(
  client: pg.ClientBase,
  origin: string,
  name: string,
  fence: Fence | undefined,
  log: Logger,
): Promise<bigint> {
  const exists = await client.query('SELECT 1 FROM pg_replication_origin WHERE roname = $1', [origin]);
  if (exists.rowCount === 0) {
    await client.query('SELECT pg_replication_origin_create($1)', [origin]).catch((err) => {
      if ((err as { code?: string }).code !== '23505') throw err; // created meanwhile
    });
  }
  if (fence) {
    await raiseLaneTerm(client, origin, name, fence);
    await terminateLane(client, name);
  }
  await setupOrigin(client, origin, name, fence, log);
  const progress = await client.query(`SELECT source_lsn::text AS lsn FROM pgdso.apply_progress WHERE origin = $1`, [origin]);
  return progress.rowCount ? parseLsn(progress.rows[0].lsn) : 0n;
}

/**
 * The statement that records a source position as the origin's progress; with a fence, it
 * updates a row only under the lane's term (a row count of 0: a newer owner has written).
 */
export function progressStatement(origin: string, fence: Fence | undefined, finalLsn: bigint, commitTime: Date): pg.QueryConfig {
  if (fence)
    // the row exists (open raised its term): a former owner's term updates nothing
    return {
      text: `UPDATE pgdso.apply_progress SET source_lsn = $2::text::pg_lsn, source_commit_time = $3, updated_at = now()
              WHERE origin = $1 AND term = $4`,
      values: [origin, formatLsn(finalLsn), commitTime, fence.term],
    };
  return {
    text: `INSERT INTO pgdso.apply_progress (origin, source_lsn, source_commit_time, updated_at) VALUES ($1, $2::text::pg_lsn, $3, now())
           ON CONFLICT (origin) DO UPDATE
              SET source_lsn = EXCLUDED.source_lsn, source_commit_time = EXCLUDED.source_commit_time, updated_at = now()`,
    values: [origin, formatLsn(finalLsn), commitTime],
  };
}

/**
 * Runs `work` (a transaction of its own) again after a deadlock or serialization failure (40P01,
 * 40001: the server's own users lock the same rows), up to `attempts` times; the retries it took.
 */
export async function retryingLockConflicts(work: () => Promise<unknown>, attempts: number, log: Logger, lane: string): Promise<number> {
  for (let attempt = 1; ; attempt++) {
    try {
      await work();
      return attempt - 1;
    } catch (err) {
      const sqlstate = sqlstateOf(err);
      if ((sqlstate !== '40P01' && sqlstate !== '40001') || attempt >= attempts) throw err;
      log.info(
        { lane, sqlstate, attempt },
        'transaction rolled back by a lock conflict (deadlock or serialization failure): running it again',
      );
    }
  }
}

/** COMMIT, refusing the ROLLBACK that PostgreSQL answers for a transaction that failed. */
export async function commitChecked(client: pg.ClientBase): Promise<void> {
  const res = await client.query('COMMIT');
  if (res.command !== 'COMMIT') throw new Error(`the transaction was rolled back at COMMIT (${res.command})`);
}

/**
 * pg's pipeline mode (each query written at once, the results read in order), switched on and
 * off between queries, with none under way: COPY (pg-copy-streams) runs only outside it.
 */
export function setPipeline(client: pg.Client, on: boolean): void {
  (client as unknown as { pipeline: boolean }).pipeline = on;
}

const names = new Map<string, string>();

/**
 * The statement under a name of its own (one per distinct text in this process): the server
 * parses it once per connection (plan_cache_mode=force_custom_plan still plans each run with
 * its values: a generic plan of unnest() guesses 100 rows, and scans a growing table whole).
 */
export function named(query: pg.QueryConfig): pg.QueryConfig {
  let name = names.get(query.text);
  if (name === undefined) names.set(query.text, (name = `pgdso_${names.size + 1}`));
  return { ...query, name };
}
