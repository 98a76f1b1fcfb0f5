// ${env:NAME} placeholders, replaced from the given environment (the only place that reads it).

import { escapePointerToken, isObject, type Json, type JsonObject } from './json.ts';

const ENV_REFERENCE = /\$\{env:([^}]*)\}/g;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/**
 * Replaces ${env:NAME} in every string of a JSON value (keys are left alone). A placeholder that
 * is part of a connection URL (not the whole string) is percent-encoded, so a password with "@",
 * "/" or "#" works in "postgres://user:${env:PASSWORD}@host/db"; a whole-string placeholder
 * ("${env:SF_URL}") is taken as is. Unknown variables are reported and left in place.
 */
export function substituteEnv(
  value: Json,
  pointer: string,
  env: NodeJS.ProcessEnv,
  report: (pointer: string, message: string) => void,
): Json {
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
