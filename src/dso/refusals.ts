// Changes pgdso cannot carry whole, recorded in the source's pending_errors with what to do: a
// change that arrived without some values (unchanged large values, replica identity not full),
// a delete that arrived with its key alone, a TRUNCATE.
import { formatLsn, type Relation, type RowChange, type TextRow } from '../change.ts';
import type { MappingConfig } from '../config/types.ts';
import { DSO_COLUMN_NAMES } from '../sql/form-catalog.ts';
import { qualified } from '../sql/identifiers.ts';
import type { PendingEntry, QueuedOp } from '../queue/sql.ts';
import type { Batch } from '../engine/batch.ts';
import type { SessionState } from '../engine/state.ts';
import { keptInStep, type Topology } from '../engine/topology.ts';
import type { ChangeContext, LinkRef, OpenTransaction } from '../engine/types.ts';

/** Columns a mapping carries whose values the change lacks (unchanged TOAST values without replica identity full). */
export function unchangedColumns(change: RowChange, link: LinkRef): string[] | null {
  if (change.op !== 'update' || change.relation.replicaIdentity === 'full' || !change.new) return null;
  const { fields } = link.mapping;
  const mapped = link.forward ? Object.values(fields.map) : Object.keys(fields.map);
  const missing: string[] = [];
  for (const { name } of change.relation.columns) {
    if (change.new[name] !== undefined) continue;
    const carried =
      name === 'dso_mapping_history' ||
      (!DSO_COLUMN_NAMES.has(name) && ((fields.byName && !(link.forward && fields.exclude.includes(name))) || mapped.includes(name)));
    if (carried) missing.push(name);
  }
  return missing.length ? missing : null;
}

export class Refusals {
  /** relations of forms already reported as not replica identity full */
  private readonly warnedIdentity = new WeakSet<Relation>();

  constructor(
    private readonly state: SessionState,
    private readonly topology: Topology,
    private readonly batch: Batch,
  ) {}

  /** Says once per decoded relation that a form is not REPLICA IDENTITY FULL, and what that costs. */
  warnIdentity(change: RowChange): void {
    const { relation } = change;
    if (relation.replicaIdentity === 'full' || this.warnedIdentity.has(relation)) return;
    this.warnedIdentity.add(relation);
    const { server } = this.state;
    const formKey = `${relation.schema}.${relation.table}`;
    this.state.log.error(
      { form: formKey, replicaIdentity: relation.replicaIdentity, lsn: formatLsn(change.lsn) },
      `form ${formKey} is REPLICA IDENTITY ${relation.replicaIdentity.toUpperCase()}, not FULL: its updates that leave a large value ` +
        'unchanged, and its deletes, arrive incomplete and go to pgdso.pending_errors. ' +
        `Run ALTER TABLE ${qualified(relation.schema, relation.table)} REPLICA IDENTITY FULL ` +
        `(or pgdso forms enable --server ${server} --form ${formKey}), then pgdso pending retry --server ${server} --all`,
    );
  }

  /**
   * An operation whose change arrived without some of its values: recorded in pending_errors
   * (the source copy gets `failure`), and a retry sends the request's current values instead.
   */
  refuseIncomplete(ctx: ChangeContext, entry: PendingEntry, missing: string[]): void {
    const { relation } = ctx.change;
    const { server } = this.state;
    const formKey = `${ctx.form.schema}.${ctx.form.table}`;
    const op: QueuedOp = { ...entry.op, refetch: true };
    this.batch.reject({
      type: entry.type,
      mapping: entry.mapping,
      source: ctx.form,
      targetServer: entry.targetServer,
      requestId: op.requestId,
      lsn: ctx.change.lsn,
      sqlstate: null,
      payload: { op, targetForm: entry.targetForm, targetKey: op.targetKey, missing },
      error:
        `mapping "${entry.mapping.name}": ${entry.type} of request ${op.requestId} to ${entry.targetServer}: ` +
        `the change arrived without the values of ${missing.join(', ')} (large values left unchanged are not sent: ` +
        `${formKey} is REPLICA IDENTITY ${relation.replicaIdentity.toUpperCase()}, not FULL). ` +
        `Run ALTER TABLE ${qualified(ctx.form.schema, ctx.form.table)} REPLICA IDENTITY FULL ` +
        `(or pgdso forms enable --server ${server} --form ${formKey}), then pgdso pending retry --server ${server} --all: ` +
        "the retry sends the request's current values",
    });
  }

