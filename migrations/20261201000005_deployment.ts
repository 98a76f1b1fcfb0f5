// Backing out and partitioned forms: the replica identity each relation of a form had before
// `pgdso forms enable` set it to FULL (`forms disable` and `uninstall` put it back), and the
// publication publishes a partitioned form via its root (one relation for the engine, whatever
// the partitions), created so when missing. Changing publish_via_partition_root on an existing
// publication changes nothing for plain tables; it is left to `forms enable` (which checks the
// right to do it) when the one migrating does not own the publication.
import type { Knex } from 'knex';

export async function up(knex: Knex): Promise<void> {
  await knex.raw('ALTER TABLE pgdso.forms ADD COLUMN IF NOT EXISTS original_identity jsonb');
  const pub = await knex.raw(
    `SELECT pubviaroot, pg_has_role(current_user, pubowner, 'USAGE') AS mine FROM pg_publication WHERE pubname = 'pgdso'`,
  );
  if (pub.rows.length === 0) await knex.raw('CREATE PUBLICATION pgdso WITH (publish_via_partition_root = true)');
  else if (!pub.rows[0].pubviaroot && pub.rows[0].mine) await knex.raw('ALTER PUBLICATION pgdso SET (publish_via_partition_root = true)');
}

export async function down(knex: Knex): Promise<void> {
  await knex.raw('ALTER TABLE pgdso.forms DROP COLUMN IF EXISTS original_identity');
}
