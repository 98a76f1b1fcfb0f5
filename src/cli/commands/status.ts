import pg from 'pg';
import { toPgClientConfig, describeConnection } from '../../config/load.ts';
import { slotName } from '../../sql/identifiers.ts';
import { configFrom, print, type GlobalOptions } from '../common.ts';

export interface ServerStatus {
  instances: { instanceId: string; state: string; operations: string[] }[];
  owners: Record<string, string | null>;
  slotLagBytes: number | null;
  pending: number | null;
  pendingErrors: number | null;
  conflicts: number | null;
  error?: string;
}

export async function serverStatus(connection: pg.ClientConfig): Promise<ServerStatus> {
  const client = new pg.Client({ ...connection, application_name: 'pgdso status', connectionTimeoutMillis: 5000 });
  client.on('error', () => {});
  await client.connect();
  try {
    const slot = await client.query(
      `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS lag FROM pg_replication_slots WHERE slot_name = $1`,
      [slotName(String(connection.database))],
    );
    const counts = await client.query(
      `SELECT (SELECT count(*) FROM pgdso.pending)::int AS pending, (SELECT count(*) FROM pgdso.pending_errors)::int AS errors,
              (SELECT count(*) FROM pgdso.conflicts)::int AS conflicts`,
    );
    const board = await client.query(`SELECT instance_id, state, operations FROM pgdso.servgrp_board ORDER BY instance_id`);
    return {
      instances: board.rows.map((r) => ({ instanceId: r.instance_id, state: r.state, operations: r.operations })),
      owners: {},
      slotLagBytes: slot.rowCount ? Number(slot.rows[0].lag) : null,
      pending: counts.rows[0].pending,
      pendingErrors: counts.rows[0].errors,
      conflicts: counts.rows[0].conflicts,
    };
  } finally {
    await client.end();
  }
}

export async function statusCommand(opts: GlobalOptions, cmd: { json?: boolean }): Promise<void> {
  const config = await configFrom(opts);
  const servers: Record<string, ServerStatus> = {};
  for (const server of Object.values(config.servers)) {
    try {
      servers[server.name] = await serverStatus(toPgClientConfig(server.connection));
    } catch (err) {
      servers[server.name] = { instances: [], owners: {}, slotLagBytes: null, pending: null, pendingErrors: null, conflicts: null, error: `${describeConnection(server.connection)}: ${(err as Error).message}` };
    }
  }
  if (cmd.json) {
    print(JSON.stringify({ servers }));
    return;
  }
  for (const [name, s] of Object.entries(servers)) {
    if (s.error) print(`${name}: unreachable (${s.error})`);
    else print(`${name}: slot lag ${s.slotLagBytes ?? 'no slot'} bytes, pending ${s.pending}, errors ${s.pendingErrors}, conflicts ${s.conflicts}`);
  }
  if (Object.values(servers).some((s) => s.error)) process.exitCode = 1;
}
