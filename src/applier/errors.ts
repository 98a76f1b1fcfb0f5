// One policy for database errors: retry (transient), permanent (config or privileges), or data
// (this row cannot be applied: it goes to pgdso.pending_errors and the stream goes on).
export type ErrorClass = 'retry' | 'permanent' | 'data';

export interface ClassifiedError {
  class: ErrorClass;
  sqlstate: string | null;
  message: string;
}

const DATA_CODES = new Set(['42703' /* undefined column */, '42804' /* datatype mismatch */, 'P0001' /* raised by a trigger */, '42P10']);
const RETRY_CODES = new Set(['40001', '40P01', '55P03', '57P01', '57P02', '57P03', '53300', '08000', '08003', '08006', '08001', '08004']);

export function sqlstateOf(err: unknown): string | null {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) ? code : null;
}

export function classifyError(err: unknown): ClassifiedError {
  const sqlstate = sqlstateOf(err);
  const message = err instanceof Error ? err.message : String(err);
  if (sqlstate) {
    if (sqlstate.startsWith('22') || sqlstate.startsWith('23') || DATA_CODES.has(sqlstate)) return { class: 'data', sqlstate, message };
    if (RETRY_CODES.has(sqlstate) || sqlstate.startsWith('08')) return { class: 'retry', sqlstate, message };
    if (sqlstate.startsWith('28') || sqlstate === '42501' || sqlstate === '42P01' || sqlstate === '3D000') return { class: 'permanent', sqlstate, message };
    return { class: 'retry', sqlstate, message };
  }
  return { class: 'retry', sqlstate: null, message };
}

export function isDataError(err: unknown): boolean {
  return classifyError(err).class === 'data';
}
