// Groups a lane's operations into set-based statements while keeping the order of changes to
// each request. Groups run in the order they were opened. A request is in at most one open
// group (group()), or, for a buffer of whole changes (stage()), in several as long as running
// the groups in their order gives each request the order of its latest change: a group keeps
// only a request's latest operation (its statements pick the latest change per request).
import type { ApplyLane, OpGroup } from './lane.ts';

/** How many times its chunk a group may grow to within one source transaction (see added()). */
const OVERFULL = 2;

interface Staged<G> {
  key: string;
  create: () => G;
  add: (group: G) => void;
}

export class LaneBuffer<F> {
  private readonly open = new Map<string, OpGroup<F>>();
  /** the place of each open group in the order they run */
  private readonly rank = new Map<string, number>();
  private opened = 0;
  /** groups closed in order but not submitted, in a buffer that holds everything until flush */
  private readonly held: OpGroup<F>[] = [];
  /** the operations of the change being staged (see stage()) */
  private staged: { table: string; requestId: string; token: string | bigint; ops: Staged<OpGroup<F>>[] } | null = null;

  constructor(
    readonly lane: ApplyLane<F>,
    private readonly chunkRows: number,
    private readonly hold = false,
  ) {}

  /** The open group `groupKey` (created if needed), ready to take an operation on a request. */
  group<G extends OpGroup<F>>(groupKey: string, table: string, requestId: string, create: () => G): G {
    this.commitStaged();
    let group = this.open.get(groupKey);
    if (this.open.size > (group ? 1 : 0)) {
      for (const [key, other] of this.open) {
        if (key !== groupKey && other.has(table, requestId)) {
          this.closeAll();
          group = undefined;
          break;
        }
      }
    }
    return (group ?? this.createGroup(groupKey, create)) as G;
  }

  /**
   * Stages an operation of one change (`token`) on a request; a change's operations are added
   * together once the next change (or a flush) comes. They join the open groups when that keeps
   * the request's order: every other open group holding the request runs before the change's
   * groups, and the change's groups run in the change's order. Else the open groups are closed
   * first. So a change sent to several targets (a broadcast) does not split the groups.
   */
  stage<G extends OpGroup<F>>(
    token: string | bigint,
    groupKey: string,
    table: string,
    requestId: string,
    create: () => G,
    add: (group: G) => void,
  ): void {
    const s = this.staged;
    if (!s || s.token !== token || s.requestId !== requestId || s.table !== table) {
      this.commitStaged();
      this.staged = { table, requestId, token, ops: [] };
    }
    this.staged!.ops.push({ key: groupKey, create, add: add as (group: OpGroup<F>) => void });
  }

  private commitStaged(): void {
    const s = this.staged;
    if (!s) return;
    this.staged = null;
    if (s.ops.length === 1) {
      // one operation joining the group opened last: nothing runs after that group, the order holds
      const op = s.ops[0]!;
      const group = this.open.get(op.key);
      if (group && this.rank.get(op.key) === this.opened - 1) return op.add(group);
    }
    const keys = s.ops.map((op) => op.key);
    let last = -1;
    let fits = true;
    // the change's groups that are open, in the change's order, run in that order; new ones open after them
    for (const key of keys) {
      const rank = this.rank.get(key);
      if (rank === undefined) last = Infinity;
      else if (rank < last) fits = false;
      else last = rank;
    }
    const first = Math.min(...keys.map((key) => this.rank.get(key) ?? Infinity));
    if (fits) {
      for (const [key, other] of this.open) {
        if (!keys.includes(key) && this.rank.get(key)! > first && other.has(s.table, s.requestId)) {
          fits = false;
          break;
        }
      }
    }
    if (!fits) this.closeAll();
    for (const op of s.ops) {
      const group = this.open.get(op.key) ?? this.createGroup(op.key, op.create);
      op.add(group);
    }
  }

  private createGroup(groupKey: string, create: () => OpGroup<F>): OpGroup<F> {
    const group = create();
    this.open.set(groupKey, group);
    this.rank.set(groupKey, this.opened++);
    return group;
  }

  /** The open group `groupKey`, if any. */
  openGroup(groupKey: string): OpGroup<F> | undefined {
    return this.open.get(groupKey);
  }

  /**
   * Submits the group if it is far past full (unless this buffer holds everything until flush):
   * a full group waits for the end of its source transaction (endOfTransaction), so a request
   * that a transaction changes twice is written once, with its latest values, not first with a
   * state the source never committed. Only a transaction larger than OVERFULL groups splits.
   */
  added(groupKey: string): void {
    if (this.hold) return;
    const group = this.open.get(groupKey);
    if (group && group.size >= this.chunkRows * OVERFULL) this.submitOpen(groupKey, group);
  }

  /** A source transaction ended: its full groups go. */
  endOfTransaction(): void {
    if (this.hold) return;
    for (const [key, group] of this.open) if (group.size >= this.chunkRows) this.submitOpen(key, group);
  }

  private submitOpen(groupKey: string, group: OpGroup<F>): void {
    this.open.delete(groupKey);
    this.rank.delete(groupKey);
    this.lane.submit(group);
  }

  /** Closes the open groups in order: submitted now, or kept in order until flush. */
  private closeAll(): void {
    if (this.hold) for (const group of this.open.values()) this.held.push(group);
    else for (const group of this.open.values()) this.lane.submit(group);
    this.open.clear();
    this.rank.clear();
  }

  /** Submits every group not submitted yet, held ones first. */
  submitAll(): void {
    for (const group of this.takeAll()) this.lane.submit(group);
  }

  /** Every group not submitted yet, in order, taken out of the buffer (to run elsewhere). */
  takeAll(): OpGroup<F>[] {
    const groups = this.pendingGroups();
    this.held.length = 0;
    this.open.clear();
    this.rank.clear();
    return groups;
  }

  /** Every group not submitted yet, held or open, in order. */
  pendingGroups(): OpGroup<F>[] {
    this.commitStaged();
    return [...this.held, ...this.open.values()];
  }
}
