// A queued operation read back from pgdso.pending and built into a lane's group again, against
// the column plans and catalogs of now.
import { parseLsn } from '../change.ts';
import type { MappingConfig } from '../config/types.ts';
import type { LaneBuffer } from '../applier/buffer.ts';
import { buildColumnPlan, type ColumnPlan } from '../applier/plan.ts';
import { TransferGroup } from '../applier/transfer.ts';
import { CopyDeleteGroup, CopyUpdateGroup } from '../applier/chain.ts';
import type { ApplyFailure } from '../applier/sets.ts';
import type { FormInfo } from '../sql/form-catalog.ts';
import { errorText } from '../engine/errors.ts';
import type { GroupOperations } from '../engine/operations.ts';
import type { SessionState } from '../engine/state.ts';
import { valuesOf, type Topology } from '../engine/topology.ts';
import { opType, type PendingEntry, type QueuedOp } from './sql.ts';

export class QueuedOperations {
  constructor(
    private readonly state: SessionState,
    private readonly topology: Topology,
    private readonly groupOps: GroupOperations,
  ) {}

  /** A queued operation read back. */
  entryOf(row: { id: string; op: QueuedOp; mapping: string }): PendingEntry {
    const ref = this.topology.links.get(row.op.link);
    const mapping = ref?.mapping ?? this.state.opts.config.mappings[row.mapping];
    const there = ref ? (ref.forward ? ref.mapping.to : ref.mapping.from) : mapping?.to;
    return {
      id: row.id,
      op: row.op,
      type: opType(row.op),
      mapping: mapping ?? ({ name: row.mapping, pool: 'default' } as MappingConfig),
      targetServer: ref?.server ?? there?.server ?? '',
      targetForm: there ? `${there.schema}.${there.table}` : '',
    };
  }

  /** Buffers a queued operation in a lane; a failure when it can no longer be built. */
  rebuild(
    entry: PendingEntry,
    buffer: LaneBuffer<ApplyFailure>,
    assigned: Map<string, Map<string, string>>,
    plans: Map<string, ColumnPlan>,
  ): ApplyFailure | null {
    const { op } = entry;
    const { server } = this.state;
    const ref = this.topology.links.get(op.link);
    const form = this.topology.forms.get(op.form);
    const lsn = parseLsn(op.lsn);
    const refuse = (error: string): ApplyFailure => {
      const [schema, table] = op.form.split('.') as [string, string];
      return {
        type: entry.type,
        mapping: entry.mapping,
        source: form ?? ({ schema, table } as FormInfo),
        targetServer: entry.targetServer,
        requestId: op.requestId,
        lsn,
        payload: { op, targetForm: entry.targetForm, targetKey: op.targetKey },
        error,
        sqlstate: null,
      };
    };
    if (!ref?.resolved || !form)
      return refuse(
        `queued ${entry.type} of request ${op.requestId}: mapping "${entry.mapping.name}" or form ${op.form} is no longer in the rules`,
      );
    const link = ref.resolved;
    const { mapping } = link;
    try {
      let groupKey: string;
      if (op.group === 'transfer') {
        const columns = Object.keys(op.row ?? {});
        const planKey = `${mapping.name}\u0000${columns.join('\u0000')}`;
        let plan = plans.get(planKey);
        if (!plan) plans.set(planKey, (plan = buildColumnPlan(mapping, columns, form.keyColumn, this.topology.catalogOf(mapping.name)!)));
        let ids = assigned.get(mapping.name);
        if (!ids) assigned.set(mapping.name, (ids = new Map()));
        groupKey = `transfer:${planKey}`;
        const planned = plan;
        const newIds = ids;
        buffer
          .group(groupKey, entry.targetForm, op.targetKey, () => new TransferGroup(planned, form, newIds))
          .addChange(
            {
              requestId: op.requestId,
              targetKey: op.targetKey,
              values: valuesOf(plan, op.row ?? {}, form),
              history: op.history,
              modifiedAt: op.modifiedAt ?? null,
              lsn,
            },
            false,
          );
      } else if (op.group === 'copy-update') {
        const kind = op.kind ?? 'chain';
        const withValues = op.withValues ?? false;
        groupKey = `${kind}:${withValues}:${op.link}`;
        buffer
          .group(groupKey, entry.targetForm, op.targetKey, () => new CopyUpdateGroup(link, kind, withValues, form, server))
          .add({
            requestId: op.requestId,
            targetKey: op.targetKey,
            history: op.history,
            values: withValues ? valuesOf(link.plan, op.row ?? {}, form) : [],
            current: op.current ?? null,
            master: op.master ?? null,
            newHistory: op.newHistory ?? null,
            lsn,
          });
      } else {
        groupKey = `delete:${op.link}`;
        buffer
          .group(groupKey, entry.targetForm, op.targetKey, () => new CopyDeleteGroup(link, form, server))
          .add({ requestId: op.requestId, targetKey: op.targetKey, history: op.history, lsn });
      }
      this.groupOps.added(buffer, groupKey, entry);
      return null;
    } catch (err) {
      return refuse(`queued ${entry.type} of request ${op.requestId} by mapping "${mapping.name}": ${errorText(err)}`);
    }
  }
}
