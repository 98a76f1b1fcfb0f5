// DSO use 2, follow the sun, on three servers (sf, tokyo, paris), with an injected clock: at each
// site's 17:00 local on a working day, its escalation moves the open requests it owns, with
// ownership, to the next site; closed ones stay. pgdso runs in this process (an Instance serving
// the three servers, as `pgdso run` does) so that the test moves the clock instead of waiting
// for it; pgdso connects as a non-superuser and the application role writes the requests.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { loadConfig } from '../src/config/load.ts';
import { compileRules } from '../src/rules/index.ts';
import { createLogger } from '../src/log.ts';
import { Instance } from '../src/instance.ts';
import { ManualClock } from '../src/escalation/schedule.ts';
import { migrateServer } from '../src/sql/migrate.ts';
import { enableForm } from '../src/sql/forms.ts';
import { deployAsDba } from './support/dba.ts';
import { REPAIR_REQUEST_SQL, mapping, type Copy } from './support/dso.ts';
import { leakCheck } from './support/leaks.ts';
import { provideClusters } from './support/servers.ts';
import { waitFor } from './support/wait.ts';

const SITES = [
  { server: 'sf', zone: 'America/Los_Angeles', next: 'tokyo' },
  { server: 'tokyo', zone: 'Asia/Tokyo', next: 'paris' },
  { server: 'paris', zone: 'Europe/Paris', next: 'sf' },
] as const;

const RULES = {
  mappings: SITES.map((s) => mapping(`${s.server}-to-${s.next}`, s.server, s.next)),
  escalations: SITES.map((s) => ({
    name: `follow-the-sun-${s.server}`,
    on: { server: s.server, form: 'repair_request' },
    schedule: { cron: '0 17 * * 1-5', timezone: s.zone },
    conditions: { all: [{ fact: 'row', path: '$.status', operator: 'notIn', value: ['closed'] }] },
    // every day the request goes round again: past servers it has been on
    actions: [{ type: 'transfer', mapping: `${s.server}-to-${s.next}`, overrideLoopDetection: true }],
  })),
};

/** The hour and minute of an instant in a zone, and its weekday. */
function local(at: Date, timeZone: string): string {
  return new Intl.DateTimeFormat('en-GB', { timeZone, weekday: 'short', hour: '2-digit', minute: '2-digit', hourCycle: 'h23' }).format(at);
}

