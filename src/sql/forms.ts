// `pgdso forms enable`: turns a table into a DSO form. Adds the distributed columns, the guards,
// replica identity full (filters see old rows; unchanged TOAST values are known) on the form and
// each partition, publication membership (via the partition root) and the server's logical slot.
// All or nothing: every privilege and setting is checked first; then the slot (it cannot be
// created in a transaction that has written); then every change in one transaction under a lock
// timeout (the slot is dropped again when that fails and it was created now). Idempotent: what
// is already in place is not touched (a form fully enabled takes no lock at all).
import pg from 'pg';
import { LOCK_NAMESPACE, LOCKS, PUBLICATION, qualified, quoteIdent, slotName } from './identifiers.ts';
import { describeCheck, formChecks, formRelations, serverChecks, serverFacts, versionCheck, type Check } from './privileges.ts';
import { functionBody, GUARD_FUNCTIONS, guardTriggers } from './guards.ts';
import { DEFAULT_LOCK, withLockTimeout, type LockOptions } from './locking.ts';
import { describeForm, DSO_COLUMNS, FormError, type FormInfo } from './form-catalog.ts';
import { createSlot } from './slot.ts';

/** The server or the role is not ready (privileges, settings): exit 1, nothing was changed. */
export class PreflightError extends Error {
  constructor(
    readonly checks: readonly Check[],
    where: string,
  ) {
    super(
      `${where}: nothing was changed; ${checks.length === 1 ? 'a problem' : `${checks.length} problems`} to fix first:\n` +
        checks.map((c) => `  - ${describeCheck(c)}`).join('\n'),
    );
  }
}

/** What a form lacks to be enabled, as the statements that add it and the words that name it. */
export interface FormPlan {
  form: FormInfo;
  /** run before the form is locked (the guard functions), then probed */
  functions: string[];
  /** run under the lock, in order */
  statements: string[];
  /** the strongest lock the statements take, or null when none is needed */
  lock: 'ACCESS EXCLUSIVE' | 'SHARE ROW EXCLUSIVE' | 'SHARE UPDATE EXCLUSIVE' | null;
  /** what is missing, in words (rules check) */
  missing: string[];
  /** the publication needs changing (membership or publish_via_partition_root) */
  publicationChange: boolean;
  /** replica identity of each relation before pgdso set it: "schema.table" -> d, n, f or i:<index> */
  identities: Record<string, string>;
}

const LOCK_RANK = { 'SHARE UPDATE EXCLUSIVE': 1, 'SHARE ROW EXCLUSIVE': 2, 'ACCESS EXCLUSIVE': 3 } as const;

