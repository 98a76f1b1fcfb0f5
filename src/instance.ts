// The composition root of `pgdso run`: one instance serving one or more servers. Per served
// server it builds the operation runners (dso, escalation, admin) and the supervisor that starts
// and stops them as the instance gains and loses them in the server's group; it adopts each rule
// set the group publishes, and carries out the requests routed to it. The command line only
// parses options and turns signals into an abort (SIGINT, SIGTERM) or a reload (SIGHUP).
import os from 'node:os';
import type { Logger } from 'pino';
import type pg from 'pg';
import { loadConfig, readRuleSources, toPgClientConfig } from './config/load.ts';
import { ConfigError, type PgdsoConfig } from './config/types.ts';
import { compileRules, type CompiledRules } from './rules/index.ts';
import { withClient } from './sql/client.ts';
import { retryPending, type RetryOutcome, type Selection } from './queue/admin.ts';
import { startHttpServer, type HttpServer } from './http/server.ts';
import { ServerSupervisor } from './group/supervisor.ts';
import { AdminRunner, DsoRunner, EscalationRunner, type RuleState } from './group/runners.ts';
import { digestOf, latestRuleSet, relativeSources } from './group/rulesets.ts';
import { submitRequest, type GroupRequest } from './group/requests.ts';
import type { Clock } from './escalation/schedule.ts';

export interface InstanceOptions {
  configPath: string;
  env: NodeJS.ProcessEnv;
  /** the config and rules read at start (validated, preflight passed) */
  config: PgdsoConfig;
  rules: CompiledRules;
  servers: readonly string[];
  instanceId?: string;
  rank: number | null;
  log: Logger;
  /** the clock escalations run by (tests and the demo move it) */
  clock?: Clock;
}

interface Served {
  name: string;
  connection: pg.ClientConfig;
  state: RuleState;
  supervisor: ServerSupervisor;
  dso: DsoRunner;
  escalation: EscalationRunner;
  admin: AdminRunner;
}

export class Instance {
  readonly instanceId: string;
  private readonly served: Served[] = [];
  private readonly log: Logger;

  constructor(private readonly opts: InstanceOptions) {
    this.instanceId = opts.instanceId ?? `${os.hostname()}-${process.pid}`;
    this.log = opts.log.child({ instance: this.instanceId });
  }

  /** Runs until the signal aborts; true when a server's engine stopped on an error a DBA must fix. */
  async run(signal: AbortSignal): Promise<boolean> {
    const { config, rules, configPath, env } = this.opts;
    const digest = digestOf(relativeSources(configPath, await readRuleSources(configPath, env)));
    for (const name of this.opts.servers) this.served.push(this.serve(name, { config, rules, version: null, digest }));
    const http = await this.startHttp();
    this.log.info({ servers: this.opts.servers, httpPort: http?.port }, 'pgdso running');
    try {
      const stopped = await Promise.all(this.served.map((s) => s.supervisor.run(signal)));
      return stopped.some(Boolean);
    } finally {
      await http?.close();
    }
  }

  /** SIGHUP: asks the owner of each server's admin operation to publish the rule files. */
  reload(): void {
    for (const s of this.served) {
      submitRequest(s.supervisor, 'rules-publish', {}, this.instanceId)
        .then(() => this.log.info({ server: s.name }, 'reload requested: the owner of admin publishes the rule files'))
        .catch((err) => this.log.error({ server: s.name, error: (err as Error).message }, 'the reload could not be requested'));
    }
  }

  private serve(name: string, initial: RuleState): Served {
    const connection = toPgClientConfig(this.opts.config.servers[name]!.connection);
    const log = this.log.child({ server: name });
    const served = { name, connection, state: initial } as Served;
    served.dso = new DsoRunner(name, this.instanceId, () => served.state, this.opts.log);
    served.escalation = new EscalationRunner(name, this.instanceId, connection, () => served.state, log, this.opts.clock);
    served.admin = new AdminRunner({
      server: name,
      instanceId: this.instanceId,
      configPath: this.opts.configPath,
      env: this.opts.env,
      connection,
      log,
    });
    served.supervisor = new ServerSupervisor({
      server: name,
      connection,
      instanceId: this.instanceId,
      host: os.hostname(),
      rank: this.opts.rank,
      group: this.opts.config.group,
      httpPort: this.opts.config.http.port,
      log: this.opts.log,
      runners: { dso: served.dso, escalation: served.escalation, admin: served.admin },
      handle: (request) => this.handle(served, request),
      onSignal: (signal) => (signal === 'rules' ? this.adopt(served) : Promise.resolve()),
      ruleVersion: () => served.state.version,
    });
    return served;
  }

  /** Runs the latest published rule set; one that does not load here changes nothing. */
  private async adopt(served: Served): Promise<void> {
    const set = await withClient(served.connection, latestRuleSet);
    if (!set || set.version === served.state.version) return;
    if (set.digest === served.state.digest) {
      served.state = { ...served.state, version: set.version };
      return;
    }
    let config: PgdsoConfig;
    let rules: CompiledRules;
    try {
      config = await loadConfig(this.opts.configPath, this.opts.env, { ruleSources: set.sources });
      rules = compileRules(config);
    } catch (err) {
      const problems = err instanceof ConfigError ? err.message : (err as Error).message;
      this.log.error(
        { server: served.name, version: set.version },
        `rule set ${set.version} does not load here; the running rules stay:\n${problems}`,
      );
      return;
    }
    served.state = { config, rules, version: set.version, digest: set.digest };
    this.log.info({ server: served.name, version: set.version }, 'rule set adopted: the dso operation starts again with it');
    await served.supervisor.restart('dso');
  }

  private async handle(served: Served, request: GroupRequest): Promise<object> {
    if (request.kind === 'pending-retry') {
      const { selection, queued } = request.args as { selection: Selection; queued: boolean };
      const outcome: RetryOutcome = await withClient(served.connection, (client) => retryPending(client, selection, queued));
      return outcome;
    }
    if (request.kind === 'rules-publish') {
      try {
        return await served.admin.publish();
      } catch (err) {
        // bad rules are an answer (the command line exits 2), not a failure of the instance
        if (err instanceof ConfigError) return { problems: err.message };
        throw err;
      }
    }
    if (request.kind === 'escalate') {
      const { name } = request.args as { name: string };
      return served.escalation.runNow(name, new AbortController().signal);
    }
    throw new Error(`unknown request ${String(request.kind)}`);
  }

  private async startHttp(): Promise<HttpServer | null> {
    const port = this.opts.config.http.port;
    if (port === null) return null;
    const views = this.served.map((s) => ({
      server: s.name,
      stats: s.dso.stats,
      streaming: () => s.dso.streaming(),
      operations: () => s.supervisor.operations(),
      connected: () => s.supervisor.isConnected(),
    }));
    try {
      return await startHttpServer(port, views, this.instanceId);
    } catch (err) {
      if ((err as { code?: string }).code !== 'EADDRINUSE') throw err;
      this.log.warn(
        { port },
        `http.port ${port} is taken (another instance on this machine?): this instance runs without /healthz and /metrics`,
      );
      return null;
    }
  }
}
