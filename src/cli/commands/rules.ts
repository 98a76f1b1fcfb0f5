import { compileRules } from '../../rules/index.ts';
import type { Facts } from '../../rules/facts.ts';
import { findingsAsConfigError, preflight } from '../../preflight.ts';
import { configFrom, EXIT, parseForm, print, serverOf, UsageError, type GlobalOptions } from '../common.ts';

export async function rulesCheckCommand(opts: GlobalOptions): Promise<void> {
  const config = await configFrom(opts);
  const rules = compileRules(config);
  const findings = await preflight(config, rules);
  const counts =
    `${Object.keys(config.mappings).length} mappings, ${config.filters.length} filters, ` +
    `${config.escalations.length} escalations in ${config.ruleFiles.length} rule files`;
  const invalid = findingsAsConfigError(findings, config.file);
  if (invalid) throw invalid;
  const unchecked = findings.filter((f) => f.severity === 'unreachable');
  for (const f of findings) print(`${f.severity}: ${f.server}: ${f.message}`);
  if (unchecked.length) {
    print(`not checked: ${unchecked.length} of ${Object.keys(config.servers).length} servers could not be reached (${counts})`);
    process.exitCode = EXIT.runtime;
    return;
  }
  print(`ok: ${counts}`);
}

function parseJsonOption(name: string, text: string | undefined): Record<string, unknown> | null {
  if (text === undefined) return null;
  try {
    const value = JSON.parse(text);
    if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('not a JSON object');
    return value;
  } catch (err) {
    throw new UsageError(`--${name}: ${(err as Error).message}`);
  }
}

export async function rulesTestCommand(
  opts: GlobalOptions,
  cmd: { server: string; form: string; op: Facts['op']; row: string; old?: string; origin?: string },
): Promise<void> {
  const config = await configFrom(opts);
  serverOf(config, cmd.server);
  const rules = compileRules(config);
  const { schema, table } = parseForm(cmd.form);
  const row = parseJsonOption('row', cmd.row)!;
  const old = parseJsonOption('old', cmd.old);
  const changed = old ? Object.keys(row).filter((k) => JSON.stringify(row[k]) !== JSON.stringify(old[k])) : [];
  const facts: Facts = {
    row,
    old,
    op: cmd.op,
    changed,
    origin: cmd.origin ?? null,
    master: row.dso_master === undefined ? true : row.dso_master === true,
  };
  const fired = rules.evaluate(cmd.server, schema, table, facts);
  print(JSON.stringify({ server: cmd.server, form: `${schema}.${table}`, op: cmd.op, fired }, null, 2));
}
