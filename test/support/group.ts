// Server groups in tests: several `pgdso run` instances serving one server, and what a DBA reads
// of them on the server: the board (heartbeats, state, what each instance runs), the ranking, the
// owner of each operation with its fencing term, the failover events, the backends an instance
// holds (every connection's application_name names its instance), and an audit of the writes on
// a peer that says which instance wrote each row.
import type { CliResult, DsoEnv, EngineProcess } from './dso.ts';
import { AUDIT_SQL } from './faults.ts';
import { waitFor } from './wait.ts';

export type Operation = 'dso' | 'escalation' | 'admin';
export const OPERATIONS: readonly Operation[] = ['dso', 'escalation', 'admin'];

/** The group settings of the tests: a check every half second, delinquent after three missed checks. */
export const GROUP = Object.freeze({ checkIntervalSeconds: 0.5, delinquentThreshold: 3 });
export const INTERVAL_MS = GROUP.checkIntervalSeconds * 1000;
/** Slack on every timing bound: a loaded 2-CPU machine, and the tests' own polling. */
export const MARGIN_MS = 2000;
/**
 * From a heartbeat that stops (kill -9, SIGSTOP) to the next instance owning: delinquent after
 * `delinquentThreshold` intervals, taken over at the next check.
 */
export const FAILOVER_BOUND_MS = INTERVAL_MS * (GROUP.delinquentThreshold + 1) + MARGIN_MS;
/** A clean stop, a rank change, a publication: about one interval. */
export const HANDOVER_BOUND_MS = INTERVAL_MS + MARGIN_MS;

/** servgrp_events.type */
export const FAILOVER = 1;
export const RELINQUISH = 2;
export const TAKEOVER = 3;

/**
 * The audit of test/support/faults.ts (write_audit: id, op, by_engine, state, tx) plus who wrote
 * each row: the writing session's application_name (an instance's connections name it), its
 * backend pid, and the time of the write. SECURITY DEFINER: the engine's role need not be able to write the audit table.
 */
export const GROUP_AUDIT_SQL = `${AUDIT_SQL}
ALTER TABLE write_audit ADD COLUMN app text NOT NULL DEFAULT current_setting('application_name'),
                        ADD COLUMN pid int NOT NULL DEFAULT pg_backend_pid(),
                        ADD COLUMN at timestamptz NOT NULL DEFAULT clock_timestamp();
ALTER FUNCTION write_audit() SECURITY DEFINER SET search_path = public, pg_catalog;`;

// ---- instances ---------------------------------------------------------------------------------

/** One `pgdso run --server S --instance-id ID [--rank N]`. */
export interface Instance {
  readonly id: string;
  readonly server: string;
  engine: EngineProcess;
  readonly rank?: number;
}

export function startInstance(e: DsoEnv, id: string, opts: { server?: string; rank?: number } = {}): Instance {
  const server = opts.server ?? 'sf';
  const rank = opts.rank === undefined ? [] : ['--rank', String(opts.rank)];
  return { id, server, rank: opts.rank, engine: e.engine(['--server', server, '--instance-id', id, ...rank]) };
}

/**
 * Starts the first instance and waits until it owns every operation (on an empty board: rank 1
 * for all three), then the others; returns once all are online.
 */
export async function startGroup(e: DsoEnv, ids: readonly string[], ranks: readonly (number | undefined)[] = []): Promise<Instance[]> {
  const first = startInstance(e, ids[0]!, { rank: ranks[0] });
  const all = [first];
  for (const operation of OPERATIONS) await untilOwner(e, first.id, all, { operation, timeoutMs: 30_000 });
  for (const [i, id] of ids.slice(1).entries()) all.push(startInstance(e, id, { rank: ranks[i + 1] }));
  for (const instance of all) await untilOnline(e, instance, all);
  return all;
}

