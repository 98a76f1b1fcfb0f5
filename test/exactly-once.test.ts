// kill -9 of `pgdso run` in the middle of a load, then a restart: every row arrives exactly once.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { waitFor } from './support/wait.ts';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter } from './support/dso.ts';

const suite = dsoSuite(2);

const CHECKSUM = `SELECT count(*)::int AS n, md5(string_agg(id || ':' || item || ':' || coalesce(description, '~'), ',' ORDER BY id)) AS sum
  FROM repair_request`;

/**
 * Every write to chicago's repair_request, one audit row each, with whether the engine made it
 * (a replication origin session): a primary key cannot hide a second write. Statement triggers
 * with transition tables, so the audit costs little next to the writes.
 */
const WRITE_COUNT_SQL = `
CREATE TABLE write_audit (n bigserial PRIMARY KEY, id text NOT NULL, op text NOT NULL, by_engine boolean NOT NULL);
CREATE FUNCTION write_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO write_audit (id, op, by_engine) SELECT id, TG_OP, pg_replication_origin_session_is_setup() FROM written;
  RETURN NULL;
END $$;
CREATE TRIGGER write_audit_insert AFTER INSERT ON repair_request REFERENCING NEW TABLE AS written FOR EACH STATEMENT
  EXECUTE FUNCTION write_audit();
CREATE TRIGGER write_audit_update AFTER UPDATE ON repair_request REFERENCING NEW TABLE AS written FOR EACH STATEMENT
  EXECUTE FUNCTION write_audit();`;

/** A user-side trigger on sf: the engine's updates of source copies wait while the test holds this advisory lock. */
const HOLD = 7_310_043;
const HOLD_SQL = `CREATE FUNCTION hold_engine_updates() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN PERFORM pg_advisory_xact_lock_shared(${HOLD}); RETURN NEW; END $$;
  CREATE TRIGGER hold_engine_updates BEFORE UPDATE ON repair_request FOR EACH ROW EXECUTE FUNCTION hold_engine_updates()`;

