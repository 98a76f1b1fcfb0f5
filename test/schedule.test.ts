// The pending queue's retry schedule and its config section.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { retryDelay } from '../src/applier/schedule.ts';
import { loadConfig } from '../src/config/load.ts';
import { ConfigError } from '../src/config/types.ts';

const MINUTE = 60_000;
const low = () => 0;
const high = () => 0.999999;

test('backoff: the first retry after firstSeconds, each next twice as late, capped at maxSeconds, jittered in [half, whole]', () => {
  const schedule = { kind: 'backoff' as const, firstMs: 1000, maxMs: 60_000 };
  assert.deepEqual(
    [1, 2, 3, 4].map((n) => Math.round(retryDelay(schedule, n, 0, high))),
    [1000, 2000, 4000, 8000],
  );
  assert.deepEqual(
    [1, 2, 3, 4].map((n) => retryDelay(schedule, n, 0, low)),
    [500, 1000, 2000, 4000],
  );
  assert.equal(Math.round(retryDelay(schedule, 7, 0, high)), 60_000);
  assert.equal(Math.round(retryDelay(schedule, 500, 0, high)), 60_000, 'no overflow after many attempts');
});

test("DSO's schedule: every 5 minutes for 30 minutes, every 30 minutes for 24 hours, then hourly (±10%)", () => {
  const dso = { kind: 'dso' as const };
  for (const [downFor, base] of [
    [0, 5],
    [29 * MINUTE, 5],
    [31 * MINUTE, 30],
    [23 * 60 * MINUTE, 30],
    [25 * 60 * MINUTE, 60],
  ] as const) {
    const [a, b] = [retryDelay(dso, 3, downFor, low), retryDelay(dso, 3, downFor, high)];
    assert.ok(a >= base * MINUTE * 0.9 && b <= base * MINUTE * 1.1 && a < b, `down for ${downFor / MINUTE} min: ${a}..${b}`);
  }
});

async function configWith(extra: Record<string, unknown>): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgdso-schedule-'));
  await mkdir(path.join(dir, 'rules'));
  await writeFile(path.join(dir, 'rules', 'r.json'), JSON.stringify({ mappings: [], filters: [] }));
  await writeFile(
    path.join(dir, 'pgdso.config.json'),
    JSON.stringify({ servers: { sf: { connection: 'postgres://u@h/db' } }, rules: ['rules/*.json'], ...extra }),
  );
  return path.join(dir, 'pgdso.config.json');
}

test('config: pending.retry is "dso" or {firstSeconds, maxSeconds}; defaults 1 s to 60 s, heartbeat 10 s, 1 GiB retained WAL', async () => {
  assert.deepEqual((await loadConfig(await configWith({}), {})).pending, {
    retry: { kind: 'backoff', firstMs: 1000, maxMs: 60_000 },
    heartbeatMs: 10_000,
    retainedWalWarnBytes: 1024 ** 3,
  });
  assert.deepEqual((await loadConfig(await configWith({ pending: { retry: 'dso', heartbeatSeconds: 0 } }), {})).pending.retry, {
    kind: 'dso',
  });
  assert.deepEqual((await loadConfig(await configWith({ pending: { retry: { maxSeconds: 5 } } }), {})).pending.retry, {
    kind: 'backoff',
    firstMs: 1000,
    maxMs: 5000,
  });
  await assert.rejects(
    loadConfig(await configWith({ pending: { retry: 'weekly' } }), {}),
    (err: unknown) => err instanceof ConfigError && /pending\/retry/.test(err.message),
  );
  await assert.rejects(loadConfig(await configWith({ pending: { retry: { firstSeconds: 0 } } }), {}), ConfigError);
});
