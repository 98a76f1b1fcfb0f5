// Groups a lane's operations into set-based statements while keeping the order of changes to
// each request: a request is in at most one open group, and an operation on a request that is
// open in another group first submits every open group, in order.
import type { ApplyLane, OpGroup } from './lane.ts';

export class LaneBuffer<F> {
  private readonly open = new Map<string, OpGroup<F>>();
  private readonly ownerOf = new Map<string, string>();

  constructor(readonly lane: ApplyLane<F>, private readonly chunkRows: number, private readonly hold = false) {}

  /** The open group `groupKey` (created if needed), ready to take an operation on `requestKey`. */
  group<G extends OpGroup<F>>(groupKey: string, requestKey: string, create: () => G): G {
    const owner = this.ownerOf.get(requestKey);
    if (owner !== undefined && owner !== groupKey) this.submitAll();
    let group = this.open.get(groupKey);
    if (!group) {
      group = create();
      this.open.set(groupKey, group);
    }
    this.ownerOf.set(requestKey, groupKey);
    return group as G;
  }

  /** Submits the group if it is full (unless this buffer holds everything until flush). */
  added(groupKey: string): void {
    if (this.hold) return;
    const group = this.open.get(groupKey);
    if (group && group.size >= this.chunkRows) this.submit(groupKey, group);
  }

  get pending(): number {
    let n = 0;
    for (const group of this.open.values()) n += group.size;
    return n;
  }

  submitAll(): void {
    for (const [key, group] of [...this.open]) this.submit(key, group);
  }

  private submit(groupKey: string, group: OpGroup<F>): void {
    this.open.delete(groupKey);
    for (const key of group.keys()) if (this.ownerOf.get(key) === groupKey) this.ownerOf.delete(key);
    this.lane.submit(group);
  }
}
