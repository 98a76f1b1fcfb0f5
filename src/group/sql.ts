// The SQL of a server group, as pure builders returning { text, values }: the board (join,
// heartbeat, stop), the ranking, the owners of the operations with their fencing terms, the
// events, and the coordinator's lock. Times are the database's (now()), never an instance's.
import { LOCK_NAMESPACE, LOCKS, OPERATIONS, type Operation } from '../sql/identifiers.ts';

export interface Sql {
  text: string;
  values: unknown[];
}

export { OPERATIONS, type Operation };

/** The channel of a server's group: 'owners', 'request', 'rules' (the board is the durable record). */
export const GROUP_CHANNEL = 'pgdso_group';

export interface Member {
  instanceId: string;
  server: string;
  host: string;
  pid: number;
}

/** Puts the instance on the board, online, running nothing yet. */
export function joinBoard(m: Member, httpPort: number | null): Sql {
  return {
    text: `INSERT INTO pgdso.servgrp_board (instance_id, server_name, host, pid, state, operations, started_at, last_seen_at, http_port)
           VALUES ($1, $2, $3, $4, 'online', '{}', now(), now(), $5)
           ON CONFLICT (instance_id) DO UPDATE SET server_name = $2, host = $3, pid = $4, state = 'online', operations = '{}',
             pending_signals = '{}', started_at = now(), last_seen_at = now(), http_port = $5,
             last_error = NULL, last_error_fix = NULL, last_error_at = NULL`,
    values: [m.instanceId, m.server, m.host, m.pid, httpPort],
  };
}

/**
 * Ranks a joining instance for every operation: `--rank N` when given (it also changes an
 * existing rank); otherwise 1 for the first instance of the server and null (last) for a later
 * one, so adding an instance never moves an operation. Run under the groupJoin lock.
 */
export function joinRanking(instanceId: string, rank: number | null, threshold: number): Sql {
  return {
    text: `INSERT INTO pgdso.servgrp_ranking (operation, instance_id, rank, delinquent_threshold)
           SELECT op, $1, CASE WHEN $2::int IS NOT NULL THEN $2::int
                               WHEN NOT EXISTS (SELECT 1 FROM pgdso.servgrp_ranking r
                                                 WHERE r.operation = op AND r.instance_id <> $1) THEN 1 END, $3
             FROM unnest($4::text[]) AS op
           ON CONFLICT (operation, instance_id) DO UPDATE
             SET rank = CASE WHEN $2::int IS NOT NULL THEN $2::int ELSE servgrp_ranking.rank END, delinquent_threshold = $3`,
    values: [instanceId, rank, threshold, OPERATIONS],
  };
}

export const groupJoinLock: Sql = { text: 'SELECT pg_advisory_xact_lock($1, $2)', values: [LOCK_NAMESPACE, LOCKS.groupJoin] };

/** Sets the rank of one instance for some operations (`pgdso group rank`). */
export function setRank(instanceId: string, operations: readonly Operation[], rank: number | null): Sql {
  return {
    text: `INSERT INTO pgdso.servgrp_ranking (operation, instance_id, rank) SELECT op, $1, $2 FROM unnest($3::text[]) AS op
           ON CONFLICT (operation, instance_id) DO UPDATE SET rank = $2 RETURNING operation`,
    values: [instanceId, rank, operations],
  };
}

/**
 * One heartbeat: the interval count rises, the board shows what the instance runs now, and the
 * signals left for it are taken. Null when its row is gone (it joins again). `count`: false while
 * the heartbeat thread counts the intervals.
 */
export function heartbeat(instanceId: string, operations: readonly string[], ruleVersion: number | null, count = true): Sql {
  return {
    text: `WITH old AS (SELECT instance_id, pending_signals FROM pgdso.servgrp_board WHERE instance_id = $1 FOR UPDATE)
           UPDATE pgdso.servgrp_board b SET interval_count = b.interval_count + CASE WHEN $4 THEN 1 ELSE 0 END,
                  last_seen_at = now(), state = 'online',
                  operations = $2, rule_version = $3, pending_signals = '{}'
             FROM old WHERE b.instance_id = old.instance_id RETURNING old.pending_signals AS signals`,
    values: [instanceId, operations, ruleVersion, count],
  };
}

