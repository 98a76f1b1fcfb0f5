// `pgdso demo`: DSO's use cases on embedded PostgreSQL, narrated. Real clusters, the real engine.
import { copyFile, mkdtemp, mkdir, writeFile, rm } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import pg from 'pg';
import { startLocalCluster, type LocalCluster } from '../../embedded/cluster.ts';
import { loadConfig } from '../../config/load.ts';
import { compileRules } from '../../rules/index.ts';
import { ServerEngine } from '../../engine.ts';
import { migrateServer } from '../../sql/migrate.ts';
import { enableForm } from '../../sql/forms.ts';
import { createLogger } from '../../log.ts';
import { print, type GlobalOptions } from '../common.ts';

const FORM_SQL = `CREATE TABLE repair_request (
  id text PRIMARY KEY, item text NOT NULL, needs_upholstery boolean NOT NULL DEFAULT false,
  status text NOT NULL DEFAULT 'new', site text, description text)`;

/** The demo runs the rule files of examples/ as they are, the ones the README walks through. */
const EXAMPLES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../examples');

async function until(check: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('the demo timed out waiting for the engine');
    await delay(50);
  }
}

export async function demoCommand(opts: GlobalOptions, cmd: { keep?: boolean }): Promise<void> {
  const say = (text = '') => print(text);
  say('pgdso demo: DSO on PostgreSQL, with real embedded PostgreSQL servers.\n');
  say('Starting a local PostgreSQL cluster (wal_level=logical) with three databases: sf, chicago, chicago_uph ...');
  let cluster: LocalCluster | null = null;
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgdso-demo-'));
  const pools = new Map<string, pg.Pool>();
  const controller = new AbortController();
  const engines: Promise<void>[] = [];
  try {
    cluster = await startLocalCluster({ name: 'demo' });
    const urls: Record<string, string> = {};
    for (const name of ['sf', 'chicago', 'chicago_uph']) {
      urls[name] = await cluster.createDatabase(name);
      const pool = new pg.Pool({ connectionString: urls[name], max: 2 });
      pool.on('error', () => undefined); // an idle connection cut when the cluster stops at the end
      pools.set(name, pool);
      await pool.query(FORM_SQL);
      await migrateServer({ connectionString: urls[name] });
      await enableForm({ connectionString: urls[name] }, 'public', 'repair_request');
    }
    await mkdir(path.join(dir, 'rules'));
    await writeFile(path.join(dir, 'pgdso.config.json'), JSON.stringify({ servers: Object.fromEntries(Object.entries(urls).map(([n, u]) => [n, { connection: u }])), rules: ['rules/*.json'] }, null, 2));
    await copyFile(path.join(EXAMPLES, 'routing/rules/routing.json'), path.join(dir, 'rules', 'routing.json'));
    const config = await loadConfig(path.join(dir, 'pgdso.config.json'), {});
    const rules = compileRules(config);
    say('Control schema migrated and form repair_request enabled on each server (distributed columns, ownership guard, publication, slot).\n');

    const log = createLogger({ level: opts.logLevel === 'info' ? 'warn' : opts.logLevel });
    for (const server of ['sf', 'chicago']) engines.push(new ServerEngine({ config, rules, server, log }).run(controller.signal));
    say('Use 1, routing (rules: examples/routing/rules/routing.json). Chairs submitted in San Francisco');
    say('go to Chicago with ownership; in Chicago, a chair that needs an upholsterer goes on to the');
    say('upholstery server (a chained transfer: filters see the changes the engine makes too).\n');
    const sf = pools.get('sf')!;
    say("sf> INSERT repair requests: SF-1 desk, SF-2 chair, SF-3 chair that needs upholstery");
    await sf.query(`INSERT INTO repair_request (id, item, needs_upholstery, description) VALUES
      ('SF-1', 'desk', false, 'wobbly leg'), ('SF-2', 'chair', false, 'squeaks'), ('SF-3', 'chair', true, 'torn seat')`);
    const copy = async (server: string, id: string) =>
      (await pools.get(server)!.query('SELECT * FROM repair_request WHERE id = $1', [id])).rows[0] as Record<string, unknown> | undefined;
    await until(async () => (await copy('chicago_uph', 'SF-3')) !== undefined && (await copy('chicago', 'SF-3'))?.dso_master === false && (await copy('sf', 'SF-2'))?.dso_master === false);
    say('\nWhere each request is now (master = the copy that owns it):\n');
    say(`${'request'.padEnd(8)} ${'server'.padEnd(12)} ${'master'.padEnd(7)} ${'from'.padEnd(9)} ${'to'.padEnd(12)} ${'transfer'.padEnd(9)} history`);
    for (const id of ['SF-1', 'SF-2', 'SF-3']) {
      for (const server of ['sf', 'chicago', 'chicago_uph']) {
        const row = await copy(server, id);
        if (!row) continue;
        const history = (row.dso_mapping_history as { fromServer: string; toServer: string }[]).map((h) => `${h.fromServer}->${h.toServer}`).join(', ');
        say(`${id.padEnd(8)} ${server.padEnd(12)} ${String(row.dso_master).padEnd(7)} ${String(row.dso_from_server ?? '').padEnd(9)} ${String(row.dso_to_server ?? '').padEnd(12)} ${String(row.dso_transfer_status ?? '').padEnd(9)} ${history}`);
      }
    }
    say('\nThe sf copy of SF-2 is read-only now. A user tries to change it:');
    try {
      await sf.query(`UPDATE repair_request SET description = 'fixed?' WHERE id = 'SF-2'`);
      say('  (unexpected: the update went through)');
    } catch (err) {
      say(`  ERROR ${(err as { code?: string }).code}: ${(err as Error).message}`);
    }
    say('\nUses 2 (follow the sun), 3 (knowledge base) and 4 (archiving) arrive with the next steps of pgdso.');
    if (cmd.keep) {
      say(`\nServers keep running: ${Object.keys(urls).join(', ')} on 127.0.0.1:${cluster.port}. Ctrl-C stops them.`);
      await new Promise<void>((resolve) => process.once('SIGINT', () => resolve()));
    }
  } finally {
    controller.abort();
    await Promise.allSettled(engines);
    await Promise.all([...pools.values()].map((p) => p.end()));
    await cluster?.destroy();
    await rm(dir, { recursive: true, force: true });
  }
  say('\nDemo done: clusters stopped and removed.');
}
