// Reads pgdso.config.json and its rule files into the frozen PgdsoConfig, reporting every problem
// at once (file, JSON pointer, reason) as a ConfigError. Nothing else reads process.env.
//
// Order of work: parse the config (syntax errors with line and column, duplicate keys), substitute
// ${env:NAME}, validate against schema/config.schema.json, resolve connections, find the rule
// files (paths and globs relative to the config file), parse and validate each against
// schema/rules.schema.json, check conditions against the compilable subset (src/rules/compile.ts),
// then the checks across files (unique names, known servers and mappings, mappings used from
// their own form, fields, cron and time zones). Only a config without any problem is resolved,
// with the contract's defaults applied, and deep-frozen.

import { readFile, stat } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { Cron } from 'croner';
import { glob, isDynamicPattern } from 'tinyglobby';
import type pg from 'pg';
import { checkConditions } from '../rules/compile.ts';
import {
  ConfigError,
  type ActionConfig,
  type ConfigProblem,
  type ConnectionSettings,
  type EscalationConfig,
  type FilterConfig,
  type FormRef,
  type MappingConfig,
  type Op,
  type PgdsoConfig,
  type ServerConfig,
} from './types.ts';

const SCHEMA_DIR = fileURLToPath(new URL('../../schema/', import.meta.url));
const DEFAULT_PORT = 5432;
const DEFAULT_GROUP = { checkIntervalSeconds: 2, delinquentThreshold: 3 } as const;
const DEFAULT_FILTER_OPS: readonly Op[] = ['insert', 'update'];
/** Connection parameters accepted besides host, port, database, user and password. */
const CONNECTION_PARAMETERS = ['sslmode', 'sslrootcert', 'sslcert', 'sslkey', 'application_name', 'connect_timeout', 'options'] as const;
const SSL_MODES = ['disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full', 'no-verify'];
const FORM_PATTERN = /^(?:([A-Za-z_][A-Za-z0-9_$]{0,62})\.)?([A-Za-z_][A-Za-z0-9_$]{0,62})$/;
const ENV_REFERENCE = /\$\{env:([^}]*)\}/g;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

// ---------------------------------------------------------------------------------------------
// Public API

/**
 * Loads and validates the config file and every rule file it names. Throws ConfigError listing
 * all problems found; never includes a password or an environment variable's value.
 */
export async function loadConfig(configPath: string, env: NodeJS.ProcessEnv = process.env): Promise<PgdsoConfig> {
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

  const ruleFiles = Array.isArray(config.rules) ? await findRuleFiles(config.rules, path.dirname(configFile), configFile, problems) : [];
  const ruleDocuments: RuleDocument[] = [];
  for (const file of ruleFiles) {
    const document = await readJsonFile(file, problems);
    if (document === undefined) continue;
    problems.addAll(ruleSchemaProblems(validators.rules, document, file));
    ruleDocuments.push({ file, document });
  }
  checkAcrossFiles(ruleDocuments, serverNames, problems);

  if (problems.size > 0) throw problems.toError([configFile, ...ruleFiles]);
  return deepFreeze(resolveConfig(configFile, config, connections, ruleFiles, ruleDocuments));
}

/** `user@host:port/database`, never the password. */
export function describeConnection(c: ConnectionSettings): string {
  const host = c.host.includes(':') && !c.host.startsWith('/') ? `[${c.host}]` : c.host;
  return `${c.user}@${host}:${c.port}/${c.database}`;
}

/**
 * node-postgres settings for a connection, with libpq's sslmode meanings: disable, allow and
 * prefer connect without TLS (pg has no fallback); require and no-verify encrypt without
 * verifying the server (require verifies the CA when sslrootcert is given, as libpq does);
 * verify-ca checks the chain; verify-full also the host name. Certificate files are read here.
 */
export function toPgClientConfig(c: ConnectionSettings): pg.ClientConfig {
  const params = c.options ?? {};
  const config: pg.ClientConfig = {
    host: c.host,
    port: c.port,
    database: c.database,
    user: c.user,
    fallback_application_name: 'pgdso',
  };
  if (c.password !== undefined) config.password = c.password;
  if (params.application_name !== undefined) config.application_name = params.application_name;
  if (params.connect_timeout !== undefined) config.connectionTimeoutMillis = Number(params.connect_timeout) * 1000;
  if (params.options !== undefined) config.options = params.options;
  const mode = params.sslmode;
  if (mode === 'require' || mode === 'no-verify' || mode === 'verify-ca' || mode === 'verify-full') {
    const verify = mode === 'verify-ca' || mode === 'verify-full' || (mode === 'require' && params.sslrootcert !== undefined);
    const ssl: NonNullable<Exclude<pg.ClientConfig['ssl'], boolean>> = { rejectUnauthorized: verify };
    if (verify && mode !== 'verify-full') ssl.checkServerIdentity = () => undefined;
    if (params.sslrootcert !== undefined) ssl.ca = readFileSync(params.sslrootcert, 'utf8');
    if (params.sslcert !== undefined) ssl.cert = readFileSync(params.sslcert, 'utf8');
    if (params.sslkey !== undefined) ssl.key = readFileSync(params.sslkey, 'utf8');
    config.ssl = ssl;
  } else if (mode === 'disable') {
    config.ssl = false;
  }
  return config;
}