/** A clean stop: nothing runs here any more; the coordinator hands the operations on at once. */
export function leaveBoard(instanceId: string): Sql {
  return {
    text: `UPDATE pgdso.servgrp_board SET state = 'stopped', operations = '{}', last_seen_at = now() WHERE instance_id = $1`,
    values: [instanceId],
  };
}

export interface OwnerRow {
  operation: Operation;
  instanceId: string | null;
  term: number;
}

/** Every operation has its row in servgrp_owners (null owner until the first decision). */
export const ensureOwnerRows: Sql = {
  text: `INSERT INTO pgdso.servgrp_owners (operation) SELECT unnest($1::text[]) ON CONFLICT (operation) DO NOTHING`,
  values: [OPERATIONS],
};

export const readOwners: Sql = {
  text: `SELECT operation, instance_id AS "instanceId", term::int AS term FROM pgdso.servgrp_owners ORDER BY operation`,
  values: [],
};

// ---- the coordinator ------------------------------------------------------------------------

export const tryCoordinatorLock: Sql = {
  text: 'SELECT pg_try_advisory_lock($1, $2) AS ok',
  values: [LOCK_NAMESPACE, LOCKS.coordinator],
};

/** The backend holding the coordinator's lock, with its application_name (it names the instance). */
export const coordinatorHolder: Sql = {
  text: `SELECT l.pid, a.application_name AS name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::oid AND l.objid = $2::oid AND l.objsubid = 2
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
  values: [LOCK_NAMESPACE, LOCKS.coordinator],
};

/** Online instances whose interval count has not risen for `threshold` intervals become delinquent. */
export function markDelinquent(intervalSeconds: number, threshold: number): Sql {
  return {
    text: `UPDATE pgdso.servgrp_board SET state = 'delinquent'
            WHERE state = 'online' AND last_seen_at < now() - make_interval(secs => $1::float8 * $2::int) RETURNING instance_id`,
    values: [intervalSeconds, threshold],
  };
}

/** True when the instance's last heartbeat is older than `threshold` intervals (database time). */
export function isSilent(instanceId: string, intervalSeconds: number, threshold: number): Sql {
  return {
    text: `SELECT coalesce((SELECT last_seen_at < now() - make_interval(secs => $2::float8 * $3::int) OR state <> 'online'
                             FROM pgdso.servgrp_board WHERE instance_id = $1), true) AS silent`,
    values: [instanceId, intervalSeconds, threshold],
  };
}

export interface Candidate {
  operation: Operation;
  instanceId: string;
  rank: number | null;
}

/** Online instances per operation, best first (lower rank; null last; then the longest running). */
export const candidates: Sql = {
  text: `SELECT r.operation, r.instance_id AS "instanceId", r.rank FROM pgdso.servgrp_ranking r
           JOIN pgdso.servgrp_board b ON b.instance_id = r.instance_id
          WHERE b.state = 'online' ORDER BY r.operation, r.rank NULLS LAST, b.started_at, b.instance_id`,
  values: [],
};

/** The current owners, locked for the decision, with their board state. */
export const currentOwners: Sql = {
  text: `SELECT o.operation, o.instance_id AS "instanceId", o.term::int AS term, b.state,
                (SELECT r.rank FROM pgdso.servgrp_ranking r WHERE r.operation = o.operation AND r.instance_id = o.instance_id) AS rank
           FROM pgdso.servgrp_owners o LEFT JOIN pgdso.servgrp_board b ON b.instance_id = o.instance_id
          ORDER BY o.operation FOR UPDATE OF o`,
  values: [],
};

export const EVENT = { failover: 1, relinquish: 2, takeover: 3 } as const;

/** A change of owner: the term rises, and the event is recorded in the same transaction. */
export function assignOwner(operation: Operation, newOwner: string | null, oldOwner: string | null, type: number): Sql {
  return {
    text: `WITH o AS (UPDATE pgdso.servgrp_owners SET instance_id = $2, term = term + 1, assigned_at = now()
                      WHERE operation = $1 RETURNING term)
           INSERT INTO pgdso.servgrp_events (type, operation, new_owner, old_owner, term, at) SELECT $4, $1, $2, $3, o.term, now() FROM o
           RETURNING term::int AS term`,
    values: [operation, newOwner, oldOwner, type],
  };
}

export function notify(payload: 'owners' | 'request' | 'rules'): Sql {
  return { text: 'SELECT pg_notify($1, $2)', values: [GROUP_CHANNEL, payload] };
}
