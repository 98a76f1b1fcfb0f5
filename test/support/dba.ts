/**
 * pgdso deployed on a database as a DBA would, without superuser for pgdso: the recipe of the
 * README ("Supported PostgreSQL versions"), run with the harness's superuser URL.
 *
 * - an application role that owns the forms (its tables), created if missing;
 * - a `pgdso` role, `LOGIN REPLICATION` with a password, created if missing, and only:
 *   - `GRANT CREATE ON DATABASE <db>`: `pgdso migrate` creates the control schema `pgdso` and
 *     the publication;
 *   - `GRANT <application role>`: membership in the forms' owner, so that `pgdso forms enable`
 *     may alter the forms (columns, trigger, replica identity, publication) and the engine write
 *     them, while the application keeps their ownership;
 *   - `EXECUTE` on the replication origin functions pgdso calls (ORIGIN_FUNCTIONS), the same
 *     signatures on PostgreSQL 14 to 18 (revoked from PUBLIC there; superuser-only on 13).
 *
 * Roles are cluster-wide, databases are per test: the roles are created once per cluster under
 * an advisory lock (taken in the `postgres` database, so deployments into different databases
 * of a cluster wait for each other), their passwords derived from the cluster's superuser URL
 * so every deployment on a cluster knows them.
 */
import crypto from 'node:crypto';
import pg from 'pg';
import { quoteIdent, quoteLiteral } from '../../src/sql/identifiers.ts';

/**
 * What the engine calls: `pg_replication_origin_create` and `_session_setup` (each apply lane,
 * src/applier/lane.ts), `_session_is_setup` (the ownership guard, a SECURITY DEFINER function
 * owned by pgdso, src/sql/forms.ts). Not needed: `_xact_setup`, `_session_reset`, `_progress`
 * (pgdso keeps its position in pgdso.apply_progress). `pg_logical_emit_message` (heartbeats)
 * is executable by PUBLIC on 14 to 18.
 */
export const ORIGIN_FUNCTIONS: readonly string[] = [
  'pg_replication_origin_create(text)',
  'pg_replication_origin_session_setup(text)',
  'pg_replication_origin_session_is_setup()',
];

export interface DbaDeployOptions {
  /** Superuser URL of the (existing) database to deploy on. */
  adminUrl: string;
  /** The application role, owner of the forms (default `dso_app`). */
  appRole?: string;
  /** pgdso's role (default `pgdso`). */
  pgdsoRole?: string;
  /** SQL run as the application role once the roles exist: its tables, the forms. */
  schemaSql?: string;
}

export interface DbaDeployment {
  /** The database's URL as pgdso (for the config file). */
  pgdsoUrl: string;
  /** The database's URL as the application role. */
  appUrl: string;
  appRole: string;
  pgdsoRole: string;
}

/** Serialises role creation and role grants across a cluster's databases. */
const ROLES_LOCK = 7_306_110; // arbitrary

export async function deployAsDba(opts: DbaDeployOptions): Promise<DbaDeployment> {
  const appRole = opts.appRole ?? 'dso_app';
  const pgdsoRole = opts.pgdsoRole ?? 'pgdso';
  const admin = new URL(opts.adminUrl);
  const database = decodeURIComponent(admin.pathname.slice(1));
  const appPassword = rolePassword(admin, appRole);
  const pgdsoPassword = rolePassword(admin, pgdsoRole);

  await withClient(urlOf(admin, { database: 'postgres' }), async (client) => {
    await client.query(`SET log_statement = 'none'`); // passwords stay out of the server log
    await client.query('BEGIN');
    await client.query('SELECT pg_advisory_xact_lock($1)', [ROLES_LOCK]);
    await createRoleIfMissing(client, appRole, `LOGIN PASSWORD ${quoteLiteral(appPassword)}`);
    await createRoleIfMissing(client, pgdsoRole, `LOGIN REPLICATION PASSWORD ${quoteLiteral(pgdsoPassword)}`);
    await client.query(`GRANT ${quoteIdent(appRole)} TO ${quoteIdent(pgdsoRole)}`);
    await client.query('COMMIT');
  });

  await withClient(opts.adminUrl, async (client) => {
    await client.query(`GRANT CREATE ON DATABASE ${quoteIdent(database)} TO ${quoteIdent(pgdsoRole)}`);
    await client.query(
      `GRANT EXECUTE ON FUNCTION ${ORIGIN_FUNCTIONS.map((f) => `pg_catalog.${f}`).join(', ')} TO ${quoteIdent(pgdsoRole)}`,
    );
    // the application's own right to create its tables (public is not writable by all from 15)
    await client.query(`GRANT CREATE ON SCHEMA public TO ${quoteIdent(appRole)}`);
    if (opts.schemaSql) {
      await client.query(`SET ROLE ${quoteIdent(appRole)}`);
      await client.query(opts.schemaSql);
      await client.query('RESET ROLE');
    }
  });

  return {
    pgdsoUrl: urlOf(admin, { user: pgdsoRole, password: pgdsoPassword }),
    appUrl: urlOf(admin, { user: appRole, password: appPassword }),
    appRole,
    pgdsoRole,
  };
}

async function createRoleIfMissing(client: pg.Client, role: string, options: string): Promise<void> {
  const existing = await client.query('SELECT 1 FROM pg_roles WHERE rolname = $1', [role]);
  if (existing.rowCount === 0) await client.query(`CREATE ROLE ${quoteIdent(role)} ${options}`);
}

/** The same on every deployment on one cluster (same superuser URL), different per cluster. */
function rolePassword(admin: URL, role: string): string {
  const cluster = `${admin.hostname}:${admin.port}:${decodeURIComponent(admin.username)}:${decodeURIComponent(admin.password)}`;
  return crypto.createHmac('sha256', cluster).update(role).digest('base64url').slice(0, 32);
}

function urlOf(base: URL, change: { database?: string; user?: string; password?: string }): string {
  const url = new URL(base.toString());
  if (change.database !== undefined) url.pathname = `/${encodeURIComponent(change.database)}`;
  if (change.user !== undefined) url.username = encodeURIComponent(change.user);
  if (change.password !== undefined) url.password = encodeURIComponent(change.password);
  return url.toString();
}

async function withClient<T>(url: string, use: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url, application_name: 'test-dba' });
  await client.connect();
  try {
    return await use(client);
  } finally {
    await client.end();
  }
}
