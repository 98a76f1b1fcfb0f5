// What an apply lane runs: a group of operations, applied by one statement (or a few), isolated
// under a savepoint or not, and, when it is one statement, pipelined.
import type pg from 'pg';

/** A set of operations applied by one statement (or a few), in the lane's open transaction. */
export interface OpGroup<F = unknown> {
  readonly size: number;
  /** true when the group holds an operation on that request of that table (schema.table) */
  has(table: string, requestId: string): boolean;
  /**
   * Applies the group; `isolated` (the default): under a savepoint, a bad row becomes a failure
   * and the rest is applied. Not isolated: one attempt, an error ends the transaction. A group
   * can run again after its transaction rolled back (its rows are data, not state).
   */
  execute(client: pg.ClientBase, isolated?: boolean): Promise<F[]>;
  /**
   * The group as one statement that can be sent before the results of the statements ahead of
   * it are in (pipelined, not isolated); null when it takes more than one (COPY, say).
   */
  piped?(): PipedStatement<F> | null;
}

/** A group's one statement, sent pipelined; `check` reads its result. */
export interface PipedStatement<F> {
  query: pg.QueryConfig;
  /** the failures the result shows; null: the group needs more statements (it runs again, isolated) */
  check(result: pg.QueryResult): F[] | null;
}
