// PostgreSQL's own logical replication as the scenarios set it up: a publication on the source,
// a subscription on each peer (every subscription has its own slot, decoded by its own walsender),
// and a clean removal (the slot dropped on the source).
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { quoteIdent, quoteLiteral } from '../src/sql/identifiers.ts';
import { sql, until } from './support.ts';

export interface Subscription {
  name: string;
  /** the peer database's URL */
  peer: string;
  /** the source database's URL */
  source: string;
}

/**
 * CREATE SUBSCRIPTION `name` on `peer` to the publication `publication` of `database` on
 * `cluster`, with `copyData` (the initial copy of the tables) or not, and waits until its apply
 * worker runs and every table is ready (state r).
 */
export async function subscribe(
  cluster: LocalCluster,
  database: string,
  peer: string,
  name: string,
  publication: string,
  copyData = false,
): Promise<Subscription> {
  const conn = `host=${cluster.host} port=${cluster.port} dbname=${database} user=${cluster.user} password=${cluster.password}`;
  await sql(
    peer,
    `CREATE SUBSCRIPTION ${quoteIdent(name)} CONNECTION ${quoteLiteral(conn)} PUBLICATION ${quoteIdent(publication)}
       WITH (copy_data = ${copyData})`,
  );
  const subscription = { name, peer, source: cluster.url(database) };
  await waitReady(subscription);
  return subscription;
}

/** The apply worker runs and every table of the subscription is ready. */
export async function waitReady(sub: Subscription): Promise<void> {
  await until(`subscription ${sub.name} ready`, async () => {
    const r = await sql(
      sub.peer,
      `SELECT EXISTS (SELECT 1 FROM pg_stat_subscription WHERE subname = $1 AND pid IS NOT NULL AND relid IS NULL) AS running,
              NOT EXISTS (SELECT 1 FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
                           WHERE s.subname = $1 AND r.srsubstate <> 'r') AS ready`,
      [sub.name],
    );
    return r.rows[0].running && r.rows[0].ready;
  });
}

/** Stops the subscription; returns once its slot on the source is no longer streamed by anyone. */
export async function disable(sub: Subscription): Promise<void> {
  await sql(sub.peer, `ALTER SUBSCRIPTION ${quoteIdent(sub.name)} DISABLE`);
  await until(`subscription ${sub.name} stopped`, async () => {
    const r = await sql(sub.source, 'SELECT active FROM pg_replication_slots WHERE slot_name = $1', [sub.name]);
    return r.rows[0]?.active === false;
  });
}

export async function enable(sub: Subscription): Promise<void> {
  await sql(sub.peer, `ALTER SUBSCRIPTION ${quoteIdent(sub.name)} ENABLE`);
}

/** Drops the subscription and its slot on the source. */
export async function unsubscribe(sub: Subscription): Promise<void> {
  const name = quoteIdent(sub.name);
  await sql(sub.peer, `ALTER SUBSCRIPTION ${name} DISABLE`);
  await sql(sub.peer, `ALTER SUBSCRIPTION ${name} SET (slot_name = NONE)`);
  await sql(sub.peer, `DROP SUBSCRIPTION ${name}`);
  await until(`the slot ${sub.name} released`, async () => {
    const r = await sql(sub.source, 'SELECT active FROM pg_replication_slots WHERE slot_name = $1', [sub.name]);
    return r.rowCount === 0 || r.rows[0].active === false;
  });
  await sql(sub.source, 'SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1', [sub.name]);
}
