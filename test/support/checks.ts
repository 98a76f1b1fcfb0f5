// Small readings of a DSO environment that several test files make.
import type { CliResult, DsoEnv } from './dso.ts';

export interface ErrorRow {
  request_id: string;
  error: string;
  sqlstate: string | null;
}

/** A command's result, for assertion messages. */
export function show(r: CliResult): string {
  return `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
}

/** The number of rows a query returns. */
export async function count(e: DsoEnv, server: string, sql: string, params: unknown[] = []): Promise<number> {
  return (await e.query<{ n: number }>(server, `SELECT count(*)::int AS n FROM (${sql}) AS q`, params))[0]!.n;
}

/** A server's pending_errors, by request. */
export const errorsOn = (e: DsoEnv, server = 'sf') =>
  e.query<ErrorRow>(server, 'SELECT request_id, error, sqlstate FROM pgdso.pending_errors ORDER BY request_id');

/** sf's queue, oldest first. */
export const queued = (e: DsoEnv) =>
  e.query<{ request_id: string; status: string; last_error: string | null }>(
    'sf',
    'SELECT request_id, status, last_error FROM pgdso.pending ORDER BY id',
  );
