// The row changes of pgoutput's Insert, Update and Delete messages, read from the wire without
// the library's parser: the message is copied when it arrives (the connection reuses its buffer)
// and its tuples are decoded into text rows only when something reads them. The engine's own
// writes that come back through the WAL (its bookkeeping on source copies) are mostly never
// read, so they cost a copy of their bytes instead of one string per column.
import type { ChangeOp, Relation, RowChange, RowSource, TextRow, TextValue } from '../change.ts';

const KIND_TEXT = 0x74; // t
const KIND_NULL = 0x6e; // n
const KIND_UNCHANGED_TOAST = 0x75; // u: an unchanged TOAST value, not sent
const TUPLE_NEW = 0x4e; // N
const TUPLE_KEY = 0x4b; // K: the replica identity key only
const TUPLE_OLD = 0x4f; // O: the whole old row (replica identity full)

/**
 * A decoded row: an object whose prototype has no properties at all (so a column named
 * `__proto__` or `constructor` is an ordinary own value, as with Object.create(null)), made by a
 * constructor so that it has fast properties: the rows of one relation share their hidden
 * class, where Object.create(null) makes each row a hash table (about three times the memory,
 * and slower to build).
 */
const Row = function Row() {} as unknown as new () => TextRow;
Row.prototype = Object.create(null);

/**
 * Reads one TupleData at `at`: every column keeps PostgreSQL's text (values are cast on the
 * target, so nothing is lost to JS numbers or Dates). Returns the row and where it ends.
 */
export function readTuple(b: Buffer, at: number, relation: Relation, unchangedToastFallback: TextRow | null): [TextRow, number] {
  let p = at;
  const fields = b.readUInt16BE(p);
  p += 2;
  const tuple = new Row();
  const { columns } = relation;
  if (fields > columns.length)
    throw new Error(`a tuple of ${fields} columns for ${relation.schema}.${relation.table} of ${columns.length}`);
  for (let i = 0; i < fields; i++) {
    const name = columns[i]!.name;
    const kind = b[p++];
    if (kind === KIND_TEXT) {
      const length = b.readInt32BE(p);
      p += 4;
      const stop = p + length;
      if (stop > b.length) throw new Error('unexpected end of message');
      tuple[name] = b.toString('utf8', p, stop);
      p = stop;
    } else if (kind === KIND_NULL) {
      tuple[name] = null;
    } else if (kind === KIND_UNCHANGED_TOAST) {
      tuple[name] = unchangedToastFallback?.[name];
    } else {
      // 'b' (binary) is never requested
      throw new Error(`unexpected tuple value kind ${String.fromCharCode(kind ?? 0)}`);
    }
  }
  return [tuple, p];
}

/** Skips one TupleData at `at`; returns where it ends. */
function skipTuple(b: Buffer, at: number): number {
  let p = at;
  const fields = b.readUInt16BE(p);
  p += 2;
  for (let i = 0; i < fields; i++) {
    const kind = b[p++];
    if (kind === KIND_TEXT) p += 4 + b.readInt32BE(p);
    else if (kind !== KIND_NULL && kind !== KIND_UNCHANGED_TOAST)
      throw new Error(`unexpected tuple value kind ${String.fromCharCode(kind ?? 0)}`);
  }
  if (p > b.length) throw new Error('unexpected end of message');
  return p;
}

const columnIndexes = new WeakMap<Relation, Map<string, number>>();

/** The place of a column in a relation's tuples, -1 if it has none (looked up once per relation). */
function columnIndex(relation: Relation, column: string): number {
  let indexes = columnIndexes.get(relation);
  if (!indexes) columnIndexes.set(relation, (indexes = new Map(relation.columns.map((c, i) => [c.name, i]))));
  return indexes.get(column) ?? -1;
}

/** A key tuple ('K'): the key columns only (the others are sent as placeholders). */
function keyOnly(row: TextRow, relation: Relation): TextRow {
  const key = new Row();
  for (const column of relation.columns) if (column.isKey) key[column.name] = row[column.name] ?? undefined;
  return key;
}

/** A row change whose tuples are decoded on first read. */
export class WireChange implements RowChange {
  private readonly raw: Buffer;
  private decodedNew: TextRow | null = null;
  private decodedOld: TextRow | null = null;
  private later: WireRow | null = null;

  private constructor(
    readonly op: ChangeOp,
    readonly relation: Relation,
    readonly lsn: bigint,
    raw: Buffer,
    /** where the old tuple starts (after its K or O byte), -1 without one */
    private readonly oldAt: number,
    private readonly oldIsKey: boolean,
    /** where the new tuple starts (after its N byte), -1 without one */
    private readonly newAt: number,
  ) {
    this.raw = raw;
  }

