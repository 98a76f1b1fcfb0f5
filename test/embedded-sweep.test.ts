// The sweep of local clusters left by dead processes (src/embedded/runtime.ts), which every
// process starting a cluster runs: a cluster another process is building right now (copied from
// the template, not marked with its owner yet) is never taken for an abandoned one, even though
// `cp -a` gave it the template's old mtime; one whose owner is dead is removed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, rm, utimes, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { OWNER_FILE, sweepStaleEntries } from '../src/embedded/runtime.ts';

test('the stale-cluster sweep spares a cluster being copied from an old template and removes one of a dead owner', async (t) => {
  const root = await mkdtemp(path.join(os.tmpdir(), 'pgdso-sweep-'));
  t.after(() => rm(root, { recursive: true, force: true }));
  const [clusters, version, template] = ['clusters', 'version', 'template'].map((d) => path.join(root, d)) as [string, string, string];
  for (const dir of [clusters, version, template]) await mkdir(dir);
  await writeFile(path.join(template, 'postgresql.conf'), '# template\n');
  const old = new Date(Date.now() - 3 * 86_400_000);
  await utimes(template, old, old);
  // being built: copied as startLocalCluster copies it, its owner file not written yet
  const building = path.join(clusters, 'test0-building');
  await promisify(execFile)('cp', ['-a', template, building]);
  // abandoned: its owner has exited
  const abandoned = path.join(clusters, 'test1-abandoned');
  await promisify(execFile)('cp', ['-a', template, abandoned]);
  const dead = spawnSync(process.execPath, ['-e', '0']).pid;
  await writeFile(path.join(abandoned, OWNER_FILE), `${JSON.stringify({ pid: dead })}\n`);

  await sweepStaleEntries(clusters, version);
  assert.ok(existsSync(path.join(building, 'postgresql.conf')), 'a cluster being built was swept away');
  assert.equal(existsSync(abandoned), false, "a dead owner's cluster was kept");
});
