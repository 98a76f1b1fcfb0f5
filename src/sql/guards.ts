// The guards pgdso puts on a form: the ownership guard (row trigger), the request ID guard
// (row trigger that fires only when the key changes) and the TRUNCATE guard (statement trigger,
// on the form and on each partition: statement triggers are not inherited by partitions).
import { quoteIdent, quoteLiteral } from './identifiers.ts';

/**
 * The ownership guard. Non-master copies refuse UPDATE and DELETE from every session except the
 * engine's. It also raises dso_version and sets dso_modified_at on every update (inserts take
 * the column defaults: no trigger on INSERT, which keeps bulk transfers fast).
 * The engine is recognised by an active replication origin session, which needs EXECUTE on
 * pg_replication_origin_session_setup(): a privilege ordinary roles do not have, and no
 * setting a session can change grants it. SECURITY DEFINER lets any role call the check: the
 * function's owner must hold EXECUTE on pg_replication_origin_session_is_setup() (checked by
 * forms enable, and probed). Arguments: the request ID column, the form's name.
 */
const ROW_GUARD = `
CREATE OR REPLACE FUNCTION pgdso.row_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $guard$
BEGIN
  IF NOT OLD.dso_master AND NOT pg_replication_origin_session_is_setup() THEN
    RAISE EXCEPTION USING
      ERRCODE = 'P0001',
      MESSAGE = format('pgdso: request %s of %s is owned by %s',
                       to_jsonb(OLD) ->> TG_ARGV[0], coalesce(TG_ARGV[1], TG_TABLE_NAME),
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

/**
 * AR System treats the Request ID as immutable: the copies of a request find each other by it.
 * Fired only by an UPDATE whose SET names the key and changes it (see the trigger's WHEN), for
 * every session, the engine's included. Arguments: the request ID column, the form's name.
 */
const REQUEST_ID_GUARD =
  `
CREATE OR REPLACE FUNCTION pgdso.request_id_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $guard$
BEGIN
  RAISE EXCEPTION USING
    ERRCODE = 'P0001',
    MESSAGE = format('pgdso: the request ID of %s cannot change (request %s -> %s): ` +
  `request IDs are immutable, the copies of a request on other servers are found by it',
                     TG_ARGV[1], to_jsonb(OLD) ->> TG_ARGV[0], to_jsonb(NEW) ->> TG_ARGV[0]),
    HINT = 'Insert a new request with the new ID and delete this one: pgdso carries both.';
END
$guard$`;

/**
 * TRUNCATE fires no row trigger. Refused while the relation holds read-only copies (owned
 * elsewhere) or master copies with copies elsewhere (sent on, or received from a server that
 * keeps a read-only copy); allowed otherwise, and for the engine's sessions (as the ownership
 * guard). SECURITY DEFINER: it reads the form and asks about the origin session as its owner.
 * Argument: the form's name.
 *
 * (The long lines of the function are split in the TypeScript source with `+`, so that the body
 * stays as it was: forms enable compares it with pg_proc.prosrc.)
 */
const TRUNCATE_GUARD =
  `
CREATE OR REPLACE FUNCTION pgdso.truncate_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $guard$
DECLARE
  servers text;
BEGIN
  IF pg_replication_origin_session_is_setup() THEN
    RETURN NULL;
  END IF;
  EXECUTE format('SELECT string_agg(DISTINCT s, '', '' ORDER BY s) ` +
  `FROM (SELECT coalesce(dso_current_server, ''another server'') AS s FROM %s WHERE NOT dso_master LIMIT 1000) AS x', TG_RELID::regclass)
    INTO servers;
  IF servers IS NOT NULL THEN
    RAISE EXCEPTION USING
      ERRCODE = 'P0001',
      MESSAGE = format('pgdso: %s cannot be truncated: it holds read-only copies of requests that are owned by %s', TG_ARGV[0], servers),
      HINT = 'Change or delete those requests on their owning server; or run pgdso forms disable first.';
  END IF;
  -- a master with copies elsewhere: sent on (dso_to_server), or received (dso_from_server: the
  -- copy it came from is read-only and would be left without a master)
  EXECUTE format('SELECT string_agg(DISTINCT s, '', '' ORDER BY s) ` +
  `FROM (SELECT dso_to_server, dso_from_server FROM %s ` +
  `WHERE dso_master AND (dso_to_server IS NOT NULL OR dso_from_server IS NOT NULL) LIMIT 1000) AS r, ` +
  `unnest(ARRAY[r.dso_to_server, r.dso_from_server]) AS s WHERE s IS NOT NULL', TG_RELID::regclass)
    INTO servers;
  IF servers IS NOT NULL THEN
    RAISE EXCEPTION USING
      ERRCODE = 'P0001',
      MESSAGE = format('pgdso: %s cannot be truncated: ` +
  `it holds master copies of requests with copies on %s, which TRUNCATE would leave behind', TG_ARGV[0], servers),
      HINT = 'DELETE the rows instead (pgdso carries the deletes to the copies), or run pgdso forms disable first.';
  END IF;
  RETURN NULL;
END
$guard$`;

export const GUARD_FUNCTIONS: ReadonlyArray<{ name: string; sql: string }> = [
  { name: 'row_guard', sql: ROW_GUARD },
  { name: 'request_id_guard', sql: REQUEST_ID_GUARD },
  { name: 'truncate_guard', sql: TRUNCATE_GUARD },
];

/** The body of a function as pg_proc.prosrc holds it, to tell whether it needs replacing. */
export function functionBody(sql: string): string {
  const start = sql.indexOf('$guard$') + '$guard$'.length;
  return sql.slice(start, sql.lastIndexOf('$guard$'));
}

export interface TriggerSpec {
  name: string;
  function: string;
  args: string[];
  /** on the form only, or also on each partition (statement triggers are not inherited) */
  everyPartition: boolean;
  create(relation: string): string;
}

/** The triggers of a form; `form` is the name its messages use. */
export function guardTriggers(keyColumn: string, form: string): TriggerSpec[] {
  const key = quoteIdent(keyColumn);
  const args = (list: string[]) => list.map(quoteLiteral).join(', ');
  return [
    {
      name: 'pgdso_guard',
      function: 'row_guard',
      args: [keyColumn, form],
      everyPartition: false,
      create: (rel) =>
        `CREATE TRIGGER pgdso_guard BEFORE UPDATE OR DELETE ON ${rel}
           FOR EACH ROW EXECUTE FUNCTION pgdso.row_guard(${args([keyColumn, form])})`,
    },
    {
      name: 'pgdso_request_id',
      function: 'request_id_guard',
      args: [keyColumn, form],
      everyPartition: false,
      create: (rel) =>
        `CREATE TRIGGER pgdso_request_id BEFORE UPDATE OF ${key} ON ${rel}
           FOR EACH ROW WHEN (OLD.${key} IS DISTINCT FROM NEW.${key}) EXECUTE FUNCTION pgdso.request_id_guard(${args([keyColumn, form])})`,
    },
    {
      name: 'pgdso_truncate',
      function: 'truncate_guard',
      args: [form],
      everyPartition: true,
      create: (rel) =>
        `CREATE TRIGGER pgdso_truncate BEFORE TRUNCATE ON ${rel} FOR EACH STATEMENT EXECUTE FUNCTION pgdso.truncate_guard(${args([form])})`,
    },
  ];
}

export const GUARD_TRIGGER_NAMES: ReadonlySet<string> = new Set(['pgdso_guard', 'pgdso_request_id', 'pgdso_truncate']);
