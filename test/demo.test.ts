// The README's first command: `pgdso demo` runs the routing, knowledge base and archiving uses on embedded PostgreSQL.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runCli } from './support/dso.ts';
import { providerName } from './support/servers.ts';

test('pgdso demo narrates routing, knowledge base and archiving on embedded PostgreSQL and cleans up', { skip: providerName() !== 'embedded' && 'the demo always uses embedded PostgreSQL' }, async () => {
  const { code, stdout, stderr } = await runCli(['demo']);
  assert.equal(code, 0, stderr);
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
  assert.match(stdout, /SF-20 is gone from sf/);
  assert.match(stdout, /Not in the demo yet: use 2, follow the sun.*\n.*escalations/);
  assert.match(stdout, /Demo done/);
});
