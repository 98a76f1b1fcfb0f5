// Validation against schema/config.schema.json and schema/rules.schema.json with ajv, and the
// translation of ajv errors into plain words.

import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { checkConditions } from '../rules/compile.ts';
import { decodePointerToken, escapePointerToken, isObject, type Json } from './json.ts';
import { closestName } from './problems.ts';
import type { ConfigProblem } from './types.ts';

const SCHEMA_DIR = fileURLToPath(new URL('../../schema/', import.meta.url));

export interface Validators {
  config: ValidateFunction;
  rules: ValidateFunction;
}

export async function compileValidators(): Promise<Validators> {
  // strict, except "required" inside if/then (tests for presence) and types in if/then branches (implied by the "if")
  const ajv = new Ajv({ allErrors: true, verbose: true, strict: true, strictRequired: false, strictTypes: false });
  const read = async (name: string): Promise<object> => JSON.parse(await readFile(path.join(SCHEMA_DIR, name), 'utf8')) as object;
  return {
    config: ajv.compile(await read('config.schema.json')),
    rules: ajv.compile(await read('rules.schema.json')),
  };
}

export function schemaProblems(validate: ValidateFunction, document: Json, file: string): ConfigProblem[] {
  if (validate(document)) return [];
  return (validate.errors ?? []).flatMap((e) => translateAjvError(e, file));
}

const CONDITIONS_POINTER = /^\/(?:filters|escalations)\/\d+\/conditions(?=\/|$)/;

/** Schema problems of a rule file, with conditions checked by the compiler's own words. */
export function ruleSchemaProblems(validate: ValidateFunction, document: Json, file: string): ConfigProblem[] {
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
