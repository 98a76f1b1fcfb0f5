// Guarantee 4 under repeated crashes: `pgdso run` is killed with SIGKILL five times while sf
// loads 100,000 requests (with updates of earlier ones) that are broadcast to chicago and tokyo;
// each time it is started again. Afterwards every peer holds every row exactly once, with the
// latest values: the checks a DBA would run (counts, checksums, a row-by-row comparison, the
// pending queue and its errors empty) plus an audit of the engine's writes on each peer.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, settled, type EngineProcess } from '../support/dso.ts';
import {
  AUDIT_SQL,
  checksum,
  compareCopies,
  Load,
  outputs,
  queues,
  rowCount,
  untilPeersReach,
  untilSameData,
  writeSequences,
  type Comparison,
  type WriteSequences,
} from '../support/faults.ts';

const suite = dsoSuite(2);

const PEERS = ['chicago', 'tokyo'];
/** 100 (100,000 rows); PGDSO_FAULTS_KILL9_TRANSACTIONS=N for a shorter run while working on the engine */
const TRANSACTIONS = Number(process.env.PGDSO_FAULTS_KILL9_TRANSACTIONS) || 100;
const PER_TRANSACTION = 1000;
const TOTAL = TRANSACTIONS * PER_TRANSACTION;
/** kill -9 when the slower peer has this share of the rows */
const KILL_AT = [0.15, 0.3, 0.5, 0.7, 0.85];
/** the load stays at most this many rows ahead of the slower peer, so it goes on across the kills */
const MAX_AHEAD = Math.max(PER_TRANSACTION, TOTAL / 4);

