// DSO use 4, archiving, on three servers: sf and chicago move their closed requests to archive
// with ownership and delete their own copy once the transfer is applied (afterTransfer delete);
// a transfer that fails deletes nothing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, type DsoEnv, copyOf, until, settled, type Copy } from './support/dso.ts';

const suite = dsoSuite(3);

const SERVERS = ['sf', 'chicago', 'archive'];

const archivingRules = {
  mappings: [
    mapping('sf-to-archive', 'sf', 'archive', { transferMode: 'data+ownership', afterTransfer: 'delete' }),
    mapping('chicago-to-archive', 'chicago', 'archive', { transferMode: 'data+ownership', afterTransfer: 'delete' }),
  ],
  filters: [
    filter('archive-closed-sf', 'sf', { all: [is('status', 'closed')] }, [{ type: 'transfer', mapping: 'sf-to-archive' }]),
    filter('archive-closed-chicago', 'chicago', { all: [is('status', 'closed')] }, [{ type: 'transfer', mapping: 'chicago-to-archive' }]),
  ],
};

function env(): Promise<DsoEnv> {
  return suite.env({ servers: SERVERS, schemaSql: REPAIR_REQUEST_SQL, forms: ['repair_request'], rules: archivingRules });
}

/** Checks the archive copy of `id`, archived from `from`. */
function assertArchived(copy: Copy | undefined, id: string, from: string, fields: Record<string, unknown>): void {
  assert.ok(copy, `archive has no copy of ${id}`);
  assert.deepEqual(
    [
      copy.dso_master,
      copy.dso_current_server,
      copy.dso_current_form,
      copy.dso_from_server,
      copy.dso_from_form,
      copy.dso_from_request_id,
      copy.dso_from_mapping,
    ],
    [true, 'archive', 'repair_request', from, 'repair_request', id, `${from}-to-archive`],
    `the archive copy of ${id}`,
  );
  for (const [column, value] of Object.entries(fields)) assert.equal(copy[column], value, `${column} of the archive copy of ${id}`);
  assert.equal(copy.dso_mapping_history.length, 1, `one hop in the history of ${id}: ${JSON.stringify(copy.dso_mapping_history)}`);
  const [hop] = copy.dso_mapping_history;
  assert.deepEqual(
    [hop?.fromServer, hop?.toServer, hop?.mapping, hop?.fromRequestId],
    [from, 'archive', `${from}-to-archive`, id],
    `the hop of ${id}`,
  );
}

