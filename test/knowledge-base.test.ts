// DSO use 3, knowledge base, on three servers: a request closed by a user of any server is
// broadcast to every other server as an independent copy (its own master, outside any chain);
// independent copies do not ping-pong; ownership itself cannot be broadcast.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, type DsoEnv, copyOf, until, settled, type Copy } from './support/dso.ts';

const suite = dsoSuite(3);

const SERVERS = ['sf', 'chicago', 'tokyo'];

function env(rules: Record<string, unknown>): Promise<DsoEnv> {
  return suite.env({ servers: SERVERS, schemaSql: REPAIR_REQUEST_SQL, forms: ['repair_request'], rules });
}

const kbMapping = (from: string, to: string) => `kb-${from}-to-${to}`;

/** On each server: a request closed by a user of that server goes to every other server, as an independent copy. */
function knowledgeBaseRules(): Record<string, unknown> {
  const mappings: Record<string, unknown>[] = [];
  const filters: Record<string, unknown>[] = [];
  for (const from of SERVERS) {
    const others = SERVERS.filter((s) => s !== from);
    for (const to of others) mappings.push(mapping(kbMapping(from, to), from, to, { transferMode: 'independent-copy' }));
    filters.push(
      filter(
        `kb-publish-${from}`,
        from,
        { all: [is('status', 'closed'), { fact: 'origin', operator: 'equal', value: null }] },
        others.map((to) => ({ type: 'transfer', mapping: kbMapping(from, to) })),
      ),
    );
  }
  return { mappings, filters };
}

/** Checks the copy of `id` that `from` broadcast to `to`. */
function assertIndependentCopy(copy: Copy | undefined, id: string, from: string, to: string, description: string): void {
  assert.ok(copy, `${to} has no copy of ${id}`);
  assert.deepEqual(
    [
      copy.dso_master,
      copy.dso_current_server,
      copy.dso_from_server,
      copy.dso_from_form,
      copy.dso_from_request_id,
      copy.dso_from_mapping,
      copy.status,
      copy.description,
    ],
    [true, to, from, 'repair_request', id, kbMapping(from, to), 'closed', description],
    `the copy of ${id} on ${to}`,
  );
  assert.equal(copy.dso_mapping_history.length, 1, `one hop in the history of ${id} on ${to}: ${JSON.stringify(copy.dso_mapping_history)}`);
  const [hop] = copy.dso_mapping_history;
  assert.deepEqual([hop?.fromServer, hop?.toServer, hop?.mapping], [from, to, kbMapping(from, to)], `the hop of ${id} on ${to}`);
}

test('knowledge base: a request closed by a user of sf is broadcast to chicago and tokyo as independent master copies; sf stays master \
and records the last transfer; an open request goes nowhere', async () => {
  const e = await env(knowledgeBaseRules());
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, status, description) VALUES ('KB-1', 'desk', 'open', 'wobbly leg'),
      ('KB-2', 'lamp', 'open', 'flickers')`,
  );
  await e.query('sf', `UPDATE repair_request SET status = 'closed', description = 'tightened the screws' WHERE id = 'KB-1'`);
  await e.query('sf', `UPDATE repair_request SET status = 'in progress' WHERE id = 'KB-2'`);
  await until(
    engine,
    'KB-1 was not broadcast',
    async () =>
      (await copyOf(e, 'chicago', 'KB-1')) &&
      (await copyOf(e, 'tokyo', 'KB-1')) &&
      (await copyOf(e, 'sf', 'KB-1'))?.dso_transfer_status === 'success',
  );

  assertIndependentCopy(await copyOf(e, 'chicago', 'KB-1'), 'KB-1', 'sf', 'chicago', 'tightened the screws');
  assertIndependentCopy(await copyOf(e, 'tokyo', 'KB-1'), 'KB-1', 'sf', 'tokyo', 'tightened the screws');

  // the source stays its own master; dso_to_* names the last transfer of the filter
  const source = (await copyOf(e, 'sf', 'KB-1'))!;
  assert.deepEqual(
    [
      source.dso_master,
      source.dso_current_server,
      source.dso_transfer_status,
      source.dso_to_server,
      source.dso_to_form,
      source.dso_to_request_id,
      source.dso_to_mapping,
    ],
    [true, 'sf', 'success', 'tokyo', 'repair_request', 'KB-1', kbMapping('sf', 'tokyo')],
  );

  // the open request goes nowhere, and the broadcast copies are not broadcast again
  await settled(e, engine);
  for (const server of ['chicago', 'tokyo']) assert.equal(await copyOf(e, server, 'KB-2'), undefined, `the open request reached ${server}`);
  const kb2 = (await copyOf(e, 'sf', 'KB-2'))!;
  assert.deepEqual([kb2.dso_master, kb2.dso_transfer_status, kb2.dso_to_server], [true, null, null]);
  for (const server of SERVERS) {
    assert.deepEqual(await e.query(server, 'SELECT type, mapping, error FROM pgdso.pending_errors'), [], `errors on ${server}`);
  }
  await engine.stop();
});

test('knowledge base: a request closed by a user of chicago reaches sf and tokyo as independent master copies', async () => {
  const e = await env(knowledgeBaseRules());
  const engine = e.engine();
  await e.query('chicago', `INSERT INTO repair_request (id, item, status, description) VALUES ('CH-1', 'chair', 'open', 'squeaks')`);
  await e.query('chicago', `UPDATE repair_request SET status = 'closed', description = 'oiled the hinge' WHERE id = 'CH-1'`);
  await until(
    engine,
    'CH-1 was not broadcast',
    async () =>
      (await copyOf(e, 'sf', 'CH-1')) &&
      (await copyOf(e, 'tokyo', 'CH-1')) &&
      (await copyOf(e, 'chicago', 'CH-1'))?.dso_transfer_status === 'success',
  );

  assertIndependentCopy(await copyOf(e, 'sf', 'CH-1'), 'CH-1', 'chicago', 'sf', 'oiled the hinge');
  assertIndependentCopy(await copyOf(e, 'tokyo', 'CH-1'), 'CH-1', 'chicago', 'tokyo', 'oiled the hinge');
  const source = (await copyOf(e, 'chicago', 'CH-1'))!;
  assert.deepEqual(
    [
      source.dso_master,
      source.dso_current_server,
      source.dso_transfer_status,
      source.dso_to_server,
      source.dso_to_request_id,
      source.dso_to_mapping,
    ],
    [true, 'chicago', 'success', 'tokyo', 'CH-1', kbMapping('chicago', 'tokyo')],
  );
  await engine.stop();
});

test('knowledge base: a user updating an independent copy at its target does not send it back to the source (no ping-pong)', async () => {
  const e = await env(knowledgeBaseRules());
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, status, description) VALUES ('PP-1', 'desk', 'closed', 'glued the drawer')`);
  await until(
    engine,
    'PP-1 was not broadcast',
    async () =>
      (await copyOf(e, 'chicago', 'PP-1')) &&
      (await copyOf(e, 'tokyo', 'PP-1')) &&
      (await copyOf(e, 'sf', 'PP-1'))?.dso_transfer_status === 'success',
  );
  await settled(e, engine);
  const before = (await copyOf(e, 'sf', 'PP-1'))!;

  // the copy at chicago is its own master: a user there changes it (the request stays closed,
  // so chicago's filter fires on this user's change)
  await e.query('chicago', `UPDATE repair_request SET description = 'edited in chicago', site = 'chicago' WHERE id = 'PP-1'`);
  assert.equal((await copyOf(e, 'chicago', 'PP-1'))?.description, 'edited in chicago');
  await settled(e, engine);

  const after = (await copyOf(e, 'sf', 'PP-1'))!;
  assert.deepEqual(after, before, 'the source copy on sf changed after an edit of the independent copy on chicago');
  assert.deepEqual(after.dso_mapping_history, [], 'the source copy has no history');
  assert.deepEqual(await e.query('sf', 'SELECT type, mapping, error FROM pgdso.pending_errors'), [], 'errors on sf');
  assert.deepEqual(await e.query('sf', 'SELECT id FROM pgdso.pending'), [], 'pending on sf');
  await engine.stop();
});

