// The operation runners of one served server: `dso` (the engine: decode the slot, apply to the
// peers), `admin` (validate and publish the rule files), `escalation` (the scheduled rules). Each
// runs while its instance owns the operation, and stops when the signal aborts.
import { watch, type FSWatcher } from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type pg from 'pg';
import { emptyEngineStats, ServerEngine, type EngineStats } from '../engine.ts';
import { loadConfig, readRuleSources } from '../config/load.ts';
import type { PgdsoConfig } from '../config/types.ts';
import { compileRules, type CompiledRules } from '../rules/index.ts';
import { findingsAsConfigError, preflight } from '../preflight.ts';
import { withClient } from '../sql/client.ts';
import { publishRuleSet, relativeSources } from './rulesets.ts';
import type { OperationRunner, RunnerEnd } from './supervisor.ts';
import { Escalations, type RunSummary } from '../escalation/runner.ts';
import type { Clock } from '../escalation/schedule.ts';
import type { OwnerGate } from '../scan/runs.ts';

/** The rules a served server runs now (a published set replaces them). */
export interface RuleState {
  config: PgdsoConfig;
  rules: CompiledRules;
  version: number | null;
  digest: string | null;
}

export class DsoRunner implements OperationRunner {
  /** the engine's counters, kept across runs (metrics never go back) */
  readonly stats: EngineStats = emptyEngineStats();
  private engine: ServerEngine | null = null;

  constructor(
    private readonly server: string,
    private readonly instanceId: string,
    private readonly state: () => RuleState,
    private readonly log: Logger,
  ) {}

  streaming(): boolean {
    return this.engine?.streaming() ?? false;
  }

  async run(term: number, signal: AbortSignal): Promise<RunnerEnd> {
    const { config, rules } = this.state();
    const engine = new ServerEngine({
      config,
      rules,
      server: this.server,
      log: this.log,
      instanceId: this.instanceId,
      fence: { term },
      stats: this.stats,
    });
    this.engine = engine;
    try {
      await engine.run(signal);
    } finally {
      this.engine = null;
    }
    return engine.stats.stoppedBy && !signal.aborted ? { stop: true } : undefined;
  }
}

/**
 * The owner of `escalation` runs the server's escalations (src/escalation) under its term: a run
 * is claimed only while this instance owns the operation with that term, so a former owner that
 * wakes up never takes a run back. `runNow` serves `pgdso escalate` routed here.
 */
export class EscalationRunner implements OperationRunner {
  private current: { escalations: Escalations; gate: OwnerGate } | null = null;

  constructor(
    private readonly server: string,
    private readonly instanceId: string,
    private readonly connection: pg.ClientConfig,
    private readonly state: () => RuleState,
    private readonly log: Logger,
    private readonly clock?: Clock,
  ) {}

  private escalations(): Escalations {
    return new Escalations({
      server: this.server,
      connection: this.connection,
      instanceId: this.instanceId,
      log: this.log,
      rules: () => this.state().rules,
      ...(this.clock ? { clock: this.clock } : {}),
    });
  }

  async run(term: number, signal: AbortSignal): Promise<RunnerEnd> {
    const current = { escalations: this.escalations(), gate: { instanceId: this.instanceId, term } };
    this.current = current;
    try {
      await current.escalations.run(current.gate, signal);
    } finally {
      if (this.current === current) this.current = null;
    }
    return undefined;
  }

  /** One escalation now, as the owner (throws when this instance does not own `escalation`). */
  runNow(name: string, signal: AbortSignal): Promise<RunSummary> {
    const current = this.current;
    if (!current) throw new Error(`instance ${this.instanceId} does not run the escalation operation of ${this.server}`);
    return current.escalations.runNow(name, current.gate, signal);
  }
}

export interface AdminOptions {
  server: string;
  instanceId: string;
  configPath: string;
  env: NodeJS.ProcessEnv;
  connection: pg.ClientConfig;
  log: Logger;
}

/**
 * The owner of `admin` publishes the rule files: at start, on a change of a rule file, on
 * SIGHUP of any instance and on `pgdso rules publish` (both routed here). A set that does not
 * load, compile or pass the preflight changes nothing: the error names the file, the pointer and
 * the reason.
 */
export class AdminRunner implements OperationRunner {
  private term: number | null = null;
  private publishing: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: AdminOptions) {}

  async run(term: number, signal: AbortSignal): Promise<RunnerEnd> {
    this.term = term;
    await this.publish().catch((err) => this.opts.log.error({ error: (err as Error).message }, 'the rule files were not published'));
    const unwatch = this.watchRuleFiles();
    try {
      if (!signal.aborted) await new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }));
    } finally {
      unwatch();
      this.term = null;
    }
    return undefined;
  }

  /** Validates the rule files as every instance will compile them, and publishes them. */
  publish(): Promise<{ version: number; changed: boolean }> {
    const run = this.publishing.then(() => this.publishNow());
    this.publishing = run.catch(() => {});
    return run;
  }

  private async publishNow(): Promise<{ version: number; changed: boolean }> {
    const { configPath, env, server, instanceId, connection, log } = this.opts;
    const term = this.term;
    if (term === null) throw new Error(`instance ${instanceId} does not own the admin operation of ${server}`);
    const sources = relativeSources(configPath, await readRuleSources(configPath, env));
    const config = await loadConfig(configPath, env, { ruleSources: sources });
    const rules = compileRules(config);
    const findings = await preflight(config, rules, Object.keys(config.servers), [server]);
    const invalid = findingsAsConfigError(findings, config.file);
    if (invalid) throw invalid;
    const published = await withClient(connection, (client) => publishRuleSet(client, sources, instanceId, { operation: 'admin', term }));
    if (published.changed) log.info({ version: published.version, files: sources.map((s) => s.file) }, 'rule set published');
    return published;
  }

  /** Watches the config's folder and the rule files' folders; returns the function that stops it. */
  private watchRuleFiles(): () => void {
    const configDir = path.dirname(path.resolve(this.opts.configPath));
    const watchers: FSWatcher[] = [];
    let closed = false;
    let timer: NodeJS.Timeout | null = null;
    const changed = () => {
      if (timer) clearTimeout(timer);
      timer = setTimeout(() => {
        timer = null;
        if (this.term === null) return;
        this.publish().catch((err) => this.opts.log.error({ error: (err as Error).message }, 'the changed rule files were not published'));
      }, 300);
      timer.unref();
    };
    const start = (dirs: Set<string>) => {
      for (const dir of closed ? [] : dirs) {
        try {
          const w = watch(dir, (_event, name) => {
            if (name && String(name).endsWith('.json')) changed();
          });
          w.on('error', () => {});
          watchers.push(w);
        } catch {
          // a folder that cannot be watched: SIGHUP and pgdso rules publish still publish
        }
      }
    };
    readRuleSources(this.opts.configPath, this.opts.env)
      .then((sources) => sources.map((s) => path.dirname(path.resolve(configDir, s.file))))
      .catch(() => [] as string[])
      .then((dirs) => start(new Set([configDir, ...dirs])));
    return () => {
      closed = true;
      if (timer) clearTimeout(timer);
      for (const w of watchers) w.close();
    };
  }
}
