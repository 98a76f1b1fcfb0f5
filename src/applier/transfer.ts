// The transfer operation, set-based. On the target, per group: a plain COPY (src/applier/copy.ts)
// when every request is new; otherwise one statement that finds each request's copy
// (by request ID and mapping history, by the match fields, or by ID alone under overwrite),
// logs and settles conflicts (a copy changed locally since the last sync) by the mapping's
// policy, updates the copies it found and inserts the others. A request ID held by a different
// request is a duplicate: an error, or (new-id) a new row with the target's own key.
// A data error isolates the bad rows by bisection under savepoints; the others are applied.
import type pg from 'pg';
import type { MappingConfig } from '../config/types.ts';
import type { FormInfo } from '../sql/form-catalog.ts';
import { qualified, quoteIdent, quoteLiteral } from '../sql/identifiers.ts';
import { classifyError, sqlstateOf } from './errors.ts';
import type { ColumnPlan } from './plan.ts';
import { copyField, copyIn } from './copy.ts';
import { GROUP_SAVEPOINT, RequestGroup, applyIsolating, parseJsonOr, sameRequestSql, textArrayLiteral, type ApplyFailure } from './sets.ts';

/** One request carried by a mapping, as text values aligned with plan.columns. */
export interface TransferRow {
  requestId: string;
  /** the request ID of the target copy, when the source copy knows it (new-id); else requestId */
  targetKey: string;
  values: (string | null)[];
  /** the target copy's dso_mapping_history (JSON text) */
  history: string;
  /** the source copy's dso_modified_at (newer-wins) */
  modifiedAt: string | null;
  /** WAL position of the source change */
  lsn: bigint;
  /** positions of the request's earlier changes this row replaced in its group */
  coalesced?: bigint[];
}

interface TransferStatements {
  /** COPY into the form: the fast path when none of the requests is on the target yet */
  copy: string;
  /** INSERT with the target's own key (new-id); returns the keys it took */
  insertNewId: string;
  /** find, settle conflicts, update, insert; returns the request IDs found or inserted */
  upsert: string;
}

const statements = new WeakMap<ColumnPlan, TransferStatements>();

