// Server groups on one cluster: several `pgdso run` instances serve sf (requests go to chicago).
// Elections on an empty board (one coordinator, one decoder, whatever the timing), a clean stop
// that hands dso over, and the commands a running group carries out: `pending retry` by the
// owner of dso, `rules publish` (and SIGHUP) by the owner of admin, the rule set reaching every
// instance, `group rank`. The instances' writes on chicago name them (application_name).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, type DsoEnv } from './support/dso.ts';
import { show } from './support/checks.ts';
import { waitFor } from './support/wait.ts';
import { LOCK_NAMESPACE, LOCKS } from '../src/sql/identifiers.ts';
import {
  FAILOVER,
  GROUP,
  GROUP_AUDIT_SQL,
  HANDOVER_BOUND_MS,
  INTERVAL_MS,
  MARGIN_MS,
  OPERATIONS,
  TAKEOVER,
  advisoryLocks,
  board,
  boardRow,
  clearBoard,
  describeGroup,
  events,
  owners,
  ranking,
  ruleVersions,
  slotHolders,
  carry,
  startGroup,
  startInstance,
  stopAll,
  statusOf,
  untilBeats,
  untilOnline,
  untilOwner,
  walsenders,
  type AdvisoryLock,
  type Instance,
} from './support/group.ts';

const suite = dsoSuite(1);
/** pg_locks' classid:objid:objsubid of the coordinator's lock (two int4 keys: objsubid 2) */
const COORDINATOR_LOCK_KEY = `${LOCK_NAMESPACE}:${LOCKS.coordinator}:2`;

const RULES = {
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only' })],
  filters: [filter('to-chicago', 'sf', null, [{ type: 'transfer', mapping: 'sf-to-chicago' }], ['insert', 'update'])],
};

async function groupEnv(rules: Record<string, unknown> = RULES): Promise<DsoEnv> {
  return suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: `${REPAIR_REQUEST_SQL}; ${GROUP_AUDIT_SQL}`,
    forms: ['repair_request'],
    rules,
    config: { group: GROUP, pending: { retry: { firstSeconds: 0.2, maxSeconds: 1 } } },
  });
}

// ---------------------------------------------------------------------------------------------

interface Seen {
  /** most board rows listing dso at once */
  listingDso: number;
  /** most walsenders on sf's database at once */
  walsenders: number;
  /** every instance seen owning dso (servgrp_owners) */
  dsoOwners: Set<string>;
  samples: number;
}

