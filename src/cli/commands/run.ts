import { compileRules } from '../../rules/index.ts';
import { ServerEngine } from '../../engine.ts';
import { startHttpServer } from '../../http/server.ts';
import { findingsAsConfigError, preflight, unsupportedOptions } from '../../preflight.ts';
import { configFrom, loggerFrom, serverOf, type GlobalOptions } from '../common.ts';

export async function runCommand(opts: GlobalOptions, cmd: { server?: string; instanceId?: string; rank?: string }): Promise<void> {
  const config = await configFrom(opts);
  const rules = compileRules(config);
  const log = loggerFrom(opts);
  // Every server with a form in the rules has a slot (forms enable made it): each gets an
  // engine, which confirms what no filter wants, so no slot holds WAL for nothing.
  const servers = cmd.server ? [serverOf(config, cmd.server).name] : Object.keys(config.servers).filter((s) => rules.formsOf(s).length > 0);
  // Bad rules never start an engine: the live catalogs must agree with the mappings.
  const findings = [...unsupportedOptions(config), ...(await preflight(config, rules, Object.keys(config.servers), servers))];
  const invalid = findingsAsConfigError(findings, config.file);
  if (invalid) throw invalid;
  for (const f of findings) log.warn({ server: f.server }, f.message);

  const controller = new AbortController();
  const stop = (signal: string) => {
    log.info({ signal }, 'stopping');
    controller.abort();
  };
  process.once('SIGINT', () => stop('SIGINT'));
  process.once('SIGTERM', () => stop('SIGTERM'));
  const engines = servers.map((server) => new ServerEngine({ config, rules, server, log, instanceId: cmd.instanceId }));
  const httpServer = config.http.port === null ? null : await startHttpServer(config.http.port, engines);
  log.info({ servers, instance: cmd.instanceId ?? `${process.pid}`, httpPort: httpServer?.port }, 'pgdso running');
  try {
    await Promise.all(engines.map((engine) => engine.run(controller.signal)));
  } finally {
    await httpServer?.close();
  }
  // an engine that stopped on an error a DBA must fix (it said which, at error level) fails the run
  if (engines.some((engine) => engine.stats.stoppedBy)) process.exitCode = 1;
  log.info('stopped');
  log.flush();
}
