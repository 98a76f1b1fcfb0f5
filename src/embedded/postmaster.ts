// One local cluster's postmaster: started as a child of this process from the cluster's data
// directory, waited for until ready (explained from its log when it is not), stopped, killed
// like a crash, and started again.

import { type ChildProcess, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs, { type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import type pg from 'pg';
import { withClient } from '../sql/client.ts';
import { quoteIdent, quoteLiteral } from '../sql/identifiers.ts';
import {
  childPidsOf,
  findFreePort,
  isAlive,
  isPostmasterOf,
  LOOPBACK,
  serverEnvironment,
  signalQuietly,
  sleep,
  withTimeout,
} from './processes.ts';
import { type PgRuntime, SETTINGS_FILE, SUPERUSER, writeOwnedFile } from './runtime.ts';
import type { LocalCluster } from './types.ts';

const LOG_FILE = 'postgresql.log';
const START_TIMEOUT_MS = 120_000;
const STOP_TIMEOUT_MS = 60_000;
const PORT_ATTEMPTS = 8;
const RECENT_LINES = 200;

/** Raised by a start attempt whose port was taken; the message carries the server's words. */
class PortInUseError extends Error {}

/** A running postmaster child and what we know of its end. */
interface ServerProcess {
  child: ChildProcess;
  pid: number;
  exited: Promise<void>;
  /** True once we asked it to stop (or killed it), so its exit is not reported as a crash. */
  expectingExit: boolean;
  /** Sends a fast-shutdown request if Node exits while the server runs. */
  onNodeExit: () => void;
}

export class EmbeddedCluster implements LocalCluster {
  readonly host = LOOPBACK;
  readonly user = SUPERUSER;
  readonly password = crypto.randomBytes(24).toString('base64url');
  port = 0;
  private server: ServerProcess | undefined;
  private destroyed = false;
  /** Last log lines, kept to explain a failed start when they go to opts.log. */
  private readonly recentLines: string[] = [];
  /** Serialises start/stop/kill9/destroy. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly runtime: PgRuntime,
    readonly dataDir: string,
    private readonly settings: Record<string, string>,
    private readonly log: ((line: string) => void) | undefined,
  ) {}

  get pid(): number | undefined {
    return this.server?.pid;
  }

  url(database: string): string {
    return `postgres://${SUPERUSER}:${encodeURIComponent(this.password)}@${LOOPBACK}:${this.port}/${encodeURIComponent(database)}`;
  }

  async createDatabase(name: string): Promise<string> {
    await withClient(this.tcpClientConfig('postgres'), (client) => client.query(`CREATE DATABASE ${quoteIdent(name)}`));
    return this.url(name);
  }

  /** First start: pick a free port (again if it was taken meanwhile) and set the password. */
  initialStart(): Promise<void> {
    return this.exclusive(async () => {
      for (let attempt = 1; ; attempt++) {
        this.port = await findFreePort();
        await this.writeSettings();
        try {
          await this.launch();
          break;
        } catch (err) {
          if (!(err instanceof PortInUseError) || attempt >= PORT_ATTEMPTS) throw err;
        }
      }
      // Over the owner-only unix socket (trust): TCP has no password to accept yet.
      const socketConfig = {
        host: this.dataDir,
        port: this.port,
        user: SUPERUSER,
        database: 'postgres',
        application_name: 'local-cluster-admin',
      };
      await withClient(socketConfig, async (client) => {
        // Keep the statement out of the server log even if it fails.
        await client.query(`SET log_min_error_statement = panic`);
        await client.query(`SET log_statement = 'none'`);
        await client.query(`ALTER ROLE ${quoteIdent(SUPERUSER)} PASSWORD ${quoteLiteral(this.password)}`);
      });
    });
  }

  start(): Promise<void> {
    return this.exclusive(async () => {
      if (this.destroyed) throw new Error(`cluster ${this.dataDir} was destroyed`);
      if (this.server) return;
      await this.launch();
    });
  }

  stop(): Promise<void> {
    return this.exclusive(() => this.stopServer());
  }

  kill9(): Promise<void> {
    return this.exclusive(() => this.killServer());
  }

  destroy(): Promise<void> {
    return this.exclusive(async () => {
      if (this.server) await this.stopServer().catch(() => this.killServer());
      this.destroyed = true;
      await fs.rm(this.dataDir, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 });
    });
  }

  private exclusive<T>(operation: () => Promise<T>): Promise<T> {
    const result = this.queue.then(operation, operation);
    this.queue = result.catch(() => undefined);
    return result;
  }

  private tcpClientConfig(database: string): pg.ClientConfig {
    return { host: LOOPBACK, port: this.port, user: SUPERUSER, password: this.password, database, application_name: 'local-cluster-admin' };
  }

  private async writeSettings(): Promise<void> {
    const lines = Object.entries({ ...this.settings, port: String(this.port) }).map(([key, value]) => `${key} = ${quoteConfValue(value)}`);
    const text = `# Written by pgdso for this local cluster (included from postgresql.conf).\n${lines.join('\n')}\n`;
    await writeOwnedFile(path.join(this.dataDir, SETTINGS_FILE), text, this.runtime.runAs);
  }

  /** Spawn the postmaster and wait until it accepts connections; explain a failure from its log. */
  private async launch(): Promise<void> {
    await this.removeStalePidFile();
    const logPath = path.join(this.dataDir, LOG_FILE);
    let logHandle: FileHandle | undefined;
    let logOffset = 0;
    if (!this.log) {
      logHandle = await fs.open(logPath, 'a', 0o600);
      if (this.runtime.runAs) await logHandle.chown(this.runtime.runAs.uid, this.runtime.runAs.gid);
      logOffset = (await logHandle.stat()).size;
    }
    this.recentLines.length = 0;

    let child: ChildProcess;
    try {
      child = spawn(path.join(this.runtime.binDir, 'postgres'), ['-D', this.dataDir], {
        cwd: this.dataDir,
        env: serverEnvironment(),
        stdio: logHandle ? ['ignore', logHandle.fd, logHandle.fd] : ['ignore', 'pipe', 'pipe'],
        ...this.runtime.runAs,
      });
    } catch (err) {
      await logHandle?.close();
      throw err;
    }
    // Listen before any await: 'spawn' and 'error' are emitted on the next tick.
    const spawned = new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', reject);
    });
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    if (!logHandle) {
      for (const stream of [child.stdout, child.stderr]) if (stream) this.forwardLines(stream);
    }
    await logHandle?.close(); // the child has its own copy of the descriptor
    try {
      await spawned;
    } catch (err) {
      throw new Error(`could not run ${path.join(this.runtime.binDir, 'postgres')}: ${(err as Error).message}`);
    }
    const pid = child.pid!;
    const server: ServerProcess = {
      child,
      pid,
      exited,
      expectingExit: false,
      onNodeExit: () => signalQuietly(pid, 'SIGINT'),
    };
    child.unref();

    const outcome = await this.waitUntilReady(pid, exited);
    if (outcome !== 'ready') {
      server.expectingExit = true;
      if (outcome === 'timeout') {
        signalQuietly(pid, 'SIGQUIT');
        await withTimeout(exited, 5_000).catch(() => signalQuietly(pid, 'SIGKILL'));
      }
      if (!logHandle) {
        // The last lines may still be in the pipe when 'exit' fires.
        await withTimeout(new Promise((resolve) => child.once('close', resolve)), 1_000).catch(() => undefined);
      }
      const tail = await this.logTail(logPath, logOffset);
      const reason =
        outcome === 'timeout'
          ? `not ready after ${START_TIMEOUT_MS / 1000} s`
          : `exited with ${child.exitCode !== null ? `code ${child.exitCode}` : `signal ${child.signalCode}`}`;
      const message = `PostgreSQL in ${this.dataDir} did not start on port ${this.port} (${reason}). Server log:\n${tail}`;
      throw /Address already in use/i.test(tail) ? new PortInUseError(message) : new Error(message);
    }

    this.server = server;
    // One listener per running cluster: raise the limit so many clusters do not warn.
    const limited = process.getMaxListeners() > 0;
    if (limited) process.setMaxListeners(process.getMaxListeners() + 1);
    process.on('exit', server.onNodeExit);
    void exited.then(() => {
      process.off('exit', server.onNodeExit);
      if (limited) process.setMaxListeners(Math.max(1, process.getMaxListeners() - 1));
      if (this.server === server) this.server = undefined;
      if (!server.expectingExit) {
        this.emitPgdsoLine(`postmaster ${pid} exited unexpectedly (${child.exitCode ?? child.signalCode})`);
      }
    });
  }

  /** Polls postmaster.pid as pg_ctl does, until its status line says ready or the server exits. */
  private async waitUntilReady(pid: number, exited: Promise<void>): Promise<'ready' | 'exited' | 'timeout'> {
    let hasExited = false;
    void exited.then(() => (hasExited = true));
    const deadline = Date.now() + START_TIMEOUT_MS;
    const pidFile = path.join(this.dataDir, 'postmaster.pid');
    while (Date.now() < deadline) {
      if (hasExited) return 'exited';
      const lines = await fs.readFile(pidFile, 'utf8').then(
        (text) => text.split('\n'),
        () => [],
      );
      if (Number(lines[0]) === pid && lines[7]?.trim() === 'ready') return 'ready';
      await sleep(10);
    }
    return 'timeout';
  }

  private async stopServer(): Promise<void> {
    const server = this.server;
    if (!server) return;
    server.expectingExit = true;
    server.child.ref(); // keep Node alive until the exit is seen
    signalQuietly(server.pid, 'SIGINT'); // fast shutdown
    try {
      await withTimeout(server.exited, STOP_TIMEOUT_MS);
      this.server = undefined;
    } catch {
      signalQuietly(server.pid, 'SIGQUIT'); // immediate shutdown
      await withTimeout(server.exited, 5_000).catch(() => signalQuietly(server.pid, 'SIGKILL'));
      await server.exited;
      this.server = undefined;
      throw new Error(`PostgreSQL in ${this.dataDir} did not shut down within ${STOP_TIMEOUT_MS / 1000} s; it was killed`);
    }
  }

  /**
   * SIGKILL the postmaster and every process it started. The postmaster is stopped first so it
   * cannot fork while its children are listed; then both are killed and waited for, so that the
   * next start() is not refused because old backends still hold the shared memory.
   */
  private async killServer(): Promise<void> {
    const server = this.server;
    if (!server) return;
    server.expectingExit = true;
    server.child.ref(); // keep Node alive until the exit is seen
    signalQuietly(server.pid, 'SIGSTOP');
    const children = await childPidsOf(server.pid);
    signalQuietly(server.pid, 'SIGKILL');
    for (const pid of children) signalQuietly(pid, 'SIGKILL');
    await server.exited;
    this.server = undefined;
    const deadline = Date.now() + 10_000;
    for (const pid of children) {
      while ((await isAlive(pid)) && Date.now() < deadline) await sleep(10);
    }
  }

  /** After a kill, postmaster.pid names a dead process: remove it rather than trust PID reuse luck. */
  private async removeStalePidFile(): Promise<void> {
    const pidFile = path.join(this.dataDir, 'postmaster.pid');
    const text = await fs.readFile(pidFile, 'utf8').catch(() => undefined);
    if (text === undefined) return;
    const pid = Number(text.split('\n')[0]);
    if (!Number.isInteger(pid) || pid <= 0 || !(await isAlive(pid)) || !(await isPostmasterOf(pid, this.dataDir))) {
      await fs.rm(pidFile, { force: true });
    }
  }

  private forwardLines(stream: NodeJS.ReadableStream & { unref?: () => void }): void {
    let pending = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk: string) => {
      pending += chunk;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) this.emitLine(line);
    });
    stream.on('end', () => {
      if (pending) this.emitLine(pending);
      pending = '';
    });
    stream.unref?.();
  }

  private emitLine(line: string): void {
    this.recentLines.push(line);
    if (this.recentLines.length > RECENT_LINES) this.recentLines.shift();
    try {
      this.log?.(line);
    } catch {
      // a failing log sink must not break the server's output stream
    }
  }

  /** A line of our own, next to PostgreSQL's (to opts.log, else appended to the log file). */
  private emitPgdsoLine(message: string): void {
    const line = `pgdso: ${message}`;
    if (this.log) this.emitLine(line);
    else void fs.appendFile(path.join(this.dataDir, LOG_FILE), `${line}\n`).catch(() => undefined);
  }

  private async logTail(logPath: string, offset: number): Promise<string> {
    let lines = this.recentLines;
    if (!this.log) {
      const buffer = await fs.readFile(logPath).catch(() => Buffer.alloc(0));
      lines = buffer.subarray(offset).toString('utf8').split('\n');
    }
    const tail = lines.filter((line) => line.trim() !== '').slice(-30);
    return tail.length ? tail.join('\n') : '(empty)';
  }
}

/** postgresql.conf string value. */
function quoteConfValue(value: string): string {
  return `'${value.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`;
}
