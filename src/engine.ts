// The composition root of one server's engine: decoder -> rules -> applier lanes.
//
// Per source transaction: each change meets only the filters indexed for its (server, form, op);
// each fired action becomes operations in apply lanes (one per target server and pool, each with
// its own replication origin). At a transaction boundary, when enough work is buffered or the
// stream is idle, the engine flushes: target lanes apply and commit (recording the source
// position), rows that could not be applied are recorded in the source's pending_errors, the
// source copies get their bookkeeping, and only then is the commit-end LSN confirmed.
// Any other failure ends the session: everything unconfirmed is replayed by a new one, and what
// a lane had committed is skipped by its progress (pgdso.apply_progress). Nothing is lost or
// applied twice.
import pg from 'pg';
import type { Logger } from 'pino';
import { setTimeout as delay } from 'node:timers/promises';
import type { ChangeSink } from './decoder/stream.ts';
import { ReplicationStream } from './decoder/stream.ts';
import type { Relation, RowChange, TextRow, TxBegin, TxCommit } from './change.ts';
import { formatLsn, parseLsn } from './change.ts';
import type { ActionConfig, MappingConfig, PgdsoConfig } from './config/types.ts';
import { toPgClientConfig } from './config/load.ts';
import type { CompiledRules } from './rules/index.ts';
import { buildFacts, type Facts } from './rules/facts.ts';
import { ApplyLane } from './applier/lane.ts';
import { LaneBuffer } from './applier/buffer.ts';
import { describeFormColumns, type FormCatalog } from './applier/catalog.ts';
import { buildColumnPlan, type ColumnPlan } from './applier/plan.ts';
import { TransferGroup } from './applier/transfer.ts';
import {
  SourceBookkeeping,
  countHops,
  markStatus,
  recordErrors,
  type CopyStatus,
  type Outcome,
  type SeenState,
} from './applier/bookkeeping.ts';
import {
  CopyDeleteGroup,
  CopyUpdateGroup,
  reversePlan,
  type CopyDelete,
  type CopyUpdate,
  type Link,
  type UpdateKind,
} from './applier/chain.ts';
import { changeKey, type ApplyFailure, type RequestGroup } from './applier/sets.ts';
import { classifyError, type ClassifiedError, type ErrorClass } from './applier/errors.ts';
import { missingFormGrants, refusalOf, type Refusal } from './sql/grants.ts';
import { withClient } from './sql/client.ts';
import os from 'node:os';
import { retryDelay } from './applier/schedule.ts';
import {
  recordAttempt,
  deliveredUpTo,
  dequeue,
  enqueue,
  markDelivered,
  nextQueued,
  opType,
  queueIdentity,
  queuedRequests,
  requestKey,
  stillQueued,
  supersedes,
  withOp,
  type PendingEntry,
  type QueuedOp,
} from './queue/sql.ts';
import { DSO_COLUMN_NAMES, describeForm, ensureSlot, type FormInfo } from './sql/forms.ts';
import { LOCK_NAMESPACE, LOCKS, originName, qualified, quoteIdent, slotName, writerOfOrigin } from './sql/identifiers.ts';
import { waitForOperationLock } from './groupboard/lock.ts';

export interface EngineOptions {
  config: PgdsoConfig;
  rules: CompiledRules;
  server: string;
  log: Logger;
  /** flush at the next transaction boundary once this many operations are buffered */
  batchRows?: number;
  /** rows per set-based statement */
  chunkRows?: number;
  /** reconnect backoff bounds, ms */
  backoff?: { minMs: number; maxMs: number };
  /** this instance on the server's board (default host-pid) */
  instanceId?: string;
}

export interface EngineStats {
  transactions: number;
  changes: number;
  applied: number;
  failed: number;
  /** operations written to pgdso.pending */
  queued: number;
  /** queued operations delivered */
  delivered: number;
  /** source transactions run again after a deadlock or serialization failure with the source's users */
  sourceRetries: number;
  /** heartbeat messages written into the source's WAL */
  heartbeats: number;
  confirmedLsn: string;
  sessions: number;
  /** the slot's lag and the WAL it holds, bytes, at the last check */
  slotLagBytes: number | null;
  retainedWalBytes: number | null;
  /** peers that cannot be reached now */
  peersDown: string[];
  /** set when the engine stopped on an error a DBA must fix */
  stoppedBy: Refusal | null;
}

/** Runs one server's engine until the signal aborts, reconnecting after failures. */
export class ServerEngine {
  readonly stats: EngineStats = {
    transactions: 0,
    changes: 0,
    applied: 0,
    failed: 0,
    queued: 0,
    delivered: 0,
    sourceRetries: 0,
    heartbeats: 0,
    confirmedLsn: '0/0',
    sessions: 0,
    slotLagBytes: null,
    retainedWalBytes: null,
    peersDown: [],
    stoppedBy: null,
  };
  readonly server: string;
  private readonly log: Logger;
  private session: EngineSession | null = null;
  /** peers that could not be reached, across sessions: a new session does not try them before their next attempt */
  private readonly downPeers = new Map<string, PeerDown>();

  constructor(private readonly opts: EngineOptions) {
    this.server = opts.server;
    this.log = opts.log.child({ server: opts.server });
  }

  /** True while a session streams the server's slot. */
  streaming(): boolean {
    return this.session?.streaming ?? false;
  }

  async run(signal: AbortSignal): Promise<void> {
    const { minMs, maxMs } = this.opts.backoff ?? { minMs: 200, maxMs: 30_000 };
    let wait = minMs;
    while (!signal.aborted) {
      const session = new EngineSession(this.opts, this.log, this.stats, this.downPeers);
      let replayNow = false;
      let refused: ClassifiedError | null = null;
      this.session = session;
      const started = Date.now();
      this.stats.sessions += 1;
      try {
        await session.run(signal);
      } catch (err) {
        if (signal.aborted) break;
        // a peer that failed mid-batch: expected, the batch goes again at once, the peer's operations to the queue
        replayNow = err instanceof PeerFailedMidBatch;
        const classified = classifyError(err);
        if (replayNow) this.log.info(classified.message);
        else if (classified.class === 'permanent') refused = classified;
        else
          this.log.warn(
            { sqlstate: classified.sqlstate, error: classified.message },
            'engine session failed; replaying from the confirmed position',
          );
      } finally {
        this.session = null;
        await session.close();
      }
      if (signal.aborted) break;
      // the server refuses the engine itself: retrying changes nothing until a DBA acts
      if (refused) return this.stopOn(refused);
      if (replayNow) continue;
      if (Date.now() - started > 60_000) wait = minMs;
      const jittered = wait / 2 + Math.random() * (wait / 2);
      await delay(jittered, undefined, { signal }).catch(() => {});
      wait = Math.min(maxMs, wait * 2);
    }
  }

  /**
   * Stops this server's engine on an error only a DBA can fix: one error-level line with the
   * statement to run, and the instance's row on the server's board says why (for `pgdso status`).
   */
  private async stopOn(classified: ClassifiedError): Promise<void> {
    const connection = toPgClientConfig(this.opts.config.servers[this.server]!.connection);
    const role = String(connection.user ?? process.env.PGUSER ?? 'pgdso');
    const refusal = refusalOf(classified.sqlstate, classified.message, role, String(connection.database)) ?? {
      missing: 'access',
      fix: classified.message,
    };
    this.stats.stoppedBy = refusal;
    this.log.error(
      { sqlstate: classified.sqlstate, error: classified.message, missing: refusal.missing, fix: refusal.fix },
      `the engine of ${this.server} stops: PostgreSQL refuses it ${refusal.missing}. Fix: ${refusal.fix} Then start pgdso run again.`,
    );
    await withClient(connection, (client) =>
      recordStop(client, this.server, this.instanceId, `${classified.sqlstate ?? ''} ${classified.message}`.trim(), refusal.fix),
    ).catch(() => undefined);
  }

  private get instanceId(): string {
    return this.opts.instanceId ?? `${os.hostname()}-${process.pid}`;
  }
}

/** Puts a stopped instance on the board with the error that stopped it. */
async function recordStop(client: pg.ClientBase, server: string, instanceId: string, error: string, fix: string): Promise<void> {
  await client.query(
    `INSERT INTO pgdso.servgrp_board (instance_id, server_name, host, pid, state, operations, last_seen_at, last_error, last_error_fix, last_error_at)
     VALUES ($1, $2, $3, $4, 'stopped', '{}', now(), $5, $6, now())
     ON CONFLICT (instance_id) DO UPDATE SET state = 'stopped', operations = '{}', last_seen_at = now(), last_error = $5, last_error_fix = $6, last_error_at = now()`,
    [instanceId, server, os.hostname(), process.pid, error, fix],
  );
}

interface OpenTransaction {
  finalLsn: bigint;
  commitTime: Date;
  /** the server whose engine wrote this transaction, or null for a user's */
  writer: string | null;
}

/** One decoded change on its way through the actions. */
interface ChangeContext {
  change: RowChange;
  form: FormInfo;
  tx: OpenTransaction;
  /** servers an action of this change already carried the request's values to */
  sentTo: Set<string>;
  /** the data+ownership mapping that already moved ownership in this change */
  ownership: string | null;
  /** backpressure: lanes to wait for before taking the next change */
  waits: Promise<void>[];
}

/** A mapping keeps the copies of its chain in step when its master's changes reach them at once. */
export function keptInStep(m: MappingConfig): boolean {
  return m.transferMode !== 'independent-copy' && m.whenToUpdate === 'immediately' && m.afterTransfer === 'keep';
}

/** A neighbour server: its apply lanes while it can be reached, and its share of the queue. */
interface Peer {
  name: string;
  /** apply lanes by pool; empty while the peer cannot be reached */
  lanes: Map<string, LaneBuffer<ApplyFailure>>;
  pools: string[];
  up: boolean;
  /** target copies (requestKey) with queued operations: their next operations queue behind */
  queued: Set<string>;
  /** this batch's operations for the queue, in order; index of each request's last one */
  batch: PendingEntry[];
  lastInBatch: Map<string, number>;
  /** each lane's committed source position, once known in this session */
  progress: Map<string, bigint>;
  attempts: number;
  downSince: number | null;
  nextAttemptAt: number;
  lastError: string | null;
  lastClass: ErrorClass | null;
}

