// Guarantee 4 across a restart of the source server and cut connections: sf's cluster is stopped
// and started again, then killed (SIGKILL, crash recovery) and started again, in the middle of a
// load, while `pgdso run` goes on running; then the engine's walsender on sf and its apply
// backends on chicago are terminated. The engine reconnects by itself (it is never restarted
// here) and every row reaches chicago exactly once, with its latest values.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, settled, type DsoEnv, type EngineProcess } from '../support/dso.ts';
import { restartSkipReason } from '../support/servers.ts';
import { waitFor } from '../support/wait.ts';
import { AUDIT_SQL, checksum, compareCopies, Load, queues, rowCount, untilPeersReach, untilSameData } from '../support/faults.ts';

const suite = dsoSuite(2);

const TRANSACTIONS = 40;
const PER_TRANSACTION = 500;
const TOTAL = TRANSACTIONS * PER_TRANSACTION;

/** sf alone on its cluster (restarted), chicago on the other. */
function env(): Promise<DsoEnv> {
  return suite.env({
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
}

interface Fault {
  name: string;
  atPeerRows: number;
  loaded: number;
  detail?: string;
}

/**
 * Loads sf while `faults` run one after the other, each once chicago holds its share of the
 * rows; then checks what a DBA would: same checksum, no row lost or doubled, nothing pending,
 * the one engine still running (it reconnected by itself) and stopping cleanly.
 */
async function loadWithFaults(
  e: DsoEnv,
  engine: EngineProcess,
  faults: { at: number; name: string; run: (load: Load) => Promise<string | undefined> }[],
): Promise<Fault[]> {
  const behind = () => rowCount(e, 'chicago');
  const describe = () => `engine output:\n${engine.output.slice(-20_000)}`;
  const load = new Load(e, 'sf', { transactions: TRANSACTIONS, perTransaction: PER_TRANSACTION, maxAhead: TOTAL / 4, behind, describe });
  const injected: Fault[] = [];
  const injector = (async () => {
    for (const fault of faults) {
      const atPeerRows = await untilPeersReach(load, fault.at * TOTAL, describe, behind);
      if (atPeerRows < 0) return;
      const loaded = load.loaded;
      const detail = await fault.run(load);
      injected.push({ name: fault.name, atPeerRows, loaded, ...(detail ? { detail } : {}) });
    }
  })();
  await Promise.all([load.done, injector]);

  const converged = await untilSameData(e, 'sf', ['chicago'], 90_000);
  if (converged) await settled(e, engine);
  assert.ok(engine.running, `the engine exited instead of reconnecting:\n${engine.output.slice(-10_000)}`);
  const source = await checksum(e, 'sf');
  assert.equal(source.n, TOTAL, 'rows on sf');
  const c = await compareCopies(e, 'sf', 'chicago');
  console.log(
    `${faults.map((f) => f.name).join(', ')}: ${JSON.stringify({
      faults: injected,
      rowsChecked: c.checked,
      lost: c.lost,
      doubled: c.doubled + c.extra,
      differing: c.differing,
      writtenMoreThanChanged: c.writtenMoreThanChanged,
      deadlocks: load.deadlocks.length,
    })}`,
  );
  assert.equal(injected.length, faults.length, 'faults injected');
  assert.ok(
    injected.every((f) => f.atPeerRows < TOTAL),
    `every fault came before chicago had every row: ${JSON.stringify(injected)}`,
  );
  assert.ok(c.engineWrites >= c.checked, `chicago's write_audit holds ${c.engineWrites} engine writes for ${c.checked} rows`);
  assert.deepEqual(
    { lost: c.lost, extra: c.extra, differing: c.differing, doubled: c.doubled, writtenMoreThanChanged: c.writtenMoreThanChanged },
    { lost: 0, extra: 0, differing: 0, doubled: 0, writtenMoreThanChanged: 0 },
    `chicago against sf:\n${c.examples.join('\n')}\n${describe()}`,
  );
  assert.deepEqual(await checksum(e, 'chicago'), source, 'checksum of chicago');
  assert.ok(converged, 'the checksums became equal only after the deadline');
  for (const server of ['sf', 'chicago'])
    assert.deepEqual(await queues(e, server), { pending: [], errors: [] }, `pgdso.pending and pending_errors on ${server}`);
  const exit = await engine.stop();
  assert.equal(exit, 0, `the engine did not stop cleanly:\n${engine.output.slice(-5000)}`);
  return injected;
}

/** The source's cluster goes down between two of the load's transactions and comes back. */
function restartSource(how: 'stop' | 'kill9'): (load: Load) => Promise<string> {
  return async (load) => {
    const cluster = suite.clusters[0]!;
    await load.pause();
    try {
      if (how === 'stop') await cluster.stop();
      else await cluster.kill9!();
      await cluster.start();
    } finally {
      load.resume();
    }
    return how === 'stop' ? 'fast shutdown, start' : 'SIGKILL of the postmaster, crash recovery';
  };
}

/** Terminates the backends of the database with that application name (LIKE pattern); waits for one. */
async function terminate(e: DsoEnv, server: string, applicationName: string): Promise<string> {
  const pids = (await waitFor(
    async () => {
      const rows = await e.query<{ pid: number; application_name: string }>(
        server,
        `SELECT pid, application_name FROM pg_stat_activity WHERE datname = current_database()
          AND application_name LIKE $1 AND pid <> pg_backend_pid()`,
        [applicationName],
      );
      return rows.length ? rows : undefined;
    },
    { message: `no backend ${applicationName} on ${server}` },
  ))!;
  const done = await e.query<{ ok: boolean }>(server, 'SELECT pg_terminate_backend(pid) AS ok FROM unnest($1::int[]) AS pid', [
    pids.map((p) => p.pid),
  ]);
  assert.ok(
    done.some((d) => d.ok),
    `no ${applicationName} backend terminated on ${server}`,
  );
  return `${done.filter((d) => d.ok).length} terminated: ${pids.map((p) => p.application_name).join(', ')}`;
}

test('Source cluster restarted mid-load (stop/start, then kill -9/start): the engine reconnects by itself and resumes; nothing lost, \
nothing doubled', {
  skip: restartSkipReason(),
  timeout: 180_000,
}, async () => {
  const e = await env();
  const engine = e.engine();
  await loadWithFaults(e, engine, [
    { at: 0.2, name: 'sf cluster stopped and started', run: restartSource('stop') },
    { at: 0.55, name: 'sf cluster killed (-9) and started', run: restartSource('kill9') },
  ]);
});

test("the engine's walsender on sf and its apply backends on chicago terminated mid-load: still exactly once", {
  timeout: 180_000,
}, async () => {
  const e = await env();
  const engine = e.engine();
  await loadWithFaults(e, engine, [
    { at: 0.25, name: 'walsender terminated', run: () => terminate(e, 'sf', 'pgdso decoder%') },
    { at: 0.6, name: 'apply backends on chicago terminated', run: () => terminate(e, 'chicago', 'pgdso apply%') },
  ]);
});
