// One engine session: it takes the server's `dso` lock on the control connection, opens the
// lanes (the source's and the peers'), and streams the slot into itself as the ChangeSink: each
// change meets the filters indexed for it and the chain it belongs to, each transaction's end
// may end the batch (flush) or deliver the queue. A failure ends the session, and so does the
// loss of the control connection (the lock goes with it); the server's engine starts a new one.
import type { Logger } from 'pino';
import type { Relation, RowChange, TxBegin, TxCommit } from '../change.ts';
import type { ChangeSink } from '../decoder/stream.ts';
import { ReplicationStream } from '../decoder/stream.ts';
import { buildFacts } from '../rules/facts.ts';
import { ApplyLane } from '../applier/lane.ts';
import { LaneBuffer } from '../applier/buffer.ts';
import { ensureSlot } from '../sql/slot.ts';
import { formatLsn } from '../change.ts';
import { originName, slotName, writerOfOrigin } from '../sql/identifiers.ts';
import { DsoActions } from '../dso/actions.ts';
import { Chain } from '../dso/chain.ts';
import { Refusals } from '../dso/refusals.ts';
import { SCAN_PREFIX } from '../scan/message.ts';
import { Delivery } from '../queue/delivery.ts';
import { QueuedOperations } from '../queue/rebuild.ts';
import { Batch } from './batch.ts';
import { Checkpoint } from './checkpoint.ts';
import { SourceTail } from './source-tail.ts';
import { ControlConnection } from './control.ts';
import { freeSlot } from '../sql/fencing.ts';
import { GroupOperations } from './operations.ts';
import { Peers } from './peers.ts';
import { Router } from './router.ts';
import { ScannedRequests } from './scanned.ts';
import { SessionState } from './state.ts';
import { Timers } from './timers.ts';
import { Topology } from './topology.ts';
import type { ChangeContext, EngineOptions, EngineStats, OpenTransaction, PeerDown } from './types.ts';

export class EngineSession implements ChangeSink {
  /** true while the replication stream runs */
  streaming = false;
  private readonly state: SessionState;
  private readonly topology: Topology;
  private readonly peers: Peers;
  private readonly checkpoint: Checkpoint;
  private readonly batch: Batch;
  private readonly refusals: Refusals;
  private readonly chain: Chain;
  private readonly actions: DsoActions;
  private readonly delivery: Delivery;
  private readonly timers: Timers;
  private readonly scanned: ScannedRequests;
  private tx: OpenTransaction | null = null;

  constructor(opts: EngineOptions, log: Logger, stats: EngineStats, downPeers: Map<string, PeerDown>) {
    const state = new SessionState(opts, log, stats);
    this.state = state;
    const topology = new Topology(state);
    const groupOps = new GroupOperations();
    const peers = new Peers(state, topology, groupOps, downPeers);
    const checkpoint = new Checkpoint(state);
    // a failed source transaction: the stream's next turn ends the session (see idle)
    const sourceTail = new SourceTail(checkpoint, () => state.stream?.wake());
    const batch = new Batch(state, peers, sourceTail);
    const router = new Router(state, peers, batch, groupOps);
    const refusals = new Refusals(state, topology, batch);
    const chain = new Chain(state, topology, router, refusals);
    this.topology = topology;
    this.peers = peers;
    this.checkpoint = checkpoint;
    this.batch = batch;
    this.refusals = refusals;
    this.chain = chain;
    this.actions = new DsoActions(state, topology, batch, router, chain, refusals);
    this.delivery = new Delivery(state, topology, peers, new QueuedOperations(state, topology, groupOps));
    this.timers = new Timers(state, () => this.delivery.due());
    this.scanned = new ScannedRequests(state, topology, peers, this.actions);
  }

  async run(signal: AbortSignal): Promise<void> {
    const { state } = this;
    const control = new ControlConnection(state.connection, state.server, state.fence);
    state.controlConnection = control;
    // the lock is gone with the connection: stop at once (the flush and the delivery check it
    // before they commit), and let the server's engine start a session that takes it again
    control.whenLost(() => {
      this.timers.stop();
      void state.stream?.stop();
    });
    try {
      await this.serve(control, signal);
    } catch (err) {
      control.assertHeld(); // a lost control connection is the reason, whatever failed after it
      throw err;
    }
    control.assertHeld();
  }

