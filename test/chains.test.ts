// Ownership chains kept in step (whenToUpdate), return, delete, the update action, loop
// detection between two-way mappings, ownership broadcast, filter transitions and pools.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, type DsoEnv, copyOf, until, settled } from './support/dso.ts';

const suite = dsoSuite(3);

function env(servers: string[], rules: Record<string, unknown>): Promise<DsoEnv> {
  return suite.env({ servers, schemaSql: REPAIR_REQUEST_SQL, forms: ['repair_request'], rules });
}

const chainRules = (extra: Record<string, unknown> = {}) => ({
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago', extra), mapping('chicago-to-upholstery', 'chicago', 'chicago_uph', extra)],
  filters: [
    filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }]),
    filter('route-upholstery', 'chicago', { all: [is('needs_upholstery', true)] }, [
      { type: 'transfer', mapping: 'chicago-to-upholstery' },
    ]),
  ],
});

test('whenToUpdate immediately: a change of the master at the end of a chain reaches every copy, hop by hop back to sf; each copy knows \
where the master is', async () => {
  const e = await env(['sf', 'chicago', 'chicago_uph'], chainRules());
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, needs_upholstery, description) VALUES ('C-1', 'chair', true, 'torn seat')`);
  await until(
    engine,
    'the chain was not built',
    async () =>
      (await copyOf(e, 'chicago_uph', 'C-1'))?.dso_master === true && (await copyOf(e, 'sf', 'C-1'))?.dso_current_server === 'chicago_uph',
  );
  await e.query('chicago_uph', `UPDATE repair_request SET status = 'in progress', description = 'new fabric ordered' WHERE id = 'C-1'`);
  await until(engine, 'the update did not reach sf', async () => (await copyOf(e, 'sf', 'C-1'))?.status === 'in progress');
  for (const server of ['sf', 'chicago']) {
    const c = (await copyOf(e, server, 'C-1'))!;
    assert.deepEqual(
      [c.status, c.description, c.dso_master, c.dso_current_server, c.dso_update_status],
      ['in progress', 'new fabric ordered', false, 'chicago_uph', 'success'],
      server,
    );
  }
  assert.equal((await copyOf(e, 'chicago_uph', 'C-1'))!.dso_master, true);
  await engine.stop();
});

test('return: ownership goes back to the server the request came from, with the latest values; the returning copy becomes read-only; not \
returned twice', async () => {
  const rules = chainRules();
  rules.filters.push(filter('give-back', 'chicago_uph', { all: [is('status', 'reupholstered')] }, [{ type: 'return' }]));
  const e = await env(['sf', 'chicago', 'chicago_uph'], rules);
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, needs_upholstery) VALUES ('R-1', 'chair', true)`);
  await until(engine, 'the chain was not built', async () => (await copyOf(e, 'chicago_uph', 'R-1'))?.dso_master === true);
  await e.query('chicago_uph', `UPDATE repair_request SET status = 'reupholstered', description = 'blue velvet' WHERE id = 'R-1'`);
  await until(
    engine,
    'ownership did not come back to chicago',
    async () =>
      (await copyOf(e, 'chicago', 'R-1'))?.dso_master === true &&
      (await copyOf(e, 'chicago_uph', 'R-1'))?.dso_master === false &&
      (await copyOf(e, 'sf', 'R-1'))?.dso_current_server === 'chicago',
  );
  const [sf, chicago, uph] = [
    (await copyOf(e, 'sf', 'R-1'))!,
    (await copyOf(e, 'chicago', 'R-1'))!,
    (await copyOf(e, 'chicago_uph', 'R-1'))!,
  ];
  assert.deepEqual([chicago.status, chicago.description, chicago.dso_current_server], ['reupholstered', 'blue velvet', 'chicago']);
  assert.deepEqual([uph.dso_master, uph.dso_current_server, uph.dso_transfer_status], [false, 'chicago', 'success']);
  assert.deepEqual([sf.dso_master, sf.description], [false, 'blue velvet']);
  assert.deepEqual(
    chicago.dso_mapping_history.map((h) => `${h.fromServer}->${h.toServer}${h.operation ? ` (${h.operation})` : ''}`),
    ['sf->chicago', 'chicago->chicago_uph', 'chicago_uph->chicago (return)'],
  );
  // the master is chicago again: a user there changes it, and every copy follows
  await e.query('chicago', `UPDATE repair_request SET status = 'ready' WHERE id = 'R-1'`);
  await until(
    engine,
    'the change at chicago did not reach both ends',
    async () => (await copyOf(e, 'sf', 'R-1'))?.status === 'ready' && (await copyOf(e, 'chicago_uph', 'R-1'))?.status === 'ready',
  );
  // the read-only copy at chicago_uph refuses a user's change
  await assert.rejects(e.query('chicago_uph', `UPDATE repair_request SET status = 'x' WHERE id = 'R-1'`), /owned by chicago/);
  await engine.stop();
});

