// What an apply lane's open transaction has run without savepoints (kept, to run again isolated
// should one of its groups fail: the outcome is then that of groups isolated from the start),
// and the failures (rows not applied) its groups reported, for the caller to take.
import type { OpGroup } from './op-group.ts';

/**
 * Rows a lane's transaction applies without savepoints before its groups run isolated: the
 * groups run so far are kept, to run again isolated should one fail (memory stays bounded).
 */
const OPTIMISTIC_ROWS = 4000;
/** Transactions that run isolated after one whose groups had to run again. */
const ISOLATED_AFTER_FAILURE = 32;

export class TransactionGroups<F> {
  /** the groups the open transaction ran without savepoints; null: its groups run isolated */
  private kept: OpGroup<F>[] | null = null;
  private keptRows = 0;
  private failures: F[] = [];
  /** failures recorded when the open transaction began (those after are its kept groups') */
  private failuresAtBegin = 0;
  private isolatedFor = 0;

  /** adds what the caller knows about a group's operations to its failures */
  constructor(private readonly annotate?: (group: OpGroup<F>, failures: F[]) => F[]) {}

  /** True while transactions run isolated, after one whose groups had to run again. */
  get isolating(): boolean {
    return this.isolatedFor > 0;
  }

  /** A transaction begins: its groups are kept unless it runs isolated (`isolating`). */
  begin(): void {
    this.failuresAtBegin = this.failures.length;
    this.kept = this.isolatedFor > 0 ? null : [];
    this.keptRows = 0;
    if (this.isolatedFor > 0) this.isolatedFor -= 1;
  }

  /** True when the open transaction's groups run without savepoints. */
  get optimistic(): boolean {
    return this.kept !== null;
  }

  /** True when a group of `size` rows can run without a savepoint still (the kept rows stay bounded). */
  fits(size: number): boolean {
    return this.keptRows + size <= OPTIMISTIC_ROWS;
  }

  /** Keeps a group about to run without a savepoint. */
  keep(group: OpGroup<F>): void {
    this.kept?.push(group);
    this.keptRows += group.size;
  }

  /** After a group ran: past the bound, the transaction's next groups run isolated. */
  ran(): void {
    if (this.keptRows > OPTIMISTIC_ROWS) this.end();
  }

  /**
   * The open transaction failed (it is rolled back): the kept groups, to run again isolated;
   * the failures they reported are dropped (they report them again), the next transactions run
   * isolated.
   */
  again(): OpGroup<F>[] {
    const groups = this.kept ?? [];
    this.kept = null;
    this.isolatedFor = ISOLATED_AFTER_FAILURE;
    this.failures.length = this.failuresAtBegin;
    return groups;
  }

  record(group: OpGroup<F>, failed: F[]): void {
    if (failed.length) for (const f of this.annotate ? this.annotate(group, failed) : failed) this.failures.push(f);
  }

  /** The failures collected since the last call: final, the open transaction's groups no longer run again. */
  take(): F[] {
    this.end();
    const taken = this.failures;
    this.failures = [];
    return taken;
  }

  /** The transaction ended (or runs isolated from now): nothing is kept. */
  end(): void {
    this.kept = null;
  }
}
