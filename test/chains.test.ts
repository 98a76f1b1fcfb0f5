// Ownership chains kept in step (whenToUpdate), return, delete, the update action, loop
// detection between two-way mappings, ownership broadcast, filter transitions and pools.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { waitFor } from './support/wait.ts';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, type DsoEnv, type EngineProcess } from './support/dso.ts';

const suite = dsoSuite(3);

function env(servers: string[], rules: Record<string, unknown>): Promise<DsoEnv> {
  return suite.env({ servers, schemaSql: REPAIR_REQUEST_SQL, forms: ['repair_request'], rules });
}

type Copy = Record<string, unknown> & { dso_mapping_history: { fromServer: string; toServer: string; mapping: string; operation?: string }[] };

async function copyOf(e: DsoEnv, server: string, id: string): Promise<Copy | undefined> {
  return (await e.query<Copy>(server, 'SELECT * FROM repair_request WHERE id = $1', [id]))[0];
}

function until(engine: EngineProcess, what: string, check: () => Promise<unknown>): Promise<void> {
  return waitFor(check, { message: () => `${what}; engine output:\n${engine.output}` });
}

/** Waits until every server's slot has confirmed everything written so far (the engines are idle). */
async function settled(e: DsoEnv, engine: EngineProcess, servers: string[]): Promise<void> {
  for (const server of servers) {
    const [{ lsn }] = (await e.query<{ lsn: string }>(server, 'SELECT pg_current_wal_lsn()::text AS lsn')) as [{ lsn: string }];
    await until(engine, `the slot of ${server} did not catch up`, async () => (await e.query<{ done: boolean }>(server, `SELECT confirmed_flush_lsn >= $1::pg_lsn AS done FROM pg_replication_slots WHERE database = current_database()`, [lsn]))[0]?.done);
  }
}

const chainRules = (extra: Record<string, unknown> = {}) => ({
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago', extra), mapping('chicago-to-upholstery', 'chicago', 'chicago_uph', extra)],
  filters: [
    filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }]),
    filter('route-upholstery', 'chicago', { all: [is('needs_upholstery', true)] }, [{ type: 'transfer', mapping: 'chicago-to-upholstery' }]),
  ],
});