/** SIGTERM to each, at once; their exit codes. */
export async function stopAll(instances: readonly Instance[]): Promise<(number | null)[]> {
  return Promise.all(instances.map((i) => i.engine.stop()));
}

/** Starts the instance again (after a kill or a stop), with the same id and rank. */
export function restartInstance(e: DsoEnv, instance: Instance): Instance {
  instance.engine = startInstance(e, instance.id, { server: instance.server, rank: instance.rank }).engine;
  return instance;
}

/** SIGSTOP: the process is frozen (its connections stay open, its heartbeat stops). */
export function freeze(instance: Instance): void {
  process.kill(instance.engine.child.pid!, 'SIGSTOP');
}

/** SIGCONT, if the process is still there. */
export function thaw(instance: Instance): void {
  if (instance.engine.running) process.kill(instance.engine.child.pid!, 'SIGCONT');
}

/** The instances' output, for failure messages, each named. */
export function describeGroup(instances: readonly Instance[]): string {
  return instances
    .map(
      (i) =>
        `--- ${i.id} (${i.engine.running ? 'running' : `exited ${i.engine.child.exitCode ?? i.engine.child.signalCode}`}) ---\n` +
        i.engine.output.slice(-8000),
    )
    .join('\n');
}

// ---- the board, the ranking, the owners, the events ----------------------------------------------

export interface BoardRow {
  instanceId: string;
  serverName: string;
  host: string;
  pid: number;
  intervalCount: number;
  state: 'online' | 'delinquent' | 'stopped';
  operations: string[];
  pendingSignals: string[];
  startedAt: Date;
  lastSeenAt: Date;
}

/** The board of a server, by instance id. */
export async function board(e: DsoEnv, server = 'sf'): Promise<BoardRow[]> {
  return e.query<BoardRow>(
    server,
    `SELECT instance_id AS "instanceId", server_name AS "serverName", host, pid, interval_count::float8 AS "intervalCount", state,
            operations, pending_signals AS "pendingSignals", started_at AS "startedAt", last_seen_at AS "lastSeenAt"
       FROM pgdso.servgrp_board ORDER BY instance_id`,
  );
}

export async function boardRow(e: DsoEnv, instanceId: string, server = 'sf'): Promise<BoardRow | undefined> {
  return (await board(e, server)).find((r) => r.instanceId === instanceId);
}

/** The rule set version each instance runs (board.rule_version), by instance id. */
export async function ruleVersions(e: DsoEnv, server = 'sf'): Promise<Record<string, number | null>> {
  const rows = await e.query<{ id: string; v: number | null }>(
    server,
    'SELECT instance_id AS id, rule_version::float8 AS v FROM pgdso.servgrp_board ORDER BY instance_id',
  );
  return Object.fromEntries(rows.map((r) => [r.id, r.v]));
}

export interface RankRow {
  operation: Operation;
  instanceId: string;
  rank: number | null;
  delinquentThreshold: number;
}

export async function ranking(e: DsoEnv, server = 'sf'): Promise<RankRow[]> {
  return e.query<RankRow>(
    server,
    `SELECT operation, instance_id AS "instanceId", rank, delinquent_threshold AS "delinquentThreshold"
       FROM pgdso.servgrp_ranking ORDER BY operation, instance_id`,
  );
}

export interface OwnerRow {
  operation: Operation;
  instanceId: string | null;
  term: number;
  assignedAt: Date;
}

/** servgrp_owners, by operation. */
export async function owners(e: DsoEnv, server = 'sf'): Promise<Partial<Record<Operation, OwnerRow>>> {
  const rows = await e.query<OwnerRow>(
    server,
    `SELECT operation, instance_id AS "instanceId", term::float8 AS term, assigned_at AS "assignedAt" FROM pgdso.servgrp_owners`,
  );
  return Object.fromEntries(rows.map((r) => [r.operation, r]));
}

