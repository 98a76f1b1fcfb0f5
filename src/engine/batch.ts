// The open batch and its commit. Between flushes, operations gather in the lanes' groups, in
// the peers' shares of the queue, and here (changes refused before reaching a lane, source copies
// whose operation waits in the queue). The flush ends the batch: target lanes apply and commit
// (recording the source position), then the source lane writes the queue's share, the statuses
// and the bookkeeping with its progress, and only then is the batch confirmed. That source
// transaction runs while the next batch is decoded and applied (SourceTail, in order).
import type { TextRow, TxCommit } from '../change.ts';
import type { MappingConfig } from '../config/types.ts';
import type { LaneBuffer } from '../applier/buffer.ts';
import {
  SourceBookkeeping,
  countHops,
  markStatus,
  recordErrors,
  type CopyStatus,
  type Outcome,
  type SeenState,
} from '../applier/bookkeeping.ts';
import { changeKey, type ApplyFailure } from '../applier/sets.ts';
import type { FormInfo } from '../sql/form-catalog.ts';
import { enqueue } from '../queue/sql.ts';
import type { SourceTail } from './source-tail.ts';
import { PeerFailedMidBatch, catalogChanged } from './errors.ts';
import type { Peers } from './peers.ts';
import type { SessionState } from './state.ts';

export class Batch {
  /** operations buffered since the last flush */
  unflushed = 0;
  /** the last source transaction decoded: the batch's position */
  last: TxCommit | null = null;
  /** changes refused before reaching a lane (recorded in pending_errors at the next flush) */
  rejected: ApplyFailure[] = [];
  /** source copies whose operation waits in the queue (status retry at the next flush) */
  waiting: CopyStatus[] = [];
  /** the lane each request's operations take in this batch, on a peer served by several pools */
  readonly pinned = new Map<string, LaneBuffer<ApplyFailure>>();
  /** target keys taken under new-id in this batch, per mapping */
  readonly assigned = new Map<string, Map<string, string>>();

  constructor(
    private readonly state: SessionState,
    private readonly peers: Peers,
    readonly sourceTail: SourceTail,
  ) {}

  /** A change refused before reaching a lane. */
  reject(failure: ApplyFailure): void {
    this.rejected.push(failure);
    this.unflushed += 1;
  }

  /** The target keys taken under new-id in this batch by a mapping. */
  assignedFor(mapping: MappingConfig): Map<string, string> {
    let found = this.assigned.get(mapping.name);
    if (!found) this.assigned.set(mapping.name, (found = new Map()));
    return found;
  }

