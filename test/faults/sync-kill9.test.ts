// `pgdso sync` killed with kill -9 in the middle of a 100,000-request initial load, then run
// again: it resumes after its last batch (by default), a run with another --where is refused
// until --restart, and every selected request reaches the target exactly once (a write log on
// the target that a primary key cannot hide) with its values (checksums), none of the others.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { PGDSO_COMMAND, REPAIR_REQUEST_SQL, dsoSuite, mapping, settled, WRITE_LOG_SQL } from '../support/dso.ts';
import { waitFor } from '../support/wait.ts';

const suite = dsoSuite(2);
const ROWS = 100_000;

const show = (r: { code: number | null; stdout: string; stderr: string }) =>
  `exit ${r.code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;

test(`kill -9 of pgdso sync during a ${ROWS}-request load: run again, it resumes after its last batch and every selected request \
arrives once`, { timeout: 300_000 }, async (t) => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: `${REPAIR_REQUEST_SQL}; ${WRITE_LOG_SQL}`,
    forms: ['repair_request'],
    rules: { mappings: [mapping('sf-to-chicago', 'sf', 'chicago')] },
    config: { pending: { heartbeatSeconds: 1 } },
  });
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, site, description) SELECT 'K-' || lpad(g::text, 6, '0'), 'chair',
            CASE WHEN g % 2 = 0 THEN 'chicago' ELSE 'sf' END, md5(g::text)
       FROM generate_series(1, $1) g`,
    [ROWS],
  );
  const engine = e.engine();
  const where = '{"site": "chicago"}';
  const child = spawn(
    process.execPath,
    [...PGDSO_COMMAND, 'sync', '--mapping', 'sf-to-chicago', '--where', where, '--batch', '200', '--config', e.configPath],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  let output = '';
  child.stdout.on('data', (d) => (output += d));
  child.stderr.on('data', (d) => (output += d));
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  const progress = async () =>
    (
      await e.query<{ scanned: number; done: boolean }>('sf', `SELECT scanned::int, finished_at IS NOT NULL AS done FROM pgdso.scan_runs`)
    )[0];
  const atKill = await waitFor(
    async () => {
      const p = await progress();
      return p && p.scanned >= 20_000 ? p : null;
    },
    {
      timeoutMs: 120_000,
      intervalMs: 20,
      message: () => `the sync made no progress\n${output}`,
    },
  );
  child.kill('SIGKILL');
  await exited;
  const killed = (await progress())!;
  t.diagnostic(`sync killed at ${killed.scanned} of ${ROWS} requests scanned`);
  assert.equal(killed.done, false, `the kill came after the sync finished (${atKill?.scanned} scanned)\n${output}`);

  const other = await e.cli(['sync', '--mapping', 'sf-to-chicago', '--where', '{"site": "sf"}']);
  assert.equal(other.code, 2, show(other));
  assert.match(other.stderr, /an unfinished sync of mapping "sf-to-chicago".*--restart/s, show(other));

  const resumed = await e.cli(['sync', '--mapping', 'sf-to-chicago', '--where', where, '--batch', '1000']);
  assert.equal(resumed.code, 0, show(resumed));
  assert.match(resumed.stdout, /resuming run \d+ after request K-\d{6}/, show(resumed));
  assert.match(resumed.stdout, new RegExp(`${ROWS / 2} of ${ROWS} requests handed to the engine of sf`), show(resumed));
  await settled(e, engine);

  const [log] = await e.query<{ inserts: string; ids: string; others: string }>(
    'chicago',
    `SELECT count(*) FILTER (WHERE op = 'INSERT')::text AS inserts, count(DISTINCT id)::text AS ids,
            (SELECT count(*) FROM repair_request WHERE site IS DISTINCT FROM 'chicago')::text AS others FROM write_log`,
  );
  assert.deepEqual(log, { inserts: String(ROWS / 2), ids: String(ROWS / 2), others: '0' }, 'chicago: each selected request once, no other');
  const [writes] = await e.query<{ n: string }>('chicago', `SELECT count(*)::text AS n FROM write_log`);
  assert.equal(writes!.n, String(ROWS / 2), 'no request written twice on chicago (no update after its insert)');
  // the values too: a checksum of every selected request's columns, on sf and on chicago
  const checksum = async (server: string) =>
    (
      await e.query<{ n: string; sum: string }>(
        server,
        `SELECT count(*)::text AS n, md5(string_agg(concat_ws('|', id, item, site, status, description, needs_upholstery), ',' ORDER BY id))
                AS sum FROM repair_request WHERE site = 'chicago'`,
      )
    )[0];
  assert.deepEqual(await checksum('chicago'), await checksum('sf'), 'chicago holds the selected requests with their values');
  const runs = await e.query<{ state: string; scanned: string; matched: string }>(
    'sf',
    'SELECT state, scanned::text, matched::text FROM pgdso.scan_runs',
  );
  assert.deepEqual(runs, [{ state: 'done', scanned: String(ROWS), matched: String(ROWS / 2) }], 'one run, resumed to its end');
  await engine.stop();
});