test('delete: deleting the master deletes the copies of its chain kept in step; the delete action deletes the copy on its mapping \
target', async () => {
  const rules = chainRules();
  rules.mappings.push(mapping('sf-notes-to-chicago', 'sf', 'chicago', { transferMode: 'independent-copy' }));
  rules.filters.push(
    filter('share-lamps', 'sf', { all: [is('item', 'lamp')] }, [{ type: 'transfer', mapping: 'sf-notes-to-chicago' }], ['insert']),
  );
  rules.filters.push(
    filter(
      'unshare-cancelled',
      'sf',
      { all: [is('item', 'lamp'), is('status', 'cancelled')] },
      [{ type: 'delete', mapping: 'sf-notes-to-chicago' }],
      ['update'],
    ),
  );
  const e = await env(['sf', 'chicago', 'chicago_uph'], rules);
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, needs_upholstery) VALUES ('D-1', 'chair', true), ('L-1', 'lamp', false)`);
  await until(
    engine,
    'the chain was not built',
    async () => (await copyOf(e, 'chicago_uph', 'D-1'))?.dso_master === true && (await copyOf(e, 'chicago', 'L-1')) !== undefined,
  );
  await e.query('chicago_uph', `DELETE FROM repair_request WHERE id = 'D-1'`);
  await until(
    engine,
    'the chain copies were not deleted',
    async () => (await copyOf(e, 'chicago', 'D-1')) === undefined && (await copyOf(e, 'sf', 'D-1')) === undefined,
  );
  await e.query('sf', `UPDATE repair_request SET status = 'cancelled' WHERE id = 'L-1'`);
  await until(engine, 'the delete action did not delete the copy', async () => (await copyOf(e, 'chicago', 'L-1')) === undefined);
  assert.equal((await copyOf(e, 'sf', 'L-1'))?.status, 'cancelled', 'the source copy stays');
  await engine.stop();
});

test('return loop detection: a request returned to chicago and sent on again is not returned a second time, unless the action overrides \
it', async () => {
  const rules = {
    mappings: [mapping('chicago-to-upholstery', 'chicago', 'chicago_uph')],
    filters: [
      // chicago sends every upholstery job, even one that has been there (override)
      {
        ...filter('route-upholstery', 'chicago', { all: [is('needs_upholstery', true)] }, [
          { type: 'transfer', mapping: 'chicago-to-upholstery', overrideLoopDetection: true },
        ]),
      },
      filter('give-back', 'chicago_uph', { all: [is('status', 'done')] }, [{ type: 'return' }]),
    ],
  };
  const e = await env(['chicago', 'chicago_uph'], rules);
  const engine = e.engine();
  await e.query('chicago', `INSERT INTO repair_request (id, item, needs_upholstery, status) VALUES ('P-1', 'sofa', true, 'new')`);
  await until(engine, 'the job did not reach chicago_uph', async () => (await copyOf(e, 'chicago_uph', 'P-1'))?.dso_master === true);
  // done: returned to chicago; chicago's filter sends it again (override); it is done already,
  // but the return filter does not return it twice: it stays at chicago_uph, no ping-pong
  await e.query('chicago_uph', `UPDATE repair_request SET status = 'done' WHERE id = 'P-1'`);
  await until(engine, `the job did not come back and go again`, async () => {
    const history = (await copyOf(e, 'chicago_uph', 'P-1'))?.dso_mapping_history ?? [];
    return history.length === 3;
  });
  await settled(e, engine, ['chicago', 'chicago_uph']);
  const uph = (await copyOf(e, 'chicago_uph', 'P-1'))!;
  assert.deepEqual(
    uph.dso_mapping_history.map((h) => `${h.fromServer}->${h.toServer}${h.operation ? ` (${h.operation})` : ''}`),
    ['chicago->chicago_uph', 'chicago_uph->chicago (return)', 'chicago->chicago_uph'],
  );
  assert.equal(uph.dso_master, true, 'the second return was stopped by loop detection');
  assert.equal((await copyOf(e, 'chicago', 'P-1'))?.dso_master, false);
  await engine.stop();
});

test('two-way mappings (sf -> chicago and chicago -> sf) do not ping-pong, with loop detection and even with it overridden', async () => {
  for (const override of [false, true]) {
    const rules = {
      // Overridden, each side also sends back what it received: a value sent back may be older
      // than an edit made meanwhile (a conflict); newer-wins keeps the edit. (source-wins would
      // apply the older value, as that policy says.)
      mappings: [
        mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'independent-copy', conflict: override ? 'newer-wins' : 'source-wins' }),
        mapping('chicago-to-sf', 'chicago', 'sf', { transferMode: 'independent-copy', conflict: override ? 'newer-wins' : 'source-wins' }),
      ],
      filters: [
        filter('share-sf', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago', overrideLoopDetection: override }]),
        filter('share-chicago', 'chicago', null, [{ type: 'transfer', mapping: 'chicago-to-sf', overrideLoopDetection: override }]),
      ],
    };
    const e = await env(['sf', 'chicago'], rules);
    const engine = e.engine();
    await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('W-1', 'desk')`);
    await e.query('chicago', `INSERT INTO repair_request (id, item) VALUES ('W-2', 'lamp')`);
    await until(engine, 'the requests were not shared', async () => (await copyOf(e, 'chicago', 'W-1')) && (await copyOf(e, 'sf', 'W-2')));
    await e.query('sf', `UPDATE repair_request SET description = 'edited at sf' WHERE id = 'W-1'`);
    await until(engine, 'the edit did not reach chicago', async () => (await copyOf(e, 'chicago', 'W-1'))?.description === 'edited at sf');
    await settled(e, engine, ['sf', 'chicago']);
    const versions = async () => [
      (await copyOf(e, 'sf', 'W-1'))!.dso_version,
      (await copyOf(e, 'chicago', 'W-1'))!.dso_version,
      (await copyOf(e, 'sf', 'W-2'))!.dso_version,
      (await copyOf(e, 'chicago', 'W-2'))!.dso_version,
    ];
    // settled once, an engine may still write what the other's last batch sent (a write on sf
    // after sf's slot was checked): the copies must come to rest, a settled pass that changes no
    // version, within the deadline; a ping-pong never does
    let before = await versions();
    await until(engine, `override ${override}: the copies are still being written back and forth`, async () => {
      await settled(e, engine, ['sf', 'chicago']);
      const now = await versions();
      const still = now.every((v, i) => v === before[i]);
      before = now;
      return still;
    });
    assert.equal((await e.query<{ n: number }>('sf', 'SELECT count(*)::int AS n FROM pgdso.pending_errors'))[0]!.n, 0);
    await engine.stop();
  }
});

