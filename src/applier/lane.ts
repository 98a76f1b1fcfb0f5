// An apply lane: one dedicated connection to one server for one pool, with its own replication
// origin (the origin tags the lane's writes in the server's WAL: the decoder tells the engine's
// changes from users' by it, and the ownership guard lets the session through). Work runs in
// one open transaction per batch; the commit records the source position (the commit LSN of the
// last source transaction in the batch) in pgdso.apply_progress in that same transaction, so a
// replay after a crash skips exactly what was committed. (The origin's own progress is not used:
// PostgreSQL advances it even when the transaction aborts.)
import pg from 'pg';
import type { Logger } from 'pino';
import { formatLsn, parseLsn } from '../change.ts';
import { describeFormColumns, type FormCatalog } from './catalog.ts';
import { forApplying } from '../sql/session.ts';
import { sqlstateOf } from './errors.ts';
import { checkLaneTerm, laneApplicationName, raiseLaneTerm, setupOrigin, terminateLane, FencedError, type Fence } from '../sql/fencing.ts';

/** A set of operations applied by one statement (or a few), in the lane's open transaction. */
export interface OpGroup<F = unknown> {
  readonly size: number;
  /** true when the group holds an operation on that request of that table (schema.table) */
  has(table: string, requestId: string): boolean;
  execute(client: pg.ClientBase): Promise<F[]>;
}

export interface LaneOptions<F = unknown> {
  connection: pg.ClientConfig;
  origin: string;
  name: string;
  log: Logger;
  /** the owner's term: the lane's writes fail once a newer owner has written (server groups) */
  fence?: Fence;
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
  private failures: F[] = [];
  private queued = 0;
  private readonly inFlight: Promise<void>[] = [];
  /** the last use of the connection on its own (runAlone, transaction, outside); never rejects */
  private turn: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: LaneOptions<F>) {
    this.name = opts.name;
  }

  async open(): Promise<void> {
    const { fence, name } = this.opts;
    const client = new pg.Client({ ...forApplying(this.opts.connection), application_name: laneApplicationName(name, fence) });
    client.on('error', (err) => {
      this.failure ??= err;
    });
    await client.connect();
    this.client = client;
    const { origin } = this.opts;
    const exists = await client.query('SELECT 1 FROM pg_replication_origin WHERE roname = $1', [origin]);
    if (exists.rowCount === 0) {
      await client.query('SELECT pg_replication_origin_create($1)', [origin]).catch((err) => {
        if ((err as { code?: string }).code !== '23505') throw err; // created meanwhile
      });
    }
    if (fence) {
      // the term first (an older one is refused here, before it disturbs anything): from now on a
      // former owner's commits fail; then its connections go, freeing the origin
      await raiseLaneTerm(client, origin, name, fence);
      await terminateLane(client, name);
    }
    await setupOrigin(client, origin, name, fence, this.opts.log);
    const progress = await client.query(`SELECT source_lsn::text AS lsn FROM pgdso.apply_progress WHERE origin = $1`, [origin]);
    this.progress = progress.rowCount ? parseLsn(progress.rows[0].lsn) : 0n;
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
    const done = this.tail.then(async () => {
      try {
        if (this.failure) return;
        const client = this.connection();
        if (!this.inTransaction) {
          await this.begin(client);
        }
        const failed = await group.execute(client);
        if (failed.length) for (const f of this.opts.annotate ? this.opts.annotate(group, failed) : failed) this.failures.push(f);
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
    await this.tail;
    if (this.failure) throw this.failure;
  }

  /** Failures (rows that could not be applied) collected since the last call. */
  takeFailures(): F[] {
    const taken = this.failures;
    this.failures = [];
    return taken;
  }

  private async begin(client: pg.Client): Promise<void> {
    // a deferred constraint must fail its statement (where the bad row can be isolated), not
    // the commit (one round trip for both)
    await client.query('BEGIN; SET CONSTRAINTS ALL IMMEDIATE');
    this.inTransaction = true;
  }

  /** Commits the open transaction, recording `finalLsn` as this lane's progress in it. */
  async commit(finalLsn: bigint, commitTime: Date): Promise<void> {
    await this.settle();
    if (!this.inTransaction) return;
    const client = this.connection();
    await this.recordProgress(client, finalLsn, commitTime);
    await client.query('COMMIT');
    this.inTransaction = false;
    if (finalLsn > this.progress) this.progress = finalLsn;
  }

  /** With a fence: this transaction commits only while the lane's term is the current one. */
  private async checkTerm(client: pg.ClientBase): Promise<void> {
    if (this.opts.fence) await checkLaneTerm(client, this.opts.origin, this.name, this.opts.fence);
  }

  private async recordProgress(client: pg.ClientBase, finalLsn: bigint, commitTime: Date): Promise<void> {
    if (this.opts.fence) {
      // the row exists (open() raised its term): a former owner's term updates nothing
      const res = await client.query(
        `UPDATE pgdso.apply_progress SET source_lsn = $2::text::pg_lsn, source_commit_time = $3, updated_at = now()
          WHERE origin = $1 AND term = $4`,
        [this.opts.origin, formatLsn(finalLsn), commitTime, this.opts.fence.term],
      );
      if (!res.rowCount) throw new FencedError(`lane ${this.name} (term ${this.opts.fence.term})`);
      return;
    }
    await client.query(
      `INSERT INTO pgdso.apply_progress (origin, source_lsn, source_commit_time, updated_at) VALUES ($1, $2::text::pg_lsn, $3, now())
       ON CONFLICT (origin) DO UPDATE
          SET source_lsn = EXCLUDED.source_lsn, source_commit_time = EXCLUDED.source_commit_time, updated_at = now()`,
      [this.opts.origin, formatLsn(finalLsn), commitTime],
    );
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
    return this.exclusively(() => this.retried(finalLsn, commitTime, work, attempts));
  }

  private async retried(
    finalLsn: bigint,
    commitTime: Date,
    work: (client: pg.ClientBase) => Promise<void>,
    attempts: number,
  ): Promise<number> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.alone(async (client) => {
          await work(client);
          await this.recordProgress(client, finalLsn, commitTime);
        });
        if (finalLsn > this.progress) this.progress = finalLsn;
        return attempt - 1;
      } catch (err) {
        const sqlstate = sqlstateOf(err);
        if ((sqlstate !== '40P01' && sqlstate !== '40001') || attempt >= attempts) throw err;
        this.opts.log.info(
          { lane: this.name, sqlstate, attempt },
          'transaction rolled back by a lock conflict (deadlock or serialization failure): running it again',
        );
      }
    }
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
    const run = this.turn.then(work);
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

  async close(): Promise<void> {
    const client = this.client;
    this.client = null;
    if (client) await client.end().catch(() => {});
  }

  private connection(): pg.Client {
    if (!this.client) throw new Error(`lane ${this.name} is closed`);
    return this.client;
  }
}
