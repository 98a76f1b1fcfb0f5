// The source side of flushed batches, pipelined: once a batch's targets have committed, its
// source transaction (the queue's share, the statuses, the bookkeeping with the source lane's
// progress) runs here while the next batch is decoded and applied. The transactions run one
// after another, in the order of their batches, and each batch is confirmed only after its own
// has committed; a position with nothing to write (a transaction that gave the engine nothing
// to do, a heartbeat) is confirmed in the same order, never before an earlier batch's. A failure
// stops everything after it: nothing more is confirmed, the session ends at its next step (or
// is woken for it) and the batch is replayed, as after a crash between target and source.
import type { Checkpoint } from './checkpoint.ts';

export class SourceTail {
  /** the last step queued (never rejects: a failure is kept in `failure`) */
  private tail: Promise<void> = Promise.resolve();
  /** steps queued and not finished (transactions and confirms) */
  private steps = 0;
  private failure: Error | null = null;

  /** `failed`: told once when a step fails (to wake the session, which then ends) */
  constructor(
    private readonly checkpoint: Checkpoint,
    private readonly failed: (err: Error) => void,
  ) {}

  /** True while a step waits: a position is not confirmed yet. */
  get busy(): boolean {
    return this.steps > 0;
  }

  /** Throws the failure of a source transaction, if one failed. */
  check(): void {
    if (this.failure) throw this.failure;
  }

  /**
   * Queues a batch's source transaction, then the confirmation of `endLsn`. Returns once at most
   * this one is still running: the one before it (if any) has finished, so a batch's lanes never
   * wait for an earlier batch's source transaction while they hold their locks.
   */
  async transaction(work: () => Promise<void>, endLsn: bigint): Promise<void> {
    this.check();
    const before = this.tail;
    this.queue(async () => {
      await work();
      this.checkpoint.commit(endLsn);
    });
    await before;
    this.check();
  }

  /** Confirms `endLsn` after every source transaction queued before it. */
  confirm(endLsn: bigint): void {
    this.check();
    if (this.steps === 0) this.checkpoint.commit(endLsn);
    else this.queue(() => this.checkpoint.commit(endLsn));
  }

  /** Waits until every queued step has finished; throws the failure of one, if any. */
  async drain(): Promise<void> {
    await this.tail;
    this.check();
  }

  private queue(step: () => void | Promise<void>): void {
    this.steps += 1;
    this.tail = this.tail.then(async () => {
      try {
        if (!this.failure) await step();
      } catch (err) {
        if (!this.failure) {
          this.failure = err instanceof Error ? err : new Error(String(err));
          this.failed(this.failure);
        }
      } finally {
        this.steps -= 1;
      }
    });
  }
}
