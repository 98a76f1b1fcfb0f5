import { toPgClientConfig, describeConnection } from '../../config/load.ts';
import { migrateServer } from '../../sql/migrate.ts';
import { enableForm, FormError } from '../../sql/forms.ts';
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

export async function formsEnableCommand(opts: GlobalOptions, cmd: { server: string; form: string }): Promise<void> {
  const config = await configFrom(opts);
  const server = serverOf(config, cmd.server);
  const { schema, table } = parseForm(cmd.form);
  try {
    const result = await enableForm(toPgClientConfig(server.connection), schema, table);
    print(`${server.name}: form ${schema}.${table} enabled (request ID ${result.form.keyColumn}; slot ${result.slot}${result.slotCreated ? ' created' : ''})`);
  } catch (err) {
    if (err instanceof FormError) throw new UsageError(`${server.name}: ${err.message}`);
    throw new Error(`${server.name} (${describeConnection(server.connection)}): ${(err as Error).message}`, { cause: err });
  }
}