  /**
   * An Insert ('I'), Update ('U') or Delete ('D') message (`payload` is copied), of a relation
   * announced before it; its framing is checked now, its values when they are read.
   */
  static of(payload: Buffer, lsn: bigint, relationOf: (oid: number) => Relation): WireChange {
    const raw = Buffer.from(payload);
    const tag = raw[0];
    const relation = relationOf(raw.readUInt32BE(1));
    const sub = raw[5];
    if (tag === 0x49 /* I */) {
      if (sub !== TUPLE_NEW) throw new Error(`unexpected insert tuple ${String.fromCharCode(sub ?? 0)}`);
      skipTuple(raw, 6);
      return new WireChange('insert', relation, lsn, raw, -1, false, 6);
    }
    if (sub !== TUPLE_NEW && sub !== TUPLE_KEY && sub !== TUPLE_OLD)
      throw new Error(`unknown submessage key ${String.fromCharCode(sub ?? 0)}`);
    if (tag === 0x44 /* D */) {
      if (sub === TUPLE_NEW) throw new Error('a delete without an old tuple');
      skipTuple(raw, 6);
      return new WireChange('delete', relation, lsn, raw, 6, sub === TUPLE_KEY, -1);
    }
    if (sub === TUPLE_NEW) {
      skipTuple(raw, 6);
      return new WireChange('update', relation, lsn, raw, -1, false, 6);
    }
    const oldEnd = skipTuple(raw, 6);
    if (raw[oldEnd] !== TUPLE_NEW) throw new Error('an update without its new tuple');
    skipTuple(raw, oldEnd + 1);
    return new WireChange('update', relation, lsn, raw, 6, sub === TUPLE_KEY, oldEnd + 1);
  }

  /** Values after the change; null for a delete. */
  get new(): TextRow | null {
    if (this.newAt < 0) return null;
    if (!this.decodedNew) {
      // an unchanged TOAST value is taken from the old row when the whole old row was sent
      const fallback = this.oldAt >= 0 && !this.oldIsKey ? this.old : null;
      this.decodedNew = readTuple(this.raw, this.newAt, this.relation, fallback)[0];
    }
    return this.decodedNew;
  }

  /** Values before the change (replica identity full), or the key only, or null. */
  get old(): TextRow | null {
    if (this.oldAt < 0) return null;
    if (!this.decodedOld) {
      const [row] = readTuple(this.raw, this.oldAt, this.relation, null);
      this.decodedOld = this.oldIsKey ? keyOnly(row, this.relation) : row;
    }
    return this.decodedOld;
  }

  /** The new row, decoded again from the message's bytes when a failure or the queue needs it. */
  newLater(): RowSource {
    // one per change, whatever number of transfers keep it (a broadcast)
    this.later ??= new WireRow(this.raw, this.relation, this.oldAt, this.oldIsKey, this.newAt);
    return this.later;
  }

  /** One value of the new row, read without decoding the others. */
  newValue(column: string): TextValue {
    if (this.newAt < 0) return undefined;
    if (this.decodedNew) return this.new?.[column];
    const index = columnIndex(this.relation, column);
    if (index < 0) return undefined;
    const b = this.raw;
    let p = this.newAt;
    const fields = b.readUInt16BE(p);
    p += 2;
    for (let i = 0; i < fields; i++) {
      const kind = b[p++];
      if (kind === KIND_TEXT) {
        const length = b.readInt32BE(p);
        p += 4;
        if (i === index) return b.toString('utf8', p, p + length);
        p += length;
      } else if (i === index) {
        // an unchanged TOAST value comes from the old row
        return kind === KIND_NULL ? null : this.new?.[column];
      }
    }
    return undefined;
  }
}

/** A change's new row kept as the message's bytes (see RowSource). */
class WireRow implements RowSource {
  constructor(
    private readonly raw: Buffer,
    private readonly relation: Relation,
    private readonly oldAt: number,
    private readonly oldIsKey: boolean,
    private readonly newAt: number,
  ) {}

  row(): TextRow | null {
    if (this.newAt < 0) return null;
    const fallback = this.oldAt >= 0 && !this.oldIsKey ? readTuple(this.raw, this.oldAt, this.relation, null)[0] : null;
    return readTuple(this.raw, this.newAt, this.relation, fallback)[0];
  }
}
