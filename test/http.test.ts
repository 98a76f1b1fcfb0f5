// A running instance serves GET /healthz and GET /metrics on http.port.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { waitFor } from './support/wait.ts';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, is } from './support/dso.ts';

const suite = dsoSuite(2);

/** sf and chicago, chairs carried from sf to chicago. */
const chairsEnv = (config?: Record<string, unknown>) =>
  suite.env({
    servers: ['sf', 'chicago'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: {
      mappings: [mapping('sf-to-chicago', 'sf', 'chicago')],
      filters: [filter('route-chairs', 'sf', { all: [is('item', 'chair')] }, [{ type: 'transfer', mapping: 'sf-to-chicago' }])],
    },
    config,
  });

test('a running instance serves /healthz and Prometheus /metrics with pgdso_ names that count what it did', async () => {
  const e = await chairsEnv();
  const config = JSON.parse(await readFile(e.configPath, 'utf8'));
  await writeFile(e.configPath, JSON.stringify({ ...config, http: { port: 0 } }));
  const engine = e.engine();
  const port = (await waitFor(() => /"httpPort":(\d+)/.exec(engine.output)?.[1], { message: () => engine.output }))!;
  const base = `http://127.0.0.1:${port}`;
  const health = await waitFor(
    async () => {
      const res = await fetch(`${base}/healthz`);
      return res.status === 200 ? res.json() : undefined;
    },
    { message: () => engine.output },
  );
  assert.deepEqual(Object.keys(health.servers).sort(), ['chicago', 'sf']);
  assert.equal(health.status, 'ok');

  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('M-1', 'chair'), ('M-2', 'chair'), ('M-3', 'desk')`);
  await waitFor(async () => (await e.query('chicago', 'SELECT 1 FROM repair_request')).length === 2, { message: () => engine.output });
  let body = '';
  const text = (await waitFor(
    async () => {
      body = await (await fetch(`${base}/metrics`)).text();
      // 2 transfers applied on chicago and their 2 bookkeeping operations on sf; then those
      // 2 bookkeeping updates read back from the WAL (counted as changes, below)
      const read = /pgdso_changes_total\{server="sf"\} 5\b/.test(body);
      return /pgdso_operations_applied_total\{server="sf"\} 4\b/.test(body) && read ? body : undefined;
    },
    {
      message: () =>
        `${engine.output}\n${body
          .split('\n')
          .filter((l) => l.startsWith('pgdso_') && !l.startsWith('pgdso_process'))
          .join('\n')}`,
    },
  ))!;
  assert.match(text, /^# TYPE pgdso_operations_applied_total counter$/m);
  // 3 inserts, and the 2 bookkeeping updates the engine read back from the WAL
  assert.match(text, /pgdso_changes_total\{server="sf"\} 5\b/);
  assert.match(text, /pgdso_operations_failed_total\{server="sf"\} 0\b/);
  assert.match(text, /pgdso_streaming\{server="sf"\} 1\b/);
  assert.match(text, /pgdso_process_resident_memory_bytes/);
  assert.equal((await fetch(`${base}/nothing`)).status, 404);
  assert.equal(await engine.stop(), 0);
});

test('two instances of one server on one machine with the same http.port: the second says the port is taken and runs without it; ' +
  '/healthz lists the operations each owns', {
  timeout: 90_000,
}, async () => {
  const e = await chairsEnv({ group: { checkIntervalSeconds: 0.5, delinquentThreshold: 2 } });
  const config = JSON.parse(await readFile(e.configPath, 'utf8'));
  const first = e.engine(['--server', 'sf', '--instance-id', 'sf-a', '--rank', '1']);
  // the first instance on a free port, then the second on the same one
  await writeFile(e.configPath, JSON.stringify({ ...config, http: { port: 0 } }));
  const port = Number((await waitFor(() => /"httpPort":(\d+)/.exec(first.output)?.[1], { message: () => first.output }))!);
  await writeFile(e.configPath, JSON.stringify({ ...config, http: { port } }));
  const second = e.engine(['--server', 'sf', '--instance-id', 'sf-b', '--rank', '2']);
  await waitFor(() => /port \d+ is taken/.test(second.output), { message: () => second.output });
  assert.match(second.output, new RegExp(`http.port ${port} is taken`), second.output);
  // it runs on: it joins the group, as a standby
  await waitFor(
    async () => (await e.query('sf', `SELECT 1 FROM pgdso.servgrp_board WHERE instance_id = 'sf-b' AND state = 'online'`)).length === 1,
    { message: () => second.output },
  );
  assert.ok(second.running, second.output);
  const health = (await waitFor(
    async () => {
      const body = await (await fetch(`http://127.0.0.1:${port}/healthz`)).json();
      return body.servers?.sf?.operations?.includes('dso') ? body : undefined;
    },
    { message: () => first.output },
  )) as { instanceId: string; servers: Record<string, { operations: string[] }> };
  assert.equal(health.instanceId, 'sf-a');
  assert.deepEqual(health.servers.sf!.operations, ['admin', 'dso', 'escalation']);
  assert.equal(await second.stop(), 0, second.output);
  assert.equal(await first.stop(), 0, first.output);
});
