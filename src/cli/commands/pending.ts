// `pgdso pending list|retry|discard`: the pending queue (pgdso.pending, operations waiting for a
// peer) and its errors (pgdso.pending_errors, operations that could not be applied), on the
// source server that wrote them. `retry` moves failed operations back into the queue; with
// `--queued` it asks for an immediate delivery attempt of queued ones. Every change ends with
// NOTIFY pgdso_pending, on which a running engine reads its queue again and tries those peers.
import pg from 'pg';
import type { PgdsoConfig, ServerConfig } from '../../config/types.ts';
import { toPgClientConfig, describeConnection } from '../../config/load.ts';
import { maskSecrets } from '../../log.ts';
import { configFrom, print, serverOf, UsageError, type GlobalOptions } from '../common.ts';
import { throughGroup } from '../../group/route.ts';
import {
  discardSql,
  inTransaction,
  listErrorsSql,
  listQueuedSql,
  NOTIFY_SQL,
  retryPending,
  type RetryOutcome,
  type Selection,
} from '../../queue/admin.ts';
import { LOCK_NAMESPACE, LOCKS } from '../../sql/identifiers.ts';

export interface ListOptions {
  server?: string;
  mapping?: string;
  json?: boolean;
}
export interface ActOptions {
  server?: string;
  id?: string;
  mapping?: string;
  all?: boolean;
  queued?: boolean;
}

/** Which rows a command acts on. */
export interface QueuedRow {
  id: number;
  queue: 'pending';
  type: string;
  mapping: string | null;
  form: string | null;
  requestId: string | null;
  targetServer: string | null;
  targetForm: string | null;
  targetKey: string | null;
  pool: string;
  status: string;
  attempts: number;
  nextAttemptAt: string | null;
  lastError: string | null;
  /** since when the target server cannot be reached (null: reachable, or not tried yet) */
  downSince?: string | null;
  sourceLsn: string | null;
  createdAt: string;
  payload?: unknown;
}

export interface ErrorRow extends Omit<QueuedRow, 'queue'> {
  queue: 'error';
  error: string;
  sqlstate: string | null;
  failedAt: string;
  /** false when the engine refused the operation before it reached a target: nothing to send again */
  retryable: boolean;
}

// ---- options ------------------------------------------------------------------------------

/** Exactly one of --id, --mapping, --all; --id needs --server when several servers are configured. */
export function selectionOf(config: PgdsoConfig, cmd: ActOptions, verb: string): Selection {
  const given = [cmd.id !== undefined && '--id', cmd.mapping !== undefined && '--mapping', cmd.all && '--all'].filter(Boolean);
  if (given.length !== 1) {
    throw new UsageError(
      given.length === 0
        ? `pending ${verb}: say which rows: --id N, --mapping M or --all`
        : `pending ${verb}: ${given.join(' and ')} cannot be used together: give one of --id N, --mapping M or --all`,
    );
  }
  if (cmd.id !== undefined) {
    if (!/^[1-9][0-9]{0,18}$/.test(cmd.id))
      throw new UsageError(`pending ${verb}: --id takes a row id (a positive integer), not "${cmd.id}"`);
    const servers = Object.keys(config.servers);
    if (!cmd.server && servers.length > 1) {
      throw new UsageError(`pending ${verb}: --id needs --server: ids are per server (configured: ${servers.join(', ')})`);
    }
    return { by: 'id', id: cmd.id };
  }
  if (cmd.mapping !== undefined) return { by: 'mapping', mapping: cmd.mapping };
  return { by: 'all' };
}

function serversOf(config: PgdsoConfig, name: string | undefined): ServerConfig[] {
  return name ? [serverOf(config, name)] : Object.values(config.servers);
}

// ---- connections --------------------------------------------------------------------------

/** Runs `work` on a connection to the server; an error names the server and its host, never a password. */
async function onServer<T>(server: ServerConfig, work: (client: pg.Client) => Promise<T>): Promise<T> {
  const where = `${server.name} (${describeConnection(server.connection)})`;
  const client = new pg.Client({
    connectionTimeoutMillis: 5000,
    ...toPgClientConfig(server.connection),
    application_name: 'pgdso pending',
  });
  client.on('error', () => {});
  try {
    await client.connect();
  } catch (err) {
    throw new ServerError(`${where}: cannot be reached: ${maskSecrets(errorText(err))}`);
  }
  try {
    return await work(client);
  } catch (err) {
    const text = errorText(err);
    const hint = (err as { code?: string }).code === '42P01' ? ' (is the control schema there? run pgdso migrate)' : '';
    throw new ServerError(`${where}: ${maskSecrets(text)}${hint}`);
  } finally {
    await client.end().catch(() => {});
  }
}

