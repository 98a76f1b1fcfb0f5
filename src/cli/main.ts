// The pgdso command line. Exit codes: 0 ok, 1 runtime failure, 2 bad usage, config or rules.
// Signals are handled here only: one AbortController reaches every loop.
import { Command, CommanderError, Option } from 'commander';
import { ConfigError } from '../config/types.ts';
import { maskSecrets } from '../log.ts';
import { UsageError, EXIT } from './common.ts';

const program = new Command();
program
  .name('pgdso')
  .description('Distributed Server Option for PostgreSQL: rule-driven request transfer between databases')
  .option('--config <file>', 'config file', './pgdso.config.json')
  .addOption(
    new Option('--log-level <level>', 'log level')
      .choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace'])
      .default(process.env.PGDSO_LOG_LEVEL ?? 'info'),
  )
  .showHelpAfterError()
  .exitOverride();

const lazy =
  (path: string, name: string) =>
  async (...args: unknown[]) => {
    const mod = await import(path);
    await mod[name](program.opts(), ...args);
  };

program
  .command('migrate')
  .description('create or upgrade the control schema on every server')
  .option('--server <name>', 'only this server')
  .action(lazy('./commands/admin.ts', 'migrateCommand'));

const forms = program.command('forms').description('manage forms');
const lockFlags = (cmd: Command) =>
  cmd
    .option('--lock-timeout <duration>', 'how long each attempt waits for a lock on the form (5s, 500ms)', '5s')
    .option('--lock-attempts <n>', 'attempts before giving up', '3');
lockFlags(
  forms
    .command('enable')
    .description(
      'check privileges and settings, then add the distributed columns, the guards, replica identity, publication and slot ' +
        'to a form, all or nothing; idempotent',
    )
    .requiredOption('--server <name>', 'server')
    .requiredOption('--form <form>', 'form (table, or schema.table)'),
).action(lazy('./commands/admin.ts', 'formsEnableCommand'));
lockFlags(
  forms
    .command('disable')
    .description("remove a form's guards, publication membership and replica identity (shows what it would do; --yes does it)")
    .requiredOption('--server <name>', 'server')
    .requiredOption('--form <form>', 'form (table, or schema.table)')
    .option('--drop-columns', 'also drop the distributed columns dso_* and their values')
    .option('--yes', 'do it (without: print what would be done, change nothing)'),
).action(lazy('./commands/admin.ts', 'formsDisableCommand'));

lockFlags(
  program
    .command('uninstall')
    .description(
      "remove pgdso from a server: every form's guards, the publication, the slot, the replication origins " +
        '(shows what it would do; --yes does it)',
    )
    .requiredOption('--server <name>', 'server')
    .option('--drop-columns', 'also drop the distributed columns dso_* of every form, with their values')
    .option('--drop-schema', 'also drop the control schema pgdso (its queue, errors and conflicts)')
    .option('--yes', 'do it (without: print what would be done, change nothing)'),
).action(lazy('./commands/admin.ts', 'uninstallCommand'));

const rules = program.command('rules').description('check and test rules');
rules
  .command('check')
  .description('validate config and rules against the schemas and the live catalogs')
  .action(lazy('./commands/rules.ts', 'rulesCheckCommand'));
rules
  .command('test')
  .description('print, as JSON, the filters that fire on a change and their actions')
  .requiredOption('--server <name>')
  .requiredOption('--form <form>')
  .addOption(new Option('--op <op>').choices(['insert', 'update', 'delete']).makeOptionMandatory())
  .requiredOption('--row <json>', 'the row (values after the change; before it for a delete)')
  .option('--old <json>', 'the row before an update')
  .option('--origin <server>', 'the server whose engine made the change (default: a user of this server)')
  .action(lazy('./commands/rules.ts', 'rulesTestCommand'));
rules
  .command('publish')
  .description('the owner of admin validates the rule files and publishes them to every instance of the group')
  .option('--server <name>', 'only this server')
  .action(lazy('./commands/group.ts', 'rulesPublishCommand'));

program
  .command('run')
  .description('run instances (one per configured server when none is named)')
  .option('--server <name>', 'serve this server only')
  .option('--instance-id <id>', 'instance id (default host-pid)')
  .option('--rank <n>', 'failover rank of this instance (lower wins)')
  .action(lazy('./commands/run.ts', 'runCommand'));