// ---------------------------------------------------------------------------------------------
// Problems

/** Problems in discovery order, without duplicates. */
class ProblemList {
  private readonly problems: ConfigProblem[] = [];
  private readonly seen = new Set<string>();
  private readonly pointersByFile = new Map<string, Set<string>>();

  get size(): number {
    return this.problems.length;
  }

  add(file: string, pointer: string, message: string): void {
    const key = `${file}\u0000${pointer}\u0000${message}`;
    if (this.seen.has(key)) return;
    this.seen.add(key);
    this.problems.push({ file, pointer, message });
    const pointers = this.pointersByFile.get(file) ?? new Set<string>();
    pointers.add(pointer);
    this.pointersByFile.set(file, pointers);
  }

  addAll(problems: readonly ConfigProblem[]): void {
    for (const p of problems) this.add(p.file, p.pointer, p.message);
  }

  /** Whether a problem was already reported at this pointer (to avoid a second one about the same value). */
  hasAt(file: string, pointer: string): boolean {
    return this.pointersByFile.get(file)?.has(pointer) ?? false;
  }

  /** Whether a problem was already reported at this pointer or inside the value it points to. */
  hasAtOrUnder(file: string, pointer: string): boolean {
    for (const p of this.pointersByFile.get(file) ?? []) if (p === pointer || p.startsWith(`${pointer}/`)) return true;
    return false;
  }

  /** The error, grouped by file (in the given order, then by first appearance), discovery order within a file. */
  toError(preferredFileOrder: readonly string[] = []): ConfigError {
    const fileOrder = [...new Set([...preferredFileOrder.filter((f) => this.pointersByFile.has(f)), ...this.pointersByFile.keys()])];
    const sorted = this.problems
      .map((p, i) => ({ p, i }))
      .sort((a, b) => fileOrder.indexOf(a.p.file) - fileOrder.indexOf(b.p.file) || a.i - b.i)
      .map(({ p }) => p);
    return new ConfigError(sorted);
  }
}

// ---------------------------------------------------------------------------------------------
// JSON files

/** Reads and parses a JSON file; on failure reports the problem and returns undefined. */
async function readJsonFile(file: string, problems: ProblemList): Promise<Json | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    problems.add(
      file,
      '',
      code === 'ENOENT' ? 'file not found' : code === 'EISDIR' ? 'is a directory, not a file' : `cannot be read (${code ?? 'error'})`,
    );
    return undefined;
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const scan = scanJson(text);
  for (const duplicate of scan.duplicateKeys) {
    const { line, column } = lineAndColumn(text, duplicate.offset);
    problems.add(
      file,
      duplicate.pointer,
      `duplicate key ${JSON.stringify(duplicate.key)} at line ${line}, column ${column} (JSON would keep only the last one)`,
    );
  }
  if (scan.error) {
    const { line, column } = lineAndColumn(text, scan.error.offset);
    problems.add(file, scan.error.pointer, `invalid JSON at line ${line}, column ${column}: ${scan.error.message}`);
    return undefined;
  }
  return JSON.parse(text) as Json;
}

function lineAndColumn(text: string, offset: number): { line: number; column: number } {
  let line = 1;
  let lineStart = 0;
  for (let i = 0; i < offset && i < text.length; i++) {
    if (text.charCodeAt(i) === 10) {
      line++;
      lineStart = i + 1;
    }
  }
  return { line, column: offset - lineStart + 1 };
}

interface JsonScan {
  error?: { offset: number; pointer: string; message: string };
  duplicateKeys: { offset: number; pointer: string; key: string }[];
}

