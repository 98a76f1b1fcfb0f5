// One use case of `pgdso demo`: its own databases on the demo cluster (a slot is per database, so
// the uses stay independent), the config and rules of examples/<example>/, and one instance, the
// composition root of `pgdso run`, serving every configured server (its escalations on the
// demo's clock).
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import pg from 'pg';
import type { Logger } from 'pino';
import type { LocalCluster } from '../embedded/cluster.ts';
import { loadConfig } from '../config/load.ts';
import { compileRules } from '../rules/index.ts';
import { Instance } from '../instance.ts';
import type { Clock } from '../escalation/schedule.ts';
import { migrateServer } from '../sql/migrate.ts';
import { enableForm } from '../sql/forms.ts';
import { findingsAsConfigError, preflight } from '../preflight.ts';

const FORM_SQL = `CREATE TABLE repair_request (
  id text PRIMARY KEY, item text NOT NULL, needs_upholstery boolean NOT NULL DEFAULT false,
  status text NOT NULL DEFAULT 'new', site text, description text)`;

/** The demo runs the examples/ config and rule files as they are, the ones the README walks through. */
const EXAMPLES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../examples');

export async function until(check: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('the demo timed out waiting for the engine');
    await delay(50);
  }
}

export type Row = Record<string, unknown>;

/**
 * One use case: its own databases on the demo cluster (a slot is per database, so the uses stay
 * independent), the config of examples/<example>/ with each server's URL given as the
 * `<SERVER>_URL` variable it names, and one instance serving every configured server.
 */
export class DemoUse {
  readonly pools = new Map<string, pg.Pool>();
  private readonly controller = new AbortController();
  private readonly engines: Promise<unknown>[] = [];
  /** `<SERVER>_URL` for each server, the variables the example's config names */
  env: Record<string, string> = {};

  private constructor(
    readonly example: string,
    readonly databases: Record<string, string>,
  ) {}

  /**
   * Creates the databases (`prefix` + server name), the form, the control schema, and enables the
   * form; a server named in `elsewhere` gets its database on that cluster instead.
   */
  static async create(
    cluster: LocalCluster,
    example: string,
    prefix: string,
    servers: readonly string[],
    elsewhere: Record<string, LocalCluster> = {},
  ): Promise<DemoUse> {
    const use = new DemoUse(example, Object.fromEntries(servers.map((s) => [s, `${prefix}${s}`])));
    for (const server of servers) {
      const url = await (elsewhere[server] ?? cluster).createDatabase(use.databases[server]!);
      use.env[`${server.toUpperCase()}_URL`] = url;
      const pool = new pg.Pool({ connectionString: url, max: 2 });
      pool.on('error', () => undefined); // an idle connection cut when the cluster stops at the end
      use.pools.set(server, pool);
      await pool.query(FORM_SQL);
      await migrateServer({ connectionString: url });
      await enableForm({ connectionString: url }, 'public', 'repair_request');
    }
    return use;
  }

  /** examples/<example>/pgdso.config.json, the config the use runs (and `pgdso --config` names). */
  get configPath(): string {
    return path.join(EXAMPLES, this.example, 'pgdso.config.json');
  }

  /**
   * Loads the example's config and rules, checks them as `pgdso run` does, and runs one instance
   * (`pgdso run` without --server) serving every configured server, its escalations on `clock`.
   * Resolves once the instance runs the `dso` operation of every server.
   */
  async start(log: Logger, clock?: Clock): Promise<void> {
    const config = await loadConfig(this.configPath, this.env);
    const rules = compileRules(config);
    const invalid = findingsAsConfigError(await preflight(config, rules), config.file);
    if (invalid) throw invalid;
    const servers = Object.keys(config.servers);
    const instance = new Instance({
      configPath: this.configPath,
      env: this.env,
      config,
      rules,
      servers,
      instanceId: `demo-${this.example}`,
      rank: null,
      log,
      clock,
    });
    this.engines.push(instance.run(this.controller.signal));
    await until(async () => {
      for (const server of servers) {
        const res = await this.pool(server).query(
          `SELECT 1 FROM pgdso.servgrp_board WHERE instance_id = $1 AND state = 'online' AND 'dso' = ANY (operations)`,
          [instance.instanceId],
        );
        if (res.rowCount === 0) return false;
      }
      return true;
    });
  }

  /** Stops the engines (each confirms what it applied and closes its stream), then the pools. */
  async stop(): Promise<void> {
    this.controller.abort();
    await Promise.allSettled(this.engines);
    this.engines.length = 0;
    await Promise.all([...this.pools.values()].map((p) => p.end()));
    this.pools.clear();
  }

  pool(server: string): pg.Pool {
    return this.pools.get(server)!;
  }

  async copy(server: string, id: string): Promise<Row | undefined> {
    return (await this.pool(server).query('SELECT * FROM repair_request WHERE id = $1', [id])).rows[0] as Row | undefined;
  }

  /** A table of where each copy of the requests is, one line per copy. */
  async table(say: (text?: string) => void, ids: readonly string[]): Promise<void> {
    const servers = [...this.pools.keys()];
    const width = Math.max(8, ...servers.map((s) => s.length + 1));
    say(
      `${'request'.padEnd(8)} ${'server'.padEnd(width)} ${'master'.padEnd(7)} ${'from'.padEnd(9)} ` +
        `${'to'.padEnd(width)} ${'transfer'.padEnd(9)} history`,
    );
    for (const id of ids) {
      for (const server of servers) {
        const row = await this.copy(server, id);
        if (!row) continue;
        const history = (row.dso_mapping_history as { fromServer: string; toServer: string }[])
          .map((h) => `${h.fromServer}->${h.toServer}`)
          .join(', ');
        say(
          `${id.padEnd(8)} ${server.padEnd(width)} ${String(row.dso_master).padEnd(7)} ${String(row.dso_from_server ?? '').padEnd(9)} ` +
            `${String(row.dso_to_server ?? '').padEnd(width)} ${String(row.dso_transfer_status ?? '').padEnd(9)} ${history}`,
        );
      }
    }
  }
}
