// A database for tests of the replication stream itself: the control schema, a table `t` in the
// pgdso publication, the slot; an admin connection to write and to watch the walsender.
import { after, before } from 'node:test';
import pg from 'pg';
import { migrateServer } from '../../src/sql/migrate.ts';
import { ensureSlot } from '../../src/sql/slot.ts';
import { slotName } from '../../src/sql/identifiers.ts';
import { provideClusters, type TestCluster } from './servers.ts';

export async function streamDatabase(cluster: TestCluster, name: string): Promise<{ url: string; slot: string; admin: pg.Client }> {
  const url = await cluster.createDatabase(`${name}_${process.pid}_${Date.now() % 100000}`);
  await migrateServer({ connectionString: url });
  const admin = new pg.Client({ connectionString: url });
  await admin.connect();
  await admin.query('CREATE TABLE t (id text PRIMARY KEY, v text)');
  await admin.query('ALTER PUBLICATION pgdso ADD TABLE t');
  const db = (await admin.query('SELECT current_database() AS db')).rows[0].db;
  const slot = slotName(db);
  await ensureSlot(admin, slot);
  return { url, slot, admin };
}

/** One cluster for a test file's stream tests (started before them, destroyed after). */
export function streamCluster(): () => TestCluster {
  let cluster: TestCluster | undefined;
  before(async () => {
    [cluster] = await provideClusters(1);
  });
  after(async () => {
    await cluster?.destroy();
  });
  return () => cluster!;
}
