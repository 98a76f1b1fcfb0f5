// The acknowledgement traps of ../shared/DEPENDENCIES.md, against the real stream:
// exact commit-end confirmations, a new stream after a drop replays what was not confirmed,
// keepalives answered.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import pino from 'pino';
import { provideClusters, type TestCluster } from './support/servers.ts';
import { waitFor } from './support/wait.ts';
import { ReplicationStream, type ChangeSink } from '../src/decoder/stream.ts';
import { formatLsn, type RowChange, type TxBegin, type TxCommit } from '../src/change.ts';
import { migrateServer } from '../src/sql/migrate.ts';
import { ensureSlot } from '../src/sql/slot.ts';
import { slotName } from '../src/sql/identifiers.ts';

let cluster: TestCluster;
const log = pino({ level: 'silent' });

before(async () => {
  [cluster] = (await provideClusters(1)) as [TestCluster];
});
after(async () => {
  await cluster.destroy();
});

interface Received {
  finalLsn: bigint;
  endLsn: bigint;
  ids: string[];
}

/** A sink that records transactions and confirms only what `confirmIf` allows. */
class RecordingSink implements ChangeSink {
  readonly transactions: Received[] = [];
  private ids: string[] = [];
  stream: ReplicationStream | null = null;
  constructor(private readonly confirmIf: (tx: Received) => boolean) {}
  begin(_tx: TxBegin): void {
    this.ids = [];
  }
  change(change: RowChange): void {
    this.ids.push(String(change.new?.id ?? change.old?.id));
  }
  commit(tx: TxCommit): void {
    const received = { finalLsn: tx.finalLsn, endLsn: tx.endLsn, ids: this.ids };
    this.transactions.push(received);
    if (this.confirmIf(received)) this.stream!.confirm(tx.endLsn);
  }
  idle(): void {}
  caughtUp(): boolean {
    return false; // never let keepalives move the slot in these tests
  }
}