test('whenToUpdate immediately: a change of the master at the end of a chain reaches every copy, hop by hop back to sf; each copy knows where the master is', async () => {
  const e = await env(['sf', 'chicago', 'chicago_uph'], chainRules());
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, needs_upholstery, description) VALUES ('C-1', 'chair', true, 'torn seat')`);
  await until(engine, 'the chain was not built', async () => (await copyOf(e, 'chicago_uph', 'C-1'))?.dso_master === true && (await copyOf(e, 'sf', 'C-1'))?.dso_current_server === 'chicago_uph');
  await e.query('chicago_uph', `UPDATE repair_request SET status = 'in progress', description = 'new fabric ordered' WHERE id = 'C-1'`);
  await until(engine, 'the update did not reach sf', async () => (await copyOf(e, 'sf', 'C-1'))?.status === 'in progress');
  for (const server of ['sf', 'chicago']) {
    const c = (await copyOf(e, server, 'C-1'))!;
    assert.deepEqual([c.status, c.description, c.dso_master, c.dso_current_server, c.dso_update_status], ['in progress', 'new fabric ordered', false, 'chicago_uph', 'success'], server);
  }
  assert.equal((await copyOf(e, 'chicago_uph', 'C-1'))!.dso_master, true);
  await engine.stop();
});

test('return: ownership goes back to the server the request came from, with the latest values; the returning copy becomes read-only; not returned twice', async () => {
  const rules = chainRules();
  rules.filters.push(filter('give-back', 'chicago_uph', { all: [is('status', 'reupholstered')] }, [{ type: 'return' }]));
  const e = await env(['sf', 'chicago', 'chicago_uph'], rules);
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, needs_upholstery) VALUES ('R-1', 'chair', true)`);
  await until(engine, 'the chain was not built', async () => (await copyOf(e, 'chicago_uph', 'R-1'))?.dso_master === true);
  await e.query('chicago_uph', `UPDATE repair_request SET status = 'reupholstered', description = 'blue velvet' WHERE id = 'R-1'`);
  await until(engine, 'ownership did not come back to chicago', async () => (await copyOf(e, 'chicago', 'R-1'))?.dso_master === true && (await copyOf(e, 'chicago_uph', 'R-1'))?.dso_master === false && (await copyOf(e, 'sf', 'R-1'))?.dso_current_server === 'chicago');
  const [sf, chicago, uph] = [(await copyOf(e, 'sf', 'R-1'))!, (await copyOf(e, 'chicago', 'R-1'))!, (await copyOf(e, 'chicago_uph', 'R-1'))!];
  assert.deepEqual([chicago.status, chicago.description, chicago.dso_current_server], ['reupholstered', 'blue velvet', 'chicago']);
  assert.deepEqual([uph.dso_master, uph.dso_current_server, uph.dso_transfer_status], [false, 'chicago', 'success']);
  assert.deepEqual([sf.dso_master, sf.description], [false, 'blue velvet']);
  assert.deepEqual(chicago.dso_mapping_history.map((h) => `${h.fromServer}->${h.toServer}${h.operation ? ` (${h.operation})` : ''}`), ['sf->chicago', 'chicago->chicago_uph', 'chicago_uph->chicago (return)']);
  // the master is chicago again: a user there changes it, and every copy follows
  await e.query('chicago', `UPDATE repair_request SET status = 'ready' WHERE id = 'R-1'`);
  await until(engine, 'the change at chicago did not reach both ends', async () => (await copyOf(e, 'sf', 'R-1'))?.status === 'ready' && (await copyOf(e, 'chicago_uph', 'R-1'))?.status === 'ready');
  // the read-only copy at chicago_uph refuses a user's change
  await assert.rejects(e.query('chicago_uph', `UPDATE repair_request SET status = 'x' WHERE id = 'R-1'`), /owned by chicago/);
  await engine.stop();
});

test('delete: deleting the master deletes the copies of its chain kept in step; the delete action deletes the copy on its mapping target', async () => {
  const rules = chainRules();
  rules.mappings.push(mapping('sf-notes-to-chicago', 'sf', 'chicago', { transferMode: 'independent-copy' }));
  rules.filters.push(filter('share-lamps', 'sf', { all: [is('item', 'lamp')] }, [{ type: 'transfer', mapping: 'sf-notes-to-chicago' }], ['insert']));
  rules.filters.push(filter('unshare-cancelled', 'sf', { all: [is('item', 'lamp'), is('status', 'cancelled')] }, [{ type: 'delete', mapping: 'sf-notes-to-chicago' }], ['update']));
  const e = await env(['sf', 'chicago', 'chicago_uph'], rules);
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, needs_upholstery) VALUES ('D-1', 'chair', true), ('L-1', 'lamp', false)`);
  await until(engine, 'the chain was not built', async () => (await copyOf(e, 'chicago_uph', 'D-1'))?.dso_master === true && (await copyOf(e, 'chicago', 'L-1')) !== undefined);
  await e.query('chicago_uph', `DELETE FROM repair_request WHERE id = 'D-1'`);
  await until(engine, 'the chain copies were not deleted', async () => (await copyOf(e, 'chicago', 'D-1')) === undefined && (await copyOf(e, 'sf', 'D-1')) === undefined);
  await e.query('sf', `UPDATE repair_request SET status = 'cancelled' WHERE id = 'L-1'`);
  await until(engine, 'the delete action did not delete the copy', async () => (await copyOf(e, 'chicago', 'L-1')) === undefined);
  assert.equal((await copyOf(e, 'sf', 'L-1'))?.status, 'cancelled', 'the source copy stays');
  await engine.stop();
});