/** A peer that could not be reached: its delivery attempts so far and the next one. */
type PeerDown = Pick<Peer, 'attempts' | 'downSince' | 'nextAttemptAt' | 'lastError' | 'lastClass'>;

/**
 * A peer's lane failed in the middle of a batch: the session ends and the batch is replayed
 * from the slot's confirmed position, its operations for that peer going to the queue.
 */
class PeerFailedMidBatch extends Error {}

/** A mapping used in one direction; its column plan once the neighbour's catalog was read. */
interface LinkRef {
  mapping: MappingConfig;
  forward: boolean;
  server: string;
  resolved: Link | null;
}

/** Where an operation goes: skipped (applied before: a replay), a lane, or the queue. */
type Route = { to: 'skip' } | { to: 'lane'; buffer: LaneBuffer<ApplyFailure> } | { to: 'queue'; peer: Peer; unsure: boolean };

class EngineSession implements ChangeSink {
  /** true while the replication stream runs */
  streaming = false;
  private readonly server: string;
  private readonly connection: pg.ClientConfig;
  private control: pg.Client | null = null;
  private stream: ReplicationStream | null = null;
  private sourceLane: ApplyLane<never> | null = null;
  private sourceBuffer: LaneBuffer<never> | null = null;
  private readonly peers = new Map<string, Peer>();
  /** each open or running group's operations (by changeKey): a row that fails is recorded with its operation, for a retry */
  private readonly groupOps = new WeakMap<object, Map<string, PendingEntry>>();
  private readonly pinned = new Map<string, LaneBuffer<ApplyFailure>>();
  private readonly forms = new Map<string, FormInfo>();
  /** forms with a mapping that keeps its chain in step (their updates and deletes are relayed) */
  private readonly chainForms = new Set<string>();
  private readonly catalogs = new Map<string, FormCatalog>();
  private readonly localCatalogs = new Map<string, FormCatalog>();
  /** `${mapping}>` forward (to its target), `${mapping}<` backward (to its source) */
  private readonly links = new Map<string, LinkRef>();
  private plans = new WeakMap<Relation, Map<string, ColumnPlan>>();
  /** target keys taken under new-id in this batch, per mapping */
  private readonly assigned = new Map<string, Map<string, string>>();
  private tx: OpenTransaction | null = null;
  private readonly hops = new Map<string, { finalLsn: bigint; template: [string, string] }>();
  /** each form's relation as last decoded, by OID: a new one with other columns means its table changed */
  private readonly relations = new Map<number, Relation>();
  /** relations of forms already reported as not replica identity full */
  private readonly warnedIdentity = new WeakSet<Relation>();
  /** (mapping, column, reason) already reported as not carried */
  private readonly warnedColumns = new Set<string>();
  /** a plan leaves out a source column the target lacks: the catalogs are read again now and then (backing off) */
  private missingColumns = false;
  private recheckAt = 0;
  private recheckEvery = CATALOG_RECHECK_MS;
  /** an id per column plan, in group keys: a group's rows all follow its plan */
  private readonly planIds = new WeakMap<ColumnPlan, number>();
  private nextPlanId = 0;
  /** domain type OID -> its base type's, for the facts */
  private baseTypes = new Map<number, number>();
  /** changes refused before reaching a lane (recorded in pending_errors at the next flush) */
  private rejected: ApplyFailure[] = [];
  /** source copies whose operation waits in the queue (status retry at the next flush) */
  private waiting: CopyStatus[] = [];
  private last: TxCommit | null = null;
  private unflushed = 0;
  private queueId = '';
  /** `pgdso pending retry` asked for the queue to be read again */
  private reloadQueue = false;
  private lastActivity = Date.now();
  private readonly timers: NodeJS.Timeout[] = [];
  private readonly batchRows: number;
  private readonly chunkRows: number;

  constructor(
    private readonly opts: EngineOptions,
    private readonly log: Logger,
    private readonly stats: EngineStats,
    private readonly downPeers: Map<string, PeerDown>,
  ) {
    this.server = opts.server;
    const server = opts.config.servers[opts.server];
    if (!server) throw new Error(`unknown server ${opts.server}`);
    this.connection = toPgClientConfig(server.connection);
    this.batchRows = opts.batchRows ?? 20_000;
    this.chunkRows = opts.chunkRows ?? 5_000;
  }

  async run(signal: AbortSignal): Promise<void> {
    const control = new pg.Client({ ...this.connection, application_name: 'pgdso control' });
    this.control = control;
    control.on('error', () => {});
    await control.connect();
    const locked = await waitForOperationLock(control, 'dso', signal, 1000, () =>
      this.log.info('another instance runs the dso operation of this server; waiting'),
    );
    if (!locked) return;
    for (const { schema, table } of this.opts.rules.formsOf(this.server)) {
      this.forms.set(`${schema}.${table}`, await describeForm(control, schema, table));
    }
    this.baseTypes = await domainBaseTypes(control);
    await this.openLanes(control);
    const slot = slotName(String(this.connection.database));
    if (await ensureSlot(control, slot)) {
      // forms enable creates the slot; one that is gone (dropped by hand) lost what happened meanwhile
      this.log.error(
        { slot },
        'the replication slot was missing and has been created: changes made to the forms of this server before now were not captured',
      );
    }
    // `pgdso pending retry` and `discard` tell a running engine to read the queue again
    control.on('notification', () => {
      this.reloadQueue = true;
      this.stream?.wake();
    });
    await control.query('LISTEN pgdso_pending');
    // started: an earlier stop on an error a DBA had to fix is over
    await control.query('DELETE FROM pgdso.servgrp_board WHERE server_name = $1 AND last_error IS NOT NULL', [this.server]);
    const stream = new ReplicationStream({ connection: this.connection, slot, log: this.log });
    this.stream = stream;
    this.startTimers(control, slot);
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
   * Timers beside the stream: a peer's next delivery attempt wakes the stream (deliveries run
   * between transactions, with the stream paused); a quiet source gets a heartbeat message in
   * its WAL so its slot keeps moving; the slot's lag and retained WAL are checked.
   */
  private startTimers(control: pg.Client, slot: string): void {
    const { heartbeatMs, retainedWalWarnBytes } = this.opts.config.pending;
    const every = (ms: number, work: () => Promise<void> | void) => {
      const timer = setInterval(() => {
        Promise.resolve()
          .then(work)
          .catch((err) => this.log.debug({ err: errorText(err) }, 'background check failed'));
      }, ms);
      timer.unref();
      this.timers.push(timer);
    };
    every(250, () => {
      if (this.deliveryDue()) this.stream?.wake();
    });
    if (heartbeatMs > 0) {
      every(heartbeatMs, async () => {
        if (Date.now() - this.lastActivity < heartbeatMs) return;
        await control.query(`SELECT pg_logical_emit_message(false, 'pgdso.heartbeat', now()::text)`);
        this.stats.heartbeats += 1;
      });
    }
    let warnedAt = 0;
    const checkSlot = async () => {
      const res = await control.query(
        `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 AS lag, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8 AS retained
           FROM pg_replication_slots WHERE slot_name = $1`,
        [slot],
      );
      const row = res.rows[0] as { lag: number | null; retained: number | null } | undefined;
      this.stats.slotLagBytes = row?.lag ?? null;
      this.stats.retainedWalBytes = row?.retained ?? null;
      if (row?.retained != null && row.retained > retainedWalWarnBytes && Date.now() - warnedAt > 5 * 60_000) {
        warnedAt = Date.now();
        this.log.warn(
          { slot, retainedWalBytes: row.retained, thresholdBytes: retainedWalWarnBytes },
          'the replication slot holds more WAL than the threshold (pending.retainedWalWarnBytes): is the engine falling behind?',
        );
      }
    };
    every(Math.max(1000, Math.min(heartbeatMs || 10_000, 10_000)), checkSlot);
    void checkSlot().catch(() => {});
  }

  /**
   * The links of every mapping of this server's forms, in either direction (forward for the
   * mappings from this server: transfers, updates, deletes, the chain kept in step; backward
   * for the mappings to it: returns, the chain kept in step towards the request's origin), and
   * a peer for every neighbour. A peer that cannot be reached now does not stop the engine: its
   * operations wait in the queue.
   */
  private async openLanes(control: pg.Client): Promise<void> {
    const database = String(this.connection.database);
    const sourceLane = new ApplyLane<never>({
      connection: this.connection,
      origin: originName(this.server, '~source', database),
      name: `${this.server}/~source`,
      log: this.log,
    });
    this.sourceLane = sourceLane;
    await sourceLane.open();
    this.sourceBuffer = new LaneBuffer(sourceLane, this.chunkRows, true);
    const peerOf = (name: string) => {
      let peer = this.peers.get(name);
      if (!peer) {
        const down = this.downPeers.get(name);
        peer = {
          name,
          lanes: new Map(),
          pools: [],
          up: false,
          queued: new Set(),
          batch: [],
          lastInBatch: new Map(),
          progress: new Map(),
          attempts: 0,
          downSince: null,
          nextAttemptAt: 0,
          lastError: null,
          lastClass: null,
          ...down,
        };
        this.peers.set(name, peer);
      }
      return peer;
    };
    for (const mapping of Object.values(this.opts.config.mappings)) {
      for (const forward of [true, false]) {
        const here = forward ? mapping.from : mapping.to;
        const there = forward ? mapping.to : mapping.from;
        if (here.server !== this.server) continue;
        this.links.set(`${mapping.name}${forward ? '>' : '<'}`, { mapping, forward, server: there.server, resolved: null });
        if (keptInStep(mapping)) this.chainForms.add(`${here.schema}.${here.table}`);
        const peer = peerOf(there.server);
        if (!peer.pools.includes(mapping.pool)) peer.pools.push(mapping.pool);
      }
    }
    for (const peer of this.peers.values()) peer.pools.sort();
    this.queueId = await queueIdentity(control);
    for (const [server, keys] of await queuedRequests(control)) {
      const peer = this.peers.get(server);
      if (peer) peer.queued = keys;
      else
        this.log.warn(
          { server },
          'pgdso.pending holds operations for a server no mapping leads to any more: they stay there (pgdso pending list, discard)',
        );
    }
    const now = Date.now();
    for (const peer of this.peers.values()) {
      if (peer.nextAttemptAt <= now) await this.tryPeer(peer);
      else this.countDown(peer.name);
    }
  }

