// The control connection holds the server's `dso` advisory lock: when it goes (here: its backend
// terminated by a DBA while sf loads rows), the lock is free for another instance, so the
// session must not go on applying without it. It ends at once (its walsender and lanes go) and a
// new session takes the lock again on a new control connection; every row arrives exactly once.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, settled, until, type DsoEnv } from './support/dso.ts';
import { AUDIT_SQL, Load, compareCopies, queues, rowCount, untilPeersReach, untilSameData, writeSequences } from './support/faults.ts';
import { LOCK_NAMESPACE, LOCKS } from '../src/sql/identifiers.ts';

const suite = dsoSuite(2);

const TRANSACTIONS = 60;
const PER_TRANSACTION = 500;
const TOTAL = TRANSACTIONS * PER_TRANSACTION;

interface Backend {
  pid: number;
  name: string;
}

/**
 * The backends of sf's engine (`pgdso run` serves chicago too): on sf its control connection,
 * walsender and source lane, on chicago its lane.
 */
async function engineBackends(e: DsoEnv, server: 'sf' | 'chicago'): Promise<Backend[]> {
  return e.query<Backend>(
    server,
    `SELECT pid, application_name AS name FROM pg_stat_activity
      WHERE datname = current_database()
        AND (application_name = ANY ($1) OR starts_with(application_name, $2) OR starts_with(application_name, $3)
             OR starts_with(application_name, $4))
      ORDER BY pid`,
    server === 'sf'
      ? [['pgdso decoder'], 'pgdso apply sf/', 'pgdso control', 'pgdso decoder']
      : [[], 'pgdso apply sf->', 'pgdso apply sf->', 'pgdso apply sf->'],
  );
}

/** The engine session's control connection (`pgdso control <instance>`). */
const isControl = (name: string) => name.startsWith('pgdso control');

/** The pid of the backend holding the server's `dso` lock, if any. */
async function dsoLockHolder(e: DsoEnv, server: string): Promise<number | undefined> {
  const rows = await e.query<{ pid: number }>(
    server,
    `SELECT pid FROM pg_locks
      WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 2`,
    [LOCK_NAMESPACE, LOCKS.operationDso],
  );
  return rows[0]?.pid;
}

test('a terminated control connection ends the session at once; a new one takes the dso lock again, every row exactly once', {
  timeout: 120_000,
}, async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    placement: { sf: 0, chicago: 1 },
    schemaSql: `${REPAIR_REQUEST_SQL}; ${AUDIT_SQL}`,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only' })],
      filters: [filter('copy-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert', 'update'])],
    },
    config: { pending: { retry: { firstSeconds: 0.2, maxSeconds: 1 } } },
  });
  const engine = e.engine();
  const describe = () => engine.output;

  // the first session streams and holds the lock on its control connection
  const first = (await until(engine, 'the first session did not start', async () => {
    const sf = await engineBackends(e, 'sf');
    const chicago = await engineBackends(e, 'chicago');
    const control = sf.find((b) => isControl(b.name));
    const ready = control && sf.some((b) => b.name.startsWith('pgdso decoder')) && chicago.length > 0;
    return ready && (await dsoLockHolder(e, 'sf')) === control.pid ? { control: control.pid, backends: [...sf, ...chicago] } : undefined;
  }))!;

  const load = new Load(e, 'sf', {
    transactions: TRANSACTIONS,
    perTransaction: PER_TRANSACTION,
    maxAhead: TOTAL / 4,
    behind: () => rowCount(e, 'chicago'),
    describe,
  });
  // rows before the fault have arrived; the load goes on while the control backend is terminated
  assert.ok((await untilPeersReach(load, TOTAL / 4, describe, () => rowCount(e, 'chicago'))) > 0, 'the load failed');
  const [terminated] = await e.query<{ done: boolean }>(
    'sf',
    `SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity
      WHERE datname = current_database() AND starts_with(application_name, 'pgdso control')`,
  );
  assert.equal(terminated?.done, true, 'the control backend was not terminated');
  const loadGoingOn = load.running;

  // the session that lost its lock is gone: its walsender and its lanes on both servers
  const oldPids = new Set(first.backends.map((b) => b.pid));
  await until(engine, "the first session's walsender and lanes are still there after its control connection went", async () => {
    const left = [...(await engineBackends(e, 'sf')), ...(await engineBackends(e, 'chicago'))].filter((b) => oldPids.has(b.pid));
    return left.length === 0;
  });
  // a new session took the lock again on a control connection of its own
  const second = (await until(engine, 'no new session took the dso lock again', async () => {
    const control = (await engineBackends(e, 'sf')).find((b) => isControl(b.name));
    return control && control.pid !== first.control && (await dsoLockHolder(e, 'sf')) === control.pid ? control.pid : undefined;
  }))!;
  assert.notEqual(second, first.control);

  await load.done;
  // rows inserted afterwards arrive too
  await e.query('sf', `INSERT INTO repair_request (id, item) SELECT 'after-' || g, 'chair' FROM generate_series(1, 20) g`);
  const converged = await untilSameData(e, 'sf', ['chicago'], 60_000);
  if (converged) await settled(e, engine);

  const comparison = await compareCopies(e, 'sf', 'chicago');
  assert.equal(comparison.checked, TOTAL + 20, 'rows on sf');
  assert.deepEqual(
    {
      lost: comparison.lost,
      extra: comparison.extra,
      differing: comparison.differing,
      doubled: comparison.doubled,
      writtenMoreThanChanged: comparison.writtenMoreThanChanged,
    },
    { lost: 0, extra: 0, differing: 0, doubled: 0, writtenMoreThanChanged: 0 },
    `chicago against sf:\n${comparison.examples.join('\n')}\n${engine.output.slice(-10_000)}`,
  );
  const writes = await writeSequences(e, 'sf', 'chicago');
  assert.deepEqual(
    { doubled: writes.doubled, lost: writes.lost, other: writes.other },
    { doubled: 0, lost: 0, other: 0 },
    `writes on chicago against the users' writes on sf:\n${writes.examples.join('\n')}`,
  );
  for (const server of ['sf', 'chicago'])
    assert.deepEqual(await queues(e, server), { pending: [], errors: [] }, `pgdso.pending and pending_errors on ${server}`);
  assert.ok(converged, 'chicago did not reach the same data as sf before the deadline');
  assert.ok(loadGoingOn, 'the control backend was terminated after the load had ended');
  assert.match(engine.output, /control connection of sf was lost/, `the engine did not say why the session ended:\n${engine.output}`);
  assert.equal(await engine.stop(), 0, `the engine did not stop cleanly:\n${engine.output.slice(-5000)}`);
});
