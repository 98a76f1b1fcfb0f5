// The operation locks of a server: only the instance holding a server's `dso` lock decodes its
// slot. Session advisory locks on one pinned connection, held for the connection's life.
import type pg from 'pg';
import { setTimeout as delay } from 'node:timers/promises';
import { LOCK_NAMESPACE, LOCKS } from '../sql/identifiers.ts';

export type Operation = 'dso' | 'escalation' | 'admin';
const LOCK_OF: Record<Operation, number> = { dso: LOCKS.operationDso, escalation: LOCKS.operationEscalation, admin: LOCKS.operationAdmin };

export function tryLockOperation(client: pg.ClientBase, operation: Operation): Promise<boolean> {
  return client.query('SELECT pg_try_advisory_lock($1, $2) AS ok', [LOCK_NAMESPACE, LOCK_OF[operation]]).then((r) => r.rows[0].ok === true);
}

/** Waits until this connection holds the operation's lock; false if `signal` aborted first. */
export async function waitForOperationLock(
  client: pg.ClientBase,
  operation: Operation,
  signal: AbortSignal,
  pollMs = 1000,
  onWait?: () => void,
): Promise<boolean> {
  while (!signal.aborted) {
    if (await tryLockOperation(client, operation)) return true;
    onWait?.();
    await delay(pollMs, undefined, { signal }).catch(() => {});
  }
  return false;
}
