// An apply lane: one dedicated connection to one server for one pool, with its own replication
// origin (the origin tags the lane's writes in the server's WAL: the decoder tells the engine's
// changes from users' by it, and the ownership guard lets the session through). Work runs in
// one open transaction per batch; the commit records the source position (the commit LSN of the
// last source transaction in the batch) in pgdso.apply_progress in that same transaction, so a
// replay after a crash skips exactly what was committed. (The origin's own progress is not used:
// PostgreSQL advances it even when the transaction aborts.)
import pg from 'pg';
import type { Logger } from 'pino';
import { formatLsn } from '../change.ts';
import { describeFormColumns, type FormCatalog } from './catalog.ts';
import { forApplying } from '../sql/session.ts';
import { endClient } from '../sql/client.ts';
import { isolatesRows, sqlstateOf } from './errors.ts';
import { checkLaneTerm, laneApplicationName, FencedError, type Fence } from '../sql/fencing.ts';
import type { OpGroup, PipedStatement } from './op-group.ts';
import { TransactionGroups } from './lane-groups.ts';
import { BEGIN, commitChecked, named, openLaneSession, progressStatement, retryingLockConflicts, setPipeline } from './lane-sql.ts';

export type { OpGroup, PipedStatement } from './op-group.ts';

export interface LaneOptions<F = unknown> {
  connection: pg.ClientConfig;
  origin: string;
  name: string;
  log: Logger;
  /** the owner's term: the lane's writes fail once a newer owner has written (server groups) */
  fence?: Fence;
  /** pipelined statements are named: parsed once per connection (a peer's lanes) */
  namedStatements?: boolean;
  /** adds what the caller knows about a group's operations to its failures (the group is gone after it ran) */
  annotate?: (group: OpGroup<F>, failures: F[]) => F[];
}

export class ApplyLane<F = unknown> {
  readonly name: string;
  /** commit LSN of the last source transaction this lane has committed */
  progress = 0n;
  private client: pg.Client | null = null;
  private inTransaction = false;
  private tail: Promise<void> = Promise.resolve();
  private failure: Error | null = null;
  private queued = 0;
  private readonly inFlight: Promise<void>[] = [];
  /** the last use of the connection on its own (runAlone, transaction, outside); never rejects */
  private turn: Promise<unknown> = Promise.resolve();
  /** what the open transaction ran (to run again isolated), the failures its groups reported */
  private readonly groups: TransactionGroups<F>;
  /** transactions rolled back and run again isolated, since the lane opened */
  rerun = 0;
  /** the open transaction's statements are sent without waiting for the results before them */
  private pipelining = false;
  /** a pipelined statement failed or needs more: the transaction runs again, isolated */
  private rerunNeeded = false;
  /** uses of the connection on its own under way (exclusively) */
  private alones = 0;
  /** the source position recorded by a pipelined statement in the open transaction */
  private progressSent: bigint | null = null;

  constructor(private readonly opts: LaneOptions<F>) {
    this.name = opts.name;
    this.groups = new TransactionGroups(opts.annotate);
  }

  async open(): Promise<void> {
    const { fence, name } = this.opts;
    const config = forApplying(this.opts.connection, this.opts.namedStatements);
    const client = new pg.Client({ ...config, application_name: laneApplicationName(name, fence) });
    client.on('error', (err) => {
      this.failure ??= err;
    });
    await client.connect();
    this.client = client;
    const { origin } = this.opts;
    this.progress = await openLaneSession(client, origin, name, fence, this.opts.log);
    this.opts.log.debug({ lane: this.name, origin, progress: formatLsn(this.progress) }, 'apply lane open');
  }

  /** True when the source transaction with this commit LSN was already committed here. */
  applied(finalLsn: bigint): boolean {
    return finalLsn <= this.progress;
  }

  /** A form of this lane's server, read from its catalog. */
  describe(schema: string, table: string): Promise<FormCatalog> {
    return describeFormColumns(this.connection(), schema, table);
  }

  get dirty(): boolean {
    return this.inTransaction || this.queued > 0;
  }

  /** Operations submitted and not yet finished. */
  get backlog(): number {
    return this.queued;
  }

  /** Runs a group in the open transaction, after every group submitted before it. */
  submit(group: OpGroup<F>): void {
    this.queued += 1;
    const piped = this.pipeable(group);
    if (piped) return this.pipe(group, piped);
    if (this.pipelining) this.endPipeline();
    const done = this.tail.then(async () => {
      try {
        if (this.failure) return;
        const client = this.connection();
        if (!this.inTransaction) {
          await this.begin(client);
          this.groups.begin();
        }
        await this.run(client, group);
      } catch (err) {
        this.failure ??= err instanceof Error ? err : new Error(String(err));
      } finally {
        this.queued -= 1;
        this.inFlight.shift();
      }
    });
    this.inFlight.push(done);
    this.tail = done;
  }