test("the update action pushes the master's current values to the copy on its mapping's target, whatever whenToUpdate says", async () => {
  const rules = {
    mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only', whenToUpdate: 'never' })],
    filters: [
      filter('share', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert']),
      filter('push-when-urgent', 'sf', { all: [is('status', 'urgent')] }, [{ type: 'update', mapping: 'sf-to-chicago' }], ['update']),
    ],
  };
  const e = await env(['sf', 'chicago'], rules);
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('U-1', 'desk'), ('U-2', 'lamp')`);
  await until(engine, 'the copies did not arrive', async () => (await copyOf(e, 'chicago', 'U-1')) && (await copyOf(e, 'chicago', 'U-2')));
  await e.query('sf', `UPDATE repair_request SET description = 'not pushed' WHERE id = 'U-2'`);
  await e.query('sf', `UPDATE repair_request SET status = 'urgent', description = 'pushed' WHERE id = 'U-1'`);
  await until(engine, 'the update action did not push U-1', async () => (await copyOf(e, 'chicago', 'U-1'))?.description === 'pushed');
  await settled(e, engine, ['sf', 'chicago']);
  assert.equal(
    (await copyOf(e, 'chicago', 'U-2'))?.description,
    null,
    'whenToUpdate never: a change without the update action stays on sf',
  );
  assert.equal((await copyOf(e, 'chicago', 'U-1'))?.dso_update_status, 'success');
  assert.equal((await copyOf(e, 'sf', 'U-1'))?.dso_update_status, 'success');
  // the copy is gone on chicago (removed by a superuser past the guard): the update action
  // records a failure in pending_errors, and the stream goes on
  await e.query(
    'chicago',
    `ALTER TABLE repair_request DISABLE TRIGGER pgdso_guard; DELETE FROM repair_request
      WHERE id = 'U-1'; ALTER TABLE repair_request ENABLE TRIGGER pgdso_guard`,
  );
  await e.query('sf', `UPDATE repair_request SET description = 'pushed again' WHERE id = 'U-1'`);
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('U-3', 'chair')`);
  await until(
    engine,
    'the failed update was not recorded',
    async () => (await e.query('sf', `SELECT 1 FROM pgdso.pending_errors WHERE type = 'update' AND request_id = 'U-1'`)).length === 1,
  );
  await until(engine, 'a later request did not arrive', async () => (await copyOf(e, 'chicago', 'U-3')) !== undefined);
  const [failure] = await e.query<{ mapping: string; error: string }>(
    'sf',
    `SELECT mapping, error FROM pgdso.pending_errors WHERE request_id = 'U-1'`,
  );
  assert.equal(failure!.mapping, 'sf-to-chicago');
  assert.match(failure!.error, /has no copy of this request/);
  assert.equal((await copyOf(e, 'sf', 'U-1'))?.dso_update_status, 'failure');
  await engine.stop();
});