  private async localCatalog(ref: { schema: string; table: string }): Promise<FormCatalog> {
    const key = `${ref.schema}.${ref.table}`;
    let found = this.localCatalogs.get(key);
    if (!found) this.localCatalogs.set(key, (found = await describeFormColumns(this.control!, ref.schema, ref.table)));
    return found;
  }

  /** Connects a peer (false and the next attempt scheduled when it cannot be reached). */
  private async tryPeer(peer: Peer): Promise<boolean> {
    try {
      await this.connectPeer(peer);
      return true;
    } catch (err) {
      await this.peerDown(peer, err);
      return false;
    }
  }

  /**
   * Opens a lane per pool to the peer and reads its catalog for the column plans. Operations
   * queued while it was unknown whether a lane had applied them (a replay while the peer was
   * down) are settled first, by the lane's committed position, before the lane commits anything.
   */
  private async connectPeer(peer: Peer): Promise<void> {
    const target = this.opts.config.servers[peer.name]!;
    const connection = toPgClientConfig(target.connection);
    const database = String(connection.database);
    try {
      for (const pool of peer.pools) {
        const lane = new ApplyLane<ApplyFailure>({
          connection,
          origin: originName(this.server, pool, database),
          name: `${this.server}->${peer.name}/${pool}`,
          log: this.log,
          annotate: (group, failures) => withOps(failures, this.groupOps.get(group)),
        });
        const buffer = new LaneBuffer(lane, this.chunkRows);
        peer.lanes.set(pool, buffer);
        await lane.open();
        peer.progress.set(pool, lane.progress);
      }
      await this.resolveLinks(peer);
      await this.settleUnsure(peer);
    } catch (err) {
      await this.closePeerLanes(peer);
      throw err;
    }
    if (!peer.up && peer.attempts > 0)
      this.log.info(
        { peer: peer.name, attempts: peer.attempts, queued: peer.queued.size },
        'peer reachable again; delivering its queued operations',
      );
    peer.up = true;
    this.stats.peersDown = this.stats.peersDown.filter((n) => n !== peer.name);
    // a refusal (a privilege) is over only once the peer takes a write: until then its attempts
    // keep counting, so the retries back off and the error is said once
    if (peer.lastClass !== 'permanent') await this.peerHealthy(peer);
  }

  /** The peer took what was sent: its delivery attempts are over. */
  private async peerHealthy(peer: Peer): Promise<void> {
    if (peer.attempts === 0 && peer.downSince === null) return;
    await this.sourceLane!.runAlone((client) => recordAttempt(client, peer.name, null));
    this.downPeers.delete(peer.name);
    peer.attempts = 0;
    peer.downSince = null;
    peer.lastError = null;
    peer.lastClass = null;
    peer.nextAttemptAt = 0;
  }

  /**
   * Reads the peer's forms and builds the column plans of its links. Again after a change of
   * the peer's tables showed (a column missing, a type changed) and when `pgdso pending retry`
   * asks: the fix of a DBA is then what the engine writes against.
   */
  private async resolveLinks(peer: Peer): Promise<void> {
    // a connection of its own: a lane may be in the middle of a transaction (or a failed one)
    const connection = toPgClientConfig(this.opts.config.servers[peer.name]!.connection);
    const resolved = new Map<LinkRef, Link>();
    await withClient({ ...connection, application_name: 'pgdso catalog' }, async (client) => {
      for (const ref of this.links.values()) {
        if (ref.server !== peer.name) continue;
        const { mapping } = ref;
        if (ref.forward) {
          const targetCatalog = await describeFormColumns(client, mapping.to.schema, mapping.to.table);
          this.catalogs.set(mapping.name, targetCatalog);
          const source = await this.localCatalog(mapping.from);
          const plan = buildColumnPlan(mapping, [...source.columns.keys()], source.keyColumn, targetCatalog);
          this.noteNotCarried(plan);
          resolved.set(ref, { mapping, forward: true, server: peer.name, plan });
        } else {
          const source = await describeFormColumns(client, mapping.from.schema, mapping.from.table);
          const forward = buildColumnPlan(mapping, [...source.columns.keys()], source.keyColumn, await this.localCatalog(mapping.to));
          resolved.set(ref, { mapping, forward: false, server: peer.name, plan: reversePlan(forward, source) });
        }
      }
    });
    this.plans = new WeakMap();
    for (const [ref, link] of resolved) ref.resolved = link;
  }

  /** Reads the catalogs of reachable peers again (a failed plan takes the peer down until its next attempt). */
  private async refreshPeers(names: Iterable<string>): Promise<void> {
    for (const name of new Set(names)) {
      const peer = this.peers.get(name);
      if (!peer?.up) continue;
      try {
        await this.resolveLinks(peer);
        this.log.info({ peer: name }, "the peer's forms were read again");
      } catch (err) {
        await this.peerDown(peer, err);
      }
    }
  }

  /** Queued operations that a lane may have applied before: applied ones are marked for bookkeeping only. */
  private async settleUnsure(peer: Peer): Promise<void> {
    await this.sourceLane!.runAlone(async (client) => {
      for (const [pool, progress] of peer.progress) {
        await client.query(
          `UPDATE pgdso.pending SET payload = (payload - 'unsure') || CASE WHEN (payload -> 'unsure' ->> 'finalLsn')::pg_lsn <= $3::pg_lsn THEN '{"applied": true}'::jsonb ELSE '{}'::jsonb END
            WHERE target_server = $1 AND pool = $2 AND payload ? 'unsure'`,
          [peer.name, pool, formatLsn(progress)],
        );
      }
    });
  }

  private async closePeerLanes(peer: Peer): Promise<void> {
    const lanes = [...peer.lanes.values()];
    peer.lanes.clear();
    await Promise.all(lanes.map((b) => b.lane.close()));
  }

  /** Counts a peer among those that cannot be reached (stats, metrics). */
  private countDown(name: string): void {
    if (!this.stats.peersDown.includes(name)) this.stats.peersDown = [...this.stats.peersDown, name];
  }

  /** The peer cannot be reached: its lanes close, its operations queue until the next attempt. */
  private async peerDown(peer: Peer, err: unknown): Promise<void> {
    await this.closePeerLanes(peer);
    const classified = classifyError(err);
    const now = Date.now();
    peer.up = false;
    peer.attempts += 1;
    peer.downSince ??= now;
    const previousError = peer.lastError;
    peer.lastError = classified.message;
    peer.lastClass = classified.class;
    const wait = retryDelay(this.opts.config.pending.retry, peer.attempts, now - peer.downSince);
    peer.nextAttemptAt = now + wait;
    this.downPeers.set(peer.name, {
      attempts: peer.attempts,
      downSince: peer.downSince,
      nextAttemptAt: peer.nextAttemptAt,
      lastError: peer.lastError,
      lastClass: peer.lastClass,
    });
    this.countDown(peer.name);
    const fields = {
      peer: peer.name,
      attempts: peer.attempts,
      retryInMs: Math.round(wait),
      sqlstate: classified.sqlstate,
      class: classified.class,
      error: classified.message,
    };
    const repeated = previousError === classified.message;
    if (classified.class === 'permanent') {
      // said once at error level, with what to run; the attempts go on quietly (and at once on `pgdso pending retry --queued`)
      const connection = toPgClientConfig(this.opts.config.servers[peer.name]!.connection);
      const refusal = repeated
        ? null
        : refusalOf(classified.sqlstate, classified.message, String(connection.user ?? 'pgdso'), String(connection.database));
      if (refusal && /permission denied for (table|schema)/.test(classified.message)) {
        // the exact grants, from the peer's own privilege functions (best effort)
        const forms = [...this.links.values()]
          .filter((r) => r.server === peer.name)
          .map((r) => (r.forward ? r.mapping.to : r.mapping.from));
        const grants = await withClient({ ...connection, application_name: 'pgdso privileges' }, (client) =>
          missingFormGrants(client, forms),
        ).catch(() => []);
        if (grants.length) refusal.fix = grants.join(' ');
      }
      if (repeated) this.log.debug(fields, 'peer still refuses the engine');
      else
        this.log.error(
          { ...fields, fix: refusal?.fix },
          `peer ${peer.name} refuses the engine${refusal ? ` (${refusal.missing}); fix: ${refusal.fix}` : ''}: its operations wait in pgdso.pending until that is fixed`,
        );
    } else if (repeated) this.log.debug(fields, 'peer still cannot be reached');
    else this.log.warn(fields, 'peer cannot be reached: its operations wait in pgdso.pending');
    if (this.sourceLane) {
      const attempt = {
        attempts: peer.attempts,
        downSince: new Date(peer.downSince),
        nextAttemptAt: new Date(peer.nextAttemptAt),
        error: classified.message,
      };
      await this.sourceLane.runAlone((client) => recordAttempt(client, peer.name, attempt));
    }
  }

  /**
   * Where an operation on a target copy goes. Skipped when already applied (a replay: the
   * source lane or the peer's lane committed its transaction); queued when the peer cannot be
   * reached or the request already has queued operations; else the lane of its pool.
   */
  private route(server: string, pool: string, table: string, targetKey: string, finalLsn: bigint): Route {
    if (this.sourceLane!.applied(finalLsn)) return { to: 'skip' };
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
    const pin = `${peer.name}\u0000${table}\u0000${key}`;
    const pinned = this.pinned.get(pin);
    if (pinned) return pinned;
    this.pinned.set(pin, buffer);
    return buffer;
  }

