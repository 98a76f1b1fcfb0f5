// A DSO test environment: servers (one database each) on the harness's clusters, the control
// schema and forms enabled, a config and rule files on disk, and the real `pgdso` command line
// run as a child process (so tests can kill -9 it).
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { migrateServer } from '../../src/sql/migrate.ts';
import { enableForm } from '../../src/sql/forms.ts';
import { NODE_FLAGS } from '../../src/cli/node-flags.ts';
import { before, after } from 'node:test';
import { waitFor, within } from './wait.ts';
import { provideClusters, type ProvideOptions, type TestCluster } from './servers.ts';
import { leakCheck } from './leaks.ts';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const PGDSO_BIN = path.join(ROOT, 'bin/pgdso');
/**
 * How tests run the command line: `bin/pgdso` (TypeScript through tsx), or, with
 * PGDSO_TEST_BUILD=1 (`npm test` builds first), the same sources compiled by `npm run build`,
 * which start in a fifth of the time. test/cli.test.ts always runs bin/pgdso itself too.
 */
const BUILT_MAIN = path.join(ROOT, 'build/src/cli/main.js');
export const PGDSO_COMMAND: readonly string[] = process.env.PGDSO_TEST_BUILD === '1' ? [BUILT_MAIN] : [PGDSO_BIN];

export const REPAIR_REQUEST_SQL = `
CREATE TABLE repair_request (
  id text PRIMARY KEY,
  item text NOT NULL,
  needs_upholstery boolean NOT NULL DEFAULT false,
  status text NOT NULL DEFAULT 'new',
  site text,
  description text,
  internal_note text
)`;

/**
 * A write log of the form: one row per insert or update of a request, by whom. Counting its rows
 * shows a request written twice, which the form's primary key would hide.
 */
export const WRITE_LOG_SQL = `
CREATE TABLE write_log (n bigserial PRIMARY KEY, id text NOT NULL, op text NOT NULL, by_role name NOT NULL DEFAULT current_user);
CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO write_log (id, op) VALUES (NEW.id, TG_OP);
  RETURN NULL;
END $$;
CREATE TRIGGER log_write AFTER INSERT OR UPDATE ON repair_request FOR EACH ROW EXECUTE FUNCTION log_write()`;

let counter = 0;

export interface DsoEnvOptions {
  clusters: readonly TestCluster[];
  servers: readonly string[];
  /** SQL run on every server before the forms are enabled */
  schemaSql?: string;
  /** forms enabled on every server */
  forms?: readonly string[];
  rules: Record<string, unknown>;
  /** place server i on cluster (i % clusters.length) unless given */
  placement?: Record<string, number>;
  /** more config keys (pending, http, ...) */
  config?: Record<string, unknown>;
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export class DsoEnv {
  readonly pools = new Map<string, pg.Pool>();
  private readonly engines = new Set<EngineProcess>();

  constructor(
    readonly dir: string,
    readonly configPath: string,
    readonly urls: Record<string, string>,
  ) {
    for (const [name, url] of Object.entries(urls)) {
      const pool = new pg.Pool({ connectionString: url, max: 3, application_name: 'test' });
      pool.on('error', () => undefined); // an idle connection cut by a cluster stop or kill; queries report their own errors
      this.pools.set(name, pool);
    }
  }

  async query<T extends pg.QueryResultRow = Record<string, unknown>>(server: string, sql: string, params: unknown[] = []): Promise<T[]> {
    const pool = this.pools.get(server);
    if (!pool) throw new Error(`no server ${server}`);
    return (await pool.query<T>(sql, params)).rows;
  }

  async writeRules(rules: Record<string, unknown>, file = 'rules/main.json'): Promise<void> {
    await writeFile(path.join(this.dir, file), JSON.stringify(rules, null, 2));
  }

  /** Runs `pgdso ARGS --config <this config>` to completion. */
  cli(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
    return runCli([...args, '--config', this.configPath], env);
  }

  /** Starts `pgdso run` as a child process. */
  engine(args: readonly string[] = []): EngineProcess {
    const engine = new EngineProcess([...args, '--config', this.configPath]);
    this.engines.add(engine);
    return engine;
  }

  async close(): Promise<void> {
    await Promise.all([...this.engines].map((e) => e.kill9()));
    await Promise.all([...this.pools.values()].map((p) => p.end()));
    await rm(this.dir, { recursive: true, force: true });
  }
}

export function runCli(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...PGDSO_COMMAND, ...args], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

export class EngineProcess {
  readonly child: ChildProcess;
  private out = '';
  readonly exited: Promise<number | null>;

