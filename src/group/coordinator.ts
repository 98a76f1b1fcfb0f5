// The coordinator of a server group: the instance holding the coordinator's advisory lock on its
// pinned control connection. Each interval it marks silent instances delinquent, hands each
// operation to its best live instance (raising the operation's fencing term), and routes the
// requests waiting for an owner. An instance that is not the coordinator takes the lock when it
// is free, and frees it from a coordinator that stopped heartbeating (frozen, cut off) by
// terminating its connection.
import type pg from 'pg';
import type { Logger } from 'pino';
import type { GroupConfig } from '../config/types.ts';
import { decide, type CurrentOwner } from './ownership.ts';
import { failOrphaned, routeRequests } from './requests.ts';
import {
  assignOwner,
  candidates,
  coordinatorHolder,
  currentOwners,
  ensureOwnerRows,
  isSilent,
  markDelinquent,
  notify,
  tryCoordinatorLock,
  type Candidate,
} from './sql.ts';

/** application_name of an instance's control connection: the coordinator is found by it. */
export const CONTROL_NAME_PREFIX = 'pgdso group ';

export function controlName(instanceId: string): string {
  return `${CONTROL_NAME_PREFIX}${instanceId}`;
}

/**
 * Tries to become the coordinator: true when this connection holds the lock. A holder whose
 * instance has not heartbeaten for the delinquent threshold is terminated (its lock is freed;
 * this instance takes it at its next try).
 */
export async function tryCoordinate(client: pg.ClientBase, group: GroupConfig, log: Logger): Promise<boolean> {
  const got = await client.query(tryCoordinatorLock.text, tryCoordinatorLock.values);
  if (got.rows[0].ok === true) return true;
  const holder = (await client.query(coordinatorHolder.text, coordinatorHolder.values)).rows[0] as
    | { pid: number; name: string }
    | undefined;
  if (!holder?.name?.startsWith(CONTROL_NAME_PREFIX)) return false;
  const instanceId = holder.name.slice(CONTROL_NAME_PREFIX.length);
  const silent = isSilent(instanceId, group.checkIntervalSeconds, group.delinquentThreshold);
  if ((await client.query(silent.text, silent.values)).rows[0].silent !== true) return false;
  log.warn({ coordinator: instanceId, pid: holder.pid }, 'the coordinator stopped heartbeating: its connection is terminated');
  await client.query('SELECT pg_terminate_backend($1)', [holder.pid]);
  return false;
}

export interface CoordinationResult {
  delinquent: string[];
  decisions: ReturnType<typeof decide>;
  routed: number;
}

/** One round of the coordinator, in one transaction. */
export async function coordinate(client: pg.ClientBase, group: GroupConfig, server: string, log: Logger): Promise<CoordinationResult> {
  await client.query('BEGIN');
  try {
    await client.query(`SET LOCAL lock_timeout = '5s'`);
    await client.query(ensureOwnerRows.text, ensureOwnerRows.values);
    const marked = markDelinquent(group.checkIntervalSeconds, group.delinquentThreshold);
    const delinquent = (await client.query(marked.text, marked.values)).rows.map((r) => r.instance_id as string);
    const current = (await client.query(currentOwners.text, currentOwners.values)).rows as CurrentOwner[];
    const ranked = (await client.query(candidates.text, candidates.values)).rows as Candidate[];
    const decisions = decide(current, ranked);
    for (const d of decisions) {
      const assign = assignOwner(d.operation, d.newOwner, d.oldOwner, d.type);
      const term = (await client.query(assign.text, assign.values)).rows[0]?.term;
      log.info({ operation: d.operation, newOwner: d.newOwner, oldOwner: d.oldOwner, term, event: d.type }, eventText(d.type, server));
    }
    await failOrphaned(client);
    const routed = await routeRequests(client, server);
    if (decisions.length || delinquent.length) await client.query(notify('owners').text, notify('owners').values);
    if (routed) await client.query(notify('request').text, notify('request').values);
    await client.query('COMMIT');
    for (const id of delinquent) log.warn({ instance: id }, `instance ${id} of ${server} is delinquent (no heartbeat)`);
    return { delinquent, decisions, routed };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  }
}

function eventText(type: number, server: string): string {
  if (type === 1) return `failover: the operation of ${server} moves to the next ranked instance`;
  if (type === 2) return `relinquish: a better-ranked instance of ${server} takes the operation back`;
  return `takeover: an instance of ${server} takes the operation`;
}
