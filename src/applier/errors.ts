// One policy for database errors, by SQLSTATE class:
// - retry: the server cannot be reached or cannot serve now (connection 08, operator
//   intervention 57, insufficient resources 53, system errors 58, lock conflicts 40001/40P01/
//   55P03, and network errors without a SQLSTATE): the peer is down, its operations queue;
// - permanent: the engine lacks a privilege or cannot log in (42501, class 28, a database that
//   does not exist): a DBA must act; the message says what to grant;
// - data: a property of the row or the statement (data exceptions 22, integrity 23, syntax and
//   access rules 42 except 42501 and 42P01, raised by a trigger P0001): that row alone goes to
//   pgdso.pending_errors and the stream goes on;
// - unknown: any other code. The rows are isolated (bisected under savepoints) as for a data
//   error; a row that fails alone with it is a data error for that row.
export type ErrorClass = 'retry' | 'permanent' | 'data' | 'unknown';

export interface ClassifiedError {
  class: ErrorClass;
  sqlstate: string | null;
  message: string;
}

const RETRY_CLASSES = new Set(['08', '53', '57', '58']);
const RETRY_CODES = new Set(['40001', '40P01', '55P03']);
// 42P01: the target form itself is missing (dropped, renamed): every row would fail alike, so
// the peer's operations queue until the form is back
const PERMANENT_CODES = new Set(['42501', '42P01', '3D000']);
const DATA_CLASSES = new Set(['22', '23', '42']);
const DATA_CODES = new Set(['P0001', '428C9']);

export function sqlstateOf(err: unknown): string | null {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) ? code : null;
}

export function classOfSqlstate(sqlstate: string | null): ErrorClass {
  if (sqlstate === null) return 'retry'; // a socket error, a timeout: no answer from the server
  const cls = sqlstate.slice(0, 2);
  if (RETRY_CODES.has(sqlstate) || RETRY_CLASSES.has(cls)) return 'retry';
  if (PERMANENT_CODES.has(sqlstate) || cls === '28') return 'permanent';
  if (DATA_CODES.has(sqlstate) || DATA_CLASSES.has(cls)) return 'data';
  return 'unknown';
}

export function classifyError(err: unknown): ClassifiedError {
  const sqlstate = sqlstateOf(err);
  const message = err instanceof Error ? err.message : String(err);
  return { class: classOfSqlstate(sqlstate), sqlstate, message };
}

export function isDataError(err: unknown): boolean {
  return classifyError(err).class === 'data';
}

/** True when the rows of a failed statement are to be isolated: a data error, or an unknown code. */
export function isolatesRows(err: unknown): boolean {
  const cls = classifyError(err).class;
  return cls === 'data' || cls === 'unknown';
}
