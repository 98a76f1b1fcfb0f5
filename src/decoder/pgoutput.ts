// pgoutput message parsing, using pg-logical-replication's parser for the wire format only.
// Every column keeps PostgreSQL's text (identity parsers): values are cast on the target, so
// nothing is lost to JS numbers or Dates. The stream, acknowledgements, keepalives and flow
// control are ours (src/decoder/stream.ts): the library's versions of those lose transactions
// (see ../shared/DEPENDENCIES.md).
import parserModule from 'pg-logical-replication/dist/output-plugins/pgoutput/pgoutput-parser.js';
import type { Relation, RowChange, TextRow } from '../change.ts';
import { parseLsn } from '../change.ts';

const { PgoutputParser } = parserModule as unknown as { PgoutputParser: new () => LibraryParser };

interface LibraryRelation {
  relationOid: number;
  schema: string;
  name: string;
  replicaIdentity: Relation['replicaIdentity'];
  columns: { name: string; flags: number; typeOid: number; typeMod: number; parser: (raw: unknown) => unknown }[];
}
type LibraryMessage =
  | { tag: 'begin'; commitLsn: string | null; commitTime: bigint; xid: number }
  | { tag: 'commit'; commitLsn: string | null; commitEndLsn: string | null; commitTime: bigint }
  | { tag: 'origin'; originLsn: string | null; originName: string }
  | ({ tag: 'relation' } & LibraryRelation)
  | { tag: 'type' }
  | { tag: 'insert'; relation: LibraryRelation; new: TextRow }
  | { tag: 'update'; relation: LibraryRelation; key: TextRow | null; old: TextRow | null; new: TextRow }
  | { tag: 'delete'; relation: LibraryRelation; key: TextRow | null; old: TextRow | null }
  | { tag: 'truncate'; relations: LibraryRelation[] }
  | { tag: 'message'; transactional: boolean; messageLsn: string | null; prefix: string; content: Uint8Array };

interface LibraryParser {
  parse(buf: Buffer): LibraryMessage;
  readRelationColumn(reader: unknown): LibraryRelation['columns'][number];
}

const keepText = (raw: unknown) => raw;

/** The library's reader: its buffer and position (read directly on the per-value path). */
interface LibraryReader {
  _b: Buffer;
  _p: number;
}

/**
 * Parser that keeps the text PostgreSQL sent, read straight from the message buffer: the
 * library decodes each value through a subarray and TextDecoder, which is slower and drops a
 * leading U+FEFF from a value (TextDecoder consumes a byte order mark).
 */
class TextPgoutputParser extends PgoutputParser {
  override readRelationColumn(reader: unknown) {
    const column = super.readRelationColumn(reader);
    column.parser = keepText;
    return column;
  }

  readTuple(reader: LibraryReader, relation: LibraryRelation, unchangedToastFallback?: TextRow | null): TextRow {
    const b = reader._b;
    let p = reader._p;
    const end = (n: number) => {
      if (p + n > b.length) throw new Error('unexpected end of message');
      return p + n;
    };
    const fields = b.readUInt16BE(p);
    p += 2;
    const tuple: TextRow = Object.create(null);
    const { columns } = relation;
    for (let i = 0; i < fields; i++) {
      const name = columns[i]!.name;
      const kind = b[p++];
      if (kind === 0x74 /* t: text */) {
        const length = b.readInt32BE(p);
        p += 4;
        const stop = end(length);
        tuple[name] = b.toString('utf8', p, stop);
        p = stop;
      } else if (kind === 0x6e /* n: null */) {
        tuple[name] = null;
      } else if (kind === 0x75 /* u: unchanged TOAST value, not sent */) {
        tuple[name] = unchangedToastFallback?.[name];
      } else {
        // 'b' (binary) is never requested
        throw new Error(`unexpected tuple value kind ${String.fromCharCode(kind ?? 0)}`);
      }
    }
    reader._p = p;
    return tuple;
  }
}

export type DecodedMessage =
  | { kind: 'begin'; xid: number; finalLsn: bigint; commitTime: Date }
  | { kind: 'commit'; finalLsn: bigint; endLsn: bigint; commitTime: Date }
  | { kind: 'origin'; name: string }
  | { kind: 'relation'; relation: Relation }
  | { kind: 'change'; change: RowChange }
  | { kind: 'truncate'; relations: Relation[] }
  | { kind: 'message'; prefix: string; content: Buffer; transactional: boolean; lsn: bigint }
  | { kind: 'ignored' };

function lsnOf(text: string | null): bigint {
  return text ? parseLsn(text) : 0n;
}

function timeOf(micros: bigint): Date {
  return new Date(Number(micros / 1000n));
}

export class PgoutputDecoder {
  private readonly parser: LibraryParser = new TextPgoutputParser();
  private readonly relations = new Map<number, Relation>();

  /** Decodes one XLogData payload; `lsn` is the message's WAL position. */
  decode(payload: Buffer, lsn: bigint): DecodedMessage {
    const msg = this.parser.parse(payload);
    switch (msg.tag) {
      case 'begin':
        return { kind: 'begin', xid: msg.xid, finalLsn: lsnOf(msg.commitLsn), commitTime: timeOf(msg.commitTime) };
      case 'commit':
        return { kind: 'commit', finalLsn: lsnOf(msg.commitLsn), endLsn: lsnOf(msg.commitEndLsn), commitTime: timeOf(msg.commitTime) };
      case 'origin':
        return { kind: 'origin', name: msg.originName };
      case 'relation': {
        const relation = this.toRelation(msg);
        return { kind: 'relation', relation };
      }
      case 'insert':
        return { kind: 'change', change: { op: 'insert', relation: this.relationOf(msg.relation), lsn, new: msg.new, old: null } };
      case 'update':
        return {
          kind: 'change',
          change: { op: 'update', relation: this.relationOf(msg.relation), lsn, new: msg.new, old: msg.old ?? msg.key },
        };
      case 'delete':
        return {
          kind: 'change',
          change: { op: 'delete', relation: this.relationOf(msg.relation), lsn, new: null, old: msg.old ?? msg.key },
        };
      case 'truncate':
        return { kind: 'truncate', relations: msg.relations.map((r) => this.relationOf(r)) };
      case 'message':
        return {
          kind: 'message',
          prefix: msg.prefix,
          content: Buffer.from(msg.content),
          transactional: msg.transactional,
          lsn: lsnOf(msg.messageLsn),
        };
      default:
        return { kind: 'ignored' };
    }
  }

  private relationOf(lib: LibraryRelation): Relation {
    return this.relations.get(lib.relationOid) ?? this.toRelation(lib);
  }

  private toRelation(lib: LibraryRelation): Relation {
    const relation: Relation = Object.freeze({
      oid: lib.relationOid,
      schema: lib.schema,
      table: lib.name,
      replicaIdentity: lib.replicaIdentity,
      columns: Object.freeze(
        lib.columns.map((c) => Object.freeze({ name: c.name, typeOid: c.typeOid, typeMod: c.typeMod, isKey: (c.flags & 1) === 1 })),
      ),
    });
    this.relations.set(lib.relationOid, relation);
    return relation;
  }
}
