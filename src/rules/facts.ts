// The facts a filter's conditions see for one changed row, and the conversion of PostgreSQL's
// text output into the JSON-ish values rule authors compare against.

import type { RowChange, TextRow } from '../change.ts';

export type FactOp = 'insert' | 'update' | 'delete';

/** What json-rules-engine conditions can name as `fact` (see CONTRACT.md, "Facts"). */
export interface Facts {
  /** values after the change; before it, for a delete */
  row: Record<string, unknown>;
  /** values before an update (as much of them as the WAL carried), null otherwise */
  old: Record<string, unknown> | null;
  op: FactOp;
  /** names of the columns an update changed; [] when unknown (old row incomplete) or not an update */
  changed: string[];
  /** null when a user of this server made the change, else the server whose engine wrote it */
  origin: string | null;
  /** true when this copy owns the request */
  master: boolean;
}

/** The names a condition's `fact` may take, in a stable order. */
export const FACT_NAMES = ['row', 'old', 'op', 'changed', 'origin', 'master'] as const;
export type FactName = (typeof FACT_NAMES)[number];

/** PostgreSQL type OIDs that factValue converts (pg_type.oid, stable across versions). */
export const TypeOid = {
  bool: 16,
  int8: 20,
  int2: 21,
  int4: 23,
  oid: 26,
  json: 114,
  float4: 700,
  float8: 701,
  numeric: 1700,
  jsonb: 3802,
} as const;

/**
 * Converts one value as PostgreSQL printed it (text format) to the value a rule compares:
 * - bool -> boolean; int2, int4, oid -> number;
 * - float4, float8 -> number, except NaN and ±Infinity which stay strings;
 * - int8 and numeric -> number when that number denotes exactly the printed decimal value (and,
 *   for integers, is a safe integer); otherwise the text, unchanged (so `equal` against a
 *   string is the way to compare very large or very precise values);
 * - json, jsonb -> the parsed JSON value;
 * - anything else (text, varchar, uuid, dates, timestamps, arrays, ...) -> the text as is;
 * - null (SQL NULL) -> null; undefined (unchanged TOAST value) -> undefined.
 */
export function factValue(typeOid: number, text: string | null | undefined): unknown {
  if (text === null || text === undefined) return text;
  switch (typeOid) {
    case TypeOid.bool:
      return text === 't' || text === 'true' ? true : text === 'f' || text === 'false' ? false : text;
    case TypeOid.int2:
    case TypeOid.int4:
    case TypeOid.oid: {
      const n = Number(text);
      return Number.isSafeInteger(n) && /^-?\d+$/.test(text) ? n : text;
    }
    case TypeOid.float4:
    case TypeOid.float8: {
      const n = Number(text);
      return Number.isFinite(n) && text.trim() !== '' ? n : text;
    }
    case TypeOid.int8:
    case TypeOid.numeric:
      return exactNumber(text);
    case TypeOid.json:
    case TypeOid.jsonb:
      try {
        return JSON.parse(text) as unknown;
      } catch {
        return text;
      }
    default:
      return text;
  }
}

/** The number the decimal text denotes, when a double holds it exactly; else the text. */
function exactNumber(text: string): number | string {
  const canonical = canonicalDecimal(text);
  if (canonical === null) return text; // NaN, Infinity, or not a plain decimal
  const n = Number(text);
  if (!Number.isFinite(n)) return text;
  if (Number.isInteger(n) && !Number.isSafeInteger(n)) return text;
  return canonicalDecimal(String(n)) === canonical ? n : text;
}

/**
 * A canonical spelling of a decimal number ("-1.50" and "-1.5e0" both give "-15e-1"), or null
 * when the text is not a plain finite decimal. Zero is "0" whatever its sign.
 */
