// Fencing of the apply lanes: a lane writing for an older term of the dso operation fails in the
// database, whatever it still holds open; the new owner frees the lane's origin from it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import pg from 'pg';
import { dsoSuite, REPAIR_REQUEST_SQL } from './support/dso.ts';
import { ApplyLane } from '../src/applier/lane.ts';
import { isFenced } from '../src/sql/fencing.ts';

const suite = dsoSuite(1);
const log = pino({ level: 'silent' });

test('a lane of a former owner (older term) cannot commit once the new owner opened the same lane, nor open it again', async () => {
  const e = await suite.env({
    servers: ['sf'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [], filters: [] },
  });
  const lane = (instanceId: string, term: number) =>
    new ApplyLane<never>({
      connection: { connectionString: e.urls.sf },
      origin: 'pgdso:test:default:fence',
      name: 'test->sf/default',
      log,
      fence: { instanceId, term },
    });
  const old = lane('sf-a', 1);
  await old.open();
  await old.transaction(10n, new Date(), async (client) => {
    await client.query(`INSERT INTO repair_request (id, item) VALUES ('F-1', 'chair')`);
  });

  // the new owner opens the same lane: the former owner's connection is terminated, the term raised
  const fresh = lane('sf-b', 2);
  await fresh.open();
  await assert.rejects(
    old.transaction(20n, new Date(), async (client) => {
      await client.query(`INSERT INTO repair_request (id, item) VALUES ('F-2', 'chair')`);
    }),
    'the former owner commits after the new owner opened the lane',
  );
  await old.close();
  // a former owner that reconnects with its old term is refused before it writes
  const again = lane('sf-a', 1);
  await assert.rejects(again.open(), (err) => isFenced(err), 'the older term opens the lane again');
  await again.close();
  // the new owner writes, and its progress is the one recorded
  await fresh.transaction(30n, new Date(), async (client) => {
    await client.query(`INSERT INTO repair_request (id, item) VALUES ('F-3', 'chair')`);
  });
  await fresh.close();
  const ids = (await e.query<{ id: string }>('sf', `SELECT id FROM repair_request ORDER BY id`)).map((r) => r.id);
  assert.deepEqual(ids, ['F-1', 'F-3']);
  const [progress] = await e.query<{ term: number; instance_id: string; lsn: string }>(
    'sf',
    `SELECT term::int, instance_id, source_lsn::text AS lsn FROM pgdso.apply_progress WHERE origin = 'pgdso:test:default:fence'`,
  );
  assert.deepEqual(progress, { term: 2, instance_id: 'sf-b', lsn: '0/1E' });
});

test('the term check alone refuses a former owner that still holds its connection', async () => {
  const e = await suite.env({
    servers: ['sf'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [], filters: [] },
  });
  const options = (instanceId: string, term: number, origin: string) => ({
    connection: { connectionString: e.urls.sf },
    origin,
    name: `test->sf/${origin}`,
    log,
    fence: { instanceId, term },
  });
  const old = new ApplyLane<never>(options('sf-a', 1, 'pgdso:test:a:fence'));
  await old.open();
  // a newer term recorded for this lane by another connection (as a new owner does), without terminating the old one
  await e.query('sf', `UPDATE pgdso.apply_progress SET term = 2, instance_id = 'sf-b' WHERE origin = 'pgdso:test:a:fence'`);
  await assert.rejects(
    old.transaction(10n, new Date(), async (client) => {
      await client.query(`INSERT INTO repair_request (id, item) VALUES ('G-1', 'chair')`);
    }),
    (err) => isFenced(err),
  );
  await assert.rejects(
    old.runAlone(async (client) => {
      await client.query(`INSERT INTO repair_request (id, item) VALUES ('G-2', 'chair')`);
    }),
    (err) => isFenced(err),
  );
  await old.close();
  assert.deepEqual(await e.query('sf', `SELECT id FROM repair_request`), []);
});

test('a new owner waits for the origin while a former owner still holds it (a backend that exits late), then opens the lane', async () => {
  const e = await suite.env({
    servers: ['sf'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: { mappings: [], filters: [] },
  });
  const origin = 'pgdso:test:late:fence';
  const first = new ApplyLane<never>({
    connection: { connectionString: e.urls.sf },
    origin,
    name: 'test->sf/late',
    log,
    fence: { instanceId: 'sf-a', term: 1 },
  });
  await first.open();
  await first.close();
  // a session the new owner cannot terminate by name keeps the origin active until the new
  // owner's lane has been refused it once (the lane says so in its log)
  const holder = new pg.Client({ connectionString: e.urls.sf, application_name: 'not a lane' });
  await holder.connect();
  await holder.query('SELECT pg_replication_origin_session_setup($1)', [origin]);
  let refused: () => void = () => {};
  const release = new Promise<void>((resolve) => (refused = resolve)).then(() => holder.end());
  const watching = pino({ level: 'debug' }, { write: (line: string) => (line.includes('still active') ? refused() : undefined) });
  const fresh = new ApplyLane<never>({
    connection: { connectionString: e.urls.sf },
    origin,
    name: 'test->sf/late',
    log: watching,
    fence: { instanceId: 'sf-b', term: 2 },
  });
  await fresh.open();
  await release;
  await fresh.transaction(40n, new Date(), async (client) => {
    await client.query(`INSERT INTO repair_request (id, item) VALUES ('H-1', 'chair')`);
  });
  await fresh.close();
  assert.deepEqual(await e.query('sf', `SELECT id FROM repair_request`), [{ id: 'H-1' }]);
});