  private async serve(control: ControlConnection, signal: AbortSignal): Promise<void> {
    const { state } = this;
    const { log } = state;
    await control.connect();
    const locked = await control.lockDso(signal, log);
    if (!locked) return;
    const client = control.client;
    await this.topology.describeForms(client);
    await this.openLanes();
    const slot = slotName(String(state.connection.database));
    if (await ensureSlot(client, slot)) {
      // forms enable creates the slot; one that is gone (dropped by hand) lost what happened meanwhile
      log.error(
        { slot },
        'the replication slot was missing and has been created: changes made to the forms of this server before now were not captured',
      );
    }
    // `pgdso pending retry` and `discard` tell a running engine to read the queue again
    client.on('notification', () => {
      this.delivery.reload();
      state.stream?.wake();
    });
    await client.query('LISTEN pgdso_pending');
    // started: an earlier stop on an error a DBA had to fix is over
    await client.query('DELETE FROM pgdso.servgrp_board WHERE server_name = $1 AND last_error IS NOT NULL', [state.server]);
    control.assertHeld(); // from here to the stream's start nothing waits: a loss later stops the stream
    // the owner frees the slot from a former owner's walsender (frozen, or cut off from here only)
    if (state.fence && (await freeSlot(client, slot))) log.info({ slot }, "a former owner's walsender was terminated");
    const applicationName = state.fence ? `pgdso decoder ${state.fence.instanceId}` : undefined;
    const stream = new ReplicationStream({ connection: state.connection, slot, log, applicationName });
    state.stream = stream;
    this.timers.start(client, slot);
    const onAbort = () => void stream.stop();
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      this.streaming = true;
      if (!signal.aborted) await stream.run(this);
    } finally {
      this.streaming = false;
      signal.removeEventListener('abort', onAbort);
    }
  }

  /**
   * The source lane, the links of every mapping of this server's forms, and a peer for every
   * neighbour (see Topology.linkMappings). A peer that cannot be reached now does not stop the
   * engine: its operations wait in the queue.
   */
  private async openLanes(): Promise<void> {
    const { state } = this;
    const { connection, server, log } = state;
    const database = String(connection.database);
    const sourceLane = new ApplyLane<never>({
      connection,
      origin: originName(server, '~source', database),
      name: `${server}/~source`,
      log,
      fence: state.fence,
    });
    state.sourceLane = sourceLane;
    await sourceLane.open();
    state.sourceBuffer = new LaneBuffer(sourceLane, state.chunkRows, true);
    this.topology.linkMappings();
    this.peers.addLinked();
    await this.delivery.load(state.control);
    await this.peers.connectDue();
  }

  // ---- ChangeSink -------------------------------------------------------------------------

  begin(tx: TxBegin & { origin: string | null }): void {
    this.tx = { finalLsn: tx.finalLsn, commitTime: tx.commitTime, writer: writerOfOrigin(tx.origin) };
  }

  change(change: RowChange): void | Promise<void> {
    const peers = this.topology.catalogsToRead(change.relation, () => [...this.peers.names()]);
    if (peers) return this.peers.refreshPlans(peers).then(() => this.handle(change));
    return this.handle(change);
  }

  truncate(relations: Relation[]): void {
    this.refusals.truncate(relations, this.tx);
  }

  private handle(change: RowChange): void | Promise<void> {
    const tx = this.tx;
    if (!tx) throw new Error('change outside a transaction');
    const { server, stats, opts, log } = this.state;
    stats.changes += 1;
    // The engine's own bookkeeping on this server (dso_* columns of source copies): no rule
    // fires on it, or every transfer would fire its filter again.
    const { schema, table } = change.relation;
    const formKey = `${schema}.${table}`;
    const form = this.topology.forms.get(formKey);
    if (tx.writer === server) {
      if (form) this.chain.written({ change, form });
      return;
    }
    if (!form) return;
    this.refusals.warnIdentity(change);
    const { rules } = opts;
    const filtered = rules.filtersFor(server, schema, table, change.op).length > 0;
    const chained = change.op !== 'insert' && this.topology.chainForms.has(formKey);
    if (!filtered && !chained) return;
    const ctx: ChangeContext = { change, form, tx, sentTo: new Set(), ownership: null, waits: [] };
    if (filtered) {
      const facts = buildFacts(change, tx.writer, rules.columnsFor(server, schema, table, change.op), this.topology.baseTypes);
      const fired = rules.evaluate(server, schema, table, facts, (err) =>
        log.warn({ filter: err.filter, lsn: formatLsn(change.lsn) }, err.message),
      );
      for (const { filter, actions } of fired) {
        for (const action of actions) this.actions.perform(action, filter, ctx, facts);
      }
    }
    if (chained) this.chain.keepInStep(ctx);
    if (ctx.waits.length === 0) return;
    return Promise.all(ctx.waits).then(() => undefined);
  }

  commit(commit: TxCommit): void | Promise<void> {
    this.tx = null;
    this.batch.last = commit;
    this.state.stats.transactions += 1;
    this.timers.activity();
    for (const peer of this.peers.values()) for (const buffer of peer.lanes.values()) buffer.endOfTransaction();
    if (this.batch.unflushed === 0) {
      this.batch.sourceTail.confirm(commit.endLsn);
      return this.deliverDue();
    }
    if (this.batch.unflushed >= this.state.batchRows) return this.batch.flush().then(() => this.deliverDue());
  }

  idle(): void | Promise<void> {
    if (this.tx !== null) return;
    this.batch.sourceTail.check();
    if (this.batch.unflushed > 0) return this.batch.flush();
    return this.deliverDue();
  }

  /**
   * The queue's delivery, when due: after the source transactions of the batches before it (the
   * peer's lane then never waits for them while it holds its locks).
   */
  private deliverDue(): void | Promise<void> {
    if (!this.delivery.due()) return;
    if (!this.batch.sourceTail.busy) return this.delivery.deliver();
    return this.batch.sourceTail.drain().then(() => this.delivery.deliver());
  }

  /**
   * A heartbeat in the source's WAL: with nothing in flight, the slot may move past it. A batch
   * of scanned requests (inside its transaction): their DSO operations, as a filter's.
   */
  message(prefix: string, content: Buffer, lsn: bigint): void | Promise<void> {
    if (prefix === SCAN_PREFIX && this.tx && this.tx.writer !== this.state.server) return this.scanned.handle(content, lsn, this.tx);
    if (prefix === 'pgdso.heartbeat' && this.caughtUp() && lsn > 0n) this.checkpoint.heartbeat(lsn);
  }

  caughtUp(): boolean {
    return this.batch.unflushed === 0 && this.tx === null && !this.batch.sourceTail.busy;
  }

  async close(): Promise<void> {
    this.timers.stop();
    // the source transaction under way commits (a failure was the session's end, or will replay)
    await this.batch.sourceTail.drain().catch(() => undefined);
    await this.state.stream?.stop();
    await this.peers.closeAll();
    await this.state.sourceLane?.close();
    await this.state.controlConnection?.end();
  }
}