// The plain INSERT's parameters after the column arrays: +1 ids, +2 histories, +3 master,
// +4 current server, +5 current form, +6 from server, +7 from form, +8 mapping.
// The upsert's: +1 ids, +2 histories, +3 target keys, +4 source modification times, +5 master,
// +6 current server, +7 current form, +8 from server, +9 from form, +10 mapping,
// +11 this target server, +12 the target form (schema.table), +13 column names.
function transferStatements(plan: ColumnPlan): TransferStatements {
  const cached = statements.get(plan);
  if (cached) return cached;
  const { mapping, target } = plan;
  const key = quoteIdent(target.keyColumn);
  const table = qualified(target.schema, target.table);
  const n = plan.columns.length;
  const dataColumns = plan.columns.map((c) => quoteIdent(c.target));
  const casts = plan.columns.map((c, i) => `u.c${i}::${c.castType}`);
  const arrays = plan.columns.map((_, i) => `$${i + 1}::text[]`);
  const cols = plan.columns.map((_, i) => `c${i}`);
  const dsoValues = (p: (k: number) => string) =>
    [
      ['dso_master', `${p(1)}::boolean`],
      ['dso_current_server', `${p(2)}::text`],
      ['dso_current_form', `${p(3)}::text`],
      ['dso_from_server', `${p(4)}::text`],
      ['dso_from_form', `${p(5)}::text`],
      ['dso_from_request_id', 'u.rid'],
      ['dso_from_mapping', `${p(6)}::text`],
      ['dso_mapping_history', 'u.hist::jsonb'],
      ['dso_to_server', 'NULL::text'],
      ['dso_to_form', 'NULL::text'],
      ['dso_to_request_id', 'NULL::text'],
      ['dso_to_mapping', 'NULL::text'],
    ] as const;
  const insertInto = (withKey: boolean, dso: ReturnType<typeof dsoValues>) => {
    const into = [...(withKey ? [key] : []), ...dataColumns, ...dso.map(([name]) => quoteIdent(name)), 'dso_synced_version'];
    return `INSERT INTO ${table} AS t (${into.join(', ')})
SELECT ${[...(withKey ? [`u.rid::${target.keyType}`] : []), ...casts, ...dso.map(([, value]) => value), '1'].join(', ')}`;
  };
  // plain INSERT and new-id: scalars from +3
  const plainDso = dsoValues((k) => `$${n + 2 + k}`);
  const unnestPlain = `unnest(${[...arrays, `$${n + 1}::text[]`, `$${n + 2}::text[]`].join(', ')})
         AS u(${[...cols, 'rid', 'hist'].join(', ')})`;
  // COPY: the plain INSERT's columns (TransferGroup.tryCopy writes the values)
  const copied = [key, ...dataColumns, ...plainDso.map(([name]) => quoteIdent(name)), 'dso_synced_version'];
  const copy = `COPY ${table} (${copied.join(', ')}) FROM STDIN`;
  const insertNewId = `${insertInto(false, plainDso)}
  FROM ${unnestPlain}
RETURNING t.${key}::text AS key, t.dso_from_request_id AS rid`;

  // upsert: scalars from +5
  const p = (k: number) => `$${n + k}`;
  const upsertDso = dsoValues((k) => p(4 + k));
  const ownsTarget = mapping.transferMode !== 'data-only';
  // A copy that stays read-only (data-only) keeps its dso_to_*; a master copy forgets where it
  // was sent before (it is the master again).
  const updatedDso = upsertDso.filter(([name]) => ownsTarget || !name.startsWith('dso_to_'));
  // A copy that would not change is not written: no WAL, nothing for the target's filters, no
  // ping-pong between two servers that transfer to each other. Values
  // compare as the target type's text (json, point, xml have no equality operator).
  // Where a copy was sent (dso_to_*) is not news either. With ownership, a new hop is: the
  // ownership moves, even when the values do not change (loop detection stops a loop).
  const compared = updatedDso.filter(
    ([name]) => !name.startsWith('dso_to_') && (name !== 'dso_mapping_history' || mapping.transferMode === 'data+ownership'),
  );
  const sameRequest = sameRequestSql(
    target.keyColumn,
    `${p(11)}`,
    `(u.hist::jsonb -> 0 ->> 'fromServer')`,
    `(u.hist::jsonb -> 0 ->> 'fromRequestId')`,
  );
  let match: string;
  // changed since the last sync; a copy never synced (an original whose bookkeeping has not run
  // yet, a request created here) holds local changes too
  let conflicted = 't.dso_version IS DISTINCT FROM t.dso_synced_version';
  if (mapping.match !== 'request-id') {
    match = mapping.match.fields
      .map((field) => {
        const i = plan.columns.findIndex((c) => c.target === field);
        if (i < 0) throw new Error(`mapping "${mapping.name}": match field "${field}" is not a column the mapping carries`);
        return `t.${quoteIdent(field)} IS NOT DISTINCT FROM u.c${i}::${plan.columns[i]!.castType}`;
      })
      .join(' AND ');
  } else if (mapping.duplicateRequestId === 'overwrite') {
    match = `t.${key} = u.tkey::${target.keyType}`;
    conflicted = `(${conflicted}) OR NOT (${sameRequest})`;
  } else {
    match = `t.${key} = u.tkey::${target.keyType} AND ${sameRequest}`;
  }
  const kept =
    mapping.conflict === 'target-wins'
      ? 'true'
      : mapping.conflict === 'newer-wins'
        ? `t.dso_modified_at > coalesce(u.mods::timestamptz, '-infinity')`
        : 'false';
  const unnested = [...arrays, ...[1, 2, 3, 4].map((k) => `${p(k)}::text[]`)];
  const assignments = [
    ...dataColumns.map((c, i) => `${c} = ${casts[i]}`),
    ...updatedDso.map(([name, value]) => `${quoteIdent(name)} = ${value}`),
    'dso_synced_version = t.dso_version + 1',
  ];
  const upsert = `WITH u AS (SELECT *, ${p(11)}::text AS here
                FROM unnest(${unnested.join(', ')}) AS u(${[...cols, 'rid', 'hist', 'tkey', 'mods'].join(', ')})),
f AS (SELECT u.rid, t.${key}::text AS key, c.conflicted, c.conflicted AND (${kept}) AS kept,
             CASE WHEN c.conflicted THEN to_jsonb(t) END AS local
        FROM u JOIN ${table} t ON ${match}
        CROSS JOIN LATERAL (SELECT (${conflicted}) AS conflicted) c),
logged AS (INSERT INTO pgdso.conflicts (mapping, form, request_id, local, incoming, resolution, policy, from_server)
           SELECT ${p(10)}, ${p(12)}, f.rid, f.local,
                  json_object(${p(13)}::text[], ARRAY[${cols.map((c) => `u.${c}`).join(', ') || 'NULL::text'}]::text[])::jsonb
                    || jsonb_build_object(${quoteLiteral(target.keyColumn)}, u.rid, 'dso_modified_at', u.mods),
                  CASE WHEN f.kept THEN 'kept-local' ELSE 'applied-incoming' END, ${quoteLiteral(mapping.conflict)}, ${p(8)}
             FROM f JOIN u ON u.rid = f.rid WHERE f.conflicted),
upd AS (UPDATE ${table} t SET ${assignments.join(', ')}
          FROM f JOIN u ON u.rid = f.rid
         WHERE ${match} AND NOT f.kept
           AND ROW(${[...dataColumns.map((c) => `t.${c}::text`), ...compared.map(([name]) => `t.${quoteIdent(name)}`)].join(', ')})
               IS DISTINCT FROM ROW(${[...casts.map((c) => `(${c})::text`), ...compared.map(([, value]) => value)].join(', ')})
        RETURNING u.rid),
ins AS (${insertInto(true, upsertDso)}
          FROM u WHERE NOT EXISTS (SELECT 1 FROM f WHERE f.rid = u.rid)
        ON CONFLICT (${key}) DO NOTHING
        RETURNING t.${key}::text AS rid)
SELECT rid, key FROM f UNION ALL SELECT rid, rid FROM ins`;
  const built = { copy, insertNewId, upsert };
  statements.set(plan, built);
  return built;
}

