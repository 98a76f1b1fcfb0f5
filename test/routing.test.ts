// DSO use 1, routing, on three servers; the ownership guard; the transfer modes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { waitFor } from './support/wait.ts';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, type DsoEnv, copyOf } from './support/dso.ts';

const suite = dsoSuite(3);

function env(servers: string[], rules: Record<string, unknown>): Promise<DsoEnv> {
  return suite.env({ servers, schemaSql: REPAIR_REQUEST_SQL, forms: ['repair_request'], rules });
}

const routingRules = {
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago'), mapping('chicago-to-upholstery', 'chicago', 'chicago_uph')],
  filters: [
    filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }]),
    filter('route-upholstery', 'chicago', { all: [is('needs_upholstery', true)] }, [
      { type: 'transfer', mapping: 'chicago-to-upholstery' },
    ]),
  ],
};

test('routing: a desk stays on sf, a chair moves to chicago with ownership, a chair needing upholstery is chained on to \
chicago_uph', async () => {
  const e = await env(['sf', 'chicago', 'chicago_uph'], routingRules);
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, needs_upholstery, description, internal_note)
                       VALUES ('SF-1', 'desk', false, 'wobbly leg', 'n1'), ('SF-2', 'chair', false, 'squeaks', 'n2'),
                         ('SF-3', 'chair', true, 'torn seat', 'n3')`,
  );
  await waitFor(
    async () =>
      (await copyOf(e, 'chicago_uph', 'SF-3')) &&
      (await copyOf(e, 'chicago', 'SF-3'))?.dso_master === false &&
      (await copyOf(e, 'sf', 'SF-2'))?.dso_master === false &&
      (await copyOf(e, 'sf', 'SF-3'))?.dso_master === false,
    { message: () => `routing did not complete; engine output:\n${engine.output}` },
  );

  // The desk stays where it was submitted, untouched.
  const desk = await copyOf(e, 'sf', 'SF-1');
  assert.equal(desk?.dso_master, true);
  assert.equal(desk?.dso_transfer_status, null);
  assert.equal(await copyOf(e, 'chicago', 'SF-1'), undefined);
  assert.equal(await copyOf(e, 'chicago_uph', 'SF-1'), undefined);

  // The chair: sf copy read-only, pointing at chicago; chicago copy master, pointing back.
  const sfChair = await copyOf(e, 'sf', 'SF-2');
  assert.deepEqual(
    [
      sfChair?.dso_master,
      sfChair?.dso_transfer_status,
      sfChair?.dso_to_server,
      sfChair?.dso_to_form,
      sfChair?.dso_to_request_id,
      sfChair?.dso_to_mapping,
      sfChair?.dso_current_server,
    ],
    [false, 'success', 'chicago', 'repair_request', 'SF-2', 'sf-to-chicago', 'chicago'],
  );
  const chicagoChair = await copyOf(e, 'chicago', 'SF-2');
  assert.deepEqual(
    [
      chicagoChair?.dso_master,
      chicagoChair?.dso_from_server,
      chicagoChair?.dso_from_form,
      chicagoChair?.dso_from_request_id,
      chicagoChair?.dso_from_mapping,
      chicagoChair?.dso_current_server,
      chicagoChair?.description,
      chicagoChair?.item,
    ],
    [true, 'sf', 'repair_request', 'SF-2', 'sf-to-chicago', 'chicago', 'squeaks', 'chair'],
  );
  assert.equal(chicagoChair?.dso_mapping_history.length, 1);
  assert.deepEqual(
    [
      chicagoChair?.dso_mapping_history[0]?.fromServer,
      chicagoChair?.dso_mapping_history[0]?.toServer,
      chicagoChair?.dso_mapping_history[0]?.mapping,
    ],
    ['sf', 'chicago', 'sf-to-chicago'],
  );
  assert.equal(await copyOf(e, 'chicago_uph', 'SF-2'), undefined, 'a chair without upholstery is not chained on');

  // The upholstery chair: sf -> chicago -> chicago_uph, ownership at the end of the chain.
  const [sf3, chicago3, uph3] = [await copyOf(e, 'sf', 'SF-3'), await copyOf(e, 'chicago', 'SF-3'), await copyOf(e, 'chicago_uph', 'SF-3')];
  assert.deepEqual([sf3?.dso_master, sf3?.dso_to_server], [false, 'chicago']);
  assert.deepEqual(
    [
      chicago3?.dso_master,
      chicago3?.dso_from_server,
      chicago3?.dso_to_server,
      chicago3?.dso_to_mapping,
      chicago3?.dso_current_server,
      chicago3?.dso_transfer_status,
    ],
    [false, 'sf', 'chicago_uph', 'chicago-to-upholstery', 'chicago_uph', 'success'],
  );
  assert.deepEqual(
    [
      uph3?.dso_master,
      uph3?.dso_from_server,
      uph3?.dso_from_request_id,
      uph3?.dso_current_server,
      uph3?.description,
      uph3?.needs_upholstery,
    ],
    [true, 'chicago', 'SF-3', 'chicago_uph', 'torn seat', true],
  );
  assert.deepEqual(
    uph3?.dso_mapping_history.map((h) => `${h.fromServer}->${h.toServer}`),
    ['sf->chicago', 'chicago->chicago_uph'],
  );
  assert.equal(uph3?.dso_mapping_history[1]?.fromRequestId, 'SF-3');

  // Every server's slot moves on, also where no filter runs (chicago_uph only receives): no
  // slot keeps WAL for nothing.
  for (const server of ['sf', 'chicago', 'chicago_uph']) {
    const [{ lsn }] = (await e.query<{ lsn: string }>(server, 'SELECT pg_current_wal_lsn()::text AS lsn')) as [{ lsn: string }];
    await waitFor(
      async () =>
        (
          await e.query<{ done: boolean }>(
            server,
            `SELECT confirmed_flush_lsn >= $1::pg_lsn AS done FROM pg_replication_slots WHERE database = current_database()`,
            [lsn],
          )
        )[0]?.done,
      { message: () => `the slot of ${server} does not move:\n${engine.output}` },
    );
  }
  await engine.stop();
});

test('a non-master copy refuses UPDATE and DELETE with P0001 naming the owner, whatever settings an ordinary role sets; the master copy \
takes them', async () => {
  const e = await env(['sf', 'chicago'], { mappings: [routingRules.mappings[0]], filters: [routingRules.filters[0]] });
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('G-1', 'chair')`);
  await waitFor(async () => (await copyOf(e, 'sf', 'G-1'))?.dso_master === false, {
    message: () => `no transfer; engine output:\n${engine.output}`,
  });
  await engine.stop();

  // The table owner (a superuser here) in a normal session.
  await assert.rejects(
    e.query('sf', `UPDATE repair_request SET description = 'mine' WHERE id = 'G-1'`),
    (err: { code?: string; message?: string }) => {
      assert.equal(err.code, 'P0001');
      assert.equal(err.message, 'pgdso: request G-1 of repair_request is owned by chicago');
      return true;
    },
  );
  await assert.rejects(e.query('sf', `DELETE FROM repair_request WHERE id = 'G-1'`), { code: 'P0001' });

  // An ordinary role with every table privilege, trying every setting it can think of.
  const role = `clerk_${process.pid}_${Date.now()}`;
  await e.query('sf', `CREATE ROLE ${role} LOGIN PASSWORD 'clerk-pw'`);
  await e.query('sf', `GRANT USAGE ON SCHEMA public TO ${role}; GRANT ALL ON repair_request TO ${role}`);
  const url = new URL(e.urls.sf!);
  url.username = role;
  url.password = 'clerk-pw';
  const clerk = new pg.Client({ connectionString: url.toString() });
  await clerk.connect();
  try {
    await assert.rejects(clerk.query(`SET session_replication_role = replica`), { code: '42501' });
    await assert.rejects(clerk.query(`SELECT pg_replication_origin_session_setup('pgdso:sf:default:x')`), { code: '42501' });
    await clerk.query(`SET application_name = 'pgdso decoder'`);
    await clerk.query(`SET pgdso.engine = 'on'`);
    await assert.rejects(
      clerk.query(`UPDATE repair_request SET status = 'hacked' WHERE id = 'G-1'`),
      (err: { code?: string; message?: string }) => {
        assert.equal(err.code, 'P0001');
        assert.match(err.message ?? '', /owned by chicago/);
        return true;
      },
    );
    await assert.rejects(clerk.query(`DELETE FROM repair_request WHERE id = 'G-1'`), { code: 'P0001' });
    // the master copy of a request is the clerk's to change
    await clerk.query(`INSERT INTO repair_request (id, item) VALUES ('G-2', 'lamp')`);
    await clerk.query(`UPDATE repair_request SET status = 'open' WHERE id = 'G-2'`);
  } finally {
    await clerk.end();
  }
  assert.equal((await copyOf(e, 'sf', 'G-1'))?.status, 'new');
  assert.equal((await copyOf(e, 'sf', 'G-2'))?.status, 'open');
  // dso_version rises on every change
  assert.equal((await copyOf(e, 'sf', 'G-2'))?.dso_version, '2');
  // On chicago, the master copy takes a normal update.
  await e.query('chicago', `UPDATE repair_request SET status = 'in progress' WHERE id = 'G-1'`);
});