const group = program.command('group').description('the server group: instances, ranks, operation owners');
group
  .command('rank')
  .description('set the failover rank of an instance (lower wins; null: last); applied within one check interval')
  .requiredOption('--server <name>', 'server')
  .requiredOption('--instance-id <id>', 'instance')
  .requiredOption('--rank <n>', 'rank, or null')
  .option('--operation <op>', 'dso, escalation or admin (default: all three)')
  .action(lazy('./commands/group.ts', 'groupRankCommand'));

program
  .command('status')
  .description('instances, slot lag, pending, errors and conflicts per server')
  .option('--json', 'print JSON')
  .action(lazy('./commands/status.ts', 'statusCommand'));

const pending = program.command('pending').description('the pending queue and its errors; retry sends failed operations again');
pending
  .command('list')
  .description('queued operations (pgdso.pending) and failed ones (pgdso.pending_errors) per server')
  .option('--server <name>', 'only this server')
  .option('--mapping <name>', 'only this mapping')
  .option('--json', 'print JSON (with payloads)')
  .action(lazy('./commands/pending.ts', 'pendingListCommand'));

/** retry and discard: which rows (exactly one of --id, --mapping, --all; checked by the command) */
const selecting = (cmd: Command, verb: string) =>
  cmd
    .option('--server <name>', 'only this server')
    .option('--id <n>', `${verb} this row (ids are per server: needs --server when several are configured)`)
    .option('--mapping <name>', `${verb} the rows of this mapping`)
    .option('--all', `${verb} every row`)
    .option('--queued', 'act on queued operations (pgdso.pending) instead of failed ones (pgdso.pending_errors)');
selecting(pending.command('retry'), 'retry')
  .description('send failed operations again (back into the queue, in order); with --queued, try queued ones now')
  .action(lazy('./commands/pending.ts', 'pendingRetryCommand'));
selecting(pending.command('discard'), 'discard')
  .description('delete failed operations; with --queued, drop queued operations (they never reach their target)')
  .action(lazy('./commands/pending.ts', 'pendingDiscardCommand'));

program
  .command('escalate')
  .description('run one escalation now (through the owner of escalation when an instance runs, else in this process)')
  .requiredOption('--name <escalation>', 'the escalation')
  .option('--json', 'print the run as JSON')
  .action(lazy('./commands/escalate.ts', 'escalateCommand'));

program
  .command('sync')
  .description("carry the requests that exist on a mapping's source (the initial load); resumes an unfinished run")
  .requiredOption('--mapping <name>', 'the mapping whose transfer carries them')
  .option('--where <json>', 'conditions as in rules, or column equalities such as {"site": "chicago"}')
  .option('--batch <n>', 'requests per batch (one transaction each; default 1000)')
  .option('--restart', 'start from the beginning, cancelling an unfinished run')
  .option('--no-wait', 'do not wait for the engine to carry them')
  .action(lazy('./commands/sync.ts', 'syncCommand'));

program
  .command('demo')
  .description("DSO's use cases on embedded PostgreSQL, narrated")
  .option('--keep', 'keep the clusters running at the end (Ctrl-C stops them)')
  .action(lazy('./commands/demo.ts', 'demoCommand'));

try {
  await program.parseAsync(process.argv);
} catch (err) {
  process.exitCode = exitCodeOf(err);
}

function exitCodeOf(err: unknown): number {
  if (err instanceof CommanderError) {
    return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
  }
  if (err instanceof ConfigError) {
    const lines = err.problems.map((p) => `  ${p.file}${p.pointer ? `#${p.pointer}` : ''}: ${p.message}`);
    process.stderr.write(`pgdso: bad config or rules:\n${lines.join('\n')}\n`);
    return EXIT.usage;
  }
  if (err instanceof UsageError) {
    process.stderr.write(`pgdso: ${maskSecrets(err.message)}\n`);
    return EXIT.usage;
  }
  const message = err instanceof Error ? err.message : String(err);
  process.stderr.write(`pgdso: ${maskSecrets(message)}\n`);
  return EXIT.runtime;
}
