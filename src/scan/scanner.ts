// One form scan: the form's requests in keyset batches by primary key (memory bounded by the
// batch, whatever the form's size). Each batch is one transaction on the source: the run's row
// is locked and its term checked (a newer claim fences this scan out), the batch's rows are read
// FOR SHARE (a user's update of one of them waits for the batch, so it comes after it in the
// WAL), the conditions are evaluated, the matching rows go into the WAL as one signed message
// for the engine (src/engine/scanned.ts), and the run's progress is recorded. All or nothing.
import type { Logger } from 'pino';
import pg from 'pg';
import type { ActionConfig } from '../config/types.ts';
import type { RowChange, TextRow } from '../change.ts';
import { buildFacts, type Facts } from '../rules/facts.ts';
import { RuleEvaluationError } from '../rules/compile.ts';
import { qualified, quoteIdent, writerOfOrigin } from '../sql/identifiers.ts';
import { withCanonicalText } from '../sql/session.ts';
import { describeForm, domainBaseTypes } from '../sql/form-catalog.ts';
import { encodeBatch, SCAN_PREFIX, type ScanBatch, type ScanKind } from './message.ts';
import { scannerName, type ScanRun } from './runs.ts';

/** The scan's run was claimed by a newer process (failover, a restarted sync): this one stops. */
export class ScanFenced extends Error {}

export interface ScanProgress {
  scanned: number;
  matched: number;
  errors: number;
  lastKey: string | null;
  done: boolean;
}

export interface ScanOptions {
  /** the server scanned */
  server: string;
  connection: pg.ClientConfig;
  run: ScanRun;
  kind: ScanKind;
  name: string;
  schema: string;
  table: string;
  /** true for a request the actions apply to; a RuleEvaluationError counts as an error, not a match */
  predicate: (facts: Facts) => boolean;
  /** the columns the predicate reads (null: whole rows), converted per row */
  columns: ReadonlySet<string> | null;
  /**
   * the predicate reads `origin`: the server whose engine last wrote each request here, from the
   * replication origin of the transaction that wrote its row (known with track_commit_timestamp
   * on; null otherwise, as for a row last written by a user or by this server's own engine)
   */
  readsOrigin?: boolean;
  actions: readonly ActionConfig[];
  batchRows: number;
  log: Logger;
  signal?: AbortSignal;
  onBatch?: (progress: ScanProgress) => void;
}

const RAW_TEXT = { getTypeParser: () => (value: string) => value } as unknown as pg.CustomTypesConfig;
const RETRYABLE = new Set(['40P01', '40001']);

