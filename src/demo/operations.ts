// The DBA's side of `pgdso demo`, on the archiving use's two servers (sf on the demo cluster, the
// archive on a cluster of its own so that it can stop): `pgdso status`; the archive stopped while
// closed requests wait in sf's pgdso.pending, then delivered when it is back; a request the
// archive refuses, kept in pgdso.pending_errors with its reason, fixed and sent again with
// `pgdso pending retry`. The commands are the real ones, run in this process.
import type { LocalCluster } from '../embedded/cluster.ts';
import { statusCommand } from '../cli/commands/status.ts';
import { pendingListCommand, pendingRetryCommand } from '../cli/commands/pending.ts';
import type { GlobalOptions } from '../cli/common.ts';
import { type DemoUse, until } from './use.ts';

type Say = (text?: string) => void;

/** Runs a command of the CLI as `pgdso ... --config <the use's config>` would; its exit code is not the demo's. */
async function command(say: Say, line: string, run: () => Promise<void>): Promise<void> {
  say(`$ pgdso ${line} --config examples/archiving/pgdso.config.json`);
  const exitCode = process.exitCode;
  try {
    await run();
  } finally {
    say(`(exit code ${process.exitCode ?? 0})`);
    process.exitCode = exitCode;
  }
}

async function rows(use: DemoUse, server: string, sql: string): Promise<Record<string, unknown>[]> {
  return (await use.pool(server).query(sql)).rows as Record<string, unknown>[];
}

async function showQuery(use: DemoUse, say: Say, server: string, sql: string): Promise<void> {
  say(`${server}> ${sql}`);
  const result = await rows(use, server, sql);
  if (result.length === 0) say('  (0 rows)');
  for (const row of result)
    say(
      `  ${Object.values(row)
        .map((v) => (v instanceof Date ? v.toISOString() : String(v)))
        .join(' | ')}`,
    );
}

export async function operations(use: DemoUse, archiveCluster: LocalCluster, say: Say, logLevel: string): Promise<void> {
  const opts: GlobalOptions = { config: use.configPath, logLevel, env: use.env };
  const status = () => command(say, 'status', () => statusCommand(opts, {}));
  const sf = use.pool('sf');
  const onArchive = async (id: string) => (await use.copy('archive', id))?.dso_master === true && !(await use.copy('sf', id));

  say("\nThe DBA's side, on the archiving servers: sf, and the archive on a PostgreSQL cluster of its own");
  say(`(127.0.0.1:${archiveCluster.port}). The instance that serves them, its operations and the queues:\n`);
  await status();

  say('\nThe archive server stops for maintenance (a fast shutdown of its cluster), and sf closes two requests:');
  await archiveCluster.stop();
  say(`$ pg_ctl stop -m fast -D ${archiveCluster.dataDir}`);
  const close = `UPDATE repair_request SET status = 'closed' WHERE id IN ('SF-21', 'SF-40')`;
  await sf.query(`INSERT INTO repair_request (id, item, description) VALUES ('SF-40', 'chair', 'armrest loose')`);
  say(`sf> INSERT INTO repair_request (id, item, description) VALUES ('SF-40', 'chair', 'armrest loose')`);
  say(`sf> ${close}`);
  await sf.query(close);
  await until(async () => (await rows(use, 'sf', 'SELECT 1 FROM pgdso.pending')).length === 2);
  say("\nNothing is lost: the transfers wait in sf's queue, in commit order, and the engine tries the");
  say('archive again with a growing delay (pending.retry). The requests stay on sf, still its masters:');
  await showQuery(use, say, 'sf', 'SELECT id, type, mapping, request_id, target_server, attempts FROM pgdso.pending ORDER BY id');
  await command(say, 'pending list --server sf', () => pendingListCommand(opts, { server: 'sf' }));

  say('\nThe archive starts again; the engine sees it at its next attempt and delivers the queue:');
  await archiveCluster.start();
  say(`$ pg_ctl start -D ${archiveCluster.dataDir}`);
  await until(async () => (await onArchive('SF-21')) && (await onArchive('SF-40')), 60_000);
  await until(async () => (await rows(use, 'sf', 'SELECT 1 FROM pgdso.pending')).length === 0);
  await showQuery(use, say, 'sf', 'SELECT count(*) AS queued FROM pgdso.pending');
  await showQuery(use, say, 'archive', `SELECT id, status, dso_master FROM repair_request WHERE id IN ('SF-21', 'SF-40') ORDER BY id`);

  say('\nA request the archive refuses. Its DBA adds a rule that archived requests have a description;');
  say('sf closes one without:');
  const rule = `ALTER TABLE repair_request ADD CONSTRAINT described CHECK (description IS NOT NULL)`;
  say(`archive> ${rule}`);
  await use.pool('archive').query(rule);
  const insert = `INSERT INTO repair_request (id, item, status, description) VALUES ('SF-41', 'lamp', 'closed', NULL),
    ('SF-42', 'desk', 'closed', 'new drawer rails')`;
  say(`sf> ${insert.replace(/\s+/g, ' ')}`);
  await sf.query(insert);
  const failed = async () => rows(use, 'sf', `SELECT id FROM pgdso.pending_errors WHERE request_id = 'SF-41'`);
  await until(async () => (await failed()).length === 1 && (await onArchive('SF-42')));
  say("\nSF-41 cannot be applied: the operation is kept in sf's pgdso.pending_errors, with its payload and the");
  say("archive's reason; SF-41 stays on sf as master, and the stream goes on (SF-42 is archived):");
  await showQuery(use, say, 'sf', `SELECT id, type, request_id, sqlstate, error FROM pgdso.pending_errors`);
  const [{ id }] = (await failed()) as [{ id: string }];
  say("\nThe archive's DBA drops the rule (archived requests keep the description they had), and sends the");
  say('operation again; the owner of dso carries it out:');
  const fix = 'ALTER TABLE repair_request DROP CONSTRAINT described';
  say(`archive> ${fix}`);
  await use.pool('archive').query(fix);
  await command(say, `pending retry --server sf --id ${id}`, () => pendingRetryCommand(opts, { server: 'sf', id: String(id) }));
  await until(async () => (await onArchive('SF-41')) && (await failed()).length === 0);
  await showQuery(use, say, 'archive', `SELECT id, status, dso_master FROM repair_request ORDER BY id`);
  await showQuery(use, say, 'sf', 'SELECT id, status FROM repair_request ORDER BY id');
  say('');
  await status();
}