test('archiving: a closed request of sf or chicago arrives on archive as its master and is then deleted from its source; open requests \
stay on their source untouched', async () => {
  const e = await env();
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, status, description) VALUES ('SF-1', 'desk', 'open', 'wobbly leg'),
      ('SF-2', 'lamp', 'open', 'flickers')`,
  );
  await e.query(
    'chicago',
    `INSERT INTO repair_request (id, item, status, description) VALUES ('CH-1', 'chair', 'open', 'squeaks'),
      ('CH-2', 'table', 'in progress', 'scratched')`,
  );
  await e.query('sf', `UPDATE repair_request SET status = 'closed', description = 'new leg fitted' WHERE id = 'SF-1'`);
  await e.query('chicago', `UPDATE repair_request SET status = 'closed', description = 'oiled' WHERE id = 'CH-1'`);

  await until(
    engine,
    'SF-1 and CH-1 did not arrive on archive',
    async () => (await copyOf(e, 'archive', 'SF-1')) && (await copyOf(e, 'archive', 'CH-1')),
  );
  await until(
    engine,
    'SF-1 and CH-1 were not deleted from their sources',
    async () => (await copyOf(e, 'sf', 'SF-1')) === undefined && (await copyOf(e, 'chicago', 'CH-1')) === undefined,
  );
  assertArchived(await copyOf(e, 'archive', 'SF-1'), 'SF-1', 'sf', { item: 'desk', status: 'closed', description: 'new leg fitted' });
  assertArchived(await copyOf(e, 'archive', 'CH-1'), 'CH-1', 'chicago', { item: 'chair', status: 'closed', description: 'oiled' });
  assert.equal(await copyOf(e, 'chicago', 'SF-1'), undefined, 'SF-1 went to chicago');
  assert.equal(await copyOf(e, 'sf', 'CH-1'), undefined, 'CH-1 went to sf');

  // open requests stay where they are, untouched by the engine
  const open = { sf: await copyOf(e, 'sf', 'SF-2'), chicago: await copyOf(e, 'chicago', 'CH-2') };
  await settled(e, engine);
  for (const [server, id] of [
    ['sf', 'SF-2'],
    ['chicago', 'CH-2'],
  ] as const) {
    const copy = await copyOf(e, server, id);
    assert.deepEqual(copy, open[server], `${id} on ${server} changed`);
    assert.deepEqual(
      [copy?.dso_master, copy?.dso_transfer_status, copy?.dso_to_server, copy?.dso_version],
      [true, null, null, '1'],
      `${id} on ${server}`,
    );
    assert.equal(await copyOf(e, 'archive', id), undefined, `${id} was archived`);
  }
  for (const server of SERVERS)
    assert.deepEqual(await e.query(server, 'SELECT type, mapping, error FROM pgdso.pending_errors'), [], `errors on ${server}`);
  await engine.stop();
});

test('archiving: a request the archive refuses is not deleted from its source, stays master there with dso_transfer_status failure and a \
pending error; later requests still arrive', async () => {
  const e = await env();
  await e.query('archive', `ALTER TABLE repair_request ADD CONSTRAINT archive_refuses CHECK (description IS DISTINCT FROM 'refuse me')`);
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, status, description) VALUES ('F-1', 'desk', 'open', 'refuse me'),
      ('F-2', 'lamp', 'open', 'fine')`,
  );
  await e.query('sf', `UPDATE repair_request SET status = 'closed' WHERE id = 'F-1'`);
  await until(
    engine,
    'the failed transfer of F-1 was not recorded',
    async () => (await copyOf(e, 'sf', 'F-1'))?.dso_transfer_status === 'failure',
  );

  const source = await copyOf(e, 'sf', 'F-1');
  assert.ok(source, 'F-1 was deleted from sf although the archive refused it');
  assert.deepEqual(
    [source.dso_master, source.dso_transfer_status, source.status, source.description],
    [true, 'failure', 'closed', 'refuse me'],
  );
  assert.notEqual(source.dso_current_server, 'archive', 'the master of F-1 is said to be on archive');
  assert.equal(await copyOf(e, 'archive', 'F-1'), undefined, 'the archive holds F-1');
  const errors = await e.query<{
    type: string;
    mapping: string;
    request_id: string;
    target_server: string;
    sqlstate: string;
    error: string;
  }>('sf', 'SELECT type, mapping, request_id, target_server, sqlstate, error FROM pgdso.pending_errors');
  assert.equal(errors.length, 1, JSON.stringify(errors));
  assert.deepEqual(
    [errors[0]!.type, errors[0]!.mapping, errors[0]!.request_id, errors[0]!.target_server, errors[0]!.sqlstate],
    ['transfer', 'sf-to-archive', 'F-1', 'archive', '23514'],
  );
  assert.match(errors[0]!.error, /archive_refuses/);

  // later requests still arrive, and are deleted from sf once archived
  await e.query('sf', `UPDATE repair_request SET status = 'closed' WHERE id = 'F-2'`);
  await e.query('sf', `INSERT INTO repair_request (id, item, status, description) VALUES ('F-3', 'chair', 'closed', 'done')`);
  await until(
    engine,
    'F-2 and F-3 were not archived',
    async () => (await copyOf(e, 'archive', 'F-2'))?.dso_master === true && (await copyOf(e, 'archive', 'F-3'))?.dso_master === true,
  );
  await until(
    engine,
    'F-2 and F-3 were not deleted from sf',
    async () => (await copyOf(e, 'sf', 'F-2')) === undefined && (await copyOf(e, 'sf', 'F-3')) === undefined,
  );
  assertArchived(await copyOf(e, 'archive', 'F-2'), 'F-2', 'sf', { description: 'fine' });
  assertArchived(await copyOf(e, 'archive', 'F-3'), 'F-3', 'sf', { description: 'done' });

  // the refused request is still sf's own
  await settled(e, engine);
  assert.deepEqual([(await copyOf(e, 'sf', 'F-1'))?.dso_master, (await copyOf(e, 'sf', 'F-1'))?.dso_transfer_status], [true, 'failure']);
  assert.equal((await e.query('sf', 'SELECT 1 FROM pgdso.pending_errors')).length, 1);
  await e.query('sf', `UPDATE repair_request SET internal_note = 'to be checked by hand' WHERE id = 'F-1'`);
  await engine.stop();
});

test('archiving: the archive copy is a master not linked back: a user on archive updates it and nothing comes back to sf', async () => {
  const e = await env();
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, status, description) VALUES ('A-1', 'desk', 'closed', 'archived as is')`);
  await until(
    engine,
    'A-1 was not archived and deleted from sf',
    async () => (await copyOf(e, 'archive', 'A-1'))?.dso_master === true && (await copyOf(e, 'sf', 'A-1')) === undefined,
  );

  await e.query('archive', `UPDATE repair_request SET status = 'reopened', description = 'edited in the archive' WHERE id = 'A-1'`);
  const archived = (await copyOf(e, 'archive', 'A-1'))!;
  assert.deepEqual([archived.status, archived.description, archived.dso_master], ['reopened', 'edited in the archive', true]);
  await settled(e, engine);

  assert.equal(await copyOf(e, 'sf', 'A-1'), undefined, 'A-1 came back to sf');
  assert.equal(await copyOf(e, 'chicago', 'A-1'), undefined, 'A-1 went to chicago');
  for (const server of SERVERS) {
    assert.deepEqual(await e.query(server, 'SELECT type, mapping, error FROM pgdso.pending_errors'), [], `errors on ${server}`);
    assert.deepEqual(await e.query(server, 'SELECT type, mapping, request_id FROM pgdso.pending'), [], `pending on ${server}`);
  }
  // the archive copy is unchanged by the engine after the user's edit
  assert.deepEqual(await copyOf(e, 'archive', 'A-1'), archived);
  await engine.stop();
});
