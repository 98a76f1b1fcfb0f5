// What every local cluster of this process shares, prepared once per binaries version: the cache
// directories, the binaries (a world-readable copy when root, or when npm skipped the lib
// symlinks), the postgres OS user when root, and the initdb template every cluster is copied from.

import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { locateNativeBinaries, type NativeBinaries } from './binaries.ts';
import { exists, isAlive, isPostmasterOf, serverEnvironment, signalQuietly, sleep } from './processes.ts';

const execFileAsync = promisify(execFile);

/** Bump when the template's content changes (initdb flags, pg_hba.conf, ...). */
const TEMPLATE_FORMAT = 1;
export const SUPERUSER = 'postgres';
export const SETTINGS_FILE = 'pgdso.conf';
export const OWNER_FILE = 'pgdso-owner.json';

const TEMPLATE_HBA = `# pgdso local cluster. Trust only on the unix socket in the data directory (mode 0700, so
# only the server's own OS user and root can reach it); passwords on TCP.
local   all          all                      trust
local   replication  all                      trust
host    all          all         127.0.0.1/32 scram-sha-256
host    replication  all         127.0.0.1/32 scram-sha-256
`;

/** OS identity the server runs as when this process is root. */
export interface RunAs {
  uid: number;
  gid: number;
}

/** What every cluster of this process shares: binaries, template, where clusters live. */
export interface PgRuntime {
  major: number;
  binDir: string;
  runAs: RunAs | undefined;
  templateDir: string;
  clustersDir: string;
}

/** The per-process cache of the prepared runtimes (binaries copied, template initialised), per binaries version. */
const runtimes = new Map<string, Promise<PgRuntime>>();

export function getRuntime(major: number | undefined): Promise<PgRuntime> {
  const binaries = locateNativeBinaries(major);
  let runtime = runtimes.get(binaries.version);
  if (!runtime) {
    runtime = prepareRuntime(binaries);
    runtimes.set(binaries.version, runtime);
    runtime.catch(() => {
      runtimes.delete(binaries.version); // let a later call try again
    });
  }
  return runtime;
}

async function prepareRuntime(binaries: NativeBinaries): Promise<PgRuntime> {
  const { nativeDir, version } = binaries;
  const uid = process.getuid?.() ?? -1;
  const cacheRoot = process.env.PGDSO_PG_CACHE_DIR || path.join(os.tmpdir(), `pgdso-pg-cache-${uid}`);
  await ensurePrivateDir(cacheRoot);
  const versionDir = path.join(cacheRoot, version);
  await ensurePrivateDir(versionDir);
  const clustersDir = path.join(cacheRoot, 'clusters');
  await ensurePrivateDir(clustersDir);

  const runAs = uid === 0 ? await ensurePostgresUser() : undefined;
  if (runAs) await assertTraversableByOthers(clustersDir);

  let binDir = path.join(nativeDir, 'bin');
  if (runAs || !(await symlinksPresent(nativeDir))) {
    const copy = path.join(versionDir, 'native');
    await createDirAtomically(copy, (tmp) => copyNativeDir(nativeDir, tmp));
    binDir = path.join(copy, 'bin');
  }

  await sweepStaleEntries(clustersDir, versionDir).catch(() => undefined);

  const templateDir = path.join(versionDir, `template-v${TEMPLATE_FORMAT}`);
  await createDirAtomically(templateDir, (tmp) => initTemplate(binDir, tmp, runAs));
  return { major: binaries.major, binDir, runAs, templateDir, clustersDir };
}

/** Creates `dir` if missing and refuses one that another user owns or others can write. */
async function ensurePrivateDir(dir: string): Promise<void> {
  await fs.mkdir(dir, { recursive: true, mode: 0o755 });
  const stat = await fs.lstat(dir);
  const uid = process.getuid?.();
  if (!stat.isDirectory() || (uid !== undefined && stat.uid !== uid)) {
    throw new Error(`refusing to use ${dir} as PostgreSQL cache: it is not a directory owned by this user (set PGDSO_PG_CACHE_DIR)`);
  }
  if ((stat.mode & 0o7777) !== 0o755) await fs.chmod(dir, 0o755);
}

/** As root the server runs as another user: every ancestor must let it through. */
async function assertTraversableByOthers(dir: string): Promise<void> {
  for (let current = dir; ; current = path.dirname(current)) {
    const stat = await fs.stat(current);
    if (!(stat.mode & 0o001)) {
      throw new Error(
        `the postgres OS user cannot reach ${dir} (${current} is not world-searchable); ` +
          'set PGDSO_PG_CACHE_DIR or TMPDIR to a directory under /tmp',
      );
    }
    if (path.dirname(current) === current) return;
  }
}