/** Reads the catalogs (changes nothing) and plans what `forms enable` has to do. */
export async function planForm(client: pg.ClientBase, schema: string, table: string): Promise<FormPlan> {
  const form = await describeForm(client, schema, table);
  const target = qualified(schema, table);
  const plan: FormPlan = { form, functions: [], statements: [], lock: null, missing: [], publicationChange: false, identities: {} };
  const needs = (lock: keyof typeof LOCK_RANK) => {
    if (!plan.lock || LOCK_RANK[lock] > LOCK_RANK[plan.lock]) plan.lock = lock;
  };
  const columns = await client.query(`SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped`, [
    form.oid,
  ]);
  const present = new Set(columns.rows.map((r) => r.attname as string));
  const missingColumns = DSO_COLUMNS.filter(([name]) => !present.has(name));
  if (missingColumns.length) {
    plan.missing.push(
      missingColumns.length === DSO_COLUMNS.length
        ? 'the distributed columns dso_*'
        : `columns ${missingColumns.map(([n]) => n).join(', ')}`,
    );
    plan.statements.push(
      `ALTER TABLE ${target} ${missingColumns.map(([name, type]) => `ADD COLUMN ${quoteIdent(name)} ${type}`).join(', ')}`,
    );
    needs('ACCESS EXCLUSIVE');
  }
  const functions = await client.query(
    `SELECT p.proname, p.prosrc, p.prosecdef FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgdso'`,
  );
  const bodies = new Map(functions.rows.map((r) => [r.proname as string, `${r.prosecdef ? 'definer' : 'invoker'}:${r.prosrc}`]));
  for (const fn of GUARD_FUNCTIONS) {
    if (bodies.get(fn.name) !== `${/SECURITY DEFINER/.test(fn.sql) ? 'definer' : 'invoker'}:${functionBody(fn.sql)}`) {
      plan.functions.push(fn.sql);
      plan.missing.push(`${bodies.has(fn.name) ? 'the current version of ' : ''}function pgdso.${fn.name}()`);
    }
  }
  const relations = await formRelations(client, form.oid);
  const triggers = await client.query(
    `SELECT t.tgrelid::int AS rel, t.tgname, p.proname, t.tgargs FROM pg_trigger t
       JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE t.tgrelid = ANY ($1::oid[]) AND t.tgparentid = 0 AND n.nspname = 'pgdso'`,
    [relations.map((r) => r.oid)],
  );
  const existing = new Map(triggers.rows.map((r) => [`${r.rel}/${r.tgname}`, r]));
  const anyTrigger = await client.query(
    `SELECT tgrelid::int AS rel, tgname FROM pg_trigger WHERE tgrelid = ANY ($1::oid[]) AND tgparentid = 0`,
    [relations.map((r) => r.oid)],
  );
  const named = new Set(anyTrigger.rows.map((r) => `${r.rel}/${r.tgname}`));
  const formName = schema === 'public' ? table : `${schema}.${table}`;
  for (const spec of guardTriggers(form.keyColumn, formName)) {
    for (const rel of spec.everyPartition ? relations : relations.slice(0, 1)) {
      const found = existing.get(`${rel.oid}/${spec.name}`);
      const args = found ? (found.tgargs as Buffer).toString('utf8').split('\u0000').slice(0, -1) : null;
      if (found && found.proname === spec.function && JSON.stringify(args) === JSON.stringify(spec.args)) continue;
      const relation = qualified(rel.schema, rel.table);
      plan.missing.push(`trigger ${spec.name} on ${rel.schema}.${rel.table}`);
      if (named.has(`${rel.oid}/${spec.name}`)) plan.statements.push(`DROP TRIGGER ${quoteIdent(spec.name)} ON ${relation}`);
      plan.statements.push(spec.create(relation));
      needs('SHARE ROW EXCLUSIVE');
    }
  }
  for (const rel of relations) {
    if (rel.identity === 'f') continue;
    let identity = rel.identity;
    if (identity === 'i') {
      const index = await client.query(
        `SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1 AND i.indisreplident`,
        [rel.oid],
      );
      identity = index.rowCount ? `i:${index.rows[0].relname}` : 'd';
    }
    plan.identities[`${rel.schema}.${rel.table}`] = identity;
    plan.missing.push(`replica identity full on ${rel.schema}.${rel.table}`);
    plan.statements.push(`ALTER TABLE ONLY ${qualified(rel.schema, rel.table)} REPLICA IDENTITY FULL`);
    needs('ACCESS EXCLUSIVE');
  }
  const pub = await client.query(
    `SELECT p.pubviaroot, EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prpubid = p.oid AND r.prrelid = $2) AS member
       FROM pg_publication p WHERE p.pubname = $1`,
    [PUBLICATION, form.oid],
  );
  if (pub.rowCount === 0) throw new FormError(`the publication ${PUBLICATION} is missing: run \`pgdso migrate\` first`);
  if (!pub.rows[0].pubviaroot) {
    plan.missing.push(`publish_via_partition_root on the publication ${PUBLICATION}`);
    plan.statements.push(`ALTER PUBLICATION ${quoteIdent(PUBLICATION)} SET (publish_via_partition_root = true)`);
    plan.publicationChange = true;
  }
  if (!pub.rows[0].member) {
    plan.missing.push(`membership of the publication ${PUBLICATION}`);
    plan.statements.push(`ALTER PUBLICATION ${quoteIdent(PUBLICATION)} ADD TABLE ${target}`);
    plan.publicationChange = true;
    needs('SHARE UPDATE EXCLUSIVE');
  }
  const registered = await client.query(`SELECT key_column FROM pgdso.forms WHERE schema_name = $1 AND table_name = $2`, [schema, table]);
  if (registered.rows[0]?.key_column !== form.keyColumn) plan.missing.push('its row in pgdso.forms');
  return plan;
}

export interface EnableResult {
  form: FormInfo;
  slot: string;
  slotCreated: boolean;
  changes: string[];
}
export interface EnableOptions extends Partial<LockOptions> {}

