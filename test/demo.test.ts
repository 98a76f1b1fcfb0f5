// The README's first command: `pgdso demo` runs DSO's four uses (routing, follow the sun, knowledge base, archiving) on
// embedded PostgreSQL.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { runCli } from './support/dso.ts';
import { providerName } from './support/servers.ts';

test('pgdso demo narrates routing, follow the sun, knowledge base and archiving on embedded PostgreSQL and cleans up', {
  skip: providerName() !== 'embedded' && 'the demo always uses embedded PostgreSQL',
}, async () => {
  const { code, stdout, stderr } = await runCli(['demo']);
  assert.equal(code, 0, stderr);
  assert.doesNotMatch(stdout, /unexpected/, 'a step of the demo did not do what it narrates');
  // use 1, routing
  assert.match(stdout, /SF-2\s+chicago\s+true\s+sf/);
  assert.match(stdout, /SF-3\s+chicago_uph\s+true\s+chicago\s+sf->chicago, chicago->chicago_uph/);
  assert.match(stdout, /ERROR P0001: pgdso: request SF-2 of repair_request is owned by chicago/);
  // use 3, knowledge base: every server holds its own master copy, one hop from where it was closed
  assert.match(stdout, /SF-10\s+sf\s+true\s+(chicago|tokyo)\s+success\s*\n/);
  assert.match(stdout, /SF-10\s+chicago\s+true\s+sf\s+sf->chicago\n/);
  assert.match(stdout, /SF-10\s+tokyo\s+true\s+sf\s+sf->tokyo\n/);
  assert.match(stdout, /TK-1\s+sf\s+true\s+tokyo\s+tokyo->sf\n/);
  assert.match(stdout, /TK-1\s+chicago\s+true\s+tokyo\s+tokyo->chicago\n/);
  assert.match(stdout, /TK-1\s+tokyo\s+true\s+(sf|chicago)\s+success\s*\n/);
  assert.match(stdout, /chicago> UPDATE .*\n\s+UPDATE 1\n/);
  // independent copies: chicago's correction stays in chicago
  assert.match(stdout, /\n\s+sf\s+paper jam: worn pickup roller, replaced\n/);
  assert.match(stdout, /\n\s+chicago\s+paper jam: worn pickup roller, replaced \(same fix for model X2\)\n/);
  assert.match(stdout, /\n\s+tokyo\s+paper jam: worn pickup roller, replaced\n/);
  // use 4, archiving: the closed request is the archive's master copy and gone from sf
  assert.match(stdout, /SF-20\s+archive\s+true\s+sf\s+sf->archive\n/);
  assert.doesNotMatch(stdout, /SF-20\s+sf\s/);
  assert.match(stdout, /SF-21\s+sf\s+true\s/);
  // sf's own rows, as its query printed them: SF-21 only
  const listing = /sf> SELECT id, status FROM repair_request ORDER BY id\n((?: {2}.*\n)*)/.exec(stdout);
  assert.equal(listing?.[1], '  SF-21  new\n', `sf's rows after the archiving:\n${stdout}`);
  // use 2, follow the sun: after Tokyo's and Paris's 17:00, the open SF-30 is back on sf with its trip; SF-31, closed in Tokyo, stays
  assert.match(stdout, /clock: Mon 17:00 in San Francisco, Tue 09:00 in Tokyo, Tue 01:00 in Paris/);
  assert.match(stdout, /SF-30\s+sf\s+true\s+paris\s+success\s+sf->tokyo, tokyo->paris, paris->sf\n/);
  assert.match(stdout, /SF-31\s+tokyo\s+true\s+sf\s+sf->tokyo\n(?![\s\S]*SF-31\s+paris)/);
  assert.match(stdout, /SF-32\s+sf\s+true\s*\n/);
  assert.match(stdout, /sf\s+follow-the-sun-sf\s+fired Mon 17:00 local, matched 2 of 3\n/);
  assert.match(stdout, /tokyo\s+follow-the-sun-tokyo\s+fired Tue 17:00 local, matched 1 of 2\n/);
  assert.match(stdout, /paris\s+follow-the-sun-paris\s+fired Tue 17:00 local, matched 1 of 1\n/);
  // the DBA's side: status names the instance and its operations; the archive stopped, the
  // transfers wait in sf's queue; once it is back, they are delivered
  assert.match(
    stdout,
    /\nsf: instances demo-archiving \(online\); owners admin demo-archiving, dso demo-archiving, escalation demo-archiving;/,
  );
  assert.match(stdout, /\nsf: slot lag \d+ bytes, retained WAL \d+ bytes, pending 0, errors 0, conflicts 0\n/);
  const queued = /sf> SELECT id, type, mapping, request_id, target_server, attempts FROM pgdso.pending ORDER BY id\n((?: {2}.*\n)*)/.exec(
    stdout,
  );
  assert.match(
    queued?.[1] ?? '',
    /^ {2}\d+ \| transfer \| sf-to-archive \| SF-21 \| archive \| \d+\n {2}\d+ \| transfer \| sf-to-archive \| SF-40 \| archive \| \d+\n$/,
  );
  assert.match(stdout, /sf> SELECT count\(\*\) AS queued FROM pgdso.pending\n {2}0\n/);
  // a row the archive refuses: in pending_errors with its reason, sent again once fixed, by the owner
  assert.match(
    stdout,
    /sf> SELECT id, type, request_id, sqlstate, error FROM pgdso.pending_errors\n {2}\d+ \| transfer \| SF-41 \| 23514 \| .*described/,
  );
  assert.match(stdout, /\nsf: 1 failed operation sent again\nsf: carried out by instance demo-archiving, the owner of dso\n/);
  const archived = /archive> SELECT id, status, dso_master FROM repair_request ORDER BY id\n((?: {2}.*\n)*)/.exec(stdout);
  assert.equal(
    archived?.[1],
    ['SF-20', 'SF-21', 'SF-40', 'SF-41', 'SF-42'].map((id) => `  ${id} | closed | true\n`).join(''),
    `the archive's rows at the end:\n${stdout}`,
  );
  assert.match(stdout, /\nsf> SELECT id, status FROM repair_request ORDER BY id\n {2}\(0 rows\)\n/);
  // cleaned up: the demo's cluster (as it reported it once started) is gone
  const cluster = /Cluster up: 127\.0\.0\.1:(\d+), postmaster pid (\d+), data directory (\S+)\n/.exec(stdout);
  assert.ok(cluster, `the demo did not say which cluster it started:\n${stdout}`);
  const [port, pid, dataDir] = [Number(cluster[1]), Number(cluster[2]), cluster[3]!];
  assert.equal(existsSync(dataDir), false, `the demo's data directory ${dataDir} is still there`);
  assert.equal(isPostmasterOf(pid, dataDir), false, `the demo's postmaster ${pid} is still running`);
  assert.equal(await accepts(port), false, `something still listens on the demo's port ${port}`);
  const archive = /\$ pg_ctl stop -m fast -D (\S+)\n/.exec(stdout);
  assert.ok(archive, `the demo did not say which cluster the archive runs on:\n${stdout}`);
  assert.equal(existsSync(archive[1]!), false, `the archive's data directory ${archive[1]} is still there`);
  assert.match(stdout, /Demo done/);
});

/** Whether `pid` is a live process started on `dataDir` (a reused pid is some other process). */
function isPostmasterOf(pid: number, dataDir: string): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) return false;
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(dataDir);
  } catch {
    return false;
  }
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}
