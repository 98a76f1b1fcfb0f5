// The control schema `pgdso` of the contract: server group board and ranking, failover events,
// the pending queue and its errors, conflicts, and the registry of enabled forms.
import type { Knex } from 'knex';

export async function up(knex: Knex): Promise<void> {
  await knex.raw('CREATE SCHEMA IF NOT EXISTS pgdso');
  // a fresh builder per statement: a schema builder accumulates, and awaiting it runs them all
  const s = () => knex.schema.withSchema('pgdso');

  await s().createTable('servgrp_board', (t) => {
    t.text('instance_id').primary();
    t.text('server_name').notNullable();
    t.text('host').notNullable();
    t.integer('pid').notNullable();
    t.bigInteger('interval_count').notNullable().defaultTo(0);
    t.text('state').notNullable().defaultTo('online');
    t.specificType('operations', 'text[]').notNullable().defaultTo('{}');
    t.specificType('pending_signals', 'text[]').notNullable().defaultTo('{}');
    t.timestamp('started_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
    t.timestamp('last_seen_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
  });
  await knex.raw(`ALTER TABLE pgdso.servgrp_board ADD CONSTRAINT servgrp_board_state_check
    CHECK (state IN ('online', 'delinquent', 'stopped'))`);

  await s().createTable('servgrp_ranking', (t) => {
    t.text('operation').notNullable();
    t.text('instance_id').notNullable();
    t.integer('rank');
    t.integer('delinquent_threshold').notNullable().defaultTo(3);
    t.primary(['operation', 'instance_id']);
  });
  await knex.raw(`ALTER TABLE pgdso.servgrp_ranking ADD CONSTRAINT servgrp_ranking_operation_check
    CHECK (operation IN ('dso', 'escalation', 'admin'))`);

  await s().createTable('servgrp_events', (t) => {
    t.bigIncrements('id');
    t.smallint('type').notNullable();
    t.text('operation').notNullable();
    t.text('new_owner');
    t.text('old_owner');
    t.timestamp('at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
  });

  const queueColumns = (t: Knex.CreateTableBuilder) => {
    t.bigIncrements('id');
    t.text('pool').notNullable().defaultTo('default');
    t.text('type').notNullable();
    t.text('mapping');
    t.text('form');
    t.text('request_id');
    t.text('target_server');
    t.jsonb('payload').notNullable();
    t.text('status').notNullable();
    t.integer('attempts').notNullable().defaultTo(0);
    t.timestamp('next_attempt_at', { useTz: true });
    t.text('last_error');
    t.specificType('source_lsn', 'pg_lsn');
    t.timestamp('created_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
  };
  await s().createTable('pending', queueColumns);
  await s().createTable('pending_errors', (t) => {
    queueColumns(t);
    t.text('error').notNullable();
    t.text('sqlstate');
    t.timestamp('failed_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
  });
  // A replayed source transaction must not record the same failure twice.
  await knex.raw(`CREATE UNIQUE INDEX pending_errors_source_change
    ON pgdso.pending_errors (source_lsn, mapping, type, request_id) WHERE source_lsn IS NOT NULL`);
  await knex.raw('CREATE INDEX pending_request ON pgdso.pending (request_id, id)');

  await s().createTable('conflicts', (t) => {
    t.bigIncrements('id');
    t.text('mapping').notNullable();
    t.text('form').notNullable();
    t.text('request_id').notNullable();
    t.jsonb('local');
    t.jsonb('incoming');
    t.text('resolution').notNullable();
    t.timestamp('at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
  });

  await s().createTable('forms', (t) => {
    t.text('schema_name').notNullable();
    t.text('table_name').notNullable();
    t.text('key_column').notNullable();
    t.timestamp('enabled_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
    t.primary(['schema_name', 'table_name']);
  });
}

export async function down(knex: Knex): Promise<void> {
  await knex.raw('DROP SCHEMA IF EXISTS pgdso CASCADE');
}