test('transitions: a filter sees an update as PostgreSQL row filters do: entering its conditions is an insert, leaving them a \
delete', async () => {
  const rules = {
    mappings: [
      mapping('closed-to-chicago', 'sf', 'chicago', { transferMode: 'independent-copy' }),
      mapping('reopened-to-chicago', 'sf', 'chicago', { transferMode: 'independent-copy', to: { server: 'chicago', form: 'reopened' } }),
    ],
    filters: [
      {
        name: 'on-closing',
        on: { server: 'sf', form: 'repair_request', ops: ['insert'], transitions: true },
        conditions: { all: [is('status', 'closed')] },
        actions: [{ type: 'transfer', mapping: 'closed-to-chicago' }],
      },
      {
        name: 'on-reopening',
        on: { server: 'sf', form: 'repair_request', ops: ['delete'], transitions: true },
        conditions: { all: [is('status', 'closed')] },
        actions: [{ type: 'transfer', mapping: 'reopened-to-chicago' }],
      },
    ],
  };
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: `${REPAIR_REQUEST_SQL}; CREATE TABLE reopened (LIKE repair_request INCLUDING ALL)`,
    forms: ['repair_request', 'reopened'],
    rules,
  });
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, status) VALUES ('T-1', 'desk', 'closed'), ('T-2', 'lamp', 'open'), ('T-3', 'sofa', 'open')`,
  );
  await e.query('sf', `UPDATE repair_request SET status = 'closed' WHERE id = 'T-2'`); // enters: an insert
  await e.query('sf', `UPDATE repair_request SET description = 'still open' WHERE id = 'T-3'`); // outside before and after
  await until(
    engine,
    'closed requests were not carried',
    async () => (await copyOf(e, 'chicago', 'T-1')) && (await copyOf(e, 'chicago', 'T-2')),
  );
  const firstT2 = (await copyOf(e, 'chicago', 'T-2'))!;
  // stays: an update, the insert filter does not fire
  await e.query('sf', `UPDATE repair_request SET description = 'edited while closed' WHERE id = 'T-2'`);
  await e.query('sf', `UPDATE repair_request SET status = 'open' WHERE id = 'T-1'`); // leaves: a delete
  await until(
    engine,
    'the reopened request was not carried',
    async () => (await e.query('chicago', `SELECT 1 FROM reopened WHERE id = 'T-1'`)).length === 1,
  );
  await settled(e, engine, ['sf', 'chicago']);
  assert.equal(await copyOf(e, 'chicago', 'T-3'), undefined, 'a request outside the conditions before and after is not carried');
  assert.equal(
    (await copyOf(e, 'chicago', 'T-2'))!.dso_version,
    firstT2.dso_version,
    'an update that stays inside the conditions is not an insert',
  );
  assert.equal((await e.query('chicago', `SELECT 1 FROM reopened WHERE id = 'T-2'`)).length, 0);
  await engine.stop();
});

test('pools: the changes of one request keep their order across pools (an insert sent by pool a, then an update by pool b, in one \
transaction)', async () => {
  const rules = {
    mappings: [
      mapping('new-to-chicago', 'sf', 'chicago', { transferMode: 'data-only', whenToUpdate: 'never', pool: 'a' }),
      mapping('edits-to-chicago', 'sf', 'chicago', {
        transferMode: 'data-only',
        whenToUpdate: 'never',
        pool: 'b',
        duplicateRequestId: 'overwrite',
      }),
    ],
    filters: [
      filter('send-new', 'sf', null, [{ type: 'transfer', mapping: 'new-to-chicago' }], ['insert']),
      filter('send-edits', 'sf', null, [{ type: 'transfer', mapping: 'edits-to-chicago' }], ['update']),
    ],
  };
  const e = await env(['sf', 'chicago'], rules);
  const engine = e.engine();
  await e.query(
    'sf',
    `BEGIN; INSERT INTO repair_request (id, item, description) VALUES ('O-1', 'desk', 'first'); UPDATE repair_request
      SET description = 'second' WHERE id = 'O-1'; COMMIT`,
  );
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('O-2', 'lamp')`);
  await until(engine, 'the requests did not arrive', async () => (await copyOf(e, 'chicago', 'O-2')) !== undefined);
  await settled(e, engine);
  assert.equal((await copyOf(e, 'chicago', 'O-1'))?.description, 'second', 'the later change of O-1 is the one that stays');
  await engine.stop();
});
