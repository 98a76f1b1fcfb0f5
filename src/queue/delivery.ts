// The queue's delivery: between source transactions (the stream paused), peers whose next
// attempt is due are tried again, and each reachable peer gets the oldest chunk of its queued
// operations, in order, exactly once.
import type pg from 'pg';
import { parseLsn, type TextRow } from '../change.ts';
import { LaneBuffer } from '../applier/buffer.ts';
import { markStatus, recordErrors } from '../applier/bookkeeping.ts';
import type { ColumnPlan } from '../applier/plan.ts';
import { changeKey, type ApplyFailure } from '../applier/sets.ts';
import { LOCK_NAMESPACE, LOCKS, qualified, quoteIdent } from '../sql/identifiers.ts';
import { stageBookkeeping } from '../engine/batch.ts';
import { catalogChanged } from '../engine/errors.ts';
import { entryKey } from '../engine/operations.ts';
import type { Peers } from '../engine/peers.ts';
import type { SessionState } from '../engine/state.ts';
import type { Topology } from '../engine/topology.ts';
import type { Peer } from '../engine/types.ts';
import type { QueuedOperations } from './rebuild.ts';
import {
  deliveredUpTo,
  dequeue,
  markDelivered,
  nextQueued,
  queueIdentity,
  queuedRequests,
  requestKey,
  stillQueued,
  type PendingEntry,
  type QueuedOp,
} from './sql.ts';

export class Delivery {
  private queueId = '';
  /** `pgdso pending retry` asked for the queue to be read again */
  private reloadQueue = false;

  constructor(
    private readonly state: SessionState,
    private readonly topology: Topology,
    private readonly peers: Peers,
    private readonly queued: QueuedOperations,
  ) {}

  /** Reads the source queue's identity and which target copies have operations queued, per peer. */
  async load(control: pg.Client): Promise<void> {
    this.queueId = await queueIdentity(control);
    for (const [server, keys] of await queuedRequests(control)) {
      const peer = this.peers.get(server);
      if (peer) peer.queued = keys;
      else
        this.state.log.warn(
          { server },
          'pgdso.pending holds operations for a server no mapping leads to any more: they stay there (pgdso pending list, discard)',
        );
    }
  }

  /** `pgdso pending retry` or `discard` changed the queue: it is read again at the next round. */
  reload(): void {
    this.reloadQueue = true;
  }

  /** True when a peer's next attempt is due, or a reachable peer has queued operations. */
  due(): boolean {
    if (this.reloadQueue) return true;
    const now = Date.now();
    for (const peer of this.peers.values()) {
      if (peer.up ? peer.queued.size > 0 : peer.nextAttemptAt <= now) return true;
    }
    return false;
  }

  /** One round: peers due are tried again; each reachable peer gets one chunk of its queue. */
  async deliver(): Promise<void> {
    if (this.reloadQueue) {
      this.reloadQueue = false;
      const byServer = await queuedRequests(this.state.control);
      for (const peer of this.peers.values()) {
        peer.queued = byServer.get(peer.name) ?? new Set();
        if (!peer.up && peer.queued.size > 0) peer.nextAttemptAt = 0;
      }
      await this.peers.refreshPeers(this.peers.names());
    }
    const now = Date.now();
    for (const peer of this.peers.values()) {
      if (!peer.up && (peer.nextAttemptAt > now || !(await this.peers.tryPeer(peer)))) continue;
      if (peer.queued.size > 0) await this.deliverChunk(peer);
    }
  }

  /**
   * Delivers the oldest queued operations of a peer, in order, in one transaction of its first
   * pool's lane that also records the highest id delivered (pgdso.pending_delivered). Those the
   * target had already committed (a delivery cut short before the source's clean-up) only get
   * their bookkeeping. Rows that cannot be applied move to pending_errors before the target
   * commits; then the source writes the bookkeeping and removes what was delivered.
   */
  private async deliverChunk(peer: Peer): Promise<void> {
    // `pending discard --queued` waits for a chunk in delivery (and a chunk for a discard): an
    // operation it reports dropped never reaches its target, one being delivered is not dropped
    const { control } = this.state;
    await control.query('SELECT pg_advisory_lock($1, $2)', [LOCK_NAMESPACE, LOCKS.queueDelivery]);
    try {
      await this.deliverChunkLocked(peer);
    } finally {
      await control.query('SELECT pg_advisory_unlock($1, $2)', [LOCK_NAMESPACE, LOCKS.queueDelivery]).catch(() => {});
    }
  }

