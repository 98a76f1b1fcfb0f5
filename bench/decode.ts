// The decode limit: how fast the source server alone decodes a load and ships it through
// pgoutput, with nothing applied anywhere: `pg_recvlogical` on a pgoutput slot created before the
// load, with the options pgdso's own stream uses (proto_version 1, one publication). A
// replicator that tails that WAL cannot carry the load faster than its server decodes it.
//
// Cold (decodeLimit; the backlog: nobody streams during the load): the load commits, then
// `pg_recvlogical --start --endpos=<pg_current_wal_lsn() after the commit> -f /dev/null` runs;
// the time from its start to its exit (it exits at endpos) is the limit. Proof that it decoded
// the whole load: it exits 0 only at endpos (with --no-loop a lost connection is an error) and
// the slot has then confirmed endpos (checked below); with `-f FILE` it writes one line per
// pgoutput message: 200,006 lines for 200,000 rows in one transaction (N inserts, Begin,
// Relation, Commit and a few newline bytes inside the binary values), checked by hand.
//
// Live (liveDecodeLimit; bulk, fan-out, filters: the replicator tails the WAL while the load is
// written, so it has read it, into its reorder buffer, by the commit): pg_recvlogical streams the
// slot before the load starts; after the commit a non-transactional logical message with a
// random token is written (pg_logical_emit_message), and the time from the commit until the
// token appears in pg_recvlogical's output is the limit. The walsender decodes the WAL in order
// and sends a transaction's changes when it meets its commit record (proto_version 1 does not
// stream transactions in progress), so once the message, written after that commit, is out,
// the whole load has been shipped. Cold figures of such a load also pay for reading the WAL that
// a live replicator read during the load: they are no limit for it.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import type { LocalCluster } from '../src/embedded/cluster.ts';
import { clientProgram, conninfo, sql, until } from './support.ts';

const PG_RECVLOGICAL = clientProgram('pg_recvlogical', process.env.BENCH_PG_RECVLOGICAL);

/** A fresh pgoutput slot on `database` around `use`. */
async function withSlot<T>(cluster: LocalCluster, database: string, use: (slot: string, url: string) => Promise<T>): Promise<T> {
  const url = cluster.url(database);
  const slot = `bench_decode_${database}`.slice(0, 63);
  await sql(url, 'SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1', [slot]);
  await sql(url, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, [slot]);
  try {
    return await use(slot, url);
  } finally {
    await until(`the slot ${slot} released`, async () => {
      const r = await sql(url, 'SELECT active FROM pg_replication_slots WHERE slot_name = $1', [slot]);
      return r.rows[0]?.active === false;
    });
    await sql(url, 'SELECT pg_drop_replication_slot($1)', [slot]);
  }
}

function recvlogical(cluster: LocalCluster, database: string, slot: string, publication: string, extra: string[]) {
  const { conninfo: conn, env } = conninfo(cluster, database);
  const args = ['-d', conn, '--slot', slot, '--start', '--no-loop', '-o', 'proto_version=1', '-o', `publication_names=${publication}`];
  const child = spawn(PG_RECVLOGICAL, [...args, ...extra], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => resolve(code ?? (signal ? -1 : null)));
  });
  return { child, exited, stderr: () => stderr };
}

/**
 * Cold: runs `load` on `database` of `cluster` (whose publication `publication` holds the loaded
 * tables), then times pg_recvlogical from its start to the WAL position after the load.
 */
export async function decodeLimit(
  cluster: LocalCluster,
  database: string,
  publication: string,
  load: () => Promise<void>,
): Promise<number> {
  return withSlot(cluster, database, async (slot, url) => {
    await load();
    const endpos = (await sql(url, 'SELECT pg_current_wal_lsn()::text AS lsn')).rows[0].lsn as string;
    const started = Date.now();
    const run = recvlogical(cluster, database, slot, publication, [`--endpos=${endpos}`, '-f', '/dev/null']);
    const code = await run.exited;
    const ms = Date.now() - started;
    if (code !== 0) throw new Error(`pg_recvlogical exited ${code}: ${run.stderr()}`);
    const done = 'SELECT confirmed_flush_lsn >= $2::pg_lsn AS done FROM pg_replication_slots WHERE slot_name = $1';
    if (!(await sql(url, done, [slot, endpos])).rows[0]?.done) throw new Error(`pg_recvlogical exited before ${endpos}: ${run.stderr()}`);
    return ms;
  });
}

/**
 * Live: pg_recvlogical streams the slot while `load` runs; returns the time from the load's
 * commit (`load` resolved) until the server has shipped it.
 */
export async function liveDecodeLimit(
  cluster: LocalCluster,
  database: string,
  publication: string,
  load: () => Promise<void>,
): Promise<number> {
  return withSlot(cluster, database, async (slot, url) => {
    const token = Buffer.from(`pgdso-bench-${randomBytes(16).toString('hex')}`);
    const run = recvlogical(cluster, database, slot, publication, ['-o', 'messages=true', '-f', '-']);
    // connected before the load: the message goes out right after the commit
    const client = new pg.Client({ connectionString: url });
    client.on('error', () => {});
    try {
      await client.connect();
      let tail = Buffer.alloc(0);
      const seen = new Promise<number>((resolve, reject) => {
        run.child.stdout.on('data', (chunk: Buffer) => {
          const window = Buffer.concat([tail, chunk]);
          if (window.includes(token)) resolve(Date.now());
          tail = window.subarray(Math.max(0, window.length - token.length + 1));
        });
        run.exited.then((code) => reject(new Error(`pg_recvlogical exited ${code}: ${run.stderr()}`)));
      });
      seen.catch(() => {});
      // streaming (its walsender holds the slot) before the load starts; its exit fails the wait
      const streaming = until('pg_recvlogical streaming', async () => {
        const r = await sql(url, 'SELECT active FROM pg_replication_slots WHERE slot_name = $1', [slot]);
        return r.rows[0]?.active === true;
      });
      await Promise.race([streaming, seen.then(() => undefined)]);
      await load();
      const committedAt = Date.now();
      await client.query(`SELECT pg_logical_emit_message(false, 'pgdso-bench', $1)`, [token.toString()]);
      return (await seen) - committedAt;
    } finally {
      await client.end().catch(() => {});
      run.child.kill('SIGTERM');
      await run.exited;
    }
  });
}
