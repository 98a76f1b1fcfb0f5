// The server's logical slot (pgoutput), one per database: created by `forms enable` (bounded,
// naming the transactions it waits for) and by the engine when it is missing.
import type pg from 'pg';
import { quoteLiteral } from './identifiers.ts';
import { FormError } from './form-catalog.ts';

/**
 * Creates the server's slot unless it exists; true when created now. It waits for the
 * transactions running at that moment to end: bounded by `timeoutMs`, and the sessions it
 * waited for are named.
 */
export async function createSlot(client: pg.ClientBase, slot: string, timeoutMs: number): Promise<boolean> {
  const existing = await client.query('SELECT plugin FROM pg_replication_slots WHERE slot_name = $1', [slot]);
  if (existing.rowCount) return ensureSlot(client, slot);
  await client.query(`SET statement_timeout = ${Math.max(1, Math.round(timeoutMs))}`);
  try {
    return await ensureSlot(client, slot);
  } catch (err) {
    if ((err as { code?: string }).code !== '57014')
      throw new Error(`creating the replication slot ${slot} failed, nothing was changed: ${(err as Error).message}`, { cause: err });
    const writers = await client.query(
      `SELECT pid, usename, application_name, state, xact_start FROM pg_stat_activity
        WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() ORDER BY xact_start`,
    );
    const open = writers.rows.map(
      (r) =>
        `pid ${r.pid} (user ${r.usename}, application ${quoteLiteral(r.application_name ?? '')}, ${r.state}, ` +
        `since ${new Date(r.xact_start).toISOString()})`,
    );
    throw new Error(
      `creating the replication slot ${slot} waits for the transactions running now to end, and ${timeoutMs} ms passed; ` +
        `nothing was changed. Open transactions: ${open.join('; ') || 'none now'}`,
      { cause: err },
    );
  } finally {
    await client.query('RESET statement_timeout').catch(() => {});
  }
}

/** Creates the server's logical slot (pgoutput) unless it exists. Returns true if created. */
export async function ensureSlot(client: pg.ClientBase, slot: string): Promise<boolean> {
  const existing = await client.query('SELECT plugin FROM pg_replication_slots WHERE slot_name = $1', [slot]);
  if (existing.rowCount) {
    if (existing.rows[0].plugin !== 'pgoutput')
      throw new FormError(`replication slot ${slot} exists with plugin ${existing.rows[0].plugin}, not pgoutput`);
    return false;
  }
  try {
    await client.query(`SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, [slot]);
    return true;
  } catch (err) {
    if ((err as { code?: string }).code === '42710') return false; // created meanwhile by another instance
    throw err;
  }
}
