// The neighbour servers of a session: a peer for every server a link leads to, its apply lanes
// (one per pool) while it can be reached, and its delivery attempts with backoff while it
// cannot (kept across sessions). A peer that cannot be reached does not stop the engine: its
// operations wait in the queue.
import { formatLsn } from '../change.ts';
import { toPgClientConfig } from '../config/load.ts';
import { ApplyLane } from '../applier/lane.ts';
import { LaneBuffer } from '../applier/buffer.ts';
import { classifyError } from '../applier/errors.ts';
import { retryDelay } from '../applier/schedule.ts';
import type { ApplyFailure } from '../applier/sets.ts';
import { missingFormGrants, refusalOf } from '../sql/grants.ts';
import { withClient } from '../sql/client.ts';
import { originName } from '../sql/identifiers.ts';
import { recordAttempt } from '../queue/sql.ts';
import { errorText } from './errors.ts';
import type { GroupOperations } from './operations.ts';
import type { SessionState } from './state.ts';
import type { Topology } from './topology.ts';
import type { Peer, PeerDown } from './types.ts';

export class Peers {
  private readonly peers = new Map<string, Peer>();

  constructor(
    private readonly state: SessionState,
    private readonly topology: Topology,
    private readonly groupOps: GroupOperations,
    /** peers that could not be reached, across sessions: a new session does not try them before their next attempt */
    private readonly downPeers: Map<string, PeerDown>,
  ) {}

  get(name: string): Peer | undefined {
    return this.peers.get(name);
  }

  values(): IterableIterator<Peer> {
    return this.peers.values();
  }

  names(): IterableIterator<string> {
    return this.peers.keys();
  }

  /** A peer for every server the links lead to, with the pools of its mappings. */
  addLinked(): void {
    for (const link of this.topology.links.values()) {
      const peer = this.peerOf(link.server);
      if (!peer.pools.includes(link.mapping.pool)) peer.pools.push(link.mapping.pool);
    }
    for (const peer of this.peers.values()) peer.pools.sort();
  }

  private peerOf(name: string): Peer {
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
  }

  /** Connects the peers whose next attempt is due; the others count as down. */
  async connectDue(): Promise<void> {
    const now = Date.now();
    for (const peer of this.peers.values()) {
      if (peer.nextAttemptAt <= now) await this.tryPeer(peer);
      else this.countDown(peer.name);
    }
  }

  /** Connects a peer (false and the next attempt scheduled when it cannot be reached). */
  async tryPeer(peer: Peer): Promise<boolean> {
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
    const { opts, server, log, chunkRows, stats } = this.state;
    const connection = toPgClientConfig(opts.config.servers[peer.name]!.connection);
    const database = String(connection.database);
    try {
      for (const pool of peer.pools) {
        const lane = new ApplyLane<ApplyFailure>({
          connection,
          origin: originName(server, pool, database),
          name: `${server}->${peer.name}/${pool}`,
          log,
          fence: this.state.fence,
          annotate: (group, failures) => this.groupOps.annotate(group, failures),
        });
        const buffer = new LaneBuffer(lane, chunkRows);
        peer.lanes.set(pool, buffer);
        await lane.open();
        peer.progress.set(pool, lane.progress);
      }
      await this.topology.resolveLinks(peer.name);
      await this.settleUnsure(peer);
    } catch (err) {
      await this.closePeerLanes(peer);
      throw err;
    }
    if (!peer.up && peer.attempts > 0)
      log.info(
        { peer: peer.name, attempts: peer.attempts, queued: peer.queued.size },
        'peer reachable again; delivering its queued operations',
      );
    peer.up = true;
    stats.peersDown = stats.peersDown.filter((n) => n !== peer.name);
    // a refusal (a privilege) is over only once the peer takes a write: until then its attempts
    // keep counting, so the retries back off and the error is said once
    if (peer.lastClass !== 'permanent') await this.peerHealthy(peer);
  }

  /** The peer took what was sent: its delivery attempts are over. */
  async peerHealthy(peer: Peer): Promise<void> {
    if (peer.attempts === 0 && peer.downSince === null) return;
    await this.state.source.runAlone((client) => recordAttempt(client, peer.name, null));
    this.downPeers.delete(peer.name);
    peer.attempts = 0;
    peer.downSince = null;
    peer.lastError = null;
    peer.lastClass = null;
    peer.nextAttemptAt = 0;
  }

