// Requests that belong to an operation (retry the pending operations, publish the rules, run an
// escalation now), made from the command line or by any instance: written to
// pgdso.servgrp_requests, routed by the coordinator to the owner of the operation, carried out
// there, answered in the same row. The command line waits for the answer.
import type pg from 'pg';
import { setTimeout as delay } from 'node:timers/promises';
import { notify, type Operation } from './sql.ts';

export type RequestKind = 'pending-retry' | 'rules-publish' | 'escalate';

export const OPERATION_OF: Readonly<Record<RequestKind, Operation>> = {
  'pending-retry': 'dso',
  'rules-publish': 'admin',
  escalate: 'escalation',
};

/** A connection, or the supervisor's control connection. */
export interface Queryable {
  query(text: string, values?: unknown[]): Promise<pg.QueryResult>;
}

export interface GroupRequest {
  id: number;
  kind: RequestKind;
  args: Record<string, unknown>;
}

export interface Answer {
  state: 'done' | 'failed';
  /** the instance that carried it out (or was to) */
  instanceId: string | null;
  result: Record<string, unknown> | null;
  error: string | null;
}

/** Online instances that heartbeat within the delinquent threshold (database time). */
export async function liveInstances(client: pg.ClientBase, intervalSeconds: number, threshold: number): Promise<string[]> {
  const res = await client.query(
    `SELECT instance_id FROM pgdso.servgrp_board
      WHERE state = 'online' AND last_seen_at >= now() - make_interval(secs => $1::float8 * $2::int) ORDER BY instance_id`,
    [intervalSeconds, threshold],
  );
  return res.rows.map((r) => r.instance_id as string);
}

export async function submitRequest(client: Queryable, kind: RequestKind, args: object, requestedBy: string): Promise<number> {
  const res = await client.query(
    `INSERT INTO pgdso.servgrp_requests (operation, kind, args, requested_by) VALUES ($1, $2, $3, $4) RETURNING id::int AS id`,
    [OPERATION_OF[kind], kind, JSON.stringify(args), requestedBy],
  );
  await client.query(notify('request').text, notify('request').values);
  return res.rows[0].id as number;
}

/** Waits for the answer; a request nobody answered in time is withdrawn (it never runs later). */
export async function awaitAnswer(client: pg.ClientBase, id: number, timeoutMs: number): Promise<Answer> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await client.query(`SELECT state, routed_to AS "instanceId", result, error FROM pgdso.servgrp_requests WHERE id = $1`, [
      id,
    ]);
    const row = res.rows[0] as (Omit<Answer, 'state'> & { state: string }) | undefined;
    if (!row) return { state: 'failed', instanceId: null, result: null, error: 'the request was removed' };
    if (row.state === 'done' || row.state === 'failed') return row as Answer;
    if (Date.now() > deadline) {
      const withdrawn = await client.query(
        `UPDATE pgdso.servgrp_requests SET state = 'failed', error = $2, done_at = now()
          WHERE id = $1 AND state IN ('new', 'routed') RETURNING routed_to`,
        [id, `no answer within ${Math.round(timeoutMs / 1000)} s`],
      );
      if (withdrawn.rowCount) {
        const to = withdrawn.rows[0].routed_to as string | null;
        const error = to
          ? `instance ${to} did not answer within ${Math.round(timeoutMs / 1000)} s`
          : `no coordinator routed the request within ${Math.round(timeoutMs / 1000)} s`;
        return { state: 'failed', instanceId: to, result: null, error };
      }
      // it started meanwhile: wait for its end
    }
    await delay(100);
  }
}

/** The coordinator routes each new request to the owner of its operation, or fails it. */
export async function routeRequests(client: pg.ClientBase, server: string): Promise<number> {
  const res = await client.query(
    `SELECT r.id, r.operation, o.instance_id AS owner, b.state FROM pgdso.servgrp_requests r
       LEFT JOIN pgdso.servgrp_owners o ON o.operation = r.operation
       LEFT JOIN pgdso.servgrp_board b ON b.instance_id = o.instance_id
      WHERE r.state = 'new' ORDER BY r.id FOR UPDATE OF r SKIP LOCKED`,
  );
  for (const r of res.rows as { id: string; operation: string; owner: string | null; state: string | null }[]) {
    if (r.owner && r.state === 'online') {
      await client.query(`UPDATE pgdso.servgrp_requests SET state = 'routed', routed_to = $2 WHERE id = $1`, [r.id, r.owner]);
    } else {
      const last = r.owner ? ` (its last owner ${r.owner} is ${r.state ?? 'gone'})` : '';
      const error = `no instance owns the ${r.operation} operation of ${server}${last}`;
      await client.query(`UPDATE pgdso.servgrp_requests SET state = 'failed', error = $2, done_at = now() WHERE id = $1`, [r.id, error]);
    }
  }
  return res.rowCount ?? 0;
}

/**
 * Requests routed to an instance that is no longer online (delinquent, stopped, gone) fail, so
 * that the command waiting for them hears it: what that instance had started is taken over by
 * the operation's next owner (an escalation run resumes after its last batch).
 */
export async function failOrphaned(client: pg.ClientBase): Promise<number> {
  const res = await client.query(
    `UPDATE pgdso.servgrp_requests r
        SET state = 'failed', done_at = now(),
            error = format('instance %s is %s and did not answer (what it had started goes on with the next owner of %s)',
                           r.routed_to, coalesce(b.state, 'gone'), r.operation)
       FROM pgdso.servgrp_requests o LEFT JOIN pgdso.servgrp_board b ON b.instance_id = o.routed_to
      WHERE r.id = o.id AND r.state IN ('routed', 'running') AND b.state IS DISTINCT FROM 'online'`,
  );
  return res.rowCount ?? 0;
}

/** The requests routed to this instance for the operations it runs, taken to be carried out. */
export async function takeRequests(client: pg.ClientBase, instanceId: string, operations: readonly Operation[]): Promise<GroupRequest[]> {
  if (operations.length === 0) return [];
  const res = await client.query(
    `UPDATE pgdso.servgrp_requests SET state = 'running'
      WHERE state = 'routed' AND routed_to = $1 AND operation = ANY($2::text[]) RETURNING id::int AS id, kind, args`,
    [instanceId, operations],
  );
  return res.rows as GroupRequest[];
}

export async function answerRequest(client: pg.ClientBase, id: number, answer: { result?: object; error?: string }): Promise<void> {
  await client.query(`UPDATE pgdso.servgrp_requests SET state = $2, result = $3, error = $4, done_at = now() WHERE id = $1`, [
    id,
    answer.error === undefined ? 'done' : 'failed',
    answer.result ? JSON.stringify(answer.result) : null,
    answer.error ?? null,
  ]);
}
