// Runs the knex migrations of the control schema on one server, under an advisory lock so that
// two instances migrating at once wait for each other instead of failing (knex's own lock table
// fails with MigrationLocked and can stay locked after a crash).
import knexFactory from 'knex';
import pg from 'pg';
import { migrationSettings } from '../../knexfile.ts';
import { LOCK_NAMESPACE, LOCKS, PUBLICATION, quoteIdent } from './identifiers.ts';

export interface MigrateResult {
  applied: string[];
}

export async function migrateServer(connection: pg.ClientConfig): Promise<MigrateResult> {
  const lockClient = new pg.Client({ ...connection, application_name: 'pgdso migrate' });
  await lockClient.connect();
  try {
    await lockClient.query('SELECT pg_advisory_lock($1, $2)', [LOCK_NAMESPACE, LOCKS.migrate]);
    await lockClient.query('CREATE SCHEMA IF NOT EXISTS pgdso');
    const knex = knexFactory({
      client: 'pg',
      connection: { ...connection, application_name: 'pgdso migrate' } as never,
      pool: { min: 0, max: 1 },
    });
    try {
      // knex's lock row can be left set by a crash; our advisory lock makes it redundant.
      const lockTable = await lockClient.query(`SELECT to_regclass('pgdso.knex_migrations_lock') AS t`);
      if (lockTable.rows[0].t) await lockClient.query('UPDATE pgdso.knex_migrations_lock SET is_locked = 0');
      const [, applied] = (await knex.migrate.latest(migrationSettings)) as [number, string[]];
      const pub = await lockClient.query('SELECT 1 FROM pg_publication WHERE pubname = $1', [PUBLICATION]);
      if (pub.rowCount === 0) await lockClient.query(`CREATE PUBLICATION ${quoteIdent(PUBLICATION)}`);
      return { applied };
    } finally {
      await knex.destroy();
    }
  } finally {
    await lockClient.query('SELECT pg_advisory_unlock($1, $2)', [LOCK_NAMESPACE, LOCKS.migrate]).catch(() => {});
    await lockClient.end();
  }
}