  /** Reads the catalogs of reachable peers again (a failed plan takes the peer down until its next attempt). */
  async refreshPeers(names: Iterable<string>): Promise<void> {
    for (const name of new Set(names)) {
      const peer = this.peers.get(name);
      if (!peer?.up) continue;
      try {
        await this.topology.resolveLinks(peer.name);
        this.state.log.info({ peer: name }, "the peer's forms were read again");
      } catch (err) {
        await this.peerDown(peer, err);
      }
    }
  }

  /**
   * Reads the catalogs of reachable peers again in the middle of a batch. Groups already open keep
   * the plan they were built with (plan ids in group keys); a peer that cannot be read keeps its
   * plans (its lane reports the failure at the flush).
   */
  async refreshPlans(names: Iterable<string>): Promise<void> {
    for (const name of new Set(names)) {
      const peer = this.peers.get(name);
      if (!peer?.up) continue;
      try {
        await this.topology.resolveLinks(peer.name);
      } catch (err) {
        this.state.log.warn({ peer: name, error: errorText(err) }, "the peer's forms could not be read again; the plans of before stay");
      }
    }
  }

  /** Queued operations that a lane may have applied before: applied ones are marked for bookkeeping only. */
  private async settleUnsure(peer: Peer): Promise<void> {
    await this.state.source.runAlone(async (client) => {
      for (const [pool, progress] of peer.progress) {
        await client.query(
          `UPDATE pgdso.pending SET payload = (payload - 'unsure') || CASE
             WHEN (payload -> 'unsure' ->> 'finalLsn')::pg_lsn <= $3::pg_lsn THEN '{"applied": true}'::jsonb ELSE '{}'::jsonb END
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

  /** Closes every peer's lanes. */
  async closeAll(): Promise<void> {
    await Promise.all([...this.peers.values()].map((p) => this.closePeerLanes(p)));
  }

  /** Counts a peer among those that cannot be reached (stats, metrics). */
  private countDown(name: string): void {
    const { stats } = this.state;
    if (!stats.peersDown.includes(name)) stats.peersDown = [...stats.peersDown, name];
  }

  /** The peer cannot be reached: its lanes close, its operations queue until the next attempt. */
  async peerDown(peer: Peer, err: unknown): Promise<void> {
    await this.closePeerLanes(peer);
    const classified = classifyError(err);
    const now = Date.now();
    peer.up = false;
    peer.attempts += 1;
    peer.downSince ??= now;
    const previousError = peer.lastError;
    peer.lastError = classified.message;
    peer.lastClass = classified.class;
    const wait = retryDelay(this.state.opts.config.pending.retry, peer.attempts, now - peer.downSince);
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
    const { log } = this.state;
    if (classified.class === 'permanent') await this.sayRefused(peer, classified, repeated, fields);
    else if (repeated) log.debug(fields, 'peer still cannot be reached');
    else log.warn(fields, 'peer cannot be reached: its operations wait in pgdso.pending');
    if (this.state.sourceLane) {
      const attempt = {
        attempts: peer.attempts,
        downSince: new Date(peer.downSince),
        nextAttemptAt: new Date(peer.nextAttemptAt),
        error: classified.message,
      };
      await this.state.sourceLane.runAlone((client) => recordAttempt(client, peer.name, attempt));
    }
  }

  /**
   * The peer refuses the engine (a privilege): said once at error level, with what to run; the
   * attempts go on quietly (and at once on `pgdso pending retry --queued`).
   */
  private async sayRefused(
    peer: Peer,
    classified: { sqlstate: string | null; message: string },
    repeated: boolean,
    fields: Record<string, unknown>,
  ): Promise<void> {
    const { log } = this.state;
    const connection = toPgClientConfig(this.state.opts.config.servers[peer.name]!.connection);
    const refusal = repeated
      ? null
      : refusalOf(classified.sqlstate, classified.message, String(connection.user ?? 'pgdso'), String(connection.database));
    if (refusal && /permission denied for (table|schema)/.test(classified.message)) {
      // the exact grants, from the peer's own privilege functions (best effort)
      const forms = [...this.topology.links.values()]
        .filter((r) => r.server === peer.name)
        .map((r) => (r.forward ? r.mapping.to : r.mapping.from));
      const grants = await withClient({ ...connection, application_name: 'pgdso privileges' }, (client) =>
        missingFormGrants(client, forms),
      ).catch(() => []);
      if (grants.length) refusal.fix = grants.join(' ');
    }
    if (repeated) log.debug(fields, 'peer still refuses the engine');
    else
      log.error(
        { ...fields, fix: refusal?.fix },
        `peer ${peer.name} refuses the engine${refusal ? ` (${refusal.missing}); fix: ${refusal.fix}` : ''}: ` +
          'its operations wait in pgdso.pending until that is fixed',
      );
  }
}
