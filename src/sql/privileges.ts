// What pgdso needs from a server and from each form, checked before anything is changed, by
// `pgdso forms enable` (which refuses) and `pgdso rules check` (which reports) alike. Each
// finding carries the exact statement that fixes it, written for the connected role.
import type pg from 'pg';
import { PUBLICATION, quoteIdent, qualified, slotName } from './identifiers.ts';

export interface Check {
  message: string;
  /** the statement (or command) that fixes it */
  fix: string;
  /** the form cannot even be read until this is fixed (no USAGE on its schema) */
  blocking?: boolean;
}

/** The finding as one line: what is wrong, then the statement that fixes it. */
export function describeCheck(check: Check): string {
  return `${check.message}; fix: ${check.fix}`;
}

export const MIN_VERSION = 140000;
export const MAX_TESTED_VERSION = 189999;
export const SUPPORTED_VERSIONS = 'PostgreSQL 14 to 18';

/**
 * The origin functions the engine and the guards call (src/applier/lane.ts, the guards of
 * src/sql/guards.ts). pg_logical_emit_message (the engine's heartbeat) is executable by PUBLIC.
 */
export const ORIGIN_FUNCTIONS = [
  'pg_catalog.pg_replication_origin_create(text)',
  'pg_catalog.pg_replication_origin_session_setup(text)',
  'pg_catalog.pg_replication_origin_session_is_setup()',
] as const;
/** Needed by `pgdso uninstall` only (the origins of the engines that wrote into this server). */
export const ORIGIN_DROP_FUNCTION = 'pg_catalog.pg_replication_origin_drop(text)';
export const GUARD_ORIGIN_FUNCTION = 'pg_catalog.pg_replication_origin_session_is_setup()';

/** The refusal of a version pgdso cannot run on (null: fine). From server_version_num. */
export function versionCheck(serverVersionNum: number): Check | null {
  if (serverVersionNum >= MIN_VERSION) return null;
  const major = serverVersionNum >= 100000 ? Math.floor(serverVersionNum / 10000) : Math.floor(serverVersionNum / 100) / 100;
  return {
    message:
      `PostgreSQL ${major} (server_version_num ${serverVersionNum}) is not supported: pgdso needs ${SUPPORTED_VERSIONS}; ` +
      'before 14 the replication-origin functions are superuser-only, ' +
      'so no role but a superuser could run the engine or the ownership guard',
    fix: 'upgrade the server to PostgreSQL 14 or later (or run pgdso as a superuser at your own risk: not supported)',
  };
}

export interface ServerFacts {
  role: string;
  superuser: boolean;
  replication: boolean;
  versionNum: number;
  walLevel: string;
  maxSlots: number;
  usedSlots: number;
  maxWalSenders: number;
  usedWalSenders: number;
  slotExists: boolean;
  slotActive: boolean;
  canCreateInDatabase: boolean;
  database: string;
  /** ORIGIN_FUNCTIONS and ORIGIN_DROP_FUNCTION -> EXECUTE held */
  execute: Record<string, boolean>;
}

export async function serverFacts(client: pg.ClientBase): Promise<ServerFacts> {
  const functions = [...ORIGIN_FUNCTIONS, ORIGIN_DROP_FUNCTION];
  const res = await client.query(
    `SELECT current_user AS role, r.rolsuper AS superuser, r.rolreplication AS replication,
            current_setting('server_version_num')::int AS version_num, current_setting('wal_level') AS wal_level,
            current_setting('max_replication_slots')::int AS max_slots,
            (SELECT count(*)::int FROM pg_replication_slots) AS used_slots,
            current_setting('max_wal_senders')::int AS max_wal_senders,
            (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'walsender') AS used_wal_senders,
            has_database_privilege(current_database(), 'CREATE') AS can_create, current_database() AS database,
            (SELECT array_agg(has_function_privilege(f, 'EXECUTE') ORDER BY o)
               FROM unnest($1::text[]) WITH ORDINALITY AS u(f, o)) AS execute
       FROM pg_roles r WHERE r.rolname = current_user`,
    [functions],
  );
  const row = res.rows[0];
  const facts: ServerFacts = {
    role: row.role,
    superuser: row.superuser,
    replication: row.replication,
    versionNum: row.version_num,
    walLevel: row.wal_level,
    maxSlots: row.max_slots,
    usedSlots: row.used_slots,
    maxWalSenders: row.max_wal_senders,
    usedWalSenders: row.used_wal_senders,
    slotExists: false,
    slotActive: false,
    canCreateInDatabase: row.can_create,
    database: row.database,
    execute: Object.fromEntries(functions.map((f, i) => [f, row.execute[i] as boolean])),
  };
  const slot = await client.query('SELECT active FROM pg_replication_slots WHERE slot_name = $1', [slotName(facts.database)]);
  facts.slotExists = slot.rowCount === 1;
  facts.slotActive = slot.rowCount === 1 && slot.rows[0].active === true;
  return facts;
}

