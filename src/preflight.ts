// Checks of config and rules against the live catalogs: the server's version and settings and the
// role's privileges (src/sql/privileges.ts, the same checks as `forms enable`'s), the control
// schema and the slot, each form (exists, enabled: the same plan `forms enable` carries out,
// so the two never disagree), and each mapping's columns (exist on both sides, types that
// convert). One finding per problem, each with the statement that fixes it.
import pg from 'pg';
import { ConfigError, type PgdsoConfig } from './config/types.ts';
import { toPgClientConfig, describeConnection } from './config/load.ts';
import type { CompiledRules } from './rules/index.ts';
import { describeFormColumns, type FormCatalog } from './applier/catalog.ts';
import { buildColumnPlan, PlanError } from './applier/plan.ts';
import { planForm } from './sql/forms.ts';
import { describeForm, FormError } from './sql/form-catalog.ts';
import { slotName } from './sql/identifiers.ts';
import { createCheck, describeCheck, formChecks, serverChecks, serverFacts, versionCheck } from './sql/privileges.ts';

export interface Finding {
  server: string;
  /** the rule file and JSON pointer the finding is about, when it is about a rule */
  file?: string;
  pointer?: string;
  /** 'problem' stops an engine from starting; 'unreachable' means the server could not be checked */
  severity: 'problem' | 'unreachable' | 'warning';
  message: string;
}

/**
 * `decoded`: the servers whose slots an instance will decode (by default every server with a
 * form, as `pgdso run` without --server); the others only receive, and need no REPLICATION.
 */
export async function preflight(
  config: PgdsoConfig,
  rules: CompiledRules,
  servers: readonly string[] = Object.keys(config.servers),
  decoded: readonly string[] = servers.filter((s) => rules.formsOf(s).length > 0),
): Promise<Finding[]> {
  const findings: Finding[] = [];
  const catalogs = new Map<string, FormCatalog | null>();
  const clients = new Map<string, pg.Client>();
  try {
    for (const name of servers) {
      const server = config.servers[name]!;
      const client = new pg.Client({
        ...toPgClientConfig(server.connection),
        application_name: 'pgdso preflight',
        connectionTimeoutMillis: 5000,
      });
      client.on('error', () => {});
      try {
        await client.connect();
      } catch (err) {
        findings.push({
          server: name,
          severity: 'unreachable',
          message: `cannot connect to ${describeConnection(server.connection)}: ${(err as Error).message}`,
        });
        continue;
      }
      clients.set(name, client);
      const facts = await serverFacts(client);
      for (const check of serverChecks(facts, { decodes: decoded.includes(name), creates: false }))
        findings.push({ server: name, severity: 'problem', message: describeCheck(check) });
      if (versionCheck(facts.versionNum)) continue;
      const schema = await client.query(`SELECT to_regclass('pgdso.forms') IS NOT NULL AS ok`);
      // CREATE on the database matters while there is something to make (migrate, forms enable)
      let toMake = !schema.rows[0].ok;
      if (!schema.rows[0].ok) {
        findings.push({ server: name, severity: 'problem', message: 'the control schema pgdso is missing: run `pgdso migrate`' });
      } else if (rules.formsOf(name).length && !facts.slotExists) {
        findings.push({
          server: name,
          severity: 'problem',
          message:
            `the replication slot ${slotName(facts.database)} is missing (changes of the forms are not captured): ` +
            `run \`pgdso forms enable\` for a form of ${name}`,
        });
      }
      for (const { schema: s, table } of rules.formsOf(name)) {
        try {
          const form = await describeForm(client, s, table);
          const where = whereNamed(config, name, s, table);
          const blocking = (await formChecks(client, form.oid, s, table, { needsPublicationChange: false, needsAlter: false })).filter(
            (c) => c.blocking,
          );
          if (blocking.length) {
            catalogs.set(`${name}.${s}.${table}`, null);
            for (const check of blocking)
              findings.push({ server: name, severity: 'problem', ...where, message: `form ${s}.${table}: ${describeCheck(check)}` });
            continue;
          }
          const catalog = await describeFormColumns(client, s, table);
          catalogs.set(`${name}.${s}.${table}`, catalog);
          if (!schema.rows[0].ok) continue;
          // the same reading of the catalogs as `forms enable`'s: what one finds missing, the other adds
          const plan = await planForm(client, s, table);
          const enable = `pgdso forms enable --server ${name} --form ${s === 'public' ? '' : `${s}.`}${table}`;
          if (plan.missing.length) {
            toMake = true;
            findings.push({
              server: name,
              severity: 'problem',
              ...where,
              message: `form ${s}.${table} is not enabled (missing: ${plan.missing.join('; ')}): run \`${enable}\``,
            });
          }
          for (const check of await formChecks(client, plan.form.oid, s, table, {
            needsPublicationChange: plan.publicationChange,
            needsAlter: plan.statements.length > 0,
          })) {
            findings.push({ server: name, severity: 'problem', ...where, message: `form ${s}.${table}: ${describeCheck(check)}` });
          }
        } catch (err) {
          if (!(err instanceof FormError)) throw err;
          catalogs.set(`${name}.${s}.${table}`, null);
          // said at every rule that names the form, so that each of them can be found
          for (const where of placesNamed(config, name, s, table))
            findings.push({ server: name, severity: 'problem', ...where, message: `${name}: ${err.message}` });
        }
      }
      if (toMake && !facts.superuser && !facts.canCreateInDatabase)
        findings.push({ server: name, severity: 'problem', message: describeCheck(createCheck(facts)) });
    }
    for (const mapping of Object.values(config.mappings)) {
      const source = catalogs.get(`${mapping.from.server}.${mapping.from.schema}.${mapping.from.table}`);
      const target = catalogs.get(`${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`);
      if (!source || !target) continue;
      try {
        const plan = buildColumnPlan(mapping, [...source.columns.keys()], source.keyColumn, target);
        const from = `${mapping.from.server}.${mapping.from.schema}.${mapping.from.table}`;
        const to = `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`;
        for (const { column, reason } of plan.notCarried) {
          findings.push({
            server: mapping.to.server,
            severity: 'warning',
            file: mapping.source.file,
            pointer: `${mapping.source.pointer}/fields`,
            message:
              reason === 'generated'
                ? `mapping "${mapping.name}": column "${column}" is generated on ${to}: ` +
                  "computed there, not written (as PostgreSQL's own replication does)"
                : `mapping "${mapping.name}": column "${column}" of ${from} is not on ${to}, so it is not carried: ` +
                  'add it there, or list it in fields.exclude',
          });
        }
        for (const column of plan.columns) {
          if (column.from.kind !== 'column') continue;
          const from = source.columns.get(column.from.column)!;
          if (from.type !== column.type && !(await typesConvert(clients.get(mapping.to.server)!, from.castType, column.castType))) {
            findings.push({
              server: mapping.to.server,
              severity: 'problem',
              file: mapping.source.file,
              pointer: mapping.source.pointer,
              message:
                `mapping "${mapping.name}": column "${column.target}" is ${column.type} on ${mapping.to.server} ` +
                `but "${column.from.column}" is ${from.type} on ${mapping.from.server}: the values do not convert`,
            });
          }
        }
        if (mapping.match !== 'request-id') {
          mapping.match.fields.forEach((field, i) => {
            if (!plan.columns.some((c) => c.target === field)) {
              findings.push({
                server: mapping.to.server,
                severity: 'problem',
                file: mapping.source.file,
                pointer: `${mapping.source.pointer}/match/fields/${i}`,
                message:
                  `mapping "${mapping.name}": match field "${field}" is not a column the mapping carries ` +
                  `to ${mapping.to.server}.${mapping.to.table}`,
              });
            }
          });
        }
        if (mapping.duplicateRequestId === 'new-id' && !target.columns.get(target.keyColumn)?.hasDefault) {
          findings.push({
            server: mapping.to.server,
            severity: 'problem',
            file: mapping.source.file,
            pointer: `${mapping.source.pointer}/duplicateRequestId`,
            message:
              `mapping "${mapping.name}": duplicateRequestId "new-id" needs a default for the request ID ${target.keyColumn} ` +
              `of ${mapping.to.server}.${mapping.to.table} (a sequence, an identity or a generated value)`,
          });
        }
        if (source.keyType !== target.keyType && !(await typesConvert(clients.get(mapping.to.server)!, source.keyType, target.keyType))) {
          findings.push({
            server: mapping.to.server,
            severity: 'problem',
            file: mapping.source.file,
            pointer: mapping.source.pointer,
            message:
              `mapping "${mapping.name}": request ID ${source.keyColumn} is ${source.keyType} ` +
              `but ${target.keyColumn} is ${target.keyType} on ${mapping.to.server}`,
          });
        }
      } catch (err) {
        if (!(err instanceof PlanError)) throw err;
        for (const p of err.problems) {
          findings.push({
            server: mapping.to.server,
            severity: 'problem',
            file: mapping.source.file,
            pointer: `${mapping.source.pointer}${p.pointer}`,
            message: `mapping "${mapping.name}": ${p.message}`,
          });
        }
      }
    }
  } finally {
    await Promise.all([...clients.values()].map((c) => c.end().catch(() => {})));
  }
  return findings;
}

