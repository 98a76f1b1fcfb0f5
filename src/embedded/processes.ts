// Small operating-system helpers for local clusters: the server's environment, a free loopback
// port, processes read from /proc (Linux), signals, files and timers.

import fs from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import net from 'node:net';

export const LOOPBACK = '127.0.0.1';

/** The environment for initdb/postgres: ours without libpq variables, C messages (parsed on errors). */
export function serverEnvironment(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith('PG') && !key.startsWith('LC_') && key !== 'LANG') env[key] = value;
  }
  env.LC_ALL = 'C';
  return env;
}

/** A port the kernel just gave out on loopback; the caller retries if someone takes it first. */
export function findFreePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.unref();
    probe.once('error', reject);
    probe.listen(0, LOOPBACK, () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

/** PIDs whose parent is `parentPid` (Linux /proc). */
export async function childPidsOf(parentPid: number): Promise<number[]> {
  const entries = await fs.readdir('/proc').catch(() => [] as string[]);
  const children: number[] = [];
  await Promise.all(
    entries
      .filter((entry) => /^\d+$/.test(entry))
      .map(async (entry) => {
        const stat = await readProcStat(Number(entry));
        if (stat && stat.parentPid === parentPid && stat.state !== 'Z') children.push(Number(entry));
      }),
  );
  return children;
}

async function readProcStat(pid: number): Promise<{ state: string; parentPid: number } | undefined> {
  const text = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  if (!text) return undefined;
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return { state: fields[0] ?? '', parentPid: Number(fields[1]) };
}

/** Alive and not a zombie (a zombie's parent, maybe us as PID 1, just has not reaped it). */
export async function isAlive(pid: number): Promise<boolean> {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const stat = await readProcStat(pid);
  return stat?.state !== 'Z';
}

/** Whether `pid` is a postgres started on `dataDir` (guards against PID reuse). */
export async function isPostmasterOf(pid: number, dataDir: string): Promise<boolean> {
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => undefined);
  if (cmdline === undefined) return true; // no /proc: assume the worst, keep the file
  return cmdline.split('\0').includes(dataDir);
}

export function signalQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

export async function exists(target: string): Promise<boolean> {
  return fs.access(target, fsConstants.F_OK).then(
    () => true,
    () => false,
  );
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
