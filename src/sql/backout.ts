// Backing out: `pgdso forms disable` (one form: its guards, its publication membership, its
// replica identity back to what it was; its distributed columns only on request) and
// `pgdso uninstall` (every form, the publication, the slot, the replication origins of the
// engines that wrote into this server; the columns and the control schema only on request).
// Each is planned first (the catalogs read, nothing changed), so the command can show exactly
// what it will do before it does it.
import type pg from 'pg';
import { PUBLICATION, qualified, quoteIdent, quoteLiteral, slotName } from './identifiers.ts';
import { DSO_COLUMNS } from './form-catalog.ts';
import { GUARD_TRIGGER_NAMES } from './guards.ts';
import { formRelations, uninstallChecks, serverFacts, type Check } from './privileges.ts';
import { withLockTimeout, type LockOptions } from './locking.ts';

export interface FormBackout {
  schema: string;
  table: string;
  /** run in one transaction under the lock timeout */
  statements: string[];
}

export interface UninstallPlan {
  forms: FormBackout[];
  /** run one by one after the forms */
  after: string[];
  origins: string[];
  checks: Check[];
}

/** Another pgdso session is in the way of a backout (its engine streams or writes here). */
export class BusyError extends Error {}

/** Refuses while this server's engine holds the slot, or a peer's engine applies into it. */
export async function assertNoEngine(client: pg.ClientBase): Promise<void> {
  const slot = slotName((await client.query('SELECT current_database() AS db')).rows[0].db as string);
  const holder = await client.query('SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active', [slot]);
  const appliers = await client.query(
    `SELECT pid, application_name, usename FROM pg_stat_activity
      WHERE datname = current_database() AND application_name LIKE 'pgdso apply%' AND pid <> pg_backend_pid()`,
  );
  const busy = [
    ...holder.rows.map((r) => `an engine streams the slot ${slot} (pid ${r.active_pid})`),
    ...appliers.rows.map((r) => `a peer's engine applies changes here (pid ${r.pid}, ${r.application_name}, user ${r.usename})`),
  ];
  if (busy.length) throw new BusyError(`${busy.join('; ')}: stop those engines (pgdso run) first; nothing was changed`);
}

function restoreIdentity(relation: string, original: string | undefined): string {
  if (original === 'n') return `ALTER TABLE ONLY ${relation} REPLICA IDENTITY NOTHING`;
  if (original?.startsWith('i:')) return `ALTER TABLE ONLY ${relation} REPLICA IDENTITY USING INDEX ${quoteIdent(original.slice(2))}`;
  return `ALTER TABLE ONLY ${relation} REPLICA IDENTITY DEFAULT`;
}

/** What `forms disable` does to one form; the catalogs are read, nothing changes. */
export async function planFormBackout(
  client: pg.ClientBase,
  schema: string,
  table: string,
  opts: { dropColumns: boolean },
): Promise<FormBackout | null> {
  const rel = await client.query(
    `SELECT c.oid::int AS oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')`,
    [schema, table],
  );
  if (rel.rowCount === 0) return null;
  const oid = rel.rows[0].oid as number;
  const hasRegistry = (await client.query(`SELECT to_regclass('pgdso.forms') IS NOT NULL AS ok`)).rows[0].ok;
  const registry = hasRegistry
    ? await client
        .query(`SELECT original_identity FROM pgdso.forms WHERE schema_name = $1 AND table_name = $2`, [schema, table])
        .catch(() => ({ rows: [] as Array<{ original_identity: unknown }>, rowCount: 0 }))
    : { rows: [], rowCount: 0 };
  const original = (registry.rows[0]?.original_identity ?? {}) as Record<string, string>;
  const relations = await formRelations(client, oid);
  const statements: string[] = [];
  const triggers = await client.query(
    `SELECT tgrelid::int AS rel, tgname FROM pg_trigger WHERE tgrelid = ANY ($1::oid[]) AND tgparentid = 0 ORDER BY tgname`,
    [relations.map((r) => r.oid)],
  );
  for (const r of relations) {
    for (const t of triggers.rows.filter((row) => row.rel === r.oid && GUARD_TRIGGER_NAMES.has(row.tgname))) {
      statements.push(`DROP TRIGGER ${quoteIdent(t.tgname)} ON ${qualified(r.schema, r.table)}`);
    }
  }
  const member = await client.query(
    `SELECT 1 FROM pg_publication p JOIN pg_publication_rel r ON r.prpubid = p.oid WHERE p.pubname = $1 AND r.prrelid = $2`,
    [PUBLICATION, oid],
  );
  if (member.rowCount) statements.push(`ALTER PUBLICATION ${quoteIdent(PUBLICATION)} DROP TABLE ${qualified(schema, table)}`);
  for (const r of relations) {
    const was = original[`${r.schema}.${r.table}`];
    if (r.identity === 'f' && was !== 'f') statements.push(restoreIdentity(qualified(r.schema, r.table), was));
  }
  if (opts.dropColumns) {
    const present = await client.query(`SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped`, [oid]);
    const names = new Set(present.rows.map((r) => r.attname as string));
    const drop = DSO_COLUMNS.map(([n]) => n).filter((n) => names.has(n));
    if (drop.length)
      statements.push(`ALTER TABLE ${qualified(schema, table)} ${drop.map((n) => `DROP COLUMN ${quoteIdent(n)}`).join(', ')}`);
  }
  if (registry.rowCount)
    statements.push(`DELETE FROM pgdso.forms WHERE schema_name = ${quoteLiteral(schema)} AND table_name = ${quoteLiteral(table)}`);
  return { schema, table, statements };
}

