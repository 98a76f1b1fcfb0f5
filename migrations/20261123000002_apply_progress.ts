// Where each apply lane is in its source's WAL, written in the same transaction as the changes
// it applied. The replication origin's own progress cannot serve: PostgreSQL advances it even
// for a transaction that aborts after pg_replication_origin_xact_setup (a failed COMMIT, a
// client that disconnects), which would skip changes that were never applied.
import type { Knex } from 'knex';

export async function up(knex: Knex): Promise<void> {
  await knex.schema.withSchema('pgdso').createTable('apply_progress', (t) => {
    t.text('origin').primary();
    t.specificType('source_lsn', 'pg_lsn').notNullable();
    t.timestamp('source_commit_time', { useTz: true });
    t.timestamp('updated_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
  });
}

export async function down(knex: Knex): Promise<void> {
  await knex.schema.withSchema('pgdso').dropTable('apply_progress');
}
