// `pgdso escalate --name E`: one escalation now. With a group running it is carried out by the
// owner of `escalation` (here moved to sf-b by group rank), which the command names; with no
// instance online it runs in the command's process and the engine carries the matched requests
// once it runs. Either way the run is in pgdso.scan_runs. An unknown name is bad usage (exit 2).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { REPAIR_REQUEST_SQL, dsoSuite, mapping, copyOf } from './support/dso.ts';
import { GROUP, startGroup, startInstance, stopAll, untilOwner, describeGroup } from './support/group.ts';
import { waitFor } from './support/wait.ts';

const suite = dsoSuite(2);

const RULES = {
  mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
  escalations: [
    {
      name: 'open-to-chicago',
      on: { server: 'sf', form: 'repair_request' },
      // New Year's midnight only: it never fires by itself during the test
      schedule: { cron: '0 0 1 1 *', timezone: 'UTC' },
      conditions: {
        all: [
          { fact: 'row', path: '$.status', operator: 'notIn', value: ['closed'] },
          { fact: 'master', operator: 'equal', value: true },
        ],
      },
      actions: [{ type: 'transfer', mapping: 'sf-to-chicago' }],
    },
  ],
};

const show = (r: { code: number | null; stdout: string; stderr: string }) =>
  `exit ${r.code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;

test('pgdso escalate runs through the owner of escalation and names it; with no instance online it runs in-process and the engine \
carries the requests later; an unknown escalation is exit 2', { timeout: 180_000 }, async () => {
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: RULES,
    config: { group: GROUP },
  });
  await e.query(
    'sf',
    `INSERT INTO repair_request (id, item, status) VALUES ('ESC-1', 'chair', 'open'), ('ESC-2', 'desk', 'in progress'),
      ('ESC-3', 'lamp', 'closed')`,
  );
  const group = await startGroup(e, ['sf-a', 'sf-b']);
  const chicago = startInstance(e, 'chicago-a', { server: 'chicago' });
  const r0 = await e.cli(['group', 'rank', '--server', 'sf', '--instance-id', 'sf-b', '--rank', '0', '--operation', 'escalation']);
  assert.equal(r0.code, 0, show(r0));
  await untilOwner(e, 'sf-b', group, { operation: 'escalation', timeoutMs: 30_000 });

  const r1 = await e.cli(['escalate', '--name', 'open-to-chicago']);
  assert.equal(r1.code, 0, show(r1));
  assert.match(r1.stdout, /ran on instance sf-b, the owner of escalation on sf: matched 2 of 3 requests/, show(r1));
  await waitFor(
    async () => (await copyOf(e, 'chicago', 'ESC-1'))?.dso_master === true && (await copyOf(e, 'chicago', 'ESC-2'))?.dso_master === true,
    {
      timeoutMs: 30_000,
      message: () => `ESC-1 and ESC-2 did not reach chicago as masters\n${describeGroup(group)}`,
    },
  );
  assert.equal(await copyOf(e, 'chicago', 'ESC-3'), undefined, 'the closed request stays on sf');
  await waitFor(async () => (await copyOf(e, 'sf', 'ESC-1'))?.dso_master === false, { message: 'sf kept ownership of ESC-1' });

  // nobody runs: the command runs the escalation itself
  await stopAll([...group, chicago]);
  await e.query('sf', `INSERT INTO repair_request (id, item, status) VALUES ('ESC-4', 'stool', 'open')`);
  const r2 = await e.cli(['escalate', '--name', 'open-to-chicago', '--json']);
  assert.equal(r2.code, 0, show(r2));
  const summary = JSON.parse(r2.stdout) as { matched: number; scanned: number; instanceId: string; trigger: string };
  assert.deepEqual([summary.matched, summary.scanned, summary.trigger], [1, 4, 'manual'], show(r2));
  assert.match(summary.instanceId, /^cli /);
  assert.equal(await copyOf(e, 'chicago', 'ESC-4'), undefined, 'nothing is applied before an engine runs');
  const again = [startInstance(e, 'sf-a'), startInstance(e, 'chicago-a', { server: 'chicago' })];
  await waitFor(async () => (await copyOf(e, 'chicago', 'ESC-4'))?.dso_master === true, {
    timeoutMs: 30_000,
    message: () => `ESC-4 did not reach chicago once an engine ran\n${describeGroup(again)}`,
  });
  const runs = await e.query<{ trigger: string; matched: string; instance_id: string; done: boolean }>(
    'sf',
    `SELECT trigger, matched::text, instance_id, finished_at IS NOT NULL AS done FROM pgdso.scan_runs ORDER BY id`,
  );
  assert.deepEqual(
    runs.map((r) => [r.trigger, r.matched, r.done, r.instance_id.startsWith('cli ') ? 'cli' : r.instance_id]),
    [
      ['manual', '2', true, 'sf-b'],
      ['manual', '1', true, 'cli'],
    ],
  );
  await stopAll(again);

  const r3 = await e.cli(['escalate', '--name', 'no-such-escalation']);
  assert.equal(r3.code, 2, show(r3));
  assert.match(r3.stderr, /no escalation "no-such-escalation" in the rules \(known: open-to-chicago\)/);
});
