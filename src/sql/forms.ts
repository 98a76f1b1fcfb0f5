// `pgdso forms enable`: turns a table into a DSO form. Adds the distributed columns, the
// ownership guard, replica identity full (filters see old rows; unchanged TOAST values are
// known), publication membership and the server's logical slot. Idempotent.
import pg from 'pg';
import { LOCK_NAMESPACE, LOCKS, PUBLICATION, qualified, quoteIdent, quoteLiteral, slotName } from './identifiers.ts';

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

/**
 * The guard. Non-master copies refuse UPDATE and DELETE from every session except the engine's.
 * It also raises dso_version and sets dso_modified_at on every update (inserts take the column
 * defaults: no trigger on INSERT, which keeps bulk transfers fast).
 * The engine is recognised by an active replication origin session, which needs EXECUTE on
 * pg_replication_origin_session_setup(): a privilege ordinary roles do not have, and no
 * setting a session can change grants it. SECURITY DEFINER lets any role call the check.
 */
const GUARD_FUNCTION = `
CREATE OR REPLACE FUNCTION pgdso.row_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $guard$
BEGIN
  IF NOT OLD.dso_master AND NOT pg_replication_origin_session_is_setup() THEN
    RAISE EXCEPTION USING
      ERRCODE = 'P0001',
      MESSAGE = format('pgdso: request %s of %s is owned by %s',
                       to_jsonb(OLD) ->> TG_ARGV[0], TG_TABLE_NAME,
                       coalesce(OLD.dso_current_server, 'another server')),
      HINT = 'Change the master copy, on the owning server.';
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  IF TG_OP = 'UPDATE' THEN
    NEW.dso_version := OLD.dso_version + 1;
  END IF;
  NEW.dso_modified_at := clock_timestamp();
  RETURN NEW;
END
$guard$`;

export interface FormInfo {
  schema: string;
  table: string;
  keyColumn: string;
  keyType: string;
}

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
  return { schema, table, keyColumn: attname, keyType: type };
}

export interface EnableResult { form: FormInfo; slot: string; slotCreated: boolean }

export async function enableForm(connection: pg.ClientConfig, schema: string, table: string): Promise<EnableResult> {
  const client = new pg.Client({ ...connection, application_name: 'pgdso forms enable' });
  await client.connect();
  try {
    await client.query('BEGIN');
    await client.query('SELECT pg_advisory_xact_lock($1, $2)', [LOCK_NAMESPACE, LOCKS.migrate]);
    const schemaReady = await client.query(`SELECT to_regclass('pgdso.forms') AS t`);
    if (!schemaReady.rows[0].t) throw new FormError('the control schema pgdso is missing: run `pgdso migrate` first');
    const form = await describeForm(client, schema, table);
    const target = qualified(schema, table);
    for (const [name, type] of DSO_COLUMNS) {
      await client.query(`ALTER TABLE ${target} ADD COLUMN IF NOT EXISTS ${quoteIdent(name)} ${type}`);
    }
    await client.query(GUARD_FUNCTION);
    await client.query(`DROP TRIGGER IF EXISTS pgdso_guard ON ${target}`);
    await client.query(
      `CREATE TRIGGER pgdso_guard BEFORE UPDATE OR DELETE ON ${target}
       FOR EACH ROW EXECUTE FUNCTION pgdso.row_guard(${quoteLiteral(form.keyColumn)})`,
    );
    await client.query(`ALTER TABLE ${target} REPLICA IDENTITY FULL`);
    const member = await client.query(
      'SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3',
      [PUBLICATION, schema, table],
    );
    if (member.rowCount === 0) await client.query(`ALTER PUBLICATION ${quoteIdent(PUBLICATION)} ADD TABLE ${target}`);
    await client.query(
      `INSERT INTO pgdso.forms (schema_name, table_name, key_column) VALUES ($1, $2, $3)
       ON CONFLICT (schema_name, table_name) DO UPDATE SET key_column = EXCLUDED.key_column`,
      [schema, table, form.keyColumn],
    );
    await client.query('COMMIT');
    const database = (await client.query('SELECT current_database() AS db')).rows[0].db as string;
    const slot = slotName(database);
    const slotCreated = await ensureSlot(client, slot);
    return { form, slot, slotCreated };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    await client.end();
  }
}

/** Creates the server's logical slot (pgoutput) unless it exists. Returns true if created. */
export async function ensureSlot(client: pg.ClientBase, slot: string): Promise<boolean> {
  const existing = await client.query('SELECT plugin FROM pg_replication_slots WHERE slot_name = $1', [slot]);
  if (existing.rowCount) {
    if (existing.rows[0].plugin !== 'pgoutput') throw new FormError(`replication slot ${slot} exists with plugin ${existing.rows[0].plugin}, not pgoutput`);
    return false;
  }
  try {
    await client.query(`SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, [slot]);
    return true;
  } catch (err) {
    if ((err as { code?: string }).code === '42710') return false; // created meanwhile by another instance
    throw err;
  }
}
