// The supervisor of one server for one instance: its pinned control connection heartbeats on the
// server's board, competes for the coordinator's lock (and coordinates while it holds it),
// learns through LISTEN/NOTIFY and each interval which operations this instance owns, with
// their fencing terms, and starts and stops the operation runners accordingly. A lost control
// connection stops every operation of the instance at once; a clean stop hands them on at once.
import pg from 'pg';
import type { Logger } from 'pino';
import { setTimeout as delay } from 'node:timers/promises';
import type { GroupConfig } from '../config/types.ts';
import { classifyError } from '../applier/errors.ts';
import { stopOnRefusal } from '../engine.ts';
import { controlName, coordinate, tryCoordinate } from './coordinator.ts';
import { HeartbeatThread } from './heartbeat.ts';
import { answerRequest, takeRequests, type GroupRequest } from './requests.ts';
import {
  GROUP_CHANNEL,
  groupJoinLock,
  heartbeat,
  joinBoard,
  joinRanking,
  leaveBoard,
  notify,
  readOwners,
  type Operation,
  type OwnerRow,
} from './sql.ts';

/** How a runner ended by itself: `stop` when the instance must stop (an error only a DBA can fix). */
export type RunnerEnd = undefined | { stop: true };

/** Runs one operation while this instance owns it; every write it makes carries `term`. */
export interface OperationRunner {
  run(term: number, signal: AbortSignal): Promise<RunnerEnd>;
}

export interface SupervisorOptions {
  server: string;
  connection: pg.ClientConfig;
  instanceId: string;
  host: string;
  /** `--rank N` for every operation; null: 1 for the first instance of the server, else last */
  rank: number | null;
  group: GroupConfig;
  httpPort: number | null;
  log: Logger;
  runners: Readonly<Record<Operation, OperationRunner>>;
  /** carries out a request routed to this instance; throws to answer with an error */
  handle(request: GroupRequest): Promise<object>;
  /** a signal left on the board for this instance ('rules': a new rule set was published) */
  onSignal(signal: string): Promise<void>;
  ruleVersion(): number | null;
}

interface Running {
  term: number;
  controller: AbortController;
  done: Promise<void>;
}

export class ServerSupervisor {
  readonly server: string;
  private readonly log: Logger;
  private readonly running = new Map<Operation, Running>();
  private client: pg.Client | null = null;
  private coordinator = false;
  private wakeUp: () => void = () => {};
  private stopRequested = false;
  private connected = false;
  private justJoined = false;
  /** the round's slow part (signals, starting and stopping runners), off the heartbeat's path */
  private busy: Promise<void> | null = null;
  private readonly signals = new Set<string>();
  private beats: HeartbeatThread | null = null;

  constructor(private readonly opts: SupervisorOptions) {
    this.server = opts.server;
    this.log = opts.log.child({ server: opts.server, instance: opts.instanceId });
  }

  /** Operations this instance runs now. */
  operations(): Operation[] {
    return [...this.running.keys()].sort();
  }

  isCoordinator(): boolean {
    return this.coordinator && this.connected;
  }

  /** True while the control connection is up. */
  isConnected(): boolean {
    return this.connected;
  }

  /** Stops a runner and starts it again with the same term (new rules). */
  async restart(operation: Operation): Promise<void> {
    await this.stopRunner(operation);
    this.wake();
  }

  /** Sends a request through the group (it reaches the owner of its operation). */
  async query(text: string, values: unknown[] = []): Promise<pg.QueryResult> {
    if (!this.client) throw new Error(`the control connection of ${this.server} is down`);
    return this.client.query(text, values);
  }

  /** Runs until the signal aborts or a runner stops the instance; true when it stopped on an error. */
  async run(signal: AbortSignal): Promise<boolean> {
    let wait = 200;
    while (!signal.aborted && !this.stopRequested) {
      const started = Date.now();
      try {
        await this.session(signal);
      } catch (err) {
        const classified = classifyError(err);
        if (!signal.aborted && classified.class === 'permanent') {
          // the server refuses this instance itself (a password, a privilege): retrying changes nothing
          await this.stopAll();
          const { connection, server, instanceId } = this.opts;
          await stopOnRefusal({ connection, server, instanceId, log: this.log }, classified);
          return true;
        }
        if (!signal.aborted) {
          this.log.warn({ error: classified.message }, 'the control connection is lost: every operation of this instance stops');
        }
      }
      await this.stopAll();
      if (signal.aborted || this.stopRequested) break;
      if (Date.now() - started > 60_000) wait = 200;
      await delay(wait / 2 + Math.random() * (wait / 2), undefined, { signal }).catch(() => {});
      wait = Math.min(wait * 2, 10_000);
    }
    return this.stopRequested;
  }

  private wake(): void {
    this.wakeUp();
  }

  private async session(signal: AbortSignal): Promise<void> {
    const client = new pg.Client({ ...this.opts.connection, application_name: controlName(this.opts.instanceId) });
    let failLost: (err: Error) => void = () => {};
    const lost = new Promise<never>((_, reject) => (failLost = reject));
    lost.catch(() => {});
    client.on('error', (err) => {
      this.connected = false;
      failLost(err);
      this.wake();
    });
    client.on('end', () => {
      this.connected = false;
      failLost(new Error('the control connection was closed'));
      this.wake();
    });
    client.on('notification', (n) => {
      if (n.channel === GROUP_CHANNEL) this.wake();
    });
    await client.connect();
    this.client = client;
    this.connected = true;
    this.coordinator = false;
    const intervalMs = this.opts.group.checkIntervalSeconds * 1000;
    const beats = (this.beats = new HeartbeatThread({
      connection: this.opts.connection,
      instanceId: this.opts.instanceId,
      intervalMs,
      log: this.log,
    }));
    try {
      await this.join(client);
      await client.query(`LISTEN ${GROUP_CHANNEL}`);
      beats.start();
      while (!signal.aborted && !this.stopRequested) {
        const woken = new Promise<void>((resolve) => (this.wakeUp = resolve));
        const tick = this.tick(client).catch((err: Error) => {
          if (!this.connected || classifyError(err).class === 'permanent') throw err;
          // a failed round (a lock timeout, a statement error) is tried again at the next interval
          this.log.warn({ error: err.message }, 'a group round failed; the next interval tries again');
        });
        await Promise.race([tick, lost]);
        await Promise.race([delay(intervalMs, undefined, { signal }).catch(() => {}), woken, lost]);
      }
      if (signal.aborted || this.stopRequested) await this.leave(client);
    } finally {
      await beats.stop();
      this.connected = false;
      this.client = null;
      this.coordinator = false;
      await client.end().catch(() => {});
    }
  }

