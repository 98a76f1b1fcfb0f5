// JSON text as pgdso reads it: the first syntax error with its line, column and JSON pointer,
// every duplicate key, never more than one character of the text quoted; JSON pointer tokens.

import { readFile } from 'node:fs/promises';
import type { ProblemList } from './problems.ts';

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

/** Reads and parses a JSON file; on failure reports the problem and returns undefined. */
export async function readJsonFile(file: string, problems: ProblemList): Promise<Json | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    problems.add(file, '', readFailure(err));
    return undefined;
  }
  return parseJsonText(file, text, problems);
}

/** Why a file could not be read, in the words used for a config or rule file. */
export function readFailure(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOENT' ? 'file not found' : code === 'EISDIR' ? 'is a directory, not a file' : `cannot be read (${code ?? 'error'})`;
}

/** Parses the text of a JSON file (named `file` in problems); on a syntax error reports it and returns undefined. */
export function parseJsonText(file: string, source: string, problems: ProblemList): Json | undefined {
  const text = source.charCodeAt(0) === 0xfeff ? source.slice(1) : source;
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

export function escapePointerToken(token: string): string {
  return token.replaceAll('~', '~0').replaceAll('/', '~1');
}

export function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

export function decodePointerToken(token: string): string {
  return token.replaceAll('~1', '/').replaceAll('~0', '~');
}