/** Runs (or resumes, after run.lastKey) the scan to its end; returns the run's totals. */
export async function scanForm(opts: ScanOptions): Promise<ScanProgress> {
  const { run, log } = opts;
  const client = new pg.Client({ ...withCanonicalText(opts.connection), application_name: scannerName(opts.kind, opts.name) });
  client.on('error', () => undefined);
  await client.connect();
  try {
    const form = await describeForm(client, opts.schema, opts.table);
    const columns = await formColumns(client, form.oid);
    const baseTypes = await domainBaseTypes(client);
    const key = await client.query<{ key: string }>('SELECT key FROM pgdso.scan_key');
    if (!key.rows[0]) throw new Error('pgdso.scan_key is empty: run pgdso migrate');
    const relation: RowChange['relation'] = {
      oid: form.oid,
      schema: form.schema,
      table: form.table,
      replicaIdentity: 'full',
      columns: columns.map(([name, typeOid]) => ({ name, typeOid, typeMod: -1, isKey: name === form.keyColumn })),
    };
    const keyIndex = columns.findIndex(([name]) => name === form.keyColumn);
    const origins = opts.readsOrigin === true && (await originsKnown(client, opts, log));
    // the origin's name after the form's columns (not carried in the batch)
    const originColumn = origins
      ? `, (SELECT o.roname FROM pg_replication_origin o WHERE o.roident = (pg_xact_commit_timestamp_origin(t.xmin)).roident)`
      : '';
    const select =
      `SELECT ${columns.map(([name]) => `t.${quoteIdent(name)}`).join(', ')}${originColumn} ` +
      `FROM ${qualified(form.schema, form.table)} t`;
    const order = `ORDER BY t.${quoteIdent(form.keyColumn)} LIMIT ${Math.max(1, Math.floor(opts.batchRows))} FOR SHARE`;
    const first = `${select} ${order}`;
    const next = `${select} WHERE t.${quoteIdent(form.keyColumn)} > $1 ${order}`;
    const progress: ScanProgress = { scanned: run.scanned, matched: run.matched, errors: run.errors, lastKey: run.lastKey, done: false };
    while (!progress.done) {
      if (opts.signal?.aborted) throw opts.signal.reason ?? new Error('aborted');
      let lastError: string | null = null;
      const batch = await retrying(client, async () => {
        await client.query('BEGIN');
        const held = await client.query<{ term: number; lastKey: string | null; finished: boolean }>(
          `SELECT term::int AS term, last_key AS "lastKey", finished_at IS NOT NULL AS finished
             FROM pgdso.scan_runs WHERE id = $1 FOR UPDATE`,
          [run.id],
        );
        const row = held.rows[0];
        if (!row || row.term !== run.term || row.finished)
          throw new ScanFenced(`${opts.kind} ${opts.name}: run ${run.id} was claimed by another process (term ${row?.term ?? '?'})`);
        const res = await client.query<(string | null)[]>({
          text: row.lastKey === null ? first : next,
          values: row.lastKey === null ? [] : [row.lastKey],
          rowMode: 'array',
          types: RAW_TEXT,
        });
        const matched: (string | null)[][] = [];
        let errors = 0;
        for (const values of res.rows) {
          const textRow: TextRow = {};
          for (let i = 0; i < columns.length; i++) textRow[columns[i]![0]] = values[i] ?? null;
          const change: RowChange = { op: 'update', relation, lsn: 0n, new: textRow, old: null };
          const writer = origins ? writerOfOrigin(values[columns.length]) : null;
          if (origins) values.length = columns.length;
          try {
            if (opts.predicate(buildFacts(change, writer === opts.server ? null : writer, opts.columns, baseTypes))) matched.push(values);
          } catch (err) {
            if (!(err instanceof RuleEvaluationError)) throw err;
            errors += 1;
            lastError = `request ${String(values[keyIndex])}: ${err.message}`;
          }
        }
        if (matched.length > 0) {
          const message: ScanBatch = {
            v: 1,
            kind: opts.kind,
            name: opts.name,
            run: run.id,
            schema: form.schema,
            table: form.table,
            columns,
            rows: matched,
            actions: [...opts.actions],
          };
          await client.query('SELECT pg_logical_emit_message(true, $1, $2)', [SCAN_PREFIX, encodeBatch(message, key.rows[0]!.key)]);
        }
        const done = res.rows.length < opts.batchRows;
        const lastKey = res.rows.length > 0 ? String(res.rows[res.rows.length - 1]![keyIndex]) : row.lastKey;
        await client.query(
          `UPDATE pgdso.scan_runs SET last_key = $2, scanned = scanned + $3, matched = matched + $4, errors = errors + $5,
                  last_error = coalesce($6, last_error), updated_at = now(),
                  finished_at = CASE WHEN $7 THEN now() END, state = CASE WHEN $7 THEN 'done' ELSE state END
            WHERE id = $1`,
          [run.id, lastKey, res.rows.length, matched.length, errors, lastError, done],
        );
        await client.query('COMMIT');
        return { scanned: res.rows.length, matched: matched.length, errors, lastKey, done };
      });
      progress.scanned += batch.scanned;
      progress.matched += batch.matched;
      progress.errors += batch.errors;
      progress.lastKey = batch.lastKey;
      progress.done = batch.done;
      if (lastError) log.warn({ [opts.kind]: opts.name, run: run.id }, lastError);
      opts.onBatch?.({ ...progress });
    }
    return progress;
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Whether this server records the origin of its transactions (track_commit_timestamp); says so once if not. */
async function originsKnown(client: pg.Client, opts: ScanOptions, log: Logger): Promise<boolean> {
  const res = await client.query<{ on: string }>(`SELECT current_setting('track_commit_timestamp') AS on`);
  if (res.rows[0]?.on === 'on') return true;
  log.warn(
    { [opts.kind]: opts.name, server: opts.server },
    `${opts.kind} "${opts.name}" reads the origin fact, but track_commit_timestamp is off on ${opts.server}: ` +
      'origin is null for every request (ALTER SYSTEM SET track_commit_timestamp = on, and a restart, record it)',
  );
  return false;
}

/** A batch again after a deadlock or a serialization failure with the engine or a user. */
async function retrying<T>(client: pg.Client, work: () => Promise<T>): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await work();
    } catch (err) {
      await client.query('ROLLBACK').catch(() => undefined);
      if (!RETRYABLE.has((err as { code?: string }).code ?? '') || attempt >= 10) throw err;
      await new Promise((resolve) => setTimeout(resolve, 20 * (attempt + 1)));
    }
  }
}

/** The columns pgoutput sends for a table (not dropped, not generated), in its order. */
async function formColumns(client: pg.ClientBase, oid: number): Promise<[string, number][]> {
  const res = await client.query<{ name: string; type: number }>(
    `SELECT attname AS name, atttypid::int AS type FROM pg_attribute
      WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum`,
    [oid],
  );
  return res.rows.map((r) => [r.name, r.type]);
}
