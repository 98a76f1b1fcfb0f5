// The pending queue's delivery: where each queued operation goes (its target form and the
// target copy's request ID, for the order per request), the delivery attempts per target
// server, the identity of this server's queue,
// and, on a target, the last queued operation of each source queue it has committed (so a
// delivery interrupted between the target's commit and the source's clean-up is not applied
// twice).
import type { Knex } from 'knex';

export async function up(knex: Knex): Promise<void> {
  for (const table of ['pending', 'pending_errors']) {
    await knex.schema.withSchema('pgdso').alterTable(table, (t) => {
      t.text('target_form');
      t.text('target_key');
    });
  }
  await knex.raw('DROP INDEX IF EXISTS pgdso.pending_request');
  await knex.raw('CREATE INDEX pending_target_request ON pgdso.pending (target_server, target_form, target_key, id)');
  await knex.raw('CREATE INDEX pending_target ON pgdso.pending (target_server, id)');
  // the delivery attempts per target server (one row, not one per queued operation)
  await knex.raw(`CREATE TABLE pgdso.pending_targets (
    target_server text PRIMARY KEY,
    attempts integer NOT NULL DEFAULT 0,
    down_since timestamptz,
    next_attempt_at timestamptz,
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now())`);
  await knex.raw(`CREATE TABLE pgdso.queue_identity (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    queue uuid NOT NULL DEFAULT gen_random_uuid())`);
  await knex.raw('INSERT INTO pgdso.queue_identity DEFAULT VALUES');
  await knex.raw(`CREATE TABLE pgdso.pending_delivered (
    queue uuid PRIMARY KEY,
    source_server text NOT NULL,
    last_id bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now())`);
}

export async function down(knex: Knex): Promise<void> {
  await knex.raw('DROP TABLE pgdso.pending_delivered');
  await knex.raw('DROP TABLE pgdso.queue_identity');
  await knex.raw('DROP TABLE pgdso.pending_targets');
  await knex.raw('DROP INDEX pgdso.pending_target');
  await knex.raw('DROP INDEX pgdso.pending_target_request');
  await knex.raw('CREATE INDEX pending_request ON pgdso.pending (request_id, id)');
  for (const table of ['pending', 'pending_errors']) {
    await knex.schema.withSchema('pgdso').alterTable(table, (t) => {
      t.dropColumn('target_form');
      t.dropColumn('target_key');
    });
  }
}
