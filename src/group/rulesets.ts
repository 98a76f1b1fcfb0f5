// Published rule sets: the owner of a server's `admin` operation validates the rule files and
// stores their texts with a version in the server's pgdso.rule_sets; every instance of the group
// then compiles and runs exactly those texts. A set that does not load changes nothing.
import { createHash } from 'node:crypto';
import path from 'node:path';
import type pg from 'pg';
import { notify } from './sql.ts';

export interface RuleSource {
  /** the file's path relative to the config file's folder */
  file: string;
  text: string;
}

export interface RuleSet {
  version: number;
  digest: string;
  sources: RuleSource[];
}

/** Rule sources with their paths made relative to the config's folder, in a stable order. */
export function relativeSources(configPath: string, sources: readonly { file: string; text: string }[]): RuleSource[] {
  const base = path.dirname(path.resolve(configPath));
  return sources
    .map((s) => ({ file: path.relative(base, path.resolve(base, s.file)), text: s.text }))
    .sort((a, b) => (a.file < b.file ? -1 : a.file > b.file ? 1 : 0));
}

export function digestOf(sources: readonly RuleSource[]): string {
  const hash = createHash('sha256');
  for (const s of sources) hash.update(`${s.file}\0${s.text}\0`);
  return hash.digest('hex');
}

export async function latestRuleSet(client: pg.ClientBase): Promise<RuleSet | null> {
  const res = await client.query(`SELECT version::int AS version, digest, sources FROM pgdso.rule_sets ORDER BY version DESC LIMIT 1`);
  return (res.rows[0] as RuleSet | undefined) ?? null;
}

/** Stores the set unless it is the latest already; the online instances are signalled. */
export async function publishRuleSet(
  client: pg.ClientBase,
  sources: readonly RuleSource[],
  publishedBy: string,
  fence: { operation: 'admin'; term: number },
): Promise<{ version: number; changed: boolean }> {
  const digest = digestOf(sources);
  await client.query('BEGIN');
  try {
    await client.query(`LOCK TABLE pgdso.rule_sets IN SHARE ROW EXCLUSIVE MODE`);
    // only the owner of admin publishes: a term that is not the current one is refused
    const owner = await client.query(
      `SELECT 1 FROM pgdso.servgrp_owners WHERE operation = $1 AND instance_id = $2 AND term = $3 FOR SHARE`,
      [fence.operation, publishedBy, fence.term],
    );
    if (!owner.rowCount) throw new Error(`instance ${publishedBy} no longer owns the admin operation: the rule set is not published`);
    const latest = await latestRuleSet(client);
    if (latest?.digest === digest) {
      await client.query('COMMIT');
      return { version: latest.version, changed: false };
    }
    const res = await client.query(
      `INSERT INTO pgdso.rule_sets (digest, sources, published_by) VALUES ($1, $2, $3) RETURNING version::int AS version`,
      [digest, JSON.stringify(sources), publishedBy],
    );
    await client.query(`UPDATE pgdso.servgrp_board SET pending_signals = array_append(pending_signals, 'rules') WHERE state = 'online'`);
    await client.query(notify('rules').text, notify('rules').values);
    await client.query('COMMIT');
    return { version: res.rows[0].version as number, changed: true };
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  }
}
