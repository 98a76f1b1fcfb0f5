// pgoutput message parsing: pg-logical-replication's parser for the wire format of the rare
// messages (begin, commit, origin, relation, truncate, logical messages); row changes are read by
// ./tuple.ts, their values kept as PostgreSQL's text and decoded only when read. The stream, acknowledgements, keepalives and flow
// control are ours (src/decoder/stream.ts): the library's versions of those lose transactions
// (see ../shared/DEPENDENCIES.md).
import parserModule from 'pg-logical-replication/dist/output-plugins/pgoutput/pgoutput-parser.js';
import type { Relation, RowChange } from '../change.ts';
import { parseLsn } from '../change.ts';
import { WireChange } from './tuple.ts';

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
  | { tag: 'truncate'; relations: LibraryRelation[] }
  | { tag: 'message'; transactional: boolean; messageLsn: string | null; prefix: string; content: Uint8Array };

interface LibraryParser {
  parse(buf: Buffer): LibraryMessage;
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
  private readonly parser: LibraryParser = new PgoutputParser();
  private readonly relations = new Map<number, Relation>();

  /** Decodes one XLogData payload; `lsn` is the message's WAL position. */
  decode(payload: Buffer, lsn: bigint): DecodedMessage {
    const tag = payload[0];
    // row changes, the bulk of the stream: read here, their values when the engine reads them
    if (tag === 0x49 /* I */ || tag === 0x55 /* U */ || tag === 0x44 /* D */)
      return { kind: 'change', change: WireChange.of(payload, lsn, this.knownRelation) };
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

  private readonly knownRelation = (oid: number): Relation => {
    const relation = this.relations.get(oid);
    if (!relation) throw new Error(`a change of relation ${oid}, not announced by a relation message`);
    return relation;
  };

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