  /** Sends an operation where its route says. */
  private dispatch(ctx: ChangeContext, route: Route, entry: PendingEntry, add: (buffer: LaneBuffer<ApplyFailure>) => string): Route['to'] {
    if (route.to === 'skip') return 'skip';
    if (route.to === 'queue') {
      if (route.unsure) entry.op = { ...entry.op, unsure: { pool: entry.mapping.pool, finalLsn: formatLsn(ctx.tx.finalLsn) } } as QueuedOp;
      this.queue(route.peer, entry);
      const bk = entry.op.bookkeeping;
      if (bk) this.waiting.push({ source: ctx.form, type: bk.op, requestId: entry.op.requestId });
      return 'queue';
    }
    const { buffer } = route;
    this.added(buffer, add(buffer), entry);
    this.unflushed += 1;
    if (buffer.lane.backlog > 2) ctx.waits.push(buffer.lane.drainTo(1));
    return 'lane';
  }

  /**
   * The operation just added to the open group `groupKey` is noted on that group (a row that
   * fails is recorded with its operation, see the lanes' `annotate`); the group goes if full.
   */
  private added(buffer: LaneBuffer<ApplyFailure>, groupKey: string, entry: PendingEntry): void {
    const group = buffer.openGroup(groupKey)!;
    let ops = this.groupOps.get(group);
    if (!ops) this.groupOps.set(group, (ops = new Map()));
    ops.set(entryKey(entry), entry);
    buffer.added(groupKey);
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
    this.unflushed += 1;
  }

  private entry(link: LinkRef, op: Omit<QueuedOp, 'link' | 'lsn'>, lsn: bigint): PendingEntry {
    const there = link.forward ? link.mapping.to : link.mapping.from;
    const full: QueuedOp = { ...op, link: `${link.mapping.name}${link.forward ? '>' : '<'}`, lsn: formatLsn(lsn) };
    return { op: full, type: opType(full), mapping: link.mapping, targetServer: link.server, targetForm: `${there.schema}.${there.table}` };
  }
  /** The source copy's side of an operation that went to a lane or was applied before; a queued one carries its own. */
  private bookkeeping(
    ctx: ChangeContext,
    outcome: Outcome,
    mapping: MappingConfig,
    requestId: string,
    sent: Route['to'],
    row: TextRow,
  ): void {
    const source = this.sourceBuffer!;
    if (sent === 'queue' || source.lane.applied(ctx.tx.finalLsn)) return;
    const { form } = ctx;
    stageBookkeeping(source, outcome, mapping, form, requestId, ctx.change.lsn, sent === 'lane', seenOf(row), this.assigned);
    this.unflushed += 1;
  }

  private reject(
    ctx: ChangeContext,
    type: ApplyFailure['type'],
    mapping: MappingConfig,
    requestId: string,
    targetServer: string,
    error: string,
    payload: Record<string, unknown>,
  ): void {
    this.rejected.push({ type, mapping, source: ctx.form, targetServer, requestId, lsn: ctx.change.lsn, sqlstate: null, payload, error });
    this.unflushed += 1;
  }

  // ---- ChangeSink -------------------------------------------------------------------------

  begin(tx: TxBegin & { origin: string | null }): void {
    this.tx = { finalLsn: tx.finalLsn, commitTime: tx.commitTime, writer: writerOfOrigin(tx.origin) };
  }

  change(change: RowChange): void | Promise<void> {
    const { relation } = change;
    const seen = this.relations.get(relation.oid);
    if (seen !== relation) {
      this.relations.set(relation.oid, relation);
      const before = seen
        ? seen.columns.map((c) => c.name)
        : this.localCatalogs.get(`${relation.schema}.${relation.table}`) && [
            ...this.localCatalogs.get(`${relation.schema}.${relation.table}`)!.columns.keys(),
          ];
      if (before && before.join(',') !== relation.columns.map((c) => c.name).join(',')) {
        return this.tableChanged(relation).then(() => this.handle(change));
      }
    }
    if (this.missingColumns && Date.now() >= this.recheckAt) {
      this.missingColumns = false; // set again by the plans if the column is still missing
      this.recheckAt = Date.now() + this.recheckEvery;
      this.recheckEvery = Math.min(this.recheckEvery * 2, CATALOG_RECHECK_MAX_MS);
      return this.refreshPlans([...this.peers.keys()]).then(() => this.handle(change));
    }
    return this.handle(change);
  }

  /**
   * A form of this server changed (a column added, dropped, renamed): its catalog and the
   * catalogs of the peers its mappings lead to are read again, so a column added on both sides
   * is carried from the next change on.
   */
  private async tableChanged(relation: Relation): Promise<void> {
    const formKey = `${relation.schema}.${relation.table}`;
    if (!this.forms.has(formKey)) return;
    this.localCatalogs.delete(formKey);
    this.recheckEvery = CATALOG_RECHECK_MS;
    const servers = [...this.links.values()]
      .filter((ref) => {
        const here = ref.forward ? ref.mapping.from : ref.mapping.to;
        return `${here.schema}.${here.table}` === formKey;
      })
      .map((ref) => ref.server);
    this.log.info(
      { form: formKey, peers: [...new Set(servers)] },
      `form ${formKey} changed on ${this.server}: its mappings' forms are read again`,
    );
    await this.refreshPlans(servers);
  }

  /**
   * Reads the catalogs of reachable peers again in the middle of a batch. Groups already open keep
   * the plan they were built with (plan ids in group keys); a peer that cannot be read keeps its
   * plans (its lane reports the failure at the flush).
   */
  private async refreshPlans(names: Iterable<string>): Promise<void> {
    for (const name of new Set(names)) {
      const peer = this.peers.get(name);
      if (!peer?.up) continue;
      try {
        await this.resolveLinks(peer);
      } catch (err) {
        this.log.warn({ peer: name, error: errorText(err) }, "the peer's forms could not be read again; the plans of before stay");
      }
    }
  }

  /** Columns a mapping carries whose values the change lacks (unchanged TOAST values without replica identity full). */
  private unchangedColumns(change: RowChange, link: LinkRef): string[] | null {
    if (change.op !== 'update' || change.relation.replicaIdentity === 'full' || !change.new) return null;
    const { fields } = link.mapping;
    const mapped = link.forward ? Object.values(fields.map) : Object.keys(fields.map);
    const missing: string[] = [];
    for (const { name } of change.relation.columns) {
      if (change.new[name] !== undefined) continue;
      const carried =
        name === 'dso_mapping_history' ||
        (!DSO_COLUMN_NAMES.has(name) && ((fields.byName && !(link.forward && fields.exclude.includes(name))) || mapped.includes(name)));
      if (carried) missing.push(name);
    }
    return missing.length ? missing : null;
  }

  /**
   * An operation whose change arrived without some of its values: recorded in pending_errors
   * (the source copy gets `failure`), and a retry sends the request's current values instead.
   */
  private refuseIncomplete(ctx: ChangeContext, entry: PendingEntry, missing: string[]): void {
    const { relation } = ctx.change;
    const formKey = `${ctx.form.schema}.${ctx.form.table}`;
    const op: QueuedOp = { ...entry.op, refetch: true };
    this.rejected.push({
      type: entry.type,
      mapping: entry.mapping,
      source: ctx.form,
      targetServer: entry.targetServer,
      requestId: op.requestId,
      lsn: ctx.change.lsn,
      sqlstate: null,
      payload: { op, targetForm: entry.targetForm, targetKey: op.targetKey, missing },
      error:
        `mapping "${entry.mapping.name}": ${entry.type} of request ${op.requestId} to ${entry.targetServer}: the change arrived without the values of ${missing.join(', ')} (large values left unchanged are not sent: ${formKey} is REPLICA IDENTITY ${relation.replicaIdentity.toUpperCase()}, not FULL). ` +
        `Run ALTER TABLE ${qualified(ctx.form.schema, ctx.form.table)} REPLICA IDENTITY FULL (or pgdso forms enable --server ${this.server} --form ${formKey}), then pgdso pending retry --server ${this.server} --all: the retry sends the request's current values`,
    });
    this.unflushed += 1;
  }

  /**
   * A TRUNCATE of a form (the guard refuses it while the form holds linked copies): what it
   * removed has copies elsewhere that pgdso does not delete; recorded in pending_errors.
   */
  truncate(relations: Relation[]): void {
    const tx = this.tx;
    if (!tx || tx.writer === this.server) return;
    for (const relation of relations) {
      const formKey = `${relation.schema}.${relation.table}`;
      const form = this.forms.get(formKey);
      if (!form) continue;
      const servers = new Map<string, MappingConfig>();
      for (const ref of this.links.values()) {
        const here = ref.forward ? ref.mapping.from : ref.mapping.to;
        if (`${here.schema}.${here.table}` === formKey && !servers.has(ref.server)) servers.set(ref.server, ref.mapping);
      }
      for (const [server, mapping] of servers) {
        const error = `TRUNCATE of ${formKey} on ${this.server}: pgdso does not carry TRUNCATE; copies of its requests on ${server} (mapping "${mapping.name}") were not deleted. Delete them there by hand if they should go; next time DELETE the rows (pgdso carries deletes) or run pgdso forms disable first`;
        this.rejected.push({
          type: 'delete',
          mapping,
          source: form,
          targetServer: server,
          requestId: '*',
          lsn: tx.finalLsn,
          sqlstate: null,
          payload: { truncate: formKey },
          error,
          noStatus: true,
        });
        this.unflushed += 1;
      }
      if (servers.size)
        this.log.error(
          { form: formKey, peers: [...servers.keys()] },
          `TRUNCATE of ${formKey}: its copies on ${[...servers.keys()].join(', ')} were not deleted (recorded in pgdso.pending_errors)`,
        );
    }
  }

