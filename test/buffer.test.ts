// The grouping of a lane's operations into statements (no database: the order the groups would
// run in). A source copy's bookkeeping for a change broadcast to several targets must not split
// the groups into one statement per row, and a request's operations must still run in the order
// of its latest change.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LaneBuffer } from '../src/applier/buffer.ts';
import type { ApplyLane, OpGroup } from '../src/applier/lane.ts';

class Group implements OpGroup<never> {
  readonly ops: string[] = [];
  constructor(readonly key: string) {}
  get size() {
    return this.ops.length;
  }
  has(_table: string, requestId: string) {
    return this.ops.some((op) => op.startsWith(`${requestId}@`));
  }
  async execute() {
    return [];
  }
}

/** Runs changes (request, change, [group keys]) through a holding buffer; the groups in their run order. */
function run(changes: [string, string, string[]][]): string[] {
  const buffer = new LaneBuffer<never>({ submit() {} } as unknown as ApplyLane<never>, 1000, true);
  for (const [requestId, change, keys] of changes) {
    for (const key of keys)
      buffer.stage(
        change,
        key,
        't',
        requestId,
        () => new Group(key),
        (g) => g.ops.push(`${requestId}@${change}`),
      );
  }
  return buffer.pendingGroups().map((g) => `${(g as Group).key}[${(g as Group).ops.join(' ')}]`);
}

test('a broadcast changed again keeps one statement per target', () => {
  assert.deepEqual(
    run([
      ['r1', '1', ['A', 'B']],
      ['r2', '2', ['A', 'B']],
      ['r1', '3', ['A', 'B']],
      ['r2', '4', ['A', 'B']],
    ]),
    ['A[r1@1 r2@2 r1@3 r2@4]', 'B[r1@1 r2@2 r1@3 r2@4]'],
  );
});

test('a request whose latest change skips a group that runs later closes the groups first', () => {
  // sequential: A1 B1 A2; A then B would leave B1's effect last
  assert.deepEqual(
    run([
      ['r1', '1', ['A', 'B']],
      ['r1', '2', ['A']],
    ]),
    ['A[r1@1]', 'B[r1@1]', 'A[r1@2]'],
  );
});

test('a group that runs earlier may keep an older operation on the request', () => {
  assert.deepEqual(
    run([
      ['r1', '1', ['B']],
      ['r2', '2', ['A']],
      ['r1', '3', ['A']],
    ]),
    ['B[r1@1]', 'A[r2@2 r1@3]'],
  );
});

test('a change whose groups are open in the other order closes the groups first', () => {
  assert.deepEqual(
    run([
      ['r1', '1', ['A', 'B']],
      ['r2', '2', ['B', 'A']],
    ]),
    ['A[r1@1]', 'B[r1@1]', 'B[r2@2]', 'A[r2@2]'],
  );
  // a new group opens after the open ones: fine at the end of the change, not before an open one
  assert.deepEqual(
    run([
      ['r1', '1', ['A']],
      ['r1', '2', ['A', 'C']],
    ]),
    ['A[r1@1 r1@2]', 'C[r1@2]'],
  );
  assert.deepEqual(
    run([
      ['r1', '1', ['A']],
      ['r1', '2', ['C', 'A']],
    ]),
    ['A[r1@1]', 'C[r1@2]', 'A[r1@2]'],
  );
});