test('data-only transfer: the source stays master, the target copy is read-only and the engine keeps writing it', async () => {
  const e = await env(['sf', 'chicago'], {
    mappings: [mapping('sf-copy', 'sf', 'chicago', { transferMode: 'data-only' })],
    filters: [filter('copy-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-copy' }])],
  });
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('D-1', 'chair', 'v1')`);
  await waitFor(async () => (await copyOf(e, 'sf', 'D-1'))?.dso_transfer_status === 'success', { message: () => engine.output });
  const [source, target] = [await copyOf(e, 'sf', 'D-1'), await copyOf(e, 'chicago', 'D-1')];
  assert.deepEqual([source?.dso_master, source?.dso_to_server, source?.dso_current_server], [true, 'chicago', 'sf']);
  assert.deepEqual(
    [target?.dso_master, target?.dso_from_server, target?.dso_current_server, target?.description],
    [false, 'sf', 'sf', 'v1'],
  );
  await assert.rejects(e.query('chicago', `UPDATE repair_request SET description = 'local' WHERE id = 'D-1'`), {
    code: 'P0001',
    message: 'pgdso: request D-1 of repair_request is owned by sf',
  });

  // The master changes; the engine's write passes the guard of the read-only copy.
  await e.query('sf', `UPDATE repair_request SET description = 'v2' WHERE id = 'D-1'`);
  await waitFor(async () => (await copyOf(e, 'chicago', 'D-1'))?.description === 'v2', { message: () => engine.output });
  assert.equal((await copyOf(e, 'chicago', 'D-1'))?.dso_master, false);
  assert.equal((await copyOf(e, 'sf', 'D-1'))?.dso_master, true);
  await engine.stop();
});

test('independent-copy transfer: both copies are masters and the target copy is changed locally', async () => {
  const e = await env(['sf', 'chicago'], {
    mappings: [
      mapping('sf-kb', 'sf', 'chicago', { transferMode: 'independent-copy', fields: { exclude: ['internal_note'], set: { site: 'kb' } } }),
    ],
    filters: [filter('kb', 'sf', { all: [is('status', 'closed')] }, [{ type: 'transfer', mapping: 'sf-kb' }])],
  });
  const engine = e.engine();
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, status, internal_note, site)
      VALUES ('K-1', 'desk', 'closed', 'secret', 'sf'), ('K-2', 'desk', 'open', null, 'sf')`,
  );
  await waitFor(async () => (await copyOf(e, 'sf', 'K-1'))?.dso_transfer_status === 'success', { message: () => engine.output });
  const [source, target] = [await copyOf(e, 'sf', 'K-1'), await copyOf(e, 'chicago', 'K-1')];
  assert.deepEqual([source?.dso_master, source?.dso_to_server, source?.dso_current_server], [true, 'chicago', 'sf']);
  assert.deepEqual(
    [target?.dso_master, target?.dso_current_server, target?.dso_from_server, target?.internal_note, target?.site],
    [true, 'chicago', 'sf', null, 'kb'],
  );
  await e.query('chicago', `UPDATE repair_request SET description = 'edited in chicago' WHERE id = 'K-1'`);
  await e.query('sf', `UPDATE repair_request SET description = 'edited in sf' WHERE id = 'K-1'`);
  assert.equal(await copyOf(e, 'chicago', 'K-2'), undefined, 'an open request is not copied');
  await engine.stop();
});
