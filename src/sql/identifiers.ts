// Quoting of SQL identifiers and the names pgdso gives to its slots, origins and publication.
import { createHash } from 'node:crypto';

export function quoteIdent(name: string): string {
  if (name.includes('\u0000')) throw new Error('identifier contains a NUL character');
  return `"${name.replace(/"/g, '""')}"`;
}

/** An SQL string literal (standard_conforming_strings, the default since PostgreSQL 9.1). */
export function quoteLiteral(value: string): string {
  if (value.includes('\u0000')) throw new Error('literal contains a NUL character');
  return `'${value.replace(/'/g, "''")}'`;
}

export function qualified(schema: string, table: string): string {
  return `${quoteIdent(schema)}.${quoteIdent(table)}`;
}

/** The publication every enabled form of a server joins. */
export const PUBLICATION = 'pgdso';

/** Slot names are per cluster and must be [a-z0-9_]{1,63}: one slot per database (= server). */
export function slotName(database: string): string {
  const clean = database.toLowerCase().replace(/[^a-z0-9_]/g, '_');
  if (clean.length <= 48 && clean === database) return `pgdso_${clean}`;
  const hash = createHash('sha1').update(database).digest('hex').slice(0, 10);
  return `pgdso_${clean.slice(0, 40)}_${hash}`;
}

/**
 * Replication origin of one apply lane: writes by the engine serving `writer` into
 * `targetDatabase`, lane `pool`. Origin names are per cluster, hence the database name.
 * The decoder reads the writer back from it (`origin` fact, loop detection).
 */
export function originName(writer: string, pool: string, targetDatabase: string): string {
  return `pgdso:${writer}:${pool}:${targetDatabase}`;
}

/** The server whose engine wrote a change, from its origin name; null for anything else. */
export function writerOfOrigin(origin: string | null | undefined): string | null {
  if (!origin?.startsWith('pgdso:')) return null;
  const end = origin.indexOf(':', 6);
  return end > 6 ? origin.slice(6, end) : null;
}

/** The operations of a server, each run by one instance of its group at a time. */
export const OPERATIONS = ['dso', 'escalation', 'admin'] as const;
export type Operation = (typeof OPERATIONS)[number];

/** Advisory lock keys (two int4) used by pgdso; the first is a fixed namespace. */
export const LOCK_NAMESPACE = 0x70676473; // 'pgds'
export const LOCKS = {
  migrate: 1,
  operationDso: 10,
  operationEscalation: 11,
  operationAdmin: 12,
  /** held by the engine while it delivers a chunk of its queue, and by `pending discard --queued` and `pending retry` */
  queueDelivery: 20,
  /** held by the coordinator of a server group on its pinned control connection */
  coordinator: 30,
  /** taken for a moment while an instance joins the ranking (the first one gets rank 1) */
  groupJoin: 31,
} as const;
