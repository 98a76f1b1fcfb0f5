// `pgdso demo`: DSO's four use cases on embedded PostgreSQL, narrated. Real clusters, the real engine.
import { startLocalCluster, type LocalCluster } from '../../embedded/cluster.ts';
import { createLogger } from '../../log.ts';
import { DemoUse, until } from '../../demo/use.ts';
import { followTheSun } from '../../demo/follow-the-sun.ts';
import { operations } from '../../demo/operations.ts';
import { print, type GlobalOptions } from '../common.ts';

export async function demoCommand(opts: GlobalOptions, cmd: { keep?: boolean }): Promise<void> {
  const say = (text = '') => print(text);
  say('pgdso demo: DSO on PostgreSQL, with real embedded PostgreSQL servers.\n');
  say('Starting a local PostgreSQL cluster (wal_level=logical); each use case gets its own databases on it.');
  let cluster: LocalCluster | null = null;
  let archiveCluster: LocalCluster | null = null;
  const uses: DemoUse[] = [];
  // the narration says what the engines do; their warnings (a peer stopped, a row refused) are
  // the story's own, so only errors are logged unless --log-level asks for more
  const log = createLogger({ level: opts.logLevel === 'info' ? 'error' : opts.logLevel });
  /** Without --keep, a use's engines stop before the next use starts. */
  const done = async (use: DemoUse) => {
    if (cmd.keep) return;
    uses.splice(uses.indexOf(use), 1);
    await use.stop();
  };
  try {
    cluster = await startLocalCluster({ name: 'demo' });
    say(`Cluster up: 127.0.0.1:${cluster.port}, postmaster pid ${cluster.pid}, data directory ${cluster.dataDir}\n`);

    // ---------------------------------------------------------------- use 1, routing
    say('Use 1 databases: sf, chicago, chicago_uph ...');
    const routing = await DemoUse.create(cluster, 'routing', '', ['sf', 'chicago', 'chicago_uph']);
    uses.push(routing);
    say(
      'Control schema migrated and form repair_request enabled on each server (distributed columns, ownership guard, publication, slot).\n',
    );
    await routing.start(log);
    say('Use 1, routing (rules: examples/routing/rules/routing.json). Chairs submitted in San Francisco');
    say('go to Chicago with ownership; in Chicago, a chair that needs an upholsterer goes on to the');
    say('upholstery server (a chained transfer: filters see the changes the engine makes too).\n');
    const sf = routing.pool('sf');
    say('sf> INSERT repair requests: SF-1 desk, SF-2 chair, SF-3 chair that needs upholstery');
    await sf.query(`INSERT INTO repair_request (id, item, needs_upholstery, description) VALUES
      ('SF-1', 'desk', false, 'wobbly leg'), ('SF-2', 'chair', false, 'squeaks'), ('SF-3', 'chair', true, 'torn seat')`);
    await until(
      async () =>
        (await routing.copy('chicago_uph', 'SF-3')) !== undefined &&
        (await routing.copy('chicago', 'SF-3'))?.dso_master === false &&
        (await routing.copy('sf', 'SF-2'))?.dso_master === false,
    );
    say('\nWhere each request is now (master = the copy that owns it):\n');
    await routing.table(say, ['SF-1', 'SF-2', 'SF-3']);
    say('\nThe sf copy of SF-2 is read-only now. A user tries to change it:');
    try {
      await sf.query(`UPDATE repair_request SET description = 'fixed?' WHERE id = 'SF-2'`);
      say('  (unexpected: the update went through)');
    } catch (err) {
      say(`  ERROR ${(err as { code?: string }).code}: ${(err as Error).message}`);
    }
    await done(routing);

    // ---------------------------------------------------------------- use 3, knowledge base
    say('\nUse 3, knowledge base (rules: examples/knowledge-base/rules/knowledge-base.json). Three');
    say('servers, sf, chicago and tokyo (databases kb_sf, kb_chicago, kb_tokyo), share what they learn:');
    say('when a user of one of them closes a request, a filter broadcasts it to the other two, one');
    say('transfer action per server, each by an independent-copy mapping. Every server gets its own');
    say('master copy, outside any ownership chain. The filter asks for origin null (a change made by a');
    say('user of this server), so a copy that arrives is not broadcast again.\n');
    const kb = await DemoUse.create(cluster, 'knowledge-base', 'kb_', ['sf', 'chicago', 'tokyo']);
    uses.push(kb);
    await kb.start(log);
    say("sf> INSERT INTO repair_request (id, item, description) VALUES ('SF-10', 'printer', 'paper jam')");
    await kb.pool('sf').query(`INSERT INTO repair_request (id, item, description) VALUES ('SF-10', 'printer', 'paper jam')`);
    say("sf> UPDATE repair_request SET status = 'closed', description = 'paper jam: worn pickup roller, replaced' WHERE id = 'SF-10'");
    await kb
      .pool('sf')
      .query(`UPDATE repair_request SET status = 'closed', description = 'paper jam: worn pickup roller, replaced' WHERE id = 'SF-10'`);
    // the copies, then the source's bookkeeping of the transfers (dso_to_*, dso_transfer_status), written once they are committed
    await until(
      async () =>
        (await kb.copy('chicago', 'SF-10'))?.dso_master === true &&
        (await kb.copy('tokyo', 'SF-10'))?.dso_master === true &&
        (await kb.copy('sf', 'SF-10'))?.dso_transfer_status === 'success',
    );
    say("\nEvery server has its own copy of SF-10, and every copy is a master (the sf copy's to column");
    say("names the last server it was sent to; each copy's history names its one hop):\n");
    await kb.table(say, ['SF-10']);
    say('\nChicago can correct its copy without asking San Francisco (no ownership guard in the way):');
    say("chicago> UPDATE repair_request SET description = description || ' (same fix for model X2)' WHERE id = 'SF-10'");
    try {
      const res = await kb
        .pool('chicago')
        .query(`UPDATE repair_request SET description = description || ' (same fix for model X2)' WHERE id = 'SF-10'`);
      say(`  UPDATE ${res.rowCount}`);
    } catch (err) {
      say(`  (unexpected) ERROR ${(err as { code?: string }).code}: ${(err as Error).message}`);
    }
    say('\nNow a user in Tokyo closes a request:');
    say("tokyo> INSERT INTO repair_request (id, item, description) VALUES ('TK-1', 'scanner', 'lines on every page')");
    await kb.pool('tokyo').query(`INSERT INTO repair_request (id, item, description) VALUES ('TK-1', 'scanner', 'lines on every page')`);
    say("tokyo> UPDATE repair_request SET status = 'closed', description = 'lines on every page: glass cleaned' WHERE id = 'TK-1'");
    await kb
      .pool('tokyo')
      .query(`UPDATE repair_request SET status = 'closed', description = 'lines on every page: glass cleaned' WHERE id = 'TK-1'`);
    await until(
      async () =>
        (await kb.copy('sf', 'TK-1'))?.dso_master === true &&
        (await kb.copy('chicago', 'TK-1'))?.dso_master === true &&
        (await kb.copy('tokyo', 'TK-1'))?.dso_transfer_status === 'success',
    );
    say('\nTK-1 reached the two other servers the same way:\n');
    await kb.table(say, ['SF-10', 'TK-1']);
    say('\nThe copies are independent: what each server holds for SF-10 now:');
    for (const server of ['sf', 'chicago', 'tokyo']) {
      const row = await kb.copy(server, 'SF-10');
      say(`  ${server.padEnd(8)} ${String(row?.description)}`);
    }
    await done(kb);

    // ---------------------------------------------------------------- use 4, archiving
    say('\nUse 4, archiving (rules: examples/archiving/rules/archiving.json). Closed requests leave the');
    say('production server sf for an archive server (databases ar_sf, ar_archive): a filter fires when');
    say('status is closed, its mapping carries the request with ownership, and afterTransfer delete');
    say('removes the sf copy once the archive has committed its own.\n');
    // the archive on a cluster of its own: the DBA's side, at the end, stops it for maintenance
    archiveCluster = await startLocalCluster({ name: 'demo-archive' });
    const ar = await DemoUse.create(cluster, 'archiving', 'ar_', ['sf', 'archive'], { archive: archiveCluster });
    uses.push(ar);
    await ar.start(log);
    say("sf> INSERT INTO repair_request (id, item, description) VALUES ('SF-20', 'lamp', 'flickers'), ('SF-21', 'desk', 'drawer stuck')");
    await ar
      .pool('sf')
      .query(`INSERT INTO repair_request (id, item, description) VALUES ('SF-20', 'lamp', 'flickers'), ('SF-21', 'desk', 'drawer stuck')`);
    say("sf> UPDATE repair_request SET status = 'closed' WHERE id = 'SF-20'");
    await ar.pool('sf').query(`UPDATE repair_request SET status = 'closed' WHERE id = 'SF-20'`);
    await until(async () => (await ar.copy('archive', 'SF-20'))?.dso_master === true && (await ar.copy('sf', 'SF-20')) === undefined);
    say('\nWhere each request is now:\n');
    await ar.table(say, ['SF-20', 'SF-21']);
    say('\nsf> SELECT id, status FROM repair_request ORDER BY id');
    for (const row of (await ar.pool('sf').query('SELECT id, status FROM repair_request ORDER BY id')).rows)
      say(`  ${row.id}  ${row.status}`);
    say('SF-20 is gone from sf: the archive holds the only copy, as master; SF-21, still open, stays.');

    // ---------------------------------------------------------------- use 2, follow the sun
    const fts = await followTheSun(cluster, say, log);
    uses.push(fts);
    await done(fts);

    // ---------------------------------------------------------------- the DBA's side
    await operations(ar, archiveCluster, say, opts.logLevel);
    await done(ar);

    say('\nNext: deploy on your own databases (README, "Deploying against existing databases"), write');
    say('rules (README, "A first rule file"), and `pgdso sync --mapping M` to carry the requests that exist.');
    if (cmd.keep) {
      keptRunning(say, [cluster, archiveCluster], uses);
      await new Promise<void>((resolve) => process.once('SIGINT', () => resolve()));
    }
  } finally {
    await Promise.allSettled(uses.map((u) => u.stop()));
    await cluster?.destroy();
    await archiveCluster?.destroy();
  }
  say('\nDemo done: clusters stopped and removed.');
}

/** `demo --keep`: how to connect to what keeps running, and what runs there. */
function keptRunning(say: (text?: string) => void, clusters: LocalCluster[], uses: DemoUse[]): void {
  say('\nStill running (--keep), until Ctrl-C stops everything and removes the clusters:');
  for (const c of clusters) say(`  PostgreSQL ${c.host}:${c.port}, user ${c.user}, password ${c.password} (data directory ${c.dataDir})`);
  for (const use of uses) {
    const servers = Object.entries(use.env).map(([name, url]) => `${name.replace(/_URL$/, '').toLowerCase()} ${url}`);
    say(`  use ${use.example}: instance demo-${use.example} serves ${servers.length} servers; connect with psql:`);
    for (const line of servers) say(`    ${line}`);
  }
  say('  pgdso commands need the variables the config names, for example:');
  const use = uses[0];
  if (use) {
    const vars = Object.entries(use.env)
      .map(([name, url]) => `${name}='${url}'`)
      .join(' ');
    say(`    ${vars} pgdso status --config examples/${use.example}/pgdso.config.json`);
  }
  say('  The follow-the-sun clock stays where the demo left it: its escalations do not fire again.');
}
