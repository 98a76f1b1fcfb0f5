// COPY ... FROM STDIN (text format) for set-based inserts: the fastest way PostgreSQL takes new
// rows, on both sides (no text[] literal to build and escape in the engine, no unnest and casts
// in the server's executor). A value is the column type's text form, as for INSERT; only
// backslash, tab, newline and carriage return are escaped, which the text of most values
// (JSON included) never holds. pg-copy-streams speaks the COPY sub-protocol on a pg client.
import type pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';

const NEEDS_ESCAPE = /[\\\t\n\r]/;
const ESCAPED: Readonly<Record<string, string>> = { '\\': '\\\\', '\t': '\\t', '\n': '\\n', '\r': '\\r' };

/** One field of a COPY text row: NULL as \N, the rest with the four special characters escaped. */
export function copyField(value: string | null | undefined): string {
  if (value === null || value === undefined) return '\\N';
  return NEEDS_ESCAPE.test(value) ? value.replace(/[\\\t\n\r]/g, (ch) => ESCAPED[ch]!) : value;
}

/** Runs `COPY <sql> FROM STDIN` with `data` (whole rows, each ending in a newline); the rows it wrote. */
export function copyIn(client: pg.ClientBase, sql: string, data: string): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const stream = client.query(copyFrom(sql));
    stream.on('error', reject);
    stream.on('finish', () => resolve(stream.rowCount));
    stream.end(data);
  });
}