test('kill -9 of the engine in the middle of a 50k-row load, then a restart: every row arrives exactly once', async () => {
  const env = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
      filters: [filter('all-requests', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert'])],
    },
  });
  const e = env;
  await e.query('chicago', WRITE_COUNT_SQL);
  await e.query('sf', HOLD_SQL);
  const holder = new pg.Client({ connectionString: e.urls.sf, application_name: 'test-holder' });
  await holder.connect();
  try {
    const holderPid = (await holder.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
    const total = 50_000;
    const perTransaction = 500;
    let engine = e.engine();
    const first = engine;
    const load = (async () => {
      for (let start = 0; start < total; start += perTransaction) {
        await e.query(
          'sf',
          `INSERT INTO repair_request (id, item, description)
          SELECT 'R' || lpad(g::text, 6, '0'), CASE WHEN g % 3 = 0 THEN 'chair' ELSE 'desk' END, md5(g::text)
            FROM generate_series($1::int, $2::int) g`,
          [start, start + perTransaction - 1],
        );
      }
    })();
    const chicagoRows = async () => (await e.query<{ n: number }>('chicago', 'SELECT count(*)::int AS n FROM repair_request'))[0]!.n;
    // once rows are arriving on chicago, hold the engine between its commit on chicago and the
    // confirmation of that batch on sf (its source bookkeeping comes in between), then kill -9 it
    await waitFor(async () => (await chicagoRows()) >= 5_000, {
      timeoutMs: 60_000,
      message: () => `engine did not start applying:\n${engine.output}`,
    });
    await holder.query('SELECT pg_advisory_lock($1)', [HOLD]);
    const [waiter] = (await waitFor(
      async () => {
        const rows = await e.query<{ pid: number }>(
          'sf',
          `SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
            AND wait_event = 'advisory' AND pid <> $1`,
          [holderPid],
        );
        return rows.length ? rows : undefined;
      },
      { timeoutMs: 60_000, message: () => `the engine did not reach its source bookkeeping:\n${engine.output}` },
    ))!;
    const markedAtKill = (
      await e.query<{ n: number }>('sf', `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status = 'success'`)
    )[0]!.n;
    const [applied] = await e.query<{ lsn: string }>('chicago', 'SELECT max(source_lsn)::text AS lsn FROM pgdso.apply_progress');
    const [window] = await e.query<{ replays: boolean; confirmed: string }>(
      'sf',
      `SELECT confirmed_flush_lsn <= $1::pg_lsn AS replays, confirmed_flush_lsn::text AS confirmed
        FROM pg_replication_slots WHERE database = current_database()`,
      [applied!.lsn],
    );
    const atKill = await chicagoRows();
    const auditedAtKill = (await e.query<{ n: number }>('chicago', 'SELECT count(*)::int AS n FROM write_audit WHERE by_engine'))[0]!.n;
    await engine.kill9();
    await holder.query('SELECT pg_advisory_unlock($1)', [HOLD]);
    assert.equal(first.child.signalCode, 'SIGKILL', 'the engine was not killed by SIGKILL');
    // the killed engine's session on sf ends without committing the held bookkeeping
    await waitFor(async () => (await e.query('sf', 'SELECT 1 FROM pg_stat_activity WHERE pid = $1', [waiter!.pid])).length === 0, {
      message: `the killed engine's session ${waiter!.pid} on sf did not end`,
    });
    assert.equal(
      (await e.query<{ n: number }>('sf', `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status = 'success'`))[0]!.n,
      markedAtKill,
      "the killed engine's held bookkeeping was committed",
    );
    // chicago committed a batch the slot had not confirmed: the restart decodes it again
    assert.equal(
      window!.replays,
      true,
      `chicago applied up to ${applied!.lsn} and the slot confirmed ${window!.confirmed}: nothing to replay`,
    );
    assert.ok(atKill > 0 && atKill < total, `the kill came after the load was applied (${atKill} rows)`);
    assert.equal(auditedAtKill, atKill, 'the audit saw every write of the engine before the kill');

    engine = e.engine();
    await load;
    await waitFor(
      async () => {
        const [s] = await e.query<{ n: number }>(
          'sf',
          `SELECT count(*)::int AS n FROM repair_request WHERE dso_transfer_status = 'success'`,
        );
        return s!.n === total;
      },
      { timeoutMs: 120_000, message: () => `not all rows transferred after the restart:\n${engine.output}` },
    );
    await engine.stop();

    const [source] = await e.query<{ n: number; sum: string }>('sf', CHECKSUM);
    const [target] = await e.query<{ n: number; sum: string }>('chicago', CHECKSUM);
    assert.equal(source!.n, total);
    assert.deepEqual(target, source, 'chicago differs from sf');
    // Applied once: one engine write per row on chicago, none twice.
    const [audit] = await e.query<{ writes: number; rows: number; twice: string[] }>(
      'chicago',
      `SELECT count(*)::int AS writes, count(DISTINCT id)::int AS rows,
              coalesce((SELECT array_agg(id) FROM (SELECT id FROM write_audit WHERE by_engine
                GROUP BY id HAVING count(*) > 1 ORDER BY id LIMIT 10) d), '{}') AS twice
         FROM write_audit WHERE by_engine`,
    );
    assert.deepEqual(audit, { writes: total, rows: total, twice: [] }, 'engine writes on chicago (rows written more than once listed)');
    const [chicagoVersions] = await e.query<{ min: string; max: string }>(
      'chicago',
      'SELECT min(dso_version)::text AS min, max(dso_version)::text AS max FROM repair_request',
    );
    assert.deepEqual(chicagoVersions, { min: '1', max: '1' }, 'a row was applied twice on chicago');
    const [sfVersions] = await e.query<{ min: string; max: string }>(
      'sf',
      'SELECT min(dso_version)::text AS min, max(dso_version)::text AS max FROM repair_request',
    );
    assert.deepEqual(sfVersions, { min: '2', max: '2' }, 'a source copy was marked twice (or never)');
    const [errors] = await e.query<{ n: number }>('sf', 'SELECT count(*)::int AS n FROM pgdso.pending_errors');
    assert.equal(errors!.n, 0);
  } finally {
    await holder.end().catch(() => undefined);
  }
});