test('follow the sun: at 17:00 local in San Francisco, Tokyo and Paris the open requests move on with ownership, closed ones stay; \
after a day an open request has been on the three sites and its history shows the trip; fire times missed while no instance ran \
run once each at the next start', { timeout: 240_000 }, async (t) => {
  const clusters = await provideClusters(1);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgdso-fts-'));
  const pools = new Map<string, pg.Pool>();
  /** as pgdso: its control schema */
  const admin = new Map<string, pg.Pool>();
  const output: string[] = [];
  const stops: (() => Promise<void>)[] = [];
  t.after(async () => {
    for (const stop of stops) await stop();
    await Promise.all([...pools.values(), ...admin.values()].map((p) => p.end()));
    await Promise.all(clusters.map((c) => c.destroy()));
    await rm(dir, { recursive: true, force: true });
    await leakCheck()();
  });
  const tag = `${process.pid}_${Math.random().toString(36).slice(2, 6)}`;
  const servers: Record<string, { connection: string }> = {};
  for (const { server } of SITES) {
    const adminUrl = await clusters[0]!.createDatabase(`${server}_${tag}`);
    const deployed = await deployAsDba({ adminUrl, schemaSql: REPAIR_REQUEST_SQL });
    await migrateServer({ connectionString: deployed.pgdsoUrl });
    await enableForm({ connectionString: deployed.pgdsoUrl }, 'public', 'repair_request');
    servers[server] = { connection: deployed.pgdsoUrl };
    const pool = new pg.Pool({ connectionString: deployed.appUrl, max: 2, application_name: 'test-app' });
    pool.on('error', () => undefined);
    pools.set(server, pool);
    const pgdso = new pg.Pool({ connectionString: deployed.pgdsoUrl, max: 1, application_name: 'test-admin' });
    pgdso.on('error', () => undefined);
    admin.set(server, pgdso);
  }
  await mkdir(path.join(dir, 'rules'));
  const configPath = path.join(dir, 'pgdso.config.json');
  await writeFile(configPath, JSON.stringify({ servers, rules: ['rules/*.json'], group: { checkIntervalSeconds: 0.5 } }));
  await writeFile(path.join(dir, 'rules/main.json'), JSON.stringify(RULES));
  const q = async <T extends pg.QueryResultRow>(server: string, sql: string, params: unknown[] = []) =>
    (await pools.get(server)!.query<T>(sql, params)).rows;
  const copy = async (server: string, id: string) => (await q<Copy>(server, 'SELECT * FROM repair_request WHERE id = $1', [id]))[0];
  const seen = new Map<string, string>();
  /** the servers whose copy of the request is its master (the last answer is kept for messages) */
  const masters = async (id: string) => {
    const on: string[] = [];
    for (const { server } of SITES) if ((await copy(server, id))?.dso_master === true) on.push(server);
    seen.set(id, on.join());
    return on;
  };
  const runs = async (server: string) =>
    (
      await admin
        .get(server)!
        .query<{ fire_time: Date; trigger: string; matched: string; finished: boolean }>(
          `SELECT fire_time, trigger, matched::text, finished_at IS NOT NULL AS finished FROM pgdso.scan_runs ORDER BY id`,
        )
    ).rows;

  // Monday 9 March 2026, 09:00 in San Francisco (daylight saving time began there on the 8th; not yet in Paris)
  const clock = new ManualClock(new Date('2026-03-09T16:00:00Z'));
  const start = async () => {
    const config = await loadConfig(configPath, process.env);
    const log = createLogger({ destination: { write: (line: string) => void output.push(line) } as never });
    const instance = new Instance({
      configPath,
      env: process.env,
      config,
      rules: compileRules(config),
      servers: Object.keys(servers),
      rank: null,
      log,
      clock,
      instanceId: 'fts-a',
    });
    const abort = new AbortController();
    const running = instance.run(abort.signal);
    const stop = async () => {
      abort.abort();
      await running.catch(() => undefined);
    };
    stops.push(stop);
    return stop;
  };
  const logs = () => output.join('').slice(-8000);
  /** every site's escalation runner has looked at the clock and sleeps until its next fire time */
  const asleep = (what: string) =>
    waitFor(() => clock.sleeping === SITES.length, { message: () => `${what}: the escalation runners did not settle\n${logs()}` });

  let stop = await start();
  await asleep('at start');
  await q(
    'sf',
    `INSERT INTO repair_request (id, item, status) VALUES ('FTS-1', 'laptop', 'open'), ('FTS-2', 'phone', 'open'),
    ('FTS-3', 'monitor', 'closed')`,
  );

  // 17:00 Monday in San Francisco: the open requests go to Tokyo with ownership
  clock.set(new Date('2026-03-10T00:00:00Z'));
  await waitFor(async () => (await masters('FTS-1')).join() === 'tokyo' && (await masters('FTS-2')).join() === 'tokyo', {
    timeoutMs: 60_000,
    message: () => `FTS-1 and FTS-2 did not move to tokyo: masters ${seen.get('FTS-1')} / ${seen.get('FTS-2')}\n${logs()}`,
  });
  assert.deepEqual(await masters('FTS-3'), ['sf'], 'the closed request stays on sf');
  assert.equal(await copy('tokyo', 'FTS-3'), undefined, 'the closed request was not sent to tokyo');
  // a Tokyo user closes FTS-2 during the Tokyo day (tokyo owns it now)
  await q('tokyo', `UPDATE repair_request SET status = 'closed' WHERE id = 'FTS-2'`);
  await waitFor(async () => (await copy('sf', 'FTS-2'))?.status === 'closed', { message: () => `the close did not reach sf\n${logs()}` });

  // 17:00 Tuesday in Tokyo: FTS-1 (open) goes to Paris, FTS-2 (closed) stays
  clock.set(new Date('2026-03-10T08:00:00Z'));
  await waitFor(async () => (await masters('FTS-1')).join() === 'paris', {
    timeoutMs: 60_000,
    message: () => `FTS-1 did not move to paris: masters ${seen.get('FTS-1')}\n${logs()}`,
  });
  // 17:00 Tuesday in Paris: FTS-1 goes on to San Francisco, where its day began
  clock.set(new Date('2026-03-10T16:00:00Z'));
  await waitFor(async () => (await masters('FTS-1')).join() === 'sf', {
    timeoutMs: 60_000,
    message: () => `FTS-1 did not come back to sf: masters ${seen.get('FTS-1')}\n${logs()}`,
  });
  await asleep('after the day');
  assert.deepEqual(await masters('FTS-2'), ['tokyo'], 'the request closed in Tokyo stays there');
  const trip = (await copy('sf', 'FTS-1'))!.dso_mapping_history.map((h) => `${h.fromServer}>${h.toServer}`);
  assert.deepEqual(trip, ['sf>tokyo', 'tokyo>paris', 'paris>sf'], 'the mapping history of FTS-1 shows the trip');

  // one scheduled run per site, at its 17:00 local, with what it matched
  for (const { server, zone } of SITES) {
    const done = await runs(server);
    assert.equal(done.length, 1, `one run on ${server}: ${JSON.stringify(done)}`);
    assert.equal(local(done[0]!.fire_time, zone).replace(/^\w+ /, ''), '17:00', `the ${server} run fired at 17:00 local`);
    assert.equal(done[0]!.trigger, 'schedule');
    assert.equal(done[0]!.finished, true);
  }
  assert.deepEqual(
    (await runs('sf')).map((r) => r.matched),
    ['2'],
    'sf matched the two open requests',
  );
  assert.deepEqual(
    (await runs('tokyo')).map((r) => r.matched),
    ['1'],
    'tokyo matched FTS-1 only',
  );

  // Nobody runs from Tuesday evening to Friday: each site's missed fire times run once, at the next start
  await stop();
  clock.set(new Date('2026-03-13T12:00:00Z')); // Friday 05:00 in San Francisco
  stop = await start();
  await asleep('after the restart');
  const expected: Record<string, string> = {
    sf: '2026-03-13T00:00:00.000Z', // Thursday 17:00 PDT
    tokyo: '2026-03-13T08:00:00.000Z', // Friday 17:00 JST
    paris: '2026-03-12T16:00:00.000Z', // Thursday 17:00 CET
  };
  for (const { server } of SITES) {
    const after = (await runs(server)).slice(1);
    assert.deepEqual(
      after.map((r) => [r.fire_time.toISOString(), r.trigger]),
      [[expected[server], 'schedule']],
      `${server}: the missed fire times ran once, for the latest`,
    );
  }
  await stop();
});