  private async join(client: pg.Client): Promise<void> {
    const { instanceId, server, host, rank, group } = this.opts;
    await client.query('BEGIN');
    try {
      await client.query(groupJoinLock.text, groupJoinLock.values);
      const board = joinBoard({ instanceId, server, host, pid: process.pid }, this.opts.httpPort);
      await client.query(board.text, board.values);
      const ranking = joinRanking(instanceId, rank, group.delinquentThreshold);
      await client.query(ranking.text, ranking.values);
      await client.query(notify('owners').text, notify('owners').values);
      await client.query('COMMIT');
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      throw err;
    }
    this.justJoined = true;
    this.log.info({ rank }, 'joined the server group');
  }

  /** One interval: heartbeat, coordinate (or try to), then run what this instance owns. */
  private async tick(client: pg.Client): Promise<void> {
    const { instanceId, group } = this.opts;
    const beat = heartbeat(instanceId, this.operations(), this.opts.ruleVersion(), !this.beats?.running);
    const row = (await client.query(beat.text, beat.values)).rows[0] as { signals: string[] } | undefined;
    if (!row) await this.join(client);
    // a joining instance runs the group's rule set, published before it came
    for (const signal of row?.signals ?? []) this.signals.add(signal);
    if (this.justJoined) this.signals.add('rules');
    this.justJoined = false;
    if (!this.coordinator) {
      this.coordinator = await tryCoordinate(client, group, this.log);
      if (this.coordinator) this.log.info('this instance coordinates the server group');
    }
    if (this.coordinator) await coordinate(client, group, this.server, this.log);
    const owners = (await client.query(readOwners.text, readOwners.values)).rows as OwnerRow[];
    // what may wait for a runner to stop runs beside the next heartbeats, one round of it at a time
    if (!this.busy && this.connected) this.busy = this.background(owners).finally(() => (this.busy = null));
    for (const request of await takeRequests(client, instanceId, this.operations())) void this.serve(client, request);
  }

  private async background(owners: readonly OwnerRow[]): Promise<void> {
    const signals = [...this.signals];
    this.signals.clear();
    for (const signal of signals) {
      await this.opts.onSignal(signal).catch((err) => this.log.error({ error: (err as Error).message }, `signal ${signal} failed`));
    }
    await this.reconcile(owners).catch((err) => this.log.error({ error: (err as Error).message }, 'the operations were not reconciled'));
  }

  private async reconcile(owners: readonly OwnerRow[]): Promise<void> {
    const mine = new Map(owners.filter((o) => o.instanceId === this.opts.instanceId).map((o) => [o.operation, o.term]));
    for (const [operation, running] of this.running) {
      if (mine.get(operation) !== running.term) {
        this.log.info({ operation, term: running.term }, 'this instance no longer owns the operation: it stops');
        await this.stopRunner(operation);
      }
    }
    for (const [operation, term] of mine) if (!this.running.has(operation)) this.startRunner(operation, term);
  }

  private startRunner(operation: Operation, term: number): void {
    const controller = new AbortController();
    this.log.info({ operation, term }, 'this instance owns the operation: it starts');
    const done = this.opts.runners[operation].run(term, controller.signal).then(
      (end) => {
        if (controller.signal.aborted) return;
        this.running.delete(operation);
        if (end?.stop) {
          this.stopRequested = true;
          this.wake();
        }
      },
      (err) => {
        this.log.error({ operation, error: (err as Error).message }, 'the operation failed; it starts again at the next interval');
        this.running.delete(operation);
      },
    );
    this.running.set(operation, { term, controller, done });
  }

  private async stopRunner(operation: Operation): Promise<void> {
    const running = this.running.get(operation);
    if (!running) return;
    running.controller.abort();
    await running.done;
    this.running.delete(operation);
  }

  private async stopAll(): Promise<void> {
    // a round still starting or stopping runners ends first: nothing starts after this
    while (this.busy) await this.busy;
    for (const r of this.running.values()) r.controller.abort();
    await Promise.all([...this.running.keys()].map((op) => this.stopRunner(op)));
  }

  /** A clean stop: the runners first, then the board says stopped and the operations move on. */
  private async leave(client: pg.Client): Promise<void> {
    await this.stopAll();
    const left = leaveBoard(this.opts.instanceId);
    await client.query(left.text, left.values);
    if (this.coordinator) await coordinate(client, this.opts.group, this.server, this.log).catch(() => undefined);
    await client.query(notify('owners').text, notify('owners').values);
    this.log.info('left the server group');
  }

  private async serve(client: pg.Client, request: GroupRequest): Promise<void> {
    try {
      const result = await this.opts.handle(request);
      await answerRequest(client, request.id, { result });
    } catch (err) {
      await answerRequest(client, request.id, { error: (err as Error).message }).catch(() => {});
    }
  }
}
