// The README's deployment recipe, followed literally on a live database: its SQL block run as
// the superuser, pgdso as an ordinary role, an application role that owns the form and writes
// to it through the whole test (none of its writes may fail), then backing out.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import pg from 'pg';
import { dsoSuite, EngineProcess, REPAIR_REQUEST_SQL, ROOT, mapping, filter, is, runCli, until, type CliResult } from './support/dso.ts';
import { providerName } from './support/servers.ts';
import { waitFor } from './support/wait.ts';

const suite = dsoSuite(1);
const show = (r: CliResult) => `exit ${r.code}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`;

/** The SQL block after `<!-- deploy-recipe -->` in README.md, as written there. */
async function deployRecipe(): Promise<string> {
  const readme = await readFile(path.join(ROOT, 'README.md'), 'utf8');
  const marker = readme.indexOf('<!-- deploy-recipe -->');
  assert.ok(marker >= 0, 'README.md has a <!-- deploy-recipe --> marker');
  const block = /^([ \t]*)```sql\n([\s\S]*?)\n[ \t]*```/m.exec(readme.slice(marker));
  assert.ok(block, 'a ```sql block follows the marker');
  const indent = block[1]!;
  return block[2]!
    .split('\n')
    .map((line) => (line.startsWith(indent) ? line.slice(indent.length) : line))
    .join('\n');
}

const rules = {
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
  filters: [filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }])],
};

