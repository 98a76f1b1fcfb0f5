// Server groups: who owns each operation now, with a fencing term raised at every change of
// owner; the requests routed by the coordinator to an operation's owner; the published rule
// sets; the term each apply lane last wrote with (a write with an older term fails).
import type { Knex } from 'knex';

export async function up(knex: Knex): Promise<void> {
  const s = () => knex.schema.withSchema('pgdso');
  await s().alterTable('servgrp_board', (t) => {
    t.bigInteger('rule_version');
    t.integer('http_port');
  });
  await s().alterTable('servgrp_events', (t) => {
    t.bigInteger('term');
  });
  await s().createTable('servgrp_owners', (t) => {
    t.text('operation').primary();
    t.text('instance_id');
    t.bigInteger('term').notNullable().defaultTo(0);
    t.timestamp('assigned_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
  });
  await knex.raw(`ALTER TABLE pgdso.servgrp_owners ADD CONSTRAINT servgrp_owners_operation_check
    CHECK (operation IN ('dso', 'escalation', 'admin'))`);
  await knex.raw(`INSERT INTO pgdso.servgrp_owners (operation) VALUES ('dso'), ('escalation'), ('admin')`);
  await s().createTable('servgrp_requests', (t) => {
    t.bigIncrements('id');
    t.text('operation').notNullable();
    t.text('kind').notNullable();
    t.jsonb('args').notNullable().defaultTo('{}');
    t.text('requested_by').notNullable();
    t.text('routed_to');
    t.text('state').notNullable().defaultTo('new');
    t.jsonb('result');
    t.text('error');
    t.timestamp('requested_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
    t.timestamp('done_at', { useTz: true });
  });
  await knex.raw(`ALTER TABLE pgdso.servgrp_requests ADD CONSTRAINT servgrp_requests_state_check
    CHECK (state IN ('new', 'routed', 'running', 'done', 'failed'))`);
  await s().createTable('rule_sets', (t) => {
    t.bigIncrements('version');
    t.text('digest').notNullable();
    t.jsonb('sources').notNullable();
    t.text('published_by').notNullable();
    t.timestamp('published_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
  });
  await s().alterTable('apply_progress', (t) => {
    t.bigInteger('term').notNullable().defaultTo(0);
    t.text('instance_id');
  });
}

export async function down(knex: Knex): Promise<void> {
  const s = () => knex.schema.withSchema('pgdso');
  await s().alterTable('apply_progress', (t) => {
    t.dropColumn('term');
    t.dropColumn('instance_id');
  });
  await s().dropTable('rule_sets');
  await s().dropTable('servgrp_requests');
  await s().dropTable('servgrp_owners');
  await s().alterTable('servgrp_events', (t) => t.dropColumn('term'));
  await s().alterTable('servgrp_board', (t) => {
    t.dropColumn('rule_version');
    t.dropColumn('http_port');
  });
}
