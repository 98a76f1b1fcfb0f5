// Where each operation on a target copy goes: skipped (a replay of what was applied before),
// the lane of its peer and pool, or the peer's share of the queue; and the source copy's side of
// it (its bookkeeping, or its refusal) in the open batch.
import { formatLsn, type TextRow } from '../change.ts';
import type { MappingConfig } from '../config/types.ts';
import type { LaneBuffer } from '../applier/buffer.ts';
import type { Outcome } from '../applier/bookkeeping.ts';
import type { ApplyFailure } from '../applier/sets.ts';
import { opType, requestKey, supersedes, type PendingEntry, type QueuedOp } from '../queue/sql.ts';
import { stageBookkeeping, seenOf, type Batch } from './batch.ts';
import { entryOf, type GroupOperations, type Operation } from './operations.ts';
import type { Peers } from './peers.ts';
import type { SessionState } from './state.ts';
import type { ChangeContext, LinkRef, Peer, Route } from './types.ts';

export class Router {
  constructor(
    private readonly state: SessionState,
    private readonly peers: Peers,
    private readonly batch: Batch,
    private readonly groupOps: GroupOperations,
  ) {}

  /**
   * Where an operation on a target copy goes. Skipped when already applied (a replay: the
   * source lane or the peer's lane committed its transaction); queued when the peer cannot be
   * reached or the request already has queued operations; else the lane of its pool.
   */
  route(server: string, pool: string, table: string, targetKey: string, finalLsn: bigint): Route {
    if (this.state.source.applied(finalLsn)) return { to: 'skip' };
    const peer = this.peers.get(server)!;
    if (peer.up && !peer.queued.has(requestKey(table, targetKey))) {
      const buffer = this.bufferFor(peer, pool, table, targetKey);
      return buffer.lane.applied(finalLsn) ? { to: 'skip' } : { to: 'lane', buffer };
    }
    if (!peer.up) {
      const progress = peer.progress.get(pool);
      if (progress !== undefined && finalLsn <= progress) return { to: 'skip' };
      return { to: 'queue', peer, unsure: progress === undefined };
    }
    return { to: 'queue', peer, unsure: false };
  }

  /**
   * The lane of (peer, pool) for an operation on a request. A server served by several pools
   * keeps each request in the lane that took its first operation of the batch: the order of one
   * request's operations is kept across pools.
   */
  private bufferFor(peer: Peer, pool: string, table: string, key: string): LaneBuffer<ApplyFailure> {
    const buffer = peer.lanes.get(pool)!;
    if (peer.lanes.size < 2) return buffer;
    const { pinned } = this.batch;
    const pin = `${peer.name}\u0000${table}\u0000${key}`;
    const found = pinned.get(pin);
    if (found) return found;
    pinned.set(pin, buffer);
    return buffer;
  }

  /** Sends an operation where its route says (`operation`: the entry, or what builds it when needed). */
  dispatch(ctx: ChangeContext, route: Route, operation: Operation, add: (buffer: LaneBuffer<ApplyFailure>) => string): Route['to'] {
    if (route.to === 'skip') return 'skip';
    if (route.to === 'queue') {
      const entry = entryOf(operation);
      if (route.unsure) entry.op = { ...entry.op, unsure: { pool: entry.mapping.pool, finalLsn: formatLsn(ctx.tx.finalLsn) } } as QueuedOp;
      this.queue(route.peer, entry);
      const bk = entry.op.bookkeeping;
      if (bk) this.batch.waiting.push({ source: ctx.form, type: bk.op, requestId: entry.op.requestId });
      return 'queue';
    }
    const { buffer } = route;
    this.groupOps.added(buffer, add(buffer), operation);
    this.batch.unflushed += 1;
    if (buffer.lane.backlog > 2) ctx.waits.push(buffer.lane.drainTo(1));
    return 'lane';
  }

  /** Adds an operation to this batch's share of the peer's queue; it supersedes the request's last one of the same kind. */
  private queue(peer: Peer, entry: PendingEntry): void {
    const key = requestKey(entry.targetForm, entry.op.targetKey);
    peer.queued.add(key);
    const at = peer.lastInBatch.get(key);
    if (at !== undefined && supersedes(peer.batch[at]!.op) === supersedes(entry.op)) {
      peer.batch[at] = entry;
      return;
    }
    peer.lastInBatch.set(key, peer.batch.length);
    peer.batch.push(entry);
    this.batch.unflushed += 1;
  }

  /** An operation along a link, as it is queued (or buffered). */
  entry(link: LinkRef, op: Omit<QueuedOp, 'link' | 'lsn'>, lsn: bigint): PendingEntry {
    const there = link.forward ? link.mapping.to : link.mapping.from;
    const full: QueuedOp = { ...op, link: `${link.mapping.name}${link.forward ? '>' : '<'}`, lsn: formatLsn(lsn) };
    return { op: full, type: opType(full), mapping: link.mapping, targetServer: link.server, targetForm: `${there.schema}.${there.table}` };
  }

  /** The source copy's side of an operation that went to a lane or was applied before; a queued one carries its own. */
  bookkeeping(ctx: ChangeContext, outcome: Outcome, mapping: MappingConfig, requestId: string, sent: Route['to'], row: TextRow): void {
    const source = this.state.sourceBuffer!;
    if (sent === 'queue' || source.lane.applied(ctx.tx.finalLsn)) return;
    const { form } = ctx;
    stageBookkeeping(source, outcome, mapping, form, requestId, ctx.change.lsn, sent === 'lane', seenOf(row), this.batch.assigned);
    this.batch.unflushed += 1;
  }

  /** A change refused before reaching a lane: recorded in pending_errors at the flush. */
  reject(
    ctx: ChangeContext,
    type: ApplyFailure['type'],
    mapping: MappingConfig,
    requestId: string,
    targetServer: string,
    error: string,
    payload: Record<string, unknown>,
  ): void {
    this.batch.reject({ type, mapping, source: ctx.form, targetServer, requestId, lsn: ctx.change.lsn, sqlstate: null, payload, error });
  }
}
