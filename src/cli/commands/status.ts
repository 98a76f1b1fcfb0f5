import pg from 'pg';
import { toPgClientConfig, describeConnection } from '../../config/load.ts';
import { slotName } from '../../sql/identifiers.ts';
import { configFrom, print, type GlobalOptions } from '../common.ts';
import { maskSecrets } from '../../log.ts';
import type { GroupConfig } from '../../config/types.ts';
import { compileRules } from '../../rules/index.ts';
import { coordinatorHolder, readOwners, type OwnerRow } from '../../group/sql.ts';
import { CONTROL_NAME_PREFIX } from '../../group/coordinator.ts';

export interface ServerStatus {
  /** lastError and fix: the error a stopped instance stopped on, and the statement that fixes it */
  instances: {
    instanceId: string;
    state: string;
    operations: string[];
    host?: string;
    pid?: number;
    lastSeenAt?: string;
    ruleVersion?: number | null;
    lastError?: string;
    fix?: string;
  }[];
  /** the online owner of each operation (dso, escalation, admin), or null */
  owners: Record<string, string | null>;
  /** the instance holding the coordinator's lock, or null */
  coordinator?: string | null;
  slotLagBytes: number | null;
  /** WAL the slot holds back, from its restart position */
  retainedWalBytes: number | null;
  pending: number | null;
  pendingErrors: number | null;
  conflicts: number | null;
  /** peers this server's engine cannot reach now, with their delivery attempts */
  unreachable: { server: string; attempts: number; downSince: string | null; nextAttemptAt: string | null; lastError: string | null }[];
  /** enabled forms (schema.table) of which the table or a partition is not REPLICA IDENTITY FULL */
  replicaIdentityNotFull: string[];
  error?: string;
}

export async function serverStatus(connection: pg.ClientConfig, group: GroupConfig): Promise<ServerStatus> {
  const client = new pg.Client({ ...connection, application_name: 'pgdso status', connectionTimeoutMillis: 5000 });
  client.on('error', () => {});
  await client.connect();
  try {
    const slot = await client.query(
      `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS lag,
              pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained
         FROM pg_replication_slots WHERE slot_name = $1`,
      [slotName(String(connection.database))],
    );
    const counts = await client.query(
      `SELECT (SELECT count(*) FROM pgdso.pending)::int AS pending, (SELECT count(*) FROM pgdso.pending_errors)::int AS errors,
              (SELECT count(*) FROM pgdso.conflicts)::int AS conflicts`,
    );
    const targets = await client.query(
      `SELECT target_server, attempts, down_since, next_attempt_at, last_error FROM pgdso.pending_targets ORDER BY target_server`,
    );
    // an online instance silent for the delinquent threshold shows as delinquent (as the coordinator marks it)
    const board = await client.query(
      `SELECT instance_id, host, pid, operations, last_error, last_error_fix, last_seen_at, rule_version::int AS rule_version,
              CASE WHEN state = 'online' AND last_seen_at < now() - make_interval(secs => $1::float8 * $2::int)
                   THEN 'delinquent' ELSE state END AS state
         FROM pgdso.servgrp_board ORDER BY instance_id`,
      [group.checkIntervalSeconds, group.delinquentThreshold],
    );
    const owners = await client.query(readOwners.text, readOwners.values);
    const holder = (await client.query(coordinatorHolder.text, coordinatorHolder.values)).rows[0] as { name: string } | undefined;
    const identity = await client.query(notFullSql);
    return {
      instances: board.rows.map((r) => ({
        instanceId: r.instance_id,
        state: r.state,
        operations: r.state === 'online' ? r.operations : [],
        host: r.host,
        pid: r.pid,
        lastSeenAt: r.last_seen_at?.toISOString(),
        ruleVersion: r.rule_version,
        ...(r.last_error ? { lastError: maskSecrets(r.last_error), fix: r.last_error_fix } : {}),
      })),
      owners: Object.fromEntries(
        (owners.rows as OwnerRow[]).map((o) => [
          o.operation,
          board.rows.some((r) => r.instance_id === o.instanceId && r.state === 'online') ? o.instanceId : null,
        ]),
      ),
      coordinator: holder?.name?.startsWith(CONTROL_NAME_PREFIX) ? holder.name.slice(CONTROL_NAME_PREFIX.length) : null,
      slotLagBytes: slot.rowCount ? Number(slot.rows[0].lag) : null,
      retainedWalBytes: slot.rowCount ? Number(slot.rows[0].retained) : null,
      pending: counts.rows[0].pending,
      pendingErrors: counts.rows[0].errors,
      conflicts: counts.rows[0].conflicts,
      unreachable: targets.rows.map((r) => ({
        server: r.target_server,
        attempts: r.attempts,
        downSince: r.down_since?.toISOString() ?? null,
        nextAttemptAt: r.next_attempt_at?.toISOString() ?? null,
        lastError: r.last_error === null ? null : maskSecrets(r.last_error),
      })),
      replicaIdentityNotFull: identity.rows.map((r) => r.form as string),
    };
  } finally {
    await client.end();
  }
}

