// The record of form scans in pgdso.scan_runs: a run is created once per (kind, name, fire time),
// claimed by the process that runs it (a claim raises its term and fences every earlier claimer
// out), and moved on by each batch in the batch's own transaction.
import type pg from 'pg';
import type { ScanKind } from './message.ts';

export type ScanTrigger = 'schedule' | 'manual' | 'sync';

export interface ScanRun {
  id: number;
  kind: ScanKind;
  name: string;
  fireTime: Date;
  trigger: ScanTrigger;
  form: string;
  args: Record<string, unknown>;
  term: number;
  instanceId: string | null;
  startedAt: Date;
  finishedAt: Date | null;
  lastKey: string | null;
  scanned: number;
  matched: number;
  errors: number;
  lastError: string | null;
  state: 'running' | 'done' | 'cancelled';
}

const COLUMNS = `id::int AS id, kind, name, fire_time AS "fireTime", trigger, form, args, term::int AS term,
  instance_id AS "instanceId", started_at AS "startedAt", finished_at AS "finishedAt", last_key AS "lastKey",
  scanned::float8 AS scanned, matched::float8 AS matched, errors::float8 AS errors, last_error AS "lastError", state`;

/** The run of this scan not finished yet, if any (the one to resume). */
export async function unfinishedRun(
  client: pg.ClientBase,
  kind: ScanKind,
  name: string,
  except: Iterable<number> = [],
): Promise<ScanRun | null> {
  const res = await client.query<ScanRun>(
    `SELECT ${COLUMNS} FROM pgdso.scan_runs WHERE kind = $1 AND name = $2 AND finished_at IS NULL
        AND NOT (id = ANY ($3::bigint[])) ORDER BY id LIMIT 1`,
    [kind, name, [...except].map(String)],
  );
  return res.rows[0] ?? null;
}

/** The latest fire time an escalation's schedule already ran for (finished or not), or null. */
export async function lastScheduledFire(client: pg.ClientBase, name: string): Promise<Date | null> {
  const res = await client.query<{ at: Date | null }>(
    `SELECT max(fire_time) AS at FROM pgdso.scan_runs WHERE kind = 'escalation' AND name = $1 AND trigger = 'schedule'`,
    [name],
  );
  return res.rows[0]?.at ?? null;
}

/** When this escalation was first seen by an owner (recorded now, with `now`, the first time). */
export async function firstSeen(client: pg.ClientBase, name: string, now: Date): Promise<Date> {
  await client.query(`INSERT INTO pgdso.escalation_state (escalation, first_seen_at) VALUES ($1, $2) ON CONFLICT DO NOTHING`, [name, now]);
  const res = await client.query<{ at: Date }>(`SELECT first_seen_at AS at FROM pgdso.escalation_state WHERE escalation = $1`, [name]);
  return res.rows[0]!.at;
}

export interface NewRun {
  kind: ScanKind;
  name: string;
  fireTime: Date;
  trigger: ScanTrigger;
  form: string;
  args?: Record<string, unknown>;
}

/** The run for (kind, name, fire time), created if it is new. */
export async function createRun(client: pg.ClientBase, run: NewRun): Promise<ScanRun> {
  await client.query(
    `INSERT INTO pgdso.scan_runs (kind, name, fire_time, trigger, form, args) VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (kind, name, fire_time) DO NOTHING`,
    [run.kind, run.name, run.fireTime, run.trigger, run.form, JSON.stringify(run.args ?? {})],
  );
  const res = await client.query<ScanRun>(`SELECT ${COLUMNS} FROM pgdso.scan_runs WHERE kind = $1 AND name = $2 AND fire_time = $3`, [
    run.kind,
    run.name,
    run.fireTime,
  ]);
  return res.rows[0]!;
}

/** Claim gated on owning the server's `escalation` operation under that term. */
export interface OwnerGate {
  instanceId: string;
  term: number;
}

/**
 * Claims a run for this process: its term goes up by one, so a batch of any earlier claimer
 * (a former owner frozen mid-batch) fails its check and rolls back. A batch in flight holds the
 * run's row: the claim waits for it, and after `lockTimeoutMs` terminates the backend that holds
 * it (its batch rolls back whole). With a gate, the claim only happens while that instance owns
 * `escalation` under that term. Null when the gate is closed or the run is finished.
 */
export async function claimRun(
  client: pg.ClientBase,
  { id, kind, name }: Pick<ScanRun, 'id' | 'kind' | 'name'>,
  instanceId: string,
  gate: OwnerGate | null,
  lockTimeoutMs = 2000,
): Promise<ScanRun | null> {
  for (let attempt = 0; ; attempt++) {
    try {
      await client.query('BEGIN');
      await client.query(`SET LOCAL lock_timeout = ${Math.max(1, Math.floor(lockTimeoutMs))}`);
      const res = await client.query<ScanRun>(
        `UPDATE pgdso.scan_runs SET term = term + 1, instance_id = $2, updated_at = now()
          WHERE id = $1 AND finished_at IS NULL
            AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM pgdso.servgrp_owners
                                              WHERE operation = 'escalation' AND instance_id = $3 AND term = $4))
          RETURNING ${COLUMNS}`,
        [id, instanceId, gate?.instanceId ?? null, gate?.term ?? 0],
      );
      await client.query('COMMIT');
      return res.rows[0] ?? null;
    } catch (err) {
      await client.query('ROLLBACK').catch(() => undefined);
      if ((err as { code?: string }).code !== '55P03' || attempt >= 3) throw err;
      // the holder is a scan batch of an earlier claimer: end it (its batch rolls back whole)
      await client.query(
        `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = $1 AND pid <> pg_backend_pid() AND datname = current_database()`,
        [scannerName(kind, name)],
      );
    }
  }
}

/** The application_name of the connection that scans for one escalation or sync. */
export function scannerName(kind: ScanKind, name: string): string {
  return `pgdso scan ${kind} ${name}`.slice(0, 63);
}

/** Marks a run cancelled (a sync the DBA restarts from the beginning). */
export async function cancelRun(client: pg.ClientBase, id: number): Promise<void> {
  await client.query(`UPDATE pgdso.scan_runs SET state = 'cancelled', finished_at = now(), term = term + 1 WHERE id = $1`, [id]);
}

/** The runs of one scan, newest first. */
export async function recentRuns(client: pg.ClientBase, kind: ScanKind, name: string | null, limit = 20): Promise<ScanRun[]> {
  const res = await client.query<ScanRun>(
    `SELECT ${COLUMNS} FROM pgdso.scan_runs WHERE kind = $1 AND ($2::text IS NULL OR name = $2) ORDER BY id DESC LIMIT $3`,
    [kind, name, limit],
  );
  return res.rows;
}
