// Server connections: the config's URL or object form resolved to ConnectionSettings, and the
// settings turned into node-postgres ones (libpq's sslmode meanings) or a password-free label.

import { readFileSync } from 'node:fs';
import type pg from 'pg';
import { escapePointerToken, isObject, type JsonObject } from './json.ts';
import type { ProblemList } from './problems.ts';
import type { ConnectionSettings } from './types.ts';

const DEFAULT_PORT = 5432;
/** Connection parameters accepted besides host, port, database, user and password. */
const CONNECTION_PARAMETERS = ['sslmode', 'sslrootcert', 'sslcert', 'sslkey', 'application_name', 'connect_timeout', 'options'] as const;
const SSL_MODES = ['disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full', 'no-verify'];

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

/** ConnectionSettings per server whose connection is valid; problems for the others. */
export function resolveConnections(config: JsonObject, file: string, problems: ProblemList): Map<string, ConnectionSettings> {
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
