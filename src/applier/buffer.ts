// Groups a lane's operations into set-based statements while keeping the order of changes to
// each request: a request is in at most one open group, and an operation on a request that is
// open in another group first submits every open group, in order.
import type { ApplyLane, OpGroup } from './lane.ts';

export class LaneBuffer<F> {
  private readonly open = new Map<string, OpGroup<F>>();
  /** groups closed in order but not submitted, in a buffer that holds everything until flush */
  private readonly held: OpGroup<F>[] = [];

  constructor(readonly lane: ApplyLane<F>, private readonly chunkRows: number, private readonly hold = false) {}

  /** The open group `groupKey` (created if needed), ready to take an operation on a request. */
  group<G extends OpGroup<F>>(groupKey: string, table: string, requestId: string, create: () => G): G {
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
    if (!group) {
      group = create();
      this.open.set(groupKey, group);
    }
    return group as G;
  }

  /** Submits the group if it is full (unless this buffer holds everything until flush). */
  added(groupKey: string): void {
    if (this.hold) return;
    const group = this.open.get(groupKey);
    if (group && group.size >= this.chunkRows) {
      this.open.delete(groupKey);
      this.lane.submit(group);
    }
  }

  /** Closes the open groups in order: submitted now, or kept in order until flush. */
  private closeAll(): void {
    if (this.hold) this.held.push(...this.open.values());
    else for (const group of this.open.values()) this.lane.submit(group);
    this.open.clear();
  }

  /** Submits every group not submitted yet, held ones first. */
  submitAll(): void {
    for (const group of this.pendingGroups()) this.lane.submit(group);
    this.held.length = 0;
    this.open.clear();
  }

  /** Every group not submitted yet, held or open, in order. */
  pendingGroups(): OpGroup<F>[] {
    return [...this.held, ...this.open.values()];
  }
}
