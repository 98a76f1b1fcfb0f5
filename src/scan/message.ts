// A batch of scanned requests on its way from a form scan (an escalation run, `pgdso sync`) to the
// server's engine: a transactional logical message in the source's WAL, written in the same
// transaction that locked the rows, read them and recorded the run's progress. The engine meets
// it in WAL order among the users' changes, so the rows it carries are never older than a change
// already applied, and a later change of a request comes after it. Signed with the server's scan
// key (pgdso.scan_key, readable by pgdso only): a message any other role emits is not acted on.
import { createHmac, timingSafeEqual } from 'node:crypto';
import type { ActionConfig } from '../config/types.ts';

export const SCAN_PREFIX = 'pgdso.scan';

export type ScanKind = 'escalation' | 'sync';

export interface ScanBatch {
  v: 1;
  kind: ScanKind;
  /** the escalation, or the mapping a sync carries */
  name: string;
  run: number;
  schema: string;
  table: string;
  /** the form's columns as the scan read them: name and type OID */
  columns: [string, number][];
  /** the matching requests, values as PostgreSQL prints them (text), aligned with columns */
  rows: (string | null)[][];
  actions: ActionConfig[];
}

/** The message content: the batch as JSON, then a newline, then its HMAC-SHA256 in hex. */
export function encodeBatch(batch: ScanBatch, key: string): string {
  const body = JSON.stringify(batch);
  return `${body}\n${sign(body, key)}`;
}

/** The batch, or an error that says why the message is not one pgdso signed. */
export function decodeBatch(content: Buffer, key: string): ScanBatch {
  const text = content.toString('utf8');
  const cut = text.lastIndexOf('\n');
  if (cut < 0) throw new Error('a pgdso.scan message without a signature');
  const body = text.slice(0, cut);
  const given = Buffer.from(text.slice(cut + 1), 'hex');
  const expected = Buffer.from(sign(body, key), 'hex');
  if (given.length !== expected.length || !timingSafeEqual(given, expected))
    throw new Error("a pgdso.scan message whose signature does not match this server's scan key (not written by pgdso)");
  const batch = JSON.parse(body) as ScanBatch;
  if (batch.v !== 1) throw new Error(`a pgdso.scan message of version ${String(batch.v)} (this pgdso reads version 1)`);
  return batch;
}

function sign(body: string, key: string): string {
  return createHmac('sha256', key).update(body).digest('hex');
}