  private handle(change: RowChange): void | Promise<void> {
    const tx = this.tx;
    if (!tx) throw new Error('change outside a transaction');
    this.stats.changes += 1;
    // The engine's own bookkeeping on this server (dso_* columns of source copies): no rule
    // fires on it, or every transfer would fire its filter again.
    if (tx.writer === this.server) return;
    const { schema, table } = change.relation;
    const formKey = `${schema}.${table}`;
    const form = this.forms.get(formKey);
    if (!form) return;
    if (change.relation.replicaIdentity !== 'full' && !this.warnedIdentity.has(change.relation)) {
      this.warnedIdentity.add(change.relation);
      this.log.error(
        { form: formKey, replicaIdentity: change.relation.replicaIdentity, lsn: formatLsn(change.lsn) },
        `form ${formKey} is REPLICA IDENTITY ${change.relation.replicaIdentity.toUpperCase()}, not FULL: its updates that leave a large value unchanged, and its deletes, arrive incomplete and go to pgdso.pending_errors. ` +
          `Run ALTER TABLE ${qualified(schema, table)} REPLICA IDENTITY FULL (or pgdso forms enable --server ${this.server} --form ${formKey}), then pgdso pending retry --server ${this.server} --all`,
      );
    }
    const { rules } = this.opts;
    const filtered = rules.filtersFor(this.server, schema, table, change.op).length > 0;
    const chained = change.op !== 'insert' && this.chainForms.has(formKey);
    if (!filtered && !chained) return;
    const ctx: ChangeContext = { change, form, tx, sentTo: new Set(), ownership: null, waits: [] };
    if (filtered) {
      const facts = buildFacts(change, tx.writer, rules.columnsFor(this.server, schema, table, change.op), this.baseTypes);
      const fired = rules.evaluate(this.server, schema, table, facts, (err) =>
        this.log.warn({ filter: err.filter, lsn: formatLsn(change.lsn) }, err.message),
      );
      for (const { filter, actions } of fired) {
        for (const action of actions) this.perform(action, filter, ctx, facts);
      }
    }
    if (chained) this.keepInStep(ctx);
    if (ctx.waits.length === 0) return;
    return Promise.all(ctx.waits).then(() => undefined);
  }

  commit(commit: TxCommit): void | Promise<void> {
    this.tx = null;
    this.last = commit;
    this.stats.transactions += 1;
    this.lastActivity = Date.now();
    if (this.unflushed === 0) {
      this.stream?.confirm(commit.endLsn);
      this.stats.confirmedLsn = formatLsn(commit.endLsn);
      if (this.deliveryDue()) return this.deliver();
      return;
    }
    if (this.unflushed >= this.batchRows) return this.flush().then(() => (this.deliveryDue() ? this.deliver() : undefined));
  }

  idle(): void | Promise<void> {
    if (this.tx !== null) return;
    if (this.unflushed > 0) return this.flush();
    if (this.deliveryDue()) return this.deliver();
  }

  /** A heartbeat in the source's WAL: with nothing in flight, the slot may move past it. */
  message(prefix: string, _content: Buffer, lsn: bigint): void {
    if (prefix === 'pgdso.heartbeat' && this.caughtUp() && lsn > 0n) this.stream?.confirm(lsn);
  }

  caughtUp(): boolean {
    return this.unflushed === 0 && this.tx === null;
  }

  // ---- actions ----------------------------------------------------------------------------

  private perform(action: ActionConfig, filter: string, ctx: ChangeContext, facts: Facts): void {
    const { mappings } = this.opts.config;
    switch (action.type) {
      case 'transfer':
        return this.transfer(mappings[action.mapping]!, action.overrideLoopDetection, filter, ctx, facts);
      case 'update':
        return this.update(mappings[action.mapping]!, filter, ctx, facts);
      case 'return':
        return this.return(action.mapping, action.overrideLoopDetection, filter, ctx, facts);
      case 'delete':
        return this.deleteCopy(mappings[action.mapping]!, ctx);
    }
  }

  /**
   * The new row and request ID of a change a master-only operation (transfer, update, return)
   * acts on; null (and a debug line) when it does not: a delete, or a copy that is not master.
   */
  private masterChange(ctx: ChangeContext, facts: Facts, filter: string, operation: string): { row: TextRow; requestId: string } | null {
    const row = ctx.change.new;
    if (ctx.change.op === 'delete' || !row) return null;
    const requestId = row[ctx.form.keyColumn];
    if (requestId === null || requestId === undefined) return null;
    if (!facts.master) {
      this.log.debug({ filter, requestId }, `not the master copy: no ${operation}`);
      return null;
    }
    return { row, requestId };
  }

  private transfer(mapping: MappingConfig, override: boolean, filter: string, ctx: ChangeContext, facts: Facts): void {
    const found = this.masterChange(ctx, facts, filter, 'transfer');
    if (!found) return;
    const { row, requestId } = found;
    const { change, form, tx } = ctx;
    const target = `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`;
    const historyText = row.dso_mapping_history ?? '[]';
    const visited = visitedServers(historyText);
    if (visited === null) {
      // a history edited into something else: no loop information, no chain to extend
      this.reject(
        ctx,
        'transfer',
        mapping,
        requestId,
        mapping.to.server,
        `mapping "${mapping.name}": request ${requestId}: dso_mapping_history is not a list of hops with fromServer and fromRequestId: ${historyText.slice(0, 200)}`,
        { target, history: historyText },
      );
      return;
    }
    if (!override && visited.has(mapping.to.server)) {
      this.log.debug({ filter, mapping: mapping.name, requestId }, 'loop detection: the request has been on the target server');
      return;
    }
    const owns = mapping.transferMode === 'data+ownership';
    if (owns && ctx.ownership !== null && ctx.ownership !== mapping.name) {
      // DSO: ownership cannot be broadcast; the first transfer with ownership took it
      this.reject(
        ctx,
        'transfer',
        mapping,
        requestId,
        mapping.to.server,
        `mapping "${mapping.name}": request ${requestId}: ownership cannot be broadcast: filter "${filter}" already transferred it with ownership by mapping "${ctx.ownership}" in the same change; use data-only or independent-copy for the other copies`,
        { target },
      );
      return;
    }
    if (owns) ctx.ownership = mapping.name;
    ctx.sentTo.add(mapping.to.server);
    const targetKey = targetKeyOf(row, mapping, requestId);
    const table = `${mapping.to.schema}.${mapping.to.table}`;
    const route = this.route(mapping.to.server, mapping.pool, table, targetKey, tx.finalLsn);
    let sent: Route['to'] = 'skip';
    if (route.to !== 'skip') {
      const [before, after] = this.hopTemplate(mapping, form, tx);
      const history = withHop(historyText, `${before}${JSON.stringify(requestId)}${after}`);
      const modifiedAt = row.dso_modified_at ?? null;
      const link = this.links.get(`${mapping.name}>`)!;
      const entry = this.entry(
        link,
        {
          group: 'transfer',
          form: `${form.schema}.${form.table}`,
          requestId,
          targetKey,
          history,
          row,
          modifiedAt,
          bookkeeping: { op: 'transfer', seen: seenOf(row) },
        },
        change.lsn,
      );
      const missing = this.unchangedColumns(change, link);
      if (missing) return this.refuseIncomplete(ctx, entry, missing);
      sent = this.dispatch(ctx, route, entry, (buffer) => {
        const plan = this.planFor(change.relation, mapping, form);
        const groupKey = `transfer:${mapping.name}:${this.planId(plan)}`;
        buffer
          .group(groupKey, table, targetKey, () => new TransferGroup(plan, form, this.assignedFor(mapping)))
          .addChange(
            { requestId, targetKey, values: valuesOf(plan, row, form), history, modifiedAt, lsn: change.lsn },
            change.op === 'insert',
          );
        return groupKey;
      });
    }
    this.bookkeeping(ctx, { op: 'transfer' }, mapping, requestId, sent, row);
    // the copies behind this one learn where the master is now
    if (owns) this.relay(ctx, row, 'from', { current: [mapping.to.server, mapping.to.table], values: false });
  }

  private assignedFor(mapping: MappingConfig): Map<string, string> {
    let found = this.assigned.get(mapping.name);
    if (!found) this.assigned.set(mapping.name, (found = new Map()));
    return found;
  }

  /** The update action: the master's current values to the copy on the mapping's target, now. */
  private update(mapping: MappingConfig, filter: string, ctx: ChangeContext, facts: Facts): void {
    const found = this.masterChange(ctx, facts, filter, 'update');
    if (!found) return;
    const { row, requestId } = found;
    const link = this.links.get(`${mapping.name}>`)!;
    ctx.sentTo.add(link.server);
    const sent = this.updateCopy(
      ctx,
      link,
      'update',
      true,
      row,
      {
        requestId,
        targetKey: targetKeyOf(row, mapping, requestId),
        history: row.dso_mapping_history ?? '[]',
        current: null,
        master: null,
        newHistory: null,
      },
      'update',
    );
    this.bookkeeping(ctx, { op: 'update' }, mapping, requestId, sent, row);
  }

