// knex settings for the control schema. `pgdso migrate` uses src/sql/migrate.ts, which builds
// the same settings per configured server; this file serves the knex CLI against one database
// given by PGDSO_DATABASE_URL (for example `npx knex --knexfile knexfile.ts migrate:status`).
import type { Knex } from 'knex';
import { migrationSource } from './migrations/index.ts';

export const migrationSettings = {
  schemaName: 'pgdso',
  tableName: 'knex_migrations',
  migrationSource,
} satisfies Knex.MigratorConfig;

const config: Knex.Config = {
  client: 'pg',
  connection: process.env.PGDSO_DATABASE_URL,
  migrations: migrationSettings,
};

export default config;
