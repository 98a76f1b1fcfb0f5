// `pgdso run`: parses the options, checks config, rules and the live catalogs (bad ones never
// start an instance), and turns signals into an abort (SIGINT, SIGTERM) or a reload (SIGHUP).
import path from 'node:path';
import { compileRules } from '../../rules/index.ts';
import { Instance } from '../../instance.ts';
import { findingsAsConfigError, preflight } from '../../preflight.ts';
import { boundHeapGrowth, configFrom, loggerFrom, serverOf, UsageError, type GlobalOptions } from '../common.ts';

export async function runCommand(opts: GlobalOptions, cmd: { server?: string; instanceId?: string; rank?: string }): Promise<void> {
  boundHeapGrowth();
  const rank = rankOf(cmd.rank);
  const config = await configFrom(opts);
  const rules = compileRules(config);
  const log = loggerFrom(opts);
  // Every server with a form in the rules has a slot (forms enable made it): each is served,
  // and its engine confirms what no filter wants, so no slot holds WAL for nothing.
  const servers = cmd.server ? [serverOf(config, cmd.server).name] : Object.keys(config.servers).filter((s) => rules.formsOf(s).length > 0);
  // Bad rules never start an instance: the live catalogs must agree with the mappings.
  const findings = await preflight(config, rules, Object.keys(config.servers), servers);
  const invalid = findingsAsConfigError(findings, config.file);
  if (invalid) throw invalid;
  for (const f of findings) log.warn({ server: f.server }, f.message);

  const controller = new AbortController();
  const instance = new Instance({
    configPath: path.resolve(opts.config),
    env: opts.env ?? process.env,
    config,
    rules,
    servers,
    instanceId: cmd.instanceId,
    rank,
    log,
  });
  const stop = (signal: string) => {
    log.info({ signal }, 'stopping');
    controller.abort();
  };
  process.once('SIGINT', () => stop('SIGINT'));
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGHUP', () => {
    log.info({ signal: 'SIGHUP' }, 'reload: the rule files are published through the group');
    instance.reload();
  });
  const stoppedOnError = await instance.run(controller.signal);
  // an engine that stopped on an error a DBA must fix (it said which, at error level) fails the run
  if (stoppedOnError) process.exitCode = 1;
  log.info('stopped');
  log.flush();
  // Everything was closed; a handle left open by mistake must not keep a stopped engine alive
  // (a service manager would wait for it, then kill it): say what it was, and exit.
  setTimeout(() => {
    log.warn({ resources: process.getActiveResourcesInfo() }, `still running ${LINGER_MS} ms after stopping: exiting`);
    log.flush();
    process.exit();
  }, LINGER_MS).unref();
}

const LINGER_MS = 5_000;

function rankOf(text: string | undefined): number | null {
  if (text === undefined) return null;
  if (!/^[0-9]{1,9}$/.test(text)) throw new UsageError(`--rank takes a whole number (lower wins), not "${text}"`);
  return Number(text);
}