  /**
   * The return action: ownership back to the server the request came from (by the mapping that
   * brought it, or the one named), with the current values unless the mapping never updates.
   * Loop detection: a request is not returned twice to the same server unless overridden.
   */
  private return(named: string | undefined, override: boolean, filter: string, ctx: ChangeContext, facts: Facts): void {
    const found = this.masterChange(ctx, facts, filter, 'return');
    if (!found) return;
    const { row, requestId } = found;
    const { form, tx } = ctx;
    const name = named ?? row.dso_from_mapping;
    const mapping = name ? this.opts.config.mappings[name] : undefined;
    const link = name ? this.links.get(`${name}<`) : undefined;
    const fromKey = row.dso_from_request_id;
    if (!mapping || !link || !fromKey || mapping.to.schema !== form.schema || mapping.to.table !== form.table) {
      const anyMapping =
        mapping ??
        Object.values(this.opts.config.mappings).find(
          (m) => m.to.server === this.server && m.to.schema === form.schema && m.to.table === form.table,
        );
      if (!anyMapping) throw new Error(`filter "${filter}": a return action on ${form.schema}.${form.table} without a mapping to it`); // refused by the config check
      this.reject(
        ctx,
        'return',
        anyMapping,
        requestId,
        row.dso_from_server ?? '(none)',
        `filter "${filter}": request ${requestId} has nowhere to return to: it was not transferred here${name ? ` by mapping "${name}"` : ''} (dso_from_mapping ${row.dso_from_mapping ?? 'is empty'})`,
        { from: { server: row.dso_from_server ?? null, requestId: fromKey ?? null, mapping: row.dso_from_mapping ?? null } },
      );
      return;
    }
    const historyText = row.dso_mapping_history ?? '[]';
    if (!override && returnedBefore(historyText, link.server)) {
      this.log.debug({ filter, mapping: mapping.name, requestId }, 'loop detection: the request was returned to that server before');
      return;
    }
    const hop = JSON.stringify({
      at: tx.commitTime.toISOString(),
      mapping: mapping.name,
      operation: 'return',
      fromServer: this.server,
      fromForm: form.table,
      fromRequestId: requestId,
      toServer: link.server,
      toForm: mapping.from.table,
    });
    const newHistory = withHop(historyText, hop);
    const current = [mapping.from.server, mapping.from.table] as const;
    ctx.sentTo.add(link.server);
    const withValues = mapping.whenToUpdate !== 'never';
    const sent = this.updateCopy(
      ctx,
      link,
      'return',
      withValues,
      row,
      { requestId, targetKey: fromKey, history: historyText, current, master: true, newHistory },
      'return',
    );
    this.bookkeeping(ctx, { op: 'return' }, mapping, requestId, sent, row);
    this.relay(ctx, row, 'to', { current, values: false });
  }

  /** The delete action: the copy on the mapping's target goes. */
  private deleteCopy(mapping: MappingConfig, ctx: ChangeContext): void {
    const row = ctx.change.op === 'delete' ? ctx.change.old : ctx.change.new;
    const requestId = row?.[ctx.form.keyColumn];
    if (!row || requestId === null || requestId === undefined) return;
    const link = this.links.get(`${mapping.name}>`)!;
    this.deleteOn(ctx, link, { requestId, targetKey: targetKeyOf(row, mapping, requestId), history: row.dso_mapping_history ?? '[]' });
  }

  /**
   * Keeps the chain in step: a change of the master copy (by a user, or relayed by a
   * neighbour's engine) goes to the copies linked to this one by mappings that update
   * immediately, except the neighbour it came from and any server an action already carried
   * it to; a deleted master deletes them.
   */
  private keepInStep(ctx: ChangeContext): void {
    const { change, tx } = ctx;
    const row = change.op === 'delete' ? change.old : change.new;
    if (!row) return;
    if (change.op === 'delete' && row.dso_master == null) return this.incompleteDelete(ctx, row); // dso_master is NOT NULL: the key alone came
    if (tx.writer === null && row.dso_master !== 't') return;
    for (const side of ['from', 'to'] as const) {
      if (change.op === 'delete') {
        const link = this.chainLink(ctx, row, side);
        const targetKey = row[`dso_${side}_request_id`];
        if (!link || !targetKey) continue;
        this.deleteOn(ctx, link, { requestId: row[ctx.form.keyColumn]!, targetKey, history: row.dso_mapping_history ?? '[]' });
      } else {
        this.relay(ctx, row, side, {
          current: row.dso_current_server && row.dso_current_form ? [row.dso_current_server, row.dso_current_form] : null,
          values: true,
        });
      }
    }
  }

  /**
   * A delete that arrived with the key alone (replica identity not full): which copies the row
   * had is unknown. Recorded in pending_errors for every server a kept-in-step mapping of the
   * form leads to, with what to do; nothing is deleted there.
   */
  private incompleteDelete(ctx: ChangeContext, row: TextRow): void {
    const formKey = `${ctx.form.schema}.${ctx.form.table}`;
    const requestId = row[ctx.form.keyColumn];
    if (requestId === null || requestId === undefined) return;
    const servers = new Map<string, MappingConfig>();
    for (const ref of this.links.values()) {
      const here = ref.forward ? ref.mapping.from : ref.mapping.to;
      if (keptInStep(ref.mapping) && `${here.schema}.${here.table}` === formKey && !servers.has(ref.server))
        servers.set(ref.server, ref.mapping);
    }
    for (const [server, mapping] of servers) {
      const error = `delete of request ${requestId} of ${formKey}: it arrived with its key alone (${formKey} is REPLICA IDENTITY ${ctx.change.relation.replicaIdentity.toUpperCase()}, not FULL), so pgdso cannot tell whether it had a copy on ${server} (mapping "${mapping.name}"): delete that copy there by hand if it has one, and run ALTER TABLE ${qualified(ctx.form.schema, ctx.form.table)} REPLICA IDENTITY FULL (or pgdso forms enable)`;
      this.rejected.push({
        type: 'delete',
        mapping,
        source: ctx.form,
        targetServer: server,
        requestId,
        lsn: ctx.change.lsn,
        sqlstate: null,
        payload: { key: requestId },
        error,
        noStatus: true,
      });
      this.unflushed += 1;
    }
  }

  /** The link on that side of the copy when it keeps the chain in step and is not where the change came from. */
  private chainLink(ctx: ChangeContext, row: TextRow, side: 'from' | 'to', evenToWriter = false): LinkRef | undefined {
    const name = row[`dso_${side}_mapping`];
    const mapping = name ? this.opts.config.mappings[name] : undefined;
    if (!mapping || !keptInStep(mapping)) return undefined;
    const here = side === 'to' ? mapping.from : mapping.to;
    if (here.server !== this.server || here.schema !== ctx.form.schema || here.table !== ctx.form.table) return undefined;
    const link = this.links.get(`${mapping.name}${side === 'to' ? '>' : '<'}`);
    if (!link || (!evenToWriter && link.server === ctx.tx.writer)) return undefined;
    return link;
  }

  /**
   * An update of the linked copy on that side: values and where the master is, or only where
   * the master is now (that news goes to the writer's server too: it does not know yet).
   */
  private relay(
    ctx: ChangeContext,
    row: TextRow,
    side: 'from' | 'to',
    what: { current: readonly [string, string] | null; values: boolean },
  ): void {
    const link = this.chainLink(ctx, row, side, !what.values);
    const targetKey = row[`dso_${side}_request_id`];
    const requestId = row[ctx.form.keyColumn];
    if (!link || !targetKey || !requestId || ctx.sentTo.has(link.server)) return;
    this.updateCopy(ctx, link, 'chain', what.values, row, {
      requestId,
      targetKey,
      history: row.dso_mapping_history ?? '[]',
      current: what.current,
      master: null,
      newHistory: null,
    });
  }

  /** An update of a copy on a link's server (values from the source row when it carries them). */
  private updateCopy(
    ctx: ChangeContext,
    link: LinkRef,
    kind: UpdateKind,
    withValues: boolean,
    row: TextRow,
    update: Omit<CopyUpdate, 'values' | 'lsn'>,
    bk?: 'update' | 'return',
  ): Route['to'] {
    const entry = this.entry(
      link,
      {
        group: 'copy-update',
        kind,
        withValues,
        form: `${ctx.form.schema}.${ctx.form.table}`,
        requestId: update.requestId,
        targetKey: update.targetKey,
        history: update.history,
        row: withValues ? row : null,
        current: update.current,
        master: update.master,
        newHistory: update.newHistory,
        ...(bk ? { bookkeeping: { op: bk, seen: seenOf(row) } } : {}),
      },
      ctx.change.lsn,
    );
    const missing = withValues ? this.unchangedColumns(ctx.change, link) : null;
    if (missing) {
      this.refuseIncomplete(ctx, entry, missing);
      return 'skip';
    }
    return this.onLink(ctx, link, entry, (resolved) => {
      const group = () => new CopyUpdateGroup(resolved, kind, withValues, ctx.form, this.server);
      return [
        `${kind}:${withValues}:${this.planId(resolved.plan)}`,
        group,
        { ...update, values: withValues ? valuesOf(resolved.plan, row, ctx.form) : [], lsn: ctx.change.lsn },
      ];
    });
  }

  private deleteOn(ctx: ChangeContext, link: LinkRef, del: Omit<CopyDelete, 'lsn'>): void {
    const entry = this.entry(
      link,
      {
        group: 'copy-delete',
        form: `${ctx.form.schema}.${ctx.form.table}`,
        requestId: del.requestId,
        targetKey: del.targetKey,
        history: del.history,
        row: null,
      },
      ctx.change.lsn,
    );
    this.onLink(ctx, link, entry, (resolved) => [
      'delete',
      () => new CopyDeleteGroup(resolved, ctx.form, this.server),
      { ...del, lsn: ctx.change.lsn },
    ]);
  }

  /** Sends an operation on a copy on a link's server: to its lane, or to the queue. */
  private onLink<R extends { requestId: string; targetKey: string }>(
    ctx: ChangeContext,
    link: LinkRef,
    entry: PendingEntry,
    build: (resolved: Link) => [string, () => RequestGroup<R>, R],
  ): Route['to'] {
    const route = this.route(link.server, link.mapping.pool, entry.targetForm, entry.op.targetKey, ctx.tx.finalLsn);
    return this.dispatch(ctx, route, entry, (buffer) => {
      const [kind, create, row] = build(link.resolved!);
      const groupKey = `${kind}:${link.mapping.name}${link.forward ? '>' : '<'}`; // kinds with values carry their plan's id
      buffer.group(groupKey, entry.targetForm, row.targetKey, create).add(row);
      return groupKey;
    });
  }

  /** The hop's JSON around its request ID, the same for every request of a mapping in a transaction. */
  private hopTemplate(mapping: MappingConfig, form: FormInfo, tx: OpenTransaction): [string, string] {
    const cached = this.hops.get(mapping.name);
    if (cached && cached.finalLsn === tx.finalLsn) return cached.template;
    const marker = '\u0000request\u0000';
    const json = JSON.stringify({
      at: tx.commitTime.toISOString(),
      mapping: mapping.name,
      transferMode: mapping.transferMode,
      fromServer: this.server,
      fromForm: form.table,
      fromRequestId: marker,
      toServer: mapping.to.server,
      toForm: mapping.to.table,
    });
    const at = json.indexOf(JSON.stringify(marker));
    const template: [string, string] = [json.slice(0, at), json.slice(at + JSON.stringify(marker).length)];
    this.hops.set(mapping.name, { finalLsn: tx.finalLsn, template });
    return template;
  }

