// Fencing: only the owner of an operation writes for it, whatever the timing. The owner's term
// (pgdso.servgrp_owners, raised at every change of owner) is carried on every write: an apply
// lane raises its row of pgdso.apply_progress to its term when it opens and checks it in every
// transaction it commits, so a lane with an older term (a frozen or cut-off former owner) fails
// in the database. The new owner also terminates what the former one still holds: its lanes
// (same lane name), the slot's walsender, the operation's advisory lock.
import type pg from 'pg';
import type { Logger } from 'pino';
import { setTimeout as delay } from 'node:timers/promises';
import { LOCK_NAMESPACE, LOCKS, type Operation } from './identifiers.ts';

export interface Fence {
  instanceId: string;
  term: number;
}

/** A write refused because a newer owner of the operation has written since. */
export class FencedError extends Error {
  constructor(what: string) {
    super(`${what}: a newer owner of the operation has taken over (fenced); this instance writes nothing more`);
    this.name = 'FencedError';
  }
}

export function isFenced(err: unknown): boolean {
  return err instanceof FencedError || (err instanceof Error && err.name === 'FencedError');
}

/** The application_name of a lane's connection: the lane, then the instance. */
export function laneApplicationName(lane: string, fence: Fence | undefined): string {
  return fence ? `pgdso apply ${lane} ${fence.instanceId}` : `pgdso apply ${lane}`;
}

/** Terminates the other connections of the same lane (a former owner's); returns how many. */
export async function terminateLane(client: pg.ClientBase, lane: string): Promise<number> {
  const res = await client.query(
    `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
      WHERE datname = current_database() AND pid <> pg_backend_pid() AND left(application_name, length($1)) = $1`,
    [`pgdso apply ${lane} `],
  );
  return res.rowCount ?? 0;
}

/**
 * Raises the lane's term in pgdso.apply_progress: from then on a commit with an older term
 * fails. Refused (FencedError) when a newer term has written already. A row lock held by a
 * former owner's open transaction is freed by terminating it.
 */
export async function raiseLaneTerm(client: pg.ClientBase, origin: string, lane: string, fence: Fence): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await client.query('BEGIN');
      await client.query(`SET LOCAL lock_timeout = '2s'`);
      const res = await client.query(
        `INSERT INTO pgdso.apply_progress (origin, source_lsn, term, instance_id, updated_at) VALUES ($1, '0/0', $2, $3, now())
         ON CONFLICT (origin) DO UPDATE SET term = EXCLUDED.term, instance_id = EXCLUDED.instance_id
          WHERE apply_progress.term <= EXCLUDED.term
         RETURNING 1`,
        [origin, fence.term, fence.instanceId],
      );
      await client.query('COMMIT');
      if (!res.rowCount) throw new FencedError(`lane ${lane} (term ${fence.term})`);
      return;
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      if ((err as { code?: string }).code !== '55P03' || attempt >= 5) throw err;
      await terminateLane(client, lane);
    }
  }
}

/** In a lane's open transaction, before COMMIT: the lane still writes with the current term. */
export async function checkLaneTerm(client: pg.ClientBase, origin: string, lane: string, fence: Fence): Promise<void> {
  const res = await client.query(`UPDATE pgdso.apply_progress SET updated_at = now() WHERE origin = $1 AND term = $2`, [
    origin,
    fence.term,
  ]);
  if (!res.rowCount) throw new FencedError(`lane ${lane} (term ${fence.term})`);
}

/** Sets the replication origin up for this session, waiting for a terminated holder to be gone. */
export async function setupOrigin(
  client: pg.ClientBase,
  origin: string,
  lane: string,
  fence: Fence | undefined,
  log?: Logger,
): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await client.query('SELECT pg_replication_origin_session_setup($1)', [origin]);
      return;
    } catch (err) {
      // 55006 (object in use): the origin is active for another PID, a former owner's lane that is
      // exiting or frozen; 55000: its replication state is not released yet
      const code = (err as { code?: string }).code;
      if (!fence || (code !== '55006' && code !== '55000') || attempt >= 50) throw err;
      log?.debug({ lane, origin, attempt }, "the lane's origin is still active in a former owner's session: waiting for it");
      await terminateLane(client, lane);
      await delay(100);
    }
  }
}

/** The owner's session checks that it still owns the operation with this term. */
export async function assertOwner(client: pg.ClientBase, operation: Operation, fence: Fence): Promise<void> {
  const res = await client.query(`SELECT 1 FROM pgdso.servgrp_owners WHERE operation = $1 AND instance_id = $2 AND term = $3`, [
    operation,
    fence.instanceId,
    fence.term,
  ]);
  if (!res.rowCount) throw new FencedError(`the ${operation} operation (term ${fence.term})`);
}

const LOCK_OF: Record<Operation, number> = { dso: LOCKS.operationDso, escalation: LOCKS.operationEscalation, admin: LOCKS.operationAdmin };

/**
 * Takes the operation's advisory lock on the owner's connection: a former owner that still holds
 * it (frozen, or cut off from here only) has its connection terminated. False if aborted.
 */
export async function takeOperationLock(client: pg.ClientBase, operation: Operation, signal: AbortSignal): Promise<boolean> {
  while (!signal.aborted) {
    const got = await client.query('SELECT pg_try_advisory_lock($1, $2) AS ok', [LOCK_NAMESPACE, LOCK_OF[operation]]);
    if (got.rows[0].ok === true) return true;
    await client.query(
      `SELECT pg_terminate_backend(l.pid) FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::oid AND l.objid = $2::oid AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND l.pid <> pg_backend_pid()`,
      [LOCK_NAMESPACE, LOCK_OF[operation]],
    );
    await delay(100, undefined, { signal }).catch(() => {});
  }
  return false;
}

/** Waits until this connection holds the operation's lock (no server group: a second engine waits); false if aborted. */
export async function waitForOperationLock(
  client: pg.ClientBase,
  operation: Operation,
  signal: AbortSignal,
  pollMs = 1000,
  onWait?: () => void,
): Promise<boolean> {
  while (!signal.aborted) {
    const got = await client.query('SELECT pg_try_advisory_lock($1, $2) AS ok', [LOCK_NAMESPACE, LOCK_OF[operation]]);
    if (got.rows[0].ok === true) return true;
    onWait?.();
    await delay(pollMs, undefined, { signal }).catch(() => {});
  }
  return false;
}

/** Terminates the walsender of a former owner that still streams the slot. */
export async function freeSlot(client: pg.ClientBase, slot: string): Promise<boolean> {
  const res = await client.query(
    `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
      WHERE slot_name = $1 AND active_pid IS NOT NULL AND active_pid <> pg_backend_pid()`,
    [slot],
  );
  return (res.rowCount ?? 0) > 0;
}
