// `pgdso sync --mapping M`: the initial load. The requests that already exist on the mapping's
// source (those this server owns, that the --where conditions select) go through the mapping's
// transfer exactly as a filter's transfer action would send them: a form scan (scanner.ts) whose
// batches the engine carries. Resumable: the run is recorded under the mapping's name, and an
// unfinished one is resumed after its last batch unless --restart.
import type { Logger } from 'pino';
import type pg from 'pg';
import { toPgClientConfig } from '../config/load.ts';
import type { Conditions, MappingConfig, PgdsoConfig } from '../config/types.ts';
import { checkConditions, compileConditions } from '../rules/compile.ts';
import { scanReads } from '../rules/index.ts';
import { qualified, quoteIdent, slotName } from '../sql/identifiers.ts';
import { describeForm } from '../sql/form-catalog.ts';
import { withClient } from '../sql/client.ts';
import { cancelRun, claimRun, createRun, unfinishedRun, type ScanRun } from './runs.ts';
import { scanForm, type ScanProgress } from './scanner.ts';

/** Bad usage of sync (exit 2). */
export class SyncUsageError extends Error {}

/**
 * The --where option: conditions as in rules ({"all": [...]}, {"any": ...}, {"not": ...}) or the
 * shorthand {"column": value, ...} for column equalities.
 */
export function syncConditions(where: string | undefined): Conditions | null {
  if (where === undefined) return null;
  let parsed: unknown;
  try {
    parsed = JSON.parse(where);
  } catch (err) {
    throw new SyncUsageError(`--where is not JSON: ${(err as Error).message}`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed))
    throw new SyncUsageError('--where takes conditions ({"all": [...]}) or column equalities ({"site": "chicago"})');
  const object = parsed as Record<string, unknown>;
  const conditions: Conditions = ['all', 'any', 'not'].some((k) => Object.hasOwn(object, k))
    ? object
    : { all: Object.entries(object).map(([column, value]) => ({ fact: 'row', path: `$.${column}`, operator: 'equal', value })) };
  const problems = checkConditions(conditions);
  if (problems.length > 0)
    throw new SyncUsageError(`--where: ${problems.map((p) => `${p.pointer ? `${p.pointer}: ` : ''}${p.message}`).join('; ')}`);
  return conditions;
}

export interface SyncOptions {
  config: PgdsoConfig;
  mapping: string;
  where: Conditions | null;
  batchRows: number;
  /** start from the beginning, cancelling an unfinished run */
  restart: boolean;
  instanceId: string;
  log: Logger;
  signal?: AbortSignal;
  /** once the run is claimed: its record and the requests the form holds past its last key */
  onStart?: (run: ScanRun, remaining: number) => void;
  onBatch?: (progress: ScanProgress) => void;
}

export interface SyncResult {
  run: ScanRun;
  progress: ScanProgress;
}

export function mappingOf(config: PgdsoConfig, name: string): MappingConfig {
  const mapping = config.mappings[name];
  if (!mapping) {
    const known = Object.keys(config.mappings);
    throw new SyncUsageError(`no mapping "${name}" in the rules (${known.length ? `known: ${known.join(', ')}` : 'there are none'})`);
  }
  return mapping;
}

