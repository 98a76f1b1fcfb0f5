// A command-line request that belongs to an operation: while instances of the server's group
// are online it goes through the coordinator to the owner of the operation, and the answer says
// which instance did the work; with no instance online it is done in-process (null here).
import os from 'node:os';
import type pg from 'pg';
import type { GroupConfig } from '../config/types.ts';
import { awaitAnswer, liveInstances, OPERATION_OF, submitRequest, type RequestKind } from './requests.ts';

export interface Routed<T> {
  instanceId: string;
  result: T;
}

export async function throughGroup<T>(
  client: pg.ClientBase,
  group: GroupConfig,
  server: string,
  kind: RequestKind,
  args: object,
): Promise<Routed<T> | null> {
  const live = await liveInstances(client, group.checkIntervalSeconds, group.delinquentThreshold);
  if (live.length === 0) return null;
  const id = await submitRequest(client, kind, args, `cli ${os.hostname()}-${process.pid}`);
  // a failover may have to happen first: the threshold, an interval to decide, one to answer, and a margin
  const timeoutMs = group.checkIntervalSeconds * 1000 * (group.delinquentThreshold + 3) + 10_000;
  const answer = await awaitAnswer(client, id, timeoutMs);
  if (answer.state === 'failed') {
    throw new Error(
      `${answer.error ?? 'the request failed'} (instances online: ${live.join(', ')}; the ${OPERATION_OF[kind]} operation of ${server})`,
    );
  }
  return { instanceId: answer.instanceId ?? '?', result: answer.result as T };
}
