// The change events that flow from the decoder to the engine. A leaf module: imports nothing.

export type ChangeOp = 'insert' | 'update' | 'delete';

/** A value as PostgreSQL printed it (text format), null for SQL NULL, undefined for an
 *  unchanged TOAST value the decoder was not given (never write it). */
export type TextValue = string | null | undefined;
export type TextRow = Record<string, TextValue>;

export interface RelationColumn {
  name: string;
  typeOid: number;
  typeMod: number;
  /** part of the replica identity key */
  isKey: boolean;
}

export interface Relation {
  oid: number;
  schema: string;
  table: string;
  replicaIdentity: 'default' | 'nothing' | 'full' | 'index';
  columns: readonly RelationColumn[];
}

export interface TxBegin {
  xid: number;
  /** LSN of the commit record (start). Unique per transaction, increasing. */
  finalLsn: bigint;
  commitTime: Date;
}

export interface TxCommit {
  finalLsn: bigint;
  /** LSN just past the commit record: the position to confirm once applied. */
  endLsn: bigint;
  commitTime: Date;
}

export interface RowChange {
  op: ChangeOp;
  relation: Relation;
  /** WAL position of this change (unique within the source's WAL) */
  lsn: bigint;
  /** values after the change; null for a delete */
  new: TextRow | null;
  /** values before the change (replica identity full), or the key only, or null */
  old: TextRow | null;
  /** one value of `new`, read without decoding the others (when the change can) */
  newValue?(column: string): TextValue;
  /** `new`, to be decoded again when needed (from the message's bytes, when the change can) */
  newLater?(): RowSource;
}

/**
 * A row kept for a rare later use (a failure's record, the queue): decoding it again from bytes
 * keeps it off the JS heap meanwhile, where a decoded row (a dictionary of strings per column)
 * would be copied by every garbage collection until the use passes.
 */
export interface RowSource {
  row(): TextRow | null;
}

/** A non-transactional or transactional logical message (pg_logical_emit_message). */
export interface LogicalMessage {
  lsn: bigint;
  prefix: string;
  content: Buffer;
  transactional: boolean;
}

export function formatLsn(lsn: bigint): string {
  return `${(lsn >> 32n).toString(16).toUpperCase()}/${(lsn & 0xffffffffn).toString(16).toUpperCase()}`;
}

export function parseLsn(text: string): bigint {
  const m = /^([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})$/.exec(text);
  if (!m) throw new Error(`not an LSN: ${text}`);
  return (BigInt(`0x${m[1]}`) << 32n) | BigInt(`0x${m[2]}`);
}