  constructor(args: readonly string[]) {
    // PGDSO_TEST_ENGINE_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the engines of a test
    const nodeArgs = (process.env.PGDSO_TEST_ENGINE_NODE_ARGS ?? '').split(' ').filter(Boolean);
    this.child = spawn(process.execPath, [...NODE_FLAGS, ...nodeArgs, ...PGDSO_COMMAND, 'run', ...args], {
      env: { ...process.env, PGDSO_LOG_LEVEL: process.env.PGDSO_LOG_LEVEL ?? 'info' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child.stdout!.on('data', (d) => (this.out += d));
    this.child.stderr!.on('data', (d) => (this.out += d));
    this.exited = new Promise((resolve) => this.child.on('exit', (code) => resolve(code)));
  }

  get output(): string {
    return this.out;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /**
   * SIGTERM and wait for a clean exit. An engine that does not exit within `timeoutMs` is a
   * failure (a shutdown that hangs), reported with its output; it is then killed.
   */
  async stop(timeoutMs = 60_000): Promise<number | null> {
    if (this.running) this.child.kill('SIGTERM');
    try {
      return await within(this.exited, timeoutMs, () => `the engine did not exit after SIGTERM; its output:\n${this.out}`);
    } catch (err) {
      await this.kill9();
      throw err;
    }
  }

  async kill9(): Promise<void> {
    if (this.running) this.child.kill('SIGKILL');
    await this.exited;
  }
}

/** Creates the databases, schema, control schema, forms, config and rule files. */
export async function createDsoEnv(opts: DsoEnvOptions): Promise<DsoEnv> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgdso-test-'));
  await mkdir(path.join(dir, 'rules'));
  const tag = `${process.pid}_${++counter}_${Math.random().toString(36).slice(2, 6)}`;
  const urls: Record<string, string> = {};
  await Promise.all(
    opts.servers.map(async (server, i) => {
      const cluster = opts.clusters[(opts.placement?.[server] ?? i) % opts.clusters.length]!;
      const url = await cluster.createDatabase(`${server}_${tag}`);
      urls[server] = url;
      if (opts.schemaSql) {
        const client = new pg.Client({ connectionString: url });
        await client.connect();
        await client.query(opts.schemaSql);
        await client.end();
      }
      await migrateServer({ connectionString: url });
      for (const form of opts.forms ?? []) await enableForm({ connectionString: url }, 'public', form);
    }),
  );
  const configPath = path.join(dir, 'pgdso.config.json');
  const config = {
    servers: Object.fromEntries(Object.entries(urls).map(([name, url]) => [name, { connection: url }])),
    rules: ['rules/*.json'],
    ...opts.config,
  };
  await writeFile(configPath, JSON.stringify(config, null, 2));
  const env = new DsoEnv(dir, configPath, urls);
  await env.writeRules(opts.rules);
  return env;
}

/** A mapping of the contract's shape, with defaults filled by the loader. */
export function mapping(name: string, from: string, to: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { name, from: { server: from, form: 'repair_request' }, to: { server: to, form: 'repair_request' }, ...extra };
}

export function filter(
  name: string,
  server: string,
  conditions: Record<string, unknown> | null,
  actions: Record<string, unknown>[],
  ops = ['insert', 'update'],
): Record<string, unknown> {
  return { name, on: { server, form: 'repair_request', ops }, ...(conditions ? { conditions } : {}), actions };
}

export const is = (column: string, value: unknown) => ({ fact: 'row', path: `$.${column}`, operator: 'equal', value });

/**
 * A test file's clusters and DSO environments: clusters started before the file's tests, every
 * environment and cluster closed after them, and a leak check (no pgdso child process left).
 */
export function dsoSuite(clusterCount: number, provide: ProvideOptions = {}) {
  let clusters: TestCluster[] = [];
  const envs: DsoEnv[] = [];
  before(async () => {
    clusters = await provideClusters(clusterCount, provide);
  });
  after(async () => {
    await Promise.all(envs.map((e) => e.close()));
    await leakCheck({ allowPids: () => clusters.flatMap((c) => c.ownedPids()) })();
    await Promise.all(clusters.map((c) => c.destroy()));
  });
  return {
    get clusters(): readonly TestCluster[] {
      return clusters;
    },
    async env(opts: Omit<DsoEnvOptions, 'clusters'>): Promise<DsoEnv> {
      const created = await createDsoEnv({ clusters, ...opts });
      envs.push(created);
      return created;
    },
  };
}

export type Hop = { fromServer: string; toServer: string; mapping: string; fromRequestId: string; operation?: string };
/** A row of repair_request as the tests read it. */
export type Copy = Record<string, unknown> & { dso_mapping_history: Hop[] };

/** The copy of a request on a server (repair_request), or undefined. */
export async function copyOf(e: DsoEnv, server: string, id: string): Promise<Copy | undefined> {
  return (await e.query<Copy>(server, 'SELECT * FROM repair_request WHERE id = $1', [id]))[0];
}

/** waitFor, with the engine's output in the message when the deadline passes. */
export function until<T>(engine: EngineProcess, what: string, check: () => T | Promise<T>, timeoutMs?: number): Promise<T> {
  return waitFor(check, { timeoutMs, message: () => `${what}; engine output:\n${engine.output}` });
}

/**
 * Waits until every server's slot (all of the environment's unless named) has confirmed
 * everything written so far: the engines are idle, so something that has not happened will not.
 */
export async function settled(e: DsoEnv, engine: EngineProcess, servers: readonly string[] = Object.keys(e.urls)): Promise<void> {
  for (const server of servers) {
    const [{ lsn }] = (await e.query<{ lsn: string }>(server, 'SELECT pg_current_wal_lsn()::text AS lsn')) as [{ lsn: string }];
    await until(
      engine,
      `the slot of ${server} did not catch up`,
      async () =>
        (
          await e.query<{ done: boolean }>(
            server,
            `SELECT confirmed_flush_lsn >= $1::pg_lsn AS done FROM pg_replication_slots WHERE database = current_database()`,
            [lsn],
          )
        )[0]?.done,
    );
  }
}