  /**
   * Runs a group in the open transaction: without a savepoint while the transaction's groups are
   * kept (two round trips fewer per group), else isolated. A data error then rolls the
   * transaction back and runs its groups again, isolated: the good rows are applied, the bad
   * ones become failures, as if they had run isolated from the start.
   */
  private async run(client: pg.Client, group: OpGroup<F>): Promise<void> {
    const groups = this.groups;
    if (!groups.optimistic) return groups.record(group, await group.execute(client, true));
    groups.keep(group);
    let failed: F[];
    try {
      failed = await group.execute(client, false);
    } catch (err) {
      if (!isolatesRows(err)) throw err; // a data error (23505 included) or an unknown code
      this.opts.log.debug(
        { lane: this.name, sqlstate: sqlstateOf(err) },
        'a group failed without a savepoint: its transaction runs again, isolated',
      );
      return this.runAgain(client);
    }
    groups.record(group, failed);
    groups.ran();
  }

  /**
   * The group's statement, when it can be sent now without waiting: at the start of a
   * transaction with nothing else under way, or in a transaction whose statements all were.
   */
  private pipeable(group: OpGroup<F>): PipedStatement<F> | null {
    if (this.failure || this.alones > 0 || !group.piped) return null;
    if (!this.groups.fits(group.size)) return null;
    if (!this.pipelining && (this.inTransaction || this.queued > 1 || this.groups.isolating)) return null;
    return group.piped();
  }

  /**
   * Sends the group's statement now (pipeline mode: one round trip for the whole transaction).
   * Its result is read as it comes; one that failed or needs more makes the transaction run
   * again, isolated, when the pipeline ends (endPipeline).
   */
  private pipe(group: OpGroup<F>, statement: PipedStatement<F>): void {
    const client = this.connection();
    if (!this.pipelining) {
      setPipeline(client, true);
      this.pipelining = true;
      this.rerunNeeded = false;
      this.inTransaction = true;
      this.groups.begin();
      this.progressSent = null;
      this.watch(client.query(BEGIN), () => undefined);
    }
    this.groups.keep(group);
    const done = this.watch(client.query(this.opts.namedStatements ? named(statement.query) : statement.query), (result) => {
      const failed = statement.check(result);
      if (failed === null) this.rerunNeeded = true;
      else this.groups.record(group, failed);
    }).finally(() => {
      this.queued -= 1;
      this.inFlight.shift();
    });
    this.inFlight.push(done);
  }

  /** Reads a pipelined statement's result in order; a data error makes the transaction run again. */
  private watch(sent: Promise<pg.QueryResult>, read: (result: pg.QueryResult) => void): Promise<void> {
    const done = sent.then(read, (err) => {
      // a data error, or an unknown code (25P02 included: a statement after the one that failed)
      if (isolatesRows(err)) this.rerunNeeded = true;
      else this.failure ??= err instanceof Error ? err : new Error(String(err));
    });
    this.tail = this.tail.then(() => done);
    return done;
  }

  /**
   * Sends the transaction's source position with its pipelined statements (a fenced lane's
   * position is written only under its term: a newer owner's makes the lane fail). commit()
   * then only commits.
   */
  recordPipelined(finalLsn: bigint, commitTime: Date): void {
    if (!this.pipelining || this.failure) return;
    const sent = this.connection().query(this.progressStatement(finalLsn, commitTime));
    this.progressSent = finalLsn;
    this.watch(sent, (result) => {
      if (this.opts.fence && !result.rowCount) this.failure ??= new FencedError(`lane ${this.name} (term ${this.opts.fence.term})`);
    });
  }

  /** Ends the pipeline (after its results are read): a transaction that needs it runs again, isolated. */
  private endPipeline(): void {
    this.pipelining = false;
    this.tail = this.tail.then(async () => {
      const client = this.connection();
      setPipeline(client, false);
      if (this.failure || !this.rerunNeeded) return;
      this.rerunNeeded = false;
      try {
        await this.runAgain(client);
      } catch (err) {
        this.failure ??= err instanceof Error ? err : new Error(String(err));
      }
    });
  }

  /** Rolls the open transaction back and runs the groups it kept again, isolated. */
  private async runAgain(client: pg.Client): Promise<void> {
    const groups = this.groups.again();
    this.rerun += 1;
    this.opts.log.debug({ lane: this.name, groups: groups.length, rerun: this.rerun }, 'the transaction runs again, isolated');
    this.progressSent = null;
    await client.query('ROLLBACK');
    this.inTransaction = false;
    await this.begin(client);
    for (const group of groups) this.groups.record(group, await group.execute(client, true));
  }

  /** Waits until at most `n` submitted groups are unfinished (backpressure; a failure shows at settle). */
  async drainTo(n: number): Promise<void> {
    while (this.inFlight.length > n) await this.inFlight[0];
  }

  /** The failure that ended this lane's transaction, if any (the lane must be closed then). */
  get failed(): Error | null {
    return this.failure;
  }

