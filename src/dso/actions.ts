// DSO's four operations as filter actions on a change: transfer (with loop detection and the
// request's new hop), update (the master's values now), return (ownership back where the request
// came from) and delete (the copy on a mapping's target).
import type { RowChange, RowSource, TextRow } from '../change.ts';
import type { ActionConfig, MappingConfig } from '../config/types.ts';
import type { Facts } from '../rules/facts.ts';
import { TransferGroup } from '../applier/transfer.ts';
import type { Router } from '../engine/router.ts';
import type { SessionState } from '../engine/state.ts';
import { keptInStep, valuesOf, type Topology } from '../engine/topology.ts';
import type { ChangeContext, LinkRef, Route } from '../engine/types.ts';
import type { LazyEntry } from '../engine/operations.ts';
import type { PendingEntry } from '../queue/sql.ts';
import type { FormInfo } from '../sql/form-catalog.ts';
import { seenOf, type Batch } from '../engine/batch.ts';
import type { Chain } from './chain.ts';
import { HopTemplates, returnedBefore, targetKeyOf, visitedServers, withHop } from './history.ts';
import { unchangedColumns, type Refusals } from './refusals.ts';

export class DsoActions {
  private readonly hops: HopTemplates;

  constructor(
    private readonly state: SessionState,
    private readonly topology: Topology,
    private readonly batch: Batch,
    private readonly router: Router,
    private readonly chain: Chain,
    private readonly refusals: Refusals,
  ) {
    this.hops = new HopTemplates(state.server);
  }

  perform(action: ActionConfig, filter: string, ctx: ChangeContext, facts: Facts): void {
    const { mappings } = this.state.opts.config;
    switch (action.type) {
      case 'transfer':
        return this.transfer(mappings[action.mapping]!, action.overrideLoopDetection, filter, ctx, facts);
      case 'update':
        return this.update(mappings[action.mapping]!, filter, ctx, facts);
      case 'return':
        return this.return(action.mapping, action.overrideLoopDetection, filter, ctx, facts);
      case 'delete':
        return this.deleteCopy(mappings[action.mapping]!, ctx);
    }
  }

  /**
   * The new row and request ID of a change a master-only operation (transfer, update, return)
   * acts on; null (and a debug line) when it does not: a delete, or a copy that is not master.
   */
  private masterChange(ctx: ChangeContext, facts: Facts, filter: string, operation: string): { row: TextRow; requestId: string } | null {
    const row = ctx.change.new;
    if (ctx.change.op === 'delete' || !row) return null;
    const requestId = row[ctx.form.keyColumn];
    if (requestId === null || requestId === undefined) return null;
    if (!facts.master) {
      this.state.log.debug({ filter, requestId }, `not the master copy: no ${operation}`);
      return null;
    }
    return { row, requestId };
  }