/** Who owns the operation now (servgrp_owners), or null. */
export async function ownerOf(e: DsoEnv, operation: Operation = 'dso', server = 'sf'): Promise<string | null> {
  return (await owners(e, server))[operation]?.instanceId ?? null;
}

export interface EventRow {
  id: number;
  type: number;
  operation: string;
  newOwner: string | null;
  oldOwner: string | null;
  term: number | null;
  at: Date;
}

/** servgrp_events, oldest first (of one operation if given). */
export async function events(e: DsoEnv, server = 'sf', operation?: Operation): Promise<EventRow[]> {
  return e.query<EventRow>(
    server,
    `SELECT id::float8 AS id, type, operation, new_owner AS "newOwner", old_owner AS "oldOwner", term::float8 AS term, at
       FROM pgdso.servgrp_events WHERE $1::text IS NULL OR operation = $1 ORDER BY id`,
    [operation ?? null],
  );
}

/** An empty board: no instance, no rank, no owner (the instances must be stopped). */
export async function clearBoard(e: DsoEnv, server = 'sf'): Promise<void> {
  await e.query(server, 'DELETE FROM pgdso.servgrp_board; DELETE FROM pgdso.servgrp_ranking; DELETE FROM pgdso.servgrp_owners');
}

// ---- waits -------------------------------------------------------------------------------------------

/** Waits until the operation's owner is `instanceId`; returns the owner row. */
export async function untilOwner(
  e: DsoEnv,
  instanceId: string,
  instances: readonly Instance[],
  opts: { operation?: Operation; server?: string; timeoutMs?: number; intervalMs?: number } = {},
): Promise<OwnerRow> {
  const operation = opts.operation ?? 'dso';
  let seen: unknown;
  const found = await waitFor(
    async () => {
      const all = await owners(e, opts.server);
      seen = all;
      const row = all[operation];
      return row?.instanceId === instanceId ? row : undefined;
    },
    {
      timeoutMs: opts.timeoutMs ?? 20_000,
      intervalMs: opts.intervalMs ?? 25,
      message: () => `${instanceId} did not come to own ${operation} (owners: ${JSON.stringify(seen)})\n${describeGroup(instances)}`,
    },
  );
  return found!;
}

/** Waits until the board shows the instance online and heartbeating (its interval_count risen at least once). */
export async function untilOnline(e: DsoEnv, instance: Instance, instances: readonly Instance[], timeoutMs = 30_000): Promise<BoardRow> {
  let first: number | undefined;
  const row = await waitFor(
    async () => {
      const row = await boardRow(e, instance.id, instance.server);
      if (row?.state !== 'online' || row.pid !== instance.engine.child.pid) return undefined;
      first ??= row.intervalCount;
      return row.intervalCount > first ? row : undefined;
    },
    { timeoutMs, intervalMs: 50, message: () => `${instance.id} did not come online on the board\n${describeGroup(instances)}` },
  );
  return row!;
}

/**
 * Waits until the instance's interval_count has risen by `beats` from now: that many check
 * intervals of its have passed (what the tests wait for instead of a fixed time).
 */
export async function untilBeats(e: DsoEnv, instance: Instance, beats: number, instances: readonly Instance[]): Promise<void> {
  const start = (await boardRow(e, instance.id, instance.server))?.intervalCount;
  if (start === undefined) throw new Error(`${instance.id} is not on the board of ${instance.server}`);
  await waitFor(async () => ((await boardRow(e, instance.id, instance.server))?.intervalCount ?? -1) >= start + beats, {
    timeoutMs: (beats + 1) * INTERVAL_MS + 20_000,
    intervalMs: 50,
    message: () => `${instance.id} did not heartbeat ${beats} more times\n${describeGroup(instances)}`,
  });
}

export interface Heartbeats {
  /** the longest time between two heartbeats seen (last_seen_at, the server's clock) */
  longestGapMs: number;
  /** the instance was seen delinquent on the board */
  delinquent: boolean;
  heartbeats: number;
}

