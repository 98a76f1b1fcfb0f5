// A quiet source's slot keeps moving (heartbeat messages in its WAL, confirmed once the engine
// has nothing in flight), and the engine warns when the slot holds more WAL than the threshold.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { waitFor } from './support/wait.ts';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, settled, until, type DsoEnv } from './support/dso.ts';

const suite = dsoSuite(1);

interface Slot {
  confirmed: string;
  current: string;
  moved: boolean;
}

/** sf's slot: its confirmed position, sf's current WAL position, and whether the slot passed `since`. */
const slotOf = async (e: DsoEnv, since: string): Promise<Slot> =>
  (
    await e.query<Slot>(
      'sf',
      `SELECT confirmed_flush_lsn::text AS confirmed, pg_current_wal_lsn()::text AS current,
        confirmed_flush_lsn > '${since}'::pg_lsn AS moved
                   FROM pg_replication_slots WHERE database = current_database()`,
    )
  )[0]!;

test('a quiet source: heartbeats go into its WAL and its slot moves past them; a slot over pending.retainedWalWarnBytes is warned about', {
  timeout: 60_000,
}, async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
      filters: [filter('all', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }])],
    },
    config: { pending: { heartbeatSeconds: 1, retainedWalWarnBytes: 1 }, http: { port: 0 } },
  });
  const engine = e.engine();
  const port = await until(engine, 'no http port in the log', () => /"httpPort":(\d+)/.exec(engine.output)?.[1]);
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('Q-1', 'chair')`);
  await waitFor(async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'Q-1'`)).length === 1, {
    message: () => engine.output,
  });
  // from here nobody writes on sf: only the engine's heartbeats (once its bookkeeping of Q-1 is confirmed)
  await settled(e, engine, ['sf']);
  const heartbeats = async () =>
    Number(/pgdso_heartbeats_total\{server="sf"\} (\d+)/.exec(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text())?.[1] ?? 0);
  const counted = await heartbeats();
  const before = await slotOf(e, '0/0');
  await until(
    engine,
    `sf's slot did not move past ${before.current} with heartbeats and no other writes on sf`,
    async () => {
      const slot = await slotOf(e, before.current);
      return slot.moved && (await heartbeats()) > counted;
    },
    20_000,
  );
  await until(engine, 'no warning about the WAL the slot holds', () => /holds more WAL than the threshold/.test(engine.output));
  const warning = engine.output.split('\n').find((line) => line.includes('holds more WAL than the threshold'))!;
  assert.match(warning, /"retainedWalBytes":\d+/);
  assert.match(warning, /"thresholdBytes":1\b/);
  assert.equal(await engine.stop(), 0);
});