class JsonSyntaxError extends Error {
  constructor(
    readonly offset: number,
    readonly pointer: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * Checks JSON text: the first syntax error (offset, the JSON pointer of the value being read, and
 * a reason that never quotes the text beyond one character) and every duplicate object key.
 * JSON.parse is used for the values; this only finds where and why it would fail.
 */
function scanJson(text: string): JsonScan {
  const duplicateKeys: JsonScan['duplicateKeys'] = [];
  let i = 0;
  const fail = (pointer: string, message: string, at = i): never => {
    throw new JsonSyntaxError(at, pointer, message);
  };
  const describe = (ch: string | undefined): string =>
    ch === undefined
      ? 'end of file'
      : /[\x21-\x7e]/.test(ch)
        ? `character '${ch}'`
        : `character U+${ch.charCodeAt(0).toString(16).padStart(4, '0').toUpperCase()}`;
  const skipWhitespace = (): void => {
    while (i < text.length && ' \t\n\r'.includes(text[i]!)) i++;
  };
  const unexpected = (pointer: string, expected: string): never => {
    const ch = text[i];
    if (ch === '/' && (text[i + 1] === '/' || text[i + 1] === '*')) fail(pointer, 'comments are not allowed in JSON');
    if (ch === "'") fail(pointer, 'strings must use double quotes');
    return fail(
      pointer,
      ch === undefined ? `unexpected end of file, expected ${expected}` : `unexpected ${describe(ch)}, expected ${expected}`,
    );
  };
  const readString = (pointer: string): string => {
    const start = i;
    i++; // opening quote
    for (;;) {
      const ch = text[i];
      if (ch === undefined) fail(pointer, 'unterminated string', start);
      if (ch === '"') break;
      if (ch === '\\') {
        const next = text[i + 1];
        if (next === 'u') {
          if (!/^[0-9a-fA-F]{4}$/.test(text.slice(i + 2, i + 6)))
            fail(pointer, 'invalid \\u escape in a string (four hex digits expected)');
          i += 6;
        } else if (next !== undefined && '"\\/bfnrt'.includes(next)) {
          i += 2;
        } else {
          fail(pointer, 'invalid escape in a string (\\", \\\\, \\/, \\b, \\f, \\n, \\r, \\t or \\uXXXX)');
        }
        continue;
      }
      if (ch < ' ') fail(pointer, 'control character in a string (write it as an escape such as \\n)');
      i++;
    }
    i++; // closing quote
    return JSON.parse(text.slice(start, i)) as string;
  };
  const readValue = (pointer: string): void => {
    skipWhitespace();
    const ch = text[i];
    if (ch === '{') return readObject(pointer);
    if (ch === '[') return readArray(pointer);
    if (ch === '"') {
      readString(pointer);
      return;
    }
    if (ch === '-' || (ch !== undefined && ch >= '0' && ch <= '9')) {
      const number = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;
      number.lastIndex = i;
      const match = number.exec(text);
      if (!match) fail(pointer, 'invalid number');
      i += match![0].length;
      if (/[0-9.eE+-]/.test(text[i] ?? '')) fail(pointer, 'invalid number');
      return;
    }
    for (const literal of ['true', 'false', 'null']) {
      if (text.startsWith(literal, i)) {
        i += literal.length;
        return;
      }
    }
    unexpected(pointer, 'a value');
  };
  const readObject = (pointer: string): void => {
    i++; // {
    const keys = new Set<string>();
    skipWhitespace();
    if (text[i] === '}') {
      i++;
      return;
    }
    for (;;) {
      skipWhitespace();
      if (text[i] !== '"') unexpected(pointer, 'a property name in double quotes');
      const keyOffset = i;
      const key = readString(pointer);
      const valuePointer = `${pointer}/${escapePointerToken(key)}`;
      if (keys.has(key)) duplicateKeys.push({ offset: keyOffset, pointer: valuePointer, key });
      keys.add(key);
      skipWhitespace();
      if (text[i] !== ':') unexpected(valuePointer, `':' after the property name`);
      i++;
      readValue(valuePointer);
      skipWhitespace();
      if (text[i] === ',') {
        i++;
        skipWhitespace();
        if (text[i] === '}') fail(pointer, `trailing comma before '}'`);
        continue;
      }
      if (text[i] === '}') {
        i++;
        return;
      }
      unexpected(valuePointer, `',' or '}' after the property value`);
    }
  };
  const readArray = (pointer: string): void => {
    i++; // [
    skipWhitespace();
    if (text[i] === ']') {
      i++;
      return;
    }
    for (let index = 0; ; index++) {
      const itemPointer = `${pointer}/${index}`;
      readValue(itemPointer);
      skipWhitespace();
      if (text[i] === ',') {
        i++;
        skipWhitespace();
        if (text[i] === ']') fail(pointer, `trailing comma before ']'`);
        continue;
      }
      if (text[i] === ']') {
        i++;
        return;
      }
      unexpected(itemPointer, `',' or ']' after the array item`);
    }
  };
  try {
    skipWhitespace();
    if (i === text.length) fail('', 'the file is empty');
    readValue('');
    skipWhitespace();
    if (i < text.length) fail('', `unexpected ${describe(text[i])} after the end of the JSON value`);
    return { duplicateKeys };
  } catch (err) {
    if (!(err instanceof JsonSyntaxError)) throw err;
    return { error: { offset: err.offset, pointer: err.pointer, message: err.message }, duplicateKeys };
  }
}

function escapePointerToken(token: string): string {
  return token.replaceAll('~', '~0').replaceAll('/', '~1');
}

function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

// ---------------------------------------------------------------------------------------------
// ${env:NAME}

/**
 * Replaces ${env:NAME} in every string of a JSON value (keys are left alone). A placeholder that
 * is part of a connection URL (not the whole string) is percent-encoded, so a password with "@",
 * "/" or "#" works in "postgres://user:${env:PASSWORD}@host/db"; a whole-string placeholder
 * ("${env:SF_URL}") is taken as is. Unknown variables are reported and left in place.
 */
function substituteEnv(value: Json, pointer: string, env: NodeJS.ProcessEnv, report: (pointer: string, message: string) => void): Json {
  if (typeof value === 'string') {
    if (!value.includes('${env:')) return value;
    const inUrl = /^\/servers\/[^/]+\/connection$/.test(pointer) && value.replace(ENV_REFERENCE, '') !== '';
    return value.replace(ENV_REFERENCE, (placeholder, name: string) => {
      if (!ENV_NAME.test(name)) {
        report(pointer, `"\${env:${name}}" is not a valid variable reference (names are letters, digits and "_")`);
        return placeholder;
      }
      const resolved = env[name];
      if (resolved === undefined) {
        report(pointer, `environment variable ${name} is not set`);
        return placeholder;
      }
      return inUrl ? encodeURIComponent(resolved) : resolved;
    });
  }
  if (Array.isArray(value)) return value.map((item, i) => substituteEnv(item, `${pointer}/${i}`, env, report));
  if (isObject(value)) {
    const result: JsonObject = {};
    for (const [key, item] of Object.entries(value))
      result[key] = substituteEnv(item, `${pointer}/${escapePointerToken(key)}`, env, report);
    return result;
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Schema validation and the translation of ajv errors into plain words

interface Validators {
  config: ValidateFunction;
  rules: ValidateFunction;
}

async function compileValidators(): Promise<Validators> {
  // strict, except "required" inside if/then (tests for presence) and types in if/then branches (implied by the "if")
  const ajv = new Ajv({ allErrors: true, verbose: true, strict: true, strictRequired: false, strictTypes: false });
  const read = async (name: string): Promise<object> => JSON.parse(await readFile(path.join(SCHEMA_DIR, name), 'utf8')) as object;
  return {
    config: ajv.compile(await read('config.schema.json')),
    rules: ajv.compile(await read('rules.schema.json')),
  };
}

function schemaProblems(validate: ValidateFunction, document: Json, file: string): ConfigProblem[] {
  if (validate(document)) return [];
  return (validate.errors ?? []).flatMap((e) => translateAjvError(e, file));
}

const CONDITIONS_POINTER = /^\/(?:filters|escalations)\/\d+\/conditions(?=\/|$)/;

/** Schema problems of a rule file, with conditions checked by the compiler's own words. */
function ruleSchemaProblems(validate: ValidateFunction, document: Json, file: string): ConfigProblem[] {
  const problems = schemaProblems(validate, document, file).filter((p) => !CONDITIONS_POINTER.test(p.pointer));
  if (!isObject(document)) return problems;
  for (const kind of ['filters', 'escalations'] as const) {
    const items = document[kind];
    if (!Array.isArray(items)) continue;
    items.forEach((item, i) => {
      if (!isObject(item) || !Object.hasOwn(item, 'conditions')) return;
      const base = `/${kind}/${i}/conditions`;
      for (const p of checkConditions(item.conditions)) problems.push({ file, pointer: base + p.pointer, message: p.message });
    });
  }
  return problems;
}

/** Plain words for the schema's patterns. */
const PATTERN_WORDS: Readonly<Record<string, string>> = {
  '^[a-z][a-z0-9_]{0,39}$': 'must be a server name: a lowercase letter, then lowercase letters, digits and "_", at most 40 characters',
  '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$':
    'must be a name of letters, digits, "_", "." and "-", starting with a letter or digit, at most 63 characters',
  '^(?:[A-Za-z_][A-Za-z0-9_$]{0,62}\\.)?[A-Za-z_][A-Za-z0-9_$]{0,62}$':
    'must be a form: "table" or "schema.table" (letters, digits, "_" and "$", starting with a letter or "_")',
  '^(?:postgres|postgresql)://|^\\$\\{env:[A-Za-z_][A-Za-z0-9_]*\\}$': 'must be a postgres:// or postgresql:// URL',
  '^[0-9]{1,5}$': 'must be a port number',
  '^[0-9]+$': 'must be a whole number of seconds',
};

/** Extra words for properties that are not allowed in some places. */
const NOT_ALLOWED_WORDS: Readonly<Record<string, string>> = {
  overrideLoopDetection: '"overrideLoopDetection" only applies to transfer and return actions',
};

const TYPE_WORDS: Readonly<Record<string, string>> = {
  string: 'a string',
  number: 'a number',
  integer: 'an integer',
  boolean: 'a boolean (true or false)',
  object: 'an object',
  array: 'an array',
  null: 'null',
};

function translateAjvError(error: ErrorObject, file: string): ConfigProblem[] {
  // an error about a property name is reported once, by its "propertyNames" error
  if (error.propertyName !== undefined) return [];
  const pointer = error.instancePath;
  const params = error.params as Record<string, unknown>;
  const at = (p: string, message: string): ConfigProblem[] => [{ file, pointer: p, message }];
  switch (error.keyword) {
    case 'if':
      return []; // the failing "then"/"else" branch reports the real problem
    case 'additionalProperties': {
      const property = String(params.additionalProperty);
      const known = Object.keys((error.parentSchema as { properties?: object } | undefined)?.properties ?? {});
      const suggestion = closestName(property, known);
      return at(
        `${pointer}/${escapePointerToken(property)}`,
        `unknown property "${property}"${suggestion ? ` (did you mean "${suggestion}"?)` : ''}`,
      );
    }
    case 'required':
      return at(pointer, `missing required property "${String(params.missingProperty)}"`);
    case 'enum':
      return at(pointer, `must be one of ${(params.allowedValues as unknown[]).map((v) => JSON.stringify(v)).join(', ')}`);
    case 'const':
      return at(
        pointer,
        /\/match$/.test(pointer)
          ? 'must be "request-id" or {"fields": [target columns]}'
          : `must be ${JSON.stringify(params.allowedValue)}`,
      );
    case 'type': {
      const types = Array.isArray(params.type) ? (params.type as string[]) : String(params.type).split(',');
      return at(pointer, `must be ${types.map((t) => TYPE_WORDS[t] ?? t).join(' or ')}`);
    }
    case 'pattern': {
      const pattern = String(params.pattern);
      return at(pointer, PATTERN_WORDS[pattern] ?? `must match the pattern ${pattern}`);
    }
    case 'propertyNames': {
      const name = String(params.propertyName);
      const rule = (error.schema as { description?: string } | undefined)?.description;
      return at(`${pointer}/${escapePointerToken(name)}`, `invalid name "${name}"${rule ? `: ${rule}` : ''}`);
    }
    case 'false schema': {
      const property = decodePointerToken(pointer.slice(pointer.lastIndexOf('/') + 1));
      return at(pointer, NOT_ALLOWED_WORDS[property] ?? `"${property}" is not allowed here`);
    }
    case 'minItems':
      return at(pointer, Number(params.limit) === 1 ? 'must not be empty' : `must have at least ${String(params.limit)} items`);
    case 'minProperties':
      return at(pointer, Number(params.limit) === 1 ? 'must not be empty' : `must have at least ${String(params.limit)} properties`);
    case 'minLength':
      return at(pointer, Number(params.limit) === 1 ? 'must not be empty' : `must have at least ${String(params.limit)} characters`);
    case 'maxLength':
      return at(pointer, `must have at most ${String(params.limit)} characters`);
    case 'uniqueItems':
      return at(pointer, `must not list the same value twice (items ${String(params.j)} and ${String(params.i)})`);
    case 'minimum':
    case 'maximum':
    case 'exclusiveMinimum':
    case 'exclusiveMaximum':
      return at(pointer, `must be ${String(params.comparison)} ${String(params.limit)}`);
    default:
      return at(pointer, error.message ?? `is not valid (${error.keyword})`);
  }
}

function decodePointerToken(token: string): string {
  return token.replaceAll('~1', '/').replaceAll('~0', '~');
}

/** The known name closest to a misspelt one, when close enough to be a typo. */
function closestName(name: string, candidates: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const candidate of candidates) {
    const distance = editDistance(name.toLowerCase(), candidate.toLowerCase());
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return best !== undefined && bestDistance <= Math.max(1, Math.floor(best.length / 3)) ? best : undefined;
}

/** Damerau-Levenshtein distance (optimal string alignment), so "trasnfer" is one edit from "transfer". */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let value = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) value = Math.min(value, d[i - 2]![j - 2]! + 1);
      d[i]![j] = value;
    }
  }
  return d[a.length]![b.length]!;
}

