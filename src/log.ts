// pino, with secrets kept out: password fields are redacted at any depth we log, and every
// string that looks like a connection URL has its password masked (messages and errors too).
import pino, { type Logger } from 'pino';

// greedy up to the last '@' of the word: a password may hold a raw '@'
const URL_PASSWORD = /(\b[a-z][a-z0-9+.-]*:\/\/[^:/?#@\s]*:)(\S*)@/gi;
const KEY_VALUE_PASSWORD = /(\bpassword\s*=\s*)('[^']*'|\S+)/gi;

/** Masks passwords in connection URLs and `password=...` pairs inside any text. */
export function maskSecrets(text: string): string {
  return text.replace(URL_PASSWORD, '$1*****@').replace(KEY_VALUE_PASSWORD, '$1*****');
}

function maskDeep(value: unknown, depth = 0): unknown {
  if (typeof value === 'string') return maskSecrets(value);
  if (value instanceof Error) return errorSerializer(value);
  if (depth > 6 || value === null || typeof value !== 'object') return value;
  if (Array.isArray(value)) return value.map((v) => maskDeep(v, depth + 1));
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) out[k] = /password|secret/i.test(k) ? '*****' : maskDeep(v, depth + 1);
  return out;
}

function errorSerializer(err: unknown): unknown {
  if (!(err instanceof Error)) return maskDeep(err);
  const e = err as Error & { code?: string; detail?: string; hint?: string };
  return maskDeep({ type: e.name, message: e.message, code: e.code, detail: e.detail, hint: e.hint, stack: e.stack });
}

export interface LogOptions {
  level?: string;
  destination?: pino.DestinationStream;
}

export function createLogger(opts: LogOptions = {}): Logger {
  return pino(
    {
      level: opts.level ?? 'info',
      base: undefined,
      serializers: { err: errorSerializer, error: errorSerializer, connection: maskDeep },
      hooks: {
        logMethod(args, method) {
          const masked = args.map((a) => maskDeep(a)) as Parameters<typeof method>;
          method.apply(this, masked);
        },
      },
    },
    opts.destination ?? pino.destination({ dest: 2, sync: false }),
  );
}
