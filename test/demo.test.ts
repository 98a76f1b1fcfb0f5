// The README's first command: `pgdso demo` runs the routing use on embedded PostgreSQL.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runCli } from './support/dso.ts';
import { providerName } from './support/servers.ts';

test('pgdso demo narrates routing on embedded PostgreSQL and cleans up', { skip: providerName() !== 'embedded' && 'the demo always uses embedded PostgreSQL' }, async () => {
  const { code, stdout, stderr } = await runCli(['demo']);
  assert.equal(code, 0, stderr);
  assert.match(stdout, /SF-2\s+chicago\s+true\s+sf/);
  assert.match(stdout, /SF-3\s+chicago_uph\s+true\s+chicago\s+sf->chicago, chicago->chicago_uph/);
  assert.match(stdout, /ERROR P0001: pgdso: request SF-2 of repair_request is owned by chicago/);
  assert.match(stdout, /Demo done/);
});