  private transfer(mapping: MappingConfig, override: boolean, filter: string, ctx: ChangeContext, facts: Facts): void {
    const found = this.masterChange(ctx, facts, filter, 'transfer');
    if (!found) return;
    const { row, requestId } = found;
    const { change, form, tx } = ctx;
    const target = `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`;
    const historyText = row.dso_mapping_history ?? '[]';
    const visited = visitedServers(historyText);
    if (visited === null) {
      // a history edited into something else: no loop information, no chain to extend
      this.router.reject(
        ctx,
        'transfer',
        mapping,
        requestId,
        mapping.to.server,
        `mapping "${mapping.name}": request ${requestId}: dso_mapping_history is not a list of hops with fromServer and fromRequestId: ` +
          historyText.slice(0, 200),
        { target, history: historyText },
      );
      return;
    }
    if (!override && visited.has(mapping.to.server)) {
      this.state.log.debug({ filter, mapping: mapping.name, requestId }, 'loop detection: the request has been on the target server');
      return;
    }
    const owns = mapping.transferMode === 'data+ownership';
    if (owns && ctx.ownership !== null && ctx.ownership !== mapping.name) {
      // DSO: ownership cannot be broadcast; the first transfer with ownership took it
      this.router.reject(
        ctx,
        'transfer',
        mapping,
        requestId,
        mapping.to.server,
        `mapping "${mapping.name}": request ${requestId}: ownership cannot be broadcast: filter "${filter}" already transferred it ` +
          `with ownership by mapping "${ctx.ownership}" in the same change; use data-only or independent-copy for the other copies`,
        { target },
      );
      return;
    }
    if (owns) ctx.ownership = mapping.name;
    ctx.sentTo.add(mapping.to.server);
    const targetKey = targetKeyOf(row, mapping, requestId);
    const table = `${mapping.to.schema}.${mapping.to.table}`;
    const route = this.router.route(mapping.to.server, mapping.pool, table, targetKey, tx.finalLsn);
    let sent: Route['to'] = 'skip';
    if (route.to !== 'skip') {
      const [before, after] = this.hops.template(mapping, form, tx);
      const history = withHop(historyText, `${before}${JSON.stringify(requestId)}${after}`);
      const modifiedAt = row.dso_modified_at ?? null;
      const link = this.topology.links.get(`${mapping.name}>`)!;
      // the operation as queued: built when it goes to the queue, or fails (not for every row)
      const entry = new TransferEntry(
        this.router,
        link,
        form,
        requestId,
        targetKey,
        history,
        rowSource(change, row),
        modifiedAt,
        change.lsn,
      );
      const missing = unchangedColumns(change, link);
      if (missing) return this.refusals.refuseIncomplete(ctx, entry.build(), missing);
      sent = this.router.dispatch(ctx, route, entry, (buffer) => {
        const plan = this.topology.planFor(change.relation, mapping, form);
        const groupKey = `transfer:${mapping.name}:${this.topology.planId(plan)}`;
        buffer
          .group(groupKey, table, targetKey, () => new TransferGroup(plan, form, this.batch.assignedFor(mapping)))
          .addChange(
            { requestId, targetKey, values: valuesOf(plan, row, form), history, modifiedAt, lsn: change.lsn },
            change.op === 'insert',
          );
        return groupKey;
      });
    }
    this.router.bookkeeping(ctx, { op: 'transfer' }, mapping, requestId, sent, row);
    if (keptInStep(mapping) && route.to !== 'skip') this.chain.expect(ctx, mapping, requestId, targetKey);
    // the copies behind this one learn where the master is now
    if (owns) this.chain.relay(ctx, row, 'from', { current: [mapping.to.server, mapping.to.table], values: false });
  }

  /** The update action: the master's current values to the copy on the mapping's target, now. */
  private update(mapping: MappingConfig, filter: string, ctx: ChangeContext, facts: Facts): void {
    const found = this.masterChange(ctx, facts, filter, 'update');
    if (!found) return;
    const { row, requestId } = found;
    const link = this.topology.links.get(`${mapping.name}>`)!;
    ctx.sentTo.add(link.server);
    const sent = this.chain.updateCopy(
      ctx,
      link,
      'update',
      true,
      row,
      {
        requestId,
        targetKey: targetKeyOf(row, mapping, requestId),
        history: row.dso_mapping_history ?? '[]',
        current: null,
        master: null,
        newHistory: null,
      },
      'update',
    );
    this.router.bookkeeping(ctx, { op: 'update' }, mapping, requestId, sent, row);
  }