/**
 * What the server and the connected role lack to run pgdso (not form-specific). `decodes`: an
 * instance will decode this server's slot (a slot, a WAL sender, REPLICATION); a server that only
 * receives does not need them. `creates`: the control schema or a form still has to be made
 * (CREATE on the database, for `migrate` and `forms enable`).
 */
export function serverChecks(
  facts: ServerFacts,
  needs: { decodes: boolean; creates: boolean } = { decodes: true, creates: true },
): Check[] {
  const checks: Check[] = [];
  const role = quoteIdent(facts.role);
  const version = versionCheck(facts.versionNum);
  if (version) return [version];
  if (facts.walLevel !== 'logical') {
    checks.push({
      message: `wal_level is ${facts.walLevel}: logical decoding needs logical`,
      fix: 'ALTER SYSTEM SET wal_level = logical; -- then restart PostgreSQL',
    });
  }
  if (needs.decodes && !facts.slotExists && facts.usedSlots >= facts.maxSlots) {
    checks.push({
      message:
        `no free replication slot for pgdso's slot ${slotName(facts.database)} ` +
        `(max_replication_slots = ${facts.maxSlots}, ${facts.usedSlots} in use)`,
      fix: `ALTER SYSTEM SET max_replication_slots = ${facts.usedSlots + 1}; -- then restart PostgreSQL`,
    });
  }
  if (needs.decodes && !facts.slotActive && facts.usedWalSenders >= facts.maxWalSenders) {
    checks.push({
      message: `no free WAL sender for pgdso's stream (max_wal_senders = ${facts.maxWalSenders}, ${facts.usedWalSenders} in use)`,
      fix: `ALTER SYSTEM SET max_wal_senders = ${facts.usedWalSenders + 1}; -- then restart PostgreSQL`,
    });
  }
  if (facts.superuser) return checks;
  if (needs.decodes && !facts.replication) {
    checks.push({
      message: `role ${facts.role} has no REPLICATION attribute (the slot and the stream need it)`,
      fix: `ALTER ROLE ${role} REPLICATION;`,
    });
  }
  for (const fn of ORIGIN_FUNCTIONS) {
    if (!facts.execute[fn])
      checks.push({
        message: `role ${facts.role} cannot execute ${fn} (the engine's writes and the ownership guard need it)`,
        fix: `GRANT EXECUTE ON FUNCTION ${fn} TO ${role};`,
      });
  }
  if (needs.creates && !facts.canCreateInDatabase) checks.push(createCheck(facts));
  return checks;
}

/** CREATE on the database: the control schema and the publication are made with it. */
export function createCheck(facts: ServerFacts): Check {
  return {
    message: `role ${facts.role} cannot CREATE in database ${facts.database} (the control schema pgdso and the publication pgdso)`,
    fix: `GRANT CREATE ON DATABASE ${quoteIdent(facts.database)} TO ${quoteIdent(facts.role)};`,
  };
}

/** The relations of a form: the table itself and, for a partitioned table, every partition. */
export async function formRelations(
  client: pg.ClientBase,
  oid: number,
): Promise<Array<{ oid: number; schema: string; table: string; owner: string; partitioned: boolean; identity: string }>> {
  const res = await client.query(
    `SELECT c.oid::int AS oid, n.nspname AS schema, c.relname AS table, pg_get_userbyid(c.relowner) AS owner,
            c.relkind = 'p' AS partitioned, c.relreplident AS identity
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.oid = $1 OR c.oid IN (SELECT relid FROM pg_partition_tree($1::oid::regclass))
      ORDER BY c.oid <> $1, n.nspname, c.relname`,
    [oid],
  );
  return res.rows;
}

/**
 * What the connected role lacks on one form (and its partitions, schema and the guard's owner).
 * The right to alter the form and the publication counts only when `forms enable` has
 * something left to do (`needsAlter`, `needsPublicationChange`): an engine does not need it.
 */