  /**
   * A delete that arrived with the key alone (replica identity not full): which copies the row
   * had is unknown. Recorded in pending_errors for every server a kept-in-step mapping of the
   * form leads to, with what to do; nothing is deleted there.
   */
  incompleteDelete(ctx: ChangeContext, row: TextRow): void {
    const formKey = `${ctx.form.schema}.${ctx.form.table}`;
    const requestId = row[ctx.form.keyColumn];
    if (requestId === null || requestId === undefined) return;
    const servers = new Map<string, MappingConfig>();
    for (const ref of this.topology.links.values()) {
      const here = ref.forward ? ref.mapping.from : ref.mapping.to;
      if (keptInStep(ref.mapping) && `${here.schema}.${here.table}` === formKey && !servers.has(ref.server))
        servers.set(ref.server, ref.mapping);
    }
    for (const [server, mapping] of servers) {
      const error =
        `delete of request ${requestId} of ${formKey}: it arrived with its key alone (${formKey} is REPLICA IDENTITY ` +
        `${ctx.change.relation.replicaIdentity.toUpperCase()}, not FULL), so pgdso cannot tell whether it had a copy on ${server} ` +
        `(mapping "${mapping.name}"): delete that copy there by hand if it has one, and run ` +
        `ALTER TABLE ${qualified(ctx.form.schema, ctx.form.table)} REPLICA IDENTITY FULL (or pgdso forms enable)`;
      this.batch.reject({
        type: 'delete',
        mapping,
        source: ctx.form,
        targetServer: server,
        requestId,
        lsn: ctx.change.lsn,
        sqlstate: null,
        payload: { key: requestId },
        error,
        noStatus: true,
      });
    }
  }

  /**
   * A TRUNCATE of a form (the guard refuses it while the form holds linked copies): what it
   * removed has copies elsewhere that pgdso does not delete; recorded in pending_errors.
   */
  truncate(relations: Relation[], tx: OpenTransaction | null): void {
    const here = this.state.server;
    if (!tx || tx.writer === here) return;
    for (const relation of relations) {
      const formKey = `${relation.schema}.${relation.table}`;
      const form = this.topology.forms.get(formKey);
      if (!form) continue;
      const servers = new Map<string, MappingConfig>();
      for (const ref of this.topology.links.values()) {
        const end = ref.forward ? ref.mapping.from : ref.mapping.to;
        if (`${end.schema}.${end.table}` === formKey && !servers.has(ref.server)) servers.set(ref.server, ref.mapping);
      }
      for (const [server, mapping] of servers) {
        const error =
          `TRUNCATE of ${formKey} on ${here}: pgdso does not carry TRUNCATE; copies of its requests on ${server} ` +
          `(mapping "${mapping.name}") were not deleted. Delete them there by hand if they should go; next time DELETE the rows ` +
          '(pgdso carries deletes) or run pgdso forms disable first';
        this.batch.reject({
          type: 'delete',
          mapping,
          source: form,
          targetServer: server,
          requestId: '*',
          lsn: tx.finalLsn,
          sqlstate: null,
          payload: { truncate: formKey },
          error,
          noStatus: true,
        });
      }
      if (servers.size)
        this.state.log.error(
          { form: formKey, peers: [...servers.keys()] },
          `TRUNCATE of ${formKey}: its copies on ${[...servers.keys()].join(', ')} were not deleted (recorded in pgdso.pending_errors)`,
        );
    }
  }
}
