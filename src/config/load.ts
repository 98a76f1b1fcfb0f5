// Reads pgdso.config.json and its rule files into the frozen PgdsoConfig, reporting every problem
// at once (file, JSON pointer, reason) as a ConfigError. Nothing else reads process.env.
//
// Order of work: parse the config (syntax errors with line and column, duplicate keys: json.ts),
// substitute ${env:NAME} (env.ts), validate against schema/config.schema.json (schema.ts), resolve
// connections (connections.ts), find the rule files (paths and globs relative to the config file:
// rule-files.ts) or take them as given texts, parse and validate each against
// schema/rules.schema.json, check conditions against the compilable subset (src/rules/compile.ts),
// then the checks across files (unique names, known servers and mappings, mappings used from
// their own form, fields, cron and time zones: checks.ts). Only a config without any problem is
// resolved, with the contract's defaults applied, and deep-frozen (resolve.ts).

import path from 'node:path';
import { checkAcrossFiles } from './checks.ts';
import { resolveConnections } from './connections.ts';
import { substituteEnv } from './env.ts';
import { isObject, parseJsonText, readJsonFile, type Json, type JsonObject } from './json.ts';
import { ProblemList } from './problems.ts';
import { deepFreeze, resolveConfig } from './resolve.ts';
import { findRuleFiles, readRuleTexts, type RuleDocument, type RuleSource } from './rule-files.ts';
import { compileValidators, ruleSchemaProblems, schemaProblems } from './schema.ts';
import type { PgdsoConfig } from './types.ts';

export { describeConnection, toPgClientConfig } from './connections.ts';
export type { RuleSource } from './rule-files.ts';

export interface LoadOptions {
  /**
   * The rule files as texts, instead of the files the config's "rules" name on disk: problems and
   * `config.ruleFiles` name each by its `file` as given (a path relative to the config, say).
   */
  ruleSources?: readonly RuleSource[];
}

/**
 * Loads and validates the config file and every rule file it names (or the rule texts given in
 * `options.ruleSources`). Throws ConfigError listing all problems found; never includes a
 * password or an environment variable's value.
 */
export async function loadConfig(
  configPath: string,
  env: NodeJS.ProcessEnv = process.env,
  options: LoadOptions = {},
): Promise<PgdsoConfig> {
  const configFile = path.resolve(configPath);
  const problems = new ProblemList();
  const validators = await compileValidators();

  const rawConfig = await readJsonFile(configFile, problems);
  if (rawConfig === undefined) throw problems.toError();
  const config = substituteEnv(rawConfig, '', env, (pointer, message) => problems.add(configFile, pointer, message));
  problems.addAll(schemaProblems(validators.config, config, configFile));
  if (!isObject(config)) throw problems.toError();

  const serverNames = isObject(config.servers) ? Object.keys(config.servers) : [];
  const connections = resolveConnections(config, configFile, problems);

  let ruleFiles: string[];
  let sources: readonly RuleSource[];
  if (options.ruleSources) {
    ruleFiles = [];
    const given: RuleSource[] = [];
    for (const source of options.ruleSources) {
      if (ruleFiles.includes(source.file)) {
        problems.add(source.file, '', 'this rule file is given more than once');
        continue;
      }
      ruleFiles.push(source.file);
      given.push(source);
    }
    sources = given;
  } else {
    ruleFiles = await findConfiguredRuleFiles(config, configFile, problems);
    sources = await readRuleTexts(ruleFiles, problems);
  }
  const ruleDocuments: RuleDocument[] = [];
  for (const { file, text } of sources) {
    const document = parseJsonText(file, text, problems);
    if (document === undefined) continue;
    problems.addAll(ruleSchemaProblems(validators.rules, document, file));
    ruleDocuments.push({ file, document });
  }
  checkAcrossFiles(ruleDocuments, serverNames, problems);

  if (problems.size > 0) throw problems.toError([configFile, ...ruleFiles]);
  return deepFreeze(resolveConfig(configFile, config, connections, ruleFiles, ruleDocuments));
}

/**
 * The texts of the rule files the config names, read from disk (each `file` an absolute path), in
 * the order loadConfig reads them: loadConfig(configPath, env, { ruleSources }) compiles the same
 * config as from the files. Throws ConfigError, with the same problems as loadConfig, when the
 * config is not valid JSON, the config as a whole or its "rules" list is invalid, a glob matches no
 * file, or a rule file is missing or cannot be read. Other problems of the config and the rule
 * files are left to loadConfig.
 */
export async function readRuleSources(configPath: string, env: NodeJS.ProcessEnv = process.env): Promise<RuleSource[]> {
  const configFile = path.resolve(configPath);
  const configProblems = new ProblemList();
  const rawConfig = await readJsonFile(configFile, configProblems);
  if (rawConfig === undefined) throw configProblems.toError();
  const config = substituteEnv(rawConfig, '', env, (pointer, message) => configProblems.add(configFile, pointer, message));
  configProblems.addAll(schemaProblems((await compileValidators()).config, config, configFile));

  // only what stands in the way of finding the rule files: problems of the whole document and of "rules"
  const problems = new ProblemList();
  problems.addAll(configProblems.list().filter((p) => p.pointer === '' || p.pointer === '/rules' || p.pointer.startsWith('/rules/')));
  const ruleFiles = isObject(config) ? await findConfiguredRuleFiles(config, configFile, problems) : [];
  const sources = await readRuleTexts(ruleFiles, problems);
  if (problems.size > 0) throw problems.toError([configFile, ...ruleFiles]);
  return sources;
}

/** The rule files the config's "rules" list names (none when the list itself is invalid, which the schema reports). */
async function findConfiguredRuleFiles(config: JsonObject, configFile: string, problems: ProblemList): Promise<string[]> {
  const entries: Json | undefined = config.rules;
  return Array.isArray(entries) ? findRuleFiles(entries, path.dirname(configFile), configFile, problems) : [];
}