async function database(name: string): Promise<{ url: string; slot: string; admin: pg.Client }> {
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

function startStream(url: string, slot: string, sink: RecordingSink): { stream: ReplicationStream; done: Promise<unknown> } {
  const stream = new ReplicationStream({ connection: { connectionString: url }, slot, log, statusIntervalMs: 200 });
  sink.stream = stream;
  const done = stream.run(sink).then(
    () => null,
    (err) => err,
  );
  return { stream, done };
}

test('two interleaved transactions committing back to back, a restart between them: the second is delivered again, the first is \
not', async () => {
  const { url, slot, admin } = await database('ack');
  const a = new pg.Client({ connectionString: url });
  const b = new pg.Client({ connectionString: url });
  await a.connect();
  await b.connect();
  let adjacent = 0;
  try {
    for (let round = 0; round < 5; round++) {
      await a.query('BEGIN');
      await a.query('INSERT INTO t VALUES ($1, $2)', [`a${round}`, 'x']);
      await b.query('BEGIN');
      await b.query('INSERT INTO t VALUES ($1, $2)', [`b${round}`, 'y']);
      // B's commit record can start exactly where A's ends: the LSN the trap confirms too far.
      await Promise.all([a.query('COMMIT'), b.query('COMMIT')]);

      // Stream 1 applies and confirms only the first transaction to commit (the commits may land
      // in either order), then stops.
      const ids = [`a${round}`, `b${round}`];
      const first = new RecordingSink((_tx) => first.transactions.length === 1);
      const s1 = startStream(url, slot, first);
      await waitFor(() => ids.every((id) => first.transactions.some((t) => t.ids.includes(id))), {
        message: 'stream 1 did not deliver both transactions',
      });
      const [tx1, tx2] = first.transactions.filter((t) => t.ids.some((id) => ids.includes(id)));
      assert.ok(tx1 && tx2 && tx1.endLsn <= tx2.finalLsn, 'transactions out of commit order');
      if (tx2.finalLsn === tx1.endLsn) adjacent += 1;
      // the server has recorded exactly the first transaction's end before the restart
      await waitFor(
        async () =>
          (
            await admin.query('SELECT confirmed_flush_lsn >= $2::text::pg_lsn AS done FROM pg_replication_slots WHERE slot_name = $1', [
              slot,
              formatLsn(tx1.endLsn),
            ])
          ).rows[0].done,
      );
      await s1.stream.stop();
      await s1.done;

      // Stream 2 (a restart) must deliver the second again and must not deliver the first.
      const second = new RecordingSink(() => true);
      const s2 = startStream(url, slot, second);
      await waitFor(() => second.transactions.some((t) => t.ids.includes(tx2.ids[0]!)), {
        message: `the second transaction (${tx2.ids}) was lost after the restart`,
      });
      assert.ok(!second.transactions.some((t) => t.ids.includes(tx1.ids[0]!)), 'the confirmed transaction was delivered again');
      await s2.stream.stop();
      await s2.done;
    }
    assert.ok(adjacent > 0, 'no round produced a commit starting exactly at the previous commit end; the trap was not exercised');
  } finally {
    await a.end();
    await b.end();
    await admin.end();
  }
});

test('a reconnect after a dropped stream replays what was received but not applied', async () => {
  const { url, slot, admin } = await database('drop');
  try {
    await admin.query(`INSERT INTO t VALUES ('c1', 'applied')`);
    const first = new RecordingSink((tx) => tx.ids.includes('c1'));
    const s1 = startStream(url, slot, first);
    await waitFor(() => first.transactions.some((t) => t.ids.includes('c1')));
    await admin.query(`INSERT INTO t VALUES ('c2', 'received, not applied')`);
    await waitFor(() => first.transactions.some((t) => t.ids.includes('c2')));
    // the walsender's backend is terminated: the stream fails
    await admin.query(`SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1`, [slot]);
    const failure = await s1.done;
    assert.ok(failure instanceof Error, 'the dropped stream did not report a failure');

    const second = new RecordingSink(() => true);
    const s2 = (await waitFor(async () => {
      const attempt = startStream(url, slot, second);
      // the slot is released asynchronously after the backend exits
      const early = await Promise.race([attempt.done, new Promise((r) => setImmediate(r, 'running'))]);
      return early === 'running' ? attempt : undefined;
    }))!;
    await waitFor(() => second.transactions.some((t) => t.ids.includes('c2')), { message: 'c2 was not replayed after the reconnect' });
    assert.ok(!second.transactions.some((t) => t.ids.includes('c1')), 'c1 was confirmed and must not come again');
    await s2.stream.stop();
    await s2.done;
  } finally {
    await admin.end();
  }
});

test('keepalives are answered: the stream outlives wal_sender_timeout while idle', async () => {
  const { url, slot, admin } = await database('keepalive');
  await admin.query(`ALTER SYSTEM SET wal_sender_timeout = '1s'`);
  await admin.query('SELECT pg_reload_conf()');
  const sink = new RecordingSink(() => true);
  const stream = new ReplicationStream({ connection: { connectionString: url }, slot, log, statusIntervalMs: 60_000 });
  sink.stream = stream;
  let ended: unknown = 'running';
  const done = stream.run(sink).then(
    () => (ended = 'stopped'),
    (err) => (ended = err),
  );
  try {
    const started = (await waitFor(
      async () =>
        (
          await admin.query(`SELECT backend_start FROM pg_stat_replication WHERE application_name = 'pgdso decoder'`)
        ).rows[0]?.backend_start as Date | undefined,
    ))!;
    // several timeouts' worth of idle time pass with the same walsender still connected
    await waitFor(
      async () => {
        const now = (await admin.query('SELECT now() AS now')).rows[0].now as Date;
        return now.getTime() - started.getTime() > 4000;
      },
      { timeoutMs: 15_000, intervalMs: 250 },
    );
    assert.equal(ended, 'running', `the stream ended: ${String(ended)}`);
    const still = await admin.query(`SELECT backend_start FROM pg_stat_replication WHERE application_name = 'pgdso decoder'`);
    assert.equal(still.rows[0]?.backend_start?.getTime(), started.getTime());
  } finally {
    await stream.stop();
    await done;
    await admin.query(`ALTER SYSTEM RESET wal_sender_timeout`);
    await admin.query('SELECT pg_reload_conf()');
    await admin.end();
  }
});