export async function formChecks(
  client: pg.ClientBase,
  oid: number,
  schema: string,
  table: string,
  opts: { needsPublicationChange: boolean; needsAlter: boolean },
): Promise<Check[]> {
  const role = (await client.query('SELECT current_user AS role, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS su'))
    .rows[0];
  const checks: Check[] = [];
  const form = qualified(schema, table);
  const who = quoteIdent(role.role);
  const guardOwner = await client.query(
    `SELECT pg_get_userbyid(p.proowner) AS owner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE n.nspname = 'pgdso' AND p.proname IN ('row_guard', 'truncate_guard') ORDER BY p.proname`,
  );
  // the guards are SECURITY DEFINER: they run as their owner (the role that created them)
  const owners = guardOwner.rowCount ? [...new Set(guardOwner.rows.map((r) => r.owner as string))] : [role.role as string];
  for (const owner of owners) {
    const ok = await client.query(`SELECT has_function_privilege($1, $2, 'EXECUTE') AS ok`, [owner, GUARD_ORIGIN_FUNCTION]);
    if (!ok.rows[0].ok) {
      checks.push({
        message:
          `the ownership guard runs as ${owner}, who cannot execute ${GUARD_ORIGIN_FUNCTION}: ` +
          'every UPDATE and DELETE of the form by the application would fail',
        fix: `GRANT EXECUTE ON FUNCTION ${GUARD_ORIGIN_FUNCTION} TO ${quoteIdent(owner)};`,
      });
    }
  }
  if (role.su) return checks;
  const schemaOk = await client.query(`SELECT has_schema_privilege($1, 'USAGE') AS ok`, [schema]);
  if (!schemaOk.rows[0].ok)
    checks.push({
      message: `role ${role.role} has no USAGE on schema ${schema}`,
      fix: `GRANT USAGE ON SCHEMA ${quoteIdent(schema)} TO ${who};`,
      blocking: true,
    });
  const controlOk = await client.query(`SELECT has_schema_privilege('pgdso', 'CREATE') AS ok WHERE to_regnamespace('pgdso') IS NOT NULL`);
  if (controlOk.rowCount && !controlOk.rows[0].ok && guardOwner.rowCount === 0) {
    checks.push({
      message: `role ${role.role} cannot CREATE in the control schema pgdso (the guard functions)`,
      fix: `GRANT CREATE ON SCHEMA pgdso TO ${who};`,
    });
  }
  if (!schemaOk.rows[0].ok) return checks;
  const privileges = await client.query(
    `SELECT p AS privilege FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p
      WHERE NOT has_table_privilege($1::oid, p)`,
    [oid],
  );
  if (privileges.rowCount) {
    const missing = privileges.rows.map((r) => r.privilege as string);
    checks.push({
      message: `role ${role.role} lacks ${missing.join(', ')} on form ${schema}.${table} (the engine reads and writes its requests)`,
      fix: `GRANT ${missing.join(', ')} ON ${form} TO ${who};`,
    });
  }
  // altering the form (and its partitions) is needed only while something is missing
  for (const rel of opts.needsAlter ? await formRelations(client, oid) : []) {
    const member = await client.query(`SELECT pg_has_role(current_user, $1::name, 'USAGE') AS ok`, [rel.owner]);
    if (!member.rows[0].ok) {
      checks.push({
        message:
          `role ${role.role} cannot alter ${rel.schema}.${rel.table} (owned by ${rel.owner}): ` +
          'forms enable adds columns, triggers and replica identity',
        fix: `GRANT ${quoteIdent(rel.owner)} TO ${who};`,
      });
    }
  }
  if (opts.needsPublicationChange) {
    const pub = await client.query(
      `SELECT pg_get_userbyid(pubowner) AS owner, pg_has_role(current_user, pubowner, 'USAGE') AS ok
         FROM pg_publication WHERE pubname = $1`,
      [PUBLICATION],
    );
    if (pub.rowCount && !pub.rows[0].ok) {
      checks.push({
        message: `role ${role.role} cannot alter the publication ${PUBLICATION} (owned by ${pub.rows[0].owner})`,
        fix: `ALTER PUBLICATION ${quoteIdent(PUBLICATION)} OWNER TO ${who};`,
      });
    }
  }
  return checks;
}

/** What `pgdso uninstall` needs beyond the rest: dropping the origins of the engines. */
export function uninstallChecks(facts: ServerFacts, origins: number): Check[] {
  if (facts.superuser || origins === 0 || facts.execute[ORIGIN_DROP_FUNCTION]) return [];
  return [
    {
      message: `role ${facts.role} cannot execute ${ORIGIN_DROP_FUNCTION} (${origins} replication origins of pgdso to drop)`,
      fix: `GRANT EXECUTE ON FUNCTION ${ORIGIN_DROP_FUNCTION} TO ${quoteIdent(facts.role)};`,
    },
  ];
}