/** Samples sf's board, owners and walsenders until stopped: what happened between the assertions. */
function sample(e: DsoEnv): { stop: () => Promise<Seen> } {
  const seen: Seen = { listingDso: 0, walsenders: 0, dsoOwners: new Set(), samples: 0 };
  let running = true;
  const loop = (async () => {
    while (running) {
      try {
        const [rows, senders, owner] = await Promise.all([board(e), walsenders(e), owners(e)]);
        seen.listingDso = Math.max(seen.listingDso, rows.filter((r) => r.operations.includes('dso')).length);
        seen.walsenders = Math.max(seen.walsenders, senders.length);
        if (owner.dso?.instanceId) seen.dsoOwners.add(owner.dso.instanceId);
        seen.samples += 1;
      } catch {
        // the tables may be missing (the board is being cleared): the next sample will tell
      }
      await delay(15);
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return seen;
    },
  };
}

// Fails if: two instances starting at once both take the first place (two rank-1 rows, two
// owners of dso over a round, two board rows listing dso, two walsenders on the slot at any
// sample); none does (no coordinator, no decoder: the request never arrives); the coordinator of
// status --json is not elected with an advisory lock (no session lock held by that instance) or
// the lock is shared; the request arrives twice or through an instance that does not own dso.
test('three instances started at once on an empty board, 20 times: one coordinator, one rank 1 per operation, one decoder', {
  timeout: 180_000,
}, async (t) => {
  const e = await groupEnv();
  const ids = ['sf-1', 'sf-2', 'sf-3'];
  const started = Date.now();
  const winners: Record<string, number> = {};
  for (let round = 1; round <= 20; round++) {
    await clearBoard(e);
    await waitFor(async () => (await walsenders(e)).length === 0, {
      timeoutMs: 10_000,
      message: 'no walsender left from the round before',
    });
    const watch = sample(e);
    // the same moment: three spawns in one tick
    const group = ids.map((id) => startInstance(e, id));
    const where = `round ${round}`;
    let codes: (number | null)[] = [];
    try {
      const converged = await waitFor(
        async () => {
          const [rows, senders, o] = await Promise.all([board(e), walsenders(e), owners(e)]);
          const online = rows.filter((r) => r.state === 'online').length === 3;
          const listing = rows.filter((r) => r.operations.includes('dso'));
          return online && listing.length === 1 && senders.length === 1 && o.dso?.instanceId === listing[0]!.instanceId ? o : undefined;
        },
        { timeoutMs: 30_000, message: () => `${where}: the group did not settle with one decoder\n${describeGroup(group)}` },
      );
      const owner = converged!.dso!.instanceId!;
      winners[owner] = (winners[owner] ?? 0) + 1;
      // the coordinator, elected with an advisory lock: a session lock of that instance, held by one backend;
      // status --json names it (asked in the first and the last round: each ask is a process)
      let coordinator: string;
      if (round === 1 || round === 20) {
        let shown = '';
        const status = (await waitFor(
          async () => {
            const { result, status } = await statusOf(e);
            shown = show(result);
            return status?.coordinator ? status : undefined;
          },
          { timeoutMs: 10_000, intervalMs: 100, message: () => `${where}: no coordinator in status --json\n${shown}` },
        ))!;
        coordinator = status.coordinator!;
        assert.ok(ids.includes(coordinator), `${where}: the coordinator in status --json: ${JSON.stringify(status)}`);
        assert.equal(status.owners.dso, owner, `${where}: the owner of dso in status --json: ${JSON.stringify(status)}`);
      } else {
        const held = (await waitFor(
          async () => {
            const found = (await advisoryLocks(e)).filter((l) => l.key === COORDINATOR_LOCK_KEY);
            return found.length > 0 ? found : undefined;
          },
          { timeoutMs: 10_000, intervalMs: 100, message: `${where}: nobody holds the coordinator's lock` },
        ))!;
        assert.equal(held.length, 1, `${where}: the coordinator's lock: ${JSON.stringify(held)}`);
        coordinator = ids.find((id) => held[0]!.applicationName === `pgdso group ${id}`) ?? held[0]!.applicationName;
        assert.ok(ids.includes(coordinator), `${where}: the coordinator's lock is held by ${held[0]!.applicationName}`);
      }
      let locks: AdvisoryLock[] = [];
      await waitFor(
        async () => {
          locks = (await advisoryLocks(e)).filter((l) => ids.some((id) => l.applicationName.includes(id)));
          return locks.some((l) => l.applicationName.includes(coordinator) && l.idle);
        },
        {
          timeoutMs: 5_000,
          message: () => `${where}: the coordinator ${coordinator} holds no session advisory lock: ${JSON.stringify(locks)}`,
        },
      );
      const holders = new Map<string, Set<number>>();
      for (const l of locks) holders.set(l.key, (holders.get(l.key) ?? new Set()).add(l.pid));
      assert.ok(
        [...holders.values()].every((pids) => pids.size === 1),
        `${where}: an advisory lock held by several backends: ${JSON.stringify(locks)}`,
      );
      // one rank 1 per operation (the first instance on the board), the owner of it
      const ranks = await ranking(e);
      const owned = (await waitFor(
        async () => {
          const o = await owners(e);
          return OPERATIONS.every((operation) => o[operation]?.instanceId) ? o : undefined;
        },
        { timeoutMs: 5_000, message: `${where}: an operation without an owner` },
      ))!;
      for (const operation of OPERATIONS) {
        const ranked = ranks.filter((r) => r.operation === operation && r.rank !== null);
        assert.deepEqual(
          ranked.map((r) => r.rank),
          [1],
          `${where}: ranks of ${operation} (the first instance gets 1, the others none): ${JSON.stringify(ranks)}`,
        );
        assert.equal(owned[operation]?.instanceId, ranked[0]!.instanceId, `${where}: the owner of ${operation} is its rank 1`);
      }
      // one decoder: the slot streamed by the owner's walsender, and the request carried once, by the owner
      // (the owner's decoder may be between two sessions: it restarts when the published rule set it adopts is new)
      let slots: Awaited<ReturnType<typeof slotHolders>> = [];
      await waitFor(
        async () => {
          slots = await slotHolders(e);
          return slots.length === 1 && slots[0]!.pid !== null;
        },
        { timeoutMs: 10_000, message: () => `${where}: the slot is not streamed: ${JSON.stringify(slots)}` },
      );
      assert.ok(slots[0]!.applicationName?.includes(owner), `${where}: the slot is streamed by ${owner}: ${JSON.stringify(slots)}`);
      const apps = await carry(e, `round-${round}`, group);
      assert.equal(apps.length, 1, `${where}: the request was written ${apps.length} times on chicago: ${JSON.stringify(apps)}`);
      assert.ok(apps[0]!.includes(owner), `${where}: the request was written on chicago by ${apps[0]}, not by the owner ${owner}`);
      const seen = await watch.stop();
      assert.deepEqual(
        { listingDso: seen.listingDso, walsenders: seen.walsenders, dsoOwners: [...seen.dsoOwners] },
        { listingDso: 1, walsenders: 1, dsoOwners: [owner] },
        `${where}: over the round (${seen.samples} samples)\n${describeGroup(group)}`,
      );
    } finally {
      await watch.stop();
      codes = await stopAll(group);
    }
    assert.deepEqual(codes, [0, 0, 0], `${where}: the instances did not stop cleanly\n${describeGroup(group)}`);
  }
  t.diagnostic(`20 rounds in ${Date.now() - started} ms; dso won by ${JSON.stringify(winners)}`);
});

// Fails if: SIGTERM of the owner does not hand dso over (the next instance waits for the owner
// to turn delinquent: a failover event, or a takeover after about threshold intervals), hands
// it to rank 3 rather than rank 2, or leaves the stopped instance online on the board; the new
// owner does not carry requests; status --json does not exit 1 once no instance of sf runs.
test('SIGTERM of the owner of dso hands it to the next ranked instance within about an interval, as a takeover, with no failover', {
  timeout: 120_000,
}, async (t) => {
  const e = await groupEnv();
  const group = await startGroup(e, ['sf-a', 'sf-b', 'sf-c'], [1, 2, 3]);
  const [a, b, c] = group as [Instance, Instance, Instance];
  const chicago = startInstance(e, 'chicago-a', { server: 'chicago' });
  const all = [...group, chicago];
  await untilOnline(e, chicago, all);
  const before = await statusOf(e);
  assert.equal(before.result.code, 0, `status with every server served\n${show(before.result)}`);
  assert.deepEqual(before.status?.owners, { dso: 'sf-a', escalation: 'sf-a', admin: 'sf-a' }, JSON.stringify(before.status));
  assert.ok((await carry(e, 'before-stop', all))[0]?.includes('sf-a'), 'sf-a carries requests before it stops');
  const firstTerm = (await owners(e)).dso!.term;
  const lastEvent = (await events(e)).reduce((id, ev) => Math.max(id, ev.id), 0);

  const stoppedAt = Date.now();
  const exit = a.engine.stop();
  const taken = await untilOwner(e, 'sf-b', all, { timeoutMs: HANDOVER_BOUND_MS + 20_000 });
  const handoverMs = Date.now() - stoppedAt;
  const code = await exit;
  t.diagnostic(`sf-b owned dso ${handoverMs} ms after the SIGTERM of sf-a (bound ${HANDOVER_BOUND_MS} ms)`);
  // long enough for a failover to have come, had sf-a been taken for delinquent
  await untilBeats(e, b, GROUP.delinquentThreshold + 2, all);

  assert.equal(code, 0, `sf-a did not stop cleanly\n${a.engine.output}`);
  assert.ok(handoverMs <= HANDOVER_BOUND_MS, `sf-b owned dso ${handoverMs} ms after the SIGTERM (bound ${HANDOVER_BOUND_MS} ms)`);
  assert.ok(taken.term > firstTerm, `the term did not rise: ${firstTerm} then ${taken.term}`);
  const later = (await events(e)).filter((ev) => ev.id > lastEvent);
  assert.deepEqual(
    later.filter((ev) => ev.operation === 'dso').map((ev) => ({ type: ev.type, newOwner: ev.newOwner, oldOwner: ev.oldOwner })),
    [{ type: TAKEOVER, newOwner: 'sf-b', oldOwner: 'sf-a' }],
    `events for dso after the SIGTERM: ${JSON.stringify(later)}`,
  );
  assert.deepEqual(
    later.filter((ev) => ev.type === FAILOVER),
    [],
    'a failover event after a clean stop',
  );
  const row = await boardRow(e, 'sf-a');
  assert.ok(row === undefined || row.state === 'stopped', `sf-a on the board after its clean stop: ${JSON.stringify(row)}`);
  assert.equal((await boardRow(e, 'sf-c'))?.operations.includes('dso'), false, 'sf-c (rank 3) took dso');
  const apps = await carry(e, 'after-stop', all);
  assert.ok(apps.length === 1 && apps[0]!.includes('sf-b'), `after-stop written on chicago by ${JSON.stringify(apps)}, not once by sf-b`);
  t.diagnostic(`owners after the stop: ${JSON.stringify(await owners(e))}`);

  // no instance of sf left (sf has forms in the rules): status exits 1; chicago is still served
  assert.deepEqual(await stopAll([b, c]), [0, 0]);
  const after = await statusOf(e);
  assert.equal(after.result.code, 1, `status with no instance of sf online\n${show(after.result)}`);
  assert.ok(
    after.status?.instances.every((i) => i.state !== 'online'),
    `sf's instances once all stopped: ${JSON.stringify(after.status)}`,
  );
  assert.equal(await chicago.engine.stop(), 0);
});

/** Waits until `pending_errors` of sf holds a row for the request. */
async function untilFailed(e: DsoEnv, id: string, instances: readonly Instance[]): Promise<void> {
  await waitFor(async () => (await e.query('sf', 'SELECT 1 FROM pgdso.pending_errors WHERE request_id = $1', [id])).length === 1, {
    timeoutMs: 30_000,
    message: () => `${id} did not fail into pending_errors\n${describeGroup(instances)}`,
  });
}

// Fails if: `group rank` does not move dso within a few intervals; `pending retry` with the group
// running is not carried out by the owner of dso (the request written on chicago by another
// instance, or by the command line itself) or the command does not say which instance did it.
test('pending retry while a group runs is carried out by the owner of dso (moved by group rank), which the command names', {
  timeout: 120_000,
}, async (t) => {
  const e = await groupEnv();
  const group = await startGroup(e, ['sf-a', 'sf-b']);
  // sf-a owns everything (first on the board); dso goes to sf-b, admin stays with sf-a
  for (const [id, rank] of [
    ['sf-b', '1'],
    ['sf-a', '2'],
  ] as const) {
    const r = await e.cli(['group', 'rank', '--server', 'sf', '--instance-id', id, '--rank', rank, '--operation', 'dso']);
    assert.equal(r.code, 0, `group rank ${id} ${rank}\n${show(r)}`);
  }
  const rankedAt = Date.now();
  await untilOwner(e, 'sf-b', group, { timeoutMs: INTERVAL_MS * (GROUP.delinquentThreshold + 1) + MARGIN_MS + 20_000 });
  const movedMs = Date.now() - rankedAt;
  t.diagnostic(`dso moved to sf-b ${movedMs} ms after group rank`);
  assert.ok(movedMs <= 2 * INTERVAL_MS + MARGIN_MS, `group rank took ${movedMs} ms to move dso (bound ${2 * INTERVAL_MS + MARGIN_MS} ms)`);
  const o = await owners(e);
  assert.deepEqual({ dso: o.dso?.instanceId, admin: o.admin?.instanceId }, { dso: 'sf-b', admin: 'sf-a' }, JSON.stringify(o));
  const ranks = (await ranking(e)).filter((r) => r.operation === 'dso').map((r) => [r.instanceId, r.rank]);
  assert.deepEqual(ranks, [
    ['sf-a', 2],
    ['sf-b', 1],
  ]);

  // a request of chicago's own holds the ID: the transfer fails (duplicateRequestId error)
  await e.query('chicago', `INSERT INTO repair_request (id, item, description) VALUES ('dup-1', 'stool', 'chicago''s own')`);
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('dup-1', 'chair', 'from sf')`);
  await untilFailed(e, 'dup-1', group);
  await e.query('chicago', `DELETE FROM repair_request WHERE id = 'dup-1'`);
  const r = await e.cli(['pending', 'retry', '--server', 'sf', '--all']);
  assert.equal(r.code, 0, show(r));
  assert.ok(r.stdout.includes('sf-b'), `pending retry does not name the owner of dso, sf-b\n${show(r)}`);
  await waitFor(async () => (await e.query('chicago', `SELECT 1 FROM repair_request WHERE id = 'dup-1' AND item = 'chair'`)).length === 1, {
    timeoutMs: 30_000,
    message: () => `dup-1 did not reach chicago once retried\n${describeGroup(group)}`,
  });
  const writes = await e.query<{ app: string }>('chicago', `SELECT app FROM write_audit WHERE id = 'dup-1' AND by_engine`);
  assert.ok(
    writes.length === 1 && writes[0]!.app.includes('sf-b'),
    `dup-1 written on chicago by ${JSON.stringify(writes)}, not once by sf-b`,
  );
  assert.deepEqual(await e.query('sf', 'SELECT request_id FROM pgdso.pending_errors'), []);
  assert.deepEqual(await stopAll(group), [0, 0]);
});

/** The board's rule_version of every instance once they agree (null allowed), and the newest published version. */
async function agreedVersion(e: DsoEnv, instances: readonly Instance[], timeoutMs = 30_000): Promise<number | null> {
  const versions = await waitFor(
    async () => {
      const v = await ruleVersions(e);
      const values = instances.map((i) => v[i.id]);
      return values.every((x) => x !== undefined && x === values[0]) ? values : undefined;
    },
    { timeoutMs, message: () => `the instances do not run one rule set\n${describeGroup(instances)}` },
  );
  return versions![0] ?? null;
}

const publishedVersion = async (e: DsoEnv) =>
  (await e.query<{ v: number | null }>('sf', 'SELECT max(version)::float8 AS v FROM pgdso.rule_sets'))[0]!.v;

/** Waits until every instance's rule_version is `version`; returns how long it took. */
async function untilRunning(e: DsoEnv, version: number, instances: readonly Instance[]): Promise<number> {
  const from = Date.now();
  await waitFor(
    async () => {
      const v = await ruleVersions(e);
      return instances.every((i) => v[i.id] === version);
    },
    { timeoutMs: 30_000, intervalMs: 25, message: () => `not every instance runs version ${version}\n${describeGroup(instances)}` },
  );
  return Date.now() - from;
}

const withSite = (site: string) => ({
  ...RULES,
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago', { transferMode: 'data-only', fields: { set: { site } } })],
});

// Fails if: `rules publish` is not carried out by the owner of admin, or does not name it and the
// version; a broken rule file is published, or changes any instance's rule_version, or does not
// name the file and the JSON pointer, or exits 0; a good rule set takes longer than two
// intervals to reach every instance, or does not change what the owner of dso does; SIGHUP
// kills an instance (node's default) or does not publish.
test('rules publish by the owner of admin: a broken file changes nothing on any instance, ' +
  'a good one reaches every instance within two intervals; SIGHUP publishes too', {
  timeout: 120_000,
}, async (t) => {
  const e = await groupEnv();
  const group = await startGroup(e, ['sf-a', 'sf-b']);
  const [a, b] = group as [Instance, Instance];
  // dso to sf-b: the rules must reach an instance that did not publish them
  for (const [id, rank] of [
    ['sf-b', '1'],
    ['sf-a', '2'],
  ] as const) {
    const r = await e.cli(['group', 'rank', '--server', 'sf', '--instance-id', id, '--rank', rank, '--operation', 'dso']);
    assert.equal(r.code, 0, `group rank ${id} ${rank}\n${show(r)}`);
  }
  await untilOwner(e, 'sf-b', group);
  const v0 = await agreedVersion(e, group);
  const published0 = await publishedVersion(e);

  // a broken rule file: refused, naming the file and the pointer; nothing changes anywhere
  await e.writeRules({ mappings: [mapping('broken-mapping', 'sf', 'chicago', { transferMode: 'sideways' })] }, 'rules/broken.json');
  const refused = await e.cli(['rules', 'publish', '--server', 'sf']);
  const out = refused.stdout + refused.stderr;
  assert.ok(refused.code === 2 || refused.code === 1, `a broken rule file published\n${show(refused)}`);
  assert.ok(out.includes('broken.json') && out.includes('/mappings/0/transferMode'), `the file and the pointer\n${show(refused)}`);
  for (const instance of group) await untilBeats(e, instance, 2, group);
  assert.deepEqual(await ruleVersions(e), { 'sf-a': v0, 'sf-b': v0 }, 'a broken rule file changed the rule_version of an instance');
  assert.equal(await publishedVersion(e), published0, 'a broken rule file made a rule set');
  assert.ok(
    group.every((i) => i.engine.running),
    `an instance stopped on a broken rule file\n${describeGroup(group)}`,
  );
  assert.ok((await carry(e, 'during-broken', group))[0]?.includes('sf-b'), 'the running rules go on');

  // a good change: published by the owner of admin, running everywhere within two intervals
  await rm(path.join(e.dir, 'rules/broken.json'));
  await e.writeRules(withSite('v1'));
  const published = await e.cli(['rules', 'publish', '--server', 'sf']);
  assert.equal(published.code, 0, show(published));
  const v1 = await publishedVersion(e);
  assert.ok(v1 !== null && v1 !== v0 && v1 !== published0, `no new rule set: ${v1}`);
  const reachMs = await untilRunning(e, v1, group);
  t.diagnostic(`rule set ${v1} published, running on every instance ${reachMs} ms after the command returned`);
  assert.ok(published.stdout.includes('sf-a'), `rules publish does not name the owner of admin, sf-a\n${show(published)}`);
  assert.ok(new RegExp(`\\b${v1}\\b`).test(published.stdout), `rules publish does not name version ${v1}\n${show(published)}`);
  const [set] = await e.query<{ published_by: string }>('sf', 'SELECT published_by FROM pgdso.rule_sets WHERE version = $1', [v1]);
  assert.ok(set?.published_by.includes('sf-a'), `rule set ${v1} published by ${set?.published_by}`);
  assert.ok(reachMs <= 2 * INTERVAL_MS + MARGIN_MS, `rule set ${v1} took ${reachMs} ms to reach every instance`);
  await carry(e, 'after-v1', group);
  const [v1row] = await e.query<{ site: string | null }>('chicago', `SELECT site FROM repair_request WHERE id = 'after-v1'`);
  assert.equal(v1row?.site, 'v1', 'the owner of dso does not apply the published rules');

  // SIGHUP to the instance that does not own admin: a publish request; it keeps running
  await e.writeRules(withSite('v2'));
  const pid = b.engine.child.pid!;
  process.kill(pid, 'SIGHUP');
  const v2 = await waitFor(
    async () => {
      const v = await publishedVersion(e);
      return v !== null && v !== v1 ? v : undefined;
    },
    { timeoutMs: 2 * INTERVAL_MS + MARGIN_MS + 10_000, message: () => `SIGHUP did not publish\n${describeGroup(group)}` },
  );
  await untilRunning(e, v2!, group);
  const [hup] = await e.query<{ published_by: string }>('sf', 'SELECT published_by FROM pgdso.rule_sets WHERE version = $1', [v2]);
  assert.ok(
    hup?.published_by.includes('sf-a'),
    `rule set ${v2} (SIGHUP to sf-b) published by ${hup?.published_by}, not the owner of admin`,
  );
  assert.ok(b.engine.running, `SIGHUP stopped sf-b\n${b.engine.output}`);
  assert.equal((await boardRow(e, 'sf-b'))?.pid, pid, 'sf-b is the same process');
  await carry(e, 'after-v2', group);
  const [v2row] = await e.query<{ site: string | null }>('chicago', `SELECT site FROM repair_request WHERE id = 'after-v2'`);
  assert.equal(v2row?.site, 'v2', 'the rules published on SIGHUP are not applied');
  const { status } = await statusOf(e);
  assert.deepEqual(
    status?.instances.map((i) => [i.instanceId, i.ruleVersion]).sort(),
    [
      ['sf-a', v2],
      ['sf-b', v2],
    ],
    JSON.stringify(status),
  );
  assert.deepEqual(await stopAll([a, b]), [0, 0]);
});