  private planId(plan: ColumnPlan): number {
    let id = this.planIds.get(plan);
    if (id === undefined) this.planIds.set(plan, (id = this.nextPlanId++));
    return id;
  }

  /** Says once per mapping and column what byName leaves out: a generated target column, or one the target lacks. */
  private noteNotCarried(plan: ColumnPlan): void {
    const { mapping } = plan;
    for (const { column, reason } of plan.notCarried) {
      if (reason === 'missing' && !this.missingColumns) {
        this.missingColumns = true;
        this.recheckAt = Math.max(this.recheckAt, Date.now() + CATALOG_RECHECK_MS);
      }
      const key = `${mapping.name}\u0000${column}\u0000${reason}`;
      if (this.warnedColumns.has(key)) continue;
      this.warnedColumns.add(key);
      const target = `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`;
      if (reason === 'generated')
        this.log.info(
          { mapping: mapping.name, column },
          `mapping "${mapping.name}": column "${column}" is generated on ${target}: computed there, not written`,
        );
      else
        this.log.warn(
          { mapping: mapping.name, column },
          `mapping "${mapping.name}": column "${column}" of ${mapping.from.server}.${mapping.from.schema}.${mapping.from.table} is not on ${target}, so its values are not carried: add it there (pgdso reads the catalog again every ${CATALOG_RECHECK_MS / 1000} s at first, then less often) or list it in fields.exclude`,
        );
    }
  }

  private planFor(relation: Relation, mapping: MappingConfig, form: FormInfo): ColumnPlan {
    let byMapping = this.plans.get(relation);
    if (!byMapping) {
      byMapping = new Map();
      this.plans.set(relation, byMapping);
    }
    let plan = byMapping.get(mapping.name);
    if (!plan) {
      plan = buildColumnPlan(
        mapping,
        relation.columns.map((c) => c.name),
        form.keyColumn,
        this.catalogs.get(mapping.name)!,
      );
      byMapping.set(mapping.name, plan);
      this.noteNotCarried(plan);
    }
    return plan;
  }

  // ---- flush ------------------------------------------------------------------------------

  /**
   * Ends a batch. Lanes apply; a peer whose lane failed before its commit committed nothing of
   * the batch: it is down until its next attempt and the batch is replayed (its operations for
   * the peer then go to the queue). Rows that
   * could not be applied are recorded in pending_errors (before any target commits: a replay
   * must find them). The targets commit, then the source lane writes the queue's share, the
   * statuses and the bookkeeping with its progress, and only then is the batch confirmed.
   */
  private async flush(): Promise<void> {
    const last = this.last;
    if (!last) return;
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
      await this.peerDown(peer, failed);
      broken.push(peer.name);
    }
    if (broken.length)
      throw new PeerFailedMidBatch(
        `${broken.join(', ')} failed in the middle of a batch: the batch is replayed, its operations for ${broken.length > 1 ? 'them' : 'it'} queued`,
      );
    const lanes = peers.filter((p) => p.up).flatMap((p) => [...p.lanes.entries()].map(([pool, buffer]) => ({ peer: p, pool, buffer })));
    const failures = [...this.rejected, ...lanes.flatMap(({ buffer }) => buffer.lane.takeFailures())];
    this.rejected = [];
    const source = this.sourceLane!;
    if (failures.length) {
      await source.runAlone((client) => recordErrors(client, failures));
      for (const f of failures)
        this.log.warn({ mapping: f.mapping.name, type: f.type, requestId: f.requestId, sqlstate: f.sqlstate }, f.error);
    }
    // Targets commit first, then the source copies' bookkeeping: no transaction of this engine
    // stays open while it waits for another engine (two engines writing each other's rows would
    // wait for each other forever, unseen by PostgreSQL's deadlock detector). Meanwhile a target's
    // engine may already act on its new copy and write back (a return, a transfer back): the
    // bookkeeping leaves ownership alone on a copy another engine wrote since (SourceBookkeeping).
    await Promise.all(
      lanes
        .filter(({ buffer }) => buffer.lane.dirty)
        .map(async ({ peer, pool, buffer }) => {
          await buffer.lane.commit(last.finalLsn, last.commitTime);
          peer.progress.set(pool, buffer.lane.progress);
        }),
    );
    const dropped = new Set(failures.map((f) => changeKey(f.type, f.mapping.name, f.requestId, f.lsn)));
    for (const group of this.sourceBuffer!.pendingGroups()) if (group instanceof SourceBookkeeping) group.dropFailed(dropped);
    const queued = peers.filter((p) => p.batch.length > 0);
    const waiting = this.waiting;
    this.waiting = [];
    // One source transaction with the source's progress: the queue's share and the failures'
    // statuses, the bookkeeping, then the statuses of copies with an operation still waiting
    // (after the bookkeeping: they show it until delivered). Run again on a lock conflict.
    const bookkeeping = this.sourceBuffer!.takeAll();
    if (bookkeeping.length || queued.length || waiting.length || failures.length) {
      this.stats.sourceRetries += await source.transaction(last.finalLsn, last.commitTime, async (client) => {
        for (const peer of queued)
          await enqueue(client, peer.batch, {
            nextAttemptAt: new Date(Math.max(Date.now(), peer.nextAttemptAt)),
            lastError: peer.lastError,
          });
        await markStatus(
          client,
          failures.filter((f) => !f.noStatus),
          'failure',
        );
        for (const group of bookkeeping) await group.execute(client);
        await markStatus(client, waiting, 'retry');
      });
    }
    for (const peer of queued) {
      this.stats.queued += peer.batch.length;
      peer.batch = [];
      peer.lastInBatch.clear();
    }
    this.stats.applied += this.unflushed;
    this.stats.failed += failures.length;
    this.unflushed = 0;
    this.pinned.clear();
    for (const ids of this.assigned.values()) ids.clear();
    this.stream?.confirm(last.endLsn);
    this.stats.confirmedLsn = formatLsn(last.endLsn);
    for (const { peer, buffer } of lanes) if (buffer.lane.progress >= last.finalLsn) await this.peerHealthy(peer);
    await this.refreshPeers(failures.filter(catalogChanged).map((f) => f.targetServer));
  }

  // ---- the queue's delivery ---------------------------------------------------------------

  /** True when a peer's next attempt is due, or a reachable peer has queued operations. */
  private deliveryDue(): boolean {
    if (this.reloadQueue) return true;
    const now = Date.now();
    for (const peer of this.peers.values()) {
      if (peer.up ? peer.queued.size > 0 : peer.nextAttemptAt <= now) return true;
    }
    return false;
  }

  /** One round: peers due are tried again; each reachable peer gets one chunk of its queue. */
  private async deliver(): Promise<void> {
    if (this.reloadQueue) {
      this.reloadQueue = false;
      const byServer = await queuedRequests(this.control!);
      for (const peer of this.peers.values()) {
        peer.queued = byServer.get(peer.name) ?? new Set();
        if (!peer.up && peer.queued.size > 0) peer.nextAttemptAt = 0;
      }
      await this.refreshPeers(this.peers.keys());
    }
    const now = Date.now();
    for (const peer of this.peers.values()) {
      if (!peer.up && (peer.nextAttemptAt > now || !(await this.tryPeer(peer)))) continue;
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
    const control = this.control!;
    await control.query('SELECT pg_advisory_lock($1, $2)', [LOCK_NAMESPACE, LOCKS.queueDelivery]);
    try {
      await this.deliverChunkLocked(peer);
    } finally {
      await control.query('SELECT pg_advisory_unlock($1, $2)', [LOCK_NAMESPACE, LOCKS.queueDelivery]).catch(() => {});
    }
  }

  private async deliverChunkLocked(peer: Peer): Promise<void> {
    const rows = await nextQueued(this.control!, peer.name, this.chunkRows);
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
      await this.peerDown(peer, err);
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
      const entry = this.entryOf(row);
      entries.push(entry);
      if (BigInt(row.id) <= upTo || entry.op.applied) {
        done.push(entry);
        continue;
      }
      const refused = this.rebuild(entry, buffer, assigned, plans);
      if (refused) failures.push(refused);
    }
    buffer.submitAll();
    try {
      await lane.settle();
    } catch (err) {
      await this.peerDown(peer, err);
      return;
    }
    for (const f of lane.takeFailures()) failures.push(f);
    const failed = new Set(failures.map((f) => changeKey(f.type, f.mapping.name, f.requestId, f.lsn)));
    const failedIds = entries.filter((e) => failed.has(entryKey(e))).map((e) => e.id!);
    const source = this.sourceLane!;
    if (failures.length) {
      await source.runAlone(async (client) => {
        await recordErrors(client, failures);
        await dequeue(client, failedIds);
      });
      for (const f of failures)
        this.log.warn({ mapping: f.mapping.name, type: f.type, requestId: f.requestId, sqlstate: f.sqlstate }, f.error);
    }
    const lastId = rows[rows.length - 1]!.id;
    if (lane.dirty) {
      await lane.commitWith((client) => markDelivered(client, this.queueId, this.server, lastId));
      await this.peerHealthy(peer);
    }
    const delivered = entries.filter((e) => !failed.has(entryKey(e)));
    await source.runAlone(async (client) => {
      const bookkeeping = new LaneBuffer<never>(source, this.chunkRows, true);
      for (const entry of delivered) {
        const { op } = entry;
        const form = this.forms.get(op.form);
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
        failures.filter((f) => this.forms.has(`${f.source.schema}.${f.source.table}`)),
        'failure',
      );
      for (const group of bookkeeping.pendingGroups()) await group.execute(client);
      await dequeue(
        client,
        delivered.map((e) => e.id!),
      );
    });
    this.stats.delivered += delivered.length;
    this.stats.failed += failures.length;
    if (failures.some(catalogChanged)) await this.refreshPeers([peer.name]);
    const keys = new Map(
      rows.map((r) => [
        requestKey(this.entryOf(r).targetForm, r.op.targetKey),
        [this.entryOf(r).targetForm, r.op.targetKey] as [string, string],
      ]),
    );
    const still = await stillQueued(this.control!, peer.name, [...keys.values()]);
    for (const key of keys.keys()) if (!still.has(key)) peer.queued.delete(key);
    this.log.debug(
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
      const form = this.forms.get(formKey);
      if (!form) continue;
      const res = await this.sourceLane!.outside((client) =>
        client.query({
          text: `SELECT * FROM ${qualified(form.schema, form.table)} WHERE ${quoteIdent(form.keyColumn)} = ANY ($1::text[]::${form.keyType}[])`,
          values: [ids],
          types: asText,
        } as pg.QueryConfig),
      );
      for (const row of res.rows as TextRow[]) found.set(`${formKey}\u0000${row[form.keyColumn]}`, row);
    }
    return found;
  }

  /** A queued operation read back. */
  private entryOf(row: { id: string; op: QueuedOp; mapping: string }): PendingEntry {
    const ref = this.links.get(row.op.link);
    const mapping = ref?.mapping ?? this.opts.config.mappings[row.mapping];
    const there = ref ? (ref.forward ? ref.mapping.to : ref.mapping.from) : mapping?.to;
    return {
      id: row.id,
      op: row.op,
      type: opType(row.op),
      mapping: mapping ?? ({ name: row.mapping, pool: 'default' } as MappingConfig),
      targetServer: ref?.server ?? there?.server ?? '',
      targetForm: there ? `${there.schema}.${there.table}` : '',
    };
  }

  /** Buffers a queued operation in a lane; a failure when it can no longer be built. */
  private rebuild(
    entry: PendingEntry,
    buffer: LaneBuffer<ApplyFailure>,
    assigned: Map<string, Map<string, string>>,
    plans: Map<string, ColumnPlan>,
  ): ApplyFailure | null {
    const { op } = entry;
    const ref = this.links.get(op.link);
    const form = this.forms.get(op.form);
    const lsn = parseLsn(op.lsn);
    const refuse = (error: string): ApplyFailure => {
      const [schema, table] = op.form.split('.') as [string, string];
      return {
        type: entry.type,
        mapping: entry.mapping,
        source: form ?? ({ schema, table } as FormInfo),
        targetServer: entry.targetServer,
        requestId: op.requestId,
        lsn,
        payload: { op, targetForm: entry.targetForm, targetKey: op.targetKey },
        error,
        sqlstate: null,
      };
    };
    if (!ref?.resolved || !form)
      return refuse(
        `queued ${entry.type} of request ${op.requestId}: mapping "${entry.mapping.name}" or form ${op.form} is no longer in the rules`,
      );
    const link = ref.resolved;
    const { mapping } = link;
    try {
      let groupKey: string;
      if (op.group === 'transfer') {
        const columns = Object.keys(op.row ?? {});
        const planKey = `${mapping.name}\u0000${columns.join('\u0000')}`;
        let plan = plans.get(planKey);
        if (!plan) plans.set(planKey, (plan = buildColumnPlan(mapping, columns, form.keyColumn, this.catalogs.get(mapping.name)!)));
        let ids = assigned.get(mapping.name);
        if (!ids) assigned.set(mapping.name, (ids = new Map()));
        groupKey = `transfer:${planKey}`;
        const planned = plan;
        const newIds = ids;
        buffer
          .group(groupKey, entry.targetForm, op.targetKey, () => new TransferGroup(planned, form, newIds))
          .addChange(
            {
              requestId: op.requestId,
              targetKey: op.targetKey,
              values: valuesOf(plan, op.row ?? {}, form),
              history: op.history,
              modifiedAt: op.modifiedAt ?? null,
              lsn,
            },
            false,
          );
      } else if (op.group === 'copy-update') {
        const kind = op.kind ?? 'chain';
        const withValues = op.withValues ?? false;
        groupKey = `${kind}:${withValues}:${op.link}`;
        buffer
          .group(groupKey, entry.targetForm, op.targetKey, () => new CopyUpdateGroup(link, kind, withValues, form, this.server))
          .add({
            requestId: op.requestId,
            targetKey: op.targetKey,
            history: op.history,
            values: withValues ? valuesOf(link.plan, op.row ?? {}, form) : [],
            current: op.current ?? null,
            master: op.master ?? null,
            newHistory: op.newHistory ?? null,
            lsn,
          });
      } else {
        groupKey = `delete:${op.link}`;
        buffer
          .group(groupKey, entry.targetForm, op.targetKey, () => new CopyDeleteGroup(link, form, this.server))
          .add({ requestId: op.requestId, targetKey: op.targetKey, history: op.history, lsn });
      }
      this.added(buffer, groupKey, entry);
      return null;
    } catch (err) {
      return refuse(`queued ${entry.type} of request ${op.requestId} by mapping "${mapping.name}": ${errorText(err)}`);
    }
  }

  async close(): Promise<void> {
    for (const timer of this.timers) clearInterval(timer);
    await this.stream?.stop();
    await Promise.all([...this.peers.values()].map((p) => this.closePeerLanes(p)));
    await this.sourceLane?.close();
    await this.control?.end().catch(() => {});
  }
}

