import { compileRules } from '../../rules/index.ts';
import { ServerEngine } from '../../engine.ts';
import { preflight } from '../../preflight.ts';
import { configFrom, loggerFrom, serverOf, UsageError, type GlobalOptions } from '../common.ts';

export async function runCommand(opts: GlobalOptions, cmd: { server?: string; instanceId?: string; rank?: string }): Promise<void> {
  const config = await configFrom(opts);
  const rules = compileRules(config);
  const log = loggerFrom(opts);
  const servers = cmd.server ? [serverOf(config, cmd.server).name] : Object.keys(config.servers).filter((s) => config.filters.some((f) => f.on.server === s));
  // Bad rules never start an engine: the live catalogs must agree with the mappings.
  const findings = await preflight(config, rules);
  const problems = findings.filter((f) => f.severity === 'problem');
  for (const f of findings.filter((f) => f.severity !== 'problem')) log.warn({ server: f.server }, f.message);
  if (problems.length) throw new UsageError(`rules do not match the databases:\n${problems.map((p) => `  ${p.server}: ${p.message}`).join('\n')}`);

  const controller = new AbortController();
  const stop = (signal: string) => {
    log.info({ signal }, 'stopping');
    controller.abort();
  };
  process.once('SIGINT', () => stop('SIGINT'));
  process.once('SIGTERM', () => stop('SIGTERM'));
  const engines = servers.map((server) => new ServerEngine({ config, rules, server, log }));
  log.info({ servers, instance: cmd.instanceId ?? `${process.pid}` }, 'pgdso running');
  await Promise.all(engines.map((engine) => engine.run(controller.signal)));
  log.info('stopped');
  log.flush();
}