/** Transfers of one mapping into the lane of its target; one row per request (last wins). */
export class TransferGroup extends RequestGroup<TransferRow> {
  /** every request came from a source insert: try a plain COPY before the upsert */
  private plainInsert = true;

  /**
   * `assigned` receives the target keys that differ from the request ID (new-id, match by
   * fields), for the source copy's dso_to_request_id.
   */
  constructor(
    readonly plan: ColumnPlan,
    private readonly source: FormInfo,
    private readonly assigned: Map<string, string>,
  ) {
    super(`${plan.target.schema}.${plan.target.table}`);
  }

  /** Adds a request; a later change of the same request replaces the earlier (one statement). */
  addChange(row: TransferRow, fromInsert: boolean): void {
    if (!fromInsert || this.rows.has(row.requestId)) this.plainInsert = false;
    this.add(row);
  }

  async execute(client: pg.ClientBase): Promise<ApplyFailure[]> {
    return applyIsolating(
      client,
      [...this.rows.values()],
      (rows) => this.applyRows(client, rows),
      (row, err) => this.failure(row, err),
    );
  }

  private columnArrays(rows: TransferRow[]): string[] {
    const arrays: (string | null)[][] = this.plan.columns.map(() => new Array(rows.length));
    rows.forEach((row, r) => {
      for (let c = 0; c < arrays.length; c++) arrays[c]![r] = row.values[c]!;
    });
    return arrays.map(textArrayLiteral);
  }

  private async applyRows(client: pg.ClientBase, rows: TransferRow[]): Promise<ApplyFailure[]> {
    const { plan } = this;
    const { mapping } = plan;
    const ownsTarget = mapping.transferMode !== 'data-only';
    const scalars = [
      ownsTarget,
      ownsTarget ? mapping.to.server : mapping.from.server,
      ownsTarget ? mapping.to.table : mapping.from.table,
      mapping.from.server,
      mapping.from.table,
      mapping.name,
    ];
    const sql = transferStatements(plan);
    // (matched by fields, a new request may still have a copy under another ID: no fast path)
    if (this.plainInsert && mapping.match === 'request-id' && (await this.tryCopy(client, sql.copy, rows, scalars))) return [];
    const arrays = this.columnArrays(rows);
    const ids = textArrayLiteral(rows.map((r) => r.requestId));
    const histories = textArrayLiteral(rows.map((r) => r.history));
    const result = await client.query(sql.upsert, [
      ...arrays,
      ids,
      histories,
      textArrayLiteral(rows.map((r) => r.targetKey)),
      textArrayLiteral(rows.map((r) => r.modifiedAt)),
      ...scalars,
      mapping.to.server,
      `${plan.target.schema}.${plan.target.table}`,
      textArrayLiteral(plan.columns.map((c) => c.target)),
    ]);
    const written = new Set<string>();
    for (const { rid, key } of result.rows as { rid: string; key: string }[]) {
      written.add(rid);
      // a copy found under another ID (match by fields, new-id): the source copy learns it
      if (key !== rid) this.assigned.set(rid, key);
    }
    if (written.size === rows.length) return [];
    // not written: the target holds that ID for a different request
    const duplicates = rows.filter((row) => !written.has(row.requestId));
    if (mapping.duplicateRequestId !== 'new-id') {
      const holders = await this.holders(client, duplicates);
      return duplicates.map((row) => this.failure(row, duplicateError(mapping, row, holders.get(row.targetKey))));
    }
    const inserted = await client.query(sql.insertNewId, [
      ...this.columnArrays(duplicates),
      textArrayLiteral(duplicates.map((r) => r.requestId)),
      textArrayLiteral(duplicates.map((r) => r.history)),
      ...scalars,
    ]);
    for (const { key, rid } of inserted.rows as { key: string; rid: string }[]) this.assigned.set(rid, key);
    return [];
  }

