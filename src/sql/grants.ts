// What to grant when PostgreSQL refuses the engine: a permanent error (a privilege, a login)
// turned into the statement a DBA runs. One place, for the engine's log, status and the checks.
import { quoteIdent } from './identifiers.ts';

/** The replication-origin and message functions the engine calls, with their signatures. */
export const ENGINE_FUNCTIONS: readonly string[] = [
  'pg_replication_origin_create(text)',
  'pg_replication_origin_session_setup(text)',
  'pg_replication_origin_session_is_setup()',
];

export interface Refusal {
  /** what is missing, in a few words */
  missing: string;
  /** the statement (or action) that fixes it */
  fix: string;
}

/**
 * The fix for a refusal, from its SQLSTATE and message; null when it is not a refusal this
 * function knows. `role` is the role pgdso connects as, `database` its database.
 */
export function refusalOf(sqlstate: string | null, message: string, role: string, database: string): Refusal | null {
  const r = quoteIdent(role);
  if (sqlstate === '28P01')
    return {
      missing: `the password of role ${role}`,
      fix: `check the password of ${role} in the config (and ALTER ROLE ${r} PASSWORD '...')`,
    };
  if (sqlstate === '28000')
    return {
      missing: `a pg_hba.conf entry or login for role ${role}`,
      fix:
        `add a pg_hba.conf line for ${role} (database ${database}, and "replication" for the slot) ` +
        `and SELECT pg_reload_conf(); ALTER ROLE ${r} LOGIN if needed`,
    };
  if (sqlstate === '3D000')
    return { missing: `database ${database}`, fix: `CREATE DATABASE ${quoteIdent(database)}, or correct the database in the config` };
  if (sqlstate !== '42501') return null;
  if (/replication role|start WAL sender|replication slots|REPLICATION attribute/i.test(message)) {
    return { missing: `the REPLICATION attribute of role ${role}`, fix: `ALTER ROLE ${r} REPLICATION;` };
  }
  const fn = /permission denied for function (\w+)/.exec(message);
  if (fn) {
    const signature = ENGINE_FUNCTIONS.find((f) => f.startsWith(`${fn[1]}(`)) ?? `${fn[1]}(...)`;
    return { missing: `EXECUTE on ${fn[1]}`, fix: `GRANT EXECUTE ON FUNCTION pg_catalog.${signature} TO ${r};` };
  }
  const table = /permission denied for (?:table|relation) (\S+)/.exec(message);
  if (table)
    return { missing: `privileges on table ${table[1]}`, fix: `GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE ${table[1]} TO ${r};` };
  const sequence = /permission denied for sequence (\S+)/.exec(message);
  if (sequence) return { missing: `privileges on sequence ${sequence[1]}`, fix: `GRANT USAGE, SELECT ON SEQUENCE ${sequence[1]} TO ${r};` };
  const schema = /permission denied for schema (\S+)/.exec(message);
  if (schema) return { missing: `USAGE on schema ${schema[1]}`, fix: `GRANT USAGE ON SCHEMA ${schema[1]} TO ${r};` };
  if (/permission denied for database/.test(message))
    return {
      missing: `CONNECT or CREATE on database ${database}`,
      fix: `GRANT CONNECT, CREATE ON DATABASE ${quoteIdent(database)} TO ${r};`,
    };
  return { missing: 'a privilege', fix: `grant role ${role} what the message names (${message})` };
}

/**
 * The GRANT statements that give the connected role what pgdso needs on these forms (schema
 * usage, SELECT, INSERT, UPDATE, DELETE), from the server's own privilege functions; empty when
 * nothing is missing.
 */
export async function missingFormGrants(
  client: { query: (text: string, values: unknown[]) => Promise<{ rows: unknown[] }> },
  forms: readonly { schema: string; table: string }[],
): Promise<string[]> {
  const res = await client.query(
    `SELECT f.s, f.t, current_user AS role, has_schema_privilege(f.s, 'USAGE') AS usage,
            array_remove(ARRAY[CASE WHEN NOT has_table_privilege(c.oid, 'SELECT') THEN 'SELECT' END,
                               CASE WHEN NOT has_table_privilege(c.oid, 'INSERT') THEN 'INSERT' END,
                               CASE WHEN NOT has_table_privilege(c.oid, 'UPDATE') THEN 'UPDATE' END,
                               CASE WHEN NOT has_table_privilege(c.oid, 'DELETE') THEN 'DELETE' END], NULL) AS missing
       FROM jsonb_to_recordset($1::jsonb) AS f(s text, t text)
       JOIN pg_namespace n ON n.nspname = f.s JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = f.t`,
    [JSON.stringify(forms.map((f) => ({ s: f.schema, t: f.table })))],
  );
  const grants: string[] = [];
  for (const row of res.rows as { s: string; t: string; role: string; usage: boolean; missing: string[] }[]) {
    if (!row.usage) grants.push(`GRANT USAGE ON SCHEMA ${quoteIdent(row.s)} TO ${quoteIdent(row.role)};`);
    if (row.missing.length)
      grants.push(`GRANT ${row.missing.join(', ')} ON TABLE ${quoteIdent(row.s)}.${quoteIdent(row.t)} TO ${quoteIdent(row.role)};`);
  }
  return grants;
}