/** How often the catalogs are read again while a plan leaves out a column the target lacks: 10 s, doubling up to 5 min. */
const CATALOG_RECHECK_MS = 10_000;
const CATALOG_RECHECK_MAX_MS = 300_000;

/** A failure that says the target's table is not what the plan was built for. */
function catalogChanged(f: ApplyFailure): boolean {
  return f.sqlstate === '42703' /* undefined column */ || f.sqlstate === '42804' /* datatype mismatch */;
}

/** The key of a queued operation, as changeKey gives it for its failure. */
function entryKey(entry: PendingEntry): string {
  return changeKey(entry.type, entry.mapping.name, entry.op.requestId, parseLsn(entry.op.lsn));
}

/** Failures with the operation each one is, for a retry. */
function withOps(failures: ApplyFailure[], byKey: ReadonlyMap<string, PendingEntry> | undefined): ApplyFailure[] {
  if (failures.length === 0 || !byKey) return failures;
  return failures.map((f) => withOp(f, byKey.get(changeKey(f.type, f.mapping.name, f.requestId, f.lsn))));
}

/**
 * Stages the bookkeeping of a source copy for one change (its position `lsn`); `ran`: applied in
 * this session. The operations of one change on one request join their groups together.
 */
function stageBookkeeping(
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
    String(lsn),
    `${outcome.op}:${mapping.name}`,
    `${form.schema}.${form.table}`,
    requestId,
    () => new SourceBookkeeping(outcome, mapping, form, assigned.get(mapping.name)),
    (group) => group.add(requestId, lsn, ran, seen),
  );
}

/** What the source copy said in the change, for its bookkeeping. */
function seenOf(row: TextRow): SeenState {
  return { version: row.dso_version ?? null, hops: countHops(row.dso_mapping_history), current: row.dso_current_server ?? null };
}

/** An error's message alone (never a connection string). */
function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Every domain of the database with its (ultimate) base type. */
async function domainBaseTypes(client: pg.ClientBase): Promise<Map<number, number>> {
  const res = await client.query(`SELECT oid::int AS oid, typbasetype::int AS base FROM pg_type WHERE typtype = 'd'`);
  const direct = new Map<number, number>(res.rows.map((r: { oid: number; base: number }) => [r.oid, r.base]));
  const resolved = new Map<number, number>();
  for (const oid of direct.keys()) {
    let base = direct.get(oid)!;
    for (let depth = 0; direct.has(base) && depth < 32; depth++) base = direct.get(base)!;
    resolved.set(oid, base);
  }
  return resolved;
}

/** The request's mapping history (jsonb text) with one more hop (JSON text). */
function withHop(historyText: string, hop: string): string {
  return historyText === '[]' ? `[${hop}]` : `${historyText.slice(0, -1)}, ${hop}]`;
}

/** The request ID of the copy a mapping's target holds: the one the source copy recorded, else the same. */
function targetKeyOf(row: TextRow, mapping: MappingConfig, requestId: string): string {
  return row.dso_to_mapping === mapping.name && row.dso_to_request_id ? row.dso_to_request_id : requestId;
}

/** A plan's values from a row, as text, aligned with plan.columns. */
function valuesOf(plan: ColumnPlan, row: TextRow, form: FormInfo): (string | null)[] {
  const values = plan.columns.map((c) => (c.from.kind === 'constant' ? c.from.text : row[c.from.column]));
  if (values.some((v) => v === undefined))
    throw new Error(`form ${form.schema}.${form.table} is not replica identity full: run pgdso forms enable`);
  return values as (string | null)[];
}

/** True when the history holds a return to that server. */
function returnedBefore(historyText: string, server: string): boolean {
  if (historyText === '[]') return false;
  try {
    const hops = JSON.parse(historyText) as { operation?: unknown; toServer?: unknown }[];
    return Array.isArray(hops) && hops.some((h) => h?.operation === 'return' && h.toServer === server);
  } catch {
    return false;
  }
}

/** Servers a request has been on, from its mapping history (JSON text); null if malformed. */
function visitedServers(historyText: string): Set<string> | null {
  const visited = new Set<string>();
  if (historyText === '[]') return visited;
  let hops: unknown;
  try {
    hops = JSON.parse(historyText);
  } catch {
    return null;
  }
  if (!Array.isArray(hops)) return null;
  for (const hop of hops as { fromServer?: unknown; toServer?: unknown; fromRequestId?: unknown }[]) {
    if (!hop || typeof hop.fromServer !== 'string' || typeof hop.fromRequestId !== 'string') return null;
    visited.add(hop.fromServer);
    if (typeof hop.toServer === 'string') visited.add(hop.toServer);
  }
  return visited;
}
