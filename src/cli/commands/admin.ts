import { toPgClientConfig, describeConnection } from '../../config/load.ts';
import { migrateServer } from '../../sql/migrate.ts';
import { enableForm, FormError } from '../../sql/forms.ts';
import { configFrom, parseForm, print, serverOf, UsageError, type GlobalOptions } from '../common.ts';

export async function migrateCommand(opts: GlobalOptions, cmd: { server?: string }): Promise<void> {
  const config = await configFrom(opts);
  const servers = cmd.server ? [serverOf(config, cmd.server)] : Object.values(config.servers);
  for (const server of servers) {
    const { applied } = await migrateServer(toPgClientConfig(server.connection));
    print(`${server.name} (${describeConnection(server.connection)}): ${applied.length ? `applied ${applied.join(', ')}` : 'up to date'}`);
  }
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
    throw err;
  }
}