/** A runtime failure on one server: reported, and the other servers go on. */
class ServerError extends Error {}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Runs `work` on each server in turn. A server that fails is reported on stderr and the others
 * go on; the exit code is then 1.
 */
async function eachServer(
  servers: readonly ServerConfig[],
  work: (server: ServerConfig, client: pg.Client) => Promise<void>,
): Promise<void> {
  for (const server of servers) {
    try {
      await onServer(server, (client) => work(server, client));
    } catch (err) {
      if (!(err instanceof ServerError)) throw err;
      process.stderr.write(`pgdso: ${err.message}\n`);
      process.exitCode = 1;
    }
  }
}

// ---- list ---------------------------------------------------------------------------------

function iso(value: unknown): string | null {
  if (value === null || value === undefined) return null;
  return value instanceof Date ? value.toISOString() : String(value);
}

type Raw = Record<string, unknown>;

function queuedRow(r: Raw): QueuedRow {
  return {
    id: Number(r.id),
    queue: 'pending',
    type: r.type as string,
    mapping: r.mapping as string | null,
    form: r.form as string | null,
    requestId: r.request_id as string | null,
    targetServer: r.target_server as string | null,
    targetForm: r.target_form as string | null,
    targetKey: r.target_key as string | null,
    pool: r.pool as string,
    status: r.status as string,
    attempts: r.attempts as number,
    nextAttemptAt: iso(r.next_attempt_at),
    lastError: r.last_error as string | null,
    sourceLsn: r.source_lsn as string | null,
    createdAt: iso(r.created_at)!,
    payload: r.payload,
  };
}

function pendingRow(r: Raw): QueuedRow {
  return { ...queuedRow(r), downSince: iso(r.down_since) };
}

function errorRow(r: Raw): ErrorRow {
  return {
    ...queuedRow(r),
    queue: 'error',
    error: r.error as string,
    sqlstate: r.sqlstate as string | null,
    failedAt: iso(r.failed_at)!,
    retryable: r.retryable as boolean,
  };
}

export async function pendingListCommand(opts: GlobalOptions, cmd: ListOptions): Promise<void> {
  const config = await configFrom(opts);
  const selection: Selection | null = cmd.mapping !== undefined ? { by: 'mapping', mapping: cmd.mapping } : null;
  const servers: Record<string, { pending: QueuedRow[]; errors: ErrorRow[] } | { error: string }> = {};
  for (const server of serversOf(config, cmd.server)) {
    try {
      servers[server.name] = await onServer(server, async (client) => ({
        pending: (await client.query(listQueuedSql(selection))).rows.map(pendingRow),
        errors: (await client.query(listErrorsSql(selection))).rows.map(errorRow),
      }));
    } catch (err) {
      if (!(err instanceof ServerError)) throw err;
      servers[server.name] = { error: err.message };
      process.exitCode = 1;
    }
  }
  if (cmd.json) {
    print(JSON.stringify({ servers }));
    return;
  }
  for (const [name, s] of Object.entries(servers)) {
    if ('error' in s) {
      print(s.error);
      continue;
    }
    print(`${name}: ${s.pending.length} queued, ${s.errors.length} failed`);
    for (const r of s.pending) {
      print(
        `  #${r.id} queued  ${r.type} ${r.mapping ?? '-'} request ${r.requestId ?? '-'} -> ${r.targetServer ?? '-'}  ${r.status}, ` +
          `attempts ${r.attempts}, next attempt ${r.nextAttemptAt ?? '-'}, since ${r.createdAt}` +
          `${r.downSince ? `, ${r.targetServer} down since ${r.downSince}` : ''}` +
          `${r.lastError ? `  last error: ${oneLine(r.lastError)}` : ''}`,
      );
    }
    for (const r of s.errors) {
      print(
        `  #${r.id} error   ${r.type} ${r.mapping ?? '-'} request ${r.requestId ?? '-'} -> ${r.targetServer ?? '-'}  ${r.status}, ` +
          `attempts ${r.attempts}, at ${r.failedAt}${r.sqlstate ? ` [${r.sqlstate}]` : ''}${r.retryable ? '' : ' (cannot be retried)'}  ` +
          oneLine(r.error),
      );
    }
  }
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ');
}

