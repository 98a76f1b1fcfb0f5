import pg from 'pg';
import { toPgClientConfig, describeConnection } from '../../config/load.ts';
import { migrateServer } from '../../sql/migrate.ts';
import { enableForm, PreflightError } from '../../sql/forms.ts';
import { FormError } from '../../sql/form-catalog.ts';
import { DEFAULT_LOCK, parseDuration, type LockOptions } from '../../sql/locking.ts';
import { assertNoEngine, describeUninstall, planFormBackout, planUninstall, runFormBackout, runUninstall } from '../../sql/backout.ts';
import { describeCheck } from '../../sql/privileges.ts';
import { configFrom, parseForm, print, serverOf, UsageError, type GlobalOptions } from '../common.ts';
import { maskSecrets } from '../../log.ts';

export async function migrateCommand(opts: GlobalOptions, cmd: { server?: string }): Promise<void> {
  const config = await configFrom(opts);
  const servers = cmd.server ? [serverOf(config, cmd.server)] : Object.values(config.servers);
  // every server is tried: one that cannot be reached does not keep the others behind
  const failed: string[] = [];
  for (const server of servers) {
    const where = `${server.name} (${describeConnection(server.connection)})`;
    try {
      const { applied } = await migrateServer(toPgClientConfig(server.connection));
      print(`${where}: ${applied.length ? `applied ${applied.join(', ')}` : 'up to date'}`);
    } catch (err) {
      failed.push(server.name);
      process.stderr.write(`pgdso: ${where}: ${maskSecrets((err as Error).message)}\n`);
    }
  }
  if (failed.length) throw new Error(`migrate failed on ${failed.join(', ')}`);
}

interface LockFlags {
  lockTimeout?: string;
  lockAttempts?: string;
}

function lockOptions(cmd: LockFlags): LockOptions {
  const lockTimeoutMs = cmd.lockTimeout === undefined ? DEFAULT_LOCK.lockTimeoutMs : parseDuration(cmd.lockTimeout);
  if (lockTimeoutMs === null) throw new UsageError(`--lock-timeout: "${cmd.lockTimeout}" is not a duration (5s, 500ms, or milliseconds)`);
  const attempts = cmd.lockAttempts === undefined ? DEFAULT_LOCK.attempts : Number(cmd.lockAttempts);
  if (!Number.isInteger(attempts) || attempts < 1) throw new UsageError(`--lock-attempts: "${cmd.lockAttempts}" is not a positive integer`);
  return { lockTimeoutMs, attempts };
}

export async function formsEnableCommand(opts: GlobalOptions, cmd: { server: string; form: string } & LockFlags): Promise<void> {
  const config = await configFrom(opts);
  const server = serverOf(config, cmd.server);
  const { schema, table } = parseForm(cmd.form);
  const lock = lockOptions(cmd);
  try {
    const result = await enableForm(toPgClientConfig(server.connection), schema, table, lock);
    for (const change of result.changes) print(`  ${change}`);
    print(
      `${server.name}: form ${schema}.${table} enabled (request ID ${result.form.keyColumn}; ` +
        `slot ${result.slot}${result.slotCreated ? ' created' : ''}${result.changes.length ? '' : '; nothing to change'})`,
    );
  } catch (err) {
    if (err instanceof FormError) throw new UsageError(`${server.name}: ${err.message}`);
    if (err instanceof PreflightError) throw new Error(`${server.name}: ${err.message}`, { cause: err });
    throw new Error(`${server.name} (${describeConnection(server.connection)}): ${(err as Error).message}`, { cause: err });
  }
}

/** The end of a preview: nothing changed; and what would stop --yes now, if anything. */
async function previewEnd(client: pg.Client): Promise<void> {
  print('nothing changed: run again with --yes to do it');
  await assertNoEngine(client).catch((err: Error) => print(`note: --yes would be refused now: ${err.message}`));
}

async function withServer<T>(opts: GlobalOptions, name: string, use: (client: pg.Client, server: string) => Promise<T>): Promise<T> {
  const config = await configFrom(opts);
  const server = serverOf(config, name);
  const client = new pg.Client({ ...toPgClientConfig(server.connection), application_name: 'pgdso admin' });
  client.on('error', () => {});
  try {
    await client.connect();
    return await use(client, server.name);
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new Error(`${server.name} (${describeConnection(server.connection)}): ${(err as Error).message}`, { cause: err });
  } finally {
    await client.end().catch(() => {});
  }
}

export async function formsDisableCommand(
  opts: GlobalOptions,
  cmd: { server: string; form: string; dropColumns?: boolean; yes?: boolean } & LockFlags,
): Promise<void> {
  const { schema, table } = parseForm(cmd.form);
  const lock = lockOptions(cmd);
  await withServer(opts, cmd.server, async (client, server) => {
    const plan = await planFormBackout(client, schema, table, { dropColumns: cmd.dropColumns === true });
    if (!plan) throw new UsageError(`${server}: form ${schema}.${table} does not exist`);
    if (plan.statements.length === 0) {
      print(`${server}: form ${schema}.${table} is not enabled: nothing to do`);
      return;
    }
    if (cmd.yes) await assertNoEngine(client);
    print(`${server}: forms disable ${schema}.${table} ${cmd.yes ? 'runs' : 'would run'}:`);
    for (const s of plan.statements) print(`  ${s};`);
    if (!cmd.dropColumns) print('  (the distributed columns dso_* stay: --drop-columns drops them, with their values)');
    if (!cmd.yes) {
      await previewEnd(client);
      return;
    }
    await runFormBackout(client, plan, lock);
    const left = await client.query(`SELECT count(*)::int AS n FROM pgdso.forms`).catch(() => ({ rows: [{ n: 0 }] }));
    print(
      `${server}: form ${schema}.${table} disabled` +
        (left.rows[0].n === 0 ? '; no form left enabled: the slot still holds WAL until `pgdso uninstall` drops it' : ''),
    );
  });
}

export async function uninstallCommand(
  opts: GlobalOptions,
  cmd: { server: string; dropColumns?: boolean; dropSchema?: boolean; yes?: boolean } & LockFlags,
): Promise<void> {
  const lock = lockOptions(cmd);
  await withServer(opts, cmd.server, async (client, server) => {
    if (cmd.yes) await assertNoEngine(client);
    const plan = await planUninstall(client, { dropColumns: cmd.dropColumns === true, dropSchema: cmd.dropSchema === true });
    if (plan.checks.length)
      throw new Error(`nothing was changed; fix first:\n${plan.checks.map((c) => `  - ${describeCheck(c)}`).join('\n')}`);
    const lines = describeUninstall(plan);
    if (lines.length === 0) {
      print(`${server}: nothing of pgdso left to remove`);
      return;
    }
    print(`${server}: uninstall ${cmd.yes ? 'runs' : 'would run'}:`);
    for (const line of lines) print(`  ${line}`);
    if (!cmd.dropColumns) print('  (the distributed columns dso_* stay: --drop-columns drops them, with their values)');
    if (!cmd.dropSchema) print('  (the control schema pgdso stays, with its queue, errors and conflicts: --drop-schema drops it)');
    if (!cmd.yes) {
      await previewEnd(client);
      return;
    }
    await runUninstall(client, plan, lock);
    print(`${server}: pgdso uninstalled`);
  });
}