  private async deliverChunkLocked(peer: Peer): Promise<void> {
    const { state } = this;
    const { stats, log, server, chunkRows } = state;
    const rows = await nextQueued(state.control, peer.name, chunkRows);
    if (rows.length === 0) {
      peer.queued.clear();
      return;
    }
    const buffer = peer.lanes.get(peer.pools[0]!)!;
    const { lane } = buffer;
    let upTo: bigint;
    try {
      upTo = await lane.outside((client) => deliveredUpTo(client, this.queueId));
    } catch (err) {
      await this.peers.peerDown(peer, err);
      return;
    }
    const entries: PendingEntry[] = [];
    const failures: ApplyFailure[] = [];
    const assigned = new Map<string, Map<string, string>>();
    const plans = new Map<string, ColumnPlan>();
    const done: PendingEntry[] = [];
    const current = await this.currentRows(rows.filter((r) => r.op.refetch && BigInt(r.id) > upTo && !r.op.applied).map((r) => r.op));
    for (const row of rows) {
      if (row.op.refetch) {
        // an operation whose change lacked values: the source copy's values of now, or nothing if it is gone
        const now = current.get(`${row.op.form}\u0000${row.op.requestId}`);
        row.op = now ? { ...row.op, row: now, refetch: undefined } : { ...row.op, applied: true };
      }
      const entry = this.queued.entryOf(row);
      entries.push(entry);
      if (BigInt(row.id) <= upTo || entry.op.applied) {
        done.push(entry);
        continue;
      }
      const refused = this.queued.rebuild(entry, buffer, assigned, plans);
      if (refused) failures.push(refused);
    }
    buffer.submitAll();
    try {
      await lane.settle();
    } catch (err) {
      await this.peers.peerDown(peer, err);
      return;
    }
    for (const f of lane.takeFailures()) failures.push(f);
    const failed = new Set(failures.map((f) => changeKey(f.type, f.mapping.name, f.requestId, f.lsn)));
    const failedIds = entries.filter((e) => failed.has(entryKey(e))).map((e) => e.id!);
    const source = state.source;
    state.assertHeld();
    if (failures.length) {
      await source.runAlone(async (client) => {
        await recordErrors(client, failures);
        await dequeue(client, failedIds);
      });
      for (const f of failures) log.warn({ mapping: f.mapping.name, type: f.type, requestId: f.requestId, sqlstate: f.sqlstate }, f.error);
    }
    const lastId = rows[rows.length - 1]!.id;
    if (lane.dirty) {
      state.assertHeld();
      await lane.commitWith((client) => markDelivered(client, this.queueId, server, lastId));
      await this.peers.peerHealthy(peer);
    }
    const delivered = entries.filter((e) => !failed.has(entryKey(e)));
    const { forms } = this.topology;
    state.assertHeld();
    await source.runAlone(async (client) => {
      const bookkeeping = new LaneBuffer<never>(source, chunkRows, true);
      for (const entry of delivered) {
        const { op } = entry;
        const form = forms.get(op.form);
        if (!op.bookkeeping || !form) continue;
        stageBookkeeping(
          bookkeeping,
          { op: op.bookkeeping.op },
          entry.mapping,
          form,
          op.requestId,
          parseLsn(op.lsn),
          true,
          op.bookkeeping.seen,
          assigned,
        );
      }
      await markStatus(
        client,
        failures.filter((f) => forms.has(`${f.source.schema}.${f.source.table}`)),
        'failure',
      );
      for (const group of bookkeeping.pendingGroups()) await group.execute(client);
      await dequeue(
        client,
        delivered.map((e) => e.id!),
      );
    });
    stats.delivered += delivered.length;
    stats.failed += failures.length;
    if (failures.some(catalogChanged)) await this.peers.refreshPeers([peer.name]);
    const keys = new Map(
      rows.map((r) => [
        requestKey(this.queued.entryOf(r).targetForm, r.op.targetKey),
        [this.queued.entryOf(r).targetForm, r.op.targetKey] as [string, string],
      ]),
    );
    const still = await stillQueued(state.control, peer.name, [...keys.values()]);
    for (const key of keys.keys()) if (!still.has(key)) peer.queued.delete(key);
    log.debug(
      { peer: peer.name, delivered: delivered.length, failed: failures.length, left: peer.queued.size },
      'queued operations delivered',
    );
  }

  /** The current values (as text, canonical) of the source copies these operations act on, by form and request ID. */
  private async currentRows(ops: readonly QueuedOp[]): Promise<Map<string, TextRow>> {
    const found = new Map<string, TextRow>();
    const byForm = new Map<string, string[]>();
    for (const op of ops) {
      const ids = byForm.get(op.form);
      if (ids) ids.push(op.requestId);
      else byForm.set(op.form, [op.requestId]);
    }
    const asText = { getTypeParser: () => (value: string) => value };
    for (const [formKey, ids] of byForm) {
      const form = this.topology.forms.get(formKey);
      if (!form) continue;
      const res = await this.state.source.outside((client) =>
        client.query({
          text:
            `SELECT * FROM ${qualified(form.schema, form.table)} ` +
            `WHERE ${quoteIdent(form.keyColumn)} = ANY ($1::text[]::${form.keyType}[])`,
          values: [ids],
          types: asText,
        } as pg.QueryConfig),
      );
      for (const row of res.rows as TextRow[]) found.set(`${formKey}\u0000${row[form.keyColumn]}`, row);
    }
    return found;
  }
}
