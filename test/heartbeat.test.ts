// The heartbeat thread: an instance whose main thread is busy (a large batch decoded or applied
// without a pause) keeps beating; one whose main thread is stuck past the limit stops.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import pg from 'pg';
import { dsoSuite, REPAIR_REQUEST_SQL } from './support/dso.ts';
import { waitFor } from './support/wait.ts';
import { joinBoard } from '../src/group/sql.ts';
import { HeartbeatThread } from '../src/group/heartbeat.ts';

const suite = dsoSuite(1);
const log = pino({ level: 'silent' });

/** Keeps this thread busy, as a large batch does: no timer, no I/O runs meanwhile. */
function busy(ms: number): void {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    // spin
  }
}

test('the heartbeat thread beats while the main thread is busy, and stops once it is silent past the limit', async () => {
  const e = await suite.env({
    servers: ['sf'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [], filters: [] },
  });
  const join = joinBoard({ instanceId: 'sf-t', server: 'sf', host: 'test', pid: process.pid }, null);
  await e.query('sf', join.text, join.values);
  const count = async () =>
    (await e.query<{ n: number }>('sf', `SELECT interval_count::int AS n FROM pgdso.servgrp_board WHERE instance_id = 'sf-t'`))[0]!.n;
  const beats = new HeartbeatThread({
    connection: { connectionString: e.urls.sf },
    instanceId: 'sf-t',
    intervalMs: 100,
    log,
    maxSilenceMs: 2500,
  });
  beats.start();
  try {
    // the thread beats (twice, so it is past its connection's start)
    const started = await count();
    await waitFor(async () => (await count()) >= started + 2, { message: 'the heartbeat thread never beat' });
    const before = await count();
    busy(1500);
    const during = (await count()) - before;
    assert.ok(during >= 5, `interval_count rose by ${during} while the main thread was busy for 1.5 s (interval 0.1 s)`);
    // stuck: the thread stops beating once the main thread was silent for 2.5 s. Asked on a
    // connection of its own in the same tick as the spin ends, before this thread says it is alive
    const probe = new pg.Client({ connectionString: e.urls.sf });
    await probe.connect();
    busy(3500);
    const age = probe.query<{ s: number }>(
      `SELECT extract(epoch FROM clock_timestamp() - last_seen_at)::float8 AS s FROM pgdso.servgrp_board WHERE instance_id = 'sf-t'`,
    );
    const silentFor = (await age).rows[0]!.s;
    await probe.end();
    assert.ok(silentFor >= 0.6, `the last beat was ${silentFor} s old: beats went on although the main thread was silent past the limit`);
    const stuck = await count();
    // and beats again once the main thread answers
    await waitFor(async () => (await count()) > stuck, { timeoutMs: 5_000, message: 'no beat after the main thread answered again' });
  } finally {
    await beats.stop();
  }
});
