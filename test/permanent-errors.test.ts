// A permanent error at run time (the server refuses the engine a privilege it needs) stops that
// server's engine with one error-level line that names what is missing and the statement to run;
// `pgdso status` shows it and exits 1; no retry loop, no stack trace. After the fix, `pgdso run`
// starts again and catches up, and status is clean again.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFile, readFile } from 'node:fs/promises';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is, until, type DsoEnv } from './support/dso.ts';

const suite = dsoSuite(2);

/** A non-superuser role for the engine on `server`, with every grant it needs but those the test takes away; the config uses it. */
async function engineRole(e: DsoEnv, server: string, role: string): Promise<string> {
  const password = `pw-${Math.random().toString(36).slice(2)}`;
  const db = new URL(e.urls[server]!).pathname.slice(1);
  await e.query(
    server,
    `DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '${role}') THEN CREATE ROLE ${role} LOGIN REPLICATION PASSWORD '${password}';
      ELSE ALTER ROLE ${role} LOGIN REPLICATION PASSWORD '${password}'; END IF; END $$`,
  );
  await e.query(
    server,
    `GRANT CONNECT ON DATABASE ${db} TO ${role};
    GRANT USAGE ON SCHEMA pgdso TO ${role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgdso TO ${role};
    GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pgdso TO ${role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON repair_request TO ${role};
    GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text),
      pg_replication_origin_session_is_setup() TO ${role}`,
  );
  const url = new URL(e.urls[server]!);
  url.username = role;
  url.password = password;
  const config = JSON.parse(await readFile(e.configPath, 'utf8'));
  config.servers[server].connection = url.toString();
  await writeFile(e.configPath, JSON.stringify(config, null, 2));
  return password;
}

test('a privilege taken away at run time stops the engine of that server with one error line naming the statement to run; status shows \
it; after the fix run starts again', async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-chairs', 'sf', 'chicago')],
      filters: [filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-chairs' }])],
    },
  });
  const role = `pgdso_engine_${process.pid}`;
  const password = await engineRole(e, 'sf', role);
  const engine = e.engine(['--server', 'sf', '--instance-id', 'sf-a']);
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('R-1', 'chair')`);
  await until(
    engine,
    'R-1 on chicago',
    async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'R-1'`)).length === 1,
  );

  // the DBA takes REPLICATION away, and the walsender goes (as at a server restart)
  await e.query('sf', `ALTER ROLE ${role} NOREPLICATION`);
  await e.query('sf', `SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE usename = $1`, [role]);
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('R-2', 'chair')`);
  const code = await Promise.race([engine.exited, new Promise((resolve) => setTimeout(() => resolve('still running'), 60_000))]);
  assert.equal(code, 1, `the engine should stop with exit 1; output:\n${engine.output}`);

  const lines = engine.output
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { level: number; msg: string });
  const errors = lines.filter((l) => l.level >= 50);
  assert.equal(errors.length, 1, `exactly one error-level line:\n${engine.output}`);
  assert.match(errors[0]!.msg, new RegExp(`ALTER ROLE "?${role}"? REPLICATION`));
  assert.ok(!lines.some((l) => l.level === 40 && JSON.stringify(l).includes('    at ')), `no stack trace at warn level:\n${engine.output}`);
  assert.ok(!engine.output.includes(password), 'no password in the output');

  const status = await e.cli(['status', '--json']);
  assert.equal(status.code, 1, status.stdout + status.stderr);
  const sf = JSON.parse(status.stdout).servers.sf;
  assert.deepEqual(
    sf.instances.map((i: { instanceId: string; state: string }) => [i.instanceId, i.state]),
    [['sf-a', 'stopped']],
  );
  assert.match(sf.instances[0].fix, new RegExp(`ALTER ROLE "?${role}"? REPLICATION`));
  assert.equal((await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'R-2'`)).length, 0);

  // the fix, and run again: R-2 arrives, status is clean
  await e.query('sf', `ALTER ROLE ${role} REPLICATION`);
  // both servers served (a server with forms and no instance online fails status)
  const again = e.engine(['--instance-id', 'sf-a']);
  await until(
    again,
    'R-2 on chicago after the fix',
    async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'R-2'`)).length === 1,
  );
  const clean = await e.cli(['status', '--json']);
  assert.equal(clean.code, 0, clean.stdout + clean.stderr);
  const after = JSON.parse(clean.stdout).servers.sf.instances as { instanceId: string; state: string; lastError?: string }[];
  assert.deepEqual(
    after.map((i) => [i.instanceId, i.state, i.lastError]),
    [['sf-a', 'online', undefined]],
    clean.stdout,
  );
  assert.equal(await again.stop(), 0);
});