  /** The request each duplicate ID is held by on the target, as "server:request ID" of its root. */
  private async holders(client: pg.ClientBase, rows: TransferRow[]): Promise<Map<string, string>> {
    const { target, mapping } = this.plan;
    const key = quoteIdent(target.keyColumn);
    const res = await client.query(
      `SELECT t.${key}::text AS key,
              coalesce(t.dso_mapping_history -> 0 ->> 'fromServer', $2) || ':'
                || coalesce(t.dso_mapping_history -> 0 ->> 'fromRequestId', t.${key}::text) AS root
         FROM ${qualified(target.schema, target.table)} t WHERE t.${key} = ANY ($1::text[]::${target.keyType}[])`,
      [textArrayLiteral(rows.map((r) => r.targetKey)), mapping.to.server],
    );
    return new Map(res.rows.map((r: { key: string; root: string }) => [r.key, r.root]));
  }

  /**
   * The rows COPied in, run under the group's savepoint (applyIsolating); false, and the
   * savepoint rolled back to, when a request is already there (then the upsert runs instead).
   */
  private async tryCopy(client: pg.ClientBase, sql: string, rows: TransferRow[], scalars: readonly (string | boolean)[]): Promise<boolean> {
    const [master, ...texts] = scalars;
    // the columns after the data: dso_master .. dso_from_form, then per row dso_from_request_id,
    // then dso_from_mapping, then per row the history; dso_to_* NULL; dso_synced_version 1
    const middle = `${master ? 't' : 'f'}\t${texts
      .slice(0, 4)
      .map((v) => copyField(String(v)))
      .join('\t')}`;
    const mappingName = copyField(String(texts[4]));
    let data = '';
    for (const row of rows) {
      const rid = copyField(row.requestId);
      let line = rid;
      for (const value of row.values) line += `\t${copyField(value)}`;
      data += `${line}\t${middle}\t${rid}\t${mappingName}\t${copyField(row.history)}\t\\N\t\\N\t\\N\t\\N\t1\n`;
    }
    try {
      await copyIn(client, sql, data);
      return true;
    } catch (err) {
      if (sqlstateOf(err) !== '23505') throw err;
      await client.query(`ROLLBACK TO SAVEPOINT ${GROUP_SAVEPOINT}`);
      return false;
    }
  }

  private failure(row: TransferRow, err: unknown): ApplyFailure {
    const { mapping } = this.plan;
    const classified = classifyError(err);
    const payload: Record<string, unknown> = { [this.plan.target.keyColumn]: row.requestId };
    this.plan.columns.forEach((c, i) => {
      payload[c.target] = row.values[i];
    });
    return {
      type: 'transfer',
      mapping,
      source: this.source,
      targetServer: mapping.to.server,
      requestId: row.requestId,
      lsn: row.lsn,
      coalesced: row.coalesced,
      payload: {
        target: `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`,
        values: payload,
        history: parseJsonOr(row.history),
      },
      error: `mapping "${mapping.name}": request ${row.requestId} to ${mapping.to.server}.${mapping.to.table}: ${classified.message}`,
      sqlstate: classified.sqlstate,
    };
  }
}

class DuplicateRequestError extends Error {
  readonly code = '23505';
}

function duplicateError(mapping: MappingConfig, row: TransferRow, holder: string | undefined): DuplicateRequestError {
  let incoming = `${mapping.from.server}:${row.requestId}`;
  try {
    const first = (JSON.parse(row.history) as { fromServer?: string; fromRequestId?: string }[])[0];
    if (first?.fromServer && first.fromRequestId) incoming = `${first.fromServer}:${first.fromRequestId}`;
  } catch {
    // the history was checked before it was sent
  }
  return new DuplicateRequestError(
    `duplicate request ID: ${mapping.to.server}.${mapping.to.table} already holds request ID ${row.targetKey} ` +
      `for request ${holder ?? '(unknown)'}, a different request from the incoming ${incoming} ` +
      `(duplicateRequestId: ${mapping.duplicateRequestId})`,
  );
}
