// `pgdso group rank` (who runs an operation: lower rank wins, null last; the coordinator applies
// it within one interval) and `pgdso rules publish` (the owner of admin validates and publishes
// the rule files; every instance of the group then runs them).
import type { GroupConfig } from '../../config/types.ts';
import { toPgClientConfig } from '../../config/load.ts';
import { withClient } from '../../sql/client.ts';
import { throughGroup } from '../../group/route.ts';
import { notify, OPERATIONS, setRank, type Operation } from '../../group/sql.ts';
import { configFrom, print, serverOf, UsageError, type GlobalOptions } from '../common.ts';

export async function groupRankCommand(
  opts: GlobalOptions,
  cmd: { server: string; instanceId: string; rank: string; operation?: string },
): Promise<void> {
  const config = await configFrom(opts);
  const server = serverOf(config, cmd.server);
  const rank = cmd.rank === 'null' || cmd.rank === 'none' ? null : Number(cmd.rank);
  if (rank !== null && !(Number.isInteger(rank) && rank >= 0)) {
    throw new UsageError(`--rank takes a whole number (lower wins) or null (last), not "${cmd.rank}"`);
  }
  const operations: Operation[] = cmd.operation ? [operationOf(cmd.operation)] : [...OPERATIONS];
  await withClient(toPgClientConfig(server.connection), async (client) => {
    const q = setRank(cmd.instanceId, operations, rank);
    await client.query('BEGIN');
    await client.query(q.text, q.values);
    await client.query(notify('owners').text, notify('owners').values);
    await client.query('COMMIT');
  });
  print(`${server.name}: instance ${cmd.instanceId} has rank ${rank ?? 'null (last)'} for ${operations.join(', ')}`);
}

function operationOf(text: string): Operation {
  if ((OPERATIONS as readonly string[]).includes(text)) return text as Operation;
  throw new UsageError(`--operation takes one of ${OPERATIONS.join(', ')}, not "${text}"`);
}

interface Published {
  version?: number;
  changed?: boolean;
  problems?: string;
}

export async function rulesPublishCommand(opts: GlobalOptions, cmd: { server?: string }): Promise<void> {
  const config = await configFrom(opts);
  const servers = cmd.server ? [serverOf(config, cmd.server)] : Object.values(config.servers);
  for (const server of servers) {
    const answer = await withClient(toPgClientConfig(server.connection), (client) =>
      throughGroup<Published>(client, config.group as GroupConfig, server.name, 'rules-publish', {}),
    ).catch((err: Error) => {
      process.stderr.write(`pgdso: ${server.name}: ${err.message}\n`);
      process.exitCode = 1;
      return undefined;
    });
    if (answer === undefined) continue;
    if (answer === null) {
      process.stderr.write(`pgdso: ${server.name}: no instance is online: the rules are published when the first one starts\n`);
      process.exitCode = 1;
      continue;
    }
    const { result, instanceId } = answer;
    if (result.problems) {
      process.stderr.write(`pgdso: ${server.name}: instance ${instanceId} refused the rule files; nothing changed:\n${result.problems}\n`);
      process.exitCode = 2;
      continue;
    }
    print(
      `${server.name}: rule set version ${result.version} ${result.changed ? 'published' : 'unchanged (already published)'}` +
        ` by instance ${instanceId}`,
    );
  }
}