// ---- retry --------------------------------------------------------------------------------

const NOT_RETRYABLE =
  'cannot be retried: refused by the engine before reaching a target; fix the request and change it again (or discard it)';

export async function pendingRetryCommand(opts: GlobalOptions, cmd: ActOptions): Promise<void> {
  const config = await configFrom(opts);
  const selection = selectionOf(config, cmd, 'retry');
  const servers = serversOf(config, cmd.server);
  let retried = 0;
  let refused = 0;
  let found = 0;
  await eachServer(servers, async (server, client) => {
    const routed = await throughGroup<RetryOutcome>(client, config.group, server.name, 'pending-retry', {
      selection,
      queued: cmd.queued === true,
    });
    const { ids, moved, left } = routed?.result ?? (await retryPending(client, selection, cmd.queued === true));
    // on its own line: scripts read the count line as before
    const by = routed ? `\n${server.name}: carried out by instance ${routed.instanceId}, the owner of dso` : '';
    if (cmd.queued) {
      retried += ids.length;
      found += ids.length;
      print(
        `${server.name}: ${ids.length} queued operation${ids.length === 1 ? '' : 's'} due now` +
          `${ids.length ? ` (${ids.map((id) => `#${id}`).join(', ')})` : ''}${by}`,
      );
      return;
    }
    retried += moved;
    refused += left.length;
    found += moved + left.length;
    print(`${server.name}: ${moved} failed operation${moved === 1 ? '' : 's'} sent again${by}`);
    for (const r of left) {
      process.stderr.write(
        `pgdso: ${server.name}: error #${r.id} (mapping ${r.mapping ?? '-'}, request ${r.request_id ?? '-'}) ` +
          `${NOT_RETRYABLE}: ${oneLine(r.error)}\n`,
      );
    }
  });
  if (selection.by === 'id' && found === 0 && process.exitCode !== 1) {
    process.stderr.write(
      `pgdso: ${servers[0]!.name}: no ${cmd.queued ? 'queued operation' : 'failed operation'} #${selection.id}` +
        `${cmd.queued ? '' : ' (pgdso pending list shows them)'}\n`,
    );
    process.exitCode = 1;
  }
  // Nothing sent while something asked for cannot be: a failure. Some sent: the others are
  // reported on stderr, and the command succeeded at what it could do.
  if (refused > 0 && retried === 0) process.exitCode = 1;
}

// ---- discard ------------------------------------------------------------------------------

export async function pendingDiscardCommand(opts: GlobalOptions, cmd: ActOptions): Promise<void> {
  const config = await configFrom(opts);
  const selection = selectionOf(config, cmd, 'discard');
  const table = cmd.queued ? 'pending' : 'pending_errors';
  const servers = serversOf(config, cmd.server);
  let found = 0;
  await eachServer(servers, async (server, client) => {
    const ids = await inTransaction(client, async () => {
      // a chunk the engine is delivering is finished first (and then no longer queued)
      if (cmd.queued) await client.query('SELECT pg_advisory_xact_lock($1, $2)', [LOCK_NAMESPACE, LOCKS.queueDelivery]);
      const res = await client.query(discardSql(table, selection));
      if (res.rowCount) await client.query(NOTIFY_SQL);
      return res.rows.map((r: { id: string }) => r.id);
    });
    found += ids.length;
    const list = ids.length ? ` (${ids.map((id) => `#${id}`).join(', ')})` : '';
    if (cmd.queued) {
      print(
        `${server.name}: ${ids.length} queued operation${ids.length === 1 ? '' : 's'} dropped${list}` +
          (ids.length ? ': they will not reach their target' : ''),
      );
    } else {
      print(`${server.name}: ${ids.length} failed operation${ids.length === 1 ? '' : 's'} discarded${list}`);
    }
  });
  if (selection.by === 'id' && found === 0 && process.exitCode !== 1) {
    process.stderr.write(`pgdso: ${servers[0]!.name}: no ${cmd.queued ? 'queued operation' : 'failed operation'} #${selection.id}\n`);
    process.exitCode = 1;
  }
}