// ---------------------------------------------------------------------------------------------
// Connections

/** ConnectionSettings per server whose connection is valid; problems for the others. */
function resolveConnections(config: JsonObject, file: string, problems: ProblemList): Map<string, ConnectionSettings> {
  const result = new Map<string, ConnectionSettings>();
  if (!isObject(config.servers)) return result;
  for (const [name, server] of Object.entries(config.servers)) {
    if (!isObject(server)) continue;
    const pointer = `/servers/${escapePointerToken(name)}/connection`;
    const connection = server.connection;
    // already reported (a missing variable, a schema problem): do not pile a second problem on it
    if (problems.hasAtOrUnder(file, pointer)) continue;
    const report = (suffix: string, message: string): void => problems.add(file, pointer + suffix, message);
    const settings =
      typeof connection === 'string'
        ? parseConnectionUrl(connection, (message) => report('', message))
        : isObject(connection)
          ? connectionFromObject(connection, report)
          : undefined;
    if (settings) result.set(name, settings);
  }
  return result;
}

/** Parses postgres://user:password@host:port/database?param=value. Messages never quote the URL. */
function parseConnectionUrl(text: string, report: (message: string) => void): ConnectionSettings | undefined {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    report('is not a valid postgres:// URL (percent-encode special characters of the user name and password)');
    return undefined;
  }
  if (url.protocol !== 'postgres:' && url.protocol !== 'postgresql:') {
    report('must be a postgres:// or postgresql:// URL');
    return undefined;
  }
  const decode = (part: string, what: string): string | undefined => {
    try {
      return decodeURIComponent(part);
    } catch {
      report(`the ${what} in the URL is not validly percent-encoded`);
      return undefined;
    }
  };
  let host = decode(url.hostname.replace(/^\[(.*)\]$/, '$1'), 'host');
  const user = decode(url.username, 'user name');
  const password = url.password === '' ? undefined : decode(url.password, 'password');
  const database = decode(url.pathname.replace(/^\//, ''), 'database name');
  let port = url.port === '' ? DEFAULT_PORT : Number(url.port);
  const options: Record<string, string> = {};
  for (const [key, value] of url.searchParams) {
    if (key === 'host') host = value;
    else if (key === 'port') port = Number(value);
    else if ((CONNECTION_PARAMETERS as readonly string[]).includes(key)) options[key] = value;
    else report(`unknown connection parameter "${key}" in the URL (known: ${CONNECTION_PARAMETERS.join(', ')}, host, port)`);
  }
  let ok = true;
  const need = (value: string | undefined, message: string): void => {
    if (!value) {
      report(message);
      ok = false;
    }
  };
  need(host, 'the URL names no host (postgres://user@HOST:5432/database)');
  need(user, 'the URL names no user (postgres://USER@host:5432/database)');
  need(database, 'the URL names no database (postgres://user@host:5432/DATABASE)');
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    report('the port in the URL must be a number from 1 to 65535');
    ok = false;
  }
  if (options.sslmode !== undefined && !SSL_MODES.includes(options.sslmode)) {
    report(`sslmode must be one of ${SSL_MODES.map((m) => `"${m}"`).join(', ')}`);
    ok = false;
  }
  if (options.connect_timeout !== undefined && !/^[0-9]+$/.test(options.connect_timeout)) {
    report('connect_timeout must be a whole number of seconds');
    ok = false;
  }
  if (!ok) return undefined;
  return withOptions({ host: host!, port, database: database!, user: user!, ...(password !== undefined ? { password } : {}) }, options);
}