export async function runSync(opts: SyncOptions): Promise<SyncResult> {
  const mapping = mappingOf(opts.config, opts.mapping);
  const connection = toPgClientConfig(opts.config.servers[mapping.from.server]!.connection);
  const conditions = compileConditions(opts.where);
  // what the server owns: a copy that is not master is not transferred (DSO), so not counted
  const predicate = (facts: Parameters<typeof conditions>[0]) => facts.master && conditions(facts);
  const form = `${mapping.from.schema}.${mapping.from.table}`;
  const args = { where: opts.where, batch: opts.batchRows };
  const { run, remaining } = await withClient(connection, async (client) => {
    let run = await unfinishedRun(client, 'sync', mapping.name);
    if (run && opts.restart) {
      await cancelRun(client, run.id);
      opts.log.info({ mapping: mapping.name, run: run.id, after: run.lastKey }, 'the unfinished sync run was cancelled (--restart)');
      run = null;
    }
    if (run && canonical(run.args.where ?? null) !== canonical(opts.where)) {
      throw new SyncUsageError(
        `an unfinished sync of mapping "${mapping.name}" (run ${run.id}, ${run.scanned} requests done) ran with --where ` +
          `${JSON.stringify(run.args.where ?? null)}: run it with the same --where to resume it, or add --restart`,
      );
    }
    run ??= await createRun(client, { kind: 'sync', name: mapping.name, fireTime: new Date(), trigger: 'sync', form, args });
    const claimed = await claimRun(client, run, opts.instanceId, null);
    if (!claimed) throw new Error(`sync run ${run.id} of mapping "${mapping.name}" finished meanwhile`);
    return { run: claimed, remaining: await remainingRows(client, mapping, claimed.lastKey) };
  });
  opts.onStart?.(run, remaining);
  const progress = await scanForm({
    server: mapping.from.server,
    connection,
    run,
    kind: 'sync',
    name: mapping.name,
    schema: mapping.from.schema,
    table: mapping.from.table,
    predicate,
    ...scanReads(opts.where),
    actions: [{ type: 'transfer', mapping: mapping.name, overrideLoopDetection: false }],
    batchRows: opts.batchRows,
    log: opts.log,
    ...(opts.signal ? { signal: opts.signal } : {}),
    ...(opts.onBatch ? { onBatch: opts.onBatch } : {}),
  });
  return { run, progress };
}

/** JSON with the keys of every object in order (jsonb keeps them in its own order). */
function canonical(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`;
  if (value !== null && typeof value === 'object')
    return `{${Object.keys(value)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonical((value as Record<string, unknown>)[k])}`)
      .join(',')}}`;
  return JSON.stringify(value);
}

/** The rows of the form past the run's last key (for the progress bar). */
async function remainingRows(client: pg.ClientBase, mapping: MappingConfig, lastKey: string | null): Promise<number> {
  const info = await describeForm(client, mapping.from.schema, mapping.from.table);
  const table = qualified(info.schema, info.table);
  const res =
    lastKey === null
      ? await client.query(`SELECT count(*)::float8 AS n FROM ${table}`)
      : await client.query(`SELECT count(*)::float8 AS n FROM ${table} WHERE ${quoteIdent(info.keyColumn)} > $1`, [lastKey]);
  return res.rows[0].n as number;
}

/**
 * Waits until the server's engine has carried everything written so far: a heartbeat message
 * goes into the WAL (then one a second), and the engine confirms one only once everything before
 * it is applied, so the slot's position passing the first one says that the sync's batches are
 * carried. `onWait` hears how much WAL is left, now and then.
 */
export async function waitCarried(
  connection: pg.ClientConfig,
  signal: AbortSignal | undefined,
  onWait?: (bytesLeft: number) => void,
): Promise<void> {
  await withClient(connection, async (client) => {
    const slot = slotName(String(connection.database));
    const mark = async () =>
      (await client.query(`SELECT pg_logical_emit_message(false, 'pgdso.heartbeat', 'pgdso sync')::text AS lsn`)).rows[0].lsn as string;
    const first = await mark();
    for (let i = 1; ; i++) {
      const res = await client.query(
        `SELECT pg_wal_lsn_diff($2::pg_lsn, confirmed_flush_lsn)::float8 AS left FROM pg_replication_slots WHERE slot_name = $1`,
        [slot, first],
      );
      const left = (res.rows[0]?.left as number | undefined) ?? null;
      if (left === null) throw new Error(`the replication slot ${slot} is missing: run pgdso forms enable`);
      if (left <= 0) return;
      if (signal?.aborted) throw signal.reason ?? new Error('aborted');
      if (i % 5 === 0) {
        onWait?.(left);
        await mark();
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  });
}