test('the README recipe, followed literally: pgdso as an ordinary role enables, runs, transfers and backs out, and the application \
owning the form never sees one of its writes fail', {
  timeout: 240_000,
  skip: providerName() === 'urls' ? 'the recipe creates the cluster-wide roles pgdso and app: needs a cluster of its own' : false,
}, async () => {
  const e = await suite.env({ servers: ['sf', 'chicago'], schemaSql: REPAIR_REQUEST_SQL, rules });
  const [{ db }] = (await e.query<{ db: string }>('sf', 'SELECT current_database() AS db')) as [{ db: string }];
  // the database as the DBA finds it: an application role owning its table, no pgdso anywhere
  await e.query(
    'sf',
    `DROP SCHEMA pgdso CASCADE; DROP PUBLICATION pgdso;
    CREATE ROLE app LOGIN PASSWORD 'app-pw'; ALTER TABLE repair_request OWNER TO app`,
  );
  const recipe = await deployRecipe();
  assert.match(recipe, /GRANT app TO pgdso;/);
  assert.doesNotMatch(recipe, /OWNER TO/i, 'the recipe leaves the ownership of the forms as it was');
  await e.query('sf', recipe.replace(/\bDATABASE ar\b/g, `DATABASE "${db}"`));

  const urlAs = (user: string, password: string) => {
    const url = new URL(e.urls.sf!);
    url.username = user;
    url.password = password;
    return url.toString();
  };
  const config = path.join(e.dir, 'deploy.config.json');
  await writeFile(
    config,
    JSON.stringify({
      servers: { sf: { connection: urlAs('pgdso', 'change-me') }, chicago: { connection: e.urls.chicago } },
      rules: ['rules/*.json'],
    }),
  );
  const cli = (args: string[]) => runCli([...args, '--config', config]);

  // the application: inserts, updates and deletes its own requests all along
  const app = new pg.Client({ connectionString: urlAs('app', 'app-pw'), application_name: 'the application' });
  await app.connect();
  const errors: string[] = [];
  const writes = new Map<string, number>();
  let phase = 'before pgdso';
  let writing = true;
  const writer = (async () => {
    for (let i = 1; writing; i++) {
      try {
        await app.query(`INSERT INTO repair_request (id, item) VALUES ($1, 'desk')`, [`APP-${i}`]);
        await app.query(`UPDATE repair_request SET status = 'open', description = $2 WHERE id = $1`, [`APP-${i}`, phase]);
        if (i % 3 === 0) await app.query(`DELETE FROM repair_request WHERE id = $1`, [`APP-${i - 2}`]);
        writes.set(phase, (writes.get(phase) ?? 0) + 1);
      } catch (err) {
        errors.push(`${phase}: APP-${i}: ${(err as Error).message}`);
      }
      await delay(5); // pacing, not waiting for anything
    }
  })();
  const wrote = async (name: string) => {
    await waitFor(() => (writes.get(name) ?? 0) > 0, {
      message: () => `the application wrote during "${name}" (${errors.length} errors, the first: ${errors.slice(0, 5).join('; ')})`,
    });
  };
  const step = async (name: string, run: () => Promise<void>) => {
    phase = name;
    await run();
    await wrote(name);
  };

  let engine: EngineProcess | undefined;
  try {
    await wrote('before pgdso');
    await step('migrate', async () => {
      const r = await cli(['migrate']);
      assert.equal(r.code, 0, show(r));
    });
    await step('forms enable', async () => {
      for (const server of ['sf', 'chicago']) {
        const r = await cli(['forms', 'enable', '--server', server, '--form', 'repair_request']);
        assert.equal(r.code, 0, `${server}: ${show(r)}`);
      }
      const check = await cli(['rules', 'check']);
      assert.equal(check.code, 0, show(check));
      assert.match(check.stdout, /^ok: /m);
    });
    await step('run', async () => {
      engine = new EngineProcess(['--config', config]);
      await app.query(`INSERT INTO repair_request (id, item) VALUES ('CHAIR-1', 'chair')`);
      const e2 = engine;
      await until(
        e2,
        'CHAIR-1 did not move to chicago with ownership',
        async () =>
          (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'CHAIR-1' AND dso_master`)).length === 1 &&
          (await e.query('sf', `SELECT 1 FROM repair_request WHERE id = 'CHAIR-1' AND NOT dso_master AND dso_transfer_status = 'success'`))
            .length === 1,
      );
      // the read-only copy refuses the application, naming the owner
      await assert.rejects(app.query(`UPDATE repair_request SET status = 'mine' WHERE id = 'CHAIR-1'`), {
        code: 'P0001',
        message: 'pgdso: request CHAIR-1 of repair_request is owned by chicago',
      });
      await assert.rejects(app.query(`DELETE FROM repair_request WHERE id = 'CHAIR-1'`), { code: 'P0001' });
      // no backing out under a running engine
      const busy = await cli(['uninstall', '--server', 'sf', '--yes']);
      assert.equal(busy.code, 1, show(busy));
      assert.match(busy.stderr, /an engine streams the slot .*stop those engines \(pgdso run\) first; nothing was changed/, show(busy));
      const busyDisable = await cli(['forms', 'disable', '--server', 'sf', '--form', 'repair_request', '--yes']);
      assert.equal(busyDisable.code, 1, show(busyDisable));
      assert.match(busyDisable.stderr, /stop those engines/, show(busyDisable));
      const preview = await cli(['uninstall', '--server', 'sf']);
      assert.equal(preview.code, 0, show(preview));
      assert.match(preview.stdout, /note: --yes would be refused now: an engine streams the slot/, show(preview));
      assert.equal(
        (await e.query('sf', `SELECT 1 FROM pg_trigger WHERE tgrelid = 'repair_request'::regclass AND tgname LIKE 'pgdso%'`)).length,
        3,
      );
      assert.equal(await e2.stop(), 0, e2.output);
    });
    const pgdsoTriggers = async () =>
      (await e.query('sf', `SELECT tgname FROM pg_trigger WHERE tgrelid = 'repair_request'::regclass AND NOT tgisinternal`)).length;
    await step('forms disable', async () => {
      const preview = await cli(['forms', 'disable', '--server', 'sf', '--form', 'repair_request']);
      assert.equal(preview.code, 0, show(preview));
      assert.match(preview.stdout, /DROP TRIGGER "pgdso_guard" ON "public"\."repair_request";/, show(preview));
      assert.match(preview.stdout, /REPLICA IDENTITY DEFAULT;/, show(preview));
      assert.match(preview.stdout, /nothing changed: run again with --yes/, show(preview));
      assert.equal(await pgdsoTriggers(), 3, 'the preview changed nothing');
      const done = await cli(['forms', 'disable', '--server', 'sf', '--form', 'repair_request', '--yes']);
      assert.equal(done.code, 0, show(done));
      assert.equal(await pgdsoTriggers(), 0);
      const [state] = await e.query<{ identity: string; published: boolean; columns: number }>(
        'sf',
        `SELECT relreplident::text AS identity, EXISTS (SELECT 1 FROM pg_publication_rel WHERE prrelid = c.oid) AS published,
                (SELECT count(*)::int FROM pg_attribute WHERE attrelid = c.oid AND attname LIKE 'dso\\_%' AND NOT attisdropped) AS columns
           FROM pg_class c WHERE c.oid = 'repair_request'::regclass`,
      );
      assert.deepEqual(
        state,
        { identity: 'd', published: false, columns: 17 },
        'identity as it was, out of the publication, the columns kept',
      );
      // the former read-only copy is the application's again
      await app.query(`UPDATE repair_request SET status = 'back' WHERE id = 'CHAIR-1'`);
    });
    await step('uninstall', async () => {
      const preview = await cli(['uninstall', '--server', 'sf', '--drop-schema']);
      assert.equal(preview.code, 0, show(preview));
      // the origin of the engine's source lane (originName(): pgdso:<writer>:<pool>:<database>) goes too
      for (const line of [
        'DROP PUBLICATION "pgdso";',
        `SELECT pg_drop_replication_slot('pgdso_`,
        'DROP SCHEMA pgdso CASCADE;',
        `SELECT pg_replication_origin_drop('pgdso:sf:~source:${db}');`,
      ]) {
        assert.ok(preview.stdout.includes(line), `the preview shows ${line}: ${show(preview)}`);
      }
      assert.equal(
        (await e.query('sf', `SELECT 1 FROM pg_replication_slots WHERE database = current_database()`)).length,
        1,
        'the preview changed nothing',
      );
      const done = await cli(['uninstall', '--server', 'sf', '--drop-schema', '--yes']);
      assert.equal(done.code, 0, show(done));
      const [left] = await e.query<Record<string, number>>(
        'sf',
        `SELECT (SELECT count(*)::int FROM pg_replication_slots WHERE database = current_database()) AS slots,
                (SELECT count(*)::int FROM pg_publication) AS publications,
                (SELECT count(*)::int FROM pg_namespace WHERE nspname = 'pgdso') AS schemas,
                (SELECT count(*)::int FROM pg_trigger WHERE tgname LIKE 'pgdso%') AS triggers,
                (SELECT count(*)::int FROM pg_replication_origin
                  WHERE right(roname, length(current_database()) + 1) = ':' || current_database()) AS origins`,
      );
      assert.deepEqual(left, { slots: 0, publications: 0, schemas: 0, triggers: 0, origins: 0 });
      const again = await cli(['uninstall', '--server', 'sf']);
      assert.equal(again.code, 0, show(again));
      assert.match(again.stdout, /nothing of pgdso left to remove/, show(again));
    });
    await step('after pgdso', async () => {});
  } finally {
    writing = false;
    await writer;
    await app.end();
    await (engine as EngineProcess | undefined)?.kill9();
  }
  assert.equal(
    errors.length,
    0,
    `no write of the application may fail; ${errors.length} did, the first:\n${errors.slice(0, 10).join('\n')}`,
  );
  for (const name of ['before pgdso', 'migrate', 'forms enable', 'run', 'forms disable', 'uninstall', 'after pgdso']) {
    assert.ok((writes.get(name) ?? 0) > 0, `the application wrote during ${name}`);
  }
});
