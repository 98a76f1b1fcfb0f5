// An engine that connects to a peer as an ordinary role (superusers bypass privileges and
// connection limits): a LOGIN role on the peer's cluster with what the applying engine needs
// there, and the environment's config pointed at it for that peer.
import crypto from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import type { DsoEnv } from './dso.ts';
import { quoteIdent } from '../../src/sql/identifiers.ts';

export interface PeerRole {
  name: string;
  password: string;
  /** the peer's database as this role */
  url: string;
}

let roles = 0;

/**
 * Creates a role on `server`'s cluster (a unique name) with the grants an engine that applies
 * to this server needs: CONNECT; USAGE, CREATE on schema pgdso; the DML of pgdso's tables and of
 * `forms`; the replication origin functions (the apply lane's origin session, the ownership
 * guard). Then rewrites the config file so that `server`'s connection uses the role (run the
 * engines of the other servers only: `--server`, as this role cannot decode `server`'s slot).
 * The role is dropped when the database is: it owns nothing.
 */
export async function applyAsOrdinaryRole(e: DsoEnv, server: string, forms: readonly string[]): Promise<PeerRole> {
  const name = `pgdso_apply_${process.pid}_${++roles}_${crypto.randomBytes(3).toString('hex')}`;
  const password = crypto.randomBytes(12).toString('hex');
  const role = quoteIdent(name);
  const superUrl = new URL(e.urls[server]!);
  const database = decodeURIComponent(superUrl.pathname.slice(1));
  await e.query(server, `CREATE ROLE ${role} LOGIN PASSWORD '${password}'`);
  const tables = forms.map((f) => quoteIdent(f)).join(', ');
  await e.query(
    server,
    `
    GRANT CONNECT ON DATABASE ${quoteIdent(database)} TO ${role};
    GRANT USAGE, CREATE ON SCHEMA pgdso TO ${role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgdso TO ${role};
    GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA pgdso TO ${role};
    GRANT USAGE ON SCHEMA public TO ${role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON ${tables} TO ${role};
    GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text),
      pg_replication_origin_session_is_setup(), pg_replication_origin_session_reset(), pg_replication_origin_oid(text),
      pg_replication_origin_progress(text, boolean), pg_replication_origin_session_progress(boolean),
      pg_replication_origin_xact_setup(pg_lsn, timestamptz), pg_replication_origin_xact_reset() TO ${role};`,
  );
  const url = new URL(superUrl.href);
  url.username = name;
  url.password = password;
  const config = JSON.parse(await readFile(e.configPath, 'utf8')) as { servers: Record<string, { connection: unknown }> };
  config.servers[server]!.connection = url.href;
  await writeFile(e.configPath, JSON.stringify(config, null, 2));
  return { name, password, url: url.href };
}

/** Drops the role (after the environment's databases, which hold its grants, are gone or revoked). */
export async function dropRole(e: DsoEnv, server: string, role: PeerRole): Promise<void> {
  await e.query(server, `DROP OWNED BY ${quoteIdent(role.name)}; DROP ROLE IF EXISTS ${quoteIdent(role.name)}`);
}
