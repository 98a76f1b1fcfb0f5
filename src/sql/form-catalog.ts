// What a form is, read from the catalogs: the distributed columns DSO adds to it, its request
// ID (a one-column primary key), and the domains whose base types its values are read as.
import type pg from 'pg';

export const DSO_COLUMNS: ReadonlyArray<readonly [string, string]> = [
  ['dso_master', 'boolean NOT NULL DEFAULT true'],
  ['dso_transfer_status', 'text'],
  ['dso_update_status', 'text'],
  ['dso_current_server', 'text'],
  ['dso_current_form', 'text'],
  ['dso_from_server', 'text'],
  ['dso_from_form', 'text'],
  ['dso_from_request_id', 'text'],
  ['dso_from_mapping', 'text'],
  ['dso_to_server', 'text'],
  ['dso_to_form', 'text'],
  ['dso_to_request_id', 'text'],
  ['dso_to_mapping', 'text'],
  ['dso_mapping_history', "jsonb NOT NULL DEFAULT '[]'::jsonb"],
  ['dso_version', 'bigint NOT NULL DEFAULT 1'],
  ['dso_modified_at', 'timestamptz NOT NULL DEFAULT now()'],
  // not in DSO: the dso_version this copy had right after the engine last wrote it (null: never
  // written by the engine). A copy whose dso_version has moved past it changed locally since
  // the last sync: a conflict for an incoming transfer.
  ['dso_synced_version', 'bigint'],
];
export const DSO_COLUMN_NAMES: ReadonlySet<string> = new Set(DSO_COLUMNS.map(([n]) => n));

const KEY_TYPES = new Set(['text', 'character varying', 'integer', 'bigint', 'smallint', 'uuid']);

export interface FormInfo {
  oid: number;
  schema: string;
  table: string;
  keyColumn: string;
  keyType: string;
}

/** The form itself is wrong (missing, no usable key): bad usage, exit 2. */
export class FormError extends Error {}

export async function describeForm(client: pg.ClientBase, schema: string, table: string): Promise<FormInfo> {
  const rel = await client.query(
    `SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')`,
    [schema, table],
  );
  if (rel.rowCount === 0) throw new FormError(`form ${schema}.${table} does not exist`);
  const key = await client.query(
    `SELECT a.attname, format_type(a.atttypid, NULL) AS type
       FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
      WHERE i.indrelid = $1 AND i.indisprimary`,
    [rel.rows[0].oid],
  );
  if (key.rowCount !== 1) {
    throw new FormError(`form ${schema}.${table} needs a primary key of one column (the request ID); it has ${key.rowCount}`);
  }
  const { attname, type } = key.rows[0];
  if (!KEY_TYPES.has(type)) {
    throw new FormError(`form ${schema}.${table}: the request ID column ${attname} is ${type}; use text, varchar, an integer type or uuid`);
  }
  return { oid: rel.rows[0].oid as number, schema, table, keyColumn: attname, keyType: type };
}

/** Every domain of the database with its (ultimate) base type. */
export async function domainBaseTypes(client: pg.ClientBase): Promise<Map<number, number>> {
  const res = await client.query(`SELECT oid::int AS oid, typbasetype::int AS base FROM pg_type WHERE typtype = 'd'`);
  const direct = new Map<number, number>(res.rows.map((r: { oid: number; base: number }) => [r.oid, r.base]));
  const resolved = new Map<number, number>();
  for (const oid of direct.keys()) {
    let base = direct.get(oid)!;
    for (let depth = 0; direct.has(base) && depth < 32; depth++) base = direct.get(base)!;
    resolved.set(oid, base);
  }
  return resolved;
}