/** Runs a form's backout in one transaction, under the lock timeout. */
export async function runFormBackout(client: pg.ClientBase, plan: FormBackout, lock: LockOptions): Promise<void> {
  if (plan.statements.length === 0) return;
  await withLockTimeout(client, plan, lock, async () => {
    for (const sql of plan.statements) await client.query(sql);
  });
}

/** Every form pgdso knows of here: its registry and any table carrying one of its guards. */
async function pgdsoForms(client: pg.ClientBase): Promise<Array<{ schema: string; table: string }>> {
  const res = await client.query(
    `SELECT DISTINCT n.nspname AS schema, c.relname AS table
       FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE t.tgparentid = 0 AND t.tgname = ANY ($1::text[]) AND NOT c.relispartition
      ORDER BY 1, 2`,
    [[...GUARD_TRIGGER_NAMES]],
  );
  const forms = new Map(res.rows.map((r) => [`${r.schema}.${r.table}`, { schema: r.schema as string, table: r.table as string }]));
  if ((await client.query(`SELECT to_regclass('pgdso.forms') IS NOT NULL AS ok`)).rows[0].ok) {
    for (const r of (await client.query('SELECT schema_name, table_name FROM pgdso.forms ORDER BY 1, 2')).rows) {
      forms.set(`${r.schema_name}.${r.table_name}`, { schema: r.schema_name, table: r.table_name });
    }
  }
  return [...forms.values()];
}

export async function planUninstall(client: pg.ClientBase, opts: { dropColumns: boolean; dropSchema: boolean }): Promise<UninstallPlan> {
  const db = (await client.query('SELECT current_database() AS db')).rows[0].db as string;
  const forms: FormBackout[] = [];
  for (const f of await pgdsoForms(client)) {
    const plan = await planFormBackout(client, f.schema, f.table, { dropColumns: opts.dropColumns });
    if (plan?.statements.length) forms.push(plan);
  }
  // the origins of the apply lanes that wrote into this database (originName(): pgdso:<writer>:<pool>:<database>)
  const origins = (
    await client.query(
      `SELECT roname FROM pg_replication_origin WHERE roname LIKE 'pgdso:%' AND right(roname, length($1) + 1) = ':' || $1 ORDER BY roname`,
      [db],
    )
  ).rows.map((r) => r.roname as string);
  const after: string[] = [];
  for (const o of origins) after.push(`SELECT pg_replication_origin_drop(${quoteLiteral(o)})`);
  if ((await client.query('SELECT 1 FROM pg_publication WHERE pubname = $1', [PUBLICATION])).rowCount)
    after.push(`DROP PUBLICATION ${quoteIdent(PUBLICATION)}`);
  const slot = slotName(db);
  if ((await client.query('SELECT 1 FROM pg_replication_slots WHERE slot_name = $1', [slot])).rowCount)
    after.push(`SELECT pg_drop_replication_slot(${quoteLiteral(slot)})`);
  if (opts.dropSchema && (await client.query(`SELECT to_regnamespace('pgdso') IS NOT NULL AS ok`)).rows[0].ok)
    after.push('DROP SCHEMA pgdso CASCADE');
  const checks = uninstallChecks(await serverFacts(client), origins.length);
  return { forms, after, origins, checks };
}

/** The plan as the lines a preview shows. */
export function describeUninstall(plan: UninstallPlan): string[] {
  return [
    ...plan.forms.flatMap((f) => [`form ${f.schema}.${f.table}:`, ...f.statements.map((s) => `  ${s};`)]),
    ...(plan.after.length ? ['server:', ...plan.after.map((s) => `  ${s};`)] : []),
  ];
}

export async function runUninstall(client: pg.ClientBase, plan: UninstallPlan, lock: LockOptions): Promise<void> {
  for (const form of plan.forms) await runFormBackout(client, form, lock);
  for (const sql of plan.after) await client.query(sql);
}
