// Finding the rule files the config names (paths and globs relative to the config file), and
// the mappings, filters and escalations inside the parsed documents, with where each was written.

import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { glob, isDynamicPattern } from 'tinyglobby';
import { isObject, readFailure, type Json, type JsonObject } from './json.ts';
import type { ProblemList } from './problems.ts';
import type { FormRef } from './types.ts';

const FORM_PATTERN = /^(?:([A-Za-z_][A-Za-z0-9_$]{0,62})\.)?([A-Za-z_][A-Za-z0-9_$]{0,62})$/;

/** Absolute paths of the rule files, in the order the config lists them, each once. */
export async function findRuleFiles(
  entries: readonly Json[],
  configDir: string,
  configFile: string,
  problems: ProblemList,
): Promise<string[]> {
  const files: string[] = [];
  for (const [index, entry] of entries.entries()) {
    if (typeof entry !== 'string' || entry === '') continue; // reported by the schema
    const pointer = `/rules/${index}`;
    if (isDynamicPattern(entry)) {
      const matches = (await glob(entry, { cwd: configDir, absolute: true, onlyFiles: true, expandDirectories: false }))
        .map((m) => path.resolve(m))
        .sort();
      if (matches.length === 0) problems.add(configFile, pointer, `the glob "${entry}" matches no file (relative to ${configDir})`);
      files.push(...matches);
    } else {
      const file = path.resolve(configDir, entry);
      const info = await stat(file).catch(() => undefined);
      if (!info) problems.add(configFile, pointer, `rule file "${entry}" not found (looked for ${file})`);
      else if (!info.isFile()) problems.add(configFile, pointer, `rule file "${entry}" is not a file (${file})`);
      else files.push(file);
    }
  }
  return [...new Set(files)];
}

/** A rule file's text and the name problems give it (an absolute path when read from disk). */
export interface RuleSource {
  file: string;
  text: string;
}

export interface RuleDocument {
  file: string;
  document: Json;
}

export type RuleKind = 'mappings' | 'filters' | 'escalations';

/** One mapping, filter or escalation as written, with where it was written. */
export interface RawItem {
  kind: RuleKind;
  file: string;
  pointer: string;
  item: JsonObject;
}

export function rawItems(documents: readonly RuleDocument[], kind: RuleKind): RawItem[] {
  const items: RawItem[] = [];
  for (const { file, document } of documents) {
    if (!isObject(document) || !Array.isArray(document[kind])) continue;
    document[kind].forEach((item, i) => {
      if (isObject(item)) items.push({ kind, file, pointer: `/${kind}/${i}`, item });
    });
  }
  return items;
}

export function parseForm(form: string): { schema: string; table: string } | undefined {
  const match = FORM_PATTERN.exec(form);
  return match ? { schema: match[1] ?? 'public', table: match[2]! } : undefined;
}

function formLabel(server: string, form: { schema: string; table: string }): string {
  return `${server}:${form.schema}.${form.table}`;
}

/** The server and parsed form of an {server, form} object as written, when both are well formed. */
export function rawFormRef(value: Json | undefined): (FormRef & { label: string }) | undefined {
  if (!isObject(value) || typeof value.server !== 'string' || typeof value.form !== 'string') return undefined;
  const form = parseForm(value.form);
  return form ? { server: value.server, ...form, label: formLabel(value.server, form) } : undefined;
}

/** The texts of rule files; a file that cannot be read is reported and left out. */
export async function readRuleTexts(files: readonly string[], problems: ProblemList): Promise<RuleSource[]> {
  const sources: RuleSource[] = [];
  for (const file of files) {
    try {
      sources.push({ file, text: await readFile(file, 'utf8') });
    } catch (err) {
      problems.add(file, '', readFailure(err));
    }
  }
  return sources;
}
