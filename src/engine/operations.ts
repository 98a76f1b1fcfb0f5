// Which operation each row of a lane's group is: noted when the operation joins its group, so a
// row that fails is recorded in pending_errors with its whole operation, for a retry.
import { parseLsn } from '../change.ts';
import type { LaneBuffer } from '../applier/buffer.ts';
import type { OpGroup } from '../applier/lane.ts';
import { changeKey, type ApplyFailure } from '../applier/sets.ts';
import { withOp, type PendingEntry } from '../queue/sql.ts';

/**
 * An operation whose queued form (PendingEntry) is built only when it is queued or fails, which
 * most rows never are. What it keeps until its group has run is copied by every young-generation
 * garbage collection meanwhile: it keeps the fields it is built from and the row as the
 * message's bytes (RowSource), not the decoded row (bulk load: a third less time in scavenges,
 * peak RSS -40 MB).
 */
export interface LazyEntry {
  build(): PendingEntry;
}

/** An operation, or what builds it. */
export type Operation = PendingEntry | LazyEntry;

export function entryOf(operation: Operation): PendingEntry {
  return 'build' in operation ? operation.build() : operation;
}

export class GroupOperations {
  /** each open or running group's operations, in order (keyed only when one of them fails) */
  private readonly byGroup = new WeakMap<object, Operation[]>();

  /**
   * The operation just added to the open group `groupKey` is noted on that group (see the
   * lanes' `annotate`), or what builds it should it fail; the group goes if full.
   */
  added(buffer: LaneBuffer<ApplyFailure>, groupKey: string, entry: Operation): void {
    const group = buffer.openGroup(groupKey)!;
    let ops = this.byGroup.get(group);
    if (!ops) this.byGroup.set(group, (ops = []));
    ops.push(entry);
    buffer.added(groupKey);
  }

  /** Failures of a group with the operation each one is. */
  annotate(group: OpGroup<ApplyFailure>, failures: ApplyFailure[]): ApplyFailure[] {
    const ops = this.byGroup.get(group);
    if (failures.length === 0 || !ops) return failures;
    // a request's later operation in the group is the one that ran
    const entries = ops.map(entryOf);
    const byKey = new Map(entries.map((entry) => [entryKey(entry), entry]));
    return failures.map((f) => withOp(f, byKey.get(changeKey(f.type, f.mapping.name, f.requestId, f.lsn))));
  }
}

/** The key of a queued operation, as changeKey gives it for its failure. */
export function entryKey(entry: PendingEntry): string {
  return changeKey(entry.type, entry.mapping.name, entry.op.requestId, parseLsn(entry.op.lsn));
}