  /** Waits for the submitted groups; throws the first failure (the transaction is then lost). */
  async settle(): Promise<void> {
    if (this.pipelining) this.endPipeline();
    await this.tail;
    if (this.failure) throw this.failure;
  }

  /** Failures (rows that could not be applied) collected since the last call. */
  takeFailures(): F[] {
    return this.groups.take();
  }

  private async begin(client: pg.Client): Promise<void> {
    await client.query(BEGIN);
    this.inTransaction = true;
  }

  /** Commits the open transaction, recording `finalLsn` as this lane's progress in it. */
  async commit(finalLsn: bigint, commitTime: Date): Promise<void> {
    await this.settle();
    if (!this.inTransaction) return;
    const client = this.connection();
    if (this.progressSent !== finalLsn) await this.recordProgress(client, finalLsn, commitTime);
    await commitChecked(client);
    this.inTransaction = false;
    this.groups.end();
    this.progressSent = null;
    if (finalLsn > this.progress) this.progress = finalLsn;
  }

  /** With a fence: this transaction commits only while the lane's term is the current one. */
  private async checkTerm(client: pg.ClientBase): Promise<void> {
    if (this.opts.fence) await checkLaneTerm(client, this.opts.origin, this.name, this.opts.fence);
  }

  private async recordProgress(client: pg.ClientBase, finalLsn: bigint, commitTime: Date): Promise<void> {
    const res = await client.query(this.progressStatement(finalLsn, commitTime));
    if (this.opts.fence && !res.rowCount) throw new FencedError(`lane ${this.name} (term ${this.opts.fence.term})`);
  }

  private progressStatement(finalLsn: bigint, commitTime: Date): pg.QueryConfig {
    return progressStatement(this.opts.origin, this.opts.fence, finalLsn, commitTime);
  }

  /**
   * Commits the open transaction after `record` (a queue delivery records what it delivered
   * instead of a source position).
   */
  async commitWith(record: (client: pg.ClientBase) => Promise<void>): Promise<void> {
    await this.settle();
    if (!this.inTransaction) return;
    const client = this.connection();
    await record(client);
    await this.checkTerm(client);
    await client.query('COMMIT');
    this.inTransaction = false;
    this.groups.end();
  }

  /** Runs reads on the lane's connection outside any transaction. */
  outside<T>(work: (client: pg.ClientBase) => Promise<T>): Promise<T> {
    return this.exclusively(async () => {
      await this.settle();
      if (this.inTransaction) throw new Error(`lane ${this.name}: outside() inside an open transaction`);
      return work(this.connection());
    });
  }

  /**
   * Runs `work` in a transaction of its own that records `finalLsn` as this lane's progress. A
   * deadlock or serialization failure (40P01, 40001: the source's own users lock the same rows)
   * rolls it back and runs it again, up to `attempts` times; `work` must be safe to run again.
   */
  transaction(finalLsn: bigint, commitTime: Date, work: (client: pg.ClientBase) => Promise<void>, attempts = 5): Promise<number> {
    return this.exclusively(async () => {
      const once = () =>
        this.alone(async (client) => {
          await work(client);
          await this.recordProgress(client, finalLsn, commitTime);
        });
      const retries = await retryingLockConflicts(once, attempts, this.opts.log, this.name);
      if (finalLsn > this.progress) this.progress = finalLsn;
      return retries;
    });
  }

  /** Runs one statement batch in a transaction of its own (no origin progress recorded). */
  runAlone<T>(work: (client: pg.ClientBase) => Promise<T>): Promise<T> {
    return this.exclusively(() => this.alone(work));
  }

  /**
   * Runs `work` once every earlier runAlone, transaction and outside has finished: the source
   * lane serves the batches' source transactions in the background (SourceTail) and others.
   */
  private exclusively<T>(work: () => Promise<T>): Promise<T> {
    this.alones += 1;
    const run = this.turn.then(work).finally(() => {
      this.alones -= 1;
    });
    this.turn = run.catch(() => undefined);
    return run;
  }

  private async alone<T>(work: (client: pg.ClientBase) => Promise<T>): Promise<T> {
    await this.settle();
    if (this.inTransaction) throw new Error(`lane ${this.name}: runAlone inside an open transaction`);
    const client = this.connection();
    await this.begin(client);
    try {
      const result = await work(client);
      await this.checkTerm(client);
      await client.query('COMMIT');
      this.inTransaction = false;
      return result;
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      this.inTransaction = false;
      throw err;
    }
  }

  /** Closes the connection; a statement still under way (waiting on a lock, say) is cut, its transaction lost. */
  async close(): Promise<void> {
    const client = this.client;
    this.client = null;
    if (client) await endClient(client, this.pipelining || this.inFlight.length > 0);
  }

  private connection(): pg.Client {
    if (!this.client) throw new Error(`lane ${this.name} is closed`);
    return this.client;
  }
}