  /**
   * The return action: ownership back to the server the request came from (by the mapping that
   * brought it, or the one named), with the current values unless the mapping never updates.
   * Loop detection: a request is not returned twice to the same server unless overridden.
   */
  private return(named: string | undefined, override: boolean, filter: string, ctx: ChangeContext, facts: Facts): void {
    const found = this.masterChange(ctx, facts, filter, 'return');
    if (!found) return;
    const { row, requestId } = found;
    const { form, tx } = ctx;
    const { server, opts } = this.state;
    const name = named ?? row.dso_from_mapping;
    const mapping = name ? opts.config.mappings[name] : undefined;
    const link = name ? this.topology.links.get(`${name}<`) : undefined;
    const fromKey = row.dso_from_request_id;
    if (!mapping || !link || !fromKey || mapping.to.schema !== form.schema || mapping.to.table !== form.table) {
      const anyMapping =
        mapping ??
        Object.values(opts.config.mappings).find((m) => m.to.server === server && m.to.schema === form.schema && m.to.table === form.table);
      // refused by the config check
      if (!anyMapping) throw new Error(`filter "${filter}": a return action on ${form.schema}.${form.table} without a mapping to it`);
      this.router.reject(
        ctx,
        'return',
        anyMapping,
        requestId,
        row.dso_from_server ?? '(none)',
        `filter "${filter}": request ${requestId} has nowhere to return to: it was not transferred here` +
          `${name ? ` by mapping "${name}"` : ''} (dso_from_mapping ${row.dso_from_mapping ?? 'is empty'})`,
        { from: { server: row.dso_from_server ?? null, requestId: fromKey ?? null, mapping: row.dso_from_mapping ?? null } },
      );
      return;
    }
    const historyText = row.dso_mapping_history ?? '[]';
    if (!override && returnedBefore(historyText, link.server)) {
      this.state.log.debug({ filter, mapping: mapping.name, requestId }, 'loop detection: the request was returned to that server before');
      return;
    }
    const hop = JSON.stringify({
      at: tx.commitTime.toISOString(),
      mapping: mapping.name,
      operation: 'return',
      fromServer: server,
      fromForm: form.table,
      fromRequestId: requestId,
      toServer: link.server,
      toForm: mapping.from.table,
    });
    const newHistory = withHop(historyText, hop);
    const current = [mapping.from.server, mapping.from.table] as const;
    ctx.sentTo.add(link.server);
    const withValues = mapping.whenToUpdate !== 'never';
    const sent = this.chain.updateCopy(
      ctx,
      link,
      'return',
      withValues,
      row,
      { requestId, targetKey: fromKey, history: historyText, current, master: true, newHistory },
      'return',
    );
    this.router.bookkeeping(ctx, { op: 'return' }, mapping, requestId, sent, row);
    this.chain.relay(ctx, row, 'to', { current, values: false });
  }

  /** The delete action: the copy on the mapping's target goes. */
  private deleteCopy(mapping: MappingConfig, ctx: ChangeContext): void {
    const row = ctx.change.op === 'delete' ? ctx.change.old : ctx.change.new;
    const requestId = row?.[ctx.form.keyColumn];
    if (!row || requestId === null || requestId === undefined) return;
    const link = this.topology.links.get(`${mapping.name}>`)!;
    this.chain.deleteOn(ctx, link, {
      requestId,
      targetKey: targetKeyOf(row, mapping, requestId),
      history: row.dso_mapping_history ?? '[]',
    });
  }
}

/** A transfer's queued form, built when needed (see LazyEntry): only what it is built from. */
class TransferEntry implements LazyEntry {
  constructor(
    private readonly router: Router,
    private readonly link: LinkRef,
    private readonly form: FormInfo,
    private readonly requestId: string,
    private readonly targetKey: string,
    private readonly history: string,
    private readonly source: RowSource,
    private readonly modifiedAt: string | null,
    private readonly lsn: bigint,
  ) {}

  build(): PendingEntry {
    const { form, requestId, targetKey, history, modifiedAt } = this;
    const row = this.source.row()!;
    const op = { group: 'transfer', form: `${form.schema}.${form.table}`, requestId, targetKey, history, row, modifiedAt } as const;
    return this.router.entry(this.link, { ...op, bookkeeping: { op: 'transfer', seen: seenOf(row) } }, this.lsn);
  }
}

/** The change's new row as a RowSource: its bytes when it has them, else the row itself. */
function rowSource(change: RowChange, row: TextRow): RowSource {
  return change.newLater?.() ?? { row: () => row };
}
