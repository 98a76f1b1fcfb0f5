// `pgdso escalate --name E`: runs one escalation now, whatever its schedule. While instances of
// its server are online the request goes through the coordinator to the owner of `escalation`,
// which runs it with the rules in force in the group; with none online it runs in this process
// (the engine carries the matched requests once an instance runs). Either way the run is recorded
// in pgdso.scan_runs like a scheduled one, and resumes after an interruption.
import os from 'node:os';
import { toPgClientConfig } from '../../config/load.ts';
import { compileRules } from '../../rules/index.ts';
import { withClient } from '../../sql/client.ts';
import { throughGroup } from '../../group/route.ts';
import { Escalations, type RunSummary } from '../../escalation/runner.ts';
import { configFrom, loggerFrom, print, UsageError, type GlobalOptions } from '../common.ts';

export async function escalateCommand(opts: GlobalOptions, cmd: { name: string; json?: boolean }): Promise<void> {
  const config = await configFrom(opts);
  const rules = compileRules(config);
  const escalation = rules.escalation(cmd.name);
  if (!escalation) {
    const known = config.escalations.map((e) => e.name);
    throw new UsageError(`no escalation "${cmd.name}" in the rules (${known.length ? `known: ${known.join(', ')}` : 'there are none'})`);
  }
  const server = escalation.on.server;
  const connection = toPgClientConfig(config.servers[server]!.connection);
  const routed = await withClient(connection, (client) =>
    throughGroup<RunSummary>(client, config.group, server, 'escalate', { name: cmd.name }),
  );
  let summary: RunSummary;
  let where: string;
  if (routed) {
    summary = routed.result;
    where = `on instance ${routed.instanceId}, the owner of escalation on ${server}`;
  } else {
    const abort = new AbortController();
    const onSignal = () => abort.abort();
    process.once('SIGINT', onSignal).once('SIGTERM', onSignal);
    try {
      const escalations = new Escalations({
        server,
        connection,
        instanceId: `cli ${os.hostname()}-${process.pid}`,
        log: loggerFrom({ ...opts, logLevel: opts.logLevel === 'info' ? 'warn' : opts.logLevel }),
        rules: () => rules,
      });
      summary = await escalations.runNow(cmd.name, null, abort.signal);
    } finally {
      process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
    }
    where = `in this process (no instance of ${server} is online: the engine carries the matched requests once one runs)`;
  }
  if (cmd.json) {
    print(JSON.stringify(summary));
    return;
  }
  print(
    `escalation "${summary.escalation}" ran ${where}: matched ${summary.matched} of ${summary.scanned} requests` +
      `${summary.errors ? `, ${summary.errors} could not be evaluated (see the log)` : ''} (run ${summary.run})`,
  );
}