test('ownership cannot be broadcast: of two transfers with ownership in one filter, the first target gets the master copy, the second is \
recorded in pending_errors on the source, and the stream goes on', async () => {
  const e = await env({
    mappings: [mapping('sf-to-chicago', 'sf', 'chicago'), mapping('sf-to-tokyo', 'sf', 'tokyo')],
    filters: [
      filter('route-chairs-twice', 'sf', { all: [is('item', 'chair')] }, [
        { type: 'transfer', mapping: 'sf-to-chicago' },
        { type: 'transfer', mapping: 'sf-to-tokyo' },
      ]),
    ],
  });
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('OB-1', 'chair', 'torn seat')`);
  await until(
    engine,
    'OB-1 did not move to chicago with ownership',
    async () => (await copyOf(e, 'chicago', 'OB-1'))?.dso_master === true && (await copyOf(e, 'sf', 'OB-1'))?.dso_master === false,
  );
  await until(
    engine,
    'no pending error for the second transfer',
    async () => (await e.query('sf', `SELECT 1 FROM pgdso.pending_errors WHERE request_id = 'OB-1'`)).length > 0,
  );

  const [sf, chicago] = [(await copyOf(e, 'sf', 'OB-1'))!, (await copyOf(e, 'chicago', 'OB-1'))!];
  assert.deepEqual(
    [sf.dso_master, sf.dso_current_server, sf.dso_to_server, sf.dso_to_mapping],
    [false, 'chicago', 'chicago', 'sf-to-chicago'],
  );
  assert.deepEqual(
    [chicago.dso_master, chicago.dso_current_server, chicago.dso_from_server, chicago.dso_from_mapping],
    [true, 'chicago', 'sf', 'sf-to-chicago'],
  );

  const errors = await e.query<{ type: string; mapping: string; request_id: string; error: string }>(
    'sf',
    `SELECT type, mapping, request_id, error FROM pgdso.pending_errors WHERE request_id = 'OB-1'`,
  );
  assert.equal(errors.length, 1, JSON.stringify(errors));
  assert.deepEqual([errors[0]!.type, errors[0]!.mapping], ['transfer', 'sf-to-tokyo']);
  assert.match(errors[0]!.error, /ownership cannot be broadcast/);

  // the stream goes on: a later request arrives
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('OB-2', 'chair', 'loose arm')`);
  await until(engine, 'OB-2 did not arrive on chicago', async () => (await copyOf(e, 'chicago', 'OB-2'))?.dso_master === true);
  await settled(e, engine);
  // the second leg was never applied
  assert.equal(await copyOf(e, 'tokyo', 'OB-1'), undefined, 'OB-1 reached tokyo');
  assert.equal(await copyOf(e, 'tokyo', 'OB-2'), undefined, 'OB-2 reached tokyo');
  await engine.stop();
});
