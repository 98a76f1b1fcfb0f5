// The pipelined source transactions of flushed batches (no database: the order of the steps and
// of the confirmations). A batch is confirmed only after its own source transaction, positions
// with nothing to write wait for the transactions before them, a flush returns once the batch
// before it is done, and a failure confirms nothing more.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Checkpoint } from '../src/engine/checkpoint.ts';
import { SourceTail } from '../src/engine/source-tail.ts';

function setup() {
  const confirmed: bigint[] = [];
  const failures: Error[] = [];
  const checkpoint = { commit: (lsn: bigint) => confirmed.push(lsn) } as unknown as Checkpoint;
  return { confirmed, failures, tail: new SourceTail(checkpoint, (err) => failures.push(err)) };
}

/** A source transaction that runs until `finish()`. */
function held() {
  let finish!: (err?: Error) => void;
  let started = false;
  const done = new Promise<void>((resolve, reject) => {
    finish = (err) => (err ? reject(err) : resolve());
  });
  return {
    work: () => {
      started = true;
      return done;
    },
    finish,
    started: () => started,
  };
}

const turn = () => new Promise((resolve) => setImmediate(resolve));

test('a batch is confirmed after its own source transaction, in order; a position with nothing to write waits for them', async () => {
  const { confirmed, tail } = setup();
  tail.confirm(1n);
  assert.deepEqual(confirmed, [1n], 'nothing queued: confirmed at once');
  const a = held();
  await tail.transaction(a.work, 10n); // returns at once: no batch before it
  tail.confirm(11n);
  assert.ok(tail.busy);
  const b = held();
  let bReturned = false;
  const flushB = tail.transaction(b.work, 20n).then(() => (bReturned = true));
  await turn();
  assert.ok(a.started() && !b.started(), 'one source transaction at a time');
  assert.deepEqual(confirmed, [1n], 'nothing confirmed before its source transaction committed');
  assert.equal(bReturned, false, 'the next flush waits for the batch before it');
  a.finish();
  await flushB;
  assert.deepEqual(confirmed, [1n, 10n, 11n]);
  assert.ok(b.started());
  b.finish();
  await tail.drain();
  assert.deepEqual(confirmed, [1n, 10n, 11n, 20n]);
  assert.equal(tail.busy, false);
});

test('a failed source transaction confirms nothing more, is told once, and every later step throws it', async () => {
  const { confirmed, failures, tail } = setup();
  const a = held();
  await tail.transaction(a.work, 10n);
  tail.confirm(11n);
  let laterRan = false;
  const b = tail.transaction(async () => {
    laterRan = true;
  }, 20n);
  a.finish(new Error('serialization failure'));
  await assert.rejects(b, /serialization failure/);
  await assert.rejects(tail.drain(), /serialization failure/);
  assert.throws(() => tail.check(), /serialization failure/);
  assert.throws(() => tail.confirm(30n), /serialization failure/);
  assert.deepEqual(confirmed, [], 'nothing confirmed after the failure');
  assert.equal(laterRan, false, "the next batch's source transaction does not run");
  assert.equal(failures.length, 1);
});
