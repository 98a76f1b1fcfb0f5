// Form scans: escalation runs and `pgdso sync` runs, each with its progress (the last key done),
// committed in the same transaction as the batch it covers, so that a run interrupted anywhere
// (kill -9, a failover) resumes after its last batch and never does a request twice. `term` is
// the claim of the process that runs it now: a newer claim fences the older one out.
import type { Knex } from 'knex';

export async function up(knex: Knex): Promise<void> {
  await knex.schema.withSchema('pgdso').createTable('scan_runs', (t) => {
    t.bigIncrements('id');
    t.text('kind').notNullable();
    t.text('name').notNullable();
    t.timestamp('fire_time', { useTz: true }).notNullable();
    t.text('trigger').notNullable();
    t.text('form').notNullable();
    t.jsonb('args').notNullable().defaultTo('{}');
    t.bigInteger('term').notNullable().defaultTo(0);
    t.text('instance_id');
    t.timestamp('started_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
    t.timestamp('updated_at', { useTz: true }).notNullable().defaultTo(knex.fn.now());
    t.timestamp('finished_at', { useTz: true });
    t.text('last_key');
    t.bigInteger('scanned').notNullable().defaultTo(0);
    t.bigInteger('matched').notNullable().defaultTo(0);
    t.bigInteger('errors').notNullable().defaultTo(0);
    t.text('last_error');
    t.text('state').notNullable().defaultTo('running');
    t.unique(['kind', 'name', 'fire_time']);
  });
  await knex.raw(`ALTER TABLE pgdso.scan_runs ADD CONSTRAINT scan_runs_kind_check CHECK (kind IN ('escalation', 'sync'))`);
  await knex.raw(`ALTER TABLE pgdso.scan_runs ADD CONSTRAINT scan_runs_trigger_check CHECK (trigger IN ('schedule', 'manual', 'sync'))`);
  await knex.raw(`ALTER TABLE pgdso.scan_runs ADD CONSTRAINT scan_runs_state_check CHECK (state IN ('running', 'done', 'cancelled'))`);
  await knex.raw(`CREATE INDEX scan_runs_unfinished ON pgdso.scan_runs (kind, name) WHERE finished_at IS NULL`);
  // the key that signs the batches a scan writes into the WAL (only pgdso can read it): the engine
  // acts on a signed batch only, never on a message another role emitted
  await knex.raw(`CREATE TABLE pgdso.scan_key (key text NOT NULL)`);
  await knex.raw(`INSERT INTO pgdso.scan_key (key) VALUES (replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''))`);
  // when the owner of `escalation` first saw each escalation: its first fire time comes after
  await knex.schema.withSchema('pgdso').createTable('escalation_state', (t) => {
    t.text('escalation').primary();
    t.timestamp('first_seen_at', { useTz: true }).notNullable();
  });
}

export async function down(knex: Knex): Promise<void> {
  await knex.schema.withSchema('pgdso').dropTable('escalation_state');
  await knex.schema.withSchema('pgdso').dropTable('scan_key');
  await knex.schema.withSchema('pgdso').dropTable('scan_runs');
}