  /**
   * Ends a batch. Lanes apply; a peer whose lane failed before its commit committed nothing of
   * the batch: it is down until its next attempt and the batch is replayed (its operations for
   * the peer then go to the queue). Rows that
   * could not be applied are recorded in pending_errors (before any target commits: a replay
   * must find them). The targets commit, then the source lane writes the queue's share, the
   * statuses and the bookkeeping with its progress, and only then is the batch confirmed: that
   * part is queued on the SourceTail, and the flush returns once the previous batch's is done.
   */
  async flush(): Promise<void> {
    const last = this.last;
    if (!last) return;
    const { state } = this;
    const { stats, log } = state;
    const peers = [...this.peers.values()];
    const all = peers.flatMap((p) => [...p.lanes.values()]);
    for (const buffer of all) buffer.submitAll();
    await Promise.allSettled(all.map((b) => b.lane.settle()));
    // A lane that failed before its commit committed nothing of the batch, nor did any other
    // (targets commit below): the peer is down until its next attempt, and the batch is replayed
    // from the slot, its operations for the peer going to the queue. Nothing of the batch is
    // kept in memory for this (a batch can be one huge source transaction).
    const broken: string[] = [];
    for (const peer of peers) {
      const failed = [...peer.lanes.values()].find((b) => b.lane.failed)?.lane.failed;
      if (!failed) continue;
      await this.peers.peerDown(peer, failed);
      broken.push(peer.name);
    }
    if (broken.length)
      throw new PeerFailedMidBatch(
        `${broken.join(', ')} failed in the middle of a batch: the batch is replayed, ` +
          `its operations for ${broken.length > 1 ? 'them' : 'it'} queued`,
      );
    const lanes = peers.filter((p) => p.up).flatMap((p) => [...p.lanes.entries()].map(([pool, buffer]) => ({ peer: p, pool, buffer })));
    const failures = [...this.rejected, ...lanes.flatMap(({ buffer }) => buffer.lane.takeFailures())];
    this.rejected = [];
    const source = state.source;
    this.sourceTail.check();
    state.assertHeld();
    if (failures.length) {
      // on the control connection (it holds the server's lock), not the source lane: that one
      // may still run an earlier batch's source transaction, which the lanes must not wait for
      await recordErrors(state.control, failures);
      for (const f of failures) log.warn({ mapping: f.mapping.name, type: f.type, requestId: f.requestId, sqlstate: f.sqlstate }, f.error);
    }
    // Targets commit first, then the source copies' bookkeeping: no transaction of this engine
    // stays open while it waits for another engine (two engines writing each other's rows would
    // wait for each other forever, unseen by PostgreSQL's deadlock detector). Meanwhile a target's
    // engine may already act on its new copy and write back (a return, a transfer back): the
    // bookkeeping leaves ownership alone on a copy another engine wrote since (SourceBookkeeping).
    state.assertHeld();
    await Promise.all(
      lanes
        .filter(({ buffer }) => buffer.lane.dirty)
        .map(async ({ peer, pool, buffer }) => {
          await buffer.lane.commit(last.finalLsn, last.commitTime);
          peer.progress.set(pool, buffer.lane.progress);
        }),
    );
    // a failed write fails the earlier changes of its request that it carried too
    const dropped = new Set(
      failures.flatMap((f) => [f.lsn, ...(f.coalesced ?? [])].map((lsn) => changeKey(f.type, f.mapping.name, f.requestId, lsn))),
    );
    const sourceBuffer = state.sourceBuffer!;
    for (const group of sourceBuffer.pendingGroups()) if (group instanceof SourceBookkeeping) group.dropFailed(dropped);
    const queued = peers
      .filter((p) => p.batch.length > 0)
      .map((p) => ({ entries: p.batch, nextAttemptAt: new Date(Math.max(Date.now(), p.nextAttemptAt)), lastError: p.lastError }));
    for (const peer of peers) {
      stats.queued += peer.batch.length;
      peer.batch = [];
      peer.lastInBatch.clear();
    }
    const waiting = this.waiting;
    this.waiting = [];
    const bookkeeping = sourceBuffer.takeAll();
    stats.applied += this.unflushed;
    stats.failed += failures.length;
    this.unflushed = 0;
    this.pinned.clear();
    this.assigned.clear(); // the batch's groups keep theirs
    // One source transaction with the source's progress: the queue's share and the failures'
    // statuses, the bookkeeping, then the statuses of copies with an operation still waiting
    // (after the bookkeeping: they show it until delivered). Run again on a lock conflict. It
    // runs while the next batch is decoded and applied (SourceTail); the batch is confirmed after it.
    if (bookkeeping.length || queued.length || waiting.length || failures.length) {
      await this.sourceTail.transaction(async () => {
        state.assertHeld();
        stats.sourceRetries += await source.transaction(last.finalLsn, last.commitTime, async (client) => {
          for (const { entries, ...attempt } of queued) await enqueue(client, entries, attempt);
          await markStatus(
            client,
            failures.filter((f) => !f.noStatus),
            'failure',
          );
          for (const group of bookkeeping) await group.execute(client);
          await markStatus(client, waiting, 'retry');
        });
      }, last.endLsn);
    } else this.sourceTail.confirm(last.endLsn);
    for (const { peer, buffer } of lanes) if (buffer.lane.progress >= last.finalLsn) await this.peers.peerHealthy(peer);
    await this.peers.refreshPeers(failures.filter(catalogChanged).map((f) => f.targetServer));
  }
}

/**
 * Stages the bookkeeping of a source copy for one change (its position `lsn`); `ran`: applied in
 * this session. The operations of one change on one request join their groups together.
 */
export function stageBookkeeping(
  buffer: LaneBuffer<never>,
  outcome: Outcome,
  mapping: MappingConfig,
  form: FormInfo,
  requestId: string,
  lsn: bigint,
  ran: boolean,
  seen: SeenState,
  assigned: ReadonlyMap<string, ReadonlyMap<string, string>>,
): void {
  buffer.stage(
    lsn,
    `${outcome.op}:${mapping.name}`,
    `${form.schema}.${form.table}`,
    requestId,
    () => new SourceBookkeeping(outcome, mapping, form, assigned.get(mapping.name)),
    (group) => group.add(requestId, lsn, ran, seen),
  );
}

/** What the source copy said in the change, for its bookkeeping. */
export function seenOf(row: TextRow): SeenState {
  return { version: row.dso_version ?? null, hops: countHops(row.dso_mapping_history), current: row.dso_current_server ?? null };
}
