// Who owns an operation, as the coordinator decides it from the board and the ranking (pure logic).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decide, type CurrentOwner } from '../src/group/ownership.ts';
import type { Candidate } from '../src/group/sql.ts';

const owner = (instanceId: string | null, state: string | null, rank: number | null): CurrentOwner => ({
  operation: 'dso',
  instanceId,
  state,
  rank,
});
const live = (...ids: [string, number | null][]): Candidate[] => ids.map(([instanceId, rank]) => ({ operation: 'dso', instanceId, rank }));

test('an operation without an owner is taken over by the best-ranked live instance', () => {
  assert.deepEqual(decide([owner(null, null, null)], live(['b', 1], ['c', null])), [
    { operation: 'dso', newOwner: 'b', oldOwner: null, type: 3 },
  ]);
});

test('a delinquent owner fails over to the next ranked live instance; a stopped one is taken over', () => {
  assert.deepEqual(decide([owner('a', 'delinquent', 1)], live(['b', 2])), [{ operation: 'dso', newOwner: 'b', oldOwner: 'a', type: 1 }]);
  assert.deepEqual(decide([owner('a', 'stopped', 1)], live(['b', 2])), [{ operation: 'dso', newOwner: 'b', oldOwner: 'a', type: 3 }]);
  assert.deepEqual(decide([owner('a', null, 1)], live(['b', 2])), [{ operation: 'dso', newOwner: 'b', oldOwner: 'a', type: 3 }]);
});

test('a better-ranked instance that comes back takes the operation back (relinquish)', () => {
  assert.deepEqual(decide([owner('b', 'online', 2)], live(['a', 1], ['b', 2])), [
    { operation: 'dso', newOwner: 'a', oldOwner: 'b', type: 2 },
  ]);
});

test('a live owner keeps its operation against instances of the same rank or worse, and when no one else is live', () => {
  assert.deepEqual(decide([owner('b', 'online', null)], live(['c', null], ['b', null])), []);
  assert.deepEqual(decide([owner('b', 'online', 1)], live(['a', 1], ['b', 1])), []);
  assert.deepEqual(decide([owner('b', 'online', 1)], live(['b', 1], ['c', 5])), []);
  assert.deepEqual(decide([owner('a', 'delinquent', 1)], []), []);
});