function connectionFromObject(connection: JsonObject, report: (suffix: string, message: string) => void): ConnectionSettings | undefined {
  const port = connection.port === undefined ? DEFAULT_PORT : Number(connection.port);
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    report('/port', 'must be a number from 1 to 65535');
    return undefined;
  }
  const options: Record<string, string> = {};
  for (const key of CONNECTION_PARAMETERS) {
    const value = connection[key];
    if (value !== undefined && value !== null) options[key] = String(value);
  }
  const settings: ConnectionSettings = {
    host: String(connection.host),
    port,
    database: String(connection.database),
    user: String(connection.user),
  };
  if (typeof connection.password === 'string') settings.password = connection.password;
  return withOptions(settings, options);
}

function withOptions(settings: ConnectionSettings, options: Record<string, string>): ConnectionSettings {
  return Object.keys(options).length > 0 ? { ...settings, options } : settings;
}

// ---------------------------------------------------------------------------------------------
// Rule files

/** Absolute paths of the rule files, in the order the config lists them, each once. */
async function findRuleFiles(entries: readonly Json[], configDir: string, configFile: string, problems: ProblemList): Promise<string[]> {
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

interface RuleDocument {
  file: string;
  document: Json;
}

type RuleKind = 'mappings' | 'filters' | 'escalations';
const RULE_KIND_WORD: Readonly<Record<RuleKind, string>> = { mappings: 'mapping', filters: 'filter', escalations: 'escalation' };

/** One mapping, filter or escalation as written, with where it was written. */
interface RawItem {
  kind: RuleKind;
  file: string;
  pointer: string;
  item: JsonObject;
}

function rawItems(documents: readonly RuleDocument[], kind: RuleKind): RawItem[] {
  const items: RawItem[] = [];
  for (const { file, document } of documents) {
    if (!isObject(document) || !Array.isArray(document[kind])) continue;
    document[kind].forEach((item, i) => {
      if (isObject(item)) items.push({ kind, file, pointer: `/${kind}/${i}`, item });
    });
  }
  return items;
}

function parseForm(form: string): { schema: string; table: string } | undefined {
  const match = FORM_PATTERN.exec(form);
  return match ? { schema: match[1] ?? 'public', table: match[2]! } : undefined;
}

function formLabel(server: string, form: { schema: string; table: string }): string {
  return `${server}:${form.schema}.${form.table}`;
}

/** The server and parsed form of an {server, form} object as written, when both are well formed. */
function rawFormRef(value: Json | undefined): (FormRef & { label: string }) | undefined {
  if (!isObject(value) || typeof value.server !== 'string' || typeof value.form !== 'string') return undefined;
  const form = parseForm(value.form);
  return form ? { server: value.server, ...form, label: formLabel(value.server, form) } : undefined;
}

/** The checks that need more than one value or more than one file. */
function checkAcrossFiles(documents: readonly RuleDocument[], serverNames: readonly string[], problems: ProblemList): void {
  const mappings = rawItems(documents, 'mappings');
  const filters = rawItems(documents, 'filters');
  const escalations = rawItems(documents, 'escalations');
  const known = new Set(serverNames);
  const serverList = serverNames.length > 0 ? serverNames.map((s) => `"${s}"`).join(', ') : 'none';

  const checkServer = (file: string, pointer: string, server: Json | undefined): void => {
    if (typeof server !== 'string' || known.has(server) || problems.hasAt(file, pointer)) return;
    const suggestion = closestName(server, serverNames);
    problems.add(
      file,
      pointer,
      `unknown server "${server}"${suggestion ? ` (did you mean "${suggestion}"?)` : ''}; the config defines ${serverList}`,
    );
  };

  // unique names, per kind, across all files
  for (const items of [mappings, filters, escalations]) {
    const firstByName = new Map<string, RawItem>();
    for (const entry of items) {
      const name = entry.item.name;
      if (typeof name !== 'string') continue;
      const first = firstByName.get(name);
      if (first) {
        const where = first.file === entry.file ? `${first.pointer}/name` : `${first.file}#${first.pointer}/name`;
        problems.add(
          entry.file,
          `${entry.pointer}/name`,
          `duplicate ${RULE_KIND_WORD[entry.kind]} name "${name}": already defined at ${where}`,
        );
      } else {
        firstByName.set(name, entry);
      }
    }
  }

  const mappingsByName = new Map<string, RawItem>();
  for (const entry of mappings) {
    const { file, pointer, item } = entry;
    if (typeof item.name === 'string' && !mappingsByName.has(item.name)) mappingsByName.set(item.name, entry);
    for (const end of ['from', 'to'] as const) {
      const ref = item[end];
      if (isObject(ref)) checkServer(file, `${pointer}/${end}/server`, ref.server);
    }
    const from = rawFormRef(item.from);
    const to = rawFormRef(item.to);
    if (from && to && from.label === to.label) {
      problems.add(file, `${pointer}/to`, `a mapping cannot carry requests to the form it reads from (${from.label})`);
    }
    checkFields(file, pointer, item.fields, problems);
  }

  const checkActions = (entry: RawItem): void => {
    const { file, pointer, item } = entry;
    const kindWord = RULE_KIND_WORD[entry.kind];
    const on = rawFormRef(item.on);
    if (!Array.isArray(item.actions)) return;
    item.actions.forEach((action, i) => {
      if (!isObject(action) || typeof action.mapping !== 'string') return;
      const actionPointer = `${pointer}/actions/${i}/mapping`;
      if (problems.hasAt(file, actionPointer)) return;
      const mapping = mappingsByName.get(action.mapping);
      if (!mapping) {
        const suggestion = closestName(action.mapping, [...mappingsByName.keys()]);
        problems.add(file, actionPointer, `unknown mapping "${action.mapping}"${suggestion ? ` (did you mean "${suggestion}"?)` : ''}`);
        return;
      }
      if (action.type === 'return') {
        const to = rawFormRef(mapping.item.to);
        if (on && to && to.label !== on.label) {
          problems.add(
            file,
            actionPointer,
            `mapping "${action.mapping}" carries requests to ${to.label}, but ${kindWord} "${String(item.name)}" is on ${on.label}: a return action names the mapping that brought the request to the ${kindWord}'s server and form`,
          );
        }
        return;
      }
      const from = rawFormRef(mapping.item.from);
      if (on && from && from.label !== on.label) {
        problems.add(
          file,
          actionPointer,
          `mapping "${action.mapping}" reads from ${from.label}, but ${kindWord} "${String(item.name)}" is on ${on.label}: ${action.type === 'update' ? 'an' : 'a'} ${String(action.type)} action needs a mapping whose "from" is the ${kindWord}'s server and form`,
        );
      }
    });
  };

  for (const entry of [...filters, ...escalations]) {
    if (isObject(entry.item.on)) checkServer(entry.file, `${entry.pointer}/on/server`, entry.item.on.server);
    checkActions(entry);
  }
  for (const entry of escalations) checkSchedule(entry, problems);
}

/** fields.map and fields.set name each target column once, never an excluded or a distributed column. */
function checkFields(file: string, pointer: string, fields: Json | undefined, problems: ProblemList): void {
  if (!isObject(fields)) return;
  const exclude = new Set(Array.isArray(fields.exclude) ? fields.exclude.filter((c): c is string => typeof c === 'string') : []);
  const mapTargets = isObject(fields.map) ? Object.keys(fields.map) : [];
  const setTargets = isObject(fields.set) ? Object.keys(fields.set) : [];
  const mapped = new Set(mapTargets);
  for (const [section, targets] of [
    ['map', mapTargets],
    ['set', setTargets],
  ] as const) {
    for (const column of targets) {
      const columnPointer = `${pointer}/fields/${section}/${escapePointerToken(column)}`;
      if (section === 'set' && mapped.has(column)) {
        problems.add(file, columnPointer, `target column "${column}" is given twice, in "fields.map" and in "fields.set"`);
      }
      if (exclude.has(column)) {
        problems.add(file, columnPointer, `column "${column}" is both in "fields.exclude" and a target of "fields.${section}"`);
      }
      if (column.startsWith('dso_')) {
        problems.add(file, columnPointer, `column "${column}" is a distributed column that pgdso maintains itself`);
      }
    }
  }
}

/** The cron expression parses and fires some day; the time zone is known. */
function checkSchedule(entry: RawItem, problems: ProblemList): void {
  const schedule = entry.item.schedule;
  if (!isObject(schedule)) return;
  const { file, pointer } = entry;
  let timezone: string | undefined;
  if (typeof schedule.timezone === 'string' && !problems.hasAt(file, `${pointer}/schedule/timezone`)) {
    if (isKnownTimeZone(schedule.timezone)) timezone = schedule.timezone;
    else
      problems.add(
        file,
        `${pointer}/schedule/timezone`,
        `unknown time zone "${schedule.timezone}" (use an IANA name such as "America/Los_Angeles" or "UTC")`,
      );
  }
  if (typeof schedule.cron !== 'string' || problems.hasAt(file, `${pointer}/schedule/cron`)) return;
  try {
    const job = new Cron(schedule.cron, { paused: true, ...(timezone ? { timezone } : {}) });
    const next = job.nextRun();
    job.stop();
    if (next === null) problems.add(file, `${pointer}/schedule/cron`, `the cron expression "${schedule.cron}" never fires`);
  } catch (err) {
    const reason = (err instanceof Error ? err.message : String(err)).replace(/^CronPattern: /, '');
    problems.add(file, `${pointer}/schedule/cron`, `invalid cron expression "${schedule.cron}": ${reason}`);
  }
}

function isKnownTimeZone(timeZone: string): boolean {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone });
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Resolution (only for a config without problems: the schema guarantees the shapes)