function canonicalDecimal(text: string): string | null {
  const m = /^([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/.exec(text);
  if (!m) return null;
  const [, sign, intPart = '', fracPart = '', expPart] = m;
  if (intPart === '' && fracPart === '') return null;
  let digits = (intPart + fracPart).replace(/^0+/, '');
  let exponent = (expPart ? Number(expPart) : 0) - fracPart.length;
  if (digits === '') return '0';
  const trailingZeros = /0*$/.exec(digits)![0].length;
  digits = digits.slice(0, digits.length - trailingZeros);
  exponent += trailingZeros;
  return `${sign === '-' ? '-' : ''}${digits}e${exponent}`;
}

/** Converts a text row with the relation's column types; columns the relation does not list keep their text. */
export function convertRow(row: TextRow, typeOfColumn: ReadonlyMap<string, number>): Record<string, unknown> {
  const converted: Record<string, unknown> = {};
  for (const [column, text] of Object.entries(row)) {
    const oid = typeOfColumn.get(column);
    converted[column] = oid === undefined ? text : factValue(oid, text);
  }
  return converted;
}

const typesOfRelation = new WeakMap<RowChange['relation'], ReadonlyMap<string, number>>();

function typesOf(relation: RowChange['relation'], baseTypes?: ReadonlyMap<number, number>): ReadonlyMap<string, number> {
  let types = typesOfRelation.get(relation);
  if (!types) {
    // a domain's values compare as its base type's (a domain over bigint gives numbers)
    types = new Map(relation.columns.map((c) => [c.name, baseTypes?.get(c.typeOid) ?? c.typeOid] as const));
    typesOfRelation.set(relation, types);
  }
  return types;
}

/** Converts only `columns` of a text row (the ones conditions read). */
function convertColumns(row: TextRow, types: ReadonlyMap<string, number>, columns: ReadonlySet<string>): Record<string, unknown> {
  const converted: Record<string, unknown> = {};
  for (const column of columns) {
    if (!Object.hasOwn(row, column)) continue;
    const oid = types.get(column);
    const text = row[column];
    converted[column] = oid === undefined ? text : factValue(oid, text);
  }
  return converted;
}

/**
 * The facts for one decoded change. `origin` is the server whose engine wrote the change (from
 * the transaction's replication origin), null for a change made by a user of this server.
 * With `columns`, `row` and `old` hold only those columns (the ones the conditions read).
 * `baseTypes` maps domain type OIDs to their base types' (see domainBaseTypes in the engine).
 */
export function buildFacts(
  change: RowChange,
  originServer: string | null,
  columns?: ReadonlySet<string> | null,
  baseTypes?: ReadonlyMap<number, number>,
): Facts {
  const types = typesOf(change.relation, baseTypes);
  const convert = (r: TextRow) => (columns ? convertColumns(r, types, columns) : convertRow(r, types));
  const sourceRow = change.op === 'delete' ? change.old : change.new;
  const row = sourceRow ? convert(sourceRow) : {};
  const old = change.op === 'update' && change.old ? convert(change.old) : null;
  return {
    row,
    old,
    op: change.op,
    changed: change.op === 'update' ? changedColumns(change) : [],
    origin: originServer,
    master: isMaster(row),
  };
}

/** Columns whose text differs between old and new, when the old row is complete; else []. */
function changedColumns(change: RowChange): string[] {
  const { old, new: next } = change;
  if (!old || !next) return [];
  const columns = change.relation.columns;
  const oldIsComplete = columns.every((c) => Object.hasOwn(old, c.name) && old[c.name] !== undefined);
  if (!oldIsComplete) return [];
  const changed: string[] = [];
  for (const { name } of columns) {
    const after = next[name];
    // undefined: an unchanged TOAST value the WAL did not repeat, so unchanged
    if (after !== undefined && after !== old[name]) changed.push(name);
  }
  return changed;
}

/** dso_master === true; a form without the distributed columns (or a key-only old row) counts as master. */
function isMaster(row: Record<string, unknown>): boolean {
  if (!Object.hasOwn(row, 'dso_master') || row.dso_master === undefined) return true;
  return row.dso_master === true;
}