/**
 * Watches a server's board until stopped: each instance's heartbeats (last_seen_at as it
 * moves), the longest gap between two, and whether the board ever showed it delinquent. A live
 * instance's heartbeat must not stall for the delinquent threshold, even under load.
 */
export function watchBoard(e: DsoEnv, server = 'sf'): { stop: () => Promise<Record<string, Heartbeats>> } {
  const seen: Record<string, Heartbeats & { last?: number }> = {};
  let running = true;
  const loop = (async () => {
    while (running) {
      try {
        for (const row of await board(e, server)) {
          const h = (seen[row.instanceId] ??= { longestGapMs: 0, delinquent: false, heartbeats: 0 });
          const at = row.lastSeenAt.getTime();
          if (h.last !== undefined && at > h.last) {
            h.longestGapMs = Math.max(h.longestGapMs, at - h.last);
            h.heartbeats += 1;
          }
          h.last = at;
          if (row.state === 'delinquent') h.delinquent = true;
        }
      } catch {
        // a connection cut by a fault: the next reading tells
      }
      await new Promise((resolve) => setTimeout(resolve, 50).unref());
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return Object.fromEntries(Object.entries(seen).map(([id, { last: _, ...h }]) => [id, h]));
    },
  };
}

// ---- backends -----------------------------------------------------------------------------------------

export interface Backend {
  pid: number;
  applicationName: string;
  backendType: string;
  state: string | null;
  /** the backend's transaction id while it has written in its open transaction */
  xid: string | null;
  /** what it waits for (ClientWrite: a full socket to a client that does not read) */
  waitEvent: string | null;
  query: string;
}

const BACKENDS_SQL = `
SELECT pid, application_name AS "applicationName", backend_type AS "backendType", state, backend_xid::text AS xid,
       wait_event AS "waitEvent", left(query, 300) AS query
  FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid()
   AND strpos(application_name, $1) > 0 AND ($2::text IS NULL OR strpos(lower(application_name), lower($2)) > 0)
 ORDER BY pid`;

/**
 * The backends of an instance on a server's database, walsenders included: application_name
 * contains the instance id (and `like`, case-insensitive, when given).
 */
export async function backendsOf(e: DsoEnv, server: string, instanceId: string, like?: string): Promise<Backend[]> {
  return e.query<Backend>(server, BACKENDS_SQL, [instanceId, like ?? null]);
}

/**
 * The backends of an instance that have an open transaction which wrote into `table` (on a peer,
 * a lane in the middle of a batch): a transaction id, and the table's lock.
 */
export async function writingBackendsOf(e: DsoEnv, server: string, instanceId: string, table = 'write_audit'): Promise<Backend[]> {
  return e.query<Backend>(
    server,
    `SELECT b.* FROM (${BACKENDS_SQL}) b
      WHERE b.xid IS NOT NULL
        AND EXISTS (SELECT 1 FROM pg_locks l
                     WHERE l.pid = b.pid AND l.locktype = 'relation' AND l.relation = to_regclass($3) AND l.granted)`,
    [instanceId, null, table],
  );
}

/** pg_terminate_backend of each pid; the pids that were there to terminate. */
export async function terminate(e: DsoEnv, server: string, pids: readonly number[]): Promise<number[]> {
  const rows = await e.query<{ pid: number }>(server, 'SELECT pid FROM unnest($1::int[]) AS pid WHERE pg_terminate_backend(pid, 5000)', [
    pids,
  ]);
  return rows.map((r) => r.pid);
}

/** The pids of these that are still connected. */
export async function stillConnected(e: DsoEnv, server: string, pids: readonly number[]): Promise<number[]> {
  const rows = await e.query<{ pid: number }>(server, 'SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])', [pids]);
  return rows.map((r) => r.pid);
}

/** The WAL senders connected to the server's database (decoders), with the slot they stream. */
export async function walsenders(e: DsoEnv, server = 'sf'): Promise<Backend[]> {
  return e.query<Backend>(
    server,
    `SELECT pid, application_name AS "applicationName", backend_type AS "backendType", state, backend_xid::text AS xid,
            wait_event AS "waitEvent", left(query, 300) AS query
       FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'walsender' ORDER BY pid`,
  );
}

/** The slots of the server's database and the backend streaming each (active_pid), with its application_name. */
export async function slotHolders(
  e: DsoEnv,
  server = 'sf',
): Promise<{ slot: string; pid: number | null; applicationName: string | null }[]> {
  return e.query(
    server,
    `SELECT s.slot_name AS slot, s.active_pid AS pid, a.application_name AS "applicationName"
       FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid
      WHERE s.database = current_database() ORDER BY s.slot_name`,
  );
}

export interface AdvisoryLock {
  /** classid:objid:objsubid */
  key: string;
  pid: number;
  mode: string;
  applicationName: string;
  /** the holder is outside a transaction: a session lock */
  idle: boolean;
}

/** Advisory locks granted in the server's database, with their holders. */
export async function advisoryLocks(e: DsoEnv, server = 'sf'): Promise<AdvisoryLock[]> {
  return e.query<AdvisoryLock>(
    server,
    `SELECT l.classid || ':' || l.objid || ':' || l.objsubid AS key, l.pid, l.mode, a.application_name AS "applicationName",
            a.state = 'idle' AS idle
       FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      ORDER BY key, l.pid`,
  );
}

// ---- the peer's audit ---------------------------------------------------------------------------------

export interface WritesBy {
  /** rows of write_audit written by the instance */
  rows: number;
  /** their smallest and largest n */
  first: number | null;
  last: number | null;
  /** distinct transactions */
  transactions: number;
  /** when its first and last rows were written (the peer's clock) */
  firstAt: Date | null;
  lastAt: Date | null;
}

/** What the engine's writes on a peer written by an instance (application_name contains its id) come to. */
export async function writesBy(e: DsoEnv, server: string, instanceId: string): Promise<WritesBy> {
  const [row] = await e.query<WritesBy>(
    server,
    `SELECT count(*)::int AS rows, min(n)::float8 AS first, max(n)::float8 AS last, count(DISTINCT tx)::int AS transactions,
            min(at) AS "firstAt", max(at) AS "lastAt"
       FROM write_audit WHERE by_engine AND strpos(app, $1) > 0`,
    [instanceId],
  );
  return row!;
}

export interface Run {
  /** the instance (the first of those given whose id the application_name contains), or null */
  instance: string | null;
  rows: number;
  first: number;
  last: number;
  /** when its last row was written (the peer's clock) */
  lastAt: Date;
}

/**
 * The engine's writes on a peer in the order they were made (write_audit.n), cut into runs of one
 * writer: ['sf-a', 'sf-b'] is sf-a writing, then sf-b and never sf-a again. Two instances applying
 * at the same time show as more runs.
 */
export async function writerRuns(e: DsoEnv, server: string, instanceIds: readonly string[]): Promise<Run[]> {
  return e.query<Run>(
    server,
    `WITH w AS (
       SELECT n, at, (SELECT i FROM unnest($1::text[]) WITH ORDINALITY AS u(i, k) WHERE strpos(app, i) > 0 ORDER BY k LIMIT 1) AS who
         FROM write_audit WHERE by_engine),
     r AS (SELECT n, at, who, count(*) FILTER (WHERE changed) OVER (ORDER BY n) AS run
             FROM (SELECT n, at, who, who IS DISTINCT FROM lag(who) OVER (ORDER BY n) AS changed FROM w) c)
     SELECT who AS instance, count(*)::int AS rows, min(n)::float8 AS first, max(n)::float8 AS last, max(at) AS "lastAt"
       FROM r GROUP BY run, who ORDER BY run`,
    [instanceIds],
  );
}

/**
 * Whether the writers, in the order they wrote, can be the owners in the order they owned (some
 * owners writing nothing): each run of writes by one instance falls in a term of its own.
 */
export function oneWriterAtATime(runs: readonly Run[], ownersInOrder: readonly string[]): boolean {
  let at = 0;
  for (const run of runs) {
    while (at < ownersInOrder.length && ownersInOrder[at] !== run.instance) at += 1;
    if (at === ownersInOrder.length) return false;
    at += 1;
  }
  return true;
}

/** The largest n in the peer's write_audit (0 when empty). */
export async function lastAudit(e: DsoEnv, server: string): Promise<number> {
  const [row] = await e.query<{ n: number }>(server, 'SELECT coalesce(max(n), 0)::float8 AS n FROM write_audit');
  return row!.n;
}

/** Engine writes on a peer whose application_name names none of the instances (attribution broken). */
export async function unattributedWrites(
  e: DsoEnv,
  server: string,
  instanceIds: readonly string[],
): Promise<{ app: string; rows: number }[]> {
  return e.query(
    server,
    `SELECT app, count(*)::int AS rows FROM write_audit
      WHERE by_engine AND NOT EXISTS (SELECT 1 FROM unnest($1::text[]) AS i WHERE strpos(app, i) > 0)
      GROUP BY app ORDER BY app`,
    [instanceIds],
  );
}

/** The inserts the engine made on a peer: requests inserted, and those inserted more than once. */
export async function insertsPerRequest(
  e: DsoEnv,
  server: string,
): Promise<{ requests: number; twice: { id: string; inserts: number }[] }> {
  const [all] = await e.query<{ n: number }>(
    server,
    `SELECT count(DISTINCT id)::int AS n FROM write_audit WHERE by_engine AND op = 'INSERT'`,
  );
  const twice = await e.query<{ id: string; inserts: number }>(
    server,
    `SELECT id, count(*)::int AS inserts FROM write_audit WHERE by_engine AND op = 'INSERT'
      GROUP BY id HAVING count(*) > 1 ORDER BY id LIMIT 20`,
  );
  return { requests: all!.n, twice };
}

/**
 * Inserts a request on sf (repair_request) and waits until chicago has it; returns the
 * application_names of the engine's writes of it on chicago (write_audit), in order.
 */
export async function carry(e: DsoEnv, id: string, instances: readonly Instance[]): Promise<string[]> {
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ($1, 'chair', $1)`, [id]);
  await waitFor(async () => (await e.query('chicago', 'SELECT 1 FROM repair_request WHERE id = $1', [id])).length === 1, {
    timeoutMs: 30_000,
    message: () => `${id} did not reach chicago\n${describeGroup(instances)}`,
  });
  const writes = await e.query<{ app: string }>('chicago', 'SELECT app FROM write_audit WHERE id = $1 AND by_engine ORDER BY n', [id]);
  return writes.map((w) => w.app);
}

// ---- the command line ------------------------------------------------------------------------------------

export interface InstanceStatus {
  instanceId: string;
  state: string;
  operations: string[];
  lastSeenAt?: string;
  ruleVersion?: number | null;
}

export interface GroupStatus {
  instances: InstanceStatus[];
  owners: Partial<Record<Operation, string | null>>;
  coordinator?: string | null;
}

/** `pgdso status --json`, and the server's entry of it (undefined when stdout is no JSON or lacks the server). */
export async function statusOf(e: DsoEnv, server = 'sf'): Promise<{ result: CliResult; status: GroupStatus | undefined }> {
  const result = await e.cli(['status', '--json']);
  let status: GroupStatus | undefined;
  try {
    status = (JSON.parse(result.stdout) as { servers: Record<string, GroupStatus> }).servers[server];
  } catch {
    status = undefined;
  }
  return { result, status };
}
