// The migrations, listed in code so that they run from a checkout (tsx) and from a build alike.
import type { Knex } from 'knex';
import * as controlSchema from './20261123000001_control_schema.ts';
import * as applyProgress from './20261123000002_apply_progress.ts';
import * as conflictPolicy from './20261123000003_conflict_policy.ts';
import * as pendingQueue from './20261123000004_pending_queue.ts';
import * as deployment from './20261201000005_deployment.ts';
import * as boardErrors from './20261201000010_board_errors.ts';
import * as serverGroups from './20261202000011_server_groups.ts';
import * as scanRuns from './20261203000012_scan_runs.ts';

const migrations: Record<string, Knex.Migration> = {
  '20261123000001_control_schema': controlSchema,
  '20261123000002_apply_progress': applyProgress,
  '20261123000003_conflict_policy': conflictPolicy,
  '20261123000004_pending_queue': pendingQueue,
  '20261201000005_deployment': deployment,
  '20261201000010_board_errors': boardErrors,
  '20261202000011_server_groups': serverGroups,
  '20261203000012_scan_runs': scanRuns,
};

export const migrationSource: Knex.MigrationSource<string> = {
  getMigrations: async () => Object.keys(migrations).sort(),
  getMigrationName: (name) => name,
  getMigration: async (name) => migrations[name]!,
};
