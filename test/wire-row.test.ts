// A change's new row kept as the message's bytes (RowSource, src/decoder/tuple.ts) decodes to the
// row the change showed: what a failed or queued transfer records, long after the change.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Relation } from '../src/change.ts';
import { WireChange } from '../src/decoder/tuple.ts';

const relation: Relation = {
  oid: 16384,
  schema: 'public',
  table: 'repair_request',
  replicaIdentity: 'full',
  columns: [
    { name: 'id', typeOid: 25, typeMod: -1, isKey: true },
    { name: 'description', typeOid: 25, typeMod: -1, isKey: false },
    { name: 'note', typeOid: 25, typeMod: -1, isKey: false },
  ],
};

type Value = string | null | 'unchanged';

/** pgoutput TupleData: per column 't' + length + text, 'n' (NULL) or 'u' (unchanged TOAST). */
function tuple(values: Value[]): Buffer {
  const parts: Buffer[] = [Buffer.from([0, values.length])];
  for (const v of values) {
    if (v === null) parts.push(Buffer.from('n'));
    else if (v === 'unchanged') parts.push(Buffer.from('u'));
    else {
      const text = Buffer.from(v, 'utf8');
      const length = Buffer.alloc(4);
      length.writeInt32BE(text.length);
      parts.push(Buffer.from('t'), length, text);
    }
  }
  return Buffer.concat(parts);
}

function message(tag: 'I' | 'U', oldValues: Value[] | null, newValues: Value[]): Buffer {
  const oid = Buffer.alloc(4);
  oid.writeUInt32BE(relation.oid);
  const old = oldValues ? [Buffer.from('O'), tuple(oldValues)] : [];
  return Buffer.concat([Buffer.from(tag), oid, ...old, Buffer.from('N'), tuple(newValues)]);
}

// Fails if: the kept bytes decode to another row than the change showed (an unchanged TOAST
// value not taken from the old row, a value of the old row instead of the new one), or they are
// the connection's buffer, which it reuses, rather than a copy.
test("a change's new row kept as its message's bytes decodes later to the row the change showed, unchanged TOAST values included", () => {
  const wire = message('U', ['R-1', 'a long description', 'old note'], ['R-1', 'unchanged', 'new note']);
  const change = WireChange.of(wire, 10n, () => relation);
  // one value read without decoding the row (the engine's own writes coming back)
  assert.deepEqual([change.newValue('note'), change.newValue('id'), change.newValue('missing')], ['new note', 'R-1', undefined]);
  const later = change.newLater();
  const shown = { ...change.new };
  assert.deepEqual(shown, { id: 'R-1', description: 'a long description', note: 'new note' });
  wire.fill(0); // the connection reuses its buffer for the next message
  assert.deepEqual({ ...later.row() }, shown);

  const insert = WireChange.of(message('I', null, ['R-2', null, 'é ✓']), 11n, () => relation);
  const insertLater = insert.newLater();
  assert.deepEqual({ ...insertLater.row() }, { id: 'R-2', description: null, note: 'é ✓' });
  assert.deepEqual({ ...insert.new }, { ...insertLater.row() });
});

// Fails if: decoded rows inherit anything (a column named constructor or __proto__ would read
// as Object.prototype's, or set the row's prototype instead of a value).
test('a decoded row holds columns named __proto__ and constructor as plain values, and inherits nothing', () => {
  const odd: Relation = {
    ...relation,
    columns: [
      { name: 'id', typeOid: 25, typeMod: -1, isKey: true },
      { name: '__proto__', typeOid: 25, typeMod: -1, isKey: false },
    ],
  };
  const oid = Buffer.alloc(4);
  oid.writeUInt32BE(odd.oid);
  const row = WireChange.of(Buffer.concat([Buffer.from('I'), oid, Buffer.from('N'), tuple(['R-3', 'x'])]), 12n, () => odd).new!;
  assert.deepEqual(Object.keys(row), ['id', '__proto__']);
  assert.equal(Object.getOwnPropertyDescriptor(row, '__proto__')?.value, 'x');
  assert.equal(row.constructor, undefined);
  assert.equal(row.toString, undefined);
  assert.equal(JSON.stringify(row), '{"id":"R-3","__proto__":"x"}');
});
