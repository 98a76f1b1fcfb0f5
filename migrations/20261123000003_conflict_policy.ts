// Conflicts name the policy that decided them and the server the incoming values came from.
import type { Knex } from 'knex';

export async function up(knex: Knex): Promise<void> {
  await knex.schema.withSchema('pgdso').alterTable('conflicts', (t) => {
    t.text('policy');
    t.text('from_server');
  });
}

export async function down(knex: Knex): Promise<void> {
  await knex.schema.withSchema('pgdso').alterTable('conflicts', (t) => {
    t.dropColumn('policy');
    t.dropColumn('from_server');
  });
}
