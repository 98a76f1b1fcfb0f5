// The transfers a session remembers until their bookkeeping comes back through the WAL (no
// database): bounded, the oldest of a form forgotten first, a later set of a request kept.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InFlight } from '../src/dso/in-flight.ts';

const form = { schema: 'public', table: 'repair_request' };
const sent = (n: number) => ({ mapping: 'm', targetKey: `T-${n}`, master: null });

test('a full set forgets its oldest transfers first and stays within its limit', () => {
  const inFlight = new InFlight(1600);
  for (let n = 0; n < 10_000; n++) inFlight.set(form, `R-${n}`, sent(n));
  assert.ok(inFlight.size <= 1600 && inFlight.size >= 1500, `size ${inFlight.size}`);
  assert.equal(inFlight.get(form, 'R-0'), undefined, 'the oldest forgotten');
  assert.deepEqual(inFlight.get(form, 'R-9999'), sent(9999), 'the newest kept');
  // what is kept is the newest, without a gap
  const kept = Array.from({ length: 10_000 }, (_, n) => inFlight.get(form, `R-${n}`) !== undefined);
  const first = kept.indexOf(true);
  assert.ok(kept.slice(first).every(Boolean), 'the newest ones kept, in one run');
  assert.equal(10_000 - first, inFlight.size);
  inFlight.delete(form, 'R-9999');
  assert.equal(inFlight.get(form, 'R-9999'), undefined);
  assert.equal(10_000 - first - 1, inFlight.size);
});

// Fails if: a transfer to the request's own ID comes back with another target key or master, one
// to another ID loses its key, or mappingOf disagrees with get.
test('a transfer kept under the request ID and one under another ID read back as they were set', () => {
  const inFlight = new InFlight(100);
  const owned = { mapping: 'to-chicago', targetKey: 'R-1', master: ['chicago', 'repair_request'] as const };
  inFlight.set(form, 'R-1', owned);
  inFlight.set(form, 'R-2', { ...owned, targetKey: 'R-2' });
  inFlight.set(form, 'R-3', { mapping: 'copy', targetKey: 'C-3', master: null });
  inFlight.set(form, 'R-4', { mapping: 'copy', targetKey: 'R-4', master: null });
  assert.deepEqual(inFlight.get(form, 'R-1'), owned);
  assert.deepEqual(inFlight.get(form, 'R-2'), { ...owned, targetKey: 'R-2' });
  assert.deepEqual(inFlight.get(form, 'R-3'), { mapping: 'copy', targetKey: 'C-3', master: null });
  assert.deepEqual(inFlight.get(form, 'R-4'), { mapping: 'copy', targetKey: 'R-4', master: null });
  assert.deepEqual(
    ['R-1', 'R-3', 'R-4', 'R-5'].map((id) => inFlight.mappingOf(form, id)),
    ['to-chicago', 'copy', 'copy', undefined],
  );
  assert.equal(inFlight.size, 4);
});
