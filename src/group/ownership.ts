// Who should own each operation, decided by the coordinator from the board and the ranking:
// the live instance with the best rank (lower wins, null last). A live owner keeps its operation
// against an instance of the same rank; a better-ranked one takes it back (relinquish); the
// operation of a delinquent owner moves on (failover), that of a stopped or absent one is taken
// over (takeover).
import { EVENT, type Candidate, type Operation } from './sql.ts';

export interface CurrentOwner {
  operation: Operation;
  instanceId: string | null;
  /** the owner's board state; null when it has no board row */
  state: string | null;
  rank: number | null;
}

export interface Decision {
  operation: Operation;
  newOwner: string;
  oldOwner: string | null;
  type: (typeof EVENT)[keyof typeof EVENT];
}

const order = (rank: number | null) => rank ?? Number.POSITIVE_INFINITY;

export function decide(current: readonly CurrentOwner[], candidates: readonly Candidate[]): Decision[] {
  const decisions: Decision[] = [];
  for (const cur of current) {
    const best = candidates.find((c) => c.operation === cur.operation);
    if (!best || best.instanceId === cur.instanceId) continue;
    if (cur.instanceId !== null && cur.state === 'online') {
      if (order(best.rank) >= order(cur.rank)) continue;
      decisions.push({ operation: cur.operation, newOwner: best.instanceId, oldOwner: cur.instanceId, type: EVENT.relinquish });
    } else {
      const type = cur.instanceId !== null && cur.state === 'delinquent' ? EVENT.failover : EVENT.takeover;
      decisions.push({ operation: cur.operation, newOwner: best.instanceId, oldOwner: cur.instanceId, type });
    }
  }
  return decisions;
}