export async function enableForm(
  connection: pg.ClientConfig,
  schema: string,
  table: string,
  opts: EnableOptions = {},
): Promise<EnableResult> {
  const lockOptions = { ...DEFAULT_LOCK, ...opts };
  const client = new pg.Client({ ...connection, application_name: 'pgdso forms enable' });
  client.on('error', () => {});
  await client.connect();
  let slotCreated = false;
  const database = (await client.query('SELECT current_database() AS db')).rows[0].db as string;
  const slot = slotName(database);
  try {
    const schemaReady = await client.query(
      `SELECT to_regclass('pgdso.forms') IS NOT NULL
              AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('pgdso.forms') AND attname = 'original_identity') AS ok`,
    );
    if (!schemaReady.rows[0].ok) throw new FormError('the control schema pgdso is missing or not up to date: run `pgdso migrate` first');
    // 1. every check, before anything changes
    const facts = await serverFacts(client);
    const problems = serverChecks(facts);
    if (versionCheck(facts.versionNum)) throw new PreflightError(problems, `form ${schema}.${table}`);
    const first = await planForm(client, schema, table);
    problems.push(
      ...(await formChecks(client, first.form.oid, schema, table, {
        needsPublicationChange: first.publicationChange,
        needsAlter: first.statements.length > 0,
      })),
    );
    if (problems.length) throw new PreflightError(problems, `form ${schema}.${table}`);
    // 2. the slot, outside the transaction that writes
    slotCreated = await createSlot(client, slot, lockOptions.lockTimeoutMs * lockOptions.attempts);
    // 3. everything else, in one transaction, under a lock timeout
    let changes: string[] = [];
    await withLockTimeout(client, { schema, table }, lockOptions, async () => {
      await client.query('SELECT pg_advisory_xact_lock($1, $2)', [LOCK_NAMESPACE, LOCKS.migrate]);
      const plan = await planForm(client, schema, table); // again: another run may have done part of it
      for (const sql of plan.functions) await client.query(sql);
      await probeGuard(client, schema, table);
      if (plan.lock) await client.query(`LOCK TABLE ${qualified(schema, table)} IN ${plan.lock} MODE`);
      for (const sql of plan.statements) await client.query(sql);
      await client.query(
        `INSERT INTO pgdso.forms (schema_name, table_name, key_column, original_identity) VALUES ($1, $2, $3, $4)
         ON CONFLICT (schema_name, table_name) DO UPDATE SET key_column = EXCLUDED.key_column,
           original_identity = EXCLUDED.original_identity || coalesce(pgdso.forms.original_identity, '{}'::jsonb)`,
        [schema, table, plan.form.keyColumn, JSON.stringify(plan.identities)],
      );
      changes = [
        ...plan.functions.map((f) =>
          f
            .trim()
            .split('\n')[0]!
            .replace(/\s+RETURNS.*/, ''),
        ),
        ...plan.statements,
      ];
    });
    return { form: first.form, slot, slotCreated, changes };
  } catch (err) {
    // dropped again, unless a form enabled meanwhile (another run) relies on it
    if (slotCreated) {
      await client.query(`SELECT pg_drop_replication_slot($1) WHERE NOT EXISTS (SELECT 1 FROM pgdso.forms)`, [slot]).catch(() => {});
    }
    throw err;
  } finally {
    await client.end().catch(() => {});
  }
}

/**
 * Runs the real ownership guard on a temporary table inside a savepoint, as the form's owner
 * (the application's role) when this role may SET ROLE to it: a non-master row's update must be
 * refused with pgdso's P0001, not fail on a privilege. Nothing of it remains. Skipped (the
 * privilege checks stand) where the role may not create temporary tables.
 */
export async function probeGuard(client: pg.ClientBase, schema: string, table: string): Promise<void> {
  await client.query('SAVEPOINT pgdso_probe');
  try {
    await client.query(
      `CREATE TEMP TABLE pgdso_guard_probe (id text PRIMARY KEY, dso_master boolean, dso_current_server text, dso_version bigint,
                                            dso_modified_at timestamptz) ON COMMIT DROP`,
    );
  } catch {
    await client.query('ROLLBACK TO SAVEPOINT pgdso_probe');
    return;
  }
  let outcome: { code?: string; message?: string } = {};
  try {
    await client.query(`INSERT INTO pg_temp.pgdso_guard_probe VALUES ('probe', false, 'probe', 1, now())`);
    await client.query(
      `CREATE TRIGGER pgdso_guard BEFORE UPDATE ON pg_temp.pgdso_guard_probe FOR EACH ROW EXECUTE FUNCTION pgdso.row_guard('id', 'probe')`,
    );
    const owner = await client.query(
      `SELECT pg_get_userbyid(c.relowner) AS owner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2 AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)
          AND pg_has_role(current_user, c.relowner, 'MEMBER')`,
      [schema, table],
    );
    if (owner.rowCount) {
      const role = quoteIdent(owner.rows[0].owner);
      await client.query(`GRANT SELECT, UPDATE ON pg_temp.pgdso_guard_probe TO ${role}`);
      await client.query('SAVEPOINT pgdso_probe_role');
      await client.query(`SET LOCAL ROLE ${role}`).catch(() => client.query('ROLLBACK TO SAVEPOINT pgdso_probe_role'));
    }
    await client.query(`UPDATE pg_temp.pgdso_guard_probe SET dso_version = 2`);
  } catch (err) {
    outcome = err as { code?: string; message?: string };
  }
  await client.query('ROLLBACK TO SAVEPOINT pgdso_probe');
  if (outcome.code === 'P0001' && outcome.message?.startsWith('pgdso: request probe')) return;
  const fn = (
    await client.query(`SELECT pg_get_userbyid(proowner) AS owner, prosecdef FROM pg_proc WHERE oid = 'pgdso.row_guard()'::regprocedure`)
  ).rows[0];
  throw new PreflightError(
    [
      {
        message:
          `the ownership guard does not work (${outcome.code ?? 'no error'}: ${outcome.message ?? 'a read-only row was not refused'}): ` +
          `every UPDATE and DELETE of ${schema}.${table} by the application would fail`,
        fix: fn.prosecdef
          ? `GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_session_is_setup() TO ${quoteIdent(fn.owner)};`
          : `ALTER FUNCTION pgdso.row_guard() SECURITY DEFINER; -- it must run as its owner, ${fn.owner}`,
      },
    ],
    `form ${schema}.${table}`,
  );
}