function resolveConfig(
  file: string,
  config: JsonObject,
  connections: ReadonlyMap<string, ConnectionSettings>,
  ruleFiles: readonly string[],
  documents: readonly RuleDocument[],
): PgdsoConfig {
  const servers: Record<string, ServerConfig> = {};
  for (const [name, connection] of connections) servers[name] = { name, connection };

  const mappings: Record<string, MappingConfig> = {};
  for (const { file: source, pointer, item } of rawItems(documents, 'mappings')) {
    const mapping = resolveMapping(item, { file: source, pointer });
    mappings[mapping.name] = mapping;
  }
  const filters: FilterConfig[] = rawItems(documents, 'filters').map(({ file: source, pointer, item }) => {
    const on = item.on as JsonObject;
    const form = parseForm(on.form as string)!;
    return {
      name: item.name as string,
      on: {
        server: on.server as string,
        ...form,
        ops: (on.ops as Op[] | undefined) ?? [...DEFAULT_FILTER_OPS],
        transitions: on.transitions === true,
      },
      conditions: (item.conditions as Record<string, unknown> | null | undefined) ?? null,
      actions: (item.actions as JsonObject[]).map(resolveAction),
      source: { file: source, pointer },
    };
  });
  const escalations: EscalationConfig[] = rawItems(documents, 'escalations').map(({ file: source, pointer, item }) => {
    const on = item.on as JsonObject;
    const schedule = item.schedule as JsonObject;
    return {
      name: item.name as string,
      on: { server: on.server as string, ...parseForm(on.form as string)! },
      schedule: { cron: schedule.cron as string, ...(typeof schedule.timezone === 'string' ? { timezone: schedule.timezone } : {}) },
      conditions: (item.conditions as Record<string, unknown> | null | undefined) ?? null,
      actions: (item.actions as JsonObject[]).map(resolveAction),
      source: { file: source, pointer },
    };
  });

  const group = (config.group as JsonObject | undefined) ?? {};
  const http = config.http as JsonObject | undefined;
  const pending = (config.pending as JsonObject | undefined) ?? {};
  const retry = pending.retry as Json | undefined;
  return {
    file,
    servers,
    ruleFiles: [...ruleFiles],
    mappings,
    filters,
    escalations,
    group: {
      checkIntervalSeconds: (group.checkIntervalSeconds as number | undefined) ?? DEFAULT_GROUP.checkIntervalSeconds,
      delinquentThreshold: (group.delinquentThreshold as number | undefined) ?? DEFAULT_GROUP.delinquentThreshold,
    },
    pending: {
      retry:
        retry === 'dso'
          ? { kind: 'dso' }
          : {
              kind: 'backoff',
              firstMs: (((retry as JsonObject | undefined)?.firstSeconds as number | undefined) ?? 1) * 1000,
              maxMs: (((retry as JsonObject | undefined)?.maxSeconds as number | undefined) ?? 60) * 1000,
            },
      heartbeatMs: ((pending.heartbeatSeconds as number | undefined) ?? 10) * 1000,
      retainedWalWarnBytes: (pending.retainedWalWarnBytes as number | undefined) ?? 1024 ** 3,
    },
    http: { port: (http?.port as number | undefined) ?? null },
  };
}

