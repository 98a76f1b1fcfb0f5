// The replication stream's flow control, against a real walsender: while the sink works (a flush
// in progress), the stream goes on reading what comes next, up to a bound past
// which the socket pauses (the walsender then waits on it); keepalives are answered meanwhile;
// nothing is lost or reordered when the sink catches up.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type pg from 'pg';
import pino from 'pino';
import { waitFor } from './support/wait.ts';
import { ReplicationStream, type ChangeSink } from '../src/decoder/stream.ts';
import type { RowChange, TxCommit } from '../src/change.ts';
import { streamCluster, streamDatabase } from './support/stream.ts';

const cluster = streamCluster();
const log = pino({ level: 'silent' });

/** A sink whose idle() (the engine's flush) stays pending while `hold()` is in force. */
class BusySink implements ChangeSink {
  readonly ids: string[] = [];
  transactions = 0;
  idles = 0;
  private gate: Promise<void> | null = null;
  private open: () => void = () => {};
  stream: ReplicationStream | null = null;
  begin(): void {}
  change(change: RowChange): void {
    this.ids.push(String(change.new?.id));
  }
  commit(tx: TxCommit): void {
    this.transactions += 1;
    this.stream!.confirm(tx.endLsn);
  }
  idle(): void | Promise<void> {
    if (!this.gate) return;
    this.idles += 1;
    return this.gate;
  }
  caughtUp(): boolean {
    return false;
  }
  hold(): void {
    this.gate = new Promise((resolve) => (this.open = resolve));
  }
  release(): void {
    this.gate = null;
    this.open();
  }
}

async function setup(name: string, queueHighBytes?: number) {
  const { url, slot, admin } = await streamDatabase(cluster(), name);
  const sink = new BusySink();
  const stream = new ReplicationStream({ connection: { connectionString: url }, slot, log, statusIntervalMs: 60_000, queueHighBytes });
  sink.stream = stream;
  let ended: unknown = 'running';
  const done = stream.run(sink).then(
    () => (ended = 'stopped'),
    (err) => (ended = err),
  );
  const close = async () => {
    sink.release();
    await stream.stop();
    await done;
    await admin.end();
  };
  return { admin, sink, stream, close, ended: () => ended };
}

/** The sink is flushing: its idle() is pending (after the first transaction, or before it). Returns the transactions it got. */
async function flushing(admin: pg.Client, sink: BusySink): Promise<number> {
  sink.hold();
  await admin.query(`INSERT INTO t VALUES ('first', 'x')`);
  await waitFor(() => sink.idles > 0, { message: 'the sink was never idle' });
  return sink.transactions;
}

test('while the sink flushes, the next transactions are read; then handed over in commit order', async () => {
  const { admin, sink, stream, close } = await setup('flow');
  try {
    const before = await flushing(admin, sink);
    for (let i = 1; i <= 50; i++) await admin.query('INSERT INTO t VALUES ($1, $2)', [`r${String(i).padStart(2, '0')}`, 'x']);
    // begin, change and commit of each: read while the sink is still busy
    await waitFor(() => stream.waiting.messages >= 150 + (before ? 0 : 3), {
      message: () => `read while flushing: ${JSON.stringify(stream.waiting)}`,
    });
    assert.equal(sink.transactions, before, 'the sink got nothing more while it was busy');
    sink.release();
    await waitFor(() => sink.transactions === 51, { message: () => `delivered ${sink.transactions} of 51` });
    assert.deepEqual(sink.ids, ['first', ...Array.from({ length: 50 }, (_, i) => `r${String(i + 1).padStart(2, '0')}`)]);
  } finally {
    await close();
  }
});

test('past the bound the socket pauses and the walsender waits on it; nothing is lost once the sink goes on', async () => {
  const high = 64 * 1024;
  const { admin, sink, stream, close } = await setup('bound', high);
  try {
    await flushing(admin, sink);
    // 16 MB in 16 transactions, far more than the bound and the sockets' buffers hold
    for (let i = 0; i < 16; i++) {
      await admin.query(`INSERT INTO t SELECT 'b' || $1::int || '-' || g, repeat('v', 1000) FROM generate_series(1, 1000) g`, [i]);
    }
    await waitFor(
      async () =>
        stream.waiting.paused &&
        (await admin.query(`SELECT wait_event FROM pg_stat_activity WHERE backend_type = 'walsender'`)).rows[0]?.wait_event ===
          'WalSenderWriteData',
      { message: () => `the walsender never waited on a paused stream: ${JSON.stringify(stream.waiting)}`, timeoutMs: 30_000 },
    );
    // the bound, and what the socket's last read still delivered
    assert.ok(stream.waiting.bytes < high + 256 * 1024, `${stream.waiting.bytes} bytes waiting`);
    sink.release();
    await waitFor(() => sink.transactions === 17, { message: () => `delivered ${sink.transactions} of 17`, timeoutMs: 60_000 });
    assert.equal(sink.ids.length, 16_001);
    assert.equal(new Set(sink.ids).size, 16_001);
  } finally {
    await close();
  }
});

test('keepalives are answered while the sink is busy for longer than wal_sender_timeout', async () => {
  const { admin, sink, close, ended } = await setup('busy');
  await admin.query(`ALTER SYSTEM SET wal_sender_timeout = '1s'`);
  await admin.query('SELECT pg_reload_conf()');
  try {
    await flushing(admin, sink);
    const walsender = `SELECT backend_start FROM pg_stat_replication WHERE application_name = 'pgdso decoder'`;
    const started = (await admin.query(walsender)).rows[0]?.backend_start as Date;
    assert.ok(started, 'no walsender');
    // several timeouts pass while the sink is still busy (its flush pending)
    await waitFor(
      async () => {
        const now = (await admin.query('SELECT now() AS now')).rows[0].now as Date;
        return now.getTime() - started.getTime() > 4000;
      },
      { timeoutMs: 15_000, intervalMs: 250 },
    );
    assert.equal(ended(), 'running', `the stream ended: ${String(ended())}`);
    assert.equal((await admin.query(walsender)).rows[0]?.backend_start?.getTime(), started.getTime(), 'the walsender was replaced');
  } finally {
    await admin.query(`ALTER SYSTEM RESET wal_sender_timeout`);
    await admin.query('SELECT pg_reload_conf()');
    await close();
  }
});