/** Where the rules first name a form: the mapping or filter that does, for findings. */
function whereNamed(config: PgdsoConfig, server: string, schema: string, table: string): { file?: string; pointer?: string } {
  return placesNamed(config, server, schema, table)[0] ?? {};
}

/** Every place the rules name a form: mappings' from and to, filters and escalations. */
function placesNamed(config: PgdsoConfig, server: string, schema: string, table: string): { file: string; pointer: string }[] {
  const places: { file: string; pointer: string }[] = [];
  const same = (at: { server: string; schema: string; table: string }) =>
    at.server === server && at.schema === schema && at.table === table;
  for (const m of Object.values(config.mappings)) {
    if (same(m.from)) places.push({ file: m.source.file, pointer: `${m.source.pointer}/from/form` });
    if (same(m.to)) places.push({ file: m.source.file, pointer: `${m.source.pointer}/to/form` });
  }
  for (const f of [...config.filters, ...config.escalations])
    if (same(f.on)) places.push({ file: f.source.file, pointer: `${f.source.pointer}/on/form` });
  return places;
}

/** The findings that stop an engine, as the one format bad config and rules are reported in. */
export function findingsAsConfigError(findings: readonly Finding[], configFile: string): ConfigError | null {
  const problems = findings.filter((f) => f.severity === 'problem');
  if (problems.length === 0) return null;
  return new ConfigError(
    problems.map((f) => ({ file: f.file ?? configFile, pointer: f.pointer ?? `/servers/${f.server}`, message: f.message })),
  );
}

/** Two types (without modifiers) convert when they are in the same category, or the target takes any string. */
async function typesConvert(client: pg.Client, from: string, to: string): Promise<boolean> {
  const res = await client
    .query(`SELECT f.typcategory AS f, t.typcategory AS t FROM pg_type f, pg_type t WHERE f.oid = $1::regtype AND t.oid = $2::regtype`, [
      from,
      to,
    ])
    .catch(() => null);
  if (!res || res.rowCount === 0) return false;
  const { f, t } = res.rows[0];
  return f === t || t === 'S';
}