function resolveFormRef(value: Json | undefined): FormRef {
  const ref = value as JsonObject;
  return { server: ref.server as string, ...parseForm(ref.form as string)! };
}

function resolveMapping(item: JsonObject, source: { file: string; pointer: string }): MappingConfig {
  const fields = (item.fields as JsonObject | undefined) ?? {};
  const match = item.match as Json | undefined;
  return {
    name: item.name as string,
    from: resolveFormRef(item.from),
    to: resolveFormRef(item.to),
    transferMode: (item.transferMode as MappingConfig['transferMode'] | undefined) ?? 'data+ownership',
    whenToUpdate: (item.whenToUpdate as MappingConfig['whenToUpdate'] | undefined) ?? 'immediately',
    duplicateRequestId: (item.duplicateRequestId as MappingConfig['duplicateRequestId'] | undefined) ?? 'error',
    match: isObject(match) ? { fields: [...(match.fields as string[])] } : 'request-id',
    fields: {
      byName: (fields.byName as boolean | undefined) ?? true,
      exclude: [...((fields.exclude as string[] | undefined) ?? [])],
      map: { ...((fields.map as Record<string, string> | undefined) ?? {}) },
      set: { ...((fields.set as Record<string, unknown> | undefined) ?? {}) },
    },
    afterTransfer: (item.afterTransfer as MappingConfig['afterTransfer'] | undefined) ?? 'keep',
    conflict: (item.conflict as MappingConfig['conflict'] | undefined) ?? 'source-wins',
    pool: (item.pool as string | undefined) ?? 'default',
    source,
  };
}

function resolveAction(action: JsonObject): ActionConfig {
  const overrideLoopDetection = action.overrideLoopDetection === true;
  switch (action.type) {
    case 'transfer':
      return { type: 'transfer', mapping: action.mapping as string, overrideLoopDetection };
    case 'return':
      return typeof action.mapping === 'string'
        ? { type: 'return', mapping: action.mapping, overrideLoopDetection }
        : { type: 'return', overrideLoopDetection };
    case 'update':
      return { type: 'update', mapping: action.mapping as string };
    default:
      return { type: 'delete', mapping: action.mapping as string };
  }
}

/** Freezes a value and everything it holds. */
function deepFreeze<T>(value: T): T {
  if (typeof value === 'object' && value !== null && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const key of Object.keys(value)) deepFreeze((value as Record<string, unknown>)[key]);
  }
  return value;
}