/** Enabled forms whose table, or one of its partitions, is not replica identity full. */
const notFullSql = `
SELECT f.schema_name || '.' || f.table_name AS form
  FROM pgdso.forms f
  JOIN pg_class c ON c.oid = to_regclass(format('%I.%I', f.schema_name, f.table_name))
 WHERE c.relreplident <> 'f'
    OR EXISTS (SELECT 1 FROM pg_partition_tree(c.oid) p JOIN pg_class pc ON pc.oid = p.relid
                WHERE pc.relreplident <> 'f' AND pc.relkind IN ('r', 'p'))
 ORDER BY 1`;

export async function statusCommand(opts: GlobalOptions, cmd: { json?: boolean }): Promise<void> {
  const config = await configFrom(opts);
  const servers: Record<string, ServerStatus> = {};
  for (const server of Object.values(config.servers)) {
    try {
      servers[server.name] = await serverStatus(toPgClientConfig(server.connection), config.group);
    } catch (err) {
      servers[server.name] = {
        instances: [],
        owners: {},
        slotLagBytes: null,
        retainedWalBytes: null,
        pending: null,
        pendingErrors: null,
        conflicts: null,
        unreachable: [],
        replicaIdentityNotFull: [],
        error: `${describeConnection(server.connection)}: ${(err as Error).message}`,
      };
    }
  }
  // a server that cannot be reached, or whose engine stopped on an error, is a runtime failure, in JSON too (its entry says why)
  if (Object.values(servers).some((s) => s.error || s.instances.some((i) => i.lastError))) process.exitCode = 1;
  // a server with forms in the rules and no instance online: nothing carries its changes
  const rules = compileRules(config);
  const unserved = Object.keys(servers).filter(
    (name) => !servers[name]!.error && rules.formsOf(name).length > 0 && !servers[name]!.instances.some((i) => i.state === 'online'),
  );
  if (unserved.length) process.exitCode = 1;
  if (cmd.json) {
    print(JSON.stringify({ servers }));
    return;
  }
  for (const [name, s] of Object.entries(servers)) {
    if (unserved.includes(name)) print(`${name}: no instance online (pgdso run --server ${name} serves it)`);
    const online = s.instances.filter((i) => i.state === 'online');
    if (online.length) {
      const owners = Object.entries(s.owners)
        .map(([op, id]) => `${op} ${id ?? 'none'}`)
        .join(', ');
      print(
        `${name}: instances ${s.instances.map((i) => `${i.instanceId} (${i.state})`).join(', ')}; owners ${owners};` +
          ` coordinator ${s.coordinator ?? 'none'}`,
      );
    }
    for (const i of s.instances)
      if (i.lastError) print(`${name}: instance ${i.instanceId} stopped on an error: ${i.lastError}; fix: ${i.fix}`);
    if (s.replicaIdentityNotFull.length)
      print(
        `${name}: not REPLICA IDENTITY FULL (updates of large values and deletes cannot be carried whole; run pgdso forms enable): ` +
          s.replicaIdentityNotFull.join(', '),
      );
    if (s.error) print(`${name}: unreachable (${s.error})`);
    else if (s.unreachable.length) {
      const peers = s.unreachable.map((u) => `${u.server} (${u.attempts} attempts, next ${u.nextAttemptAt}: ${u.lastError})`);
      const counts = `pending ${s.pending}, errors ${s.pendingErrors}, conflicts ${s.conflicts}`;
      print(`${name}: slot lag ${s.slotLagBytes ?? 'no slot'} bytes, ${counts}; cannot reach ${peers.join(', ')}`);
    } else
      print(
        `${name}: slot lag ${s.slotLagBytes ?? 'no slot'} bytes, retained WAL ${s.retainedWalBytes ?? 'no slot'} bytes, ` +
          `pending ${s.pending}, errors ${s.pendingErrors}, conflicts ${s.conflicts}`,
      );
  }
}