/** uid/gid of the `postgres` OS user, created (system user, no home) if missing. */
async function ensurePostgresUser(): Promise<RunAs> {
  const existing = await lookupUser(SUPERUSER);
  if (existing) return existing;
  const groupExists = await execFileAsync('getent', ['group', SUPERUSER]).then(
    () => true,
    () => false,
  );
  const args = ['--system', '--no-create-home', ...(groupExists ? ['-g', SUPERUSER] : ['--user-group']), SUPERUSER];
  let failure: unknown;
  await execFileAsync('useradd', args).catch((err: unknown) => (failure = err));
  const created = await lookupUser(SUPERUSER); // another process may have won the race
  if (created) return created;
  throw new Error(`PostgreSQL refuses to run as root and the postgres OS user could not be created: ${(failure as Error)?.message}`);
}

async function lookupUser(name: string): Promise<RunAs | undefined> {
  try {
    const [uid, gid] = await Promise.all([
      execFileAsync('id', ['-u', name]).then((r) => Number(r.stdout.trim())),
      execFileAsync('id', ['-g', name]).then((r) => Number(r.stdout.trim())),
    ]);
    return Number.isInteger(uid) && Number.isInteger(gid) ? { uid, gid } : undefined;
  } catch {
    return undefined;
  }
}

interface SymlinkEntry {
  source: string;
  target: string;
}

/** The package's lib symlinks (libpq.so.5 -> libpq.so.5.18, ...), as listed in pg-symlinks.json. */
async function readSymlinkList(nativeDir: string): Promise<SymlinkEntry[]> {
  const text = await fs.readFile(path.join(nativeDir, 'pg-symlinks.json'), 'utf8').catch(() => '[]');
  const entries = JSON.parse(text) as SymlinkEntry[];
  // Paths are relative to the package ("native/lib/..."): make them relative to nativeDir.
  return entries.map(({ source, target }) => ({
    source: path.relative('native', source),
    target: path.relative('native', target),
  }));
}

/** npm may skip the package's postinstall that creates the lib symlinks. */
async function symlinksPresent(nativeDir: string): Promise<boolean> {
  for (const { target } of await readSymlinkList(nativeDir)) {
    if (!(await exists(path.join(nativeDir, target)))) return false;
  }
  return true;
}

/** A world-readable copy of bin, lib and share, with the lib symlinks in place. */
async function copyNativeDir(nativeDir: string, destination: string): Promise<void> {
  await fs.cp(nativeDir, destination, { recursive: true, verbatimSymlinks: true });
  for (const { source, target } of await readSymlinkList(nativeDir)) {
    const link = path.join(destination, target);
    if (!(await exists(link))) {
      await fs.rm(link, { force: true }); // a dangling link
      await fs.symlink(path.relative(path.dirname(target), source), link);
    }
  }
  await makeWorldReadable(destination);
}

async function makeWorldReadable(target: string): Promise<void> {
  const stat = await fs.lstat(target);
  if (stat.isSymbolicLink()) return;
  if (stat.isDirectory()) {
    await fs.chmod(target, (stat.mode & 0o7777) | 0o555);
    for (const entry of await fs.readdir(target)) await makeWorldReadable(path.join(target, entry));
  } else {
    const executable = stat.mode & 0o100 ? 0o111 : 0;
    await fs.chmod(target, (stat.mode & 0o7777) | 0o444 | executable);
  }
}

/** initdb into `dataDir`, then our pg_hba.conf and the include of the per-cluster settings. */
async function initTemplate(binDir: string, dataDir: string, runAs: RunAs | undefined): Promise<void> {
  await fs.mkdir(dataDir, { mode: 0o700 });
  if (runAs) await fs.chown(dataDir, runAs.uid, runAs.gid);
  const args = [
    '-D',
    dataDir,
    '-U',
    SUPERUSER,
    '--auth-local=trust',
    '--auth-host=scram-sha-256',
    '--encoding=UTF8',
    '--no-locale',
    '--no-instructions',
  ];
  try {
    await execFileAsync(path.join(binDir, 'initdb'), args, { cwd: dataDir, env: serverEnvironment(), ...runAs });
  } catch (err) {
    const failure = err as Error & { stderr?: string; stdout?: string };
    throw new Error(`initdb failed: ${failure.stderr?.trim() || failure.stdout?.trim() || failure.message}`);
  }
  // Writing over existing files keeps their owner (the server's user when root).
  await fs.writeFile(path.join(dataDir, 'pg_hba.conf'), TEMPLATE_HBA);
  await fs.appendFile(path.join(dataDir, 'postgresql.conf'), `\ninclude_if_exists = '${SETTINGS_FILE}'\n`);
}

