/**
 * Leak checks for tests: stray child processes of the test process, and pgdso connections left
 * open on a server.
 *
 *   const clusters = await provideClusters(2);
 *   after(leakCheck({ allowPids: () => clusters.flatMap((c) => c.ownedPids()) }));
 *   afterEach(() => assertNoClientConnections(sourceUrl));
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import pg from 'pg';
import { waitFor } from './wait.ts';

export interface ChildProcessInfo {
  pid: number;
  command: string;
}

export interface LeakCheckOptions {
  /** PIDs that may stay (the postmasters of clusters the test still owns). */
  allowPids?: () => Iterable<number>;
  /** How long children may take to exit before it counts as a leak (default 5 s). */
  timeoutMs?: number;
}

/**
 * Returns a hook for after()/afterEach() that fails if this process has child processes other
 * than those it had when leakCheck() was called (tsx's esbuild service, say) and the allowed ones.
 */
export function leakCheck(opts: LeakCheckOptions = {}): () => Promise<void> {
  const baseline = listChildProcesses().then((children) => new Set(children.map((child) => child.pid)));
  baseline.catch(() => undefined);
  return async () => {
    const preexisting = await baseline;
    const strays = async (): Promise<ChildProcessInfo[]> => {
      const allowed = new Set([...preexisting, ...(opts.allowPids?.() ?? [])]);
      return (await listChildProcesses()).filter((child) => !allowed.has(child.pid) && !isToolingProcess(child));
    };
    let remaining: ChildProcessInfo[] = [];
    try {
      await waitFor(async () => (remaining = await strays()).length === 0, {
        timeoutMs: opts.timeoutMs ?? 5_000,
        message: 'child processes to exit',
      });
    } catch {
      const list = remaining.map((child) => `${child.pid}: ${child.command}`).join('\n  ');
      throw new Error(`leaked child processes still running:\n  ${list}`);
    }
  };
}

/**
 * Running (not zombie) children of this process: from /proc on Linux, else from Node's own list
 * of active handles (which misses unref'd children).
 */
export async function listChildProcesses(): Promise<ChildProcessInfo[]> {
  let entries: string[];
  try {
    entries = await fs.readdir('/proc');
  } catch {
    return childrenFromHandles();
  }
  const children = await Promise.all(
    entries
      .filter((entry) => /^\d+$/.test(entry))
      .map(async (entry): Promise<ChildProcessInfo | undefined> => {
        const stat = await fs.readFile(`/proc/${entry}/stat`, 'utf8').catch(() => undefined);
        if (!stat) return undefined;
        const [state, parent] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        if (Number(parent) !== process.pid || state === 'Z') return undefined;
        const cmdline = await fs.readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
        return { pid: Number(entry), command: cmdline.split('\0').filter(Boolean).join(' ') };
      }),
  );
  return children.filter((child): child is ChildProcessInfo => child !== undefined);
}

function childrenFromHandles(): ChildProcessInfo[] {
  const handles = (process as unknown as { _getActiveHandles?: () => unknown[] })._getActiveHandles?.() ?? [];
  return handles
    .filter(
      (handle): handle is { pid: number; spawnfile?: string } =>
        typeof handle === 'object' &&
        handle !== null &&
        handle.constructor?.name === 'ChildProcess' &&
        typeof (handle as { pid?: unknown }).pid === 'number',
    )
    .map((handle) => ({ pid: handle.pid, command: handle.spawnfile ?? '?' }));
}

/** tsx may start its esbuild service after the baseline was taken. */
function isToolingProcess(child: ChildProcessInfo): boolean {
  const [executable, ...args] = child.command.split(' ');
  return path.basename(executable ?? '') === 'esbuild' && args.some((arg) => arg.startsWith('--service'));
}

export interface ClientConnectionCheckOptions {
  /** How long connections may take to go away (default 5 s). */
  timeoutMs?: number;
  /** Look at every database of the server, not only the URL's (unsafe on shared servers). */
  allDatabases?: boolean;
}

/**
 * Fails if backends whose application_name starts with `applicationNamePrefix` (default
 * "pgdso"), walsenders included, are still connected to the URL's database after the deadline.
 */
export async function assertNoClientConnections(
  url: string,
  applicationNamePrefix = 'pgdso',
  opts: ClientConnectionCheckOptions = {},
): Promise<void> {
  const client = new pg.Client({ connectionString: url, application_name: 'leak-check' });
  client.on('error', () => undefined);
  await client.connect();
  try {
    let remaining: Array<Record<string, unknown>> = [];
    try {
      await waitFor(
        async () => {
          const result = await client.query(
            `SELECT pid, datname, application_name, backend_type, state, left(query, 200) AS query
               FROM pg_stat_activity
              WHERE starts_with(application_name, $1)
                AND pid <> pg_backend_pid()
                AND ($2 OR datname = current_database())`,
            [applicationNamePrefix, opts.allDatabases ?? false],
          );
          remaining = result.rows;
          return remaining.length === 0;
        },
        { timeoutMs: opts.timeoutMs ?? 5_000, intervalMs: 100, message: 'client connections to close' },
      );
    } catch {
      const list = remaining.map((row) => JSON.stringify(row)).join('\n  ');
      throw new Error(`connections with application_name "${applicationNamePrefix}*" still open:\n  ${list}`);
    }
  } finally {
    await client.end().catch(() => undefined);
  }
}
