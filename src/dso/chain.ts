// The chain of a request's copies kept in step: a change of the master copy reaches the copies
// linked to it by mappings that update immediately (relayed on from copy to copy), a deleted
// master deletes them, and a move of ownership tells the copies behind where the master is now.
import type { TextRow } from '../change.ts';
import { CopyDeleteGroup, CopyUpdateGroup, type CopyDelete, type CopyUpdate, type Link, type UpdateKind } from '../applier/chain.ts';
import type { RequestGroup } from '../applier/sets.ts';
import type { PendingEntry } from '../queue/sql.ts';
import type { Router } from '../engine/router.ts';
import type { SessionState } from '../engine/state.ts';
import { keptInStep, valuesOf, type Topology } from '../engine/topology.ts';
import type { ChangeContext, LinkRef, Route } from '../engine/types.ts';
import { seenOf } from '../engine/batch.ts';
import { unchangedColumns, type Refusals } from './refusals.ts';

export class Chain {
  constructor(
    private readonly state: SessionState,
    private readonly topology: Topology,
    private readonly router: Router,
    private readonly refusals: Refusals,
  ) {}

  /**
   * Keeps the chain in step: a change of the master copy (by a user, or relayed by a
   * neighbour's engine) goes to the copies linked to this one by mappings that update
   * immediately, except the neighbour it came from and any server an action already carried
   * it to; a deleted master deletes them.
   */
  keepInStep(ctx: ChangeContext): void {
    const { change, tx } = ctx;
    const row = change.op === 'delete' ? change.old : change.new;
    if (!row) return;
    // dso_master is NOT NULL: without it, the key alone came
    if (change.op === 'delete' && row.dso_master == null) return this.refusals.incompleteDelete(ctx, row);
    if (tx.writer === null && row.dso_master !== 't') return;
    for (const side of ['from', 'to'] as const) {
      if (change.op === 'delete') {
        const link = this.chainLink(ctx, row, side);
        const targetKey = row[`dso_${side}_request_id`];
        if (!link || !targetKey) continue;
        this.deleteOn(ctx, link, { requestId: row[ctx.form.keyColumn]!, targetKey, history: row.dso_mapping_history ?? '[]' });
      } else {
        this.relay(ctx, row, side, {
          current: row.dso_current_server && row.dso_current_form ? [row.dso_current_server, row.dso_current_form] : null,
          values: true,
        });
      }
    }
  }

  /** The link on that side of the copy when it keeps the chain in step and is not where the change came from. */
  private chainLink(ctx: ChangeContext, row: TextRow, side: 'from' | 'to', evenToWriter = false): LinkRef | undefined {
    const name = row[`dso_${side}_mapping`];
    const mapping = name ? this.state.opts.config.mappings[name] : undefined;
    if (!mapping || !keptInStep(mapping)) return undefined;
    const here = side === 'to' ? mapping.from : mapping.to;
    if (here.server !== this.state.server || here.schema !== ctx.form.schema || here.table !== ctx.form.table) return undefined;
    const link = this.topology.links.get(`${mapping.name}${side === 'to' ? '>' : '<'}`);
    if (!link || (!evenToWriter && link.server === ctx.tx.writer)) return undefined;
    return link;
  }

  /**
   * An update of the linked copy on that side: values and where the master is, or only where
   * the master is now (that news goes to the writer's server too: it does not know yet).
   */
  relay(ctx: ChangeContext, row: TextRow, side: 'from' | 'to', what: { current: readonly [string, string] | null; values: boolean }): void {
    const link = this.chainLink(ctx, row, side, !what.values);
    const targetKey = row[`dso_${side}_request_id`];
    const requestId = row[ctx.form.keyColumn];
    if (!link || !targetKey || !requestId || ctx.sentTo.has(link.server)) return;
    this.updateCopy(ctx, link, 'chain', what.values, row, {
      requestId,
      targetKey,
      history: row.dso_mapping_history ?? '[]',
      current: what.current,
      master: null,
      newHistory: null,
    });
  }

  /** An update of a copy on a link's server (values from the source row when it carries them). */
  updateCopy(
    ctx: ChangeContext,
    link: LinkRef,
    kind: UpdateKind,
    withValues: boolean,
    row: TextRow,
    update: Omit<CopyUpdate, 'values' | 'lsn'>,
    bk?: 'update' | 'return',
  ): Route['to'] {
    const entry = this.router.entry(
      link,
      {
        group: 'copy-update',
        kind,
        withValues,
        form: `${ctx.form.schema}.${ctx.form.table}`,
        requestId: update.requestId,
        targetKey: update.targetKey,
        history: update.history,
        row: withValues ? row : null,
        current: update.current,
        master: update.master,
        newHistory: update.newHistory,
        ...(bk ? { bookkeeping: { op: bk, seen: seenOf(row) } } : {}),
      },
      ctx.change.lsn,
    );
    const missing = withValues ? unchangedColumns(ctx.change, link) : null;
    if (missing) {
      this.refusals.refuseIncomplete(ctx, entry, missing);
      return 'skip';
    }
    return this.onLink(ctx, link, entry, (resolved) => {
      const group = () => new CopyUpdateGroup(resolved, kind, withValues, ctx.form, this.state.server);
      return [
        `${kind}:${withValues}:${this.topology.planId(resolved.plan)}`,
        group,
        { ...update, values: withValues ? valuesOf(resolved.plan, row, ctx.form) : [], lsn: ctx.change.lsn },
      ];
    });
  }

  /** A delete of the copy on a link's server. */
  deleteOn(ctx: ChangeContext, link: LinkRef, del: Omit<CopyDelete, 'lsn'>): void {
    const entry = this.router.entry(
      link,
      {
        group: 'copy-delete',
        form: `${ctx.form.schema}.${ctx.form.table}`,
        requestId: del.requestId,
        targetKey: del.targetKey,
        history: del.history,
        row: null,
      },
      ctx.change.lsn,
    );
    this.onLink(ctx, link, entry, (resolved) => [
      'delete',
      () => new CopyDeleteGroup(resolved, ctx.form, this.state.server),
      { ...del, lsn: ctx.change.lsn },
    ]);
  }

  /** Sends an operation on a copy on a link's server: to its lane, or to the queue. */
  private onLink<R extends { requestId: string; targetKey: string }>(
    ctx: ChangeContext,
    link: LinkRef,
    entry: PendingEntry,
    build: (resolved: Link) => [string, () => RequestGroup<R>, R],
  ): Route['to'] {
    const route = this.router.route(link.server, link.mapping.pool, entry.targetForm, entry.op.targetKey, ctx.tx.finalLsn);
    return this.router.dispatch(ctx, route, entry, (buffer) => {
      const [kind, create, row] = build(link.resolved!);
      const groupKey = `${kind}:${link.mapping.name}${link.forward ? '>' : '<'}`; // kinds with values carry their plan's id
      buffer.group(groupKey, entry.targetForm, row.targetKey, create).add(row);
      return groupKey;
    });
  }
}