/**
 * Builds `finalDir` through a temporary sibling renamed into place, so a reader sees it whole or
 * not at all. If another process wins the race, its copy is kept and ours discarded.
 */
async function createDirAtomically(finalDir: string, build: (tmpDir: string) => Promise<void>): Promise<void> {
  if (await exists(finalDir)) return;
  const tmpDir = `${finalDir}.tmp-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
  try {
    await build(tmpDir);
    await fs.rename(tmpDir, finalDir);
  } catch (err) {
    await fs.rm(tmpDir, { recursive: true, force: true });
    const code = (err as NodeJS.ErrnoException).code;
    if ((code === 'EEXIST' || code === 'ENOTEMPTY') && (await exists(finalDir))) return;
    throw err;
  }
}

/**
 * Copies the template. `cp -a` keeps owners and modes and is several times faster than fs.cp on
 * a fresh data directory (about 1,000 files); fs.cp (+ chown) is the fallback where cp is missing.
 */
export async function copyDirectory(source: string, destination: string, runAs: RunAs | undefined): Promise<void> {
  try {
    await execFileAsync('cp', ['-a', source, destination]);
    return;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      const stderr = (err as { stderr?: string }).stderr?.trim();
      throw new Error(`could not copy ${source} to ${destination}: ${stderr || (err as Error).message}`);
    }
  }
  await fs.cp(source, destination, { recursive: true, verbatimSymlinks: true });
  if (runAs) await chownTree(destination, runAs);
}

async function chownTree(target: string, runAs: RunAs): Promise<void> {
  await fs.lchown(target, runAs.uid, runAs.gid);
  if ((await fs.lstat(target)).isDirectory()) {
    await Promise.all((await fs.readdir(target)).map((entry) => chownTree(path.join(target, entry), runAs)));
  }
}

export async function writeOwnedFile(file: string, content: string, runAs: RunAs | undefined): Promise<void> {
  await fs.writeFile(file, content, { mode: 0o600 });
  if (runAs) await fs.chown(file, runAs.uid, runAs.gid);
}

/**
 * Removes clusters left by processes that died without destroy() (asking a still-running
 * postmaster of theirs to quit first), and half-built cache entries of dead processes.
 */
export async function sweepStaleEntries(clustersDir: string, versionDir: string): Promise<void> {
  for (const entry of await fs.readdir(clustersDir)) {
    const dataDir = path.join(clustersDir, entry);
    const owner = await fs.readFile(path.join(dataDir, OWNER_FILE), 'utf8').then(
      (text) => Number((JSON.parse(text) as { pid?: unknown }).pid),
      () => undefined,
    );
    if (owner === undefined) {
      // Not yet (or never) marked: only remove it once clearly abandoned. By its ctime: `cp -a`
      // gives a copy just made of the template the template's old mtime, before its owner marks it
      const stat = await fs.stat(dataDir).catch(() => undefined);
      if (!stat || Date.now() - Math.max(stat.mtimeMs, stat.ctimeMs) < 3_600_000) continue;
    } else if (await isAlive(owner)) {
      continue;
    }
    const postmaster = await fs.readFile(path.join(dataDir, 'postmaster.pid'), 'utf8').then(
      (text) => Number(text.split('\n')[0]),
      () => undefined,
    );
    if (postmaster && (await isAlive(postmaster)) && (await isPostmasterOf(postmaster, dataDir))) {
      signalQuietly(postmaster, 'SIGQUIT');
      const deadline = Date.now() + 3_000;
      while ((await isAlive(postmaster)) && Date.now() < deadline) await sleep(20);
      if (await isAlive(postmaster)) continue;
    }
    await fs.rm(dataDir, { recursive: true, force: true });
  }
  for (const entry of await fs.readdir(versionDir)) {
    const match = /\.tmp-(\d+)-[0-9a-f]+$/.exec(entry);
    if (match && !(await isAlive(Number(match[1])))) {
      await fs.rm(path.join(versionDir, entry), { recursive: true, force: true });
    }
  }
}