test('kill -9 of the engine 5 times during a 100k-row load: every row exactly once on every peer (checksums equal)', {
  timeout: 240_000,
}, async (t) => {
  const e = await suite.env({
    servers: ['sf', ...PEERS],
    placement: { sf: 0, chicago: 1, tokyo: 1 },
    schemaSql: `${REPAIR_REQUEST_SQL}; ${AUDIT_SQL}`,
    forms: ['repair_request'],
    rules: {
      mappings: PEERS.map((peer) => mapping(`sf-to-${peer}`, 'sf', peer, { transferMode: 'data-only' })),
      // on updates too: a source copy's dso_to_* names only the last target of a broadcast, so
      // only that copy would be kept in step by whenToUpdate alone
      filters: [
        filter(
          'broadcast-requests',
          'sf',
          null,
          PEERS.map((peer) => ({ type: 'transfer', mapping: `sf-to-${peer}` })),
          ['insert', 'update'],
        ),
      ],
    },
    config: { pending: { retry: { firstSeconds: 0.2, maxSeconds: 1 } } },
  });
  const engines: EngineProcess[] = [e.engine()];
  const current = () => engines[engines.length - 1]!;
  const slowestPeer = async () => Math.min(...(await Promise.all(PEERS.map((peer) => rowCount(e, peer)))));

  const describe = () => outputs(engines);
  const load = new Load(e, 'sf', {
    transactions: TRANSACTIONS,
    perTransaction: PER_TRANSACTION,
    maxAhead: MAX_AHEAD,
    behind: slowestPeer,
    describe,
  });

  const kills: { atPeerRows: number; loaded: number; loadGoingOn: boolean }[] = [];
  const killer = (async () => {
    for (const share of KILL_AT) {
      const atPeerRows = await untilPeersReach(load, share * TOTAL, describe, slowestPeer);
      if (atPeerRows < 0) return; // the load failed: it reports why
      kills.push({ atPeerRows, loaded: load.loaded, loadGoingOn: load.running });
      await current().kill9();
      engines.push(e.engine());
    }
  })();
  const progress = process.env.PGDSO_FAULTS_DEBUG
    ? setInterval(
        () =>
          void Promise.all(['sf', ...PEERS].map((s) => rowCount(e, s))).then(
            (n) =>
              console.error(
                `${new Date().toISOString()} loaded ${load.loaded} rows ${n} kills ${kills.length} deadlocks ${load.deadlocks.length}`,
              ),
            () => {},
          ),
        2000,
      )
    : undefined;
  t.after(() => clearInterval(progress));
  // the load's failure first (the killer would only time out waiting for it)
  await Promise.all([load.done, killer]);

  const started = Date.now();
  const converged = await untilSameData(e, 'sf', PEERS, 120_000);
  if (converged) await settled(e, current());
  const catchUpMs = Date.now() - started;
  const exit = await current().stop();

  const source = await checksum(e, 'sf');
  assert.equal(source.n, TOTAL, 'rows on sf');
  const comparisons: Comparison[] = [];
  for (const peer of PEERS) comparisons.push(await compareCopies(e, 'sf', peer));
  const sequences: WriteSequences[] = [];
  for (const peer of PEERS) sequences.push(await writeSequences(e, 'sf', peer));
  const figures = {
    faultsInjected: kills.length,
    killedAtPeerRows: kills.map((k) => k.atPeerRows),
    loadedAtKill: kills.map((k) => k.loaded),
    engineStarts: engines.length,
    rowsChecked: comparisons.reduce((n, c) => n + c.checked, 0),
    lost: comparisons.reduce((n, c) => n + c.lost, 0),
    doubled: comparisons.reduce((n, c) => n + c.doubled + c.extra, 0),
    writtenMoreThanChanged: comparisons.reduce((n, c) => n + c.writtenMoreThanChanged, 0),
    engineWritesAudited: comparisons.map((c) => c.engineWrites),
    userWritesOnSf: comparisons[0]!.userWrites,
    differing: comparisons.reduce((n, c) => n + c.differing, 0),
    requestsWrittenAsCommitted: sequences.map((w) => w.same),
    requestsCoalesced: sequences.map((w) => w.coalesced),
    requestsWrittenTwice: sequences.reduce((n, w) => n + w.doubled, 0),
    requestsLastChangeLost: sequences.reduce((n, w) => n + w.lost, 0),
    catchUpAfterLoadMs: converged ? catchUpMs : null,
    userTransactionsDeadlocked: load.deadlocks.length,
  };
  t.diagnostic(`figures: ${JSON.stringify(figures)}`);
  console.log(`kill9 figures: ${JSON.stringify(figures)}`);
  if (load.deadlocks.length) t.diagnostic(`deadlocks on sf (retried): ${load.deadlocks.slice(0, 3).join(' | ')}`);

  assert.equal(kills.length, KILL_AT.length, 'faults injected');
  assert.ok(
    kills.every((k) => k.atPeerRows < TOTAL),
    `every kill came before the peers had every row: ${JSON.stringify(kills)}`,
  );
  assert.ok(
    kills.some((k) => k.loadGoingOn),
    `no kill came while sf was still loading: ${JSON.stringify(kills)}`,
  );
  // Request by request, the states the engine wrote on each peer against the states the users'
  // transactions committed on sf: none written twice (a replayed change), none out of order, and
  // the last one written is sf's last (a lost change), whatever the final rows say. Changes of a
  // request within one batch may arrive as the latest (coalesced, in the figures).
  for (const w of sequences) {
    assert.deepEqual(
      { requests: w.requests, writtenInOrder: w.same + w.coalesced, doubled: w.doubled, lost: w.lost, other: w.other },
      { requests: TOTAL, writtenInOrder: TOTAL, doubled: 0, lost: 0, other: 0 },
      `writes on ${w.peer} against the users' writes on sf:\n${w.examples.join('\n')}`,
    );
  }
  for (const c of comparisons) {
    // the audit saw the engine's writes (else it could not see a double one)
    assert.ok(c.engineWrites >= c.checked, `${c.peer}'s write_audit holds ${c.engineWrites} engine writes for ${c.checked} rows`);
    assert.deepEqual(
      { lost: c.lost, extra: c.extra, differing: c.differing, doubled: c.doubled, writtenMoreThanChanged: c.writtenMoreThanChanged },
      { lost: 0, extra: 0, differing: 0, doubled: 0, writtenMoreThanChanged: 0 },
      `${c.peer} against sf:\n${c.examples.join('\n')}\n${outputs(engines)}`,
    );
    assert.deepEqual(await checksum(e, c.peer), source, `checksum of ${c.peer}`);
  }
  // the source recorded every transfer as done, and nothing waits or failed
  const [unfinished] = await e.query<{ n: number }>(
    'sf',
    `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status IS DISTINCT FROM 'success'`,
  );
  assert.equal(unfinished!.n, 0, 'source copies whose transfer is not recorded as success');
  for (const server of ['sf', ...PEERS])
    assert.deepEqual(await queues(e, server), { pending: [], errors: [] }, `pgdso.pending and pending_errors on ${server}`);
  assert.ok(converged, 'the checksums became equal only after the deadline');
  assert.equal(exit, 0, `the last engine did not stop cleanly:\n${current().output.slice(-5000)}`);
});
