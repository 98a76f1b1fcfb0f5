// An instance that stops on an error a DBA must fix (a missing privilege, a wrong password) says
// so on the board: the error and the statement that fixes it, for `pgdso status`.
import type { Knex } from 'knex';

export async function up(knex: Knex): Promise<void> {
  await knex.schema.withSchema('pgdso').alterTable('servgrp_board', (t) => {
    t.text('last_error');
    t.text('last_error_fix');
    t.timestamp('last_error_at', { useTz: true });
  });
}

export async function down(knex: Knex): Promise<void> {
  await knex.schema.withSchema('pgdso').alterTable('servgrp_board', (t) => {
    t.dropColumn('last_error');
    t.dropColumn('last_error_fix');
    t.dropColumn('last_error_at');
  });
}
